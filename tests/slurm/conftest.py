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


@pytest.fixture(autouse=True)
def _no_job_left(request):
    """After each test on the shared cluster, cancel whatever it left running: a hung job would otherwise
    hold both nodes and fail every later test with a pending job."""
    yield
    if "slurm" in request.fixturenames:
        request.getfixturevalue("slurm").cancel_all()
