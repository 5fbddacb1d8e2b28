"""Layout search (`tmd-plan RECIPE --world N --search`): every valid layout of a recipe on N ranks, those that fit
the device memory, ranked by the step-time model's predicted iteration time.

Enumerated: tensor parallel sizes dividing the heads and FFN width, up to one node; context parallel 1-8, ring and
(where the heads per TP rank divide by it) Ulysses; pipeline stages 1, 2, 4 (8 with enough blocks); samples per
microbatch 1, 2, 4 (microbatches = per-rank batch / that, at least the stages); sequence parallelism on and off
under TP; activation checkpointing on and off; the frozen teacher in bf16 or fp32 (bf16 recipes). Memory and
validity come from the planner (training/plan.py), time from training/timing.py.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

from .plan import Layout, layout_of, plan_recipe
from .timing import Prediction, Profile, StepModel


@dataclass
class Candidate:
    layout: Layout
    teacher_dtype: str
    memory_gib: float
    traffic_gib: float  # per iteration per rank, all groups (first stage)
    prediction: Prediction

    def describe(self) -> str:
        lay = self.layout
        parts = [f"TP{lay.tp}" + ("+SP" if lay.sequence_parallel and lay.tp > 1 else ""),
                 f"CP{lay.cp}" + (f" {lay.cp_mode}" if lay.cp > 1 else ""), f"PP{lay.pp}", f"DP{lay.dp}",
                 f"{lay.microbatches}x{lay.micro_batch}", "AC" if lay.activation_checkpointing else "no AC",
                 f"teacher {self.teacher_dtype}"]
        return " ".join(parts)

    def overrides(self) -> list[str]:
        lay = self.layout
        return [f"parallel.tp={lay.tp}", f"parallel.cp={lay.cp}", f"parallel.cp_comm={lay.cp_mode}",
                f"parallel.pp={lay.pp}", f"parallel.sequence_parallel={str(lay.sequence_parallel).lower()}",
                f"parallel.micro_batch_size={lay.micro_batch}",
                f"parallel.activation_checkpointing={str(lay.activation_checkpointing).lower()}",
                f"model.teacher_dtype={self.teacher_dtype}"]


def with_layout(res, tp, cp, cp_mode, pp, sp, micro_batch, ac, teacher_dtype):
    """The resolved recipe with another layout (what the overrides of `Candidate.overrides` compose to)."""
    par = dataclasses.replace(res.raw.parallel, tp=tp, cp=cp, cp_comm=cp_mode, pp=pp, sequence_parallel=sp,
                              micro_batch_size=micro_batch, activation_checkpointing=ac)
    model = dataclasses.replace(res.raw.model, teacher_dtype=teacher_dtype)
    return dataclasses.replace(res, raw=dataclasses.replace(res.raw, parallel=par, model=model))


def _divisors(n: int, cap: int) -> list[int]:
    return [d for d in range(1, min(n, cap) + 1) if n % d == 0]


def candidates(res, world: int, ranks_per_node: int = 8):
    cfg, batch = res.wan, res.raw.data.global_batch
    tps = [t for t in _divisors(cfg.num_heads, ranks_per_node) if cfg.ffn_dim % t == 0 and world % t == 0]
    pps = [p for p in (1, 2, 4, 8) if p <= cfg.num_layers // 2 or p == 1]
    dtypes = ("bf16", "fp32") if res.raw.model.compute_dtype == "bf16" else ("fp32",)
    for tp, cp, pp in itertools.product(tps, (1, 2, 4, 8), pps):
        if world % (tp * cp * pp):
            continue
        dp = world // (tp * cp * pp)
        if batch % dp:
            continue
        modes = ["ring"] if cp == 1 else ["ring"] + (["ulysses"] if (cfg.num_heads // tp) % cp == 0 else [])
        for mode, sp, b, ac, dtype in itertools.product(modes, (True, False) if tp > 1 else (True,), (1, 2, 4),
                                                       (True, False), dtypes):
            local = batch // dp
            if local % b or local // b < pp:
                continue
            yield with_layout(res, tp, cp, mode, pp, sp, b, ac, dtype)


def search(res, world: int, profile: Profile, device_memory_gib: float | None = None, top: int = 10,
           progress=None) -> tuple[list[Candidate], int, int]:
    """(the `top` fastest layouts that fit, how many layouts were valid, how many fit)."""
    memory = device_memory_gib or profile.memory_gib or None
    found, valid, fit = [], 0, 0
    for cand in candidates(res, world, profile.ranks_per_node):
        plan = plan_recipe(cand, world)
        if plan.problems:
            continue
        valid += 1
        if memory and plan.total_gib > memory:
            continue
        fit += 1
        pred = StepModel(cand, world, profile).predict()
        found.append(Candidate(layout_of(cand, world), cand.raw.model.teacher_dtype, plan.total_gib,
                               sum(g for _, g in plan.comm), pred))
        if progress:
            progress(len(found))
    found.sort(key=lambda c: (c.prediction.seconds, c.memory_gib))
    # the teacher's storage dtype changes memory, not time (its GEMMs run in the compute dtype either way): of
    # two such twins only the one with less memory is worth printing
    seen, kept = set(), []
    for c in found:
        if c.layout not in seen:
            seen.add(c.layout)
            kept.append(c)
    return kept[:top], valid, fit
