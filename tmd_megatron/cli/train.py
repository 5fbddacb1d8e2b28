"""tmd-train: train with a recipe, e.g. `tmd-train experiment=tiny_teacher run.out_dir=runs/t` (hydra overrides).

Launch one process per device with torchrun or srun; the layout comes from the recipe's parallel.* and the
world size. Exit codes: 0 done, 75 preempted (checkpoint written; requeue and the run resumes), 2 a problem the
operator must fix (bad recipe or input, a checkpoint that cannot be resumed, no space left), named in one message.
Everything that can be checked before models are built is: the recipe, the layout, the teacher and init
checkpoints, the negative-prompt embedding, the shards and the run directory.
"""
from __future__ import annotations

import errno
import os
import sys


def default_threads(env, cpus: int) -> int | None:
    """Intra-op threads per process when nobody chose (no OMP_NUM_THREADS): the CPUs this process may use shared by
    the processes of its node (torch's default, all cores, oversubscribes a node of several ranks)."""
    if "OMP_NUM_THREADS" in env:
        return None
    local = env.get("LOCAL_WORLD_SIZE") or env.get("OMPI_COMM_WORLD_LOCAL_SIZE") or \
        (env.get("SLURM_NTASKS_PER_NODE") or "1").split("(")[0]
    return max(1, cpus // max(1, int(local)))


def _operator_errors():
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from tmd_megatron.data.format import ShardError
    from tmd_megatron.models.wan.checkpoint import CheckpointError
    from tmd_megatron.training.checkpoint import CheckpointSaveError, ResumeError
    from tmd_megatron.training.config import RecipeError
    from tmd_megatron.training.safe_dcp import CorruptCheckpoint, UntrustedCheckpoint

    return (RecipeError, ResumeError, CheckpointSaveError, UntrustedCheckpoint, CorruptCheckpoint, CheckpointError,
            ShardError, HydraException, OmegaConfBaseException)


def _stopped_note(out_dir: str) -> str:
    from tmd_megatron.training.checkpoint import resolve_checkpoint

    try:
        found = resolve_checkpoint(os.path.join(out_dir, "checkpoints"))
    except Exception:  # noqa: BLE001 -- only for the message
        found = None
    return (f"; the run stopped; {found} is intact and a resubmission resumes from it" if found
            else "; the run stopped before its first checkpoint")


def run(overrides: list[str], stream=None) -> int:
    import warnings

    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    import torch

    from tmd_megatron.data.format import ShardError
    from tmd_megatron.parallel import Topology, destroy_topology, dist_env, init_topology
    from tmd_megatron.parallel.topology import default_device
    from tmd_megatron.training.config import RecipeError, compose, describe_error, resolve
    from tmd_megatron.training.inputs import check_inputs
    from tmd_megatron.training.plan import check_recipe
    from tmd_megatron.training.trainer import REQUEUE_EXIT, Preempted, Trainer

    threads = default_threads(os.environ, len(os.sched_getaffinity(0)))
    if threads:
        torch.set_num_threads(threads)
    errors = _operator_errors()
    try:
        res = resolve(compose(overrides))
        p = res.raw.parallel
        world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
        problems = check_recipe(res, world)
        problems = problems or check_inputs(res)  # files only once the recipe itself is sound
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
    except (*errors, ValueError, RuntimeError) as err:
        print(f"tmd-train: {describe_error(err)}", file=sys.stderr)
        return 2
    code = 0
    try:
        Trainer(res, topo, stream=stream).fit()
    except Preempted as stop:
        if topo.world.rank == 0:
            print(f"tmd-train: {stop}; exiting {REQUEUE_EXIT} so the job is requeued", file=sys.stderr)
        code = REQUEUE_EXIT
    except errors as err:
        fix = ("; fix or rewrite the shard, or set data.on_corrupt=skip to skip bad samples (each is named in the "
               "log)" + _stopped_note(res.raw.run.out_dir)) if isinstance(err, ShardError) else ""
        print(f"tmd-train: {describe_error(err)}{fix}", file=sys.stderr)
        code = 2
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise
        print(f"tmd-train: {err.strerror}: {err.filename or res.raw.run.out_dir}{_stopped_note(res.raw.run.out_dir)}",
              file=sys.stderr)
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
