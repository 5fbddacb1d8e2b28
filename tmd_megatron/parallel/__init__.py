"""Megatron-style parallel Wan: topology, TP+SP layers, CP attention, pipeline, ZeRO-1, comm accounting.

Entry points: `init_topology` -> `parallelize(config, topo, full_state, ...)` -> `WanStage` + `run_pipeline`
(or plain `model(x, t, ctx)` without pipeline parallelism) -> `ZeroAdamW`. See docs/parallel.md.
"""
from .comm import CommCounter, CommGroup, count_comm
from .data import ZeroAdamW, tp_partial_names
from .layout import ShardedTokenLayout
from .parallelize import (
    LayoutPlan,
    StageSpan,
    build_stage_model,
    check_layout,
    full_from_shards,
    parallelize,
    plan_layout,
    shards_from_full,
)
from .pipeline import PipelineResult, TensorSpec, run_pipeline, schedule_order, simulate_schedule, transfer
from .sharding import gather_full_state, load_full_state, local_state_from_full, tp_split_dims
from .stages import WanStage, partition_blocks, student_block_costs
from .tensor import TorchParallelLayers
from .topology import DistEnv, Topology, destroy_topology, dist_env, first_host, generator_for, init_topology

__all__ = [
    "CommCounter", "CommGroup", "count_comm", "ZeroAdamW", "tp_partial_names", "ShardedTokenLayout",
    "LayoutPlan", "StageSpan", "build_stage_model", "check_layout", "full_from_shards", "parallelize",
    "plan_layout", "shards_from_full", "PipelineResult", "TensorSpec", "run_pipeline", "schedule_order",
    "simulate_schedule", "transfer", "gather_full_state", "load_full_state", "local_state_from_full",
    "tp_split_dims", "WanStage", "partition_blocks", "student_block_costs", "TorchParallelLayers", "DistEnv",
    "Topology", "destroy_topology", "dist_env", "first_host", "generator_for", "init_topology",
]
