import pytest

from slurm_cluster import SlurmCluster, install_reason


@pytest.fixture(scope="module")
def slurm():
    """A controller and two emulated nodes (tmdn1, tmdn2) for this module; torn down and checked after."""
    reason = install_reason()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster()
    cluster.start()
    yield cluster
    cluster.stop()
    left = cluster.processes()
    cluster.remove()
    assert not left, f"processes left after teardown: {[(p.pid, p.name()) for p in left]}"
