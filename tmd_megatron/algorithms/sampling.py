"""Samplers (paper Algorithm 1, Eq. 16, 18) and a block-evaluation counter for the effective NFE.

All samplers start from Gaussian noise taken as the state at the top of their grid (t_M = 0.999) and run
under no_grad. Grids are ascending time tensors (timesteps.student_grid / wan_sampling_grid). With image
conditioning (cond), every model call sees it; a TI2V first frame is pinned in the noise and never changes.
"""
from __future__ import annotations

import torch

from .common import randn_like
from .guidance import guided_velocity, wan_velocity
from .timesteps import per_sample
from .transition import ddim_step, inner_flow, inner_noise, outer_step, x0_from_velocity


def _times(grid: torch.Tensor, i: int, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    return grid[i].expand(batch).to(device), grid[i - 1].expand(batch).to(device)


def start_noise(noise: torch.Tensor, cond) -> torch.Tensor:
    """The sampler's initial state: the noise, with a TI2V conditioning frame pinned to its clean latent."""
    return noise if cond is None else cond.pin(noise, cond.latent.to(noise))


@torch.no_grad()
def teacher_euler_sample(
    teacher, noise, context, grid, negative=None, cfg_scale: float = 1.0, skip_layers: tuple[int, ...] = (),
    cond=None,
) -> torch.Tensor:
    """The teacher's flow ODE by Euler steps on `grid`, with CFG against the negative prompt if cfg_scale != 1."""
    if cfg_scale != 1.0 and negative is None:
        raise ValueError("CFG needs the negative-prompt embedding; pass negative= or cfg_scale=1")
    x = start_noise(noise, cond)
    for i in range(len(grid) - 1, 0, -1):
        t, t_next = _times(grid, i, x.shape[0], x.device)
        v = guided_velocity(teacher, x, t, context, negative, cfg_scale, skip_layers, cond)
        x = x - per_sample(t - t_next, x) * v
    return x


@torch.no_grad()
def dmd2v_sample(student, noise, context, grid, cond=None) -> torch.Tensor:
    """DMD2-v deterministic multi-step sampling (Eq. 18) with the Eq. 17 student g = x_t − t·v."""
    x = start_noise(noise, cond)
    for i in range(len(grid) - 1, 0, -1):
        t, t_next = _times(grid, i, x.shape[0], x.device)
        v, _ = wan_velocity(student, x, t, context, cond=cond)
        x = ddim_step(x, t, t_next, x0_from_velocity(x, t, v))
    return x


@torch.no_grad()
def tmd_sample(student, noise, context, outer_grid, inner_grid, gen: torch.Generator, cond=None) -> torch.Tensor:
    """Algorithm 1: per outer step one backbone pass, then N flow-head steps from fresh noise y_1."""
    x = start_noise(noise, cond)
    for i in range(len(outer_grid) - 1, 0, -1):
        t, t_next = _times(outer_grid, i, x.shape[0], x.device)
        features = student.backbone(x, t, context, cond)
        y1 = inner_noise(randn_like(x, gen), cond, student.config.target)
        y_hat = inner_flow(student, features, y1, inner_grid)
        x = outer_step(x, t, t_next, y_hat, student.config.target)
    return x


def effective_nfe(outer_steps: int, inner_steps: int, head_blocks: int, num_blocks: int) -> float:
    """Eq. 16: M·(1 + (N − 1)·H/L), the DiT blocks run per sample divided by L."""
    return outer_steps * (1 + (inner_steps - 1) * head_blocks / num_blocks)


class BlockCounter:
    """Counts forward calls of a Wan model's blocks (a context manager installing forward hooks)."""

    def __init__(self, wan_model):
        experts = getattr(wan_model, "experts", None)  # a two-expert model: the blocks of both (one runs per sample)
        self.blocks = [b for m in experts for b in m.blocks] if experts else list(wan_model.blocks)
        self.num_blocks = wan_model.config.num_layers
        self.calls = 0
        self._handles = []

    def _hook(self, module, args, output):
        self.calls += 1

    def __enter__(self) -> "BlockCounter":
        self._handles = [b.register_forward_hook(self._hook) for b in self.blocks]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def nfe(self) -> float:
        """Block evaluations over the number of blocks: the measured effective NFE of one (batched) run."""
        return self.calls / self.num_blocks
