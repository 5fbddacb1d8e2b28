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
    from tmd_megatron.parallel import Topology
    from tmd_megatron.parallel.te_backend import TELayers

    cfg = WanConfig.preset("tiny")
    torch.manual_seed(0)
    ref = WanModel(cfg).cuda()
    te_model = WanModel(cfg, backend=TELayers(Topology.single(device="cuda"))).cuda()
    names = {k for k in te_model.state_dict() if not k.endswith("_extra_state")}
    assert names == set(ref.state_dict())
    te_model.load_state_dict(ref.state_dict(), strict=False)
    x = torch.randn(2, 16, 3, 10, 14, device="cuda")  # 105 tokens, two samples
    t, ctx = torch.tensor([500.0, 20.0], device="cuda"), torch.randn(2, 7, 32, device="cuda")
    with torch.no_grad():
        assert rel_err(te_model(x, t, ctx), ref(x, t, ctx)) < 1e-5  # fp32, TF32 off
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert rel_err(te_model(x, t, ctx).float(), ref(x, t, ctx).float()) < 2e-2  # bf16 compute


@needs_te
@gpus(2)
def test_te_backend_layouts_match_one_process():
    """The CPU double's layout matrix (tests/test_te_backend.py) on real Transformer Engine and NCCL."""
    from test_te_backend import LAYOUTS

    cases = {k: {**v, "backend": "te"} for k, v in LAYOUTS.items()}
    results = run_ranks(run_suite, 2, cases, timeout=600)
    for name in cases:
        assert failures(results, name, comm=False) == []


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
    # padded keys (the last 6) are sliced off for both cores
    assert rel_err(flash(q, k, v, 90).float(), SDPAttention()(q, k, v, 90).float()) < 2e-2


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lq,lk", [(1000, 1000), (2048, 1500), (77, 300)])  # 1000, 77: LSE rows not a multiple of 32
def test_ring_chunk_kernels_on_cuda_match_the_explicit_kernel(dtype, lq, lk):
    """The fused chunk kernels ring attention selects on CUDA (flash for bf16, mem-efficient for fp32, whose LSE
    is padded to 32 rows) against the explicit one: forward, LSE and the backward from a given output and LSE."""
    from tmd_megatron.parallel.chunk_attention import KERNELS, select_kernel

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(2, 4, n, 64, device="cuda", dtype=dtype, generator=g) for n in (lq, lk, lk, lq))
    kern, ref = select_kernel(q), KERNELS["math"]
    assert kern.name == ("cuda_flash" if dtype == torch.bfloat16 else "cuda_efficient")
    out, lse, aux = kern.forward(q, k, v, 0.125)
    r_out, r_lse, _ = ref.forward(q, k, v, 0.125)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert lse.shape == r_lse.shape and rel_err(lse, r_lse) < 1e-4 and rel_err(out.float(), r_out) < tol
    grads = kern.backward(do, q, k, v, r_out.to(dtype), r_lse.float(), 0.125, aux)
    for a, b in zip(grads, ref.backward(do, q, k, v, r_out, r_lse, 0.125, None)):
        assert rel_err(a.float(), b) < tol
