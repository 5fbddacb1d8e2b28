"""Conv3D discriminator heads on teacher features (paper Sec. 3.2, 4.3, App. A.3, Table 7).

One head per configured teacher block (1.3B: 15, 22, 29; 14B: 19, 29, 39). A head reads that block's hidden
tokens as a video volume: `model.tokens_to_grid` gives [B, D, F', H', W']; "unpatchified" features spread D
over the patch, [B, D/P, F, H, W] in the output head's channel order (P = p_t·p_h·p_w). The heads are our own
design (the paper gives only "Conv3D" and the total size); `width` sizes them so the 1.3B/14B defaults land
near Table 7's 68M/172M: three convolutions, the first two with (3, 4, 4) kernels, the third 3³ with 2·width
outputs, GroupNorm + LeakyReLU, a 1×1×1 logit map averaged over the volume.
"""
from __future__ import annotations

import math

import torch
from torch import nn

FEATURE_LAYOUTS = ("unpatchify", "grid")


def unpatchify_features(grid_B_D_F_H_W: torch.Tensor, patch_size: tuple[int, int, int]) -> torch.Tensor:
    """[B, D, F', H', W'] -> [B, D/P, F'p_t, H'p_h, W'p_w]; channel index ((i_t·p_h + i_h)·p_w + i_w)·C + c."""
    p_t, p_h, p_w = patch_size
    b, d, f, h, w = grid_B_D_F_H_W.shape
    c = d // (p_t * p_h * p_w)
    x = grid_B_D_F_H_W.reshape(b, p_t, p_h, p_w, c, f, h, w)
    return x.permute(0, 4, 5, 1, 6, 2, 7, 3).reshape(b, c, f * p_t, h * p_h, w * p_w)


def _norm(channels: int) -> nn.GroupNorm:
    # Up to 32 groups of at least 4 channels: single-channel groups over a 1-voxel map would output zeros.
    return nn.GroupNorm(math.gcd(32, max(channels // 4, 1)), channels)


class Conv3dHead(nn.Module):
    def __init__(self, in_channels: int, width: int):
        super().__init__()
        act = nn.LeakyReLU(0.2)
        self.net = nn.Sequential(
            nn.Conv3d(in_channels, width, kernel_size=(3, 4, 4), stride=(1, 2, 2), padding=1), _norm(width), act,
            nn.Conv3d(width, width, kernel_size=(3, 4, 4), stride=2, padding=1), _norm(width), act,
            nn.Conv3d(width, 2 * width, kernel_size=3, stride=2, padding=1), _norm(2 * width), act,
            nn.Conv3d(2 * width, 1, kernel_size=1),
        )

    def forward(self, x_B_C_F_H_W: torch.Tensor) -> torch.Tensor:
        """One logit per sample: the mean of the patch logits."""
        if min(x_B_C_F_H_W.shape[-2:]) < 4:
            raise ValueError(
                f"discriminator input {tuple(x_B_C_F_H_W.shape[2:])} is too small: height and width must be >= 4 "
                "(use a larger latent or features='unpatchify')"
            )
        return self.net(x_B_C_F_H_W.float()).flatten(1).mean(1)


class Discriminator(nn.Module):
    """Heads `heads.<layer>` (stable names) over teacher features at `layers`; forward returns [B, n_heads]."""

    def __init__(
        self,
        dim: int,
        layers: tuple[int, ...],
        width: int,
        patch_size: tuple[int, int, int] = (1, 2, 2),
        features: str = "unpatchify",
    ):
        super().__init__()
        if features not in FEATURE_LAYOUTS:
            raise ValueError(f"features={features!r}; choose one of {FEATURE_LAYOUTS}")
        if not layers:
            raise ValueError("the discriminator needs at least one teacher layer")
        volume = math.prod(patch_size)
        if features == "unpatchify" and dim % volume:
            raise ValueError(f"dim={dim} is not divisible by the patch volume {volume}; use features='grid'")
        self.layers = tuple(int(i) for i in layers)
        self.patch_size = tuple(patch_size)
        self.features = features
        in_channels = dim // volume if features == "unpatchify" else dim
        self.heads = nn.ModuleDict({str(i): Conv3dHead(in_channels, width) for i in self.layers})

    @classmethod
    def for_teacher(cls, teacher, layers, width, features="unpatchify") -> "Discriminator":
        bad = [i for i in layers if not 0 <= i < teacher.config.num_layers]
        if bad:
            raise ValueError(f"discriminator layers {bad} are outside the teacher's {teacher.config.num_layers} blocks")
        return cls(teacher.config.dim, tuple(layers), width, teacher.config.patch_size, features)

    def volumes(self, model, hidden: dict[int, torch.Tensor], latent_shape) -> dict[int, torch.Tensor]:
        """Hidden tokens {layer: [B, L_local, D]} of `model` on a latent of `latent_shape` as head inputs."""
        missing = [i for i in self.layers if i not in hidden]
        if missing:
            raise ValueError(f"teacher hidden states for layers {missing} were not captured")
        grid = tuple(n // p for n, p in zip(latent_shape[2:], self.patch_size))
        geom = model.geometry(grid, hidden[self.layers[0]].device)
        out = {}
        for i in self.layers:
            vol = model.tokens_to_grid(hidden[i], geom)
            out[i] = unpatchify_features(vol, self.patch_size) if self.features == "unpatchify" else vol
        return out

    def forward(self, volumes: dict[int, torch.Tensor]) -> torch.Tensor:
        return torch.stack([self.heads[str(i)](volumes[i]) for i in self.layers], dim=1)
