"""The total derivative d/ds u(y_s, s, r) along (dy_s/ds, ds/ds) = (v, 1) (Eq. 10, App. A.2).

`fd_total_derivative` is the production path: a central difference with step δ (one-sided at the bounds),
two evaluations of u under no_grad, so it works with any attention kernel, FSDP or context/pipeline
parallelism. `exact_total_derivative` (torch.func.jvp, forward-mode AD) is the reference for tests and the
benchmark; it needs the math SDPA kernel on CPU (fused kernels have no forward-mode rule).

`u_fn(y, s) -> u` should re-run only the flow head on fixed backbone features.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .timesteps import per_sample

UFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def fd_steps(
    s: torch.Tensor, r: torch.Tensor, delta: float, lo: float = 0.0, hi: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample steps (h₊, h₋): central (δ, δ) inside [lo, hi], one-sided where s ± δ leaves it.

    The backward point must also stay at or above r (a flow map u(·, s', r) with s' < r runs backwards, where
    the model is never trained), except for r = s samples whose derivative term is multiplied by s − r = 0.
    If neither side fits, the forward step is used.
    """
    if delta <= 0:
        raise ValueError(f"finite-difference step must be positive, got {delta}")
    plus_ok = s + delta <= hi
    minus_ok = (s - delta >= lo) & ((s - delta >= r) | (s == r))
    plus_ok = plus_ok | ~minus_ok
    zero = torch.zeros_like(s)
    return torch.where(plus_ok, zero + delta, zero), torch.where(minus_ok, zero + delta, zero)


@torch.no_grad()
def fd_total_derivative(
    u_fn: UFn, y_s: torch.Tensor, s: torch.Tensor, v: torch.Tensor, h_plus: torch.Tensor, h_minus: torch.Tensor
) -> torch.Tensor:
    """[u(y_s + h₊v, s + h₊) − u(y_s − h₋v, s − h₋)] / (h₊ + h₋) (App. A.2); difference taken in float64."""
    u_plus = u_fn(y_s + per_sample(h_plus, y_s) * v, s + h_plus)
    u_minus = u_fn(y_s - per_sample(h_minus, y_s) * v, s - h_minus)
    return fd_difference(u_plus, u_minus, h_plus, h_minus)


def fd_difference(u_plus: torch.Tensor, u_minus: torch.Tensor, h_plus: torch.Tensor, h_minus: torch.Tensor):
    """(u₊ − u₋)/(h₊ + h₋), taken in float64 (the two evaluations nearly cancel)."""
    width = per_sample(h_plus + h_minus, u_plus.double())
    return ((u_plus.double() - u_minus.double()) / width).to(u_plus.dtype)


@torch.no_grad()
def exact_total_derivative(u_fn: UFn, y_s: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Forward-mode JVP of u_fn at (y_s, s) along (v, 1): the exact reference for the finite difference."""
    with sdpa_kernel([SDPBackend.MATH]):
        _, du = torch.func.jvp(u_fn, (y_s, s), (v.to(y_s.dtype), torch.ones_like(s)))
    return du


def fd_precision(fd_dtype: str, device: torch.device):
    """Where the finite-difference passes run: autocast off ("fp32") or the caller's autocast ("compute")."""
    if fd_dtype == "fp32":
        return torch.autocast(device_type=torch.device(device).type, enabled=False)
    return contextlib.nullcontext()


def total_derivative(
    u_fn: UFn, y_s, s, r, v, method: str = "fd", delta: float = 5e-3, lo: float = 0.0, hi: float = 1.0
) -> torch.Tensor:
    """d/ds u(y_s, s, r) along (v, 1) by finite differences ("fd", default) or exactly ("exact")."""
    if method == "fd":
        h_plus, h_minus = fd_steps(s, r, delta, lo, hi)
        return fd_total_derivative(u_fn, y_s, s, v, h_plus, h_minus)
    if method == "exact":
        return exact_total_derivative(u_fn, y_s, s, v)
    raise ValueError(f"unknown JVP method {method!r}; choose 'fd' or 'exact'")
