"""The launchers without SLURM: launch/smoke_8gpu.sh on 8 CPU processes over gloo, TP2 x CP2 x PP2 (what
`make smoke` runs), and the cluster launchers' refusal outside a SLURM job."""
import os
import subprocess

import pytest

from launch_env import LAUNCH, checkpoint_step, launcher_env, logged_steps

SMOKE = LAUNCH / "smoke_8gpu.sh"
NO_SLURM = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}


def run_smoke(env: dict, timeout: float) -> tuple[int, str]:
    proc = subprocess.run(["bash", str(SMOKE)], env=dict(NO_SLURM, **env), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.multirank
@pytest.mark.timeout(300)
def test_smoke_passes_on_8_gloo_processes(tmp_path):
    run_dir = tmp_path / "run"
    code, out = run_smoke(dict(launcher_env(run_dir, max_steps=3), TMD_DEVICE="cpu"), timeout=240)
    assert code == 0, out
    assert "smoke: 8 ranks on cpu, TP2 x CP2 x PP2 x DP1, backend torch" in out, out
    assert "smoke passed: 3 steps on 8 ranks, checkpoint step 3" in out, out
    assert checkpoint_step(run_dir) == 3
    assert logged_steps(run_dir) == [1, 2, 3]


@pytest.mark.parametrize("setting, message", [
    ({"TMD_NPROC": "6"}, "6 ranks do not divide into TP2 x CP2 x PP2 = 8; change TMD_TP/TMD_CP/TMD_PP"),
    ({"TMD_TP": "0"}, "TMD_TP=0: must be a positive integer"),
])
def test_smoke_refuses_a_bad_layout_before_starting(tmp_path, setting, message):
    code, out = run_smoke(dict(launcher_env(tmp_path / "run", max_steps=3), TMD_DEVICE="cpu", **setting), 30)
    assert code == 2 and message in out, out
    assert not (tmp_path / "run").exists()  # refused before a rank started


@pytest.mark.parametrize("script", ["tmd_14b.sh", "tmd_1p3b.sh"])
def test_cluster_launchers_outside_slurm_say_how_to_run_them(script):
    proc = subprocess.run(["bash", str(LAUNCH / script)], env=NO_SLURM, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "run this through sbatch (or inside salloc); for one node without SLURM see smoke_8gpu.sh" in proc.stderr
