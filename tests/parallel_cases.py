"""What each spawned rank runs: a parallel layout against the single-process model on the same seed and data.

The reference is the plain WanModel on one process (computed on every rank: the model is tiny). The
parallel run goes through the real path: parallelize -> WanStage + run_pipeline (with a hidden-state loss on
block 1 and output gradients supplied on the last stage) -> ZeroAdamW.reduce_grads / step. Errors are
max|a - b| / max|b| per tensor, maximised over tensors.
"""
from __future__ import annotations

import contextlib
import functools
import math

import torch
from torch.profiler import ProfilerActivity, profile

from tmd_megatron.parallel.comm_model import pipeline_comm, zero_comm
from tmd_megatron.models.wan import WanConfig, WanModel
from tmd_megatron.parallel import (
    WanStage,
    ZeroAdamW,
    comm,
    count_comm,
    gather_full_state,
    init_topology,
    parallelize,
    run_pipeline,
    tp_partial_names,
    tp_split_dims,
)

CFG = WanConfig.preset("tiny")  # dim 64, 4 heads (d=16), 4 blocks, ffn 128, text_len 64
# Variants of the same tiny model: Wan2.1 I2V (36 input channels, 5 CLIP tokens replicated like the text) and
# Wan2.2 TI2V (per-token timesteps [B, L], sharded with their tokens under SP/CP, carried per token by PP).
CONFIGS = {"t2v": CFG, "i2v": WanConfig.preset("tiny-i2v"), "ti2v": WanConfig.preset("tiny-ti2v")}
LATENT = (3, 10, 14)  # grid 3x5x7 = 105 tokens: divisible by neither 2 nor 4
BATCH = 4
HIDDEN_BLOCK = 1
HIDDEN_WEIGHT = 0.5
WEIGHT_DECAY, NO_DECAY = 0.1, ("bias", "norm")
# The first AdamW step is ~lr*sign(g): in fp32, gradient elements that cancel to ~1e-6 (cross-attention k
# biases) make it ill-conditioned at eps=1e-8, so fp32 runs use eps=1e-3; fp64 runs keep the default eps.
ADAM = {torch.float32: dict(lr=1e-4, eps=1e-3), torch.float64: dict(lr=1e-3, eps=1e-8)}


def reference_model(variant: str = "t2v") -> WanModel:
    torch.manual_seed(0)
    model = WanModel(CONFIGS[variant])
    with torch.no_grad():  # distinct norm gains and biases, so a swapped or unsharded one shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def sample(latent, dtype, variant: str = "t2v"):
    cfg = CONFIGS[variant]
    g = torch.Generator().manual_seed(1)
    grid = tuple(n // p for n, p in zip(latent, cfg.patch_size))
    d = dict(
        x=torch.randn(BATCH, cfg.in_dim, *latent, generator=g),
        ctx=torch.randn(BATCH, 10, cfg.text_dim, generator=g),
        probe=torch.randn(BATCH, cfg.out_dim, *latent, generator=g),
        probe_h=torch.randn(BATCH, cfg.dim, *grid, generator=g),
    )
    if cfg.image_dim is not None:
        d["image"] = torch.randn(BATCH, cfg.image_len, cfg.image_dim, generator=g)
    d = {k: v.to(dtype) for k, v in d.items()}
    d["t"] = torch.tensor([37.0, 912.0, 400.0, 5.0])
    if variant == "ti2v":  # the first latent frame at t = 0, the rest at each sample's t
        d["t"] = d["t"][:, None].repeat(1, math.prod(grid))
        d["t"][:, : grid[1] * grid[2]] = 0.0
    return d


def _optimizer(named, dtype):
    decay = [p for n, p in named if not any(s in n for s in NO_DECAY)]
    rest = [p for n, p in named if any(s in n for s in NO_DECAY)]
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, foreach=False, **ADAM[dtype])


# Loss terms: a random projection plus a quadratic (so the value does not cancel to ~0 and its relative
# error is meaningful). The output term's gradient, probe + out, is what the last stage is handed.
def out_term(out, probe):
    return (out * probe + 0.5 * out * out).sum()


def hidden_term(feat, probe_h):
    return HIDDEN_WEIGHT * (feat * probe_h + 0.5 * feat * feat).sum()


def autocast_ctx(autocast: str | None, device="cpu"):
    """bf16 autocast (the GPU recipes' compute policy, fp32 weights) or nothing."""
    if autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=getattr(torch, autocast))


@functools.lru_cache(maxsize=None)
def reference(latent=LATENT, dtype=torch.float32, variant="t2v", autocast=None) -> dict:
    """One process: outputs, loss, gradients and the AdamW step; autocast='bfloat16' runs the same under autocast
    (its distance from the fp32 run is the single-process bf16 error that parallel bf16 runs are held to)."""
    model = reference_model(variant).to(dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    d = sample(latent, dtype, variant)
    x = d["x"].clone().requires_grad_(True)
    with autocast_ctx(autocast):
        out, hidden = model(x, d["t"], d["ctx"], d.get("image"), return_hidden=(HIDDEN_BLOCK,))
    grid = tuple(n // p for n, p in zip(latent, CFG.patch_size))
    feat = model.tokens_to_grid(hidden[HIDDEN_BLOCK], model.geometry(grid, x.device))
    loss = (out_term(out, d["probe"]) + hidden_term(feat, d["probe_h"])) / BATCH
    loss64 = (out_term(out.double(), d["probe"].double()) + hidden_term(feat.double(), d["probe_h"].double())) / BATCH
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    norm = torch.sqrt(sum(g.double().pow(2).sum() for g in grads.values()))
    _optimizer(list(model.named_parameters()), dtype).step()
    return dict(before=before, out=out.detach(), loss=loss64.detach(),
                grads=grads, x_grad=x.grad, norm=norm, after={k: v.clone() for k, v in model.state_dict().items()},
                data=d)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b| of one tensor."""
    scale = float(b.abs().max())
    return float((a - b).abs().max()) / (scale if scale > 0 else 1.0)


def rel_errs(a: dict, b: dict) -> tuple[float, float, str]:
    """(worst per-tensor error, error relative to the largest |b| over all tensors, worst tensor's name)."""
    worst = max(b, key=lambda k: rel_err(a[k], b[k]))
    scale = max(float(v.abs().max()) for v in b.values())
    joint = max(float((a[k] - b[k]).abs().max()) for k in b) / scale
    return rel_err(a[worst], b[worst]), joint, worst


def _count_c10d(prof) -> int:
    return sum(1 for e in prof.events() if e.name.startswith("c10d::"))


def run_layout(case: dict) -> dict:
    """One layout on this rank; returns its max errors and communication tables."""
    tp, cp, pp = case.get("tp", 1), case.get("cp", 1), case.get("pp", 1)
    sp, cp_comm = case.get("sp", True), case.get("cp_comm", "ring")
    m, schedule, ac = case.get("microbatches", 1), case.get("schedule", "1f1b"), case.get("ac", False)
    latent = case.get("latent", LATENT)
    dtype = case.get("dtype", torch.float32)
    autocast = case.get("autocast")  # "bfloat16": compare with the fp32 reference at the bf16 tolerance
    variant = case.get("variant", "t2v")
    cfg, token_t = CONFIGS[variant], variant == "ti2v"
    ref = reference(latent, dtype, variant)
    topo = init_topology(tp, cp, pp, timeout_s=120)
    d = {k: v.to(topo.device) for k, v in ref["data"].items()}
    dp = topo.dp.size
    model = parallelize(cfg, topo, ref["before"], sequence_parallel=sp, cp_comm=cp_comm, dtype=dtype,
                        backend=case.get("backend", "torch"))
    model.activation_checkpointing = ac
    if case.get("compile"):
        model.compile_blocks()
    zero = ZeroAdamW(model, topo, weight_decay=WEIGHT_DECAY, no_decay=NO_DECAY, **ADAM[dtype])

    b_local = BATCH // dp
    mb = b_local // m
    lo = topo.dp.rank * b_local
    sl = [slice(lo + i * mb, lo + (i + 1) * mb) for i in range(m)]

    hidden64 = {}  # the hidden loss values summed in fp64 (for the loss comparison)

    def hidden_loss(i, hidden, geom):
        feat = model.tokens_to_grid(hidden[HIDDEN_BLOCK], geom)
        probe_h = d["probe_h"][sl[i]]
        hidden64[i] = hidden_term(feat.double(), probe_h.double()).detach() / b_local
        return hidden_term(feat, probe_h) / b_local

    stage = WanStage(model, (mb, cfg.in_dim, *latent), capture=(HIDDEN_BLOCK,), hidden_loss=hidden_loss,
                     token_timesteps=token_t)
    stage_fn = _sabotage(case.get("sabotage"), stage, topo)
    image = [(d["image"][s],) if "image" in d else () for s in sl]
    inputs = [(d["x"][s].clone().requires_grad_(True), d["t"][s], d["ctx"][s], *im) for s, im in zip(sl, image)]

    def out_grads(i, outputs):  # d out_term / d out, handed to the last stage
        return ((d["probe"][sl[i]] + outputs[0]) / b_local,)

    with count_comm() as c_pipe, profile(activities=[ProfilerActivity.CPU]) as prof, \
            autocast_ctx(autocast, topo.device):
        res = run_pipeline(stage_fn, topo.pp, m, boundary=stage.boundary(None, getattr(torch, autocast) if autocast else None),
                           inputs=inputs, output_grads=out_grads,
                           schedule=schedule, device=topo.device)
    c10d_events = _count_c10d(prof)
    with count_comm() as c_reduce:
        zero.reduce_grads()
    norm = zero.grad_norm()
    reduced = zero.reduced_grads()
    with count_comm() as c_step:
        zero.step()
    after = gather_full_state(model, topo)
    rooted = gather_full_state(model, topo, dst=0)  # the export's gather: world rank 0 only
    if topo.world.rank == 0:
        rooted_ok = rooted.keys() == after.keys() and all(torch.equal(rooted[k], after[k]) for k in after)
    else:
        rooted_ok = rooted is None
    cpu = {"device": "cpu"}

    errors, worst = {}, {}
    span = model.stage
    local_loss = torch.zeros((), dtype=torch.float64, device=topo.device)
    if span.last:
        out = torch.cat([o[0] for o in res.outputs]).to(**cpu)
        errors["output"] = rel_err(out, ref["out"][lo : lo + b_local])
        local_loss += sum(out_term(o[0].double(), d["probe"][s].double()) for o, s in zip(res.outputs, sl)) / b_local
    if any(v is not None for v in res.losses) != bool(hidden64):
        raise AssertionError("the engine did not report the stage's local losses")
    local_loss = local_loss.to(topo.device) + sum(hidden64.values())
    # every tp/cp rank holds the same values; dp ranks hold local means
    loss = (comm.all_reduce(local_loss.reshape(1), topo.world) / (tp * cp * dp)).to(**cpu)
    errors["loss"] = rel_err(loss, ref["loss"].reshape(1))
    if span.first:
        x_grad = torch.cat([g[0] for g in res.input_grads]).to(**cpu) / dp
        errors["input_grad"] = rel_err(x_grad, ref["x_grad"][lo : lo + b_local])
    split = tp_split_dims(model)
    full = {n: (comm.all_gather(g, topo.tp, split[n]) if n in split else g).to(**cpu) for n, g in reduced.items()}
    errors["grads_per_tensor"], errors["grads"], worst["grads"] = rel_errs(full, {n: ref["grads"][n] for n in full})
    errors["grad_norm"] = rel_err(norm.to(**cpu), ref["norm"])
    if set(after) != set(ref["after"]):
        raise AssertionError("gathered state dict names differ from the single-process model's")
    errors["params_per_tensor"], errors["params_after_step"], worst["params"] = rel_errs(after, ref["after"])

    local_params = dict(model.named_parameters())
    expect_pipe = pipeline_comm(
        cfg, latent, mb, m, tp=tp, cp=cp, pp=pp, pp_rank=topo.pp.rank, blocks=range(span.start, span.end), sp=sp,
        cp_comm=cp_comm, ac=ac, hidden_block=HIDDEN_BLOCK, token_timesteps=token_t,
        e=torch.finfo(getattr(torch, autocast) if autocast else dtype).bits // 8,
    )
    partial = sum(local_params[n].numel() for n in tp_partial_names(model))
    expect_reduce, expect_step = zero_comm(
        [bk.numel for bk in zero.buckets], tp=tp, dp_cp=topo.dp_cp.size, tp_partial_numel=partial,
        e=torch.finfo(dtype).bits // 8,
    )
    return dict(
        rank=topo.world.rank,
        single_errors=single_process_errors(latent, dtype, variant, autocast) if autocast else None,
        rooted_ok=rooted_ok,
        worst=worst,
        coords=(topo.dp.rank, topo.pp.rank, topo.cp.rank, topo.tp.rank),
        errors=errors,
        comm=dict(pipeline=(c_pipe.table(), expect_pipe), reduce=(c_reduce.table(), expect_reduce),
                  step=(c_step.table(), expect_step)),
        c10d_events=c10d_events,
        counted_calls=sum(c for c, _ in c_pipe.table().values()),
        idle=res.idle_fraction,
        zero_shard=(sum(bk.master.numel() for bk in zero.buckets), sum(bk.numel for bk in zero.buckets)),
        max_in_flight=res.max_in_flight,
        trace_order=[(op, i) for op, i, _, _ in res.trace],
    )


def single_process_errors(latent, dtype, variant, autocast) -> dict:
    """The same quantities as a layout's errors, for one process under autocast against one process without."""
    a, b = reference(latent, dtype, variant, autocast), reference(latent, dtype, variant)
    errors = {"output": rel_err(a["out"], b["out"]), "loss": rel_err(a["loss"].reshape(1), b["loss"].reshape(1)),
              "input_grad": rel_err(a["x_grad"], b["x_grad"]), "grad_norm": rel_err(a["norm"], b["norm"])}
    errors["grads_per_tensor"], errors["grads"], _ = rel_errs(a["grads"], b["grads"])
    errors["params_per_tensor"], errors["params_after_step"], _ = rel_errs(a["after"], b["after"])
    return errors


def _sabotage(kind, stage, topo):
    """Deliberate faults that the checks must catch (negative controls)."""
    if kind is None:
        return stage
    if kind == "local_qk_norm":  # forget to reduce the q/k RMS over the TP group
        from tmd_megatron.parallel.tensor import TPRMSNormAcrossHeads

        for mod in stage.model.modules():
            if isinstance(mod, TPRMSNormAcrossHeads):
                mod.mean_square = lambda x32: x32.pow(2).mean(dim=-1, keepdim=True)
        return stage

    def with_extra_collective(mb, inputs):
        if mb == 0:
            if kind == "extra_counted":  # through our wrappers: the byte table changes
                comm.all_reduce(torch.zeros(4), topo.world)
            elif kind == "extra_raw":  # behind the counter's back: the profiler sees it
                torch.distributed.all_reduce(torch.zeros(4))
            else:
                raise ValueError(kind)
        return stage(mb, inputs)

    return with_extra_collective


def run_cases(cases: dict) -> dict:
    return {name: run_layout(case) for name, case in cases.items()}


def total_bytes(table: dict) -> int:
    return sum(b for _, b in table.values())


def summarize(results_per_rank: list, name: str) -> dict:
    """Max error per quantity over ranks for one layout."""
    out = {}
    for r in results_per_rank:
        for k, v in r[name]["errors"].items():
            out[k] = max(out.get(k, 0.0), v)
    return out



# ---- the layout matrix and how its results are judged ------------------------------------------------------------
F32_KEYS = ("output", "loss", "input_grad", "grads", "grad_norm", "params_after_step")
F32_TOL, F64_TOL = 1e-5, 1e-10


def with_fp64_ac(layouts: dict) -> dict:
    """Each layout in fp32, plus in fp64 with activation checkpointing (strict per-tensor check)."""
    cases = dict(layouts)
    cases.update({f"{k}_fp64_ac": {**v, "dtype": torch.float64, "ac": True} for k, v in layouts.items()})
    return cases


def run_suite(cases: dict, engine: bool = False) -> dict:
    out = {"layouts": run_cases(cases)}
    if engine:
        from pipeline_cases import run_engine_checks

        out["engine"] = run_engine_checks()
    return out


# A bf16-autocast layout may be at most this many times further from the fp32 reference than one process under
# the same autocast is (the single-process bf16 error is measured in the same run).
BF16_FACTOR = 2.0
BF16_KEYS = ("output", "loss", "input_grad", "grads", "grad_norm", "params_after_step")


def failures(per_rank: list, name: str, comm: bool = True) -> list[str]:
    """Everything wrong with one layout's results, over all ranks (empty when it equals one process). comm=False
    skips the byte tables (a backend whose collectives are not ours, like Transformer Engine's)."""
    problems = []
    fp64 = name.endswith("_fp64_ac")
    for r in per_rank:
        res = r["layouts"][name]
        single = res.get("single_errors")
        for key, err in res["errors"].items():
            if single is not None:
                limit = BF16_FACTOR * single[key] if key in BF16_KEYS else None
            else:
                limit = F64_TOL if fp64 else (F32_TOL if key in F32_KEYS else None)
            if limit is not None and not err <= limit:
                problems.append(f"rank {res['rank']}: {key} error {err:.2e} > {limit:.1e}")
        if not res["rooted_ok"]:
            problems.append(f"rank {res['rank']}: gather_full_state(dst=0) is not the full state on rank 0 only")
        if not comm:
            continue
        for phase, (got, expected) in res["comm"].items():
            if got != expected:
                problems.append(f"rank {res['rank']}: {phase} communication {got} != analytic {expected}")
        if res["c10d_events"] != res["counted_calls"]:
            problems.append(
                f"rank {res['rank']}: profiler saw {res['c10d_events']} c10d ops, counter {res['counted_calls']}"
            )
    return problems
