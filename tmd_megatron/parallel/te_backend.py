"""Transformer Engine backend (`backend="te"`): the same Wan blocks from te.pytorch layers. GPU only.

Imported lazily (get_backend("te") or parallelize(backend="te")); importing it without TE raises ImportError.
Parameter names and shard shapes equal the torch backend's (te.Linear has `weight` and `bias`; q/k norms stay
our TP RMSNorm), so checkpoints and sharding are shared. Differences, all untested on CPU (docs/parallel.md):
- TE's sequence-parallel linears gather along the first dim of the flattened input, which is token order only
  for one sample per microbatch: SP with TE requires microbatch size 1 (checked).
- q, k and v each gather their input under SP (TE has no shared gather): 3x the torch backend's all-gathers.
- Self-attention is te DotProductAttention with cp_group / cp_comm_type ("p2p" = ring, "a2a" = Ulysses); TE's
  CP in bshd format takes no padding mask, so the token count must divide cp*tp (checked).
"""
from __future__ import annotations

import torch
import transformer_engine.pytorch as te
from torch import nn

from tmd_megatron.models.wan.layers import register_backend

from .tensor import TPRMSNormAcrossHeads
from .topology import Topology

_CP_COMM = {"ring": "p2p", "ulysses": "a2a"}


class _TELinear(te.Linear):
    def forward(self, x, *args, **kwargs):
        if self.sequence_parallel and x.shape[0] != 1:
            raise ValueError(
                f"backend 'te' with sequence parallelism needs microbatch size 1 (got {x.shape[0]}); "
                "use smaller microbatches or backend 'torch'"
            )
        return super().forward(x, *args, **kwargs)


class TEAttention(nn.Module):
    """te.DotProductAttention on [B, L, heads, d]; built at first use, when the local head count is known."""

    def __init__(self, topo: Topology | None = None, cp_comm: str = "ring", attention_type: str = "self"):
        super().__init__()
        self.topo, self.cp_comm, self.attention_type = topo, cp_comm, attention_type
        self.__dict__["_cores"] = {}  # not submodules: they hold no weights and must not enter the state dict

    def _core(self, heads: int, head_dim: int):
        key = (heads, head_dim)
        if key not in self._cores:
            kwargs = dict(qkv_format="bshd", attention_dropout=0.0, attn_mask_type="no_mask",
                          attention_type=self.attention_type)
            if self.topo is not None and self.topo.cp.size > 1:
                kwargs.update(
                    cp_group=self.topo.cp.pg,
                    cp_global_ranks=list(self.topo.cp.ranks),
                    cp_stream=torch.cuda.Stream(),
                    cp_comm_type=_CP_COMM[self.cp_comm],
                )
            self._cores[key] = te.DotProductAttention(heads, head_dim, **kwargs)
        return self._cores[key]

    def forward(self, q, k, v, key_valid=None):
        b, length, heads, d = q.shape
        q, k = q.to(v.dtype), k.to(v.dtype)
        core = self._core(heads, d)
        if key_valid is None:
            out = core(q, k, v, attn_mask_type="no_mask")
        else:
            if self.topo is not None and self.topo.cp.size > 1:
                raise ValueError(
                    "backend 'te' cannot mask padded tokens under context parallelism; choose a latent size whose "
                    "token count divides cp*tp, or backend 'torch'"
                )
            # self-attention padding mask [B, 1, 1, S], True where masked; padded queries are discarded later
            mask = (~key_valid)[None, None, None, :].expand(b, 1, 1, -1)
            out = core(q, k, v, attention_mask=mask, attn_mask_type="padding")
        return out.view(b, length, heads, d)


class TELayers:
    name = "te"

    def __init__(self, topo: Topology | None = None, sequence_parallel: bool = True, cp_comm: str = "ring"):
        if not torch.cuda.is_available():
            raise RuntimeError("backend 'te' needs CUDA; use backend 'torch'")
        self.topo = topo or Topology.single(device="cuda")
        self.tp = self.topo.tp.size
        self.sequence_parallel = bool(sequence_parallel and self.tp > 1)
        self.cp_comm = cp_comm

    def _kwargs(self, mode: str | None = None) -> dict:
        # parallelize builds on the meta device; TE would otherwise allocate on CUDA
        kwargs = dict(bias=True, device="meta" if torch.get_default_device().type == "meta" else "cuda")
        if self.tp > 1 and mode is not None:
            kwargs.update(tp_group=self.topo.tp.pg, tp_size=self.tp, parallel_mode=mode,
                          sequence_parallel=self.sequence_parallel)
        return kwargs

    def linear_in(self, in_features: int, out_features: int, *, token_input: bool = True) -> nn.Module:
        if self.sequence_parallel and not token_input:
            # replicated text under SP: local shard, no communication, partial gradient (as the torch backend)
            lin = te.Linear(in_features, out_features // self.tp, **self._kwargs())
        else:
            lin = _TELinear(in_features, out_features, **self._kwargs("column"))
        lin.tp_split = {"weight": 0, "bias": 0} if self.tp > 1 else {}
        return lin

    def linear_out(self, in_features: int, out_features: int) -> nn.Module:
        lin = _TELinear(in_features, out_features, **self._kwargs("row"))
        lin.tp_split = {"weight": 1} if self.tp > 1 else {}
        return lin

    def qk_norm(self, dim: int, eps: float) -> nn.Module:
        return TPRMSNormAcrossHeads(dim, eps, self.topo.tp)

    def self_attention(self) -> nn.Module:
        return TEAttention(self.topo, self.cp_comm)

    def cross_attention(self) -> nn.Module:
        return TEAttention(None, attention_type="cross")


register_backend("te", TELayers)
