"""LayerNorm (no affine) fused with AdaLN modulation: norm(x) * (1 + scale) + shift, per sample.

Reference: `modulate(FP32LayerNorm(D, eps, elementwise_affine=False)(x), shift, scale)` in
tmd_megatron.models.wan.block. The fused pass reads x once and writes the fp32 result once, where the
reference writes and re-reads the normalised tensor. Same rounding as the reference: statistics in fp32, the
normalised value rounded to x's dtype before modulation (FP32LayerNorm returns x's dtype), the result fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import KERNEL_DTYPES, ROWS_PER_PROGRAM, num_warps_for


@triton.jit
def _forward_kernel(x_ptr, shift_ptr, scale_ptr, out_ptr, mean_ptr, rstd_ptr, num_tokens, D, shift_stride,
                    scale_stride, eps, BLOCK_D: tl.constexpr):
    row = tl.program_id(0)  # flat (sample, token)
    sample = row // num_tokens
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    offs = row.to(tl.int64) * D + cols
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / D
    centred = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / D + eps)
    normed = (centred * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    shift = tl.load(shift_ptr + sample * shift_stride + cols, mask=mask, other=0.0)
    scale = tl.load(scale_ptr + sample * scale_stride + cols, mask=mask, other=0.0)
    tl.store(out_ptr + offs, normed * (1.0 + scale) + shift, mask=mask)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _backward_kernel(dy_ptr, x_ptr, scale_ptr, mean_ptr, rstd_ptr, dx_ptr, dshift_part_ptr, dscale_part_ptr,
                     num_tokens, D, scale_stride, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    # Program (sample, block) owns ROWS tokens of one sample, so its shift/scale gradient partials stay per sample.
    sample = tl.program_id(0)
    block = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    dshift = tl.zeros([BLOCK_D], dtype=tl.float32)
    dscale = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in range(ROWS):
        token = block * ROWS + i
        live = token < num_tokens
        row = sample.to(tl.int64) * num_tokens + token
        m = cols < tl.where(live, D, 0)  # masked tail rows load nothing and store nothing
        x = tl.load(x_ptr + row * D + cols, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * D + cols, mask=m, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + row, mask=live, other=0.0)
        rstd = tl.load(rstd_ptr + row, mask=live, other=0.0)
        xhat = tl.where(m, (x - mean) * rstd, 0.0)
        dshift += dy
        dscale += dy * xhat.to(x_ptr.dtype.element_ty).to(tl.float32)
        # Reloaded per row (an L1 hit) rather than held: at D = 5120 registers are the limit.
        scale = tl.load(scale_ptr + sample * scale_stride + cols, mask=mask, other=0.0)
        # The gradient reaching the norm passes the cast to x's dtype, as in autograd of the reference.
        g = (dy * (1.0 + scale)).to(x_ptr.dtype.element_ty).to(tl.float32)
        mean_g = tl.sum(g, axis=0) / D
        mean_gx = tl.sum(g * xhat, axis=0) / D
        dx = (g - mean_g - xhat * mean_gx) * rstd
        tl.store(dx_ptr + row * D + cols, dx.to(dx_ptr.dtype.element_ty), mask=m)
    part = (sample * tl.num_programs(1) + block).to(tl.int64) * D + cols
    tl.store(dshift_part_ptr + part, dshift, mask=mask)
    tl.store(dscale_part_ptr + part, dscale, mask=mask)


def _per_sample_rows(t: torch.Tensor, b: int) -> torch.Tensor:
    """[B or 1, 1, D] -> a [B, D] view with unit column stride (batch stride 0 when broadcast)."""
    t = t.expand(b, 1, t.shape[-1]).squeeze(1)
    return t if t.stride(-1) == 1 else t.contiguous()


class _LayerNormModulate(torch.autograd.Function):
    @staticmethod
    def forward(x, shift, scale, eps, rows_per_program):
        b, n, d = x.shape
        x = x.contiguous()
        shift_rows, scale_rows = _per_sample_rows(shift, b), _per_sample_rows(scale, b)
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        mean = torch.empty(b * n, dtype=torch.float32, device=x.device)
        rstd = torch.empty_like(mean)
        block = triton.next_power_of_2(d)
        _forward_kernel[(b * n,)](
            x, shift_rows, scale_rows, out, mean, rstd, n, d, shift_rows.stride(0), scale_rows.stride(0), eps,
            BLOCK_D=block, num_warps=num_warps_for(block),
        )
        return out, mean, rstd

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, shift, scale, eps, rows_per_program = inputs
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.shapes = (shift.shape, scale.shape)
        ctx.rows_per_program = rows_per_program
        ctx.save_for_backward(x, scale, mean, rstd)
        ctx.save_for_forward(x, scale, mean, rstd)

    @staticmethod
    def backward(ctx, dy, _dmean, _drstd):
        x, scale, mean, rstd = ctx.saved_tensors
        b, n, d = x.shape
        x, dy = x.contiguous(), dy.contiguous()
        scale_rows = _per_sample_rows(scale, b)
        rows = ctx.rows_per_program
        blocks = triton.cdiv(n, rows)
        dx = torch.empty_like(x)
        dshift_part = torch.empty(b, blocks, d, dtype=torch.float32, device=x.device)
        dscale_part = torch.empty_like(dshift_part)
        block = triton.next_power_of_2(d)
        _backward_kernel[(b, blocks)](
            dy, x, scale_rows, mean, rstd, dx, dshift_part, dscale_part, n, d, scale_rows.stride(0),
            ROWS=rows, BLOCK_D=block, num_warps=num_warps_for(block),
        )
        shift_shape, scale_shape = ctx.shapes
        dshift = dshift_part.sum(1, keepdim=True).sum_to_size(shift_shape)
        dscale = dscale_part.sum(1, keepdim=True).sum_to_size(scale_shape)
        return dx, dshift, dscale, None, None

    @staticmethod
    def jvp(ctx, tx, tshift, tscale, _teps, _trows):
        # Forward mode (the exact-JVP reference path) runs in torch: functorch hands wrapper tensors Triton cannot
        # read. The LayerNorm Jacobian rstd·(I − 1/D − x̂x̂ᵀ/D) is applied to the tangent directly.
        x, scale, mean, rstd = ctx.saved_tensors
        mean, rstd = mean.view(*x.shape[:2], 1), rstd.view(*x.shape[:2], 1)
        xhat = (x.float() - mean) * rstd
        normed = xhat.to(x.dtype).float()
        tout = torch.zeros_like(normed)
        if tx is not None:
            t = tx.float()
            tn = rstd * (t - t.mean(-1, keepdim=True) - xhat * (t * xhat).mean(-1, keepdim=True))
            tout = tout + tn.to(x.dtype).float() * (1 + scale)
        if tscale is not None:
            tout = tout + normed * tscale
        if tshift is not None:
            tout = tout + tshift
        return tout, None, None


def unsupported(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> str | None:
    """Why the kernel cannot take these inputs (None when it can)."""
    if x.numel() == 0:
        return "x is empty"
    if x.ndim != 3:
        return f"x must be [B, L, D], got {tuple(x.shape)}"
    if x.dtype not in KERNEL_DTYPES:
        return f"x dtype {x.dtype} is not fp32/bf16/fp16 (fp64 stays on the torch reference)"
    b, _, d = x.shape
    for name, t in (("shift", shift), ("scale", scale)):
        if t.ndim != 3 or t.shape[1] != 1 or t.shape[2] != d or t.shape[0] not in (1, b):
            return f"{name} must be per sample, [{b}, 1, {d}] (or [1, 1, {d}]), got {tuple(t.shape)}"
        if t.dtype != torch.float32:
            return f"{name} must be fp32 (the modulation runs in fp32), got {t.dtype}"
        if t.device != x.device:
            return f"{name} is on {t.device}, x on {x.device}"
    return None


def layer_norm_modulate(
    x_B_L_D: torch.Tensor,
    shift_B_1_D: torch.Tensor,
    scale_B_1_D: torch.Tensor,
    eps: float = 1e-6,
    rows_per_program: int = ROWS_PER_PROGRAM,
) -> torch.Tensor:
    """fp32 LayerNorm(x) * (1 + scale) + shift; differentiable in x, shift and scale.

    rows_per_program: tokens each backward program reduces (tests shrink it to exercise masked tails).
    """
    reason = unsupported(x_B_L_D, shift_B_1_D, scale_B_1_D)
    if reason:
        raise ValueError(f"kernels.layer_norm_modulate: {reason}")
    if rows_per_program < 1:
        raise ValueError(f"rows_per_program must be >= 1, got {rows_per_program}")
    out, _, _ = _LayerNormModulate.apply(x_B_L_D, shift_B_1_D, scale_B_1_D, float(eps), int(rows_per_program))
    return out
