"""Run multi-rank benchmark cases under torchrun (gloo on this machine) and collect each rank's JSON results.

`run_cases([("comm", {...}), ("pipeline", {...})], 2)` starts
`torchrun --standalone --nproc-per-node=2 -m tmd_megatron.bench.ranks` in its own process group, waits at most
`timeout` seconds, and kills the whole group if it runs over, so a hung rank never outlives the benchmark.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path


def run_cases(cases: list[tuple[str, dict]], ranks: int, timeout: float = 600.0) -> list[list[dict]]:
    """Results of `tmd_megatron.bench.ranks.CASES[name](**kwargs)` for each case: [case][rank]."""
    names = "+".join(name for name, _ in cases)
    with tempfile.TemporaryDirectory(prefix="bench-ranks-") as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               "-m", "tmd_megatron.bench.ranks", json.dumps(cases), tmp]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two cores for all ranks
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            raise TimeoutError(f"benchmark cases {names} on {ranks} ranks ran past {timeout:.0f} s:\n{out[-4000:]}")
        if proc.returncode != 0:
            raise RuntimeError(f"benchmark cases {names} on {ranks} ranks failed (exit {proc.returncode}):\n{out[-4000:]}")
        per_rank = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(ranks)]
    return [[per_rank[r][i] for r in range(ranks)] for i in range(len(cases))]
