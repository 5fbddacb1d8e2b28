"""Four gloo ranks (torchrun variables): TP2 x CP2 in both CP modes (also for an I2V model and per-token
timesteps), DP2 combined with TP2 and with CP2, and the seeding rule across real groups. One spawn."""
import pytest

from multirank import run_ranks
from parallel_cases import failures, with_fp64_ac
from parallel_suites import run_suite_with_noise

pytestmark = pytest.mark.multirank

LAYOUTS = {
    "tp2_cp2_ring": dict(tp=2, cp=2, cp_comm="ring"),
    "tp2_cp2_ulysses": dict(tp=2, cp=2, cp_comm="ulysses"),
}
EXTRA = {
    "tp2_cp2_ring_no_sp": dict(tp=2, cp=2, cp_comm="ring", sp=False),
    "dp2_tp2_sp": dict(tp=2),
    "dp2_cp2_ulysses": dict(cp=2, cp_comm="ulysses"),
}
# Wan2.1 I2V (image tokens replicated) and Wan2.2 per-token timesteps (sharded with their tokens) on TP2 x CP2
FAMILY = {"i2v_tp2_cp2_ring": dict(tp=2, cp=2, cp_comm="ring", variant="i2v"),
          "ti2v_tp2_cp2_ulysses": dict(tp=2, cp=2, cp_comm="ulysses", variant="ti2v")}
CASES = {**with_fp64_ac(LAYOUTS), **EXTRA, **FAMILY}


@pytest.fixture(scope="module")
def results():
    return run_ranks(run_suite_with_noise, 4, CASES, timeout=480)


@pytest.mark.parametrize("name", list(CASES))
def test_layout_equals_single_process(results, name):
    assert failures(results, name) == []


@pytest.mark.parametrize("layout", ["tp2", "cp2"])
def test_noise_same_within_sample_different_across_dp(results, layout):
    draws = [r["noise"][layout] for r in results]  # ((dp, cp, tp), noise)
    by_dp = {}
    for (dp, _, _), noise in draws:
        by_dp.setdefault(dp, []).append(noise)
    assert len(by_dp) == 2
    for group in by_dp.values():
        assert all(n == group[0] for n in group)  # identical on the TP/CP ranks of one sample
    assert by_dp[0][0] != by_dp[1][0]  # different across data-parallel ranks


def test_replicated_module_gradient_is_averaged_over_cp(results):
    for r in results:
        assert r["replicated"][True] < 1e-6  # flagged: equals the DP mean
        assert r["replicated"][False] > 0.5  # unflagged: summed over the 2 CP ranks, twice too large
