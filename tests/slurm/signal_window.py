"""Measures why launch/lib.sh asks the ranks to stop through a file: how often a signal sent to a job step
while srun starts it kills a task whose very first command ignores that signal. Run by hand (root, ~2 min):

    .venv/bin/python tests/slurm/signal_window.py [tries]

Each try inside one job: `srun --ntasks=2 bash -c 'trap "" USR1; exec sleep 1' &`, then 40 x
`scancel --signal=USR1 <job>` at once. A try whose step ends 138 (128 + SIGUSR1) lost a task.
"""
from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

from slurm_cluster import SlurmCluster, install_reason

JOB = """#!/bin/bash
for i in $(seq 1 {tries}); do
    srun --kill-on-bad-exit=0 --ntasks=2 bash -c 'trap "" USR1; exec sleep 1' &
    pid=$!
    for j in $(seq 1 40); do scancel --signal=USR1 "$SLURM_JOB_ID" 2>/dev/null; done
    wait $pid
    echo "try $i step exit $?"
done
"""


def main(tries: int) -> None:
    reason = install_reason()
    if reason:
        sys.exit(reason)
    work = Path(tempfile.mkdtemp(prefix="tmd-signal-window-"))
    script, out = work / "job.sh", work / "job.out"
    script.write_text(JOB.format(tries=tries))
    cluster = SlurmCluster()
    try:
        cluster.start()
        job = cluster.sbatch(script, "--nodes=1", "--ntasks=2", f"--output={out}", cwd=work)
        cluster.follow(job, timeout=30 + 20 * tries)
    finally:
        cluster.stop()
        cluster.remove()
    codes = [int(c) for c in re.findall(r"step exit (\d+)", out.read_text())]
    killed = sum(c == 138 for c in codes)
    print(f"{killed} of {len(codes)} tries lost a task to SIGUSR1 sent while srun started the step")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 15)
