"""Each Triton kernel against the model's own torch function: forward, gradients and JVPs, fp32 tight, bf16 loose.

Sizes are tiny (the interpreter runs every program in Python) and deliberately awkward: widths that are not
powers of two, token counts that leave a masked tail in the backward row blocks, broadcast modulation.
"""
import pytest
import torch

triton = pytest.importorskip("triton", reason="the kernel tests need triton (pip install -e '.[test]')")

from kernels.layer_norm_modulate import layer_norm_modulate  # noqa: E402
from kernels.rms_norm import rms_norm_across_heads  # noqa: E402
from kernels.rope import apply_rope as rope_kernel  # noqa: E402
from tmd_megatron.models.wan.block import modulate  # noqa: E402
from tmd_megatron.models.wan.layers import FP32LayerNorm, RMSNormAcrossHeads  # noqa: E402
from tmd_megatron.models.wan.rope import apply_rope, grid_positions, rope_angles, rope_cos_sin  # noqa: E402

EPS = 1e-6
# Relative (to the reference's largest entry) max error. bf16/fp16: the kernel's fp32 statistics differ from
# torch's in the last bits, which can flip one rounding of the normalised value to the next bf16 step (2^-8).
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b|, in fp32; 0 when both are exactly zero (D = 1 gives a zero input gradient)."""
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(torch.finfo(torch.float32).tiny))


def _grads(out, inputs, probe):
    return torch.autograd.grad(out, inputs, probe)


def assert_matches_reference(kernel_fn, reference_fn, inputs, tol):
    """Forward, then every input's gradient under one random probe, kernel vs reference."""
    a, b = kernel_fn(*inputs), reference_fn(*inputs)
    assert a.dtype == b.dtype and a.shape == b.shape
    assert rel_err(a, b) <= tol, f"forward rel err {rel_err(a, b):.2e}"
    probe = torch.randn(a.shape, generator=torch.Generator().manual_seed(7)).to(a)
    for i, (ga, gb) in enumerate(zip(_grads(a, inputs, probe), _grads(b, inputs, probe))):
        assert ga.dtype == gb.dtype and ga.shape == gb.shape
        assert rel_err(ga, gb) <= tol, f"gradient of input {i}: rel err {rel_err(ga, gb):.2e}"


def _rand(*shape, dtype=torch.float32, device="cpu", seed=0, scale=1.0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale + offset).to(device=device, dtype=dtype).requires_grad_()


# ---- LayerNorm + AdaLN modulation ---------------------------------------------------------------------------
def _ln_modulate_reference(eps=EPS):
    def ref(x, shift, scale):
        norm = FP32LayerNorm(x.shape[-1], eps=eps, elementwise_affine=False).to(x.device)
        return modulate(norm(x), shift, scale)

    return ref


@pytest.mark.parametrize(
    "dtype,b,n,d,rows,shift_batch",
    [
        (torch.float32, 2, 7, 40, 3, 2),  # D not a power of two, 7 tokens in blocks of 3: masked tail row
        (torch.float32, 1, 5, 64, 32, 1),  # one block bigger than the sequence
        (torch.float32, 3, 4, 24, 2, 1),  # modulation broadcast over the batch
        (torch.float32, 2, 3, 1, 2, 2),  # D = 1: normalised value is 0, output = shift
        (torch.bfloat16, 2, 9, 48, 4, 2),
        (torch.float16, 2, 6, 40, 4, 2),
    ],
)
def test_layer_norm_modulate_matches_reference(device, dtype, b, n, d, rows, shift_batch):
    x = _rand(b, n, d, dtype=dtype, device=device, scale=2.0, offset=0.5)
    shift = _rand(shift_batch, 1, d, device=device, seed=1)
    scale = _rand(shift_batch, 1, d, device=device, seed=2, scale=0.5)
    assert_matches_reference(
        lambda *z: layer_norm_modulate(*z, eps=EPS, rows_per_program=rows),
        _ln_modulate_reference(),
        (x, shift, scale),
        TOL[dtype],
    )


def test_layer_norm_modulate_takes_the_blocks_strided_modulation(device):
    """The block's shift/scale are views into [B, 6, 1, D] (batch stride 6·D): no copy needed, same result."""
    x = _rand(2, 5, 40, device=device)
    mod = _rand(2, 6, 40, device=device, seed=3).unsqueeze(2)
    shift, scale = mod.unbind(1)[:2]
    assert shift.stride(0) == 6 * 40
    assert_matches_reference(lambda *z: layer_norm_modulate(*z, eps=EPS), _ln_modulate_reference(), (x, shift, scale),
                             1e-5)


# ---- q/k RMSNorm across heads -------------------------------------------------------------------------------
def _rms_reference(eps=EPS):
    def ref(x, weight):
        norm = RMSNormAcrossHeads(x.shape[-1], eps)  # its gain is replaced by `weight` below
        return torch.func.functional_call(norm, {"weight": weight}, (x,))

    return ref


@pytest.mark.parametrize(
    "dtype,w_dtype,shape,rows",
    [
        (torch.float32, torch.float32, (2, 7, 40), 4),  # 14 rows in blocks of 4: masked tail
        (torch.float32, torch.float32, (3, 64), 32),
        (torch.float32, torch.float32, (2, 3, 5, 24), 5),  # more leading dims, flattened to rows
        (torch.bfloat16, torch.float32, (2, 9, 40), 4),  # bf16 activations, fp32 gain -> fp32 out (Wan's case)
        (torch.bfloat16, torch.bfloat16, (2, 9, 40), 4),  # all bf16 -> bf16 out
        (torch.float16, torch.float32, (2, 6, 48), 4),
    ],
)
def test_rms_norm_matches_reference(device, dtype, w_dtype, shape, rows):
    x = _rand(*shape, dtype=dtype, device=device, scale=3.0)
    weight = _rand(shape[-1], dtype=w_dtype, device=device, seed=1, scale=0.3, offset=1.0)
    assert_matches_reference(
        lambda *z: rms_norm_across_heads(*z, eps=EPS, rows_per_program=rows), _rms_reference(), (x, weight), TOL[dtype]
    )


# ---- 3-D RoPE -----------------------------------------------------------------------------------------------
def _rope_tables(grid, head_dim, device):
    d_hw = 2 * (head_dim // 6)
    angles = rope_angles(grid_positions(grid), (head_dim - 2 * d_hw, d_hw, d_hw), 10000.0)
    return tuple(t.to(device) for t in rope_cos_sin(angles, torch.float32))


@pytest.mark.parametrize(
    "dtype,b,grid,heads,head_dim",
    [
        (torch.float32, 2, (2, 3, 2), 3, 20),  # Wan's uneven split 8/6/6 at d = 20: 10 complex slots per head
        (torch.float32, 1, (1, 2, 5), 1, 6),
        (torch.bfloat16, 2, (2, 2, 3), 2, 12),
        (torch.float16, 1, (3, 1, 2), 4, 8),
    ],
)
def test_rope_matches_reference(device, dtype, b, grid, heads, head_dim):
    cos, sin = _rope_tables(grid, head_dim, device)
    x = _rand(b, cos.shape[0], heads, head_dim, dtype=dtype, device=device)
    assert_matches_reference(lambda z: rope_kernel(z, cos, sin), lambda z: apply_rope(z, cos, sin), (x,), TOL[dtype])


# ---- forward mode (the exact-JVP reference path of TM-MF) ---------------------------------------------------
def test_jvps_match_reference(device):
    """torch.func.jvp through each kernel's autograd.Function equals the JVP through the torch reference."""
    x = _rand(2, 5, 40, device=device).detach()
    shift, scale = (_rand(2, 1, 40, device=device, seed=s).detach() for s in (1, 2))
    tangents = tuple(torch.randn_like(t) for t in (x, shift, scale))
    _, ja = torch.func.jvp(lambda *z: layer_norm_modulate(*z, eps=EPS), (x, shift, scale), tangents)
    _, jb = torch.func.jvp(_ln_modulate_reference(), (x, shift, scale), tangents)
    assert rel_err(ja, jb) <= 1e-5

    w = _rand(40, device=device, seed=3, offset=1.0).detach()
    tw = torch.randn_like(w)
    _, ja = torch.func.jvp(lambda *z: rms_norm_across_heads(*z, eps=EPS), (x, w), (tangents[0], tw))
    _, jb = torch.func.jvp(_rms_reference(), (x, w), (tangents[0], tw))
    assert rel_err(ja, jb) <= 1e-5

    cos, sin = _rope_tables((1, 2, 3), 20, device)
    q = _rand(2, 6, 2, 20, device=device).detach()
    tq = torch.randn_like(q)
    _, ja = torch.func.jvp(lambda z: rope_kernel(z, cos, sin), (q,), (tq,))
    _, jb = torch.func.jvp(lambda z: apply_rope(z, cos, sin), (q,), (tq,))
    assert rel_err(ja, jb) <= 1e-5


# ---- the comparisons have teeth -----------------------------------------------------------------------------
def test_comparison_catches_a_wrong_eps_or_table(device):
    """A kernel fed a wrong eps (or RoPE tables one token off) misses the reference by far more than the tolerance."""
    x = _rand(2, 7, 40, device=device, scale=0.05)  # small activations, so eps matters
    shift, scale = _rand(2, 1, 40, device=device, seed=1), _rand(2, 1, 40, device=device, seed=2)
    ref = _ln_modulate_reference()(x, shift, scale)
    assert rel_err(layer_norm_modulate(x, shift, scale, eps=EPS), ref) <= 1e-5
    assert rel_err(layer_norm_modulate(x, shift, scale, eps=1e-4), ref) > 1e-3

    w = _rand(40, device=device, seed=3, offset=1.0)
    ref = _rms_reference()(x, w)
    assert rel_err(rms_norm_across_heads(x, w, eps=EPS), ref) <= 1e-5
    assert rel_err(rms_norm_across_heads(x, w, eps=1e-4), ref) > 1e-3

    cos, sin = _rope_tables((2, 2, 2), 20, device)
    q = _rand(1, 8, 2, 20, device=device)
    ref = apply_rope(q, cos, sin)
    assert rel_err(rope_kernel(q, cos, sin), ref) <= 1e-5
    assert rel_err(rope_kernel(q, cos.roll(1, 0), sin.roll(1, 0)), ref) > 1e-2


# ---- bad input ----------------------------------------------------------------------------------------------
def test_unsupported_inputs_are_refused_with_the_reason(device):
    x = torch.randn(2, 4, 8, device=device)
    with pytest.raises(ValueError, match="fp64 stays on the torch reference"):
        layer_norm_modulate(x.double(), torch.zeros(2, 1, 8, device=device), torch.zeros(2, 1, 8, device=device))
    with pytest.raises(ValueError, match=r"shift must be per sample, \[2, 1, 8\]"):
        layer_norm_modulate(x, torch.zeros(2, 4, 8, device=device), torch.zeros(2, 1, 8, device=device))
    with pytest.raises(ValueError, match="must match"):
        rms_norm_across_heads(x, torch.ones(7, device=device))
    with pytest.raises(ValueError, match=r"cos/sin must be \[L, d/2\] = \(4, 4\)"):
        rope_kernel(x.view(2, 4, 1, 8), torch.ones(4, 8, device=device), torch.ones(4, 8, device=device))
    with pytest.raises(ValueError, match="rows_per_program must be >= 1"):
        rms_norm_across_heads(x, torch.ones(8, device=device), rows_per_program=0)
