"""Measure the `cpu` profile of the step-time model on this machine (training/timing.py), one thread per rank as the
trainer's ranks run here:

- per call: the time of a nearly empty linear, attention and elementwise op (Python, dispatch, autograd);
- GEMM: F.linear forward and its two backward products at Wan-like shapes; the rate of time = calls x per-call
  time + FLOPs / rate (least squares in relative error);
- attention: SDPA forward and backward (torch's CPU flash kernel) at a few lengths, fitted the same way;
- elementwise: the memory bandwidth that explains what is left of a Wan block's measured time (its bytes and ops
  counted by models.flops.elementwise_traffic);
- gloo: send/recv, all-reduce, all-gather, reduce-scatter and all-to-all between two ranks (bench/ranks.py), fitted
  to latency + bytes / bandwidth with the ring factors the model uses; then the latency of a collective inside
  training, from flow-matching steps of the real trainer under TP2 + SP (`collective_latency`);
- no overlap: gloo's transfers need the cores the ranks compute on;
- cores: the CPUs this process may run on (ranks share them).

    python -m tmd_megatron.bench.calibrate            # writes ~/.cache/tmd_megatron/cpu_profile.json ($TMD_CPU_PROFILE)
    python -m tmd_megatron.bench.calibrate --print    # measure and print only
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

import torch
import torch.nn.functional as Fn

from .timing import load_average


def _median_time(fn, reps: int = 7) -> float:
    fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def _fit(samples: list[tuple[float, float, float]], t0: float) -> float:
    """The rate of seconds = calls * t0 + flops / rate over (calls, flops, seconds), least squares in relative
    error (small and large shapes count alike); t0, the time of a call that does almost nothing, is measured."""
    import numpy as np

    x = np.array([f / s for c, f, s in samples])
    y = np.array([1.0 - c * t0 / s for c, f, s in samples])
    return float(x @ x / (x @ y))


def speed_probe() -> float:
    """GFLOP/s of one thread on a fixed GEMM loop (about 0.2 s): the machine's speed now, to compare a launch with
    the calibration (this VM's speed drifts by 20 % and more with other tenants)."""
    a, b = torch.randn(384, 256), torch.randn(256, 1024)
    return 20 * 2 * 384 * 256 * 1024 / _median_time(lambda: [torch.mm(a, b) for _ in range(20)], 9) / 1e9


def call_times() -> tuple[float, float, float]:
    """Seconds of a nearly empty linear, attention and elementwise call (with autograd recording, as in training):
    the fixed cost of each kernel call here (Python, dispatch, autograd)."""
    x = torch.randn(4, 16, requires_grad=True)
    w = torch.randn(16, 16, requires_grad=True)
    q = torch.randn(1, 1, 4, 8, requires_grad=True)
    gemm = _median_time(lambda: Fn.linear(x, w), 200)
    attn = _median_time(lambda: Fn.scaled_dot_product_attention(q, q, q), 200)
    op = statistics.median(_median_time(fn, 200) for fn in (lambda: x * w[0], lambda: x + 1.0, lambda: x.float(),
                                                             lambda: Fn.gelu(x, approximate="tanh")))
    return gemm, attn, op


def gemm_samples(shapes=((192, 256, 256), (384, 256, 256), (384, 256, 1024), (384, 1024, 256), (768, 256, 1024),
                         (768, 64, 256), (192, 1024, 256), (1536, 256, 256))) -> list:
    out = []
    for m, k, n in shapes:
        x = torch.randn(m, k, requires_grad=True)
        w = torch.randn(n, k, requires_grad=True)
        g = torch.randn(m, n)
        out.append((1, 2 * m * k * n, _median_time(lambda: Fn.linear(x, w))))
        y = Fn.linear(x, w)
        out.append((2, 4 * m * k * n, _median_time(lambda: torch.autograd.grad(y, (x, w), g, retain_graph=True))))
    return out


def attention_samples(lengths=(192, 384, 768), heads=4, head_dim=64, batch=2) -> tuple[list, list]:
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    fwd, bwd = [], []
    for n in lengths:
        q, k, v = (torch.randn(batch, heads, n, head_dim, requires_grad=True) for _ in range(3))
        flops = sdpa_flop_count(q.shape, k.shape, v.shape)
        fwd.append((1, flops, _median_time(lambda: Fn.scaled_dot_product_attention(q, k, v))))
        out = Fn.scaled_dot_product_attention(q, k, v)
        g = torch.randn_like(out)
        bflops = sdpa_backward_flop_count(g.shape, q.shape, k.shape, v.shape)
        bwd.append((1, bflops, _median_time(lambda: torch.autograd.grad(out, (q, k, v), g, retain_graph=True))))
    return fwd, bwd


def block_time(cfg, tokens: int, batch: int = 2) -> tuple[float, float]:
    """Median seconds of one Wan block's forward and of its backward (fp32, one thread)."""
    from tmd_megatron.models.wan.block import WanBlock
    from tmd_megatron.models.wan.layers import TorchLayers

    torch.manual_seed(0)
    block = WanBlock(cfg, TorchLayers())
    x = torch.randn(batch, tokens, cfg.dim, requires_grad=True)
    ctx = torch.randn(batch, cfg.context_len, cfg.dim)
    e0 = torch.randn(batch, 6, cfg.dim)
    cos, sin = torch.randn(tokens, cfg.head_dim // 2), torch.randn(tokens, cfg.head_dim // 2)
    fwd = _median_time(lambda: block(x, ctx, e0, cos, sin))
    y = block(x, ctx, e0, cos, sin)
    g = torch.randn_like(y)
    params = [p for p in block.parameters()]
    bwd = _median_time(lambda: torch.autograd.grad(y, [x, *params], g, retain_graph=True, allow_unused=True))
    return fwd, bwd


def elementwise(gemm_rate, gemm_t0, attn_f, attn_b, op) -> float:
    """Bytes per second of the elementwise work in a Wan block: what its products, attention and per-op costs
    leave of its measured time, over the bytes counted."""
    from tmd_megatron.models import flops as F
    from tmd_megatron.models.wan import WanConfig
    from tmd_megatron.training.timing import block_traffic

    def explained(cfg, tokens, batch):
        """Seconds the products and attention explain, and the counted (bytes, ops), forward and backward."""
        call = F.wan_blocks(cfg, (tokens, 2, 2), batch, [0])  # (F, H, W) before the (1, 2, 2) patches
        fwd, bwd = call.forward(), F.backward_of(call, weights=True)
        prod = [f.gemm / gemm_rate + f.gemm_calls * gemm_t0 + f.attn / r[0] + f.attn_calls * r[1]
                for f, r in ((fwd, attn_f), (bwd, attn_b))]
        fb, fo, bb, bo = block_traffic(cfg, tokens, batch)
        return prod, ((fb, fo), (bb, bo))

    ref = WanConfig(dim=256, ffn_dim=1024, num_heads=4, num_layers=1, text_dim=64, text_len=64)
    measured = block_time(ref, 384, 2)
    prod, counted = explained(ref, 384, 2)
    rest = sum(max(0.0, t - p - o * op) for t, p, (_, o) in zip(measured, prod, counted))
    return sum(b for b, _ in counted) / max(rest, 1e-9)


def gloo_link() -> tuple[float, float]:
    """(latency s, bandwidth B/s) of gloo between two ranks of this machine."""
    from .launch import run_cases

    return fit_link(run_cases([("gloo_bandwidth", {})], 2, timeout=600)[0][0]["samples"])


def fit_link(samples) -> tuple[float, float]:
    """(latency s, bandwidth B/s) fitted to samples (hops-weighted calls, bytes on the ring-normalised wire,
    seconds): seconds = latency·calls + bytes/bandwidth, in relative error. A sample of 0 s (the transfer lost in
    the timing noise: the case's time with it was no longer than without it) says nothing about either and is
    left out; it made the relative weights infinite and the fit fail when the machine was busy."""
    import numpy as np

    kept = [(c, b, s) for c, b, s in samples if s > 0]
    if len(kept) < 2:
        raise RuntimeError(f"gloo calibration: {len(samples) - len(kept)} of {len(samples)} transfers were lost in "
                           "the timing noise; rerun on a quieter machine")
    a = np.array([[c, b] for c, b, _ in kept])
    y = np.array([s for *_, s in kept])
    w = 1.0 / y
    (alpha, inv_bw), *_ = np.linalg.lstsq(a * w[:, None], y * w, rcond=None)
    if inv_bw <= 0:
        raise RuntimeError("gloo calibration: the fitted bandwidth is not positive (the transfers' times do not grow "
                           "with their bytes); rerun on a quieter machine")
    return max(0.0, float(alpha)), 1.0 / float(inv_bw)


def collective_latency(prof, steps: int = 5, smoke: bool = False) -> tuple[float, float]:
    """(seconds per collective call, predicted / measured on CP2 ring) from flow-matching steps of the real trainer
    (the TIME_MODEL of bench/perf.py) under TP2 + SP. A collective inside training costs more than between plain
    products (the microbenchmark above): the two ranks reach it at slightly different times (every call waits for
    the later one) and gloo's copies take cycles from the computing ranks. The call latency is solved from the
    measured step with everything else as measured above; CP2 ring is then predicted as a check. These runs are
    flow matching only: the step-time table predicts TM-MF and TMD steps, on more layouts."""
    import dataclasses

    from tmd_megatron.training.config import compose, resolve
    from tmd_megatron.training.timing import StepModel

    from .launch import run_cases
    from .perf_time import _time_recipe

    def measured(extra):
        over = _time_recipe(["method=flow_matching", *extra], smoke)
        got = run_cases([("step_time", {"overrides": over, "steps": steps})], 2, timeout=900)[0][0]
        return resolve(compose(over)), statistics.median(s["wall"] for s in got["steps"]), got["latent"]

    def predicted(res, latent, alpha):
        p = dataclasses.replace(prof, intra_latency_us=alpha * 1e6, inter_latency_us=alpha * 1e6)
        return StepModel(res, 2, p, latent=latent).step(True)[0]

    res, wall, latent = measured(["parallel.tp=2"])
    a0 = prof.intra_latency_us * 1e-6
    base, per = predicted(res, latent, a0), predicted(res, latent, a0 + 1e-3) - predicted(res, latent, a0)
    alpha = max(a0, a0 + (wall - base) / per * 1e-3)
    res, wall, latent = measured(["parallel.cp=2"])
    return alpha, predicted(res, latent, alpha) / wall


def measure(smoke: bool = False):
    from tmd_megatron.training.timing import Profile

    torch.set_num_threads(1)
    load0 = load_average()
    probe = speed_probe()
    # three interleaved rounds, the median of each quantity: this VM's speed drifts by 20 % between minutes
    rounds = []
    for _ in range(1 if smoke else 3):
        gemm_t0, attn_t0, op = call_times()
        gemm_rate = _fit(gemm_samples(), gemm_t0)
        f_samples, b_samples = attention_samples()
        attn_f, attn_b = (_fit(f_samples, attn_t0), attn_t0), (_fit(b_samples, attn_t0), attn_t0)
        bw = elementwise(gemm_rate, gemm_t0, attn_f, attn_b, op)
        rounds.append((gemm_t0, attn_t0, op, gemm_rate, attn_f[0], attn_b[0], bw))
    gemm_t0, attn_t0, op, gemm_rate, f_rate, b_rate, bw = (statistics.median(v) for v in zip(*rounds))
    attn_f, attn_b = (f_rate, attn_t0), (b_rate, attn_t0)
    alpha, link = gloo_link()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    prof = Profile("cpu", peak_tflops=gemm_rate / 1e12, gemm_tflops=gemm_rate / 1e12,
                   attn_fwd_tflops=attn_f[0] / 1e12, attn_bwd_tflops=attn_b[0] / 1e12, mem_gbps=bw / 1e9,
                   intra_gbps=link / 1e9, inter_gbps=link / 1e9, intra_latency_us=alpha * 1e6,
                   inter_latency_us=alpha * 1e6, ranks_per_node=1 << 20, cores=float(cores),
                   gemm_call_us=gemm_t0 * 1e6, attn_call_us=attn_f[1] * 1e6, op_us=op * 1e6, memory_gib=0.0,
                   dtype="fp32", overlap_comm=False, probe_gflops=probe)
    alpha, check = collective_latency(prof, 2 if smoke else 5, smoke)
    print(f"collective latency in training {alpha * 1e6:.0f} us (between products {prof.intra_latency_us:.0f} us); "
          f"flow matching on CP2 ring predicted / measured {check:.2f}")
    prof = dataclasses.replace(prof, intra_latency_us=alpha * 1e6, inter_latency_us=alpha * 1e6)
    return prof, (load0, load_average())


def main(argv=None) -> None:
    from tmd_megatron.training.timing import cpu_profile_path, save_profile

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--print", action="store_true", help="measure and print; do not write the profile")
    args = ap.parse_args(argv)
    prof, load = measure()
    for k, v in vars(prof).items():
        print(f"{k:>18}: {v}")
    print(f"load average {load[0]:.1f} at the start, {load[1]:.1f} at the end")
    if not args.print:
        path = cpu_profile_path()
        save_profile(prof, path)
        print(f"written to {path}")


if __name__ == "__main__":
    main()
