"""Tiny random Wan models in diffusers' implementation, the independent reference for our DiT."""
from __future__ import annotations

import torch

from tmd_megatron.models.wan import WanConfig, WanModel
from tmd_megatron.models.wan.keys import key_maps

# Head dim 20 gives the uneven RoPE split 8/6/6; 2 heads, 2 blocks.
REF_CONFIG = WanConfig(dim=40, ffn_dim=56, num_heads=2, num_layers=2, text_dim=24, text_len=16, freq_dim=32)


def diffusers_wan(cfg: WanConfig = REF_CONFIG, seed: int = 0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    ref = WanTransformer3DModel(
        patch_size=cfg.patch_size,
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim,
        out_channels=cfg.out_dim,
        text_dim=cfg.text_dim,
        freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim,
        num_layers=cfg.num_layers,
        eps=cfg.eps,
        image_dim=cfg.image_dim,
        added_kv_proj_dim=cfg.dim if cfg.image_dim is not None else None,
    )
    # Every tensor random, norm gains around 1 and distinct, so a swapped or dropped tensor shows.
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "norm" in name else 0.0))
    return ref


def ours_from_diffusers(ref, cfg: WanConfig = REF_CONFIG, rename=None) -> WanModel:
    model = WanModel(cfg)
    _, to_orig = key_maps(model.state_dict().keys())
    rename = rename or {}
    state = {to_orig[rename.get(k, k)]: v for k, v in ref.state_dict().items()}
    model.load_state_dict(state)
    return model


def sample_inputs(cfg: WanConfig = REF_CONFIG, batch=2, latent=(3, 8, 10), seed=1, timesteps=(37.0, 912.0)):
    """A latent with a non-square grid, two different timesteps, and Wan-style zero-padded text (and CLIP image
    tokens for a model with an image branch)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_dim, *latent, generator=g)
    t = torch.tensor(timesteps[:batch])
    ctx = torch.randn(batch, cfg.text_len, cfg.text_dim, generator=g)
    ctx[0, cfg.text_len // 2 :] = 0  # first prompt is short: its tail is zero padding, attended unmasked
    if cfg.image_dim is None:
        return x, t, ctx
    return x, t, ctx, torch.randn(batch, cfg.image_len, cfg.image_dim, generator=g)


def diffusers_call(ref, x, t, ctx, image=None):
    """diffusers' forward with our argument order (image tokens go in encoder_hidden_states_image)."""
    return ref(x, t, ctx, encoder_hidden_states_image=image).sample


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())
