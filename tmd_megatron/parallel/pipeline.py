"""Pipeline engine: runs a stage function over microbatches with a GPipe or 1F1B schedule, explicit backward.

A stage function maps (microbatch index, inputs) -> (outputs, local loss or None). The first stage's inputs
come from the caller, the others' from the previous stage; outputs go to the next stage, or are returned on
the last stage. Backward on each stage starts from: the gradients the next stage sends for its outputs, or
on the last stage the output gradients the caller supplies (e.g. a VSD gradient), plus the stage's local
loss (e.g. a discriminator head on a hidden layer of this stage). Input gradients come back on the first
stage. Forward-only passes run under no_grad and keep no graph.

The schedule is a list of ("F"|"B", microbatch) per stage (`schedule_order`); after each op the engine sends
that op's result and receives the next op's input in one batched exchange, which is deadlock free (the same
pairing as Megatron's send_forward_recv_backward / send_backward_recv_forward).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from . import comm
from .comm import CommGroup


@dataclass(frozen=True)
class TensorSpec:
    """A tensor crossing a stage boundary. needs_grad=False: no gradient is sent back for it."""

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    needs_grad: bool = True


@dataclass
class PipelineResult:
    outputs: list = field(default_factory=list)  # last stage: per microbatch, tuple of detached outputs
    input_grads: list = field(default_factory=list)  # first stage: per microbatch, grads of inputs (or None)
    losses: list = field(default_factory=list)  # per microbatch: this stage's local loss (detached) or None
    trace: list = field(default_factory=list)  # (op, microbatch, start s, end s) of compute, relative to start
    wall: float = 0.0
    max_in_flight: int = 0  # most microbatch graphs held at once

    @property
    def idle_fraction(self) -> float:
        busy = sum(end - start for _, _, start, end in self.trace)
        return 1.0 - busy / self.wall if self.wall > 0 else 0.0


def schedule_order(num_stages: int, stage: int, num_microbatches: int, schedule: str = "1f1b",
                   forward_only: int = 0) -> list:
    """The ops one stage executes, in order: ("F", mb) and ("B", mb). forward_only: the first microbatches that
    have no backward (a mixed pass: they stream through first, then the others run the schedule)."""
    if forward_only:
        rest = schedule_order(num_stages, stage, num_microbatches - forward_only, schedule)
        return [("F", i) for i in range(forward_only)] + [(op, forward_only + i) for op, i in rest]
    m = num_microbatches
    if schedule == "forward":
        return [("F", i) for i in range(m)]
    if schedule == "gpipe":
        return [("F", i) for i in range(m)] + [("B", i) for i in range(m)]
    if schedule != "1f1b":
        raise ValueError(f"unknown schedule {schedule!r}; choose '1f1b' or 'gpipe'")
    warmup = min(num_stages - stage - 1, m)
    order = [("F", i) for i in range(warmup)]
    for i in range(m - warmup):
        order += [("F", warmup + i), ("B", i)]
    return order + [("B", i) for i in range(m - warmup, m)]


def simulate_schedule(num_stages: int, num_microbatches: int, schedule: str, f_cost=1.0, b_cost=2.0) -> float:
    """Idle fraction of the schedule with fixed op costs and free communication (bubble of the order alone)."""
    wall, busy = simulate_pipeline([f_cost] * num_stages, [b_cost] * num_stages, num_microbatches, schedule)
    return 1.0 - sum(busy) / (num_stages * wall)


def simulate_pipeline(f_costs, b_costs, num_microbatches: int, schedule: str = "1f1b", transfer: float = 0.0,
                      ranks_per_stage: int = 1, cores: float = math.inf, forward_only: int = 0,
                      f_comm=None, b_comm=None) -> tuple[float, list[float]]:
    """(makespan, busy seconds per stage) of one pipelined pass. f_costs[s] / b_costs[s]: seconds of one forward /
    backward op on stage s at full speed ("forward" schedule: forward ops only); transfer: seconds for an
    activation or its gradient to reach the neighbouring stage. Processor sharing: the busy ranks of all stages
    split `cores` (a CPU's), so an op runs at min(1, cores / busy ranks) of full speed; GPUs: cores = inf. Costs
    may also be given per microbatch (f_costs[s][mb]), for a mixed pass whose first `forward_only` microbatches
    have no backward. f_comm / b_comm (same shapes; default none): seconds of each op spent in collectives, after
    its compute, at full speed. A rank waiting in a collective takes no core, but its peers are slowed by the
    sharing like everyone else, so the wait stretches with the speed of the ranks that compute."""
    p, m = len(f_costs), num_microbatches
    orders = [schedule_order(p, s, m, schedule, forward_only) for s in range(p)]

    def cost(table, s, mb):
        c = table[s]
        return c[mb] if isinstance(c, (list, tuple)) else c

    done: dict[tuple[str, int, int], float] = {}
    pos, left, busy = [0] * p, [None] * p, [0.0] * p  # left: remaining full-speed seconds of the running op
    waiting = [0.0] * p  # remaining full-speed collective seconds of the running op (after its compute)
    now = 0.0

    def ready_at(s: int) -> float | None:
        op, mb = orders[s][pos[s]]
        dep = None if (op == "F" and s == 0) or (op == "B" and s == p - 1) else (
            ("F", s - 1, mb) if op == "F" else ("B", s + 1, mb))
        if dep is None:
            return now
        return done[dep] + transfer if dep in done else None

    while any(pos[s] < len(orders[s]) for s in range(p)):
        for s in range(p):  # start what can start
            if left[s] is None and pos[s] < len(orders[s]):
                t = ready_at(s)
                if t is not None and t <= now:
                    op, mb = orders[s][pos[s]]
                    left[s] = cost(f_costs if op == "F" else b_costs, s, mb)
                    comm_table = f_comm if op == "F" else b_comm
                    waiting[s] = cost(comm_table, s, mb) if comm_table is not None else 0.0
        active = [s for s in range(p) if left[s] is not None]
        running = [s for s in active if left[s] > 1e-12]
        speed = min(1.0, cores / (max(1, len(running)) * ranks_per_stage))
        waits = [t - now for s in range(p) if left[s] is None and pos[s] < len(orders[s])
                 for t in [ready_at(s)] if t is not None and t > now]
        dt = min([(left[s] if s in running else waiting[s]) / speed for s in active] + waits)
        if dt == math.inf or (not active and not waits):
            raise RuntimeError("schedule deadlocks")
        now += dt
        for s in active:
            if s in running:
                left[s] -= dt * speed
                busy[s] += dt * speed
            else:
                waiting[s] -= dt * speed
            if left[s] <= 1e-12 and waiting[s] <= 1e-12:
                op, mb = orders[s][pos[s]]
                done[(op, s, mb)] = now
                pos[s] += 1
                left[s] = None
    return now, busy


class _Links:
    """Point-to-point transfers with the neighbouring stages (same dp/cp/tp coordinates)."""

    def __init__(self, pp: CommGroup, boundary, device):
        self.pp, self.device = pp, device
        self.boundary = boundary if callable(boundary) else (lambda mb, specs=list(boundary): specs)
        self.first, self.last = pp.rank == 0, pp.rank == pp.size - 1
        self.prev = None if self.first else pp.ranks[pp.rank - 1]
        self.next = None if self.last else pp.ranks[pp.rank + 1]
        self.in_flight = []  # posted sends (each keeps its tensors alive until it completes)

    def exchange(self, sends, recvs) -> None:
        """One batch of this op's sends and the next op's receives (batched, as Megatron pairs
        send_forward_recv_backward: a send and a receive with the same peer in separate NCCL groups deadlock), but
        only the receives are waited on. A send lasts until the peer posts its receive (gloo: measured, an isend's
        wait lasts until the receiver calls recv), so waiting on it would hold a stage in lockstep with its
        neighbour where the schedule lets it run ahead: a forward-only stream, or an input sent before it is
        needed. Every send has a matching receive in the peer's order, so the waits in `drain` finish."""
        if sends or recvs:
            self.in_flight.append(comm.exchange(self.pp, sends, recvs, sends_in_flight=True))

    def drain(self) -> None:
        for pending in self.in_flight:
            pending.wait()
        self.in_flight = []

    def forward_buffers(self, mb: int):
        return [torch.empty(s.shape, dtype=s.dtype, device=self.device) for s in self.boundary(mb)]

    def grad_buffers(self, mb: int):
        return [torch.empty(s.shape, dtype=s.dtype, device=self.device) for s in self.boundary(mb) if s.needs_grad]


def _as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def run_pipeline(
    stage_fn: Callable,
    pp: CommGroup,
    num_microbatches: int,
    *,
    boundary: Sequence[TensorSpec] | Callable,
    inputs: Sequence[tuple] | None = None,
    output_grads: Sequence | Callable | None = None,
    schedule: str = "1f1b",
    forward_only: bool | int = False,
    device=None,
) -> PipelineResult:
    """Run `stage_fn` for this rank's stage over `num_microbatches` microbatches.

    inputs: first stage only, one tuple per microbatch; inputs with requires_grad get gradients (returned
    in result.input_grads). boundary: specs of what crosses every stage boundary, per microbatch (or a
    callable mb -> specs, for passes whose microbatches differ). output_grads: last stage only, per microbatch a
    tuple (a tensor or None per output), or a callable (mb, outputs) -> such a tuple; None everywhere means only
    local losses drive the backward. forward_only: True for a forward-only pass, or the number of leading
    microbatches that run forward only (a mixed pass of several models: they stream through first).
    """
    links = _Links(pp, boundary, device or torch.device("cpu"))
    if links.first and (inputs is None or len(inputs) != num_microbatches):
        raise ValueError(f"the first stage needs inputs for all {num_microbatches} microbatches")
    leading = num_microbatches if forward_only is True else int(forward_only)
    if leading >= num_microbatches:
        order = schedule_order(pp.size, pp.rank, num_microbatches, "forward")
    else:
        order = schedule_order(pp.size, pp.rank, num_microbatches, schedule, leading)
    result = PipelineResult()
    result.losses = [None] * num_microbatches
    result.input_grads = [None] * num_microbatches
    stash: dict[int, tuple] = {}  # mb -> (input leaves, outputs, loss)
    t0 = time.perf_counter()

    def timed(op: str, mb: int, fn):
        start = time.perf_counter() - t0
        out = fn()
        result.trace.append((op, mb, start, time.perf_counter() - t0))
        return out

    def forward(mb: int, received):
        no_grad = mb < leading
        if links.first:
            leaves = tuple(
                t.detach().requires_grad_(t.requires_grad and not no_grad) if torch.is_tensor(t) else t
                for t in inputs[mb]
            )
        else:
            leaves = tuple(
                t.requires_grad_(spec.needs_grad and not no_grad) for t, spec in zip(received, links.boundary(mb))
            )
        with torch.set_grad_enabled(not no_grad):
            outputs, loss = stage_fn(mb, leaves)
        outputs = _as_tuple(outputs)
        if not links.last:
            _check_outputs(outputs, links.boundary(mb))
        if loss is not None:
            result.losses[mb] = loss.detach()
        if links.last:
            result.outputs.append(tuple(o.detach() for o in outputs))
        if not no_grad:
            stash[mb] = (leaves, outputs, loss)
            result.max_in_flight = max(result.max_in_flight, len(stash))
        return outputs

    def backward(mb: int, grads_in):
        leaves, outputs, loss = stash.pop(mb)
        if links.last:
            supplied = output_grads(mb, outputs) if callable(output_grads) else (
                output_grads[mb] if output_grads is not None else None
            )
            pairs = list(zip(outputs, _as_tuple(supplied) if supplied is not None else [None] * len(outputs)))
        else:
            wanted = [o for o, s in zip(outputs, links.boundary(mb)) if s.needs_grad]
            pairs = list(zip(wanted, grads_in))
        roots = [(o, g) for o, g in pairs if g is not None and o.requires_grad]
        if loss is not None and loss.requires_grad:
            roots.append((loss, torch.ones_like(loss)))
        if roots:
            torch.autograd.backward([r for r, _ in roots], [g for _, g in roots])
        if links.first:
            result.input_grads[mb] = tuple(
                (t.grad if t.grad is not None else torch.zeros_like(t))
                if torch.is_tensor(t) and t.requires_grad else None
                for t in leaves
            )
            return []
        return [
            t.grad if t.grad is not None else torch.zeros_like(t)
            for t, spec in zip(leaves, links.boundary(mb)) if spec.needs_grad
        ]

    def recvs_for(op):
        """Buffers the op needs from a neighbour before it can run."""
        kind, mb = op
        if kind == "F" and not links.first:
            return [(b, links.prev) for b in links.forward_buffers(mb)]
        if kind == "B" and not links.last:
            return [(b, links.next) for b in links.grad_buffers(mb)]
        return []

    pending = recvs_for(order[0]) if order else []
    links.exchange([], pending)
    for idx, (kind, mb) in enumerate(order):
        received = [b for b, _ in pending]
        if kind == "F":
            outputs = timed("F", mb, lambda: forward(mb, received))
            sends = [] if links.last else [(o.detach(), links.next) for o in outputs]
        else:
            grads = timed("B", mb, lambda: backward(mb, received))
            sends = [] if links.first else [(g, links.prev) for g in grads]
        pending = recvs_for(order[idx + 1]) if idx + 1 < len(order) else []
        links.exchange(sends, pending)
    links.drain()
    result.wall = time.perf_counter() - t0
    return result


def _check_outputs(outputs, boundary) -> None:
    if len(outputs) != len(boundary):
        raise ValueError(f"stage sent {len(outputs)} tensors, the boundary declares {len(boundary)}")
    for i, (o, spec) in enumerate(zip(outputs, boundary)):
        if tuple(o.shape) != tuple(spec.shape) or o.dtype != spec.dtype:
            raise ValueError(f"boundary tensor {i}: got {tuple(o.shape)} {o.dtype}, declared {spec.shape} {spec.dtype}")
        if o.requires_grad and not spec.needs_grad:
            raise ValueError(
                f"boundary tensor {i} requires grad but is declared needs_grad=False: its gradient would be "
                "dropped; declare needs_grad=True (e.g. WanStage(conditioning_grads=True))"
            )


def transfer(tensors: Sequence[torch.Tensor], pp: CommGroup, src_stage: int, dst_stage: int) -> list | None:
    """Move tensors from one stage to another (e.g. a first-stage input gradient to where the student output
    lives). Every stage of the pipeline calls it; `tensors` gives the shapes on dst (filled in) and the data on
    src. Returns the tensors on src and dst, None elsewhere."""
    if src_stage == dst_stage:
        return list(tensors) if pp.rank == src_stage else None
    if pp.rank == src_stage:
        comm.exchange(pp, [(t, pp.ranks[dst_stage]) for t in tensors], [])
        return list(tensors)
    if pp.rank == dst_stage:
        out = [torch.empty_like(t) for t in tensors]
        comm.exchange(pp, [], [(t, pp.ranks[src_stage]) for t in out])
        return out
    return None
