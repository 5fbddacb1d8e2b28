"""What every training step takes: the data batch, and noise drawn from a caller-owned generator."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    latents: torch.Tensor  # clean video latents x [B, C, F, H, W]
    context: torch.Tensor  # text embedding [B, T, C_text]
    negative: torch.Tensor  # negative-prompt embedding (Table 8), [T', C_text] or [B, T', C_text]

    def __post_init__(self):
        if self.latents.ndim != 5:
            raise ValueError(f"latents must be [B, C, F, H, W], got shape {tuple(self.latents.shape)}")
        if self.context.ndim != 3 or self.context.shape[0] != self.latents.shape[0]:
            raise ValueError(
                f"context must be [B={self.latents.shape[0]}, T, C], got shape {tuple(self.context.shape)}"
            )


def randn_like(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Gaussian noise shaped like x from `gen` (the trainer derives it from seed, step, role and DP rank, so
    TP/CP ranks of one sample draw the same noise)."""
    return torch.randn(x.shape, generator=gen, device=gen.device, dtype=x.dtype).to(x.device)
