"""Data parallelism: gradient reduction over DP x CP and a ZeRO-1 AdamW (optimizer state sharded over DP x CP).

Gradient semantics (tensor.py, layout.py): after backward, every parameter's gradient is partial over the CP
ranks (each saw its token chunk) and, under sequence parallelism, TP-replicated parameters' gradients are
partial over TP too. Each rank's loss is the mean over its local samples. So: sum TP-partial gradients over
TP, then reduce-scatter over DP x CP (sum) and divide by the DP size. Modules computed identically on every
CP/TP rank (e.g. a discriminator on merged features) have full gradients: pass them to `replicated`.

Why ZeRO-1 and not FSDP2 (docs/parallel.md has the measurement): per step ZeRO-1 moves each parameter twice
(reduce-scatter of gradients, all-gather of parameters) however many pipeline microbatches run, while FSDP2
re-gathers parameters per forward and backward of every microbatch; our TP layers are not DTensors, and the
CP sum would need a separate all-reduce with FSDP2 over DP.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from . import comm
from .sharding import tp_split_dims
from .topology import Topology

GRAD_NORM_CHUNK = 1 << 20  # elements per fp64 partial sum of the gradient norm (8 MiB of temporaries)


def tp_partial_names(model: nn.Module) -> set[str]:
    """Parameters whose gradients are partial over TP: the TP-replicated ones when sequence parallel is on."""
    layout = getattr(model, "layout", None)
    if not getattr(layout, "sequence_parallel", False):
        return set()
    split = tp_split_dims(model)
    return {n for n, _ in model.named_parameters() if n not in split}


class _Bucket:
    """Parameters sharing a weight decay and TP placement, flattened; this rank owns one equal slice."""

    def __init__(self, named: list[tuple[str, nn.Parameter]], group: comm.CommGroup, tp_replicated: bool):
        self.named, self.group, self.tp_replicated = named, group, tp_replicated
        self.numel = sum(p.numel() for _, p in named)
        self.shard_len = -(-self.numel // group.size)
        self.start = group.rank * self.shard_len
        # fp32 master weights (fp64 stays fp64)
        self.dtype = torch.promote_types(named[0][1].dtype, torch.float32)
        flat = self.flat([p.detach() for _, p in named])
        self.master = nn.Parameter(flat[self.start : self.start + self.shard_len].clone())

    def flat(self, tensors: Iterable[torch.Tensor]) -> torch.Tensor:
        """The tensors in bucket order, zero-padded to a whole number of shards, in one allocation (cat + pad
        held two copies of the bucket at the step's memory peak)."""
        tensors = list(tensors)
        out = torch.empty(self.shard_len * self.group.size, dtype=self.dtype, device=tensors[0].device)
        offset = 0
        for t in tensors:
            out[offset : offset + t.numel()].copy_(t.reshape(-1))
            offset += t.numel()
        out[offset:].zero_()
        return out

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        out, offset = {}, 0
        for name, p in self.named:
            out[name] = flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        return out


class ZeroAdamW:
    """AdamW whose fp32 master weights and moments are sharded over DP x CP (ZeRO stage 1).

    Per step: `reduce_grads()` after the last backward, optionally `clip_grad_norm(max)`, then `step()`.
    Param groups: parameters matching `no_decay` (substring of the name) get weight decay 0.
    """

    def __init__(
        self,
        model: nn.Module,
        topo: Topology,
        lr: float = 1e-4,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        no_decay: Iterable[str] = (),
        replicated: Iterable[str] = (),
        skip: Iterable[str] = (),
    ):
        """skip: parameters this optimizer leaves alone (e.g. a tied copy whose owner it updates)."""
        self.topo = topo
        self.group = topo.dp_cp
        skip = set(skip)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and n not in skip]
        self.tp_partial = tp_partial_names(model) - set(replicated)
        self.replicated = set(replicated)
        split = tp_split_dims(model)
        no_decay = tuple(no_decay)
        buckets: dict[tuple[bool, bool], list] = {}
        for n, p in named:
            decay = weight_decay > 0 and not any(s in n for s in no_decay)
            buckets.setdefault((decay, n not in split), []).append((n, p))
        self.buckets = [_Bucket(v, self.group, tp_rep) for (_, tp_rep), v in sorted(buckets.items())]
        groups = [
            {"params": [b.master], "weight_decay": weight_decay if decay else 0.0}
            for b, (decay, _) in zip(self.buckets, sorted(buckets))
        ]
        self.optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=False)
        self._params = dict(named)

    def zero_grad(self) -> None:
        for p in self._params.values():
            p.grad = None

    def reduce_grads(self) -> None:
        """TP sum of TP-partial gradients, then reduce-scatter over DP x CP into each bucket's owned slice."""
        partial = [p for n, p in self._params.items() if n in self.tp_partial and p.grad is not None]
        if partial and self.topo.tp.size > 1:
            flat = comm.all_reduce(torch.cat([p.grad.reshape(-1) for p in partial]), self.topo.tp)
            offset = 0
            for p in partial:
                p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
        dp, cp = self.topo.dp.size, self.topo.cp.size
        for b in self.buckets:
            b.master.grad = None  # the last step's reduced gradient would coexist with the new flat bucket
            flat = b.flat(p.grad if p.grad is not None else torch.zeros_like(p) for _, p in b.named)
            if self.replicated and cp > 1:  # full on every CP rank: the CP sum would count them cp times
                for name, view in b.unflatten(flat).items():
                    if name in self.replicated:
                        view.div_(cp)
            # scaled in place: copies of the gradients here were the step's memory peak under TP
            shard = comm.reduce_scatter(flat, self.group)
            del flat
            b.master.grad = shard.div_(dp) if dp > 1 else shard

    def grad_norm(self) -> torch.Tensor:
        """Global L2 norm of the reduced gradients over the whole model (all stages, TP shards counted once)."""
        sq = torch.zeros((), dtype=torch.float64, device=self.topo.device)
        for b in self.buckets:
            if b.master.grad is not None and (not b.tp_replicated or self.topo.tp.rank == 0):
                # fp64 sums in chunks: a whole-bucket .double().pow(2) held 4x the bucket's bytes in temporaries,
                # the step's memory peak (docs/benchmarks.md, planner vs measured)
                for chunk in b.master.grad.split(GRAD_NORM_CHUNK):
                    sq = sq + chunk.double().pow(2).sum()
        return comm.all_reduce(sq, self.topo.world).sqrt()

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        norm = self.grad_norm()
        scale = max_norm / (norm + 1e-6)
        if scale < 1:
            for b in self.buckets:
                b.master.grad.mul_(scale)
        return norm

    def step(self) -> None:
        self.optimizer.step()
        with torch.no_grad():
            for b in self.buckets:
                full = comm.all_gather(b.master.detach(), self.group)
                for name, value in b.unflatten(full).items():
                    self._params[name].copy_(value)

    def reduced_grads(self) -> dict[str, torch.Tensor]:
        """The reduced (DP-averaged) gradient of every local parameter (all-gathers the slices; for checks)."""
        out = {}
        for b in self.buckets:
            out.update(b.unflatten(comm.all_gather(b.master.grad, self.group)))
        return out

    def state_dict(self) -> dict:
        """This rank's slices (master weights and AdamW moments); restore into the same layout."""
        return {"master": [b.master.detach().clone() for b in self.buckets], "adamw": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if len(state["master"]) != len(self.buckets):
            raise ValueError("optimizer state has a different bucket structure (another layout or model)")
        with torch.no_grad():
            for b, m in zip(self.buckets, state["master"]):
                b.master.copy_(m)
        self.optimizer.load_state_dict(state["adamw"])
