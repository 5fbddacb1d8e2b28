"""Spawn a gloo group on 127.0.0.1, run one function on every rank, collect results; kill everything on timeout.

Each rank gets torchrun-style environment variables, one intra-op thread (the CI machine has 2 cores for
all ranks), TF32 off on GPUs (the fp32 comparisons are at 1e-5), and ends with os._exit so a gloo teardown
hiccup cannot hang or abort the test.
"""
from __future__ import annotations

import faulthandler
import os
import queue
import socket
import time
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env(launcher: str, rank: int, world: int, port: int) -> dict:
    """What torchrun or srun (one node) would set for this rank."""
    if launcher == "torchrun":
        return dict(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=str(port))
    if launcher == "slurm":
        return dict(SLURM_PROCID=str(rank), SLURM_NTASKS=str(world), SLURM_LOCALID=str(rank),
                    SLURM_JOB_NODELIST="127.0.0.[1]", SLURM_JOB_ID=str(port - 10000))
    raise ValueError(launcher)


def _worker(fn, rank, world, port, results, args, stack_dump_after, launcher):
    # a hung rank prints where it is stuck before the parent kills it
    faulthandler.dump_traceback_later(stack_dump_after, exit=False)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(name, None)
    os.environ.update(launcher_env(launcher, rank, world, port))
    try:
        import torch

        torch.set_num_threads(1)
        if torch.cuda.is_available():  # fp32 comparisons at 1e-5: no TF32 (torch enables it for cuDNN by default)
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        results.put((rank, "ok", fn(*args)))
        code = 0
    except BaseException:  # report anything, then leave
        results.put((rank, "error", traceback.format_exc()))
        code = 1
    try:
        results.close()
        results.join_thread()  # the queue's feeder thread must flush before os._exit
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    finally:
        os._exit(code)


def run_ranks(fn, world: int, *args, timeout: float = 300.0, launcher: str = "torchrun") -> list:
    """fn(*args) on `world` spawned ranks; returns the per-rank results in rank order.

    launcher: which environment the ranks see ('torchrun' or 'slurm' variables).
    """
    # cuBLAS/cuDNN read this when they start in each rank; NGC images may force TF32 otherwise
    os.environ.setdefault("NVIDIA_TF32_OVERRIDE", "0")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    while launcher == "slurm" and not 10000 <= port < 60000:  # SLURM's port is derived from the job id
        port = free_port()
    dump_after = max(1.0, timeout - 5)
    procs = [
        ctx.Process(target=_worker, args=(fn, r, world, port, results, args, dump_after, launcher), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    out, deadline, finished = {}, time.monotonic() + timeout, False
    try:
        while len(out) < world:
            try:
                rank, status, value = results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"{world}-rank run did not finish in {timeout:.0f} s; ranks done: {sorted(out)}")
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            out[rank] = value
        finished = True
    finally:
        for p in procs:
            if finished:  # ranks exit right after reporting; a failed run's ranks may be stuck in a collective
                p.join(timeout=10)
            if p.is_alive():
                p.kill()
            p.join(timeout=5)
    return [out[r] for r in range(world)]
