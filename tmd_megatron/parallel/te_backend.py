"""Transformer Engine backend (`backend="te"`): the same Wan blocks from te.pytorch layers. GPU only.

Imported lazily by `parallelize(backend="te")`; importing it without TE raises ImportError. Parameter names and
shard shapes equal the torch backend's (te.Linear has `weight` and `bias`; q/k norms stay our TP RMSNorm), so
checkpoints and sharding are shared; TE modules add an `_extra_state` entry (empty without FP8) that the
sharding code skips. Contracts this module relies on (NVIDIA/TransformerEngine, transformer_engine/pytorch/):
- module/linear.py: with `sequence_parallel`, a column-parallel Linear all-gathers its input along dim 0 and
  a row-parallel one reduce-scatters its output along dim 0 (`gather_along_first_dim` /
  `reduce_scatter_along_first_dim` in distributed.py), then views the output as `(-1, *inp.shape[1:-1], out)`.
  Dim 0 must be the sequence: our token stream is [B, L, D], so SP linears see it transposed to [L, B, D]
  (a view for one sample per microbatch, one copy otherwise). Every microbatch size works.
- q, k and v each gather their input under SP (TE has no shared gather): 3x the torch backend's all-gathers.
- attention/dot_product_attention: q/k/v in bshd, output [B, L, heads*d]; a padding mask is [B, 1, 1, L] with
  True = masked out. Under context parallelism (cp_group, cp_comm_type "p2p" = ring, "a2a" = Ulysses) TE takes
  no padding mask in bshd, needs an even per-rank length (utils.py: seq_len % (2 cp) == 0) and has no fp32
  backend: `parallelize.check_te_layout` refuses those layouts before anything is built (TE-free, so the
  planner can call it anywhere).
tests/te_double.py is a CPU stand-in that enforces these contracts; tests/test_te_backend.py runs this module
through the layout matrix with it. TE's numerics and kernels are checked only on a GPU (`make gpu-check`).
"""
from __future__ import annotations

import torch
import transformer_engine.pytorch as te
from torch import nn

from .tensor import TPRMSNormAcrossHeads
from .topology import Topology

_CP_COMM = {"ring": "p2p", "ulysses": "a2a"}


class _TELinear(te.Linear):
    """te.Linear on our [B, L, D] stream; under SP it hands TE the sequence-first layout TE gathers along."""

    def forward(self, x, *args, **kwargs):
        if not self.sequence_parallel:
            return super().forward(x, *args, **kwargs)
        out = super().forward(x.transpose(0, 1).contiguous(), *args, **kwargs)  # [L(/tp), B, F]
        return out.transpose(0, 1)


class TEAttention(nn.Module):
    """te.DotProductAttention on [B, L, heads, d]; built at first use, when the local head count is known."""

    def __init__(self, topo: Topology | None = None, cp_comm: str = "ring", attention_type: str = "self"):
        super().__init__()
        self.topo, self.cp_comm, self.attention_type = topo, cp_comm, attention_type
        self.__dict__["_cores"] = {}  # not submodules: they hold no weights and must not enter the state dict

    @property
    def context_parallel(self) -> bool:
        return self.topo is not None and self.topo.cp.size > 1

    def _core(self, heads: int, head_dim: int, device: torch.device):
        key = (heads, head_dim)
        if key not in self._cores:
            kwargs = dict(qkv_format="bshd", attention_dropout=0.0, attn_mask_type="no_mask",
                          attention_type=self.attention_type)
            if self.context_parallel:
                kwargs.update(
                    cp_group=self.topo.cp.pg,
                    cp_global_ranks=list(self.topo.cp.ranks),
                    # TE overlaps two attention kernels on a second stream (dot_product_attention.py, cp_stream)
                    cp_stream=torch.cuda.Stream() if device.type == "cuda" else None,
                    cp_comm_type=_CP_COMM[self.cp_comm],
                )
            self._cores[key] = te.DotProductAttention(heads, head_dim, **kwargs)
        return self._cores[key]

    def forward(self, q, k, v, real_keys=None):
        b, length, heads, d = q.shape
        q, k = q.to(v.dtype), k.to(v.dtype)  # TE asserts one dtype for q, k and v
        core = self._core(heads, d, q.device)
        if real_keys is None:  # the layout passes a count only when it padded the sequence
            out = core(q, k, v, attn_mask_type="no_mask")
        elif self.context_parallel:
            raise ValueError("backend 'te' cannot mask padded tokens under context parallelism; choose a latent size "
                             "whose token count divides cp*tp, or backend 'torch'")
        else:
            # self-attention padding mask [B, 1, 1, L], True = masked out (padding sits at the end); TE zero-fills
            # the padded query rows, which the layout discards
            masked = torch.arange(length, device=q.device) >= real_keys
            out = core(q, k, v, attention_mask=masked[None, None, None, :].expand(b, 1, 1, -1).contiguous(),
                       attn_mask_type="padding")
        return out.view(b, length, heads, d)


class TELayers:
    name = "te"

    def __init__(self, topo: Topology | None = None, sequence_parallel: bool = True, cp_comm: str = "ring"):
        self.topo = topo or Topology.single(device="cuda")
        if self.topo.device.type != "cuda" and not getattr(te, "CPU_DOUBLE", False):
            raise RuntimeError("backend 'te' needs CUDA; use backend 'torch'")
        self.tp = self.topo.tp.size
        self.sequence_parallel = bool(sequence_parallel and self.tp > 1)
        self.cp_comm = cp_comm

    def _kwargs(self, mode: str | None = None) -> dict:
        # parallelize builds on the meta device; TE would otherwise allocate on the training device
        meta = torch.get_default_device().type == "meta"
        kwargs = dict(bias=True, device="meta" if meta else self.topo.device)
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
