"""Issue acceptance: stage-1 (TM-MF) and stage-2 (TMD trio) steps of the real trainer under TP2, CP2, PP2, DP2
and TP2 x CP2 x PP2 (8 ranks) equal one process: every step's losses and every trained role's parameters after
3 steps (student, fake score, discriminator), fp32, within 1e-5 relative. Under bf16 autocast (the GPU recipes'
policy) the stage-2 steps of TP2+SP, CP2 ring / Ulysses and PP2 stay within twice the distance from the fp32
run that one process under the same autocast has. The Wan family in the same spawn: an I2V model (image tokens
and conditioning latent through PP), TI2V (per-token timesteps across stages and CP shards, pinned first frame)
and a two-expert A14B teacher and fake score (ExpertStage under PP)."""
import pytest

from layout_cases import METHODS, compare, max_param_error, run_case, run_cases
from multirank import run_ranks

pytestmark = [pytest.mark.multirank, pytest.mark.slow]

TWO = {"tp2": dict(tp=2), "cp2_ring": dict(cp=2), "cp2_ulysses": dict(cp=2, cp_comm="ulysses"),
       "pp2": dict(pp=2), "dp2": dict()}
# every discriminator head on the last stage: the first stage holds none of that role (and must not hang)
HEADS_LAST = ["method.dmd2v.disc_layers=[3]"]
EIGHT = {"tp2_cp2_pp2": dict(tp=2, cp=2, pp=2)}
BF16 = ["model.compute_dtype=bf16"]
BF16_LAYOUTS = {"tp2_sp": dict(tp=2), "cp2_ring": dict(cp=2), "cp2_ulysses": dict(cp=2, cp_comm="ulysses"),
                "pp2": dict(pp=2)}
BF16_FACTOR = 2.0  # as tests/parallel_cases.py
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
    cases.update({f"tmd_bf16/{name}": ("tmd", dict(lay, overrides=BF16)) for name, lay in BF16_LAYOUTS.items()})
    cases.update(FAMILY)
    return run_ranks(run_cases, 2, cases, str(tmp_path_factory.mktemp("two")), timeout=1500)[0]


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


def bf16_errors(case: dict, ref: dict) -> dict:
    """Distance from the fp32 run: of the parameters (every trained role, relative to its largest entry) and of
    the losses (the worst metric over steps, relative; VSD on its terms' scale). Each loss alone is too noisy
    a yardstick (one process's bf16 error on gan_generator was 3.5e-4 by luck, beside 1.3e-2 on VSD)."""
    from layout_cases import tolerance

    losses = [abs(a[name] - want) / tolerance(name, want, 1.0) for a, b in zip(case["metrics"], ref["metrics"])
              for name, want in b.items() if not (name.startswith("grad_norm") or name == "step_time_s")]
    return {"params": max_param_error(case, ref), "losses": max(losses)}


@pytest.fixture(scope="module")
def bf16_single(tmp_path_factory):
    return run_case("tmd", {"distributed": False, "overrides": BF16}, str(tmp_path_factory.mktemp("bf16")))


@pytest.mark.parametrize("layout", BF16_LAYOUTS)
def test_bf16_stage2_layouts_within_twice_the_single_process_bf16_error(reference, bf16_single, two_rank, layout):
    single = bf16_errors(bf16_single, reference["tmd"])
    assert single["params"] > 1e-4  # bf16 really ran: the fp32 comparison would be meaningless otherwise
    got = bf16_errors(two_rank[f"tmd_bf16/{layout}"], reference["tmd"])
    print(f"bf16 {layout}: " + ", ".join(f"{k} {got[k]:.1e} (one process {single[k]:.1e})" for k in sorted(got)))
    over = {k: (got[k], single[k]) for k in got if got[k] > BF16_FACTOR * single[k]}
    assert not over, over


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
