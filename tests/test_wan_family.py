"""The Wan family beyond Wan2.1 T2V against diffusers' WanTransformer3DModel: Wan2.1 I2V (CLIP image tokens,
36 input channels), per-token timesteps (Wan2.2 TI2V), parameter counts of every released variant, and the
two-expert A14B model (routing and both release layouts)."""
import json

import pytest
import torch

from tmd_megatron.models.wan import EXPERT_BOUNDARY, PRESETS, WanConfig, WanExperts, WanModel, parameter_count
from tmd_megatron.models.wan.checkpoint import CheckpointError
from wan_reference import diffusers_call, diffusers_wan, ours_from_diffusers, rel_err, sample_inputs

# diffusers splits the context at 512 text rows (transformer_wan.py WanAttnProcessor), so I2V tests use text_len 512.
I2V = WanConfig(dim=40, ffn_dim=56, num_heads=2, num_layers=2, text_dim=24, text_len=512, freq_dim=32, in_dim=36,
                model_type="i2v", image_dim=12, image_len=7)
TI2V = WanConfig(dim=40, ffn_dim=56, num_heads=2, num_layers=2, text_dim=24, text_len=16, freq_dim=32,
                 model_type="ti2v")
LATENT = (3, 8, 10)  # grid 3 x 4 x 5 = 60 tokens


# Parameter counts derived by hand from the released configs (wan/configs/*.py, diffusers' conversion script):
# T2V-14B is WAN_SPEC §1's 14,288,491,584. I2V-14B adds 20 input channels to the patch embedding (20·4·5120 =
# 409,600), img_emb (2·1280 + 1280²+1280 + 1280·5120+5120 + 2·5120 = 8,211,200) and per block k_img, v_img,
# norm_k_img (2·(5120²+5120) + 5120 = 52,444,160; x40 = 2,097,766,400). TI2V-5B: D=3072, F=14336, 30 blocks,
# 48 channels in and out (per block 4·(2·(D²+D)+D)... written out in the test below from the same rule).
RELEASED = {
    "wan2.1-t2v-1.3b": 1_418_996_800,
    "wan2.1-t2v-14b": 14_288_491_584,
    "wan2.1-i2v-14b": 14_288_491_584 + 409_600 + 8_211_200 + 2_097_766_400,
    "wan2.2-ti2v-5b": 4_999_787_712,
    "wan2.2-t2v-a14b": 14_288_491_584,  # per expert
    "wan2.2-i2v-a14b": 14_288_491_584 + 409_600,  # per expert: 36 input channels, no CLIP branch
}
# The configs diffusers' scripts/convert_wan_to_diffusers.py writes for each release.
DIFFUSERS_CONFIGS = {
    "wan2.1-i2v-14b": dict(num_attention_heads=40, attention_head_dim=128, in_channels=36, out_channels=16,
                           ffn_dim=13824, num_layers=40, image_dim=1280, added_kv_proj_dim=5120),
    "wan2.2-ti2v-5b": dict(num_attention_heads=24, attention_head_dim=128, in_channels=48, out_channels=48,
                           ffn_dim=14336, num_layers=30),
    "wan2.2-i2v-a14b": dict(num_attention_heads=40, attention_head_dim=128, in_channels=36, out_channels=16,
                            ffn_dim=13824, num_layers=40),
}


def test_ti2v_5b_count_by_hand():
    d, f, L = 3072, 14336, 30
    block = 2 * (4 * (d * d + d) + 2 * d) + 2 * d + (d * f + f) + (f * d + d) + 6 * d
    top = (48 * 4 * d + d) + (4096 * d + d + d * d + d) + (256 * d + d + d * d + d) + (d * 6 * d + 6 * d) \
        + (d * 48 * 4 + 48 * 4) + 2 * d
    assert top + L * block == RELEASED["wan2.2-ti2v-5b"]


@pytest.mark.parametrize("preset", list(RELEASED))
def test_released_parameter_counts_on_meta(preset):
    cfg = WanConfig.preset(preset)
    with torch.device("meta"):
        model = WanModel(cfg)
    assert sum(p.numel() for p in model.parameters()) == parameter_count(cfg) == RELEASED[preset]


@pytest.mark.parametrize("preset", list(DIFFUSERS_CONFIGS))
def test_released_counts_match_diffusers_modules(preset):
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        ref = WanTransformer3DModel(**DIFFUSERS_CONFIGS[preset])
    assert sum(p.numel() for p in ref.parameters()) == RELEASED[preset]


def test_every_preset_counts_by_formula():
    for name in PRESETS:
        cfg = WanConfig.preset(name)
        with torch.device("meta"):
            assert sum(p.numel() for p in WanModel(cfg).parameters()) == parameter_count(cfg), name
    assert set(EXPERT_BOUNDARY) <= set(PRESETS)


def _grads(fn, inputs, probe):
    # gradients of the latent, text and image tokens (not of the timesteps, which are [B, L] per token too)
    leaves = [t.clone().requires_grad_(t.ndim > 2) for t in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad((out * probe).sum(), [t for t in leaves if t.requires_grad])
    return out.detach(), grads


def _compare(cfg, inputs, dtype, rename=None):
    ref = diffusers_wan(cfg).to(dtype)
    ours = ours_from_diffusers(ref, cfg, rename).to(dtype)
    inputs = [t.to(dtype) if t.is_floating_point() and t.ndim > 1 else t for t in inputs]
    probe = torch.randn(inputs[0].shape[0], cfg.out_dim, *inputs[0].shape[2:], generator=torch.Generator().manual_seed(3),
                        dtype=dtype)
    a, ga = _grads(ours, inputs, probe)
    b, gb = _grads(lambda *z: diffusers_call(ref, *z), inputs, probe)
    return [rel_err(a, b)] + [rel_err(x, y) for x, y in zip(ga, gb)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_i2v_forward_and_input_gradients_match_diffusers(dtype):
    """Output and the gradients of the latent, the text and the CLIP tokens. fp64 measures 1e-7-level errors:
    diffusers' sinusoid and norms stay fp32 in an fp64 run (WAN_SPEC §6.2, §6.9)."""
    errs = _compare(I2V, sample_inputs(I2V, latent=LATENT), dtype)
    print(f"I2V vs diffusers ({dtype}): output, d/dx, d/dtext, d/dimage = " + ", ".join(f"{e:.1e}" for e in errs))
    assert len(errs) == 4 and max(errs) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_per_token_timesteps_match_diffusers(dtype):
    """Timesteps [B, L] (Wan2.2 TI2V: the first frame's tokens at t = 0), 48-channel-style in = out model."""
    x, _, ctx = sample_inputs(TI2V, latent=LATENT)
    t = torch.full((2, 60), 912.0)
    t[1] = 37.0
    t[:, :20] = 0.0  # the first latent frame (4 x 5 tokens) is the clean conditioning frame
    errs = _compare(TI2V, [x, t, ctx], dtype)
    print(f"per-token timesteps vs diffusers ({dtype}): output, d/dx, d/dtext = " + ", ".join(f"{e:.1e}" for e in errs))
    assert len(errs) == 3
    assert max(errs) <= 1e-5


def test_fp64_difference_is_diffusers_fp32_sinusoid(monkeypatch):
    """With diffusers' fp32 sinusoid in our model, the fp64 runs agree to the fp32 rounding of diffusers' norms
    (~1e-7): the 2-3e-6 above is the sinusoid's precision, not the model."""
    from diffusers.models.embeddings import get_timestep_embedding

    import tmd_megatron.models.wan.model as wan_model

    monkeypatch.setattr(wan_model, "timestep_sinusoid", lambda t, dim: get_timestep_embedding(
        t, dim, flip_sin_to_cos=True, downscale_freq_shift=0).double())
    i2v = _compare(I2V, sample_inputs(I2V, latent=LATENT), torch.float64)
    x, _, ctx = sample_inputs(TI2V, latent=LATENT)
    t = torch.full((2, 60), 912.0)
    t[:, :20] = 0.0
    per_token = _compare(TI2V, [x, t, ctx], torch.float64)
    print(f"fp64 with diffusers' sinusoid: I2V {max(i2v):.1e}, per-token {max(per_token):.1e}")
    assert max(i2v + per_token) <= 5e-7


def test_per_token_timesteps_that_agree_equal_per_sample():
    torch.manual_seed(0)
    model = WanModel(TI2V)
    x, t, ctx = sample_inputs(TI2V, latent=LATENT)
    with torch.no_grad():
        assert torch.allclose(model(x, t[:, None].expand(-1, 60), ctx), model(x, t, ctx), rtol=0, atol=1e-6)
        with pytest.raises(ValueError, match="need L = 60"):
            model(x, t[:, None].expand(-1, 59), ctx)


def test_swapped_image_kv_is_caught():
    """The I2V comparison has teeth: exchanging the image k and v projections breaks it by orders of magnitude."""
    swap = {}
    for i in range(I2V.num_layers):
        for leaf in ("weight", "bias"):
            k, v = f"blocks.{i}.attn2.add_k_proj.{leaf}", f"blocks.{i}.attn2.add_v_proj.{leaf}"
            swap[k], swap[v] = v, k
    ref = diffusers_wan(I2V)
    broken = ours_from_diffusers(ref, I2V, swap)
    inputs = sample_inputs(I2V, latent=LATENT)
    with torch.no_grad():
        assert rel_err(broken(*inputs), diffusers_call(ref, *inputs)) > 1e-2


def test_original_i2v_key_format_loads_to_identical_outputs(tmp_path):
    ref = diffusers_wan(I2V)
    ours = ours_from_diffusers(ref, I2V)
    ours.save_pretrained(tmp_path / "orig", format="original", max_shard_bytes=200_000)
    ref.save_pretrained(tmp_path / "diff", max_shard_size="200KB")  # diffusers' own writer, sharded
    assert list((tmp_path / "diff").glob("*.index.json"))
    saved = json.loads((tmp_path / "orig" / "config.json").read_text())
    assert saved["model_type"] == "i2v" and saved["in_dim"] == 36
    a, b = WanModel.from_pretrained(tmp_path / "orig"), WanModel.from_pretrained(tmp_path / "diff")
    assert a.config == I2V and b.config.image_dim == 12 and b.config.model_type == "i2v"
    inputs = sample_inputs(I2V, latent=LATENT)
    b = WanModel(I2V)
    b.load_state_dict(WanModel.from_pretrained(tmp_path / "diff").state_dict())  # image_len is not stored by diffusers
    with torch.no_grad():
        assert torch.equal(a(*inputs), b(*inputs))
        assert rel_err(a(*inputs), diffusers_call(ref, *inputs)) <= 1e-5


def test_ti2v_is_recognised_in_both_formats(tmp_path):
    torch.manual_seed(0)
    model = WanModel(TI2V)
    for fmt in ("original", "diffusers"):
        model.save_pretrained(tmp_path / fmt, format=fmt)
        assert WanModel.from_pretrained(tmp_path / fmt).config == TI2V


def test_i2v_inputs_are_checked():
    torch.manual_seed(0)
    model = WanModel(I2V)
    x, t, ctx, img = sample_inputs(I2V, latent=LATENT)
    with pytest.raises(ValueError, match="needs image_context"):
        model(x, t, ctx)
    with pytest.raises(ValueError, match="needs image_context"):
        model(x, t, ctx, img[:, :3])
    t2v = WanModel(TI2V)
    with pytest.raises(ValueError, match="no image branch"):
        t2v(torch.randn(2, 16, *LATENT), t, ctx[:, :16], img)
    with pytest.raises(ValueError, match="2\\*out_dim\\+4"):
        WanConfig(in_dim=20, model_type="i2v")


def test_flf2v_is_refused_naming_it(tmp_path):
    ref = diffusers_wan(I2V)
    ours = ours_from_diffusers(ref, I2V)
    ours.save_pretrained(tmp_path / "o", format="original")
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "o" / "diffusion_pytorch_model.safetensors")
    state["img_emb.emb_pos"] = torch.zeros(1, 514, 12)
    save_file(state, tmp_path / "o" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match="FLF2V"):
        WanModel.from_pretrained(tmp_path / "o")


# ---- two experts (A14B) ----------------------------------------------------------------------------------
def _experts(cfg=TI2V.replace(model_type="t2v"), boundary=0.875):
    torch.manual_seed(0)
    high, low = WanModel(cfg), WanModel(cfg)
    return WanExperts(high, low, boundary)


def test_experts_route_each_sample_by_its_timestep():
    experts = _experts()
    x, _, ctx = sample_inputs(TI2V, batch=3, latent=LATENT)
    t = torch.tensor([875.0, 874.9, 999.0])  # boundary 0.875: t >= 875 is high noise (Wan2.2's `>=`)
    with torch.no_grad():
        out, hidden = experts(x, t, ctx, return_hidden=(1,))
        for i, expert in enumerate([experts.high, experts.low, experts.high]):
            want, want_h = expert(x[i:i + 1], t[i:i + 1], ctx[i:i + 1], return_hidden=(1,))
            assert torch.allclose(out[i:i + 1], want, rtol=0, atol=1e-6)
            assert torch.allclose(hidden[1][i:i + 1], want_h[1], rtol=0, atol=1e-6)
        assert not torch.allclose(experts.high(x[1:2], t[1:2], ctx[1:2]), out[1:2], atol=1e-3)  # the experts differ


@pytest.mark.parametrize("fmt", ["original", "diffusers"])
def test_two_expert_layouts_load_both_experts(tmp_path, fmt):
    experts = _experts(boundary=0.9 if fmt == "diffusers" else 0.875)
    experts.save_pretrained(tmp_path / "a14b", format=fmt)
    names = ("high_noise_model", "low_noise_model") if fmt == "original" else ("transformer", "transformer_2")
    assert all((tmp_path / "a14b" / n / "config.json").exists() for n in names)
    back = WanExperts.from_pretrained(tmp_path / "a14b")
    assert back.boundary == experts.boundary  # diffusers: model_index.json; original: Wan2.2's T2V value
    for mine, theirs in zip(experts.experts, back.experts):
        assert all(torch.equal(mine.state_dict()[k], v) for k, v in theirs.state_dict().items())
    with pytest.raises(CheckpointError, match="two experts"):
        WanModel.from_pretrained(tmp_path / "a14b")
    high = WanModel.from_pretrained(tmp_path / "a14b", expert="high")
    assert torch.equal(high.head.head.weight, experts.high.head.head.weight)


def test_convert_cli_converts_both_experts(tmp_path, capsys):
    from tmd_megatron.cli.convert import main as convert

    experts = _experts()
    experts.save_pretrained(tmp_path / "orig", format="original")
    assert convert([str(tmp_path / "orig"), str(tmp_path / "diff"), "--to", "diffusers"]) == 0
    assert "in two experts" in capsys.readouterr().out
    back = WanExperts.from_pretrained(tmp_path / "diff")
    assert back.boundary == 0.875  # the original layout's default for T2V, recorded as boundary_ratio
    for mine, theirs in zip(experts.experts, back.experts):
        assert all(torch.equal(mine.state_dict()[k], v) for k, v in theirs.state_dict().items())
    with pytest.raises(CheckpointError, match="not a two-expert"):
        WanModel.from_pretrained(tmp_path / "diff" / "transformer", expert="high")


def test_teacher_sampling_and_kd_guidance_switch_experts_by_t():
    """The Euler sampler of teacher data and KD pairs, with CFG and skip-layer guidance, on a two-expert teacher
    equals a hand loop that picks the expert of each step's t (grid crossing the boundary)."""
    from tmd_megatron.algorithms.guidance import cfg_combine, wan_velocity
    from tmd_megatron.algorithms.sampling import teacher_euler_sample
    from tmd_megatron.algorithms.timesteps import wan_sampling_grid

    experts = _experts()
    x, _, ctx = sample_inputs(TI2V, latent=LATENT)
    negative = torch.randn(2, 16, TI2V.text_dim, generator=torch.Generator().manual_seed(4))
    grid = wan_sampling_grid(4, 3.0)  # 0 < ... < 0.999: two steps above 0.875, two below
    assert (grid[1:] >= 0.875).any() and (grid[1:] < 0.875).any()
    with torch.no_grad():
        got = teacher_euler_sample(experts, x, ctx, grid, negative, 4.0, skip_layers=(1,))
        want = x
        for i in range(len(grid) - 1, 0, -1):
            t = grid[i].expand(2)
            expert = experts.high if float(grid[i]) >= 0.875 else experts.low
            cond, _ = wan_velocity(expert, want, t, ctx)
            uncond, _ = wan_velocity(expert, want, t, negative, skip_layers=(1,))
            want = want - (grid[i] - grid[i - 1]).float() * cfg_combine(cond, uncond, 4.0)
    assert torch.allclose(got, want, rtol=0, atol=1e-5)
    with torch.no_grad():
        only_high = teacher_euler_sample(experts.high, x, ctx, grid, negative, 4.0, skip_layers=(1,))
    assert not torch.allclose(got, only_high, atol=1e-3)
