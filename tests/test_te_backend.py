"""The Transformer Engine backend's wiring through the CPU layout matrix, with tests/te_double.py standing in for
TE (its layouts, gather dimension, mask polarity, dtype and context-parallel rules, from TE's source). Every
layout against the single-process torch model; TE's own numerics need a GPU (`make gpu-check`). One spawn."""
import pytest

from multirank import run_ranks
from parallel_cases import failures, run_layout

pytestmark = pytest.mark.multirank

EVEN = (2, 8, 8)  # 32 tokens: TE takes no padding mask under CP
BF16 = "bfloat16"  # TE has no fp32 attention kernel under CP
LAYOUTS = {
    "te_tp2_sp": dict(tp=2, sp=True),  # 105 tokens: padded to 106, TE padding mask; 4 samples per microbatch
    "te_tp2": dict(tp=2, sp=False),
    "te_tp2_sp_bf16": dict(tp=2, sp=True, autocast=BF16),
    "te_cp2_p2p_bf16": dict(cp=2, cp_comm="ring", latent=EVEN, autocast=BF16),
    "te_cp2_a2a_bf16": dict(cp=2, cp_comm="ulysses", latent=EVEN, autocast=BF16),
    "te_pp2": dict(pp=2, microbatches=4),
    "te_i2v_tp2_sp": dict(tp=2, sp=True, variant="i2v"),  # the image branch: CLIP k/v through TE's linears too
    "te_ti2v_cp2_a2a_bf16": dict(cp=2, cp_comm="ulysses", latent=EVEN, autocast=BF16, variant="ti2v"),
}
# What must not run, and what must not pass: TE without the transpose (the backend before this change), fp32
# under CP, padding under CP.
BROKEN = {
    "batch_first_sp": dict(tp=2, sp=True),
    "fp32_cp": dict(cp=2, latent=EVEN),
    "padded_cp": dict(cp=2, autocast=BF16),
}


def te_suite(cases: dict, broken: dict) -> dict:
    import te_double
    from megatron.core import parallel_state  # noqa: F401  (before the double: megatron probes TE's version)

    te_double.install()
    from tmd_megatron.parallel import te_backend

    out = {"layouts": {name: run_layout({**case, "backend": "te"}) for name, case in cases.items()}, "broken": {}}
    fixed = te_backend._TELinear.forward
    for name, case in broken.items():
        if name == "batch_first_sp":  # hand TE the [B, L, D] stream, as te_backend did before
            te_backend._TELinear.forward = te_double.Linear.forward
        try:
            res = run_layout({**case, "backend": "te"})
            out["broken"][name] = ("ran", max(res["errors"].get(k, 0.0) for k in ("output", "grads", "input_grad")))
        except Exception as err:  # noqa: BLE001 - the message is the result
            out["broken"][name] = ("raised", f"{type(err).__name__}: {err}")
        finally:
            te_backend._TELinear.forward = fixed
    return out


@pytest.fixture(scope="module")
def results():
    return run_ranks(te_suite, 2, LAYOUTS, BROKEN, timeout=600)


@pytest.mark.parametrize("name", LAYOUTS)
def test_te_backend_layout_equals_one_process(results, name):
    """Outputs, loss, gradients and the step equal one process (bf16: within twice one process's bf16 error);
    run_layout also refuses a gathered state whose names differ from the torch model's (TE's _extra_state aside)."""
    assert failures(results, name, comm=False) == []


def test_batch_first_input_to_te_sequence_parallel_is_caught(results):
    """The backend before this change fed TE [B, L/tp, D]: TE gathers dim 0, so q/k/v came back [tp*B, L/tp, ...]."""
    for r in results:
        kind, detail = r["broken"]["batch_first_sp"]
        assert kind == "raised" or detail > 1e-2, detail


@pytest.mark.parametrize("name,message", [("fp32_cp", "No dot product attention backend"),
                                          ("padded_cp", "cannot mask padded tokens under context parallelism")])
def test_what_te_cannot_run_raises(results, name, message):
    for r in results:
        kind, detail = r["broken"][name]
        assert kind == "raised" and message in detail, detail
