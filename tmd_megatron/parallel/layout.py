"""Which video tokens a rank holds under context (CP) and sequence (SP) parallelism.

The flat frame-major token sequence is padded at the end to a multiple of the number of shards and cut
into contiguous chunks: first across CP ranks (the chunk self-attention works on), then, with SP, each CP
chunk across its TP ranks (the residual stream between the linears). Shard s = cp_rank * tp + tp_rank of
the tp_cp group, so one all-gather over that group restores the sequence in order.

Gradients: `split` is a plain slice (its adjoint zero-fills), so parameters upstream of it (patch embedding)
get partial gradients summed later over DP x CP (and TP under SP); `merge` serves a result every rank uses
identically, so its backward keeps the local chunk. Inputs replicated over the token group that need a
gradient go through `replicated_input` first.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tmd_megatron.models.wan.layout import AttentionTokens

from .tensor import copy_to_group, gather_replicated
from .topology import Topology


class ShardedTokenLayout:
    def __init__(self, topo: Topology, sequence_parallel: bool):
        self.topo = topo
        self.sequence_parallel = bool(sequence_parallel and topo.tp.size > 1)
        self.cp = topo.cp.size
        # the group over which the residual stream is split, and this rank's shard index in it
        self.group = topo.tp_cp if self.sequence_parallel else topo.cp
        self.shards = self.group.size
        self.shard = self.group.rank

    def padded_len(self, num_tokens: int) -> int:
        return -(-num_tokens // self.shards) * self.shards

    def local_len(self, num_tokens: int) -> int:
        """Tokens in this rank's residual-stream shard (what a pipeline stage sends)."""
        return self.padded_len(num_tokens) // self.shards

    def split(self, tokens_B_L_D: torch.Tensor) -> torch.Tensor:
        if self.shards == 1:
            return tokens_B_L_D
        num_tokens = tokens_B_L_D.shape[1]
        padded = F.pad(tokens_B_L_D, (0, 0, 0, self.padded_len(num_tokens) - num_tokens))
        n = self.local_len(num_tokens)
        return padded.narrow(1, self.shard * n, n)

    def merge(self, tokens_B_l_D: torch.Tensor, num_tokens: int) -> torch.Tensor:
        if self.shards == 1:
            return tokens_B_l_D
        return gather_replicated(tokens_B_l_D, self.group, 1).narrow(1, 0, num_tokens)

    def attention_tokens(self, num_tokens: int, device) -> AttentionTokens:
        """The CP chunk self-attention sees on this rank; padding beyond `num_tokens` is left out as keys."""
        padded = self.padded_len(num_tokens)
        chunk = padded // self.cp
        index = self.topo.cp.rank * chunk + torch.arange(chunk, device=device)
        if padded == num_tokens:
            return AttentionTokens(index, None)
        index = torch.where(index < num_tokens, index, torch.zeros_like(index))
        return AttentionTokens(index, num_tokens)

    def replicated_input(self, x: torch.Tensor) -> torch.Tensor:
        """Identity forward; backward sums the partial input gradient over the ranks sharing its tokens."""
        return copy_to_group(x, self.group)
