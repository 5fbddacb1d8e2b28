"""Optimizer pieces the trainer composes: AdamW groups, learning-rate schedule, EMA, non-finite guard."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist


def adamw(params, lr: float, weight_decay: float, betas, eps: float) -> torch.optim.AdamW:
    """AdamW (Table 7: wd 0.01, betas (0.9, 0.99), eps 1e-8); no decay on biases, norms and modulation."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2 and p.shape[0] > 1 and p.ndim != 3]
    ids = {id(p) for p in decay}
    no_decay = [p for p in params if id(p) not in ids]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # foreach=False keeps CPU runs bit-reproducible across resumes regardless of parameter grouping.
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=tuple(betas), eps=eps, foreach=False)


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str = "constant") -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup_steps) / span)))
    raise ValueError(f"unknown lr schedule {schedule!r}; use 'constant' or 'cosine'")


def set_lr(optimizer: torch.optim.Optimizer, base_lr: float, factor: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = base_lr * factor


class EMA:
    """Exponential moving average of a module's (local shard of) parameters, kept in fp32."""

    def __init__(self, module: torch.nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay {decay} must be in [0, 1)")
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        for n, p in module.named_parameters():
            if n in self.shadow:
                self.shadow[n].lerp_(p.detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        for n, p in module.named_parameters():
            if n in self.shadow:
                p.copy_(self.shadow[n].to(p.dtype))


def all_finite(values: list[torch.Tensor], group=None) -> bool:
    """True only if every rank's tensors are finite: all ranks must agree to skip a step together."""
    bad = torch.zeros((), dtype=torch.float32)
    for v in values:
        if v is not None and not torch.isfinite(v).all():
            bad.fill_(1.0)
            break
    if dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=group)
    return bool(bad.item() == 0.0)


class NonFiniteGuard:
    """Counts skipped steps; raises once more than `max_skipped` steps were non-finite."""

    def __init__(self, max_skipped: int):
        self.max_skipped = max_skipped
        self.skipped = 0

    def record_skip(self, step: int) -> None:
        self.skipped += 1
        if self.skipped > self.max_skipped:
            raise FloatingPointError(
                f"{self.skipped} steps had NaN/Inf losses or gradients (latest at step {step}), more than "
                f"run.max_skipped_steps={self.max_skipped}: lower the learning rate or check the data"
            )
