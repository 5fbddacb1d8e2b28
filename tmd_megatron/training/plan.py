"""Layout planner: refuse invalid parallel layouts before any process starts, estimate per-rank cost.

Memory model (bytes per rank):
- trainable roles (student, fake score, discriminator): fp32 weights + fp32 grads + AdamW m, v (sharded
  over the DP x CP group with ZeRO-1); the student's EMA (fp32) likewise sharded;
- frozen teacher: weights in the compute dtype;
- activations: bytes saved for backward per block, measured on our block implementation with
  saved-tensor hooks and fitted as a·L·D + b·L·F + c·T·D + e·L (+ autocast weight copies), times the
  microbatches in flight (pp for 1F1B on the first stage); with activation checkpointing only block inputs
  are kept plus one block's full set during recompute.
Communication is given per step per rank from the analytic formulas in docs/parallel.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from tmd_megatron.models.wan import WanConfig

GiB = 2**30

# Saved-for-backward bytes of one Wan block, fitted on our implementation (tests/test_plan.py re-measures):
# per (L·D, L·F, T·D, L, D², D·F). fp32 = plain fp32 training (CPU); bf16 = fp32 weights under bf16 autocast.
BLOCK_SAVED_BYTES = {
    "fp32": (88.8, 7.92, 20.1, 95.1, 0.26, 0.06),
    "bf16": (64.8, 3.92, 14.1, 95.1, 12.3, 4.06),
}


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
    disc_params: int = 0
    student_extra_params: int = 0  # fusion block, gate, s-r time embedding (TMD)
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
    rows: list[tuple[str, float]] = field(default_factory=list)  # (what, GiB) per rank
    comm: list[tuple[str, float]] = field(default_factory=list)  # (what, GiB per step per rank)
    stage_blocks: list[tuple[int, int]] = field(default_factory=list)
    total_gib: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems


def partition_by_cost(costs: list[float], stages: int) -> list[tuple[int, int]]:
    """Contiguous ranges of `costs` minimising the largest stage sum (exact, by binary search on the cap)."""
    n = len(costs)
    if not 1 <= stages <= n:
        raise ValueError(f"cannot split {n} blocks into {stages} non-empty stages")

    def split(cap: float):
        ranges, start, acc = [], 0, 0.0
        for i, c in enumerate(costs):
            if acc + c > cap and i > start:
                ranges.append((start, i))
                start, acc = i, 0.0
            acc += c
        ranges.append((start, n))
        return ranges

    lo, hi = max(costs), sum(costs)
    for _ in range(60):
        mid = (lo + hi) / 2
        if len(split(mid)) <= stages:
            hi = mid
        else:
            lo = mid
    ranges = split(hi)
    while len(ranges) < stages:  # pad by splitting the longest range, keeps the max unchanged or lower
        i = max(range(len(ranges)), key=lambda j: ranges[j][1] - ranges[j][0])
        a, b = ranges[i]
        ranges[i : i + 1] = [(a, a + (b - a) // 2), (a + (b - a) // 2, b)]
    return ranges


# ---- parameter counts per rank -------------------------------------------------------------------------
def block_params(cfg: WanConfig, tp: int) -> int:
    d, f = cfg.dim, cfg.ffn_dim
    column = 6 * (d * d + d) + (d * f + f)  # q,k,v self; q,k,v cross; ffn in — sharded by output
    row = 2 * d * d + f * d  # o self, o cross, ffn out — sharded by input
    row_bias = 3 * d  # added after the reduction: replicated
    norms = (4 * d if cfg.qk_norm else 0)  # q/k gains follow their heads
    replicated = (2 * d if cfg.cross_attn_norm else 0) + 6 * d  # norm3, modulation
    return (column + row + norms) // tp + row_bias + replicated


def embedding_params(cfg: WanConfig) -> int:
    d = cfg.dim
    patch = cfg.in_dim * cfg.patch_volume * d + d
    text = cfg.text_dim * d + d + d * d + d
    time = cfg.freq_dim * d + d + d * d + d + 6 * d * d + 6 * d
    return patch + text + time


def head_params(cfg: WanConfig) -> int:
    return cfg.dim * cfg.out_dim * cfg.patch_volume + cfg.out_dim * cfg.patch_volume + 2 * cfg.dim


def stage_params(cfg: WanConfig, tp: int, blocks: tuple[int, int], first: bool, last: bool) -> int:
    n = (blocks[1] - blocks[0]) * block_params(cfg, tp)
    return n + (embedding_params(cfg) if first else 0) + (head_params(cfg) if last else 0)


# ---- activations ------------------------------------------------------------------------------------------
def block_saved_bytes(cfg: WanConfig, tokens: int, dtype: str, tp: int) -> float:
    """Saved-for-backward bytes of one block for one sample holding `tokens` local tokens."""
    a, b, c, e, w1, w2 = BLOCK_SAVED_BYTES[dtype]
    d, f, t = cfg.dim, cfg.ffn_dim, cfg.text_len
    return (a * tokens * d + b * tokens * f + c * t * d) / tp + e * tokens + (w1 * d * d + w2 * d * f) / tp


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
    if c != cfg.in_dim:
        p.append(f"latent has {c} channels but the model takes in_dim={cfg.in_dim}: fix data.latent or the model")
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
            p.append(f"flow head H={work.head_blocks} must be between 1 and num_layers-1={cfg.num_layers - 1}")
    bad = [i for i in work.disc_layers if not 0 <= i < cfg.num_layers]
    if bad:
        p.append(f"discriminator layers {bad} are outside the teacher's blocks 0..{cfg.num_layers - 1}: "
                 f"use e.g. {(cfg.num_layers // 2, 3 * cfg.num_layers // 4, cfg.num_layers - 1)}")
    if work.compute_dtype not in BLOCK_SAVED_BYTES:
        p.append(f"compute dtype {work.compute_dtype!r} is unknown: use 'bf16' or 'fp32'")
    return p


def estimate(cfg: WanConfig, lay: Layout, work: Workload, device_memory_gib: float | None = None) -> Plan:
    plan = Plan(problems=check(cfg, lay, work, device_memory_gib))
    if plan.problems:
        return plan
    L = cfg.num_layers
    h = work.head_blocks if work.has_flow_head else 0
    # The flow head runs N inner steps per outer step, so its blocks weigh N times in the stage split.
    costs = [1.0] * (L - h) + [float(work.inner_steps)] * h
    costs[0] += 0.5  # embeddings
    costs[-1] += 0.25  # head
    plan.stage_blocks = partition_by_cost(costs, lay.pp)
    shard = lay.dp * lay.cp if lay.zero1 else 1

    worst = None
    for s, blocks in enumerate(plan.stage_blocks):
        first, last = s == 0, s == lay.pp - 1
        n_wan = stage_params(cfg, lay.tp, blocks, first, last)
        rows = []
        student = n_wan + (work.student_extra_params // lay.tp if last and work.has_flow_head else 0)
        rows.append(("student weights+grads (fp32)", student * 8))
        rows.append((f"student AdamW + EMA (fp32, /{shard})", student * 12 / shard))
        teacher_bytes = 2 if work.compute_dtype == "bf16" else 4
        rows.append(("teacher weights (frozen)", n_wan * teacher_bytes))
        if work.has_fake_score:
            rows.append(("fake score weights+grads", n_wan * 8))
            rows.append((f"fake score AdamW (/{shard})", n_wan * 8 / shard))
            local_disc = [i for i in work.disc_layers if blocks[0] <= i < blocks[1]]
            if work.disc_layers and local_disc:
                n_disc = work.disc_params * len(local_disc) // len(work.disc_layers)
                rows.append(("discriminator heads (weights, grads, AdamW)", n_disc * 16))
        rows.append(("activations (peak)", _activation_bytes(cfg, lay, work, blocks, last)))
        total = sum(b for _, b in rows)
        if worst is None or total > worst[0]:
            worst = (total, rows, s)
    total, rows, s = worst
    plan.rows = [(f"[stage {s}] {name}", b / GiB) for name, b in rows]
    plan.total_gib = total / GiB
    plan.comm = communication(cfg, lay, work)
    if device_memory_gib and plan.total_gib > device_memory_gib:
        plan.problems.append(
            f"estimated {plan.total_gib:.1f} GiB per rank exceeds the {device_memory_gib:g} GiB device: raise tp or pp, "
            f"enable activation_checkpointing, shard the optimizer (zero1), or lower micro_batch"
        )
    return plan


def _activation_bytes(cfg, lay, work, blocks, last) -> float:
    tokens_total = _tokens(cfg, work.latent)
    local = math.ceil(tokens_total / lay.cp)
    per_block = block_saved_bytes(cfg, local, work.compute_dtype, lay.tp if lay.sequence_parallel else 1) * lay.micro_batch
    act_bytes = 2 if work.compute_dtype == "bf16" else 4
    n_blocks = blocks[1] - blocks[0]
    # Graphs alive at once: the student (N inner flow-head passes over the head blocks on the last stage) and,
    # for the generator step, the teacher's path to the last discriminator layer.
    rollout = (work.inner_steps - 1) * work.head_blocks if (work.method == "tmd" and last) else 0
    graphs = n_blocks + rollout + (n_blocks if work.has_fake_score else 0)
    in_flight = lay.pp if lay.pp > 1 else 1
    if lay.activation_checkpointing:
        resid = local * cfg.dim * 4 * lay.micro_batch / (lay.tp if lay.sequence_parallel else 1)
        return in_flight * graphs * resid + per_block
    return in_flight * graphs * per_block + 0 * act_bytes


def communication(cfg: WanConfig, lay: Layout, work: Workload) -> list[tuple[str, float]]:
    """Bytes per optimizer step per rank for one forward+backward of one model (see docs/parallel.md)."""
    b = 2 if work.compute_dtype == "bf16" else 4
    samples = lay.micro_batch * lay.microbatches
    tokens = math.ceil(_tokens(cfg, work.latent) / lay.cp)
    blocks = math.ceil(cfg.num_layers / lay.pp)
    out = []
    if lay.tp > 1:
        act = samples * tokens * cfg.dim * b * (lay.tp - 1) / lay.tp
        # per block: 3 gathers + 3 reduce-scatters (SP) or 3 all-reduces (no SP), forward and backward
        per_block = 12 * act if lay.sequence_parallel else 12 * act
        out.append(("tensor parallel (per model fwd+bwd)", blocks * per_block / GiB))
    if lay.cp > 1:
        kv = samples * tokens * cfg.dim // lay.tp * b * 2
        if lay.cp_mode == "ring":
            out.append(("context parallel ring (per model fwd+bwd)", blocks * kv * (lay.cp - 1) * 3 / GiB))
        else:
            qkvo = samples * tokens * cfg.dim // lay.tp * b * 4 * (lay.cp - 1) / lay.cp
            out.append(("context parallel Ulysses (per model fwd+bwd)", blocks * 2 * qkvo / GiB))
    if lay.dp * lay.cp > 1:
        n = stage_params(cfg, lay.tp, (0, blocks), True, True)
        g = lay.dp * lay.cp
        grad = n * 4 * (g - 1) / g
        out.append(("data parallel grads (+ZeRO-1 param gather), student", (2 * grad if lay.zero1 else 2 * grad) / GiB))
    if lay.pp > 1:
        out.append(("pipeline p2p (per model fwd+bwd)",
                    samples * 2 * tokens * cfg.dim * 4 / (lay.tp if lay.sequence_parallel else 1) / GiB))
    return out


# ---- recipes ------------------------------------------------------------------------------------------------
def layout_of(res, world: int) -> Layout:
    p, d = res.raw.parallel, res.raw.data
    dp = max(1, world // (p.tp * p.cp * p.pp)) if world % (p.tp * p.cp * p.pp) == 0 else 1
    local = d.global_batch // dp if d.global_batch % dp == 0 else d.global_batch
    micro = max(1, local // p.microbatches) if local % p.microbatches == 0 else 1
    return Layout(world=world, tp=p.tp, cp=p.cp, pp=p.pp, sequence_parallel=p.sequence_parallel, cp_mode=p.cp_comm,
                  micro_batch=micro, microbatches=p.microbatches, zero1=p.zero1,
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


def check_recipe(res, world: int, device_memory_gib: float | None = None) -> list[str]:
    """Everything that would stop this recipe on `world` processes, each naming its fix."""
    problems = check(res.wan, layout_of(res, world), workload_of(res), device_memory_gib)
    r = res.raw
    if r.model.backend == "te":
        import torch

        if not torch.cuda.is_available():
            problems.append("model.backend=te needs CUDA and Transformer Engine: use model.backend=torch on this machine")
    if r.model.compute_dtype == "bf16" and r.run.device == "cpu":
        problems.append("model.compute_dtype=bf16 is the GPU policy; on CPU use model.compute_dtype=fp32")
    if r.data.loader not in ("torch", "dali"):
        problems.append(f"data.loader={r.data.loader!r}: use 'torch' or 'dali'")
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
    if res.tm_mf is not None and res.tm_mf.jvp == "exact" and r.parallel.pp > 1:
        problems.append("method.tm_mf.jvp=exact needs parallel.pp=1: use the finite difference (jvp=fd)")
    if r.parallel.schedule not in ("1f1b", "gpipe"):
        problems.append(f"parallel.schedule={r.parallel.schedule!r}: use '1f1b' or 'gpipe'")
    if r.method.name == "tmd" and r.model.init is None:
        problems.append("method=tmd (stage 2) starts from the stage-1 student: set model.init=<stage-1 out_dir>/export")
    if r.method.name != "flow_matching" and r.model.teacher is None:
        problems.append(f"method={r.method.name} needs a teacher checkpoint: set model.teacher=<dir>")
    return problems
