"""Kernel vs torch reference at Wan2.1 sizes: `python -m kernels.bench` on a CUDA machine.

Prints a markdown table: forward and forward+backward time of each kernel and of the model's own torch code it
replaces (eager), the speedup, the kernel's forward bandwidth counted as one read of its inputs and one write
of its output, and its error against the reference (output, and the worst input gradient under a random probe). Without CUDA it says so and exits 0; `--smoke` then runs tiny shapes through Triton's interpreter
(checks that the script works, times mean nothing).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

# Wan2.1 T2V presets: (name, dim, heads); 81 frames at 480p give a 21 x 30 x 52 latent token grid.
PRESETS = (("1.3B", 1536, 12), ("14B", 5120, 40))
GRID = (21, 30, 52)
SMOKE_PRESETS = (("smoke", 40, 2),)
SMOKE_GRID = (2, 2, 3)


@dataclass
class Case:
    op: str
    shape: str
    dtype: torch.dtype
    kernel: Callable[[], torch.Tensor]
    reference: Callable[[], torch.Tensor]
    inputs: tuple[torch.Tensor, ...]  # the differentiable inputs (gradients reset between runs)
    bytes_forward: int


def _timer(fn: Callable[[], object], device: str, reps: int) -> float:
    """Median milliseconds of fn over reps runs after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def _cases(device: str, presets, grid) -> list[Case]:
    from kernels.layer_norm_modulate import layer_norm_modulate
    from kernels.rms_norm import rms_norm_across_heads
    from kernels.rope import apply_rope as rope_kernel
    from tmd_megatron.models.wan.block import modulate
    from tmd_megatron.models.wan.layers import FP32LayerNorm, RMSNormAcrossHeads
    from tmd_megatron.models.wan.rope import apply_rope, grid_positions, rope_angles, rope_cos_sin

    n = grid[0] * grid[1] * grid[2]
    cases = []
    for name, dim, heads in presets:
        head_dim = dim // heads
        d_hw = 2 * (head_dim // 6)
        angles = rope_angles(grid_positions(grid), (head_dim - 2 * d_hw, d_hw, d_hw), 10000.0)
        cos, sin = (t.to(device) for t in rope_cos_sin(angles, torch.float32))
        shift = torch.randn(1, 1, dim, device=device, requires_grad=True)
        scale = torch.randn(1, 1, dim, device=device, requires_grad=True)
        ln = FP32LayerNorm(dim, eps=1e-6, elementwise_affine=False).to(device)
        rms = RMSNormAcrossHeads(dim, 1e-6).to(device)
        for dtype in (torch.float32, torch.bfloat16):
            size = torch.tensor([], dtype=dtype).element_size()
            x = torch.randn(1, n, dim, device=device, dtype=dtype, requires_grad=True)
            q = torch.randn(1, n, heads, head_dim, device=device, dtype=dtype, requires_grad=True)
            shape = f"{name} [1, {n}, {dim}]"
            cases += [
                Case("layer_norm_modulate", shape, dtype,
                     lambda x=x: layer_norm_modulate(x, shift, scale, 1e-6),
                     lambda x=x: modulate(ln(x), shift, scale),
                     (x, shift, scale), x.numel() * (size + 4)),
                Case("rms_norm_across_heads", shape, dtype,
                     lambda x=x: rms_norm_across_heads(x, rms.weight, 1e-6),
                     lambda x=x: rms(x),
                     (x, rms.weight), x.numel() * (size + 4)),
                Case("rope", f"{name} [1, {n}, {heads}, {head_dim}]", dtype,
                     lambda q=q: rope_kernel(q, cos, sin),
                     lambda q=q: apply_rope(q, cos, sin),
                     (q,), q.numel() * (size + 4) + 2 * cos.numel() * 4),
            ]
    return cases


def _forward_backward(fn: Callable[[], torch.Tensor], inputs) -> Callable[[], None]:
    def run():
        for t in inputs:
            t.grad = None
        out = fn()
        out.backward(torch.ones_like(out))

    return run


def _errors(c: Case) -> tuple[float, float]:
    """Max relative error (to the reference's largest entry) of the output and of the worst input gradient."""

    def rel(a, b):
        a, b = a.detach().float(), b.detach().float()
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))

    out_k, out_r = c.kernel(), c.reference()
    probe = torch.randn_like(out_r)
    grads_k = torch.autograd.grad(out_k, c.inputs, probe)
    grads_r = torch.autograd.grad(out_r, c.inputs, probe)
    return rel(out_k, out_r), max(rel(a, b) for a, b in zip(grads_k, grads_r))


def run(device: str, presets, grid, reps: int) -> str:
    rows = ["| op | shape | dtype | torch fwd ms | kernel fwd ms | fwd speedup | torch fwd+bwd ms | kernel fwd+bwd ms "
            "| fwd+bwd speedup | kernel fwd GB/s | fwd rel err | grad rel err |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    torch.manual_seed(0)
    for c in _cases(device, presets, grid):
        err_out, err_grad = _errors(c)
        with torch.no_grad():
            t_ref, t_ker = _timer(c.reference, device, reps), _timer(c.kernel, device, reps)
        b_ref = _timer(_forward_backward(c.reference, c.inputs), device, reps)
        b_ker = _timer(_forward_backward(c.kernel, c.inputs), device, reps)
        dtype = str(c.dtype).replace("torch.", "")
        rows.append(f"| {c.op} | {c.shape} | {dtype} | {t_ref:.3f} | {t_ker:.3f} | {t_ref / t_ker:.2f}x | "
                    f"{b_ref:.3f} | {b_ker:.3f} | {b_ref / b_ker:.2f}x | {c.bytes_forward / t_ker / 1e6:.0f} | "
                    f"{err_out:.1e} | {err_grad:.1e} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20, help="timed runs per measurement (median reported)")
    parser.add_argument("--smoke", action="store_true",
                        help="without CUDA: tiny shapes through Triton's CPU interpreter (times mean nothing)")
    args = parser.parse_args(argv)
    if torch.cuda.is_available():
        print(f"# kernels vs torch reference on {torch.cuda.get_device_name()} (torch {torch.__version__})")
        print(run("cuda", PRESETS, GRID, args.reps))
        return 0
    print("kernels/bench.py: no CUDA device here, so kernel vs torch timings were not measured; "
          "run `python -m kernels.bench` on a CUDA machine.")
    if args.smoke:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("--smoke needs TRITON_INTERPRET=1 set before triton is imported")
        os.environ["TRITON_INTERPRET"] = "1"
        print("--smoke: tiny shapes under Triton's interpreter, CPU times (meaningless as performance):")
        print(run("cpu", SMOKE_PRESETS, SMOKE_GRID, reps=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
