"""One Wan DiT block (WAN_SPEC §2.4): modulated self-attention, cross-attention to text (and, in Wan2.1 I2V, to
CLIP image tokens), modulated FFN. The modulation is per sample (e0 [B, 6, D]) or per token (e0 [B, L, 6, D],
Wan2.2's per-token timesteps)."""
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


def modulation_chunks(table: torch.Tensor, e0: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """table [1, k, D] + e0 ([B, k, D] per sample or [B, L, k, D] per token) split into k tensors that broadcast
    against the tokens [B, L, D]: [B, 1, D] or [B, L, D]. Call inside fp32_region."""
    if e0.ndim == 3:
        return (table + e0).unsqueeze(2).unbind(1)
    return (table + e0).unbind(2)


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
    """Attention from video tokens to all text tokens: no RoPE and no mask (padded text rows included).

    With CLIP image tokens (Wan2.1 I2V) the context is [image tokens, text] and the same queries also attend to
    the image tokens through their own k/v projections and k-norm; the two attention outputs are summed before
    the output projection (wan/modules/model.py WanI2VCrossAttention; diffusers' WanAttnProcessor with
    add_k_proj). Image k/v see replicated context like the text's, so tensor parallelism shards them the same way.
    """

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
        self.image_len = cfg.image_len if cfg.image_dim is not None else 0
        if self.image_len:
            self.k_img = layers.linear_in(cfg.dim, cfg.dim, token_input=False)
            self.v_img = layers.linear_in(cfg.dim, cfg.dim, token_input=False)
            self.norm_k_img = layers.qk_norm(cfg.dim, cfg.eps) if cfg.qk_norm else nn.Identity()
            self.attn_img = layers.cross_attention()

    def forward(self, x, context):
        q = self.norm_q(self.q(x)).unflatten(-1, (-1, self.head_dim))
        image, text = context[:, : self.image_len], context[:, self.image_len :]
        k = self.norm_k(self.k(text)).unflatten(-1, (-1, self.head_dim))
        v = self.v(text).unflatten(-1, (-1, self.head_dim))
        out = self.attn(q, k, v)
        if self.image_len:
            k_img = self.norm_k_img(self.k_img(image)).unflatten(-1, (-1, self.head_dim))
            v_img = self.v_img(image).unflatten(-1, (-1, self.head_dim))
            out = out + self.attn_img(q, k_img, v_img)
        return self.o(out.flatten(-2))


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

    def forward(self, x, context, e0, rope_cos, rope_sin, real_keys=None):
        """e0: [B, 6, D] per sample or [B, L_local, 6, D] per token (this rank's tokens)."""
        with fp32_region(x.device):
            shift1, scale1, gate1, shift2, scale2, gate2 = modulation_chunks(self.modulation, e0)
        y = self.self_attn(norm_modulate(self.norm1, x, shift1, scale1), rope_cos, rope_sin, real_keys)
        x = x + y * gate1
        x = x + self.cross_attn(self.norm3(x), context)
        y = self.ffn(norm_modulate(self.norm2, x, shift2, scale2))
        return x + y * gate2
