"""Finite-difference JVP vs the exact JVP: error against δ in fp64/fp32/bf16 and the cost of each step.

    python -m tmd_megatron.algorithms.bench_jvp            # prints the two tables (CPU, about a minute)
    python -m tmd_megatron.algorithms.bench_jvp --quick    # tiny model, for a smoke run
    python -m tmd_megatron.algorithms.bench_jvp --wan1.3b  # errors only, at Wan2.1 1.3B width (H = 5, 240
                                                           # tokens, 512 text tokens; ~10 GB, several minutes)

The reference is torch.func.jvp in float64. The flow head of a freshly built student ignores y_s and s
(zero-initialised fusion output and time embeddings), which would make d/ds u trivially 0, so the extra
parameters are first set to small random values, as after some training.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import math
import statistics
import time

import torch

from ..models.student import DecoupledStudent, StudentConfig
from ..models.wan import WanConfig, WanModel
from .common import Batch
from .config import TMMFConfig
from .jvp import exact_total_derivative, fd_steps, fd_total_derivative
from .tm_mf import tm_mf_loss
from .transition import average_velocity, interpolate

DELTAS = (1e-1, 5e-2, 2e-2, 1e-2, 5e-3, 2e-3, 1e-3, 5e-4, 1e-4)


def perturb_extras(student: DecoupledStudent, std: float = 0.02, seed: int = 0) -> None:
    """Give the student's zero-initialised extras small random values so the flow head depends on y_s, s, r."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if not name.startswith("wan."):
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def band_limit_inner_time(student: DecoupledStudent, min_period: float) -> None:
    """Zero the weights the extra time embeddings (of s and s − r) give to sinusoid channels whose period in s
    is below `min_period`: a flow head whose s-dependence is smooth on that scale."""
    cfg = student.wan.config
    half = cfg.freq_dim // 2
    omega = 1000.0 * torch.pow(10000.0, -torch.arange(half, dtype=torch.float64) / half)  # rad per unit s
    fast = torch.cat([2 * torch.pi / omega < min_period] * 2)
    with torch.no_grad():
        for name, module in student.named_children():
            if name.endswith("time_embedding"):
                module[0].weight[:, fast] = 0


def build(cfg: WanConfig, head_blocks: int, seed: int = 0) -> tuple[WanModel, DecoupledStudent]:
    torch.manual_seed(seed)
    teacher = WanModel(cfg)
    teacher.init_weights()
    with torch.no_grad():  # init_weights zeroes the head; a random head makes the output depend on everything
        teacher.head.head.weight.normal_(0, 0.02)
    teacher.requires_grad_(False)
    student = DecoupledStudent.from_teacher(teacher, StudentConfig(flow_head_blocks=head_blocks))
    perturb_extras(student)
    return teacher, student


def problem(student, latent, seed: int = 1):
    """Fixed (x_t, t, y_s, s, r, v, y_1) and the u_fn of one TM-MF sample (DTM target)."""
    g = torch.Generator().manual_seed(seed)
    cfg = student.wan.config
    x = torch.randn(1, cfg.in_dim, *latent, generator=g)
    x1, y1 = torch.randn_like(x), torch.randn(x.shape, generator=g)
    ctx = torch.randn(1, 16, cfg.text_dim, generator=g)
    t, s, r = (torch.tensor([v], dtype=torch.float64) for v in (0.7, 0.45, 0.2))
    x_t = interpolate(x, x1, t)
    y = x1 - x
    return dict(x_t=x_t, t=t, ctx=ctx, y_s=interpolate(y, y1, s), s=s, r=r, v=y1 - y, y1=y1, x=x)


def make_u_fn(student, p, dtype):
    m = student.to(dtype)
    with torch.no_grad():
        feats = m.backbone(p["x_t"].to(dtype), p["t"], p["ctx"].to(dtype))
    y1 = p["y1"].to(dtype)

    def u_fn(y, s):
        head = m.flow_head(y, s, p["r"], feats)
        return average_velocity(head, y_s=y, y1=y1, s=s, x_t=feats.x_t, t=p["t"], target="dtm")

    return u_fn


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def error_table(student, latent, deltas=DELTAS) -> list[tuple]:
    p = problem(student, latent)
    ref_fn = make_u_fn(copy.deepcopy(student), p, torch.float64)
    exact64 = exact_total_derivative(ref_fn, p["y_s"].double(), p["s"], p["v"].double())
    rows = []
    fns = {
        "fp64": (make_u_fn(copy.deepcopy(student), p, torch.float64), torch.float64, contextlib.nullcontext),
        "fp32": (make_u_fn(copy.deepcopy(student), p, torch.float32), torch.float32, contextlib.nullcontext),
        "bf16": (
            make_u_fn(copy.deepcopy(student), p, torch.float32),
            torch.float32,
            lambda: torch.autocast("cpu", dtype=torch.bfloat16),
        ),
    }
    exact = {}
    for name, (fn, dtype, ctx) in fns.items():
        with ctx():
            exact[name] = rel(exact_total_derivative(fn, p["y_s"].to(dtype), p["s"], p["v"].to(dtype)), exact64)
    for delta in deltas:
        h_plus, h_minus = fd_steps(p["s"], p["r"], delta)
        errs = []
        for fn, dtype, ctx in fns.values():
            with ctx():
                fd = fd_total_derivative(fn, p["y_s"].to(dtype), p["s"], p["v"].to(dtype), h_plus, h_minus)
            errs.append(rel(fd, exact64))
        rows.append((delta, *errs))
    return rows, exact


def _median_time(fn, repeats: int) -> float:
    """Median CPU time of this process (one thread): steadier than wall time on a shared machine."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return statistics.median(times)


def cost_table(teacher, student, latent, repeats: int) -> dict[str, float]:
    p = problem(student, latent)
    u_fn = make_u_fn(student, p, torch.float32)
    h_plus, h_minus = fd_steps(p["s"], p["r"], 5e-3)
    out = {
        "derivative, FD (2 flow-head passes, no_grad)": _median_time(
            lambda: fd_total_derivative(u_fn, p["y_s"], p["s"], p["v"], h_plus, h_minus), repeats
        ),
        "derivative, exact (torch.func.jvp, math SDPA)": _median_time(
            lambda: exact_total_derivative(u_fn, p["y_s"], p["s"], p["v"]), repeats
        ),
    }
    ctx = torch.randn(2, 16, student.wan.config.text_dim)
    batch = Batch(torch.randn(2, student.wan.config.in_dim, *latent), ctx, torch.randn(16, ctx.shape[-1]))
    for method in ("fd", "exact"):
        cfg = TMMFConfig(jvp=method)

        def step():
            student.zero_grad(set_to_none=True)
            loss, _ = tm_mf_loss(student, batch, cfg, torch.Generator().manual_seed(0), teacher)
            loss.backward()

        out[f"TM-MF step fwd+bwd, jvp={method}"] = _median_time(step, repeats)
    return out


def print_error_table(title, student, latent, deltas=DELTAS) -> None:
    rows, exact = error_table(student, latent, deltas)
    print(f"\n{title}\nrelative L2 error of d/ds u along (v, 1) against the fp64 exact JVP")
    print(f"{'delta':>8} | {'FD fp64':>9} {'order':>5} | {'FD fp32':>9} | {'FD bf16':>9}")
    prev = None
    for delta, e64, e32, e16 in rows:
        order = "" if prev is None else f"{math.log(prev[1] / e64) / math.log(prev[0] / delta):5.2f}"
        print(f"{delta:8.0e} | {e64:9.2e} {order:>5} | {e32:9.2e} | {e16:9.2e}")
        prev = (delta, e64)
    print(f"{'exact':>8} | {exact['fp64']:9.2e} {'':>5} | {exact['fp32']:9.2e} | {exact['bf16']:9.2e}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model and one repeat (smoke run)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--wan1.3b", dest="wan13b", action="store_true",
                    help="error tables only, at the real 1.3B width: dim 1536, 12 heads, FFN 8960, H = 5")
    args = ap.parse_args(argv)
    if args.wan13b:
        cfg = WanConfig.preset("wan2.1-t2v-1.3b").replace(num_layers=6)  # the flow head (H = 5), one backbone block
        latent = (3, 16, 20)  # 3 x 8 x 10 = 240 tokens
        _, student = build(cfg, 5)
        print(f"model: Wan2.1 1.3B width (dim {cfg.dim}, {cfg.num_heads} heads, FFN {cfg.ffn_dim}), flow head H = 5, "
              f"latent {latent} (240 tokens), text {cfg.text_len} x {cfg.text_dim}")
        deltas = (2e-2, 1e-2, 5e-3, 2e-3, 1e-3)
        print_error_table("A. random extra time embeddings (all sinusoid channels)", student, latent, deltas)
        band_limit_inner_time(student, min_period=0.05)
        print_error_table("B. s-dependence band-limited to periods >= 0.05 (10x the paper's delta)", student, latent,
                          deltas)
        return
    if args.quick:
        cfg, head_blocks, latent, repeats = WanConfig.preset("tiny"), 2, (2, 4, 4), 1
    else:
        cfg = WanConfig(dim=256, ffn_dim=1024, num_heads=4, num_layers=8, text_dim=64, text_len=32, freq_dim=64)
        head_blocks, latent, repeats = 2, (3, 16, 16), args.repeats
    teacher, student = build(cfg, head_blocks)
    tokens = latent[0] * latent[1] * latent[2] // 4
    print(f"model: dim={cfg.dim} layers={cfg.num_layers} flow-head blocks={head_blocks} latent={latent} "
          f"({tokens} tokens)")
    title = "A. random extra time embeddings (all sinusoid channels, up to 1000 rad per unit s)"
    print_error_table(title, student, latent)
    smooth = copy.deepcopy(student)
    band_limit_inner_time(smooth, min_period=0.05)
    print_error_table("B. s-dependence band-limited to periods >= 0.05 (10x the paper's delta)", smooth, latent)
    print("\ncost (median CPU time, one thread, fp32)")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    costs = cost_table(teacher, student, latent, repeats)
    torch.set_num_threads(threads)
    for name, sec in costs.items():
        print(f"  {name:<48} {sec * 1e3:9.1f} ms")


if __name__ == "__main__":
    main()
