"""Every collective and point-to-point transfer of tmd_megatron.parallel, and the byte counter that sees them.

All parallel code calls the functions here (never torch.distributed directly), so `count_comm()` records
each call by (operation, group name). Byte conventions (docs/parallel.md, "Communication"):
  all_reduce: the tensor; all_gather: the gathered (full) output; reduce_scatter: the full input;
  all_to_all: the input; send / recv: each tensor sent / received by this rank.
Groups of size 1 do nothing and record nothing.
"""
from __future__ import annotations

import contextlib
import sys
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

# torch >= 2.13 renamed the tensor-in/tensor-out collectives; NGC images may carry an older torch.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass(frozen=True, eq=False)
class CommGroup:
    """A process group with the name the counter reports it under and this rank's place in it."""

    name: str
    ranks: tuple[int, ...]  # global ranks, in group-rank order
    rank: int  # this process's rank inside the group
    pg: object | None = field(default=None, repr=False)  # torch ProcessGroup; None for a virtual topology

    @property
    def size(self) -> int:
        return len(self.ranks)

    @classmethod
    def solo(cls, name: str, global_rank: int = 0) -> "CommGroup":
        return cls(name, (global_rank,), 0, None)

    def _pg(self):
        if self.pg is None:
            raise RuntimeError(f"group {self.name!r} has no process group (virtual topology); init_topology() first")
        return self.pg


class CommCounter:
    """Calls and bytes per (operation, group name); reset it at the start of a step."""

    def __init__(self):
        self.calls: dict[tuple[str, str], int] = defaultdict(int)
        self.bytes: dict[tuple[str, str], int] = defaultdict(int)

    def record(self, op: str, group: str, nbytes: int) -> None:
        self.calls[(op, group)] += 1
        self.bytes[(op, group)] += int(nbytes)

    def reset(self) -> None:
        self.calls.clear()
        self.bytes.clear()

    def table(self) -> dict[tuple[str, str], tuple[int, int]]:
        """{(op, group): (calls, bytes)} for every kind seen."""
        return {k: (self.calls[k], self.bytes[k]) for k in sorted(self.calls)}

    def total_bytes(self) -> int:
        return sum(self.bytes.values())


_counters: list[CommCounter] = []


@contextlib.contextmanager
def count_comm(counter: CommCounter | None = None):
    """Record every transfer made inside the block (nested counters all record)."""
    counter = CommCounter() if counter is None else counter
    _counters.append(counter)
    try:
        yield counter
    finally:
        _counters.remove(counter)


_EAGER = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "all_gather_object", "gather_object", "exchange")


def keep_eager() -> None:
    """Transfers stay outside compiled regions (model.compile=true): torch.compile breaks its graph around them, so
    every collective runs as written and the counter records each call. Called when blocks are compiled, not at
    import: `torch.compiler.disable` imports torch._dynamo, which imports triton, and triton must not be imported
    before TRITON_INTERPRET is set where kernels are interpreted (tests/kernel_checks). Callers look the transfers
    up on this module (`comm.all_gather(...)`), so rebinding the names here reaches every one of them."""
    module = sys.modules[__name__]
    for name in _EAGER:
        fn = getattr(module, name)
        if not getattr(fn, "_tmd_eager", False):
            eager = torch.compiler.disable(fn)
            eager._tmd_eager = True
            setattr(module, name, eager)


def _record(op: str, group: CommGroup, tensor: torch.Tensor) -> None:
    for c in _counters:
        c.record(op, group.name, tensor.numel() * tensor.element_size())


# ---- collectives (plain functions; the autograd wrappers live in tensor.py) ------------------------------------
def all_reduce(tensor: torch.Tensor, group: CommGroup) -> torch.Tensor:
    """Sum over the group, in place; returns the tensor."""
    if group.size > 1:
        _record("all_reduce", group, tensor)
        dist.all_reduce(tensor, group=group._pg())
    return tensor


def all_gather(tensor: torch.Tensor, group: CommGroup, dim: int = 0) -> torch.Tensor:
    """Concatenate every rank's tensor along `dim` in group-rank order."""
    if group.size == 1:
        return tensor
    moved = tensor.movedim(dim, 0).contiguous()
    out = moved.new_empty((group.size * moved.shape[0], *moved.shape[1:]))
    _record("all_gather", group, out)
    _all_gather_single(out, moved, group=group._pg())
    return out.movedim(0, dim)


def reduce_scatter(tensor: torch.Tensor, group: CommGroup, dim: int = 0) -> torch.Tensor:
    """Sum over the group and keep this rank's equal chunk along `dim`."""
    if group.size == 1:
        return tensor
    if tensor.shape[dim] % group.size:
        raise ValueError(f"reduce_scatter over {group.name}: size {tensor.shape[dim]} not divisible by {group.size}")
    moved = tensor.movedim(dim, 0).contiguous()
    out = moved.new_empty((moved.shape[0] // group.size, *moved.shape[1:]))
    _record("reduce_scatter", group, moved)
    _reduce_scatter_single(out, moved, group=group._pg())
    return out.movedim(0, dim)


def all_to_all(tensor: torch.Tensor, group: CommGroup) -> torch.Tensor:
    """Chunk i of dim 0 goes to group rank i; returns the chunks received, stacked along dim 0 by source."""
    if group.size == 1:
        return tensor
    if tensor.shape[0] != group.size:
        raise ValueError(f"all_to_all over {group.name}: dim 0 must equal the group size {group.size}")
    src = tensor.contiguous()
    out = torch.empty_like(src)
    _record("all_to_all", group, src)
    dist.all_to_all_single(out, src, group=group._pg())
    return out


def all_gather_object(obj, group: CommGroup) -> list:
    """Python objects from every group rank (checkpoint conversion only; not counted as tensor traffic)."""
    if group.size == 1:
        return [obj]
    out = [None] * group.size
    dist.all_gather_object(out, obj, group=group._pg())
    return out


def gather_object(obj, group: CommGroup) -> list | None:
    """Python objects from every group rank on group rank 0 (None elsewhere); host memory, through gloo."""
    if group.size == 1:
        return [obj]
    out = [None] * group.size if group.rank == 0 else None
    dist.gather_object(obj, out, dst=group.ranks[0], group=group._pg())
    return out


class _Pending:
    def __init__(self, works, ops):
        self._works = works
        self._ops = ops  # keeps contiguous send copies alive until the transfer completes

    def wait(self) -> None:
        for w in self._works:
            w.wait()
        self._works, self._ops = [], []


def exchange(
    group: CommGroup,
    sends: list[tuple[torch.Tensor, int]] = (),
    recvs: list[tuple[torch.Tensor, int]] = (),
    async_op: bool = False,
    sends_in_flight: bool = False,
):
    """Point-to-point: send (tensor, dst global rank) and receive into (buffer, src global rank) in one batch.

    Batching sends and receives together is what keeps rings and pipelines free of deadlock.
    sends_in_flight: wait for the receives only and return the sends still pending (wait on them before the
    sent tensors may change or the pass ends). On gloo a send lasts until the peer posts its receive, so waiting on
    it holds the sender in lockstep with the receiver. batch_isend_irecv returns one work per op on gloo, and one
    coalesced work for NCCL-style backends (torch/distributed/distributed_c10d.py, batch_isend_irecv: the
    `supports_coalescing` branch); that one is waited on whole, which on a GPU only orders the streams.
    """
    ops = []
    for t, peer in sends:
        _record("send", group, t)
        ops.append(dist.P2POp(dist.isend, t.contiguous(), peer, group._pg()))
    for t, peer in recvs:
        _record("recv", group, t)
        ops.append(dist.P2POp(dist.irecv, t, peer, group._pg()))
    works = dist.batch_isend_irecv(ops) if ops else []
    if sends_in_flight and len(works) == len(ops):
        for w in works[len(sends):]:
            w.wait()
        return _Pending(works[:len(sends)], ops[:len(sends)])
    pending = _Pending(works, ops)
    if sends_in_flight:
        pending.wait()
        return _Pending([], [])
    if async_op:
        return pending
    pending.wait()
    return None
