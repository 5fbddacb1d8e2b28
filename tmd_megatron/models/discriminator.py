"""Discriminator heads on teacher features (paper Sec. 3.2, 4.3, App. A.3, Table 7).

One head per configured teacher block (1.3B: 15, 22, 29; 14B: 19, 29, 39). A head reads that block's hidden
tokens as a video volume: `model.tokens_to_grid` gives [B, D, F', H', W']; "unpatchified" features spread D
over the patch, [B, D/P, F, H, W] in the output head's channel order (P = p_t·p_h·p_w). Two head designs
(`arch`): "conv3d", ours (the paper gives only "Conv3D" and the total size), where `width` sizes the heads so
the 1.3B/14B defaults land near Table 7's 68M/172M: three convolutions, the first two with (3, 4, 4) kernels,
the third 3³ with 2·width outputs, GroupNorm + LeakyReLU, a 1×1×1 logit map averaged over the volume; and
"multiscale", the structure of the authors' FastGen head `multiscale_down_mlp_large` (our own code, see
`MultiscaleHead`).
"""
from __future__ import annotations

import math

import torch
from torch import nn

FEATURE_LAYOUTS = ("unpatchify", "grid")
HEAD_ARCHS = ("conv3d", "multiscale")


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


class _ScaleBranch(nn.Module):
    """1×1×1 mix – GN – LReLU – average pool by `scale` – 3³ conv – GN – LReLU – mean over the volume: [B, C]."""

    def __init__(self, channels: int, scale: int):
        super().__init__()
        self.scale = scale
        self.mix = nn.Sequential(nn.Conv3d(channels, channels, kernel_size=1), _norm(channels), nn.LeakyReLU(0.2))
        self.conv = nn.Sequential(nn.Conv3d(channels, channels, kernel_size=3, padding=1), _norm(channels),
                                  nn.LeakyReLU(0.2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mix(x)
        if self.scale > 1:  # a volume smaller than the scale on some axis is pooled whole along it
            kernel = tuple(min(self.scale, n) for n in x.shape[2:])
            x = nn.functional.avg_pool3d(x, kernel, kernel)
        return self.conv(x).mean(dim=(2, 3, 4))


class MultiscaleHead(nn.Module):
    """The structure of NVlabs/FastGen's `multiscale_down_mlp_large` video head (fastgen/networks/discriminators.py,
    `_build_dit_multiscale_discriminator_head` and its ARCHITECTURES entry: scales 1–16, channel_reduction 1,
    mlp_hidden_dim 1024), which its Wan2.1 DMD2 configs use on the unpatchified features (inner_dim = D/4): five
    branches at pooling scales 1, 2, 4, 8, 16, each keeping all C channels, concatenated (5C) into an MLP
    5C → 1024 → 1. Three heads at C = 384 (1.3B) are 67.9M parameters, Table 7's 68M. Two deliberate
    differences, neither with parameters: FastGen's Dropout(0.1) before the last Linear is left out (every random
    number of our steps comes from per-step generators, so resumes and parallel layouts reproduce the
    single-device step; dropout would draw from the global one), and a volume smaller than a scale is pooled
    whole along that axis where FastGen's AvgPool3d would refuse it (the 21×60×104 Wan latent never is)."""

    SCALES = (1, 2, 4, 8, 16)
    MLP_HIDDEN = 1024

    def __init__(self, in_channels: int, scales: tuple[int, ...] = SCALES, mlp_hidden: int = MLP_HIDDEN):
        super().__init__()
        self.branches = nn.ModuleList(_ScaleBranch(in_channels, s) for s in scales)
        self.classifier = nn.Sequential(nn.Linear(len(scales) * in_channels, mlp_hidden), nn.LeakyReLU(0.2),
                                        nn.Linear(mlp_hidden, 1))

    def forward(self, x_B_C_F_H_W: torch.Tensor) -> torch.Tensor:
        """One logit per sample."""
        x = x_B_C_F_H_W.float()
        return self.classifier(torch.cat([branch(x) for branch in self.branches], dim=1)).squeeze(1)


def make_head(arch: str, in_channels: int, width: int) -> nn.Module:
    if arch == "conv3d":
        return Conv3dHead(in_channels, width)
    if arch == "multiscale":  # sized by the features alone (FastGen's "large": no channel reduction)
        return MultiscaleHead(in_channels)
    raise ValueError(f"discriminator arch={arch!r}; choose one of {HEAD_ARCHS}")


class Discriminator(nn.Module):
    """Heads `heads.<layer>` (stable names) over teacher features at `layers`; forward returns [B, n_heads]."""

    def __init__(
        self,
        dim: int,
        layers: tuple[int, ...],
        width: int,
        patch_size: tuple[int, int, int] = (1, 2, 2),
        features: str = "unpatchify",
        arch: str = "conv3d",
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
        self.arch = arch
        in_channels = dim // volume if features == "unpatchify" else dim
        self.heads = nn.ModuleDict({str(i): make_head(arch, in_channels, width) for i in self.layers})

    @classmethod
    def for_teacher(cls, teacher, layers, width, features="unpatchify", arch="conv3d") -> "Discriminator":
        bad = [i for i in layers if not 0 <= i < teacher.config.num_layers]
        if bad:
            raise ValueError(f"discriminator layers {bad} are outside the teacher's {teacher.config.num_layers} blocks")
        return cls(teacher.config.dim, tuple(layers), width, teacher.config.patch_size, features, arch)

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
