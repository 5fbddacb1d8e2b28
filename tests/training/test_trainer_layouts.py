"""Issue acceptance: stage-1 (TM-MF) and stage-2 (TMD trio) steps of the real trainer under TP2, CP2, PP2, DP2
and TP2 x CP2 x PP2 (8 ranks) equal one process: every step's losses and every trained role's parameters after
3 steps (student, fake score, discriminator), fp32, within 1e-5 relative. The Wan family in the same spawn: an
I2V model (image tokens and conditioning latent through PP), TI2V (per-token timesteps across stages and CP
shards, pinned first frame) and a two-expert A14B teacher and fake score (ExpertStage under PP)."""
import pytest

from layout_cases import METHODS, compare, max_param_error, run_case, run_cases
from multirank import run_ranks

pytestmark = [pytest.mark.multirank, pytest.mark.slow]

TWO = {"tp2": dict(tp=2), "cp2_ring": dict(cp=2), "cp2_ulysses": dict(cp=2, cp_comm="ulysses"),
       "pp2": dict(pp=2), "dp2": dict()}
# every discriminator head on the last stage: the first stage holds none of that role (and must not hang)
HEADS_LAST = ["method.dmd2v.disc_layers=[3]"]
EIGHT = {"tp2_cp2_pp2": dict(tp=2, cp=2, pp=2)}
FAMILY = {
    "tmd/i2v_pp2": ("tmd", dict(pp=2, overrides=["model.preset=tiny-i2v"])),
    "tm_mf/ti2v_pp2": ("tm_mf", dict(pp=2, overrides=["model.preset=tiny-ti2v"])),
    "tmd/ti2v_cp2": ("tmd", dict(cp=2, overrides=["model.preset=tiny-ti2v"])),
    "tmd/a14b_pp2": ("tmd", dict(pp=2, overrides=["model.preset=tiny-a14b"])),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    base = tmp_path_factory.mktemp("reference")
    return {m: run_case(m, {"distributed": False}, str(base / m)) for m in METHODS}


@pytest.fixture(scope="module")
def two_rank(tmp_path_factory):
    cases = {f"{m}/{name}": (m, lay) for m in METHODS for name, lay in TWO.items()}
    cases["tmd/pp2_heads_last"] = ("tmd", dict(pp=2, overrides=HEADS_LAST))
    cases.update(FAMILY)
    return run_ranks(run_cases, 2, cases, str(tmp_path_factory.mktemp("two")), timeout=1200)[0]


@pytest.fixture(scope="module")
def eight_rank(tmp_path_factory):
    cases = {f"{m}/{name}": (m, lay) for m in METHODS for name, lay in EIGHT.items()}
    return run_ranks(run_cases, 8, cases, str(tmp_path_factory.mktemp("eight")), timeout=1200)[0]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("layout", TWO)
def test_two_rank_layouts_equal_one_process(reference, two_rank, method, layout):
    case = two_rank[f"{method}/{layout}"]
    assert compare(case, reference[method]) == []
    print(f"{method} {layout}: max param error {max_param_error(case, reference[method]):.1e}")


def test_pp2_with_every_discriminator_head_on_one_stage(two_rank, tmp_path):
    reference = run_case("tmd", {"distributed": False, "overrides": HEADS_LAST}, str(tmp_path))
    assert compare(two_rank["tmd/pp2_heads_last"], reference) == []


@pytest.mark.parametrize("name", FAMILY)
def test_wan_family_layouts_equal_one_process(two_rank, tmp_path, name):
    method, layout = FAMILY[name]
    reference = run_case(method, {"distributed": False, "overrides": layout["overrides"]}, str(tmp_path))
    assert compare(two_rank[name], reference) == []
    print(f"{name}: max param error {max_param_error(two_rank[name], reference):.1e}")


@pytest.mark.parametrize("method", METHODS)
def test_tp2_cp2_pp2_on_eight_ranks_equals_one_process(reference, eight_rank, method):
    case = eight_rank[f"{method}/tp2_cp2_pp2"]
    assert compare(case, reference[method]) == []
    print(f"{method} tp2_cp2_pp2: max param error {max_param_error(case, reference[method]):.1e}")


def test_reference_trains_every_role(reference):
    """The comparison has teeth: the reference's steps moved every role, and the losses are not degenerate."""
    import torch

    from tmd_megatron.training.config import compose, resolve
    from tmd_megatron.training.roles import fresh_wan_state

    teacher = fresh_wan_state(resolve(compose(["experiment=tiny_smoke"])).wan, 0, zero_head=False)
    tmd = reference["tmd"]
    assert set(tmd["full"]) == {"student", "fake", "disc"}
    assert any(not torch.equal(torch.from_numpy(tmd["full"]["fake"][k]), teacher[k]) for k in teacher)
    for name in ("vsd", "gan_generator", "fake_score_loss", "discriminator_loss"):
        assert any(abs(m.get(name, 0.0)) > 1e-6 for m in tmd["metrics"]), name
    assert all(m["tm_mf_loss"] > 0 for m in reference["tm_mf"]["metrics"])
