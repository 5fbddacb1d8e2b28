"""Outer and inner flows of transition matching (paper Eq. 1, 3–5, 13–15, 17, 18, App. B.4).

Pure functions of tensors, plus `inner_flow`, the N-step flow-head rollout (Algorithm 1's INNERFLOW) that
both the TMD sampler and the stage-2 generator use. Times are [B] tensors in [0, 1].
"""
from __future__ import annotations

import torch

from .timesteps import per_sample

ROLLOUT_FORMS = ("outer", "eq15")


def interpolate(clean: torch.Tensor, noise: torch.Tensor, t_B: torch.Tensor) -> torch.Tensor:
    """Eq. 1 / Eq. 5: x_t = (1 − t)·x + t·x_1 (also y_s = (1 − s)·y + s·y_1)."""
    t = per_sample(t_B, clean)
    return (1 - t) * clean + t * noise


def inner_target(x: torch.Tensor, x1: torch.Tensor, target: str = "dtm") -> torch.Tensor:
    """The inner flow's target y: Eq. 3 (DTM) y = x_1 − x, or App. B.4 y = x."""
    if target == "dtm":
        return x1 - x
    if target == "x":
        return x
    raise ValueError(f"unknown inner target {target!r}; choose 'dtm' or 'x'")


def conditional_velocity(clean: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """d/dt of Eq. 1 (and of Eq. 5, Algorithm 2's v = y_1 − y): noise − clean."""
    return noise - clean


def x0_from_velocity(x_t: torch.Tensor, t_B: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Eq. 17: g(x_t, t) = x_t − t·v(x_t, t), the data prediction of a velocity model."""
    return x_t - per_sample(t_B, x_t) * v


def average_velocity(
    head: torch.Tensor,
    *,
    y_s: torch.Tensor,
    y1: torch.Tensor | None,
    s: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    target: str = "dtm",
) -> torch.Tensor:
    """u_θ(y_s, s, r; m) from the head output.

    DTM (Eq. 14): u = y_1 − head; y_1 is the inner flow's starting noise, known throughout the rollout.
    x target (App. B.4): u = (y_s − (x_t − t·head))/s.
    Both are affine in head with head ≈ the teacher's velocity at initialisation.
    """
    if target == "dtm":
        return y1 - head
    if target == "x":
        return (y_s - x0_from_velocity(x_t, t, head)) / per_sample(s, y_s)
    raise ValueError(f"unknown inner target {target!r}; choose 'dtm' or 'x'")


def flow_map_step(y_s: torch.Tensor, s: torch.Tensor, r: torch.Tensor, u: torch.Tensor, sign: int = -1) -> torch.Tensor:
    """Eq. 13 flow map f(y_s, s, r) = y_s + sign·(s − r)·u.

    sign = −1 (default) is the reading consistent with Eq. 5/8 and Algorithm 1: u is the average of
    dy/ds = y_1 − y over [r, s], so moving from s down to r subtracts (s − r)·u; one step from s = 1 to r = 0
    returns head itself. sign = +1 is Eq. 13 as printed (it inherits Eq. 7's sign slip).
    """
    if sign not in (-1, 1):
        raise ValueError(f"flow map sign must be -1 or +1, got {sign}")
    return y_s + sign * per_sample(s - r, y_s) * u


def outer_step(x_t: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, y_hat: torch.Tensor, target: str = "dtm"):
    """One outer transition x_{t_i} -> x_{t_{i−1}} from the inner flow's result ŷ.

    DTM: Eq. 4, x_{t_{i−1}} = x_{t_i} − (t_i − t_{i−1})·ŷ.
    x target: the deterministic step of Eq. 18 with ŷ as the data prediction (`ddim_step`).
    """
    if target == "dtm":
        return x_t - per_sample(t - t_next, x_t) * y_hat
    if target == "x":
        return ddim_step(x_t, t, t_next, y_hat)
    raise ValueError(f"unknown inner target {target!r}; choose 'dtm' or 'x'")


def ddim_step(x_t: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, x0_hat: torch.Tensor) -> torch.Tensor:
    """Eq. 18, deterministic multi-step sampling: x_{t'} = (t'/t)·x_t + (1 − t'/t)·g.

    The noise x_1 = (x_t − (1 − t)g)/t is inferred from g and x_t and re-used. (Eq. 18 as printed swaps the two
    coefficients; that version would return x_t unchanged at t' = 0, so it cannot be meant.)
    """
    ratio = per_sample(t_next / t, x_t)
    return ratio * x_t + (1 - ratio) * x0_hat


def rollout_output(
    x_t: torch.Tensor, t: torch.Tensor, y_hat: torch.Tensor, target: str = "dtm", form: str = "outer", x1=None
) -> torch.Tensor:
    """The unrolled student's sample x̂ = g_θ(x_{t_i}, t_i; y_1) (Eq. 15).

    form="outer" (default): x̂ = x_{t_i} − t_i·ŷ, Algorithm 1's update all the way to t = 0; it equals Eq. 17
    when ŷ is a velocity, so TMD with a teacher-initialised head starts as DMD2-v.
    form="eq15": x̂ = x_1 − ŷ as printed, with the true noise x_1 that made x_{t_i}; agrees at t_i = 1 only.
    x target: x̂ = ŷ.
    """
    if target == "x":
        return y_hat
    if form == "outer":
        return x0_from_velocity(x_t, t, y_hat)
    if form == "eq15":
        if x1 is None:
            raise ValueError("rollout form 'eq15' needs the noise x1 that produced x_t")
        return x1 - y_hat
    raise ValueError(f"unknown rollout form {form!r}; choose one of {ROLLOUT_FORMS}")


def inner_noise(y1: torch.Tensor, cond, target: str = "dtm") -> torch.Tensor:
    """The inner flow's starting noise y_1, pinned on a TI2V conditioning frame (cond: the batch's image
    conditioning or None) to the inner target's value there: 0 for y = x_1 − x (whose noise is pinned too), the
    clean latent for y = x."""
    if cond is None:
        return y1
    return cond.pin(y1, torch.zeros_like(y1) if target == "dtm" else cond.latent)


def inner_flow(student, features, y1: torch.Tensor, inner_grid: torch.Tensor, head=None,
               grad_steps: str = "all") -> torch.Tensor:
    """INNERFLOW(m) of Algorithm 1: y = y_1, then y ← f_θ(y, s_j, s_{j−1}; m) for j = N..1; returns ŷ.

    Differentiable (stage 2 back-propagates through all N steps, Sec. 3.2); call under no_grad to sample.
    grad_steps="last": the first N − 1 steps run without gradient and only the last step is differentiated (DMD2's
    "backward simulation" with the trajectory detached; the ablation of Sec. 4's "flow head rollout", Fig. 7).
    head(y, k, s, r) -> head output of inner step k = 0..N−1 (default: student.flow_head(y, s, r, features));
    the pipelined trainer passes one that uses conditioning computed on the first stage.
    """
    target, sign = student.config.target, student.config.flow_map_sign
    batch = y1.shape[0]
    if head is None:
        def head(y_in, k, s_in, r_in):
            return student.flow_head(y_in, s_in, r_in, features)
    if grad_steps not in ("all", "last"):
        raise ValueError(f"grad_steps={grad_steps!r}; choose 'all' or 'last'")
    y = y1
    steps = list(enumerate(range(len(inner_grid) - 1, 0, -1)))
    for k, j in steps:
        s = inner_grid[j].expand(batch).to(y1.device)
        r = inner_grid[j - 1].expand(batch).to(y1.device)
        with torch.set_grad_enabled(torch.is_grad_enabled() and (grad_steps == "all" or k == len(steps) - 1)):
            u = average_velocity(head(y, k, s, r), y_s=y, y1=y1, s=s, x_t=features.x_t, t=features.t,
                                 target=target)
            y = flow_map_step(y, s, r, u, sign)
    return y
