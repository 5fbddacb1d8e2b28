"""The flow head's patch embedding under pipeline parallelism: one parameter used on two stages.

The first stage embeds x_t with `wan.patch_embedding`; the last stage embeds the flow head's y_s with a copy
(`head_patch_embedding`). The copy's gradient is added to the original's before the optimizer (which updates
only the original), and the updated weights are copied back to the last stage: exactly one parameter.
"""
from __future__ import annotations

import torch
from torch import nn

from tmd_megatron.parallel import transfer

from .config import Resolved
from .roles import Roles


def _pair(roles: Roles, res: Resolved):
    if roles.topo.pp.size == 1 or res.student is None:
        return None
    student = roles.student
    first = student.wan.patch_embedding if roles.topo.is_first_stage else None
    last = student.head_patch_embedding if roles.topo.is_last_stage else None
    # every stage takes part in the transfers, so the others need the shapes
    shapes = first or last or nn.Conv3d(res.wan.in_dim, res.wan.dim, res.wan.patch_size, stride=res.wan.patch_size,
                                        device=roles.topo.device)
    return first, last, list(shapes.parameters())


def retie_weights(roles: Roles, res: Resolved) -> None:
    """Copy the first stage's patch embedding to the last stage (after an update or a load)."""
    pair = _pair(roles, res)
    if pair is None:
        return
    first, last, shapes = pair
    data = [p.data for p in shapes] if first is not None else [torch.empty_like(p) for p in shapes]
    got = transfer(data, roles.topo.pp, 0, roles.topo.pp.size - 1)
    if last is not None:
        with torch.no_grad():
            for p, v in zip(last.parameters(), got):
                p.copy_(v)


def sum_tied_grads(roles: Roles, res: Resolved) -> None:
    """Add the copy's gradient to the original's (first stage) and clear the copy's."""
    pair = _pair(roles, res)
    if pair is None:
        return
    first, last, shapes = pair
    grads = [p.grad if (last is not None and p.grad is not None) else torch.zeros_like(p) for p in shapes]
    got = transfer(grads, roles.topo.pp, roles.topo.pp.size - 1, 0)
    if first is not None:
        for p, g in zip(first.parameters(), got):
            p.grad = g.clone() if p.grad is None else p.grad + g
    if last is not None:
        for p in last.parameters():
            p.grad = None
