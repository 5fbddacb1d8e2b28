"""Training checkpoints: atomic commit, `latest`, pruning, survival of kill -9 mid-save, resharding."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from tmd_megatron.training.checkpoint import (
    ResumeError,
    complete_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)


def _state(k: float, n: int = 1000):
    return {"w": torch.full((n,), k), "opt": {"m": torch.full((n // 2,), -k)}, "step": torch.tensor(int(k))}


def test_round_trip_latest_and_pruning(tmp_path):
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, step, _state(step), {"loader": {"epoch": 0, "index": step}}, keep_last=2)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_00000030", "step_00000040"]
    path = resolve_checkpoint(tmp_path)
    assert path.name == "step_00000040"
    target = _state(0)
    meta = load_checkpoint(path, target)
    assert meta["step"] == 40 and meta["loader"]["index"] == 40
    assert torch.equal(target["w"], torch.full((1000,), 40.0)) and torch.equal(target["opt"]["m"], torch.full((500,), -40.0))
    assert resolve_checkpoint(tmp_path / "none") is None
    with pytest.raises(ResumeError, match="not a complete checkpoint"):
        resolve_checkpoint(tmp_path, "10")


def test_stale_tmp_and_dangling_latest(tmp_path):
    save_checkpoint(tmp_path, 1, _state(1), {})
    (tmp_path / "step_00000002.tmp").mkdir()  # a save that died
    (tmp_path / "latest").write_text("step_00000002\n")  # cannot happen with our writer, but be robust
    assert resolve_checkpoint(tmp_path).name == "step_00000001"
    save_checkpoint(tmp_path, 3, _state(3), {})
    assert not list(tmp_path.glob("*.tmp"))


SAVER = textwrap.dedent(
    """
    import sys, torch
    from tmd_megatron.training.checkpoint import save_checkpoint
    d = sys.argv[1]
    for step in range(1, 1000):
        big = {"a": torch.full((2_000_000,), float(step)), "b": torch.full((1_000_000,), -float(step))}
        save_checkpoint(d, step, big, {"marker": step}, keep_last=2)
        print(step, flush=True)
    """
)


@pytest.mark.slow
def test_kill_minus_9_during_saves_leaves_a_consistent_latest(tmp_path):
    """SIGKILL a process that saves continuously, at several moments; latest always loads whole and consistent."""
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    resumed = interrupted = 0
    for trial, delay in enumerate((0.0, 0.15, 0.4)):
        d = tmp_path / f"run{trial}"
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(d)], stdout=subprocess.PIPE, env=env)
        # Kill at a moment relative to the saver's own progress (not wall time), so a loaded machine still
        # lands the signal after a commit and, often, in the middle of the next save.
        for _ in range(2):
            assert proc.stdout.readline(), "the saver exited before committing twice"
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        interrupted += bool(list(d.glob("*.tmp")))
        path = resolve_checkpoint(d)
        if path is None:  # killed before the first commit: nothing to resume, which is also consistent
            continue
        target = {"a": torch.zeros(2_000_000), "b": torch.zeros(1_000_000)}
        meta = load_checkpoint(path, target)
        k = float(meta["marker"])
        assert torch.equal(target["a"], torch.full_like(target["a"], k))
        assert torch.equal(target["b"], torch.full_like(target["b"], -k))
        resumed += 1
    assert resumed == 3
    print(f"{resumed} runs resumed, {interrupted} killed with a save in flight")
