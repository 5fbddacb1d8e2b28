"""Triton kernels for the Wan DiT's memory-bound steps, each tested against the model's own torch code.

- layer_norm_modulate: LayerNorm (no affine) fused with AdaLN modulation (reference: block.modulate + norm1/2)
- rms_norm_across_heads: q/k RMSNorm over all heads (reference: layers.RMSNormAcrossHeads)
- apply_rope: Wan's interleaved 3-D RoPE (reference: rope.apply_rope)

The model calls the `try_*` functions below: each returns the kernel's result when the kernels run on the
input's device (see selection.py) and take these inputs, else None and the model runs its reference. This
module never imports triton itself, so CPU installs without it pay nothing.
"""
from __future__ import annotations

import torch

from .selection import enabled, interpreting, override, runs_on

__all__ = ["enabled", "interpreting", "override", "runs_on", "try_layer_norm_modulate", "try_rms_norm", "try_rope"]


def try_layer_norm_modulate(
    x_B_L_D: torch.Tensor, shift_B_1_D: torch.Tensor, scale_B_1_D: torch.Tensor, eps: float
) -> torch.Tensor | None:
    if not runs_on(x_B_L_D):
        return None
    from . import layer_norm_modulate as op

    if op.unsupported(x_B_L_D, shift_B_1_D, scale_B_1_D):
        return None
    return op.layer_norm_modulate(x_B_L_D, shift_B_1_D, scale_B_1_D, eps)


def try_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    if not runs_on(x):
        return None
    from . import rms_norm as op

    if op.unsupported(x, weight):
        return None
    return op.rms_norm_across_heads(x, weight, eps)


def try_rope(x_B_L_H_d: torch.Tensor, cos_L_c: torch.Tensor, sin_L_c: torch.Tensor) -> torch.Tensor | None:
    if not runs_on(x_B_L_H_d):
        return None
    from . import rope as op

    if op.unsupported(x_B_L_H_d, cos_L_c, sin_L_c):
        return None
    return op.apply_rope(x_B_L_H_d, cos_L_c, sin_L_c)
