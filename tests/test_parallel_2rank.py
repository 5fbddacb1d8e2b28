"""Two gloo ranks, launched with SLURM variables: every 2-rank layout against one process (fp32, fp64 with
activation checkpointing, bf16 autocast; also for a Wan2.1 I2V model and Wan2.2 per-token timesteps), the comm
accounting, compiled blocks (model.compile), negative controls, the pipeline engine on a generic stage function, and a two-expert (A14B) model
through ExpertStage. One spawn."""
import pytest

from multirank import run_ranks
from expert_cases import run_suite_with_experts
from parallel_cases import failures, with_fp64_ac

pytestmark = pytest.mark.multirank

LAYOUTS = {
    "tp2": dict(tp=2, sp=False),
    "tp2_sp": dict(tp=2, sp=True),
    "cp2_ring": dict(cp=2, cp_comm="ring"),
    "cp2_ulysses": dict(cp=2, cp_comm="ulysses"),
    "pp2_1f1b": dict(pp=2, microbatches=4, schedule="1f1b"),
    "dp2_zero1": dict(),
}
EXTRA = {
    "cp2_ring_even": dict(cp=2, cp_comm="ring", latent=(2, 8, 8)),  # 32 tokens: no padding
    "cp2_ulysses_even": dict(cp=2, cp_comm="ulysses", latent=(2, 8, 8)),
    "pp2_gpipe": dict(pp=2, microbatches=4, schedule="gpipe"),
}
# bf16 autocast (the GPU recipes' policy) against the fp32 reference, within twice one process's bf16 error
BF16 = {f"{k}_bf16": {**v, "autocast": "bfloat16"} for k, v in LAYOUTS.items() if k != "dp2_zero1"}
SABOTAGE = {
    "broken_qk_norm": dict(tp=2, sabotage="local_qk_norm"),
    "extra_counted": dict(tp=2, sabotage="extra_counted"),
    "extra_raw": dict(tp=2, sabotage="extra_raw"),
}
# model.compile=true: every block compiled on its own (inductor on CPU), collectives left eager; with
# activation checkpointing under TP+SP (checkpointed compiled regions), and under both CP kinds
COMPILED = {"tp2_sp_ac_compiled": dict(tp=2, sp=True, ac=True, compile=True),
            "cp2_ring_compiled": dict(cp=2, cp_comm="ring", compile=True),
            "cp2_ulysses_compiled": dict(cp=2, cp_comm="ulysses", compile=True)}
FAMILY = {f"{variant}_{name}": {**layout, "variant": variant} for variant in ("i2v", "ti2v")
          for name, layout in LAYOUTS.items()}
CASES = {**with_fp64_ac(LAYOUTS), **EXTRA, **BF16, **COMPILED, **FAMILY, **SABOTAGE}


@pytest.fixture(scope="module")
def results():
    return run_ranks(run_suite_with_experts, 2, CASES, timeout=1200, launcher="slurm")


@pytest.mark.parametrize("name", [k for k in CASES if k not in SABOTAGE])
def test_layout_equals_single_process(results, name):
    assert failures(results, name) == []


def test_reduced_qk_norm_is_needed(results):
    """Negative control: without the TP reduction of the q/k squared sums the gradients are far off."""
    errs = [r["layouts"]["broken_qk_norm"]["errors"] for r in results]
    assert max(e["output"] for e in errs) > 1e-3 and max(e["grads"] for e in errs) > 1e-3  # 100x the tolerance


def test_extra_collective_is_caught(results):
    counted = [r["layouts"]["extra_counted"] for r in results]
    assert all(c["comm"]["pipeline"][0] != c["comm"]["pipeline"][1] for c in counted)
    raw = [r["layouts"]["extra_raw"] for r in results]
    assert all(c["comm"]["pipeline"][0] == c["comm"]["pipeline"][1] for c in raw)  # the counter cannot see it...
    assert all(c["c10d_events"] == c["counted_calls"] + 1 for c in raw)  # ...the profiler cross-check does


def test_zero1_shards_optimizer_state(results):
    for r in results:
        held, total = r["layouts"]["dp2_zero1"]["zero_shard"]
        assert total / 2 <= held <= total / 2 + 4  # one half per bucket (4 buckets, padding < 1 element each)


@pytest.mark.parametrize("name,in_flight", [("pp2_1f1b", (2, 1)), ("pp2_gpipe", (4, 4))])
def test_pipeline_schedule_memory(results, name, in_flight):
    """1F1B holds at most p - stage microbatch graphs; GPipe holds all m."""
    for r in results:
        res = r["layouts"][name]
        stage = res["coords"][1]
        assert res["max_in_flight"] == in_flight[stage]


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
def test_engine_trains_like_one_process(results, schedule):
    for r in results:
        e = r["engine"][schedule]
        assert e["order_ok"]
        assert e["wgrad_err"] < 1e-5
        assert e.get("out_err", 0.0) < 1e-6 and e.get("xgrad_err", 0.0) < 1e-6
        if e["stage"] == 0:
            assert e["loss_reported"]


def test_engine_frozen_chain_returns_input_grads(results):
    """Frozen stages, a local loss on stage 0 only, no output gradient: the input gradient still comes back
    on the first stage and can be moved to the last."""
    for r in results:
        e = r["engine"]["frozen"]
        assert e["order_ok"] and e["no_param_grad"]
        assert e.get("xgrad_err", 0.0) < 1e-6 and e.get("transfer_err", 0.0) < 1e-6


def test_engine_forward_only_keeps_no_graph(results):
    for r in results:
        e = r["engine"]["forward_only"]
        assert e["no_graph"] and e["max_in_flight"] == 0
        assert e.get("out_err", 0.0) < 1e-6


def test_engine_first_stage_runs_ahead_of_a_slow_last_stage(results):
    """Sends are posted, not waited on (gloo's send waits for the receiver): in a forward-only stream the first
    stage finishes its forwards while the last is still on its first, instead of in lockstep with it (which would
    end its last forward after the last stage's second, at 2 x SLOW_S)."""
    from pipeline_cases import SLOW_S

    by_stage = {r["engine"]["run_ahead"]["stage"]: r["engine"]["run_ahead"] for r in results}
    assert by_stage[0]["last_forward_end"] < SLOW_S, by_stage[0]
    assert by_stage[1]["wall"] >= 4 * SLOW_S and by_stage[0]["wall"] >= 3 * SLOW_S  # the sends still complete
    assert by_stage[1]["out_err"] < 1e-6


def test_gan_gradient_through_frozen_wan_teacher(results):
    """PP2 Wan teacher, frozen: a loss on block 1's features (stage 0), no output gradient; the latent's
    gradient equals one process's and arrives on the last stage; only token gradients travel back."""
    for r in results:
        f = r["frozen_teacher"]
        assert f["params_without_grad"]
        if f["stage"] == 1:
            assert f["x_grad_err"] < 1e-5
            assert f["pp_sends"] == 2  # microbatch token gradients (conditioning declared without gradients)
        else:
            assert f["pp_sends"] == 2 * 4  # activations: 4 tensors per microbatch


def test_two_experts_through_expert_stage(results):
    """PP2 ExpertStage = WanExperts on one process, with a microbatch mixing both experts (the teacher of A14B)."""
    for r in results:
        e = r["experts"]
        assert e["mixed"] == [True, False]
        assert e.get("output_err", 0.0) < 1e-5 and e.get("x_grad_err", 0.0) < 1e-5 and e["grad_err"] < 1e-5
        assert e["experts_with_grads"] == ["high", "low"]
