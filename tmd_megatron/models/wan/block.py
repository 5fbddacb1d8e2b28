"""One Wan DiT block (WAN_SPEC §2.4): modulated self-attention, cross-attention to text, modulated FFN."""
from __future__ import annotations

import torch
from torch import nn

import kernels

from .config import WanConfig
from .layers import FP32LayerNorm
from .rope import rotate


def fp32_region(device: torch.device):
    """Autocast off: the original runs modulation, time embedding and head in fp32 even under bf16 autocast."""
    return torch.autocast(device_type=device.type, enabled=False)


def modulate(normed: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return normed.float() * (1 + scale) + shift


def norm_modulate(norm: FP32LayerNorm, x, shift, scale) -> torch.Tensor:
    """modulate(norm(x), shift, scale), fused by the Triton kernel where kernels run on x's device (kernels/)."""
    out = kernels.try_layer_norm_modulate(x, shift, scale, norm.eps) if norm.weight is None else None
    return modulate(norm(x), shift, scale) if out is None else out


class WanSelfAttention(nn.Module):
    def __init__(self, cfg: WanConfig, layers):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.q = layers.linear_in(cfg.dim, cfg.dim)
        self.k = layers.linear_in(cfg.dim, cfg.dim)
        self.v = layers.linear_in(cfg.dim, cfg.dim)
        self.o = layers.linear_out(cfg.dim, cfg.dim)
        self.norm_q = layers.qk_norm(cfg.dim, cfg.eps) if cfg.qk_norm else nn.Identity()
        self.norm_k = layers.qk_norm(cfg.dim, cfg.eps) if cfg.qk_norm else nn.Identity()
        self.attn = layers.self_attention()

    def forward(self, x, rope_cos, rope_sin, real_keys=None):
        # The head count is read from the projection width, so a tensor-parallel shard holds n/tp heads.
        q = self.norm_q(self.q(x)).unflatten(-1, (-1, self.head_dim))
        k = self.norm_k(self.k(x)).unflatten(-1, (-1, self.head_dim))
        v = self.v(x).unflatten(-1, (-1, self.head_dim))
        q, k = rotate(q, rope_cos, rope_sin), rotate(k, rope_cos, rope_sin)
        return self.o(self.attn(q, k, v, real_keys).flatten(-2))


class WanCrossAttention(nn.Module):
    """Attention from video tokens to all text tokens: no RoPE and no mask (padded text rows included)."""

    def __init__(self, cfg: WanConfig, layers):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.q = layers.linear_in(cfg.dim, cfg.dim)
        self.k = layers.linear_in(cfg.dim, cfg.dim, token_input=False)
        self.v = layers.linear_in(cfg.dim, cfg.dim, token_input=False)
        self.o = layers.linear_out(cfg.dim, cfg.dim)
        self.norm_q = layers.qk_norm(cfg.dim, cfg.eps) if cfg.qk_norm else nn.Identity()
        self.norm_k = layers.qk_norm(cfg.dim, cfg.eps) if cfg.qk_norm else nn.Identity()
        self.attn = layers.cross_attention()

    def forward(self, x, context):
        q = self.norm_q(self.q(x)).unflatten(-1, (-1, self.head_dim))
        k = self.norm_k(self.k(context)).unflatten(-1, (-1, self.head_dim))
        v = self.v(context).unflatten(-1, (-1, self.head_dim))
        return self.o(self.attn(q, k, v).flatten(-2))


class WanBlock(nn.Module):
    # Parameter names follow the original Wan2.1 checkpoint (norm3 is the affine pre-cross-attention norm).
    def __init__(self, cfg: WanConfig, layers):
        super().__init__()
        self.norm1 = FP32LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = WanSelfAttention(cfg, layers)
        self.norm3 = FP32LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = WanCrossAttention(cfg, layers)
        self.norm2 = FP32LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(
            layers.linear_in(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), layers.linear_out(cfg.ffn_dim, cfg.dim)
        )
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim**0.5)

    def forward(self, x, context, e0_B_6_D, rope_cos, rope_sin, real_keys=None):
        with fp32_region(x.device):
            mod = (self.modulation + e0_B_6_D).unsqueeze(2)  # [B, 6, 1, D]
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.unbind(1)
        y = self.self_attn(norm_modulate(self.norm1, x, shift1, scale1), rope_cos, rope_sin, real_keys)
        x = x + y * gate1
        x = x + self.cross_attn(self.norm3(x), context)
        y = self.ffn(norm_modulate(self.norm2, x, shift2, scale2))
        return x + y * gate2
