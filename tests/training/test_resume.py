"""Exact resume (kill -9 at a random step) and resuming under another parallel layout."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tmd_megatron.training.metrics import TIMING_METRICS, read_metrics

pytestmark = pytest.mark.slow
TRAIN = [sys.executable, "-m", "tmd_megatron.cli.train", "experiment=tiny_smoke", "run.tensorboard=false",
         "run.ckpt_every=1", "run.device=cpu"]
STABLE_ADAM = "optim.eps=1e-3"  # see layout_cases.STABLE_ADAM


def _train(out, *extra, wait=True):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([*TRAIN, f"run.out_dir={out}", *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=env, text=True)
    if wait:
        out_text, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out_text
        return out_text
    return proc


def _trajectory(out):
    return [{k: v for k, v in r.items() if k not in TIMING_METRICS} for r in read_metrics(out / "metrics.jsonl")]


def _logged(out) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.timeout(600)
def test_kill_minus_9_at_a_random_step_then_resume_is_bit_identical(tmp_path):
    steps = 8
    _train(tmp_path / "a", f"run.max_steps={steps}")
    kill_after = random.Random(os.getpid()).randint(2, steps - 2)
    proc = _train(tmp_path / "b", f"run.max_steps={steps}", wait=False)
    deadline = time.monotonic() + 300
    while _logged(tmp_path / "b") < kill_after:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() is not None else ""
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    out = _train(tmp_path / "b", f"run.max_steps={steps}")
    assert "resumed from" in out, out
    a, b = _trajectory(tmp_path / "a"), _trajectory(tmp_path / "b")
    assert [r["step"] for r in a] == list(range(1, steps + 1))
    assert a == b  # every loss and gradient norm of every step, bit for bit
    wa = load_file(tmp_path / "a" / "export" / "wan" / "diffusion_pytorch_model.safetensors")
    wb = load_file(tmp_path / "b" / "export" / "wan" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    print(f"killed after step {kill_after} of {steps}; trajectories identical")


def _layout_then_resume(first: dict, then: dict, out: str, steps: tuple[int, int]):
    """On every rank: train `steps[0]` steps under one layout, then continue to `steps[1]` under another."""
    import io

    from tmd_megatron.parallel import destroy_topology, init_topology
    from tmd_megatron.training.config import compose, resolve
    from tmd_megatron.training.trainer import Trainer

    for layout, max_steps in ((first, steps[0]), (then, steps[1])):
        res = resolve(compose(["experiment=tiny_smoke", f"run.out_dir={out}", f"run.max_steps={max_steps}",
                               "run.tensorboard=false", STABLE_ADAM, *[f"parallel.{k}={v}" for k, v in layout.items()]]))
        topo = init_topology(layout.get("tp", 1), layout.get("cp", 1), layout.get("pp", 1), device="cpu")
        Trainer(res, topo, stream=io.StringIO()).fit()
    destroy_topology()
    return None


@pytest.mark.multirank
@pytest.mark.timeout(900)
@pytest.mark.parametrize("first, then, layout_after", [
    ({"tp": 2}, {"pp": 2}, {"dp": 1, "tp": 1, "cp": 1, "pp": 2}),  # TP shards -> pipeline stages
    ({"cp": 1}, {"cp": 1}, {"dp": 2, "tp": 1, "cp": 1, "pp": 1}),  # ZeRO-1 slices over DP2 gathered and re-sliced
])
def test_save_under_one_layout_resume_under_another(tmp_path, first, then, layout_after):
    from multirank import run_ranks

    _train(tmp_path / "ref", "run.max_steps=4", STABLE_ADAM)
    run_ranks(_layout_then_resume, 2, first, then, str(tmp_path / "moved"), (2, 4), timeout=800)
    ref, moved = _trajectory(tmp_path / "ref"), _trajectory(tmp_path / "moved")
    assert [r["step"] for r in moved] == [1, 2, 3, 4]
    from layout_cases import tolerance

    for r, m in zip(ref, moved):
        for name, want in r.items():
            if name != "step" and not name.startswith("grad_norm"):
                assert abs(m[name] - want) <= tolerance(name, want), (r["step"], name, m[name], want)
    info = json.loads((tmp_path / "moved" / "checkpoints" / "step_00000004" / "meta.json").read_text())
    assert info["layout"] == layout_after
