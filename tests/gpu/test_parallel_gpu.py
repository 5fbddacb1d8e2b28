"""Parallel paths that need CUDA: the torch backend on NCCL, Transformer Engine (backend='te') and flash-attn.
Skipped here (no GPU) with the reason; written to run unchanged on a GPU node (`pytest tests/gpu`)."""
import importlib.util

import pytest
import torch

from multirank import run_ranks
from parallel_cases import failures, run_suite
from wan_reference import rel_err

pytestmark = pytest.mark.gpu

HAS_CUDA = torch.cuda.is_available()
GPUS = torch.cuda.device_count() if HAS_CUDA else 0
HAS_TE = importlib.util.find_spec("transformer_engine") is not None
HAS_FLASH = importlib.util.find_spec("flash_attn") is not None
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA (none on this machine)")
needs_te = pytest.mark.skipif(not (HAS_CUDA and HAS_TE), reason="needs CUDA and Transformer Engine")


def gpus(n):
    return pytest.mark.skipif(GPUS < n, reason=f"needs {n} CUDA GPUs, found {GPUS}")


@pytest.fixture(autouse=True)
def exact_fp32():
    """Compare in true fp32: no TF32 in cuDNN convolutions or matmuls."""
    if HAS_CUDA:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


@needs_cuda
@gpus(2)
def test_torch_backend_on_nccl_two_gpus():
    cases = {"tp2_sp": dict(tp=2), "cp2_ring": dict(cp=2), "pp2": dict(pp=2, microbatches=4)}
    results = run_ranks(run_suite, 2, cases, timeout=600)
    for name in cases:
        assert failures(results, name) == []


@needs_cuda
@gpus(4)
def test_torch_backend_on_nccl_matches_one_process():
    """The same layout matrix as on gloo, on NCCL (4 GPUs: TP2xCP2 ring and Ulysses, then PP2/DP2 mixes)."""
    cases = {
        "tp2_cp2_ring": dict(tp=2, cp=2),
        "tp2_cp2_ulysses": dict(tp=2, cp=2, cp_comm="ulysses"),
        "pp2_dp2": dict(pp=2, microbatches=2),
    }
    results = run_ranks(run_suite, 4, cases, timeout=600)
    for name in cases:
        assert failures(results, name) == []


@needs_te
def test_te_backend_has_torch_names_and_matches_single_gpu():
    from tmd_megatron.models.wan import WanConfig, WanModel

    cfg = WanConfig.preset("tiny")
    torch.manual_seed(0)
    ref = WanModel(cfg).cuda()
    te_model = WanModel(cfg, backend="te").cuda()
    names = {k for k in te_model.state_dict() if not k.endswith("_extra_state")}
    assert names == set(ref.state_dict())
    te_model.load_state_dict(ref.state_dict(), strict=False)
    x = torch.randn(1, 16, 3, 10, 14, device="cuda")
    t, ctx = torch.tensor([500.0], device="cuda"), torch.randn(1, 7, 32, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        assert rel_err(te_model(x, t, ctx).float(), ref(x, t, ctx).float()) < 2e-2  # bf16 compute


@needs_te
@gpus(2)
def test_te_backend_tp2_sp_matches_one_process():
    """te.Linear column/row with tp_group and sequence_parallel (microbatch size 1, as TE's SP requires)."""
    cases = {"te_tp2_sp": dict(tp=2, backend="te", microbatches=4)}
    results = run_ranks(run_suite, 2, cases, timeout=600)
    errs = [r["layouts"]["te_tp2_sp"]["errors"] for r in results]
    assert max(e.get("output", 0.0) for e in errs) < 1e-3
    assert max(e["grads"] for e in errs) < 1e-3


def te_context_parallel_attention(cp_comm: str) -> float:
    """Rank side: TE DotProductAttention with cp_group on this rank's chunk vs SDPA on the whole sequence."""
    from tmd_megatron.models.wan.layers import SDPAttention
    from tmd_megatron.parallel import init_topology
    from tmd_megatron.parallel.te_backend import TEAttention

    topo = init_topology(cp=2)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 256, 4, 64, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    chunk = slice(topo.cp.rank * 128, (topo.cp.rank + 1) * 128)
    out = TEAttention(topo, cp_comm)(q[:, chunk], k[:, chunk], v[:, chunk])
    return rel_err(out.float(), SDPAttention()(q, k, v)[:, chunk].float())


@needs_te
@gpus(2)
@pytest.mark.parametrize("cp_comm", ["ring", "ulysses"])
def test_te_context_parallel_attention(cp_comm):
    assert max(run_ranks(te_context_parallel_attention, 2, cp_comm, timeout=300)) < 2e-2  # bf16 kernels


@needs_cuda
@pytest.mark.skipif(not HAS_FLASH, reason="needs flash-attn")
def test_flash_attention_core_matches_sdpa():
    from tmd_megatron.models.wan.layers import SDPAttention
    from tmd_megatron.parallel.attention import make_local_attention

    q, k, v = (torch.randn(2, 96, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    flash = make_local_attention("flash")
    assert rel_err(flash(q, k, v).float(), SDPAttention()(q, k, v).float()) < 2e-2
    mask = torch.arange(96, device="cuda") < 90  # padded keys: the core falls back to SDPA
    assert torch.equal(flash(q, k, v, mask), SDPAttention()(q, k, v, mask))
