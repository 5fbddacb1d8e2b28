"""Wan2.1 T2V DiT configuration and presets (shared/notes/WAN_SPEC.md §1)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


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
        for name in ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "text_dim", "text_len"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be positive")
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


PRESETS: dict[str, dict] = {
    "wan2.1-t2v-1.3b": dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "wan2.1-t2v-14b": dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    # CPU-sized model with Wan's structure; head dim 16 gives an uneven 8/4/4 RoPE split.
    # text_len is shortened from 512 so CPU runs stay fast (the Wan rule pads to text_len, whatever it is).
    "tiny": dict(dim=64, ffn_dim=128, num_heads=4, num_layers=4, text_dim=32, text_len=64, freq_dim=32),
}
