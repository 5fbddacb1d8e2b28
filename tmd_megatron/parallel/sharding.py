"""Full (single-device) state dict <-> per-rank shards, so a checkpoint written under one layout loads into
another. TP shards are equal chunks along the dim each parallel module names in `tp_split`; PP stages hold
the parameters of their blocks (plus embeddings on the first stage, head on the last). Names are the
original Wan2.1 keys everywhere. Transformer Engine's `_extra_state` entries carry no weights and are skipped.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from . import comm
from .topology import Topology


def tp_split_dims(model: nn.Module) -> dict[str, int]:
    """{parameter name: dim it is split along across TP} for every TP-sharded parameter."""
    dims = {}
    for mod_name, mod in model.named_modules():
        for pname, dim in getattr(mod, "tp_split", {}).items():
            dims[f"{mod_name}.{pname}" if mod_name else pname] = dim
    return dims


def _weights(state: Mapping) -> list[str]:
    return [k for k in state.keys() if not k.endswith("_extra_state")]


def shard_tensor(full: torch.Tensor, dim: int, tp: int, tp_rank: int) -> torch.Tensor:
    if full.shape[dim] % tp:
        raise ValueError(f"cannot split size {full.shape[dim]} (dim {dim}) into {tp} tensor-parallel shards")
    n = full.shape[dim] // tp
    return full.narrow(dim, tp_rank * n, n)


def local_state_from_full(model: nn.Module, full: Mapping, tp: int, tp_rank: int) -> dict[str, torch.Tensor]:
    """This rank's shard of every tensor `model` holds, read from a full state dict (only needed keys are read)."""
    dims = tp_split_dims(model)
    names = _weights(model.state_dict())
    missing = [n for n in names if n not in full]
    if missing:
        raise KeyError(f"full state dict lacks {len(missing)} tensors this stage needs, e.g. {missing[:3]}")
    return {n: shard_tensor(full[n], dims[n], tp, tp_rank) if n in dims else full[n] for n in names}


def load_full_state(model: nn.Module, full: Mapping, topo: Topology) -> None:
    local = local_state_from_full(model, full, topo.tp.size, topo.tp.rank)
    expected = model.state_dict()
    for name, t in local.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise ValueError(f"{name}: shard shape {tuple(t.shape)} != model shape {tuple(expected[name].shape)}")
    model.load_state_dict(local, strict=False)


def gather_full_state(model: nn.Module, topo: Topology, dst: int | None = None) -> dict[str, torch.Tensor] | None:
    """The full state dict (CPU tensors): TP shards all-gathered, PP stages' subsets exchanged.

    dst=None: on every rank (small models, tests). dst=0: on world rank 0 only, and held in host memory nowhere
    else -- the export of a 14B model would otherwise put 56 GB on every rank. Only the data- and context-
    parallel replica 0 takes part (every replica holds the same weights); each TP shard is gathered one tensor
    at a time and kept by TP rank 0, and the stages' TP rank 0 send their part to rank 0 over its PP group.
    """
    if dst not in (None, 0):
        raise ValueError(f"dst={dst}: the full state gathers on every rank (None) or on world rank 0")
    if dst == 0 and (topo.dp.rank or topo.cp.rank):
        return None
    keep = dst is None or topo.tp.rank == 0
    dims = tp_split_dims(model)
    state = model.state_dict()
    mine = {}
    for name in _weights(state):
        t = state[name].detach()
        if name in dims:
            t = comm.all_gather(t, topo.tp, dims[name])
        if keep:
            mine[name] = t.cpu().clone()
    if not keep:
        return None
    parts = comm.all_gather_object(mine, topo.pp) if dst is None else comm.gather_object(mine, topo.pp)
    if parts is None:
        return None
    full = {}
    for part in parts:
        full.update(part)
    return full


def merge_tp_shards(shards: list[Mapping], dims: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """Offline: one stage's TP shards (in tp-rank order) -> its full tensors."""
    out = {}
    for name in _weights(shards[0]):
        parts = [s[name] for s in shards]
        out[name] = torch.cat(parts, dim=dims[name]) if name in dims else parts[0]
    return out


def split_tp_shards(full: Mapping, names, dims: Mapping[str, int], tp: int) -> list[dict[str, torch.Tensor]]:
    """Offline: a stage's tensors (`names`) from a full state dict -> TP shards in tp-rank order."""
    return [{n: shard_tensor(full[n], dims[n], tp, r) if n in dims else full[n] for n in names} for r in range(tp)]
