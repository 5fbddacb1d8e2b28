"""The trainer's stop request (checkpoint, exit 75, resume), without SLURM: by run.stop_file and by SIGUSR1.
The launchers under a real SLURM are in tests/slurm."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tmd_megatron.training.checkpoint import read_meta, resolve_checkpoint
from tmd_megatron.training.trainer import REQUEUE_EXIT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
TRAIN = [sys.executable, "-m", "tmd_megatron.cli.train", "experiment=tiny_smoke", "run.tensorboard=false",
         "run.ckpt_every=0", "run.device=cpu"]


def _start(out, *extra) -> subprocess.Popen:
    return subprocess.Popen([*TRAIN, f"run.out_dir={out}", *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"), text=True)


def _checkpoint_step(out) -> int | None:
    found = resolve_checkpoint(out / "checkpoints")
    return None if found is None else int(read_meta(found)["step"])


def _logged(out) -> list[int]:
    """Every logged step in order; a step run twice would appear twice."""
    path = out / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def test_stop_file_present_at_start_stops_after_the_first_step_then_resume_finishes(tmp_path):
    out, stop = tmp_path / "run", tmp_path / "stop_request"
    stop.touch()  # asked while the ranks were still starting: honoured at the first step boundary
    proc = _start(out, "run.max_steps=4", f"run.stop_file={stop}")
    text, _ = proc.communicate(timeout=300)
    assert proc.returncode == REQUEUE_EXIT, text
    assert f"stopped at step 1 (run.stop_file {stop} appeared); checkpoint written" in text, text
    assert _checkpoint_step(out) == 1 and _logged(out) == [1]

    stop.unlink()  # what the launcher does before the next attempt
    proc = _start(out, "run.max_steps=4", f"run.stop_file={stop}")
    text, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, text
    assert "resumed from" in text and _checkpoint_step(out) == 4 and _logged(out) == [1, 2, 3, 4]


def test_sigusr1_during_training_checkpoints_the_current_step_and_exits_75(tmp_path):
    out, steps = tmp_path / "run", 200
    proc = _start(out, f"run.max_steps={steps}")
    deadline = time.monotonic() + 300
    while len(_logged(out)) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    text, _ = proc.communicate(timeout=300)
    assert proc.returncode == REQUEUE_EXIT, text
    stopped = _checkpoint_step(out)
    assert stopped is not None and 2 <= stopped < steps, text
    assert f"stopped at step {stopped} (SIGUSR1/SIGTERM); checkpoint written" in text, text
    assert _logged(out) == list(range(1, stopped + 1))


def test_a_step_past_hang_dump_s_writes_the_python_stacks_and_training_goes_on(tmp_path):
    """run.hang_dump_s re-arms a watchdog every step: a step that runs longer (here: every step, with a limit of
    1 ms) writes each thread's stack to stderr while the rank is busy, and the run still finishes (faulthandler's
    watchdog, which reads frames without the GIL, crashed a busy rank with SIGSEGV in this test)."""
    out = tmp_path / "run"
    proc = _start(out, "run.max_steps=3", "run.hang_dump_s=0.001")
    text, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, text
    assert "rank 0: step 1 has run for" in text and "Python stacks:" in text, text
    assert "in fit" in text and "trainer.py" in text, text  # the main thread's stack, inside the step
    assert _logged(out) == [1, 2, 3]
