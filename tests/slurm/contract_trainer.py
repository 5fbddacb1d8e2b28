"""Stand-in for `tmd-train` that honours the launcher contract, for the launcher tests only.

    python contract_trainer.py experiment=tiny_tmd run.out_dir=DIR run.max_steps=6 parallel.tp=2 device=cpu ...

Contract (the real trainer honours the same): one process per rank, rank/world from torchrun's env (RANK,
WORLD_SIZE, LOCAL_RANK) or SLURM's (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID) with MASTER_ADDR/MASTER_PORT;
resume from <run.out_dir>/checkpoints/latest when it exists; a checkpoint per step (the project's atomic
DCP writer, so the layout is the real one); on SIGUSR1/SIGTERM finish the step, save, exit 75; exit 0 when
run.max_steps is reached; anything else is a failure.

What it computes lets the tests check a resume: every step adds step * sum(rank + 1) to a replicated
accumulator, so after S steps acc = S(S+1)/2 * W(W+1)/2 only if the state really came back from the
checkpoint; rank 0 appends one line per executed step to <out_dir>/steps.log ("<attempt> <step>"), which
shows that no step ran twice. Test-only knobs (env): CONTRACT_STEP_S (seconds per step), CONTRACT_FAIL_AT
(exit 3 at that step).
"""
from __future__ import annotations

import datetime
import os
import signal
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from tmd_megatron.training.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint

EXIT_REQUEUE = 75
_stop_signal: list[int] = []


def _on_signal(signum, _frame) -> None:
    _stop_signal.append(signum)


KNOWN_KEYS = {"experiment", "run.out_dir", "run.max_steps", "parallel.tp", "parallel.cp", "parallel.pp", "device",
              "model.backend"}


def parse_overrides(argv: list[str]) -> dict[str, str]:
    """key=value pairs; like hydra's structured configs, an unknown key is an error (exit 1)."""
    bad = [a for a in argv if "=" not in a]
    if bad:
        raise SystemExit(f"contract_trainer: expected hydra-style key=value overrides, got {bad}")
    args = dict(a.split("=", 1) for a in argv)
    unknown = sorted(set(args) - KNOWN_KEYS)
    if unknown:
        raise SystemExit(f"contract_trainer: could not override {unknown}: not in the config ({sorted(KNOWN_KEYS)})")
    return args


def rank_env() -> tuple[int, int, int]:
    if "RANK" in os.environ:  # torchrun
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if "SLURM_PROCID" in os.environ:  # srun, one task per rank
        return int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"]), int(os.environ["SLURM_LOCALID"])
    return 0, 1, 0


def layout_groups(rank: int, world: int, tp: int, cp: int, pp: int) -> dict[str, list[int]]:
    """Members of this rank's groups in Megatron's order (tp fastest, then cp, dp, pp), by brute force."""
    dp = world // (tp * cp * pp)

    def coords(r):
        return {"tp": r % tp, "cp": r // tp % cp, "dp": r // (tp * cp) % dp, "pp": r // (tp * cp * dp)}

    mine = coords(rank)
    return {axis: [r for r in range(world) if all(coords(r)[a] == mine[a] for a in mine if a != axis)]
            for axis in ("tp", "cp", "dp", "pp")}


def check_layout(rank: int, world: int, tp: int, cp: int, pp: int) -> None:
    """Each group's all-reduce of the ranks must equal the brute-force sum of its members: every rank must
    build every group (new_group is collective), so loop over all groups of each axis."""
    for axis in ("tp", "cp", "dp", "pp"):
        seen = []
        for r in range(world):
            members = layout_groups(r, world, tp, cp, pp)[axis]
            if members not in seen:
                seen.append(members)
        for members in seen:
            group = dist.new_group(members)
            if rank in members:
                x = torch.tensor([float(rank)])
                dist.all_reduce(x, group=group)
                if x.item() != sum(members):
                    raise RuntimeError(f"{axis} group {members}: all_reduce gave {x.item()}, expected {sum(members)}")


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGUSR1, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    args = parse_overrides(argv)
    out_dir = Path(args["run.out_dir"])
    max_steps = int(args.get("run.max_steps", 4))
    tp, cp, pp = (int(args.get(f"parallel.{k}", 1)) for k in ("tp", "cp", "pp"))
    rank, world, local_rank = rank_env()
    if world % (tp * cp * pp):
        print(f"contract_trainer: world size {world} is not divisible by tp*cp*pp = {tp * cp * pp}; "
              "change parallel.tp/cp/pp or the number of processes", file=sys.stderr)
        return 2
    if world > 1:
        for key in ("MASTER_ADDR", "MASTER_PORT"):
            if key not in os.environ:
                print(f"contract_trainer: {key} is not set; the launcher must export it", file=sys.stderr)
                return 2
        backend = "gloo" if args.get("device", "cuda") == "cpu" else "nccl"
        dist.init_process_group(backend, init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
                                rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
        check_layout(rank, world, tp, cp, pp)
    node = os.environ.get("SLURMD_NODENAME", socket.gethostname())
    print(f"rank {rank}/{world} local {local_rank} node {node} layout tp{tp} cp{cp} pp{pp} "
          f"recipe {args.get('experiment')} device {args.get('device')} backend {args.get('model.backend')}", flush=True)

    attempt = int(os.environ.get("SLURM_RESTART_COUNT", 0))
    ckpt_dir = out_dir / "checkpoints"
    state = {"acc": torch.zeros(1, dtype=torch.float64), "step": torch.zeros((), dtype=torch.int64)}
    found = resolve_checkpoint(ckpt_dir)
    if found is not None:
        load_checkpoint(found, state)
        print(f"rank {rank}: resumed from {found.name} (step {int(state['step'])})", flush=True)
    step_s = float(os.environ.get("CONTRACT_STEP_S", "0"))
    fail_at = int(os.environ.get("CONTRACT_FAIL_AT", "0"))
    while int(state["step"]) < max_steps:
        step = int(state["step"]) + 1
        time.sleep(step_s)
        if step == fail_at:
            print(f"rank {rank}: failing on purpose at step {step}", flush=True)
            os._exit(3)
        contribution = torch.tensor([float(step * (rank + 1))], dtype=torch.float64)
        stop = torch.tensor([len(_stop_signal)], dtype=torch.int64)
        if world > 1:
            dist.all_reduce(contribution)
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)  # every rank stops after the same step
        state["acc"] += contribution
        state["step"].fill_(step)
        save_checkpoint(ckpt_dir, step, state, {"attempt": attempt}, keep_last=2)
        if rank == 0:
            with open(out_dir / "steps.log", "a") as fh:
                fh.write(f"{attempt} {step}\n")
            print(f"step {step} acc {state['acc'].item():.0f}", flush=True)
        if stop.item():
            print(f"rank {rank}: signal {_stop_signal[:1]} -> checkpoint at step {step} saved, exit {EXIT_REQUEUE}",
                  flush=True)
            return EXIT_REQUEUE
    print(f"rank {rank}: finished at step {max_steps}", flush=True)
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # gloo sometimes aborts in interpreter teardown after destroy_process_group (STACK_ON_CPU)
