"""What every training step takes: the data batch, and its randomness.

Randomness comes from a caller-owned source: a `torch.Generator` (one stream for the whole batch), or a
`SampleRNG` (one stream per sample). With SampleRNG every sample's draws depend on its own seed alone, so a
step gives the same result however the batch is split over data-parallel ranks and microbatches; the
trainer always uses it. All draws go through `randn`, `rand` and `randint` below.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    latents: torch.Tensor  # clean video latents x [B, C, F, H, W]
    context: torch.Tensor  # text embedding [B, T, C_text]
    negative: torch.Tensor  # negative-prompt embedding (Table 8), [T', C_text] or [B, T', C_text]
    cond: object = None  # image conditioning (models/wan/conditioning.ImageCondition) or None for text only

    def __post_init__(self):
        if self.latents.ndim != 5:
            raise ValueError(f"latents must be [B, C, F, H, W], got shape {tuple(self.latents.shape)}")
        if self.context.ndim != 3 or self.context.shape[0] != self.latents.shape[0]:
            raise ValueError(
                f"context must be [B={self.latents.shape[0]}, T, C], got shape {tuple(self.context.shape)}"
            )


class SampleRNG:
    """One generator per sample of a batch, seeded by the caller (e.g. from seed, step, role, sample index)."""

    def __init__(self, seeds, device="cpu"):
        self.device = torch.device(device)
        self.gens = [torch.Generator(self.device).manual_seed(int(s)) for s in seeds]

    def __len__(self) -> int:
        return len(self.gens)

    def _check(self, n: int) -> None:
        if n != len(self.gens):
            raise ValueError(f"a draw for {n} samples from a SampleRNG of {len(self.gens)} samples")


def randn(shape, gen, dtype=torch.float32) -> torch.Tensor:
    """Standard normal of `shape` ([B, ...]) on gen's device."""
    if isinstance(gen, SampleRNG):
        gen._check(shape[0])
        return torch.stack([torch.randn(tuple(shape[1:]), generator=g, dtype=dtype, device=gen.device) for g in gen.gens])
    return torch.randn(tuple(shape), generator=gen, dtype=dtype, device=gen.device)


def rand(n: int, gen, dtype=torch.float32) -> torch.Tensor:
    """[n] uniform on [0, 1)."""
    if isinstance(gen, SampleRNG):
        gen._check(n)
        return torch.cat([torch.rand(1, generator=g, dtype=dtype, device=gen.device) for g in gen.gens])
    return torch.rand(n, generator=gen, dtype=dtype, device=gen.device)


def randint(low: int, high: int, n: int, gen) -> torch.Tensor:
    """[n] integers in [low, high)."""
    if isinstance(gen, SampleRNG):
        gen._check(n)
        return torch.cat([torch.randint(low, high, (1,), generator=g, device=gen.device) for g in gen.gens])
    return torch.randint(low, high, (n,), generator=gen, device=gen.device)


def randn_like(x: torch.Tensor, gen) -> torch.Tensor:
    """Gaussian noise shaped like x (one sample per row of x)."""
    return randn(x.shape, gen, x.dtype).to(x.device)


def pinned_noise(like: torch.Tensor, gen, cond=None) -> torch.Tensor:
    """Gaussian noise shaped like the clean `like`; with image conditioning, a TI2V conditioning frame takes the
    clean value (models/wan/conditioning.py: the frame is a fixed point of the flow). Draws as randn_like."""
    noise = randn_like(like, gen)
    return noise if cond is None else cond.pin(noise, like)
