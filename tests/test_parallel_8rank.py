"""Eight gloo ranks: TP2 x CP2 x PP2 (ring and Ulysses) against one process. One spawn; the slowest test."""
import pytest

from multirank import run_ranks
from parallel_cases import failures, run_suite, with_fp64_ac

pytestmark = [pytest.mark.multirank, pytest.mark.slow]

LAYOUTS = {"tp2_cp2_pp2_ring": dict(tp=2, cp=2, pp=2, microbatches=4, cp_comm="ring")}
EXTRA = {"tp2_cp2_pp2_ulysses": dict(tp=2, cp=2, pp=2, microbatches=4, cp_comm="ulysses")}
CASES = {**with_fp64_ac(LAYOUTS), **EXTRA}


@pytest.fixture(scope="module")
def results():
    return run_ranks(run_suite, 8, CASES, timeout=540)


@pytest.mark.parametrize("name", list(CASES))
def test_layout_equals_single_process(results, name):
    assert failures(results, name) == []
