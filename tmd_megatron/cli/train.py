"""tmd-train: train with a recipe, e.g. `tmd-train experiment=tiny_teacher run.out_dir=runs/t` (hydra overrides).

Launch one process per device with torchrun or srun; the layout comes from the recipe's parallel.* and the
world size. Exit codes: 0 done, 75 preempted (checkpoint written; requeue and the run resumes), 2 bad recipe.
"""
from __future__ import annotations

import os
import sys


def run(overrides: list[str], stream=None) -> int:
    import warnings

    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from tmd_megatron.parallel import Topology, destroy_topology, dist_env, init_topology
    from tmd_megatron.parallel.topology import default_device
    from tmd_megatron.training.checkpoint import ResumeError
    from tmd_megatron.training.config import RecipeError, compose, resolve
    from tmd_megatron.training.plan import check_recipe
    from tmd_megatron.training.trainer import REQUEUE_EXIT, Preempted, Trainer

    try:
        res = resolve(compose(overrides))
        p = res.raw.parallel
        world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
        problems = check_recipe(res, world)
        if problems:
            raise RecipeError("the recipe cannot run:\n  - " + "\n  - ".join(problems))
        if res.method == "dmd2v" and res.dmd2v.use_kd_warmup and res.raw.model.init is None:
            print("tmd-train: note: the paper warms up one-step DMD2-v students with KD (Sec. 3.2, Table 4); run "
                  "method=kd first and pass model.init=<its out_dir>/export", file=sys.stderr)
        if dist_env().source == "single" and p.tp * p.cp * p.pp == 1:
            # one process: no process group (and no rendezvous port to collide with another local run)
            topo = Topology.single(default_device(res.raw.run.device)[0])
        else:
            topo = init_topology(p.tp, p.cp, p.pp, device=res.raw.run.device)
    except (RecipeError, ValueError, RuntimeError, HydraException, OmegaConfBaseException) as err:
        print(f"tmd-train: {err}", file=sys.stderr)
        return 2
    code = 0
    try:
        Trainer(res, topo, stream=stream).fit()
    except Preempted as stop:
        if topo.world.rank == 0:
            print(f"tmd-train: {stop}; exiting {REQUEUE_EXIT} so the job is requeued", file=sys.stderr)
        code = REQUEUE_EXIT
    except (RecipeError, ResumeError) as err:
        print(f"tmd-train: {err}", file=sys.stderr)
        code = 2
    destroy_topology()
    return code


def main() -> None:
    code = run(sys.argv[1:])
    # os._exit skips interpreter teardown, which can abort gloo after destroy_process_group (STACK_ON_CPU.md).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
