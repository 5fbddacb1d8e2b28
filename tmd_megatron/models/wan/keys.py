"""Key names of the two Wan checkpoint formats (WAN_SPEC §3.2; the I2V keys from diffusers'
scripts/convert_wan_to_diffusers.py TRANSFORMER_KEYS_RENAME_DICT).

Our modules use the original Wan2.1 names, so the original format is the identity and the diffusers
format is a per-key rename. The map is built per key from the model's own state-dict names, which keeps
the norm2/norm3 swap and the two kinds of `modulation` exact (no substring replacement).
"""
from __future__ import annotations

import re

_TOP = {
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
    "patch_embedding": "patch_embedding",
    # Wan2.1 I2V: the CLIP image embedding (MLPProj: LayerNorm, Linear, GELU, Linear, LayerNorm)
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
}
_BLOCK = {
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "self_attn.norm_q": "attn1.norm_q",
    "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "cross_attn.norm_q": "attn2.norm_q",
    "cross_attn.norm_k": "attn2.norm_k",
    "cross_attn.k_img": "attn2.add_k_proj",
    "cross_attn.v_img": "attn2.add_v_proj",
    "cross_attn.norm_k_img": "attn2.norm_added_k",
    "norm3": "norm2",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


def original_to_diffusers(key: str) -> str:
    if key == "head.modulation":
        return "scale_shift_table"
    m = _BLOCK_KEY.match(key)
    if m:
        i, rest = m.groups()
        if rest == "modulation":
            return f"blocks.{i}.scale_shift_table"
        module, _, leaf = rest.rpartition(".")
        if module in _BLOCK:
            return f"blocks.{i}.{_BLOCK[module]}.{leaf}"
    else:
        module, _, leaf = key.rpartition(".")
        if module in _TOP:
            return f"{_TOP[module]}.{leaf}"
    raise KeyError(f"no diffusers name for Wan key {key!r}")


_TOP_BACK = {v: k for k, v in _TOP.items()}
_BLOCK_BACK = {v: k for k, v in _BLOCK.items()}


def diffusers_to_original(key: str) -> str:
    if key == "scale_shift_table":
        return "head.modulation"
    m = _BLOCK_KEY.match(key)
    if m:
        i, rest = m.groups()
        if rest == "scale_shift_table":
            return f"blocks.{i}.modulation"
        module, _, leaf = rest.rpartition(".")
        if module in _BLOCK_BACK:
            return f"blocks.{i}.{_BLOCK_BACK[module]}.{leaf}"
    else:
        module, _, leaf = key.rpartition(".")
        if module in _TOP_BACK:
            return f"{_TOP_BACK[module]}.{leaf}"
    raise KeyError(f"no original Wan name for diffusers key {key!r}")


def key_maps(original_keys) -> tuple[dict[str, str], dict[str, str]]:
    """(original → diffusers, diffusers → original) for the given original-format keys."""
    fwd = {k: original_to_diffusers(k) for k in original_keys}
    return fwd, {v: k for k, v in fwd.items()}


def detect_format(keys) -> str:
    keys = set(keys)
    if any(k.startswith("condition_embedder.") or k == "scale_shift_table" for k in keys):
        return "diffusers"
    if any(k.startswith(("text_embedding.", "time_embedding.", "head.")) for k in keys):
        return "original"
    raise ValueError("cannot tell the checkpoint format: neither Wan original nor diffusers key names found")


def strip_prefix(keys) -> str:
    """A common prefix some exporters add (ComfyUI's 'model.diffusion_model.'), or ''."""
    for prefix in ("model.diffusion_model.", "diffusion_model."):
        if keys and all(k.startswith(prefix) for k in keys):
            return prefix
    return ""
