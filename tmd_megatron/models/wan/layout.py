"""Which video tokens this process holds: the one hook through which sequence/context parallelism enters.

The model works on a token stream [B, L, D]. A layout splits it after the patch embedding, says which
global tokens self-attention sees (for RoPE and key masking), and merges the head output back. The single-
process layout below is the identity; tmd_megatron.parallel supplies the sharded ones.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionTokens:
    """Global indices (into the frame-major flat grid) of the tokens attention sees on this rank.

    Padding added to make the token count divisible sits at the end of the whole sequence: keys from
    `real_keys` on are left out of attention.
    """

    index: torch.Tensor  # [L_att] int64, padding rows point at token 0
    real_keys: int | None  # tokens in the whole (padded) sequence that are real, or None when all are


class LocalLayout:
    """All tokens on one process."""

    def split(self, tokens_B_L_D: torch.Tensor) -> torch.Tensor:
        return tokens_B_L_D

    def merge(self, tokens_B_l_D: torch.Tensor, num_tokens: int) -> torch.Tensor:
        return tokens_B_l_D

    def attention_tokens(self, num_tokens: int, device) -> AttentionTokens:
        return AttentionTokens(torch.arange(num_tokens, device=device), None)
