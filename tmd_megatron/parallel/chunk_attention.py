"""Softmax attention over one block of keys that also returns the log-sum-exp, and the matching backward.

Ring attention merges the partial results of K/V chunks by their log-sum-exp (LSE). For that it needs a
kernel that returns the LSE with the output, and a backward that takes the *merged* output and LSE: with
those, the gradient of one chunk is exact (P = exp(S - lse_global), delta = rowsum(dO * O_global)), and
no [Lq, Lk] score block is ever materialised, so memory stays linear in the chunk length.

Tensors are [B, H, L, d] (SDPA's layout); the LSE is [B, H, Lq] in fp32 (fp64 for fp64 inputs). Kernels:
- `math`: explicit matmuls in fp32 (fp64 for fp64); materialises [B, H, Lq, Lk]. The reference.
- `cpu_flash`: torch's blockwise CPU flash kernel, aten::_scaled_dot_product_flash_attention_for_cpu and its
  backward (every float dtype; torch/_meta_registrations.py gives the LSE as [B, H, Lq], fp32 for half types).
- `cuda_flash`: aten::_scaled_dot_product_flash_attention (+ backward), bf16/fp16 only, head_dim <= 256 and
  a multiple of 8 (flash-attn 2 inside torch). GPU only: tests/gpu compares it with `math`.
- `cuda_efficient`: aten::_scaled_dot_product_efficient_attention (+ backward), any float dtype (fp32 included).
  Its LSE comes back padded to a multiple of 32 rows (_meta_registrations.py,
  meta__scaled_dot_product_efficient_attention: `math.ceil(M / 32) * 32`): sliced after the forward, padded
  again before the backward. GPU only.
torch's own context-parallel attention (torch/distributed/tensor/experimental/_context_parallel/_attention.py)
drives the same aten pairs the same way; we keep the ops' auxiliary outputs (seeds, cumulative lengths) per call
and hand them back unchanged, as autograd would.
"""
from __future__ import annotations

import math

import torch

aten = torch.ops.aten


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


class MathKernel:
    name = "math"

    def forward(self, q, k, v, scale):
        acc = _acc(q.dtype)
        s = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale
        lse = torch.logsumexp(s, dim=-1)
        out = torch.matmul(torch.exp(s - lse[..., None]), v.to(acc))
        return out, lse, None

    def backward(self, dout, q, k, v, out, lse, scale, aux):
        acc = _acc(q.dtype)
        q32, k32, v32, do32 = q.to(acc), k.to(acc), v.to(acc), dout.to(acc)
        p = torch.exp(torch.matmul(q32, k32.transpose(-1, -2)) * scale - lse[..., None].to(acc))
        delta = (do32 * out.to(acc)).sum(dim=-1, keepdim=True)
        ds = p * (torch.matmul(do32, v32.transpose(-1, -2)) - delta)
        return torch.matmul(ds, k32) * scale, torch.matmul(ds.transpose(-1, -2), q32) * scale, \
            torch.matmul(p.transpose(-1, -2), do32)


class CpuFlashKernel:
    name = "cpu_flash"

    def forward(self, q, k, v, scale):
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
        return out, lse, None

    def backward(self, dout, q, k, v, out, lse, scale, aux):
        # grad_out, q, k, v, out, logsumexp, dropout_p, is_causal (aten schema); out/dout in q's dtype
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout.to(q.dtype).contiguous(), q, k, v, out.to(q.dtype), lse.contiguous(), 0.0, False, scale=scale)


class CudaFlashKernel:
    name = "cuda_flash"

    def forward(self, q, k, v, scale):
        # -> output, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, rng_state, unused, debug_attn_mask
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, False, False, scale=scale)
        return out, lse, (cum_q, cum_k, max_q, max_k, seed, offset)

    def backward(self, dout, q, k, v, out, lse, scale, aux):
        cum_q, cum_k, max_q, max_k, seed, offset = aux
        return aten._scaled_dot_product_flash_attention_backward(
            dout.to(q.dtype).contiguous(), q, k, v, out.to(q.dtype), lse.contiguous(), cum_q, cum_k, max_q, max_k,
            0.0, False, seed, offset, scale=scale)


def _lse_rows(n: int) -> int:
    return math.ceil(n / 32) * 32


class CudaEfficientKernel:
    name = "cuda_efficient"

    def forward(self, q, k, v, scale):
        out, lse, seed, offset = aten._scaled_dot_product_efficient_attention(
            q, k, v, None, True, 0.0, False, scale=scale)
        return out, lse[..., : q.shape[-2]], (seed, offset)

    def backward(self, dout, q, k, v, out, lse, scale, aux):
        seed, offset = aux
        rows = q.shape[-2]
        padded = lse.new_zeros(*lse.shape[:-1], _lse_rows(rows))
        padded[..., :rows] = lse
        dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
            dout.to(q.dtype).contiguous(), q, k, v, None, out.to(q.dtype), padded, seed, offset, 0.0,
            [True, True, True, False], False, scale=scale)
        return dq, dk, dv


KERNELS = {k.name: k for k in (MathKernel(), CpuFlashKernel(), CudaFlashKernel(), CudaEfficientKernel())}


def select_kernel(q: torch.Tensor, name: str = "auto"):
    """The fused kernel for q's device and dtype ('auto'), or the one named."""
    if name != "auto":
        try:
            return KERNELS[name]
        except KeyError:
            raise ValueError(f"unknown chunk attention kernel {name!r}; choose one of {sorted(KERNELS)} or 'auto'") \
                from None
    if q.device.type == "cpu":
        return KERNELS["cpu_flash"]
    if q.device.type == "cuda" and q.dtype != torch.float64:  # neither CUDA kernel takes fp64
        d = q.shape[-1]
        flash_ok = q.dtype in (torch.float16, torch.bfloat16) and d <= 256 and d % 8 == 0
        return KERNELS["cuda_flash" if flash_ok else "cuda_efficient"]
    return KERNELS["math"]
