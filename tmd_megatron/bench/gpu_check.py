"""`make gpu-check`: what only a GPU can prove, in one command of at most ten minutes on one GPU.

    python -m tmd_megatron.bench.gpu_check                 # on a CUDA node: writes docs/gpu_check.md
    python -m tmd_megatron.bench.gpu_check --smoke-on-cpu  # tiny sizes on CPU (the test suite runs this)

Without CUDA (and without --smoke-on-cpu) it prints what it would run and exits 0. Each section is timed and
reported on its own; a failed section is reported with its error and makes the exit code 1:
1. Transformer Engine layers (tp = 1) vs the torch backend, forward and backward, bf16 autocast and fp32 (TF32 off).
2. flash-attn vs torch SDPA (bf16, Wan 1.3B heads), padded keys included.
3. The ring's CUDA chunk kernels (flash, mem-efficient; LSE padding) vs the explicit reference.
4. The compiled Triton kernels vs their torch references, and their speed (kernels/bench.py).
5. FD-JVP in bf16 and fp32 passes vs the exact JVP at Wan 1.3B width (H = 5).
6. One TMD stage-2 step of a reduced-depth, full-width 1.3B student in bf16: peak memory vs the planner.
7. pytest tests/gpu: DALI GPU loader, kernels at Wan widths, and the multi-GPU layout tests when 2+ GPUs.
"""
from __future__ import annotations

import argparse
import datetime
import io
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPORT = Path(__file__).resolve().parents[2] / "docs" / "gpu_check.md"
PLAN = __doc__.split("\n1. ", 1)[1]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _tf32_off() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


# ---- 1. Transformer Engine vs torch ---------------------------------------------------------------------------
def te_vs_torch(device: str, smoke: bool) -> str:
    from tmd_megatron.models.wan import WanConfig, WanModel
    from tmd_megatron.parallel import Topology
    from tmd_megatron.parallel.te_backend import TELayers

    cfg = WanConfig.preset("tiny") if smoke else WanConfig.preset("wan2.1-t2v-1.3b").replace(num_layers=2)
    latent = (2, 8, 8) if smoke else (5, 30, 52)
    torch.manual_seed(0)
    ref = WanModel(cfg).to(device)
    te = WanModel(cfg, backend=TELayers(Topology.single(device=device))).to(device)
    missing, unexpected = te.load_state_dict(ref.state_dict(), strict=False)
    if missing and any(not k.endswith("_extra_state") for k in missing) or unexpected:
        raise AssertionError(f"TE model names differ: missing {missing[:3]}, unexpected {unexpected[:3]}")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, cfg.in_dim, *latent, generator=g).to(device)
    t = torch.tensor([500.0], device=device)
    ctx = torch.randn(1, min(cfg.text_len, 64), cfg.text_dim, generator=g).to(device)

    def run(model, bf16: bool):
        xx = x.clone().requires_grad_(True)
        model.zero_grad(set_to_none=True)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            out = model(xx, t, ctx)
        out.float().square().mean().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        return out.detach().float(), xx.grad, grads

    exact = run(ref, False)  # fp32, TF32 off: the reference
    rows = ["| compute | output | input grad | worst parameter grad (max over tensors) |", "|---|---|---|---|"]
    for label, bf16 in (("fp32 (TF32 off)", False), ("bf16 autocast", True)):
        got = run(te, bf16)
        torch_side = run(ref, True) if bf16 else exact
        worst = max(rel(got[2][n], exact[2][n]) for n in exact[2])
        line = f"| {label}, TE | {rel(got[0], exact[0]):.1e} | {rel(got[1], exact[1]):.1e} | {worst:.1e} |"
        rows.append(line)
        if bf16:
            worst_t = max(rel(torch_side[2][n], exact[2][n]) for n in exact[2])
            rows.append(f"| {label}, torch backend (yardstick) | {rel(torch_side[0], exact[0]):.1e} | "
                        f"{rel(torch_side[1], exact[1]):.1e} | {worst_t:.1e} |")
    shape = "x".join(map(str, latent))
    return f"{cfg.dim} wide, {cfg.num_layers} blocks, latent {shape}; errors relative to the torch backend in fp32.\n\n" \
        + "\n".join(rows)


# ---- 2. flash-attn vs SDPA --------------------------------------------------------------------------------------
def _timed(fn, device: str, reps: int = 10) -> float:
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e3


def flash_vs_sdpa(device: str, smoke: bool) -> str:
    from tmd_megatron.models.wan.layers import SDPAttention
    from tmd_megatron.parallel.attention import make_local_attention

    flash = make_local_attention("flash")
    n, heads, d = (96, 2, 64) if smoke else (4680, 12, 128)
    q, k, v = (torch.randn(1, n, heads, d, device=device, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    rows = ["| keys | output rel err | dq rel err | flash fwd+bwd ms | SDPA fwd+bwd ms |", "|---|---|---|---|---|"]
    for real in (None, n - 7):
        outs = []
        for core in (flash, SDPAttention()):
            q.grad = None
            o = core(q, k, v, real)
            o.float().square().sum().backward()
            outs.append((o, q.grad.clone()))
        times = [_timed(lambda c=c: c(q, k, v, real).float().sum().backward(), device) for c in (flash, SDPAttention())]
        rows.append(f"| {'all' if real is None else f'{real} of {n}'} | {rel(*[o for o, _ in outs]):.1e} | "
                    f"{rel(*[g for _, g in outs]):.1e} | {times[0]:.2f} | {times[1]:.2f} |")
    return f"bf16, [1, {n}, {heads}, {d}].\n\n" + "\n".join(rows)


# ---- 3. ring chunk kernels -------------------------------------------------------------------------------------
def ring_chunk_kernels(device: str, smoke: bool) -> str:
    from tmd_megatron.parallel.chunk_attention import KERNELS, select_kernel

    heads, d = (2, 64) if smoke else (12, 128)
    rows = ["| kernel | dtype | Lq x Lk | out | lse | dq | dk | dv | ms fwd+bwd (math ms) |",
            "|---|---|---|---|---|---|---|---|---|"]
    math = KERNELS["math"]
    for dtype in (torch.float32, torch.bfloat16):
        for lq, lk in ((64, 100), (100, 64)) if smoke else ((1000, 1000), (2048, 1500)):
            g = torch.Generator(device=device).manual_seed(0)
            q, k, v, do = (torch.randn(1, heads, n, d, device=device, dtype=dtype, generator=g)
                           for n in (lq, lk, lk, lq))
            kern = select_kernel(q)
            out, lse, aux = kern.forward(q, k, v, d ** -0.5)
            ref_out, ref_lse, _ = math.forward(q, k, v, d ** -0.5)
            # the backward takes a merged output and LSE: hand both kernels the same (the reference's)
            grads = kern.backward(do, q, k, v, ref_out.to(dtype), ref_lse.float(), d ** -0.5, aux)
            ref_grads = math.backward(do, q, k, v, ref_out, ref_lse, d ** -0.5, None)
            t_k = _timed(lambda: kern.backward(do, q, k, v, *kern.forward(q, k, v, d ** -0.5)[:2], d ** -0.5,
                                               aux), device, 3)
            t_m = _timed(lambda: math.backward(do, q, k, v, *math.forward(q, k, v, d ** -0.5)[:2], d ** -0.5,
                                               None), device, 3)
            errs = " | ".join(f"{rel(a, b):.1e}" for a, b in zip(grads, ref_grads))
            rows.append(f"| {kern.name} | {str(dtype)[6:]} | {lq} x {lk} | {rel(out, ref_out):.1e} | "
                        f"{rel(lse, ref_lse):.1e} | {errs} | {t_k:.2f} ({t_m:.2f}) |")
    return f"{heads} heads x {d}; reference = the explicit score-block kernel in fp32.\n\n" + "\n".join(rows)


# ---- 4. Triton kernels ----------------------------------------------------------------------------------------
def triton_kernels(device: str, smoke: bool) -> str:
    from kernels import bench

    return bench.run("cuda", bench.PRESETS, bench.GRID, reps=20)


# ---- 5. FD-JVP precision at 1.3B width --------------------------------------------------------------------------
def fd_jvp_precision(device: str, smoke: bool) -> str:
    from tmd_megatron.algorithms import bench_jvp
    from tmd_megatron.algorithms.jvp import exact_total_derivative, fd_steps, fd_total_derivative
    from tmd_megatron.models.wan import WanConfig

    if smoke:
        cfg, latent, head = WanConfig.preset("tiny"), (2, 4, 4), 2
    else:
        cfg, latent, head = WanConfig.preset("wan2.1-t2v-1.3b").replace(num_layers=6), (3, 16, 20), 5
    _, student = bench_jvp.build(cfg, head)
    bench_jvp.band_limit_inner_time(student, min_period=0.05)
    p = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in bench_jvp.problem(student, latent).items()}
    student = student.to(device)
    ref_fn = bench_jvp.make_u_fn(student, p, torch.float64)
    exact = exact_total_derivative(ref_fn, p["y_s"].double(), p["s"], p["v"].double())
    fn32 = bench_jvp.make_u_fn(student, p, torch.float32)
    h_plus, h_minus = fd_steps(p["s"], p["r"], 5e-3)
    dev = torch.device(device).type
    rows = ["| finite-difference passes | rel. L2 error vs exact fp64 JVP | ms for the two passes |", "|---|---|---|"]
    for label, bf16 in (("fp32 (fd_dtype=fp32, the default)", False), ("bf16 autocast (fd_dtype=compute)", True)):
        def fd():
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
                return fd_total_derivative(fn32, p["y_s"].float(), p["s"], p["v"].float(), h_plus, h_minus)

        rows.append(f"| {label} | {bench_jvp.rel(fd(), exact):.2e} | {_timed(fd, device, 3):.1f} |")
    return f"dim {cfg.dim}, flow head H = {head}, latent {latent}, δ = 5e-3, s-dependence band-limited (period ≥ " \
        f"0.05).\n\n" + "\n".join(rows)


# ---- 6. stage-2 step memory vs planner -------------------------------------------------------------------------
def stage2_memory(device: str, smoke: bool) -> str:
    from tmd_megatron.parallel import Topology
    from tmd_megatron.training.config import compose, resolve
    from tmd_megatron.training.plan import plan_recipe
    from tmd_megatron.training.trainer import Trainer

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        if smoke:
            over = ["experiment=tiny_smoke", "data.global_batch=2", "parallel.microbatches=1"]
        else:
            over = ["experiment=wan1.3b_tmd_n2h5_m1", "method=tmd", "++model.overrides.num_layers=8",
                    "model.teacher=random:0", "model.init=teacher", "model.teacher_dtype=bf16",
                    "method.dmd2v.disc_layers=[3,5,7]", "data=synthetic", "++data.synthetic.size=64",
                    "++data.synthetic.frames=5", "data.latent=[16,5,32,32]", "data.global_batch=1",
                    "parallel.microbatches=1", "parallel.tp=1", "parallel.cp=1", "parallel.pp=1",
                    "parallel.activation_checkpointing=true"]
        over += [f"run.out_dir={tmp}/run", "run.max_steps=2", "run.ckpt_every=0", "run.tensorboard=false",
                 f"run.device={device}", "run.resume=never"]
        res = resolve(compose(over))
        plan = plan_recipe(res, 1)
        if plan.problems:
            raise AssertionError(f"the planner refuses the check's recipe: {plan.problems}")
        trainer = Trainer(res, Topology.single(device=device), stream=io.StringIO())
        trainer.start()
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(2):  # a critic step and a generator step
            trainer.advance()
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    rows = [f"| planner estimate | {plan.total_gib:.2f} GiB |", f"| measured peak (max_memory_allocated) | "
            f"{peak:.2f} GiB |", f"| estimate / measured | {plan.total_gib / peak:.2f} |",
            f"| two steps | {seconds:.1f} s |"]
    return f"`{' '.join(over[:-6])}`\n\n| | |\n|---|---|\n" + "\n".join(rows)


# ---- 7. pytest tests/gpu -----------------------------------------------------------------------------------------
def gpu_tests(device: str, smoke: bool) -> str:
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "tests/gpu", "-p", "no:cacheprovider"],
                          cwd=root, capture_output=True, text=True, timeout=420)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if proc.returncode not in (0, 5):
        raise AssertionError("pytest tests/gpu failed:\n" + "\n".join(lines[-40:]))
    return "```\n" + "\n".join(lines[-25:]) + "\n```"


SECTIONS = [
    ("Transformer Engine layers vs the torch backend", te_vs_torch, "transformer_engine"),
    ("flash-attn vs SDPA", flash_vs_sdpa, "flash_attn"),
    ("Ring attention chunk kernels vs the explicit reference", ring_chunk_kernels, None),
    ("Triton kernels vs torch (kernels/bench.py)", triton_kernels, "triton"),
    ("FD-JVP precision at Wan 1.3B width", fd_jvp_precision, None),
    ("TMD stage-2 step: peak memory vs the planner", stage2_memory, None),
    ("pytest tests/gpu", gpu_tests, None),
]
CPU_SMOKE = {"te_vs_torch", "ring_chunk_kernels", "fd_jvp_precision", "stage2_memory"}


def run_sections(device: str, smoke: bool, only=None) -> tuple[str, bool]:
    import importlib.util

    ok, parts = True, []
    for title, fn, needs in SECTIONS:
        if only and fn.__name__ not in only:
            continue
        if smoke and fn.__name__ not in CPU_SMOKE:
            parts.append(f"## {title}\n\nnot run: needs CUDA")
            continue
        if needs and needs not in sys.modules and importlib.util.find_spec(needs) is None:
            parts.append(f"## {title}\n\nnot run: `{needs}` is not installed")
            continue
        t0 = time.perf_counter()
        try:
            body, status = fn(device, smoke), "ok"
        except Exception:  # noqa: BLE001 - every section reports, whatever the others do
            body, status, ok = "```\n" + traceback.format_exc()[-3000:] + "```", "FAILED", False
        parts.append(f"## {title} ({status}, {time.perf_counter() - t0:.0f} s)\n\n{body}")
        if device == "cuda":
            torch.cuda.empty_cache()
    return "\n\n".join(parts), ok


def header(device: str) -> str:
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    if device == "cuda":
        what = f"{torch.cuda.get_device_name()} x {torch.cuda.device_count()}, CUDA {torch.version.cuda}"
    else:
        what = f"CPU smoke ({platform.machine()})"
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=Path(__file__).parent).stdout.strip() or "unknown"
    return f"# GPU check\n\n`make gpu-check` on {what}, torch {torch.__version__}, commit {rev}, {when}."


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke-on-cpu", action="store_true", help="tiny sizes on CPU; prints, writes no report")
    ap.add_argument("--out", type=Path, default=REPORT, help=f"report path (default {REPORT})")
    ap.add_argument("--only", default="", help="comma-separated section functions, e.g. ring_chunk_kernels")
    args = ap.parse_args(argv)
    only = {s for s in args.only.split(",") if s}
    if not torch.cuda.is_available() and not args.smoke_on_cpu:
        print(f"gpu-check: torch {torch.__version__} in {sys.executable} sees no CUDA device (on a GPU node, point "
              "GPU_PYTHON at the Python with CUDA torch); there it runs, in at most ten minutes:\n1. " + PLAN)
        return 0
    device = "cpu" if args.smoke_on_cpu else "cuda"
    if device == "cuda":
        _tf32_off()
        os.environ.setdefault("NVIDIA_TF32_OVERRIDE", "0")
    body, ok = run_sections(device, args.smoke_on_cpu, only)
    report = header(device) + "\n\n" + body + "\n"
    print(report)
    if not args.smoke_on_cpu:
        args.out.write_text(report)
        print(f"gpu-check: report written to {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
