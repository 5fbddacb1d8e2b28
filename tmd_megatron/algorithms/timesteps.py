"""Time grids, the time shift and time sampling (paper Sec. 3.2, App. A.2, Table 7).

Algorithms work with t ∈ [0, 1] (t = 1 is noise, Eq. 1); only the model boundary converts to Wan's
1000·t units (`wan_units`). Time tensors are float64 ([B] per sample) like the paper ("time t in FP64");
`per_sample` broadcasts them against a latent in the latent's dtype.
"""
from __future__ import annotations

import torch

from .common import rand, randint

T_DTYPE = torch.float64


def wan_units(t_B: torch.Tensor) -> torch.Tensor:
    """Wan timesteps (units of 1000·t) for t ∈ [0, 1]."""
    return 1000.0 * t_B


def per_sample(t_B: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] times as [B, 1, ..., 1] in `like`'s dtype and device, for element-wise latent arithmetic."""
    return t_B.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def shift_time(t: torch.Tensor, gamma: float) -> torch.Tensor:
    """The time shift t = γt'/((γ−1)t'+1) of Sec. 3.2; γ > 1 moves mass towards t = 1 (noise)."""
    if gamma <= 0:
        raise ValueError(f"time shift gamma must be positive, got {gamma}")
    return gamma * t / ((gamma - 1.0) * t + 1.0)


def unshift_time(t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Inverse of `shift_time`: t' = t/(γ − (γ−1)t)."""
    return t / (gamma - (gamma - 1.0) * t)


def student_grid(steps: int, gamma: float, t_max: float = 0.999, device=None) -> torch.Tensor:
    """Grid 0 = t_0 < t_1 < ... < t_steps = t_max: shifted uniform points i/steps, top replaced by t_max.

    Used for the outer grid (t_student, M steps, γ = 10) and the inner grid (s_student, N steps, γ = 10).
    The paper sets t_M = s_N = 0.999 "instead of 1 to align with the pretraining of Wan" (App. A.2,
    footnote 2); we read that as replacing the top point only (the inner points stay shift(i/steps)).
    """
    if steps < 1:
        raise ValueError(f"a time grid needs at least one step, got steps={steps}")
    if not 0.0 < t_max <= 1.0:
        raise ValueError(f"grid top t_max must be in (0, 1], got {t_max}")
    grid = shift_time(torch.linspace(0.0, 1.0, steps + 1, dtype=T_DTYPE, device=device), gamma)
    grid[-1] = t_max
    if steps > 1 and grid[-2] >= t_max:
        raise ValueError(f"t_max={t_max} is not above the next grid point {float(grid[-2]):.6f}; lower gamma")
    return grid


def wan_sampling_grid(steps: int = 50, shift: float = 5.0, device=None) -> torch.Tensor:
    """The original Wan sampler's σ grid (WAN_SPEC §4): shift(linspace(0.999, 0, steps+1)), ascending."""
    base = torch.linspace(0.0, 0.999, steps + 1, dtype=T_DTYPE, device=device)
    return shift_time(base, shift)


def uniform(n: int, gen: torch.Generator, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    return lo + (hi - lo) * rand(n, gen, T_DTYPE)


def sample_shifted(n: int, gamma: float, gen: torch.Generator, lo: float = 0.001, hi: float = 0.999) -> torch.Tensor:
    """t_dmd and s_mf: shift(u) for uniform u, truncated to [lo, hi] (Table 7 "min./max.").

    Truncation is by inverse CDF (u uniform on [shift⁻¹(lo), shift⁻¹(hi)]), i.e. the shifted law conditioned
    on [lo, hi]: no point mass at the bounds, unlike clamping.
    """
    if not 0.0 <= lo < hi <= 1.0:
        raise ValueError(f"time bounds must satisfy 0 <= lo < hi <= 1, got lo={lo}, hi={hi}")
    lo_u = float(unshift_time(torch.tensor(lo, dtype=T_DTYPE), gamma))
    hi_u = float(unshift_time(torch.tensor(hi, dtype=T_DTYPE), gamma))
    return shift_time(uniform(n, gen, lo_u, hi_u), gamma)


def sample_grid_times(n: int, grid: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """t_i ~ Unif{t_1, ..., t_M} (Algorithm 2): the outer noise levels training visits (never t_0 = 0)."""
    idx = randint(1, len(grid), n, gen)
    return grid.to(gen.device)[idx]


def grid_floor(s: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """r = s_k with k = max{j : s_j <= s} (App. A.2)."""
    grid = grid.to(device=s.device, dtype=s.dtype)
    k = torch.searchsorted(grid, s, right=True) - 1
    return grid[k.clamp(min=0)]


def sample_mf_times(
    n: int,
    inner_grid: torch.Tensor,
    gen: torch.Generator,
    s_shift: float = 3.0,
    r_equals_s: float = 0.75,
    lo: float = 0.001,
    hi: float = 0.999,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TM-MF's discrete (s, r) (App. A.2): s = s_mf shifted (γ = 3) in [lo, hi]; r = the inner-grid point at
    or below s, except r = s for a `r_equals_s` fraction of the samples (Bernoulli per sample, so it holds on
    every data-parallel rank whatever the per-rank batch)."""
    s = sample_shifted(n, s_shift, gen, lo, hi)
    r = grid_floor(s, inner_grid)
    same = rand(n, gen) < r_equals_s
    return s, torch.where(same.to(s.device), s, r)


def is_student_step(iteration: int, every: int = 5) -> bool:
    """DMD2 alternation (Table 7 "student update frequency"): the student updates on iterations 0, 5, 10, ...;
    the fake score and discriminator on all others."""
    return iteration % every == 0
