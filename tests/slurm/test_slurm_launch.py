"""The real launch/tmd_14b.sh under a real SLURM (slurmctld + 2 emulated slurmd on this machine).

The launcher is submitted unchanged; command-line sbatch options shrink it to 2 nodes x 2 ranks on one CPU
each, and TMD_* variables select the tiny CPU recipe over gloo (launch_env.py). The trainer is the one
real tmd-train on experiment=tiny_smoke (launch_env.py).
"""
import re
import time

import pytest

from launch_env import LAUNCH, checkpoint_step, launcher_env, logged_steps
from slurm_cluster import ClusterError

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300)]

SCRIPT = LAUNCH / "tmd_14b.sh"
# 2 nodes x 2 ranks, one CPU each; --gpus-per-node=8, --mem=0, --exclusive, --signal, --requeue and
# --output stay as the script has them. --time leaves the script's USR1@600 out of the way.
SMALL = ["--nodes=2", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=30"]
LAYOUT = {"TMD_TP": "2", "TMD_CP": "1", "TMD_PP": "1"}  # DP2, one replica per node


def submit(slurm, tmp_path, *options, **env):
    submit_dir = tmp_path / "submit"
    (submit_dir / "logs").mkdir(parents=True, exist_ok=True)
    job = slurm.sbatch(SCRIPT, *options, env=env, cwd=submit_dir)
    return job, submit_dir / "logs" / f"tmd-14b-{job}.out"


def read_log(path) -> str:
    return path.read_text() if path.exists() else f"(no log at {path})"


def follow(slurm, job, log, timeout):
    """slurm.follow, failing with the job's log and what its processes are doing when it does not end."""
    try:
        return slurm.follow(job, timeout)
    except ClusterError as err:
        raise AssertionError(f"{err}\n== job log\n{read_log(log)[-6000:]}\n{slurm.diagnosis(job)}") from None


def wait_for_checkpoint(run_dir, slurm, job, timeout=90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if checkpoint_step(run_dir):
            return checkpoint_step(run_dir)
        assert slurm.job(job).get("JobState") in ("PENDING", "RUNNING"), slurm.job(job)
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint in {run_dir} after {timeout} s\n{slurm.diagnosis(job)}")


def test_tmd_14b_completes_on_two_emulated_nodes(slurm, tmp_path):
    run_dir = tmp_path / "run"
    job, log = submit(slurm, tmp_path, *SMALL, **launcher_env(run_dir, max_steps=3), **LAYOUT)
    seen = follow(slurm, job, log, timeout=180)
    info = slurm.job(job)
    text = read_log(log)
    assert seen[-1] == ("COMPLETED", "0"), (seen, text)
    assert info["ExitCode"] == "0:0" and info["NodeList"] == "tmdn[1-2]"
    assert "gpu:8" in info.get("TresPerNode", ""), info  # the script's --gpus-per-node=8 was granted
    assert "2 nodes x 2 ranks (srun mode), TP2 x CP1 x PP1 x DP2, rendezvous tmdn1:" in text, text
    assert "resume point: none" in text and "trainer exited 0" in text and "] finished" in text, text
    assert checkpoint_step(run_dir) == 3
    assert logged_steps(run_dir) == [1, 2, 3]
    assert (run_dir / "export" / "student.json").exists()  # the TMD student was exported at the end


def wait_for_log(path, needle, slurm, job, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if needle in read_log(path):
            return
        assert slurm.job(job).get("JobState") in ("PENDING", "RUNNING"), (slurm.job(job), read_log(path))
        time.sleep(0.1)
    raise AssertionError(f"{needle!r} not in {path} after {timeout} s:\n{read_log(path)}\n{slurm.diagnosis(job)}")


@pytest.mark.parametrize("mode, when", [("srun", "training"), ("torchrun", "training"), ("srun", "start-up")])
def test_signal_checkpoints_requeues_and_resumes(slurm, tmp_path, mode, when):
    """USR1 to the batch shell (what --signal=B:USR1@600 delivers before the time limit) -> the launcher
    writes the run's stop file -> every rank checkpoints and exits 75 -> the job requeues itself -> the next
    attempt resumes from `latest`. During start-up (srun still starting the tasks, which a signal would kill
    before their handler is in place) the request must wait for the first step, and no rank may die."""
    run_dir, steps = tmp_path / "run", 30
    env = launcher_env(run_dir, max_steps=steps, TMD_LAUNCH_MODE=mode, **LAYOUT)
    job, log = submit(slurm, tmp_path, *SMALL, **env)
    if when == "training":
        wait_for_checkpoint(run_dir, slurm, job)
    else:
        wait_for_log(log, "] trainer: ", slurm, job)  # the step is starting; the ranks are importing torch
        assert checkpoint_step(run_dir) is None
    slurm.run(["scancel", "--batch", "--signal=USR1", str(job)])
    seen = follow(slurm, job, log, timeout=240)
    text = read_log(log)
    assert ("PENDING", "1") in seen and seen[-1] == ("COMPLETED", "1"), (seen, text)
    assert slurm.job(job)["ExitCode"] == "0:0"

    saved = re.search(r"checkpoint (step_\d{8}) saved; requeueing job \d+ \(requeue 1 of at most 30\)", text)
    assert saved, text
    interrupted_at = int(saved.group(1)[5:])
    assert 1 <= interrupted_at < steps
    if when == "start-up":
        assert interrupted_at == 1, text  # asked before the first step: answered right after it
    assert f"got SIGUSR1: asking every rank to checkpoint and exit (75): writing {run_dir}/stop_request" in text
    assert f"stopped at step {interrupted_at} (run.stop_file {run_dir}/stop_request appeared)" in text, text
    assert "User defined signal" not in text, text  # no rank was killed by a signal
    if mode == "srun":
        assert "trainer exited 75" in text, text
    assert text.index("attempt 1 on tmdn[1-2]") < text.index(saved.group(0)) < text.index("attempt 2 on tmdn[1-2]")
    assert f"resume point: {saved.group(1)}" in text.split("attempt 2 on")[1]
    assert text.rstrip().endswith("finished"), text
    assert checkpoint_step(run_dir) == steps
    # no step lost, none repeated: attempt 1 logged 1..k, attempt 2 logged k+1..steps
    assert logged_steps(run_dir) == list(range(1, steps + 1)), text
    assert f"resumed from {run_dir}/checkpoints/{saved.group(1)} at step {interrupted_at}" in text, text


def test_time_limit_signal_from_slurmctld_and_requeue_cap(slurm, tmp_path):
    """The script's own `#SBATCH --signal=B:USR1@<lead>`, sent by slurmctld's timer: with a time limit one
    minute above the lead it fires within about a minute. TMD_MAX_REQUEUES=0 then ends the job with 75
    instead of requeueing."""
    lead_s = int(re.search(r"^#SBATCH --signal=B:USR1@(\d+)$", SCRIPT.read_text(), re.M).group(1))
    run_dir = tmp_path / "run"
    env = launcher_env(run_dir, max_steps=100000, TMD_MAX_REQUEUES="0", **LAYOUT)
    job, log = submit(slurm, tmp_path, *SMALL[:-1], f"--time={-(-lead_s // 60) + 1}", **env)
    seen = follow(slurm, job, log, timeout=200)
    text = read_log(log)
    assert seen[-1] == ("FAILED", "0") and slurm.job(job)["ExitCode"] == "75:0", (seen, text)
    assert "got SIGUSR1" in text and "trainer exited 75" in text, text
    assert "not requeueing: already requeued 0 times (TMD_MAX_REQUEUES=0)" in text, text
    step = checkpoint_step(run_dir)
    assert step is not None and 1 <= step < 100000


def test_scancel_checkpoints_and_stops_without_requeue(slurm, tmp_path):
    """scancel sends SIGTERM: the ranks still checkpoint, but the job must end (an operator cancelled it)."""
    run_dir = tmp_path / "run"
    env = launcher_env(run_dir, max_steps=100000, **LAYOUT)
    job, log = submit(slurm, tmp_path, *SMALL, **env)
    before = wait_for_checkpoint(run_dir, slurm, job)
    slurm.run(["scancel", str(job)])
    seen = follow(slurm, job, log, timeout=120)
    text = read_log(log)
    assert seen[-1] == ("CANCELLED", "0") and ("PENDING", "1") not in seen, (seen, text)
    assert "got SIGTERM" in text and "SIGTERM (scancel or preemption): not requeueing" in text, text
    assert "requeueing job" not in text
    assert checkpoint_step(run_dir) > before  # the signal made the ranks save on their way out


def test_failing_trainer_is_not_requeued(slurm, tmp_path):
    """A trainer that fails on start must end the job, not loop. (A bad override no longer reaches the ranks: the
    launcher's tmd-plan precheck refuses it, tests/bad_input_cases.py; here the ranks' command itself fails.)"""
    run_dir = tmp_path / "run"
    env = launcher_env(run_dir, max_steps=3, TMD_TRAIN_CMD="false", **LAYOUT)
    job, log = submit(slurm, tmp_path, *SMALL, **env)
    seen = follow(slurm, job, log, timeout=120)
    text = read_log(log)
    assert seen[-1] == ("FAILED", "0"), (seen, text)
    assert re.search(r"trainer failed \(exit [1-9]\d*\): not requeueing", text), text
    assert "requeueing job" not in text and checkpoint_step(run_dir) is None


def test_layout_that_does_not_divide_the_ranks_is_refused(slurm, tmp_path):
    env = launcher_env(tmp_path / "run", max_steps=3, TMD_TP="3", TMD_CP="1", TMD_PP="1")
    job, log = submit(slurm, tmp_path, *SMALL, **env)
    seen = follow(slurm, job, log, timeout=60)
    text = read_log(log)
    assert seen[-1] == ("FAILED", "0") and slurm.job(job)["ExitCode"] == "2:0", (seen, text)
    assert "4 ranks do not divide into TP3 x CP1 x PP1 = 3; change TMD_TP/TMD_CP/TMD_PP or the number of nodes" in text
    assert "trainer:" not in text  # refused before any rank started
