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
