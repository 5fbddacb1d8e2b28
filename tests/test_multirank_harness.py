"""The spawn harness itself: a failing or hung rank ends the run promptly and leaves no process behind."""
import os
import time

import pytest
import torch.multiprocessing as mp

from harness_cases import fail_on_rank_one, hang
from multirank import run_ranks

pytestmark = pytest.mark.multirank


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is not alive
        return f.read().split()[2] != "Z"


def test_failing_rank_reports_its_traceback_and_kills_the_rest():
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="rank 1 failed(.|\n)*deliberate failure"):
        run_ranks(fail_on_rank_one, 2, timeout=60)
    assert time.monotonic() - start < 40
    assert mp.active_children() == []


def test_hung_ranks_time_out_and_are_killed(tmp_path):
    with pytest.raises(TimeoutError, match="did not finish in 8 s"):
        run_ranks(hang, 2, str(tmp_path), timeout=8)
    pids = [int(p.name[3:]) for p in tmp_path.iterdir()]
    assert len(pids) == 2 and not any(_alive(pid) for pid in pids)
