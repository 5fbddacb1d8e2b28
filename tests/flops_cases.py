"""Executed FLOPs of real trainer steps on every rank of a layout (torch's FlopCounterMode), beside the analytic
count for that rank's stage (tmd_megatron/training/flops.py). Runs on every rank of a spawned group."""
from __future__ import annotations

import io

from tmd_megatron.models.flops import flop_counter
from tmd_megatron.parallel import destroy_topology, init_topology
from tmd_megatron.training import flops as TF
from tmd_megatron.training.config import compose, resolve
from tmd_megatron.training.trainer import Trainer

STEPS = 2  # a generator step (the student updates on step 0) and a critic-only step


def counted_steps(overrides: list[str], out_dir: str) -> list[dict]:
    """Per step on this rank: (measured, analytic) executed FLOPs."""
    res = resolve(compose(["experiment=tiny_smoke", f"run.out_dir={out_dir}", "run.resume=never",
                           "run.tensorboard=false", "run.device=cpu", *overrides]))
    p = res.raw.parallel
    topo = init_topology(p.tp, p.cp, p.pp, device="cpu")
    trainer = Trainer(res, topo, stream=io.StringIO())
    trainer.start()
    local = res.raw.data.global_batch // topo.dp.size
    st = TF.setting_of(res, micro_batch=local // trainer.microbatches)
    out = []
    for _ in range(STEPS):
        generator = "student" in trainer.updates_this_step()
        with flop_counter() as counter:
            trainer.advance()
        passes = TF.stage_passes(res, st, topo.pp.rank, generator)
        out.append({"rank": topo.world.rank, "measured": counter.get_total_flops(),
                    "analytic": TF.per_rank_step(passes, trainer.microbatches).total})
    return out


def run_all(cases: dict, base_dir: str) -> dict:
    out = {name: counted_steps(over, f"{base_dir}/case{i}") for i, (name, over) in enumerate(cases.items())}
    destroy_topology()
    return out
