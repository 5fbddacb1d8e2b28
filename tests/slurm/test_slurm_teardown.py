"""Teardown of the test cluster, proven with a job still running (its own module, so that no other test
cluster is up and the /etc/hosts entries are this cluster's own)."""
import pytest

from launch_env import launcher_env
from slurm_cluster import HOSTS_MARK, SlurmCluster, install_reason
from test_slurm_launch import LAYOUT, SMALL, submit, wait_for_checkpoint

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300)]


def test_teardown_leaves_no_processes(tmp_path):
    """Stop a cluster while a job's ranks run: daemons, slurmstepd, srun and ranks must all be gone."""
    reason = install_reason()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster()
    try:
        cluster.start()
        run_dir = tmp_path / "run"
        job, _ = submit(cluster, tmp_path, *SMALL, **launcher_env(run_dir, max_steps=100000), **LAYOUT)
        wait_for_checkpoint(run_dir, cluster, job)
        assert HOSTS_MARK in open("/etc/hosts").read()
        running = cluster.processes()
        names = {p.name() for p in running}
        assert {"slurmctld", "slurmd", "slurmstepd", "munged", "srun"} <= names, names
        ranks = [p for p in running if p.name() == "tmd-train" or p.name().startswith("python")]
        assert len(ranks) >= 4, names  # the job's 4 ranks
    finally:
        cluster.stop()
    assert cluster.processes() == []
    assert all(d.poll() is not None for d in cluster._daemons)  # reaped: no zombies of ours either
    assert HOSTS_MARK not in open("/etc/hosts").read()
    cluster.remove()
