"""Build the parallel WanModel one rank holds: backend layers (TP/SP/CP), token layout, pipeline stage.

The model class is the single-device one; parallelism comes from outside: the layers the backend supplies,
`model.layout`, and pruning to this rank's pipeline stage (blocks outside the stage, embeddings off the
first stage and the head off the last are removed, so names of what remains are unchanged).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from tmd_megatron.models.wan import WanConfig, WanModel

from .layout import ShardedTokenLayout
from .sharding import load_full_state, merge_tp_shards, split_tp_shards, tp_split_dims
from .stages import partition_blocks
from .tensor import TorchParallelLayers
from .topology import Topology

FIRST_STAGE_MODULES = ("patch_embedding", "text_embedding", "time_embedding", "time_projection", "img_emb")


@dataclass(frozen=True)
class StageSpan:
    """Blocks [start, end) of a pipeline stage; the first stage embeds, the last runs the head."""

    start: int
    end: int
    first: bool
    last: bool


class AbsentBlock(nn.Module):
    """Placeholder for a block another pipeline stage holds (keeps block indices and names stable)."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("this block lives on another pipeline stage")


def check_layout(config: WanConfig, topo: Topology, cp_comm: str = "ring") -> None:
    """Refuse a layout the model cannot be split into, naming the fix."""
    tp, cp, pp = topo.tp.size, topo.cp.size, topo.pp.size
    problems = []
    for name in ("dim", "ffn_dim", "num_heads"):
        if getattr(config, name) % tp:
            problems.append(f"{name}={getattr(config, name)} is not divisible by tp={tp}")
    if cp_comm == "ulysses" and not problems and (config.num_heads // tp) % cp:
        problems.append(
            f"Ulysses needs heads per TP rank ({config.num_heads // tp}) divisible by cp={cp}; use cp_comm='ring'"
        )
    if pp > config.num_layers:
        problems.append(f"pp={pp} is more than the {config.num_layers} blocks")
    if problems:
        raise ValueError("cannot parallelize this Wan model: " + "; ".join(problems))


def check_te_layout(num_tokens: int, tp: int, cp: int, sequence_parallel: bool, compute_dtype: str,
                    cp_comm: str = "ring") -> list[str]:
    """What Transformer Engine cannot run for this layout, each naming its fix (empty when it can)."""
    problems = []
    if cp > 1:
        if compute_dtype != "bf16":
            problems.append("backend 'te' under context parallelism has no fp32 attention kernel (TE: 'No dot product "
                            "attention backend is available'): set model.compute_dtype=bf16, or model.backend=torch")
        shards = cp * (tp if sequence_parallel and tp > 1 else 1)
        if num_tokens % shards:
            problems.append(f"backend 'te' under context parallelism takes no padding mask, and {num_tokens} video "
                            f"tokens do not divide into cp*tp = {shards} equal shards: choose a latent size whose "
                            f"token count divides {shards}, or model.backend=torch")
        elif (num_tokens // cp) % 2:
            problems.append(f"backend 'te' with cp_comm={cp_comm} needs an even token count per CP rank; {num_tokens} "
                            f"tokens over cp={cp} gives {num_tokens // cp}: choose a cp for which "
                            f"{num_tokens} % (2*cp) == 0, or model.backend=torch")
    return problems


def stage_span(config: WanConfig, pp: int, pp_rank: int, stage_ranges: Sequence[tuple[int, int]] | None) -> StageSpan:
    if stage_ranges is None:
        stage_ranges = partition_blocks([1.0] * config.num_layers, pp)
    ranges = [tuple(r) for r in stage_ranges]
    contiguous = all(ranges[i][1] == ranges[i + 1][0] for i in range(len(ranges) - 1))
    if len(ranges) != pp or not contiguous or ranges[0][0] != 0 or ranges[-1][1] != config.num_layers:
        raise ValueError(f"stage_ranges {ranges} must be {pp} contiguous block ranges covering 0..{config.num_layers}")
    start, end = ranges[pp_rank]
    return StageSpan(start, end, pp_rank == 0, pp_rank == pp - 1)


def make_backend(topo: Topology, backend: str, sequence_parallel: bool, cp_comm: str, attention: str):
    if backend == "torch":
        return TorchParallelLayers(topo, sequence_parallel, cp_comm, attention)
    if backend == "te":
        try:
            from .te_backend import TELayers
        except ImportError as err:
            raise RuntimeError(f"backend 'te' needs Transformer Engine and CUDA ({err}); use backend='torch'") from err
        return TELayers(topo, sequence_parallel, cp_comm)
    raise ValueError(f"unknown backend {backend!r}; choose 'torch' or 'te'")


def build_stage_model(
    config: WanConfig,
    topo: Topology,
    *,
    sequence_parallel: bool = True,
    cp_comm: str = "ring",
    attention: str = "sdpa",
    backend: str = "torch",
    stage_ranges: Sequence[tuple[int, int]] | None = None,
) -> WanModel:
    """This rank's model on the meta device (no memory): structure, names and shard shapes only."""
    check_layout(config, topo, cp_comm)
    layers = make_backend(topo, backend, sequence_parallel, cp_comm, attention)
    with torch.device("meta"):
        model = WanModel(config, backend=layers)
    model.layout = ShardedTokenLayout(topo, sequence_parallel)
    span = stage_span(config, topo.pp.size, topo.pp.rank, stage_ranges)
    for i in range(config.num_layers):
        if not span.start <= i < span.end:
            model.blocks[i] = AbsentBlock()
    if not span.first:
        for name in FIRST_STAGE_MODULES:
            setattr(model, name, None)
    if not span.last:
        model.head = None
    model.stage = span
    return model


def parallelize(config: WanConfig, topo: Topology, full_state: Mapping, *, dtype=None, **options) -> WanModel:
    """The parallel WanModel this rank holds, its tensors taken (and TP-sliced) from `full_state`.

    full_state: the single-device state dict (original Wan keys), or any mapping that reads tensors lazily;
    only the keys this stage needs are read. options: sequence_parallel (True), cp_comm ('ring'|'ulysses'),
    attention ('sdpa'|'flash'), backend ('torch'|'te'), stage_ranges (block ranges per stage).
    """
    model = build_stage_model(config, topo, **options)
    model.to_empty(device=topo.device)
    if dtype is not None:
        model.to(dtype)
    load_full_state(model, full_state, topo)
    return model


# ---- offline layout conversion -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayoutPlan:
    """What each (pp_rank, tp_rank) of a layout holds: per stage, the tensor names and their TP split dims."""

    tp: int
    pp: int
    stages: tuple[tuple[tuple[str, ...], dict[str, int]], ...]


def plan_layout(config: WanConfig, tp: int, pp: int, stage_ranges=None, backend: str = "torch") -> LayoutPlan:
    """Built from meta-device models of a virtual topology: no process groups, no memory."""
    stages = []
    for pp_rank in range(pp):
        topo = Topology.virtual(tp=tp, pp=pp, rank=pp_rank * tp)
        model = build_stage_model(config, topo, stage_ranges=stage_ranges, backend=backend)
        names = tuple(k for k in model.state_dict() if not k.endswith("_extra_state"))
        stages.append((names, tp_split_dims(model)))
    return LayoutPlan(tp, pp, tuple(stages))


def shards_from_full(full: Mapping, plan: LayoutPlan) -> list[list[dict[str, torch.Tensor]]]:
    """A full state dict -> shards[pp_rank][tp_rank]."""
    return [split_tp_shards(full, names, dims, plan.tp) for names, dims in plan.stages]


def full_from_shards(shards: Sequence[Sequence[Mapping]], plan: LayoutPlan) -> dict[str, torch.Tensor]:
    """shards[pp_rank][tp_rank] -> the full state dict."""
    if len(shards) != plan.pp or any(len(stage) != plan.tp for stage in shards):
        raise ValueError(f"expected shards[{plan.pp}][{plan.tp}] for this plan")
    full = {}
    for stage, (_, dims) in zip(shards, plan.stages):
        full.update(merge_tp_shards(stage, dims))
    return full
