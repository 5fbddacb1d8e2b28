"""Layout planner: refuse invalid recipes before any process starts, estimate per-rank memory and traffic.

Parameter counts are exact: the planner builds every role a rank would hold (tmd_megatron.training.roles)
on the meta device for a virtual topology. Memory model per rank (the worst pipeline stage):
- trained roles (student, fake score, discriminator): fp32 weights + fp32 gradients, and ZeroAdamW's fp32
  master copy, reduced gradient and AdamW moments sharded over DP x CP; the student's EMA (fp32, unsharded);
- frozen teacher: its weights (bf16 on GPU except the fp32 regions);
- under bf16 autocast, the bf16 weight copies autocast caches for the model being run;
- activations: bytes saved for backward per block, fitted on our block with saved-tensor hooks (a·L·D +
  b·L·F + c·T·D + e·L + autocast weight casts; tests/training/test_plan.py re-measures), for the largest
  graph a step holds on the stage (e.g. the TMD rollout's N flow-head passes), times the microbatches a 1F1B
  stage holds; with activation checkpointing, block inputs plus one block's full set; or, where larger, the two
  master-shard temporaries of the AdamW step (the peak then lies there); under ring CP, one attention call's
  workspace on top (linear in the chunk length, RING_WORKSPACE). Checked against the live-tensor peak of
  real steps by `python -m tmd_megatron.bench.perf --only memory` (docs/benchmarks.md).
Traffic per iteration comes from the analytic model in tmd_megatron/parallel/comm_model.py.
"""
from __future__ import annotations

import math

import torch
from dataclasses import dataclass, field

from tmd_megatron.models.wan import WanConfig

from .config import num_microbatches
from .memory_model import (BLOCK_SAVED_BYTES, PER_TOKEN_MODULATION_BYTES, block_saved_bytes,  # noqa: F401
                           ring_attention_workspace)
from tmd_megatron.parallel import Topology
from tmd_megatron.parallel.comm_model import pipeline_comm, zero_comm

GiB = 2**30


@dataclass(frozen=True)
class Layout:
    world: int
    tp: int = 1
    cp: int = 1
    pp: int = 1
    sequence_parallel: bool = True
    cp_mode: str = "ring"  # ring | ulysses
    micro_batch: int = 1  # samples per microbatch per DP rank
    microbatches: int = 1  # per optimizer step per DP rank (gradient accumulation / pipeline depth)
    zero1: bool = True
    activation_checkpointing: bool = True

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.cp * self.pp)


@dataclass(frozen=True)
class Workload:
    method: str = "tmd"  # tmd | dmd2v | tm_mf | kd | flow_matching
    outer_steps: int = 2  # M
    inner_steps: int = 2  # N (TMD)
    head_blocks: int = 5  # H (TMD)
    latent: tuple[int, int, int, int] = (16, 21, 60, 104)
    global_batch: int = 64
    disc_layers: tuple[int, ...] = ()
    compute_dtype: str = "bf16"

    @property
    def has_fake_score(self) -> bool:
        return self.method in ("tmd", "dmd2v")

    @property
    def has_flow_head(self) -> bool:
        return self.method in ("tmd", "tm_mf")


@dataclass
class Plan:
    problems: list[str] = field(default_factory=list)
    rows: list[tuple[str, float]] = field(default_factory=list)  # (what, GiB) on the worst stage's rank
    comm: list[tuple[str, float]] = field(default_factory=list)  # (group, GiB per iteration per rank)
    stage_blocks: list[tuple[int, int]] = field(default_factory=list)
    total_gib: float = 0.0
    worst_stage: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def per_token_timesteps(res) -> bool:
    return res.wan.model_type == "ti2v" and res.raw.data.image_condition


def _tokens(cfg: WanConfig, latent) -> int:
    _, f, h, w = latent
    pt, ph, pw = cfg.patch_size
    return (f // pt) * (h // ph) * (w // pw)


def check(cfg: WanConfig, lay: Layout, work: Workload, device_memory_gib: float | None) -> list[str]:
    """Every problem with the layout, each naming its fix. Empty list = valid."""
    p = []
    if lay.world < 1 or min(lay.tp, lay.cp, lay.pp) < 1:
        p.append(f"parallel sizes must be >= 1 (world={lay.world}, tp={lay.tp}, cp={lay.cp}, pp={lay.pp})")
        return p
    prod = lay.tp * lay.cp * lay.pp
    if lay.world % prod:
        p.append(f"world size {lay.world} is not divisible by tp*cp*pp = {prod}: choose sizes whose product divides "
                 f"the number of processes (nodes x GPUs per node)")
    if cfg.num_heads % lay.tp:
        p.append(f"num_heads={cfg.num_heads} is not divisible by tp={lay.tp}: use a tp that divides {cfg.num_heads}")
    if cfg.ffn_dim % lay.tp:
        p.append(f"ffn_dim={cfg.ffn_dim} is not divisible by tp={lay.tp}: use a tp that divides {cfg.ffn_dim}")
    if lay.cp_mode not in ("ring", "ulysses"):
        p.append(f"cp_mode={lay.cp_mode!r} is unknown: use 'ring' or 'ulysses'")
    elif lay.cp_mode == "ulysses" and cfg.num_heads % lay.tp == 0 and (cfg.num_heads // lay.tp) % lay.cp:
        p.append(f"Ulysses needs the {cfg.num_heads // lay.tp} heads per TP rank divisible by cp={lay.cp}: "
                 f"use cp_mode=ring or a cp dividing {cfg.num_heads // lay.tp}")
    if not lay.zero1:
        p.append("parallel.zero1=false is not implemented: the trainer always shards optimizer states over DP x CP "
                 "(ZeRO-1); remove the override")
    if lay.pp > cfg.num_layers:
        p.append(f"pp={lay.pp} exceeds the {cfg.num_layers} blocks: use pp <= {cfg.num_layers}")
    if lay.pp > 1 and lay.microbatches < lay.pp:
        p.append(f"pp={lay.pp} with {lay.microbatches} microbatches leaves stages idle most of the step: "
                 f"set microbatches >= {lay.pp} (bubble (p-1)/(m+p-1))")
    dp = lay.dp if lay.world % prod == 0 else 0
    if dp and work.global_batch % (dp * lay.micro_batch * lay.microbatches):
        p.append(f"global_batch={work.global_batch} is not dp*micro_batch*microbatches = {dp}*{lay.micro_batch}*"
                 f"{lay.microbatches}: make global_batch a multiple of {dp * lay.micro_batch * lay.microbatches}")
    c, f, h, w = work.latent
    if c != cfg.out_dim:
        p.append(f"latent has {c} channels but the model takes in_dim={cfg.in_dim} (latents of out_dim={cfg.out_dim} "
                 "channels): fix data.latent or the model")
    if any(n % s for n, s in zip((f, h, w), cfg.patch_size)):
        p.append(f"latent (F,H,W)=({f},{h},{w}) is not divisible by patch_size {cfg.patch_size}: crop or pad the latent")
    tokens = _tokens(cfg, work.latent)
    if lay.cp * (lay.tp if lay.sequence_parallel else 1) > tokens:
        p.append(f"{tokens} video tokens cannot be split over cp*tp = {lay.cp * lay.tp} ranks: lower cp")
    if work.outer_steps < 1:
        p.append(f"outer steps M={work.outer_steps} must be >= 1")
    if work.has_flow_head:
        if work.inner_steps < 1:
            p.append(f"inner steps N={work.inner_steps} must be >= 1")
        if not 1 <= work.head_blocks < cfg.num_layers:
            p.append(f"flow head H={work.head_blocks} must be between 1 and num_layers-1={cfg.num_layers - 1}: "
                     "set distill.head_blocks")
    bad = [i for i in work.disc_layers if not 0 <= i < cfg.num_layers]
    if bad:
        p.append(f"discriminator layers {bad} are outside the teacher's blocks 0..{cfg.num_layers - 1}: "
                 f"use e.g. {(cfg.num_layers // 2, 3 * cfg.num_layers // 4, cfg.num_layers - 1)}")
    if work.compute_dtype not in BLOCK_SAVED_BYTES:
        p.append(f"compute dtype {work.compute_dtype!r} is unknown: use 'bf16' or 'fp32'")
    return p


# ---- recipes ------------------------------------------------------------------------------------------------
def layout_of(res, world: int) -> Layout:
    p, d = res.raw.parallel, res.raw.data
    dp = max(1, world // (p.tp * p.cp * p.pp)) if world % (p.tp * p.cp * p.pp) == 0 else 1
    local = d.global_batch // dp if d.global_batch % dp == 0 else d.global_batch
    m = num_microbatches(res, dp)
    micro = max(1, local // m) if local % m == 0 else 1
    return Layout(world=world, tp=p.tp, cp=p.cp, pp=p.pp, sequence_parallel=p.sequence_parallel, cp_mode=p.cp_comm,
                  micro_batch=micro, microbatches=m, zero1=p.zero1,
                  activation_checkpointing=p.activation_checkpointing)


def workload_of(res) -> Workload:
    method = res.method
    dmd = res.dmd2v
    steps = res.tm_mf or dmd
    disc_layers = tuple(dmd.disc_layers) if dmd is not None and dmd.gan_weight > 0 else ()
    return Workload(
        method=method,
        outer_steps=steps.outer_steps if steps else 1,
        inner_steps=steps.inner_steps if steps else 1,
        head_blocks=res.student.flow_head_blocks if res.student else 0,
        latent=tuple(res.raw.data.latent),
        global_batch=res.raw.data.global_batch,
        disc_layers=disc_layers,
        compute_dtype=res.raw.model.compute_dtype,
    )


def check_recipe(res, world: int, device_memory_gib: float | None = None, here: bool = True) -> list[str]:
    """Everything that would stop this recipe on `world` processes, each naming its fix. here=False (tmd-plan on
    a login node) skips what depends on this machine rather than on the recipe (CUDA present, DALI installed)."""
    problems = check(res.wan, layout_of(res, world), workload_of(res), device_memory_gib)
    r = res.raw
    if r.model.backend not in ("torch", "te"):
        problems.append(f"model.backend={r.model.backend!r}: use 'torch' or 'te'")
    elif r.model.backend == "te":
        from tmd_megatron.parallel.parallelize import check_te_layout

        p_ = r.parallel
        problems += check_te_layout(_tokens(res.wan, tuple(r.data.latent)), p_.tp, p_.cp, p_.sequence_parallel,
                                    r.model.compute_dtype, p_.cp_comm)
        if here and not torch.cuda.is_available():
            problems.append("model.backend=te needs CUDA and Transformer Engine: use model.backend=torch on this machine")
    if r.model.compute_dtype == "bf16" and r.run.device == "cpu":
        problems.append("model.compute_dtype=bf16 is the GPU policy; on CPU use model.compute_dtype=fp32")
    if r.data.loader not in ("torch", "dali"):
        problems.append(f"data.loader={r.data.loader!r}: use 'torch' or 'dali'")
    elif r.data.loader == "dali" and here:
        from tmd_megatron.data.loader_dali import dali_available

        if not dali_available():
            problems.append("data.loader=dali needs NVIDIA DALI: pip install nvidia-dali-cuda130, or data.loader=torch")
    if r.model.teacher_dtype == "bf16" and r.model.compute_dtype != "bf16":
        problems.append("model.teacher_dtype=bf16 needs bf16 autocast (model.compute_dtype=bf16); on CPU use "
                        "model.teacher_dtype=fp32")
    p_ = r.parallel
    if p_.micro_batch_size:
        dp = max(1, world // (p_.tp * p_.cp * p_.pp))
        local = r.data.global_batch // dp if r.data.global_batch % dp == 0 else 0
        if local and local % p_.micro_batch_size:
            problems.append(f"parallel.micro_batch_size={p_.micro_batch_size} does not divide the per-rank batch "
                            f"{local} (data.global_batch / DP): choose a divisor of {local}")
    if r.data.source == "shards" and not r.data.shards:
        problems.append("data.source=shards needs data.shards=<directory or glob of .tar shards>")
    if res.lr is None or res.lr <= 0:
        problems.append(f"learning rate {res.lr} must be positive: set optim.lr")
    if r.optim.grad_clip < 0:
        problems.append(f"optim.grad_clip={r.optim.grad_clip} must be >= 0 (0 disables clipping)")
    if not 0 <= r.optim.ema_decay < 1:
        problems.append(f"optim.ema_decay={r.optim.ema_decay} must be in [0, 1) (0 disables the EMA)")
    if r.run.ckpt_every < 0 or r.run.log_every < 1:
        problems.append("run.ckpt_every must be >= 0 and run.log_every >= 1")
    if r.run.hang_dump_s < 0:
        problems.append(f"run.hang_dump_s={r.run.hang_dump_s} must be >= 0 (seconds; 0 disables the stack dump)")
    if r.run.keep_last < 1 or res.max_steps < 1 or r.run.sample_every < 0:
        problems.append(f"run.keep_last={r.run.keep_last} and run.max_steps={res.max_steps} must be >= 1, "
                        f"run.sample_every={r.run.sample_every} >= 0")
    fm = r.method.flow_matching
    if r.method.name == "flow_matching" and (fm.t_shift <= 0 or not 0 <= fm.cond_dropout <= 1):
        problems.append(f"method.flow_matching: t_shift={fm.t_shift} must be positive, cond_dropout="
                        f"{fm.cond_dropout} in [0, 1]")
    if res.tm_mf is not None and res.tm_mf.jvp == "exact" and r.parallel.pp > 1:
        problems.append("method.tm_mf.jvp=exact needs parallel.pp=1: use the finite difference (jvp=fd)")
    if r.parallel.schedule not in ("1f1b", "gpipe"):
        problems.append(f"parallel.schedule={r.parallel.schedule!r}: use '1f1b' or 'gpipe'")
    if r.method.name == "tmd" and r.model.init is None:
        problems.append("method=tmd (stage 2) starts from the stage-1 student: set model.init=<stage-1 out_dir>/export")
    if r.method.name != "flow_matching" and r.model.teacher is None:
        problems.append(f"method={r.method.name} needs a teacher checkpoint: set model.teacher=<dir>")
    if not problems:
        from .config import RecipeError
        from .roles import stage_ranges

        try:
            stage_ranges(res, r.parallel.pp)
        except RecipeError as err:
            problems.append(str(err))
    return problems


# ---- estimates -------------------------------------------------------------------------------------------
def _graph_blocks(res, span: tuple[int, int], last: bool) -> int:
    """Blocks whose activations one pass keeps on this stage at once (the largest pass of the step)."""
    n = span[1] - span[0]
    if res.method == "tmd" and last:  # the rollout keeps N flow-head passes
        head = res.student.flow_head_blocks
        return n + (res.dmd2v.inner_steps - 1) * head
    return n


def _activation_bytes(res, lay: Layout, span, last: bool, stage: int) -> float:
    cfg = res.wan
    tokens = math.ceil(_tokens(cfg, tuple(res.raw.data.latent)) / lay.cp)
    sp = lay.tp if lay.sequence_parallel and lay.tp > 1 else 1
    dtype = res.raw.model.compute_dtype
    per_token = per_token_timesteps(res)
    per_block = block_saved_bytes(cfg, tokens, dtype, lay.tp, lay.sequence_parallel, per_token) * lay.micro_batch
    in_flight = min(lay.pp - stage, lay.microbatches) if res.raw.parallel.schedule == "1f1b" else lay.microbatches
    blocks = _graph_blocks(res, span, last)
    # e and e0 per token of the shard, held once per microbatch graph (TI2V)
    conditioning = PER_TOKEN_MODULATION_BYTES * lay.micro_batch * tokens * cfg.dim / sp if per_token else 0.0
    if lay.activation_checkpointing:
        kept = lay.micro_batch * tokens * cfg.dim * 4 / sp  # the fp32 residual entering each block
        return in_flight * (blocks * kept + conditioning) + per_block
    return in_flight * (blocks * per_block + conditioning)


_STAGE_PARAMETERS: dict = {}


def stage_parameters(res, tp: int, pp: int, stage: int) -> tuple[dict[str, int], int]:
    """(parameters of each role, bytes of the frozen teacher) on a rank of `stage` under TP `tp`: the roles
    built on the meta device (exact), remembered per model, method and split (the layout search asks often)."""
    from .roles import cast_frozen, meta_roles

    key = (res.wan, res.student, res.method, res.dmd2v, res.tm_mf, res.boundary, res.raw.model.teacher_dtype,
           res.raw.model.backend, tp, pp, stage)
    if key not in _STAGE_PARAMETERS:
        roles = meta_roles(res, Topology.virtual(tp, 1, pp, 1, stage * tp))
        count = {k: sum(p.numel() for p in m.parameters()) for k, m in roles.items()}
        teacher = 0
        if "teacher" in roles:
            cast_frozen(roles["teacher"], torch.bfloat16 if res.raw.model.teacher_dtype == "bf16" else torch.float32)
            teacher = sum(p.numel() * p.element_size() for p in roles["teacher"].parameters())
        _STAGE_PARAMETERS[key] = (count, teacher)
    return _STAGE_PARAMETERS[key]


def plan_recipe(res, world: int, device_memory_gib: float | None = None) -> Plan:
    """Validation and the per-rank estimate of the worst pipeline stage (rows in GiB), for the machines the job
    will run on (this one's CUDA and DALI are not asked: tmd-plan runs on login nodes)."""
    from .roles import stage_ranges

    plan = Plan(problems=check_recipe(res, world, here=False))
    if plan.problems:
        return plan
    lay = layout_of(res, world)
    bf16 = res.raw.model.compute_dtype == "bf16"
    shard = lay.dp * lay.cp if lay.zero1 else 1
    plan.stage_blocks = stage_ranges(res, lay.pp)
    worst = None
    for stage, span in enumerate(plan.stage_blocks):
        count, teacher_bytes = stage_parameters(res, lay.tp, lay.pp, stage)
        rows = []
        for role in ("student", "fake", "disc"):
            if role in count:
                rows.append((f"{role}: weights + gradients (fp32)", count[role] * 8))
                rows.append((f"{role}: ZeRO-1 master + grad + moments (fp32, /{shard})",
                             count[role] * 16 / shard))
        if res.raw.optim.ema_decay > 0:
            rows.append(("student EMA (fp32)", count["student"] * 4))
        if teacher_bytes:
            rows.append(("teacher weights (frozen; fp32 regions stay fp32)", teacher_bytes))
        if bf16:
            rows.append(("autocast bf16 weight copies (largest model run)", max(count["student"], count.get("fake", 0)) * 2))
        # The step's peak is either in a pass (activations) or in the optimizer phase: single-tensor AdamW holds
        # two temporaries of a master shard (sqrt of the second moment, its scaled copy); with shards, the
        # gradient reduction flattens a whole bucket and the step all-gathers one (4 bytes a parameter).
        act = _activation_bytes(res, lay, span, stage == lay.pp - 1, stage)
        if lay.cp > 1 and lay.cp_mode == "ring":
            ring = ring_attention_workspace(lay.micro_batch, math.ceil(_tokens(res.wan, tuple(res.raw.data.latent))
                                                                       / lay.cp), res.wan.dim // lay.tp,
                                            2 if bf16 else 4)
            rows.append(("ring attention workspace (one call, transient)", ring))
        largest = max(count[r] for r in ("student", "fake", "disc") if r in count)
        optim = largest * max(8 / shard, 4 if shard > 1 else 0)
        rows.append(("activations (largest pass)", act) if act >= optim else
                    ("optimizer-phase temporaries (more than the activations)", optim))
        total = sum(b for _, b in rows)
        if worst is None or total > worst[0]:
            worst = (total, rows, stage, count)
    total, rows, stage, count = worst
    plan.rows = [(name, b / GiB) for name, b in rows]
    plan.total_gib = total / GiB
    plan.worst_stage = stage
    plan.comm = _comm_rows(res, lay, count)
    if device_memory_gib and plan.total_gib > device_memory_gib:
        plan.problems.append(
            f"estimated {plan.total_gib:.1f} GiB on pipeline stage {stage} exceeds the {device_memory_gib:g} GiB device: "
            "raise parallel.tp or parallel.pp, enable parallel.activation_checkpointing, "
            "or lower the per-rank batch (more DP ranks or microbatches)")
    return plan


def _comm_rows(res, lay: Layout, count: dict) -> list[tuple[str, float]]:
    """GiB moved per training iteration by this rank (first stage), by pass kind and collective group."""
    cfg, e = res.wan, 2 if res.raw.model.compute_dtype == "bf16" else 4
    b, m = lay.micro_batch, lay.microbatches
    from .roles import stage_ranges

    blocks = range(*stage_ranges(res, lay.pp)[0])
    common = dict(tp=lay.tp, cp=lay.cp, pp=lay.pp, pp_rank=0, blocks=blocks, sp=lay.sequence_parallel,
                  cp_comm=lay.cp_mode, ac=lay.activation_checkpointing, e=e, token_timesteps=per_token_timesteps(res))
    latent = tuple(res.raw.data.latent)[1:]
    fwd = pipeline_comm(cfg, latent, b, m, backward=False, **common)
    fwd_bwd = pipeline_comm(cfg, latent, b, m, **common)
    passes = {"flow_matching": (0, 1), "kd": (0, 1), "tm_mf": (1, 1)}.get(res.method)
    if passes is None:  # stage-2 iteration averaged over the student-update period
        every = res.dmd2v.student_every
        passes = (1 + 3 / every + 2, 2 / every + 1)  # fwd: student, (fake, teacher uncond, recompute) / every, disc x2
    n_fwd, n_fwd_bwd = passes
    totals: dict[str, float] = {}
    for table, times in ((fwd, n_fwd), (fwd_bwd, n_fwd_bwd)):
        for (op, group), (_, nbytes) in table.items():
            totals[group] = totals.get(group, 0.0) + times * nbytes
    if lay.dp * lay.cp > 1:
        for role in ("student", "fake", "disc"):
            if role in count:
                red, step = zero_comm([count[role]], tp=lay.tp, dp_cp=lay.dp * lay.cp, tp_partial_numel=0)
                for table in (red, step):
                    for (op, group), (_, nbytes) in table.items():
                        totals[group] = totals.get(group, 0.0) + nbytes
    return [(f"{group} group", v / GiB) for group, v in sorted(totals.items())]
