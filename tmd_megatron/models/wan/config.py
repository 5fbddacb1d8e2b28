"""Wan DiT configuration and the presets of every released Wan2.1 / Wan2.2 DiT (docs/wan_family.md).

Sources: Wan-Video/Wan2.1 wan/configs/wan_{t2v_1_3B,t2v_14B,i2v_14B}.py and wan/modules/model.py (MLPProj,
WanI2VCrossAttention); Wan-Video/Wan2.2 wan/configs/wan_{ti2v_5B,t2v_A14B,i2v_A14B}.py; the input/output
widths from diffusers' scripts/convert_wan_to_diffusers.py (get_transformer_config), which lists the config of
every released checkpoint. Parameter counts are in tests/test_wan_family.py, from the formula in
`parameter_count` and from the module on the meta device.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

MODEL_TYPES = ("t2v", "i2v", "ti2v")
# I2V models see [x_t, mask, conditioning latent]: 4 mask channels (one per packed video frame of the first latent
# frame, Wan2.1 wan/image2video.py `msk`), then the VAE latent of the first frame followed by zero frames.
I2V_MASK_CHANNELS = 4
# The CLIP image embedding's LayerNorms use torch's default eps (wan/modules/model.py MLPProj; diffusers'
# WanImageEmbedding FP32LayerNorm default), not the DiT's 1e-6.
IMAGE_NORM_EPS = 1e-5


@dataclass(frozen=True)
class WanConfig:
    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096
    text_len: int = 512
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True
    rope_theta: float = 10000.0
    rope_max_positions: int = 1024
    # t2v: text only. i2v: the input also carries the mask and the first-frame latent (in_dim = 2·out_dim + 4),
    # and with image_dim the cross-attention attends to CLIP image tokens too (Wan2.1 I2V; Wan2.2 I2V has none).
    # ti2v: Wan2.2 TI2V-5B, image-conditioned by a clean first latent frame at timestep 0 (per-token timesteps).
    model_type: str = "t2v"
    image_dim: int | None = None  # width of the CLIP image tokens (1280, ViT-H/14 penultimate layer)
    image_len: int = 257  # CLIP image tokens (16 x 16 patches + class token); not stored in checkpoints

    def __post_init__(self):
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        problems = []
        if self.dim % self.num_heads:
            problems.append(f"dim={self.dim} is not divisible by num_heads={self.num_heads}")
        elif self.head_dim % 2:
            problems.append(f"head dim {self.head_dim} must be even (RoPE rotates channel pairs)")
        elif self.head_dim < 6:
            problems.append(f"head dim {self.head_dim} is too small for the 3-D RoPE split (need >= 6)")
        if self.freq_dim % 2:
            problems.append(f"freq_dim={self.freq_dim} must be even (cos and sin halves)")
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            problems.append(f"patch_size={self.patch_size} must be three positive integers")
        for name in ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "text_dim", "text_len",
                     "image_len"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be positive")
        if self.model_type not in MODEL_TYPES:
            problems.append(f"model_type={self.model_type!r}; choose one of {MODEL_TYPES}")
        elif self.model_type == "i2v" and self.in_dim != 2 * self.out_dim + I2V_MASK_CHANNELS:
            problems.append(f"an i2v model takes [x_t, {I2V_MASK_CHANNELS} mask channels, conditioning latent]: "
                            f"in_dim={self.in_dim} must be 2*out_dim+{I2V_MASK_CHANNELS} = "
                            f"{2 * self.out_dim + I2V_MASK_CHANNELS}")
        elif self.model_type != "i2v" and self.in_dim != self.out_dim:
            problems.append(f"a {self.model_type} model maps a latent to its velocity: in_dim={self.in_dim} must "
                            f"equal out_dim={self.out_dim}")
        if self.image_dim is not None and (self.image_dim < 1 or self.model_type != "i2v"):
            problems.append(f"image_dim={self.image_dim} (CLIP image tokens) needs model_type='i2v' and a "
                            "positive width")
        if problems:
            raise ValueError("invalid WanConfig: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_split(self) -> tuple[int, int, int]:
        """Real channels of the head dim given to (frame, height, width): Wan's 44/42/42 for d=128."""
        d_hw = 2 * (self.head_dim // 6)
        return (self.head_dim - 2 * d_hw, d_hw, d_hw)

    @property
    def patch_volume(self) -> int:
        p_t, p_h, p_w = self.patch_size
        return p_t * p_h * p_w

    @property
    def context_len(self) -> int:
        """Rows of the embedded context the cross-attention reads: the CLIP image tokens (if any), then the text."""
        return self.text_len + (self.image_len if self.image_dim is not None else 0)

    def replace(self, **changes) -> "WanConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "WanConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown WanConfig fields {unknown}; known fields are {sorted(names)}")
        return cls(**d)

    @classmethod
    def preset(cls, name: str) -> "WanConfig":
        try:
            return cls(**PRESETS[name])
        except KeyError:
            raise ValueError(f"unknown Wan preset {name!r}; choose one of {sorted(PRESETS)}") from None


def parameter_count(cfg: WanConfig) -> int:
    """Parameters of one Wan DiT, from the layer shapes of wan/modules/model.py (all Linear layers have bias)."""
    d, f = cfg.dim, cfg.ffn_dim
    linear = lambda i, o: i * o + o  # noqa: E731
    attention = 4 * linear(d, d) + (2 * d if cfg.qk_norm else 0)  # q, k, v, o and the q/k RMSNorm gains
    block = 2 * attention + linear(d, f) + linear(f, d) + 6 * d + (2 * d if cfg.cross_attn_norm else 0)
    total = (linear(cfg.in_dim * cfg.patch_volume, d)  # patch embedding (a Conv3d with kernel = stride)
             + linear(cfg.text_dim, d) + linear(d, d)  # text embedding
             + linear(cfg.freq_dim, d) + linear(d, d)  # time embedding
             + linear(d, 6 * d)  # time projection
             + linear(d, cfg.out_dim * cfg.patch_volume) + 2 * d)  # head and its modulation
    if cfg.image_dim is not None:
        i = cfg.image_dim
        total += 2 * i + linear(i, i) + linear(i, d) + 2 * d  # img_emb: LayerNorm, Linear, GELU, Linear, LayerNorm
        block += 2 * linear(d, d) + (d if cfg.qk_norm else 0)  # k_img, v_img, norm_k_img
    return total + cfg.num_layers * block


_14B = dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
PRESETS: dict[str, dict] = {
    "wan2.1-t2v-1.3b": dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "wan2.1-t2v-14b": dict(_14B),
    # The 480P and 720P I2V checkpoints share this architecture (different weights).
    "wan2.1-i2v-14b": dict(_14B, in_dim=36, model_type="i2v", image_dim=1280),
    # Wan2.2's VAE has 48 latent channels at stride (4, 16, 16).
    "wan2.2-ti2v-5b": dict(dim=3072, ffn_dim=14336, num_heads=24, num_layers=30, in_dim=48, out_dim=48,
                           model_type="ti2v"),
    # A14B: two experts of this config each (high noise for t >= boundary, low noise below; EXPERT_BOUNDARY).
    "wan2.2-t2v-a14b": dict(_14B),
    "wan2.2-i2v-a14b": dict(_14B, in_dim=36, model_type="i2v"),
    # CPU-sized model with Wan's structure; head dim 16 gives an uneven 8/4/4 RoPE split.
    # text_len is shortened from 512 so CPU runs stay fast (the Wan rule pads to text_len, whatever it is).
    "tiny": dict(dim=64, ffn_dim=128, num_heads=4, num_layers=4, text_dim=32, text_len=64, freq_dim=32),
    "tiny-i2v": dict(dim=64, ffn_dim=128, num_heads=4, num_layers=4, text_dim=32, text_len=64, freq_dim=32,
                     in_dim=36, model_type="i2v", image_dim=24, image_len=5),
    "tiny-ti2v": dict(dim=64, ffn_dim=128, num_heads=4, num_layers=4, text_dim=32, text_len=64, freq_dim=32,
                      model_type="ti2v"),
    "tiny-a14b": dict(dim=64, ffn_dim=128, num_heads=4, num_layers=4, text_dim=32, text_len=64, freq_dim=32),
}
# Two-expert presets: the boundary t (in [0, 1]) at and above which the high-noise expert runs (Wan2.2
# wan/configs/wan_t2v_A14B.py `boundary = 0.875`, wan_i2v_A14B.py `boundary = 0.900`; image2video.py compares
# the timestep with boundary * num_train_timesteps, `t >= boundary` -> high noise model).
EXPERT_BOUNDARY: dict[str, float] = {"wan2.2-t2v-a14b": 0.875, "wan2.2-i2v-a14b": 0.900, "tiny-a14b": 0.875}
