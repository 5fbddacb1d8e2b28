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


def test_gpu_smoke_runs_transformer_engine_in_bf16_and_the_planner_accepts_it(tmp_path, capsys):
    """On GPU nodes the smoke runs TE in bf16 (TE has no fp32 kernel under CP): the trainer arguments it would
    start, captured with a stand-in torchrun, pass the same recipe check the trainer makes, at 8 ranks."""
    from tmd_megatron.cli.plan import main as plan_main

    fake = tmp_path / "torchrun"
    fake.write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$TMD_ARGS_OUT"\n')
    fake.chmod(0o755)
    env = dict(launcher_env(tmp_path / "run", max_steps=3), TMD_DEVICE="cuda", TMD_BACKEND="",
               TMD_TORCHRUN=str(fake), TMD_ARGS_OUT=str(tmp_path / "args"))
    code, out = run_smoke(env, 60)
    assert code == 2 and "expected a committed checkpoint" in out, out  # nothing trained, as intended
    args = (tmp_path / "args").read_text().split("\n")
    overrides = [a for a in args[args.index("tmd-train") + 1:] if a]
    assert "model.backend=te" in overrides and "model.compute_dtype=bf16" in overrides
    recipe = overrides[0].removeprefix("experiment=")
    assert plan_main([recipe, *overrides[1:], "--world", "8"]) == 0
    capsys.readouterr()
    assert plan_main([recipe, *overrides[1:], "model.compute_dtype=fp32", "--world", "8"]) == 2  # the old smoke
    assert "no fp32 attention kernel" in capsys.readouterr().err


def _env_sh(**env) -> dict[str, str]:
    script = f'source "{LAUNCH / "env.sh"}"; env'
    proc = subprocess.run(["bash", "-c", script], env=dict(NO_SLURM, **env), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)


def _own_address() -> tuple[str, str] | None:
    out = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        dev, addr = line.split()[1], line.split()[3].split("/")[0]
        if dev != "lo" and not addr.startswith("127."):
            return dev, addr
    return None


def test_env_sh_binds_socket_traffic_to_the_interface_that_reaches_the_master(tmp_path):
    own = _own_address()
    if own is None:
        pytest.skip("no non-loopback IPv4 interface here")
    dev, addr = own
    got = _env_sh(MASTER_ADDR=addr, TMD_RUN_DIR=str(tmp_path))  # the master node: its own address
    assert got["GLOO_SOCKET_IFNAME"] == dev and got["NCCL_SOCKET_IFNAME"] == dev
    assert got["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    assert got["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] == f"{tmp_path}/nccl_trace_rank_"
    assert not any(tmp_path.iterdir())  # sourcing env.sh creates nothing
    assert _env_sh(MASTER_ADDR="127.0.0.1")["GLOO_SOCKET_IFNAME"] == "lo"  # one node on loopback
    mine = _env_sh(MASTER_ADDR=addr, GLOO_SOCKET_IFNAME="ib7", TMD_SOCKET_IFNAME="bond0")
    assert mine["GLOO_SOCKET_IFNAME"] == "ib7" and mine["NCCL_SOCKET_IFNAME"] == "bond0"  # the operator's wins
