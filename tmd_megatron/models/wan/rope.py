"""Wan's 3-D rotary position embedding (WAN_SPEC §2.5).

Adjacent channel pairs (2j, 2j+1) of each head form complex numbers; the first c_t pairs rotate with the
frame index, the next c_h with the row, the last c_w with the column, each axis with its own frequencies
theta^(-2k/d_axis). Tables are built in float64 (as the original) and the rotation runs in fp32 or wider.
"""
from __future__ import annotations

import torch

import kernels


def axis_frequencies(head_dim_split: tuple[int, int, int], theta: float) -> list[torch.Tensor]:
    """float64 angular frequencies per complex slot, one tensor per axis (t, h, w)."""
    out = []
    for d_axis in head_dim_split:
        k = torch.arange(0, d_axis, 2, dtype=torch.float64)
        out.append(theta ** (-k / d_axis))
    return out


def grid_positions(grid: tuple[int, int, int], device=None) -> torch.Tensor:
    """[L, 3] int64 (frame, row, column) of each token in Wan's frame-major flat order."""
    f, h, w = grid
    ff, hh, ww = torch.meshgrid(
        torch.arange(f, device=device), torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij"
    )
    return torch.stack([ff.flatten(), hh.flatten(), ww.flatten()], dim=-1)


def rope_angles(
    positions_L_3: torch.Tensor, head_dim_split: tuple[int, int, int], theta: float, max_positions: int = 1024
) -> torch.Tensor:
    """[L, d/2] float64 rotation angle of every complex slot for the given token positions."""
    if positions_L_3.numel() and int(positions_L_3.max()) >= max_positions:
        raise ValueError(
            f"latent grid position {int(positions_L_3.max())} exceeds the RoPE table of {max_positions} positions; "
            "use a smaller latent grid or raise rope_max_positions"
        )
    freqs = axis_frequencies(head_dim_split, theta)
    pos = positions_L_3.to(torch.float64)
    parts = [pos[:, a : a + 1] * freqs[a].to(pos.device)[None, :] for a in range(3)]
    return torch.cat(parts, dim=-1)


def rope_cos_sin(angles: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cos(angles).to(dtype), torch.sin(angles).to(dtype)


def apply_rope(x_B_L_H_d: torch.Tensor, cos_L_c: torch.Tensor, sin_L_c: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs; computes in fp32 (fp64 for fp64 input) and returns that dtype.

    Returning fp32 for bf16 input follows the original (its complex128 rotation ends in .float()). The pairs are
    multiplied as complex numbers: one kernel each way, where stacking the real and imaginary results back into
    interleaved channels cost 9x more on CPU and made our DiT slower than diffusers' (docs/benchmarks.md).
    """
    dtype = torch.float64 if x_B_L_H_d.dtype == torch.float64 else torch.float32
    if torch.compiler.is_compiling():  # inductor writes no code for complex ops; real pairs fuse into one kernel
        a, b = x_B_L_H_d.to(dtype).unflatten(-1, (-1, 2)).unbind(-1)
        c, s = cos_L_c.to(dtype)[None, :, None, :], sin_L_c.to(dtype)[None, :, None, :]
        return torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2)
    pairs = torch.view_as_complex(x_B_L_H_d.to(dtype).unflatten(-1, (-1, 2)).contiguous())
    rotation = torch.complex(cos_L_c.to(dtype), sin_L_c.to(dtype))[None, :, None, :]
    return torch.view_as_real(pairs * rotation).flatten(-2)


def rotate(x_B_L_H_d: torch.Tensor, cos_L_c: torch.Tensor, sin_L_c: torch.Tensor) -> torch.Tensor:
    """apply_rope, by the Triton kernel where kernels run on x's device (kernels/)."""
    out = kernels.try_rope(x_B_L_H_d, cos_L_c, sin_L_c)
    return apply_rope(x_B_L_H_d, cos_L_c, sin_L_c) if out is None else out
