"""Compiled Triton kernels on CUDA at Wan2.1 widths, and the model's default kernel selection there.

Skipped without CUDA. Nothing from kernels' Triton modules may be imported before the skip: on a CPU box
tests/kernel_checks needs them defined under TRITON_INTERPRET=1, which its conftest sets later in collection.
"""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA: compiled Triton kernels (the CPU interpreter runs tests/kernel_checks)",
                allow_module_level=True)
triton = pytest.importorskip("triton", reason="the kernels need triton")

import kernels  # noqa: E402
from kernels import layer_norm_modulate as ln_op  # noqa: E402
from kernels.rms_norm import rms_norm_across_heads  # noqa: E402
from kernels.rope import apply_rope as rope_kernel  # noqa: E402
from tmd_megatron.models.wan import WanModel  # noqa: E402
from tmd_megatron.models.wan.block import modulate  # noqa: E402
from tmd_megatron.models.wan.layers import FP32LayerNorm, RMSNormAcrossHeads  # noqa: E402
from tmd_megatron.models.wan.rope import apply_rope, grid_positions, rope_angles, rope_cos_sin  # noqa: E402
from wan_reference import REF_CONFIG, sample_inputs  # noqa: E402

pytestmark = pytest.mark.gpu
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
GRID = (3, 30, 52)  # 4680 tokens


def rel_err(a, b) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max())


def _check(kernel_fn, reference_fn, inputs, tol):
    a, b = kernel_fn(*inputs), reference_fn(*inputs)
    assert a.dtype == b.dtype and rel_err(a, b) <= tol
    probe = torch.randn_like(a)
    ga = torch.autograd.grad(a, inputs, probe)
    gb = torch.autograd.grad(b, inputs, probe)
    for i, (u, v) in enumerate(zip(ga, gb)):
        assert u.dtype == v.dtype and rel_err(u, v) <= tol, f"input {i}: {rel_err(u, v):.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim,heads", [(1536, 12), (5120, 40)])
def test_kernels_match_reference_at_wan_widths(dtype, dim, heads):
    torch.manual_seed(0)
    n = GRID[0] * GRID[1] * GRID[2]
    x = torch.randn(2, n, dim, device="cuda", dtype=dtype, requires_grad=True)
    shift = torch.randn(2, 1, dim, device="cuda", requires_grad=True)
    scale = torch.randn(2, 1, dim, device="cuda", requires_grad=True)
    norm = FP32LayerNorm(dim, eps=1e-6, elementwise_affine=False).cuda()
    _check(lambda *z: ln_op.layer_norm_modulate(*z, eps=1e-6), lambda x, s, c: modulate(norm(x), s, c),
           (x, shift, scale), TOL[dtype])

    rms = RMSNormAcrossHeads(dim, 1e-6)
    w = (1 + 0.3 * torch.randn(dim, device="cuda")).requires_grad_()
    _check(lambda *z: rms_norm_across_heads(*z, eps=1e-6),
           lambda x, w: torch.func.functional_call(rms, {"weight": w}, (x,)), (x, w), TOL[dtype])

    head_dim = dim // heads
    d_hw = 2 * (head_dim // 6)
    angles = rope_angles(grid_positions(GRID), (head_dim - 2 * d_hw, d_hw, d_hw), 10000.0)
    cos, sin = (t.cuda() for t in rope_cos_sin(angles))
    q = torch.randn(2, n, heads, head_dim, device="cuda", dtype=dtype, requires_grad=True)
    _check(lambda z: rope_kernel(z, cos, sin), lambda z: apply_rope(z, cos, sin), (q,), TOL[dtype])


def test_model_selects_kernels_on_cuda_by_default(monkeypatch):
    monkeypatch.delenv("TMD_KERNELS", raising=False)
    assert kernels.enabled()
    calls = []
    original = ln_op.layer_norm_modulate
    monkeypatch.setattr(ln_op, "layer_norm_modulate", lambda *a, **k: calls.append(1) or original(*a, **k))
    torch.manual_seed(0)
    model = WanModel(REF_CONFIG).cuda()
    inputs = tuple(t.cuda() for t in sample_inputs())
    with torch.no_grad():
        out = model(*inputs)
        assert len(calls) == 2 * REF_CONFIG.num_layers
        with kernels.override(False):
            ref = model(*inputs)
        assert rel_err(out, ref) <= 1e-5
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out_bf16 = model(*inputs)
            with kernels.override(False):
                ref_bf16 = model(*inputs)
        assert rel_err(out_bf16, ref_bf16) <= 5e-3
    monkeypatch.setenv("TMD_KERNELS", "0")
    assert not kernels.enabled()
