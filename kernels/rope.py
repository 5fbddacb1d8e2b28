"""Wan's interleaved 3-D RoPE as one Triton pass (reference: tmd_megatron.models.wan.rope.apply_rope).

Adjacent channels (2j, 2j+1) of each head rotate by the angle whose cos/sin sit at [token, j] of the tables.
One program handles all heads of one token, so each table row is read once per token, not once per head.
Math in fp32; the output is fp32 like the reference (whose rotation ends in fp32 for bf16 input).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import KERNEL_DTYPES, num_warps_for


@triton.jit
def _rotate_pairs(x_ptr, cos_ptr, sin_ptr, out_ptr, num_tokens, pairs_per_token, half_d, SIGN: tl.constexpr,
                  BLOCK: tl.constexpr):
    token = tl.program_id(0)  # flat (batch, token) index of a [B, L, H, d] tensor
    pos = token % num_tokens
    pair = tl.arange(0, BLOCK)
    mask = pair < pairs_per_token
    j = pair % half_d  # complex slot within the head
    base = token.to(tl.int64) * 2 * pairs_per_token
    x0 = tl.load(x_ptr + base + 2 * pair, mask=mask, other=0.0).to(tl.float32)
    x1 = tl.load(x_ptr + base + 2 * pair + 1, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(cos_ptr + pos * half_d + j, mask=mask, other=0.0)
    s = tl.load(sin_ptr + pos * half_d + j, mask=mask, other=0.0) * SIGN
    dtype = out_ptr.dtype.element_ty
    tl.store(out_ptr + base + 2 * pair, (x0 * c - x1 * s).to(dtype), mask=mask)
    tl.store(out_ptr + base + 2 * pair + 1, (x0 * s + x1 * c).to(dtype), mask=mask)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out_dtype: torch.dtype, inverse: bool):
    x = x.contiguous()
    b, n, h, d = x.shape
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    pairs = h * d // 2
    block = triton.next_power_of_2(pairs)
    _rotate_pairs[(b * n,)](
        x, cos, sin, out, n, pairs, d // 2, SIGN=-1.0 if inverse else 1.0, BLOCK=block, num_warps=num_warps_for(block)
    )
    return out


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(x, cos, sin):
        return _rotate(x, cos, sin, torch.float32, inverse=False)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, cos, sin = inputs
        ctx.x_dtype = x.dtype
        ctx.save_for_backward(cos, sin)
        ctx.save_for_forward(cos, sin)

    @staticmethod
    def backward(ctx, dy):
        # A rotation's transpose is the rotation by the opposite angle.
        cos, sin = ctx.saved_tensors
        return _rotate(dy, cos, sin, ctx.x_dtype, inverse=True), None, None

    @staticmethod
    def jvp(ctx, tx, tcos, tsin):
        # Forward mode (torch.func.jvp, the exact-JVP reference) runs in torch: under functorch the tangent is a
        # wrapper tensor that Triton cannot read, and the rotation is linear, so the tangent rotates like x.
        cos, sin = (t[None, :, None, :] for t in ctx.saved_tensors)
        t0, t1 = tx.float().unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack([t0 * cos - t1 * sin, t0 * sin + t1 * cos], dim=-1).flatten(-2)


def unsupported(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> str | None:
    """Why the kernel cannot take these inputs (None when it can)."""
    if x.numel() == 0:
        return "x is empty"
    if x.ndim != 4 or x.shape[-1] % 2:
        return f"x must be [B, L, heads, d] with even d, got {tuple(x.shape)}"
    if x.dtype not in KERNEL_DTYPES:
        return f"x dtype {x.dtype} is not fp32/bf16/fp16 (fp64 stays on the torch reference)"
    want = (x.shape[1], x.shape[3] // 2)
    if tuple(cos.shape) != want or tuple(sin.shape) != want:
        return f"cos/sin must be [L, d/2] = {want}, got {tuple(cos.shape)} and {tuple(sin.shape)}"
    if cos.requires_grad or sin.requires_grad:
        return "the kernel gives no gradient for the cos/sin tables; use the torch reference"
    if not (x.device == cos.device == sin.device):
        return f"tensors on different devices: x {x.device}, cos {cos.device}, sin {sin.device}"
    return None


def apply_rope(x_B_L_H_d: torch.Tensor, cos_L_c: torch.Tensor, sin_L_c: torch.Tensor) -> torch.Tensor:
    """Rotated fp32 copy of x_B_L_H_d; differentiable in x (forward and reverse mode)."""
    reason = unsupported(x_B_L_H_d, cos_L_c, sin_L_c)
    if reason:
        raise ValueError(f"kernels.rope.apply_rope: {reason}")
    cos = cos_L_c.to(torch.float32).contiguous()
    sin = sin_L_c.to(torch.float32).contiguous()
    return _Rope.apply(x_B_L_H_d, cos, sin)
