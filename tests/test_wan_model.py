"""Our Wan DiT against diffusers' WanTransformer3DModel, and the model's own contracts."""
import pytest
import torch

from tmd_megatron.models.wan import WanConfig, WanModel, timestep_sinusoid
from wan_reference import REF_CONFIG, diffusers_wan, ours_from_diffusers, rel_err, sample_inputs


@pytest.mark.parametrize(
    "preset,count,tensors",
    [("wan2.1-t2v-1.3b", 1_418_996_800, 825), ("wan2.1-t2v-14b", 14_288_491_584, 1095)],
)
def test_preset_parameter_counts(preset, count, tensors):
    with torch.device("meta"):
        model = WanModel(WanConfig.preset(preset))
    assert sum(p.numel() for p in model.parameters()) == count
    assert len(model.state_dict()) == tensors


def _forward_and_input_grads(model_fn, x, t, ctx, probe):
    x = x.clone().requires_grad_(True)
    ctx = ctx.clone().requires_grad_(True)
    out = model_fn(x, t, ctx)
    gx, gc = torch.autograd.grad((out * probe).sum(), (x, ctx))
    return out.detach(), gx, gc


def test_forward_and_input_gradients_match_diffusers_fp32():
    ref = diffusers_wan()
    ours = ours_from_diffusers(ref)
    x, t, ctx = sample_inputs()
    probe = torch.randn(x.shape[0], 16, *x.shape[2:])
    a, gax, gac = _forward_and_input_grads(ours, x, t, ctx, probe)
    b, gbx, gbc = _forward_and_input_grads(lambda *z: ref(*z).sample, x, t, ctx, probe)
    assert a.shape == x.shape
    assert rel_err(a, b) <= 1e-5
    assert rel_err(gax, gbx) <= 1e-5
    assert rel_err(gac, gbc) <= 1e-5


def test_check_detects_swapped_qk_norms():
    """The comparison above has teeth: exchanging norm_q and norm_k gains breaks it by orders of magnitude."""
    ref = diffusers_wan()
    swap = {}
    for i in range(REF_CONFIG.num_layers):
        for attn in ("attn1", "attn2"):
            q, k = f"blocks.{i}.{attn}.norm_q.weight", f"blocks.{i}.{attn}.norm_k.weight"
            swap[q], swap[k] = k, q
    broken = ours_from_diffusers(ref, rename=swap)
    x, t, ctx = sample_inputs()
    with torch.no_grad():
        assert rel_err(broken(x, t, ctx), ref(x, t, ctx).sample) > 1e-3


def test_sinusoid_is_float64_cos_first():
    t = torch.tensor([0.0, 1.0, 999.0])
    s = timestep_sinusoid(t, 8)
    freqs = [10000 ** (-j / 4) for j in range(4)]
    import math

    expect = [[math.cos(v * f) for f in freqs] + [math.sin(v * f) for f in freqs] for v in t.tolist()]
    assert s.dtype == torch.float64
    assert torch.allclose(s, torch.tensor(expect, dtype=torch.float64), atol=1e-12)


def test_parts_compose_to_forward_and_hidden_states():
    torch.manual_seed(0)
    model = WanModel(WanConfig.preset("tiny"))
    x = torch.randn(2, 16, 2, 4, 6)
    t = torch.tensor([100.0, 700.0])
    ctx = torch.randn(2, 10, 32)
    with torch.no_grad():
        full, hidden = model(x, t, ctx, return_hidden=(1, 3))
        tokens, geom = model.embed_tokens(x)
        e, e0 = model.embed_time(t)
        c = model.embed_text(ctx)
        mid, h1 = model.run_blocks(tokens, c, e0, geom, 0, 2, capture=(1,))
        end, h3 = model.run_blocks(mid, c, e0, geom, 2, 4, capture=(3,))
        parts = model.head_out(end, e, geom)
    assert torch.equal(full, parts)
    assert torch.equal(hidden[1], h1[1]) and torch.equal(hidden[3], h3[3]) and torch.equal(hidden[3], end)
    assert model.tokens_to_grid(hidden[1], geom).shape == (2, 64, 2, 2, 3)


def test_short_context_is_zero_padded_not_masked():
    torch.manual_seed(0)
    model = WanModel(WanConfig.preset("tiny"))
    x, t = torch.randn(1, 16, 1, 4, 4), torch.tensor([500.0])
    short = torch.randn(1, 7, 32)
    padded = torch.nn.functional.pad(short, (0, 0, 0, 64 - 7))
    with torch.no_grad():
        assert torch.equal(model(x, t, short), model(x, t, padded))
        # Padding rows are attended to (no mask): trimming to the true length changes the output.
        c_full = model.embed_text(short)
        assert c_full.shape[1] == 64
    with pytest.raises(ValueError, match="more than text_len"):
        model(x, t, torch.randn(1, 65, 32))


def test_bf16_autocast_keeps_fp32_residual_and_head():
    torch.manual_seed(0)
    model = WanModel(WanConfig.preset("tiny"))
    x, t, ctx = torch.randn(2, 16, 2, 4, 4), torch.tensor([10.0, 990.0]), torch.randn(2, 64, 32)
    with torch.no_grad():
        ref = model(x, t, ctx)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, hidden = model(x, t, ctx, return_hidden=(0,))
            e, e0 = model.embed_time(t)
    assert out.dtype == torch.float32 and hidden[0].dtype == torch.float32
    assert e.dtype == torch.float32 and e0.dtype == torch.float32
    assert 0 < rel_err(out, ref) < 5e-2  # bf16 matmuls: close, but not bit-equal


def test_activation_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = WanModel(WanConfig.preset("tiny"))
    x, t, ctx = torch.randn(1, 16, 2, 4, 4), torch.tensor([300.0]), torch.randn(1, 64, 32)
    model(x, t, ctx).square().sum().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.activation_checkpointing = True
    model(x, t, ctx).square().sum().backward()
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, plain[n], rtol=1e-6, atol=1e-7), n


def test_bad_inputs_name_the_fix():
    model = WanModel(WanConfig.preset("tiny"))
    t, ctx = torch.tensor([1.0]), torch.randn(1, 8, 32)
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        model(torch.randn(1, 16, 1, 5, 4), t, ctx)
    with pytest.raises(ValueError, match=r"expected a latent \[B, 16"):
        model(torch.randn(1, 8, 1, 4, 4), t, ctx)
    with pytest.raises(ValueError, match="batch sizes differ"):
        model(torch.randn(2, 16, 1, 4, 4), t, ctx)
    with pytest.raises(ValueError, match="RoPE table"):
        model(torch.randn(1, 16, 1, 2, 2050), t, ctx)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        WanConfig(dim=30, num_heads=4)
    with pytest.raises(ValueError, match="unknown Wan preset"):
        WanConfig.preset("wan3")
