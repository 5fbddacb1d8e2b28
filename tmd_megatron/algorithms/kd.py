"""KD warm-up for one-step students (paper Sec. 3.2, Table 4, Table 7 "Baselines: KD").

The teacher's ODE (Euler, CFG 5 against the negative prompt, block 10 skipped in the unconditional pass)
maps noise to data; the one-step student regresses its Eq. 17 output at t_M on the teacher's endpoint.
"""
from __future__ import annotations

import torch

from .config import KDConfig
from .dmd2v import DMD2vConfig, StudentInput, generate
from .sampling import teacher_euler_sample
from .timesteps import shift_time


def kd_teacher_grid(cfg: KDConfig) -> torch.Tensor:
    """The teacher's sampling grid for KD pairs: `teacher_steps` points of Wan's shifted schedule up to t_M."""
    base = torch.linspace(0.0, cfg.t_max, cfg.teacher_steps + 1, dtype=torch.float64)
    return shift_time(base, cfg.teacher_shift)


def teacher_ode_pairs(teacher, noise, context, negative, cfg: KDConfig, cond=None) -> torch.Tensor:
    """The data end x_0 of the teacher ODE started from `noise` (the pair is (noise, x_0))."""
    return teacher_euler_sample(
        teacher, noise, context, kd_teacher_grid(cfg), negative, cfg.cfg_scale, tuple(cfg.skip_layers), cond
    )


def kd_regression_loss(x_hat: torch.Tensor, x0_teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the student's one-step sample and the teacher's ODE endpoint."""
    return (x_hat.float() - x0_teacher.detach().float()).pow(2).mean()


def kd_loss(student, noise, x0_teacher, context, cfg: KDConfig, gen: torch.Generator | None = None, cond=None):
    """One KD step for a one-step student: x̂ = g(noise, t_M) (Eq. 17, or the rollout for a decoupled
    student), regressed on the teacher pair's endpoint."""
    t = torch.full((noise.shape[0],), cfg.t_max, dtype=torch.float64, device=noise.device)
    one_step = DMD2vConfig(outer_steps=1, t_max=cfg.t_max)
    x_hat = generate(student, StudentInput(noise, t, noise), context, one_step, gen, cond)
    loss = kd_regression_loss(x_hat, x0_teacher)
    return loss, {"kd_loss": loss.detach()}
