"""Conv3D discriminator heads on unpatchified teacher features (paper App. A.3, Table 7)."""
import pytest
import torch

from algo_helpers import TINY, gen, single_thread, tiny_teacher  # noqa: F401  (fixture)
from tmd_megatron.models.discriminator import Discriminator, unpatchify_features
from tmd_megatron.models.wan import WanConfig, WanModel

pytestmark = pytest.mark.usefixtures("single_thread")


def test_unpatchify_features_brute_force():
    b, c, (p_t, p_h, p_w), (f, h, w) = 2, 3, (1, 2, 2), (2, 3, 2)
    tokens = torch.randn(b, f * h * w, c * p_t * p_h * p_w, generator=gen(0))
    grid = tokens.transpose(1, 2).unflatten(2, (f, h, w))  # what WanModel.tokens_to_grid returns
    out = unpatchify_features(grid, (p_t, p_h, p_w))
    assert out.shape == (b, c, f * p_t, h * p_h, w * p_w)
    for fi in range(f):
        for hi in range(h):
            for wi in range(w):
                for i in range(p_t):
                    for j in range(p_h):
                        for k in range(p_w):
                            token = tokens[:, (fi * h + hi) * w + wi]
                            chans = token[:, ((i * p_h + j) * p_w + k) * c : ((i * p_h + j) * p_w + k + 1) * c]
                            assert torch.equal(out[:, :, fi * p_t + i, hi * p_h + j, wi * p_w + k], chans)


def test_unpatchify_uses_the_output_heads_channel_order():
    """Run the Wan head's unpatchify on the same token layout: the two must agree."""
    cfg = TINY.replace(out_dim=TINY.dim // 4)
    model = WanModel(cfg)
    tokens = torch.randn(1, 2 * 2 * 3, TINY.dim, generator=gen(1))
    ref = model.unpatchify(tokens, (2, 2, 3))
    assert torch.equal(unpatchify_features(tokens.transpose(1, 2).unflatten(2, (2, 2, 3)), (1, 2, 2)), ref)


@pytest.mark.parametrize(
    "preset,layers,width,paper",
    [("wan2.1-t2v-1.3b", (15, 22, 29), 384, 68e6), ("wan2.1-t2v-14b", (19, 29, 39), 512, 172e6)],
)
def test_head_sizes_land_near_table7(preset, layers, width, paper):
    cfg = WanConfig.preset(preset)
    with torch.device("meta"):
        disc = Discriminator(cfg.dim, layers, width, cfg.patch_size)
    count = sum(p.numel() for p in disc.parameters())
    assert abs(count - paper) / paper < 0.03
    assert sorted(disc.heads.keys()) == sorted(str(i) for i in layers)


def test_volumes_from_a_teacher_forward_and_logits_shape():
    teacher = tiny_teacher()
    disc = Discriminator.for_teacher(teacher, (1, 3), width=16)
    x = torch.randn(2, 16, 2, 4, 4, generator=gen(2))
    t = torch.tensor([300.0, 800.0])
    _, hidden = teacher(x, t, torch.randn(2, 8, 32, generator=gen(3)), return_hidden=(1, 3))
    vols = disc.volumes(teacher, hidden, x.shape)
    assert vols[1].shape == (2, TINY.dim // 4, 2, 4, 4)
    assert disc(vols).shape == (2, 2)
    with pytest.raises(ValueError, match="too small"):
        disc({1: torch.zeros(1, 16, 1, 2, 2), 3: torch.zeros(1, 16, 1, 2, 2)})
    with pytest.raises(ValueError, match="outside the teacher"):
        Discriminator.for_teacher(teacher, (4,), width=16)
    with pytest.raises(ValueError, match="not captured"):
        disc.volumes(teacher, {1: hidden[1]}, x.shape)


def _fastgen_multiscale_count(c: int, heads: int = 3, scales: int = 5, mlp: int = 1024) -> int:
    """Parameters of FastGen's multiscale_down_mlp_large on C = inner_dim channels, counted by hand from its
    layer list (fastgen/networks/discriminators.py:537-570, channel_reduction 1): per branch a 1×1×1 conv
    (C² + C), a 3³ conv (27C² + C) and two GroupNorms (2C each); an MLP 5C → 1024 → 1."""
    branch = (c * c + c) + (27 * c * c + c) + 2 * (2 * c)
    return heads * (scales * branch + (scales * c * mlp + mlp) + (mlp + 1))


@pytest.mark.parametrize("preset,layers,count", [("wan2.1-t2v-1.3b", (15, 22, 29), 67_870_467),
                                                 ("wan2.1-t2v-14b", (19, 29, 39), 707_910_147)])
def test_multiscale_head_count_on_the_meta_device(preset, layers, count):
    """1.3B: 67,870,467 parameters = Table 7's 68M (FastGen's Wan DMD2 head on D/4 = 384 channels). 14B: the same
    head on 1280 channels is 707.9M, not Table 7's 172M (the paper's 14B head is something else)."""
    cfg = WanConfig.preset(preset)
    with torch.device("meta"):
        disc = Discriminator(cfg.dim, layers, 0, cfg.patch_size, arch="multiscale")
    got = sum(p.numel() for p in disc.parameters())
    assert got == count == _fastgen_multiscale_count(cfg.dim // 4)
    if preset == "wan2.1-t2v-1.3b":
        assert round(got / 1e6) == 68


def test_multiscale_head_shapes_and_pooling():
    """Logits [B, n_heads]; each branch sees its volume average-pooled by its scale (checked against a direct
    average over the blocks), and a volume smaller than a scale is pooled whole along that axis."""
    from tmd_megatron.models.discriminator import MultiscaleHead

    torch.manual_seed(0)
    teacher = tiny_teacher()
    disc = Discriminator.for_teacher(teacher, (1, 3), width=16, arch="multiscale")
    x = torch.randn(2, 16, 2, 4, 4, generator=gen(4))
    _, hidden = teacher(x, torch.tensor([300.0, 800.0]), torch.randn(2, 8, 32, generator=gen(5)), return_hidden=(1, 3))
    assert disc(disc.volumes(teacher, hidden, x.shape)).shape == (2, 2)

    head = MultiscaleHead(8, scales=(2,), mlp_hidden=4)
    vol = torch.randn(3, 8, 3, 4, 6, generator=gen(6))
    seen = {}
    head.branches[0].conv.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    assert head(vol).shape == (3,)
    mixed = head.branches[0].mix(vol)  # pool 2 on (3, 4, 6): floor -> (1, 2, 3) blocks of 2×2×2
    want = mixed[:, :, :2].unflatten(4, (3, 2)).unflatten(3, (2, 2)).unflatten(2, (1, 2)).mean(dim=(3, 5, 7))
    torch.testing.assert_close(seen["x"], want)
    head16 = MultiscaleHead(8, scales=(16,), mlp_hidden=4)
    seen.clear()
    head16.branches[0].conv.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    head16(vol)
    torch.testing.assert_close(seen["x"], head16.branches[0].mix(vol).mean(dim=(2, 3, 4), keepdim=True))
