"""Wan's q/k RMSNorm over the full hidden size (all heads), forward and backward in one pass each.

Reference: tmd_megatron.models.wan.layers.RMSNormAcrossHeads (single device; a tensor-parallel norm that
reduces across head shards stays on torch). Rounding as the reference: RMS in fp32, the normalised value cast
back to x's dtype, then multiplied by the gain in the promoted dtype of x and the gain.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import KERNEL_DTYPES, ROWS_PER_PROGRAM, num_warps_for


@triton.jit
def _forward_kernel(x_ptr, w_ptr, out_ptr, rstd_ptr, D, eps, BLOCK_D: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    offs = row.to(tl.int64) * D + cols
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    normed = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _backward_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_part_ptr, num_rows, D, ROWS: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    block = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in range(ROWS):
        row = block.to(tl.int64) * ROWS + i
        live = row < num_rows
        m = cols < tl.where(live, D, 0)  # masked tail rows load nothing and store nothing
        x = tl.load(x_ptr + row * D + cols, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * D + cols, mask=m, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row, mask=live, other=0.0)
        xhat = x * rstd
        dw += dy * xhat.to(x_ptr.dtype.element_ty).to(tl.float32)
        # Reloaded per row (an L1 hit) rather than held: at D = 5120 registers are the limit.
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        # The gradient reaching the norm passes the cast to x's dtype, as in autograd of the reference.
        g = (dy * w).to(x_ptr.dtype.element_ty).to(tl.float32)
        dx = (g - xhat * (tl.sum(g * xhat, axis=0) / D)) * rstd
        tl.store(dx_ptr + row * D + cols, dx.to(dx_ptr.dtype.element_ty), mask=m)
    tl.store(dw_part_ptr + block.to(tl.int64) * D + cols, dw, mask=mask)


class _RMSNormAcrossHeads(torch.autograd.Function):
    @staticmethod
    def forward(x, weight, eps, rows_per_program):
        d = x.shape[-1]
        x_R_D = x.contiguous().view(-1, d)
        out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
        rstd = torch.empty(x_R_D.shape[0], dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(d)
        _forward_kernel[(x_R_D.shape[0],)](
            x_R_D, weight.contiguous(), out, rstd, d, eps, BLOCK_D=block, num_warps=num_warps_for(block)
        )
        return out, rstd

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, eps, rows_per_program = inputs
        _, rstd = output
        ctx.mark_non_differentiable(rstd)
        ctx.rows_per_program = rows_per_program
        ctx.save_for_backward(x, weight, rstd)
        ctx.save_for_forward(x, weight, rstd)

    @staticmethod
    def backward(ctx, dy, _drstd):
        x, weight, rstd = ctx.saved_tensors
        d = x.shape[-1]
        x_R_D = x.contiguous().view(-1, d)
        rows = ctx.rows_per_program
        blocks = triton.cdiv(x_R_D.shape[0], rows)
        dx = torch.empty_like(x_R_D)
        dw_part = torch.empty(blocks, d, dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(d)
        _backward_kernel[(blocks,)](
            dy.contiguous(), x_R_D, weight.contiguous(), rstd, dx, dw_part, x_R_D.shape[0], d,
            ROWS=rows, BLOCK_D=block, num_warps=num_warps_for(block),
        )
        return dx.view(x.shape), dw_part.sum(0).to(weight.dtype), None, None

    @staticmethod
    def jvp(ctx, tx, tweight, _teps, _trows):
        # Forward mode (the exact-JVP reference path) runs in torch: functorch hands wrapper tensors Triton cannot
        # read. The RMSNorm Jacobian rstd·(I − x̂x̂ᵀ/D) is applied to the tangent directly.
        x, weight, rstd = ctx.saved_tensors
        rstd = rstd.view(*x.shape[:-1], 1)
        xhat = x.float() * rstd
        out_dtype = torch.promote_types(x.dtype, weight.dtype)
        tout = torch.zeros(x.shape, dtype=out_dtype, device=x.device)
        if tx is not None:
            t = tx.float()
            tn = rstd * (t - xhat * (t * xhat).mean(-1, keepdim=True))
            tout = tout + tn.to(x.dtype) * weight
        if tweight is not None:
            tout = tout + xhat.to(x.dtype) * tweight
        return tout, None


def unsupported(x: torch.Tensor, weight: torch.Tensor) -> str | None:
    """Why the kernel cannot take these inputs (None when it can)."""
    if x.numel() == 0:
        return "x is empty"
    if x.ndim < 1 or weight.ndim != 1 or x.shape[-1] != weight.shape[0]:
        return f"x [..., D] and weight [D] must match, got {tuple(x.shape)} and {tuple(weight.shape)}"
    if x.dtype not in KERNEL_DTYPES or weight.dtype not in KERNEL_DTYPES:
        return f"dtypes x {x.dtype}, weight {weight.dtype} are not fp32/bf16/fp16 (fp64 stays on the torch reference)"
    if x.device != weight.device:
        return f"weight is on {weight.device}, x on {x.device}"
    return None


def rms_norm_across_heads(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, rows_per_program: int = ROWS_PER_PROGRAM
) -> torch.Tensor:
    """(x · rsqrt(mean(x²) + eps)) in fp32, cast to x's dtype, times weight; differentiable in x and weight."""
    reason = unsupported(x, weight)
    if reason:
        raise ValueError(f"kernels.rms_norm_across_heads: {reason}")
    if rows_per_program < 1:
        raise ValueError(f"rows_per_program must be >= 1, got {rows_per_program}")
    out, _ = _RMSNormAcrossHeads.apply(x, weight, float(eps), int(rows_per_program))
    return out
