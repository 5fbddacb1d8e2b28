"""A CPU stand-in for the parts of Transformer Engine (2.x) our `te` backend uses, written from TE's source.

It enforces TE's contracts -- input/output layouts, the dimension sequence parallelism gathers and scatters,
mask polarity, dtype rules, what context parallelism refuses -- and computes the same math in torch, so the te
backend's *wiring* runs through the CPU layout matrix (tests/test_te_backend.py). It proves nothing about TE's
numerics or fused kernels: only a GPU does (`make gpu-check`). References are to NVIDIA/TransformerEngine at
d0067d0 (v2.18+):

- pytorch/module/linear.py `Linear.__init__`: parallel_mode in {None, "column", "row"}; column divides
  out_features by tp_size, row divides in_features (`divide` asserts divisibility); tp_size comes from tp_group;
  `sequence_parallel = tp_size > 1 and sequence_parallel`; weight [out, in], bias [out] (row: the full out).
- linear.py `_linear_forward_impl`: column + SP all-gathers the input along its *first* dimension
  (`gather_along_first_dim`, distributed.py), whatever its rank -- it expects [seq, batch, hidden]; row + SP
  reduce-scatters the output along the first dimension (`reduce_scatter_along_first_dim`, which raises
  ValueError when dim 0 is not divisible), row without SP all-reduces; the output is
  `out.view(-1, *inp.shape[1:-1], out_features)`; the row bias is added after the collective.
- linear.py backward: column + SP reduce-scatters dgrad along dim 0, column without SP all-reduces it; row + SP
  all-gathers grad_output along dim 0 (the adjoints of the forward, which autograd gives us here).
- module/base.py `set_activation_dtype`: under autocast the activation dtype is autocast's; outside it, an input
  whose dtype differs from the parameters' raises TypeError ("Data types for parameters must match ...").
  `get_extra_state` returns an empty uint8 tensor without FP8, so `<module>._extra_state` is in state_dict.
- attention/dot_product_attention/dot_product_attention.py `DotProductAttention`: attn_mask_type defaults to
  "causal"; q, k, v must share a dtype; head dims must equal kv_channels and the head count
  num_attention_heads; outputs are [b, s, h*d] for bshd and [s, b, h*d] for sbhd (backends.py); a padding mask
  is bool [b, 1, 1, s] (a pair of them for cross-attention) with True = masked out, sequence lengths are its
  False counts (utils.get_cu_seqlens), padded query rows come back zero.
- Context parallelism (context_parallel.py, utils.get_attention_backend): fp32 has no CP backend ("No dot
  product attention backend is available"); p2p and a2a need an even per-rank sequence length; a2a needs heads
  divisible by cp; bshd/sbhd under CP take no padding mask; only p2p, a2a (and all_gather, a2a+p2p: not
  doubled here) exist. For non-causal attention the result on a rank is exact attention of its queries over the
  whole sequence, which the double computes by gathering K/V.
"""
from __future__ import annotations

import sys
import types

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

CPU_DOUBLE = True  # te_backend lets a CPU device through only for this module


def _world(group) -> int:
    return dist.get_world_size(group) if dist.is_initialized() and group is not None else 1


def _divide(n: int, d: int) -> int:
    if n % d:
        raise AssertionError(f"{n} is not divisible by {d}")
    return n // d


# ---- collectives along the first dimension, with their adjoints ---------------------------------------------------
def _gather0(x, group):
    out = torch.empty((x.shape[0] * _world(group), *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out


def _scatter0(x, group):
    n = _world(group)
    if x.shape[0] % n:
        raise ValueError(f"First dimension of the tensor should be divisible by tensor parallel size, but got "
                         f"dim_size[0]={x.shape[0]} and world_size={n}")
    out = torch.empty((x.shape[0] // n, *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.reduce_scatter_tensor(out, x.contiguous(), group=group)
    return out


def _all_reduce(x, group):
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    return x


class _Gather0(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather0(x, group)

    @staticmethod
    def backward(ctx, g):
        return _scatter0(g, ctx.group), None


class _Scatter0(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _scatter0(x, group)

    @staticmethod
    def backward(ctx, g):
        return _gather0(g, ctx.group), None


class _AllReduceFwd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _AllReduceBwd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g, ctx.group), None


class _TEModule(nn.Module):
    """TransformerEngineBaseModule's checkpoint surface: an `_extra_state` entry (empty without FP8)."""

    def get_extra_state(self):
        return torch.empty(0, dtype=torch.uint8)

    def set_extra_state(self, state):
        if state is not None and (not torch.is_tensor(state) or state.numel()):
            raise AssertionError("the double holds no FP8 state; a non-empty _extra_state was loaded")


class Linear(_TEModule):
    def __init__(self, in_features, out_features, sequence_parallel=False, fuse_wgrad_accumulation=False,
                 tp_group=None, tp_size=1, get_rng_state_tracker=None, rng_tracker_name=None, init_method=None,
                 bias=True, return_bias=False, params_dtype=None, parallel_mode=None, parameters_split=None,
                 device="cuda", **unsupported):
        super().__init__()
        if unsupported:
            raise TypeError(f"the TE double does not model {sorted(unsupported)}")
        if parallel_mode not in (None, "column", "row"):
            raise AssertionError(f"parallel_mode {parallel_mode} not supported")
        if return_bias or parameters_split is not None or fuse_wgrad_accumulation:
            raise TypeError("the TE double does not model return_bias, parameters_split or fuse_wgrad_accumulation")
        self.tp_group = tp_group
        self.tp_size = tp_size if tp_group is None else _world(tp_group)
        self.parallel_mode = parallel_mode
        self.in_features, self.out_features = in_features, out_features
        if parallel_mode == "column":
            self.out_features = _divide(out_features, self.tp_size)
        elif parallel_mode == "row":
            self.in_features = _divide(in_features, self.tp_size)
        self.sequence_parallel = self.tp_size > 1 and sequence_parallel
        dtype = params_dtype or torch.get_default_dtype()
        self.weight = nn.Parameter(torch.empty(self.out_features, self.in_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(self.out_features, dtype=dtype, device=device)) if bias else None
        if self.weight.device.type != "meta":
            nn.init.normal_(self.weight, std=0.023)

    def forward(self, inp, is_first_microbatch=None):
        dev = inp.device.type
        if torch.is_autocast_enabled(dev):
            act = torch.get_autocast_dtype(dev)
        else:
            act = inp.dtype
            for name, p in self.named_parameters():
                if p.dtype != act:
                    raise TypeError("Data types for parameters must match when outside of autocasted region. "
                                    f"Found input dtype: {act} and {name!r} dtype: {p.dtype}")
        with torch.autocast(dev, enabled=False):
            x = inp.to(act)
            w = self.weight.to(act)
            b = None if self.bias is None else self.bias.to(act)
            tp = self.tp_size > 1
            if self.parallel_mode == "column" and tp:
                x = _Gather0.apply(x, self.tp_group) if self.sequence_parallel else _AllReduceBwd.apply(x, self.tp_group)
            if self.parallel_mode == "row" and tp:
                out = F.linear(x, w)
                out = _Scatter0.apply(out, self.tp_group) if self.sequence_parallel else \
                    _AllReduceFwd.apply(out, self.tp_group)
                out = out if b is None else out + b
            else:
                out = F.linear(x, w, b)
            return out.view(-1, *inp.shape[1:-1], out.shape[-1])


_MASK_TYPES = ("no_mask", "padding", "causal")


def _lengths(mask: torch.Tensor) -> torch.Tensor:
    """Sequence lengths from a padding mask [b, 1, 1, s] (True = masked), as utils.get_cu_seqlens counts them."""
    if mask.dtype != torch.bool or mask.ndim != 4 or mask.shape[1:3] != (1, 1):
        raise AssertionError(f"a padding mask must be bool [b, 1, 1, s], got {mask.dtype} {tuple(mask.shape)}")
    return (~mask).sum(dim=(1, 2, 3))


class _GatherSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        parts = [torch.empty_like(x) for _ in range(_world(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim)

    @staticmethod
    def backward(ctx, g):
        n = _world(ctx.group)
        chunks = [c.contiguous() for c in g.chunk(n, ctx.dim)]
        out = torch.empty_like(chunks[0])
        dist.reduce_scatter(out, chunks, group=ctx.group)
        return out, None, None


class DotProductAttention(_TEModule):
    def __init__(self, num_attention_heads, kv_channels, num_gqa_groups=None, attention_dropout=0.0,
                 qkv_format="sbhd", attn_mask_type="causal", window_size=None, sequence_parallel=False, tp_size=1,
                 get_rng_state_tracker=None, tp_group=None, layer_number=None, attention_type="self",
                 cp_group=None, cp_global_ranks=None, cp_stream=None, cp_comm_type="p2p", softmax_scale=None,
                 **unsupported):
        super().__init__()
        if unsupported:
            raise TypeError(f"the TE double does not model {sorted(unsupported)}")
        if attention_dropout or window_size is not None:
            raise TypeError("the TE double does not model dropout or sliding windows")
        self.heads = num_attention_heads // tp_size
        self.kv_heads = (num_gqa_groups or num_attention_heads) // tp_size
        self.head_dim = kv_channels
        self.qkv_format, self.attn_mask_type, self.attention_type = qkv_format, attn_mask_type, attention_type
        self.scale = softmax_scale if softmax_scale is not None else kv_channels ** -0.5
        self.cp_group, self.cp_comm_type = cp_group, cp_comm_type
        if cp_group is not None and _world(cp_group) > 1:
            if cp_comm_type not in ("p2p", "a2a"):
                raise TypeError(f"the TE double models cp_comm_type p2p and a2a, not {cp_comm_type!r}")
            if cp_global_ranks is None or list(cp_global_ranks) != dist.get_process_group_ranks(cp_group):
                raise AssertionError("cp_global_ranks must list the global ranks of cp_group")

    def forward(self, query_layer, key_layer, value_layer, attention_mask=None, qkv_format=None,
                attn_mask_type=None, **unsupported):
        if unsupported:
            raise TypeError(f"the TE double does not model {sorted(unsupported)}")
        q, k, v = query_layer, key_layer, value_layer
        fmt = qkv_format or self.qkv_format
        mask_type = (attn_mask_type or self.attn_mask_type).replace(",", "_")
        if fmt not in ("bshd", "sbhd"):
            raise TypeError(f"the TE double models bshd and sbhd, not {fmt!r}")
        if mask_type not in _MASK_TYPES:
            raise TypeError(f"the TE double models {_MASK_TYPES}, not {mask_type!r}")
        if not (q.dtype == k.dtype == v.dtype):
            raise AssertionError("Queries, keys and values must have the same data type!")
        if k.shape[:-1] != v.shape[:-1]:
            raise AssertionError("Keys and values must have the same batch size, sequence length and number of heads!")
        if q.shape[-1] != self.head_dim or v.shape[-1] != self.head_dim:
            raise AssertionError(f"head_dim must be {self.head_dim}, got q {q.shape[-1]}, v {v.shape[-1]}")
        if q.shape[-2] != self.heads or k.shape[-2] != self.kv_heads:
            raise AssertionError(f"expected {self.heads} query and {self.kv_heads} key heads, got {q.shape[-2]}, "
                                 f"{k.shape[-2]}")
        if fmt == "sbhd":
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        seq_dim = 1
        cp = _world(self.cp_group) if self.cp_group is not None else 1
        if cp > 1:
            if q.dtype not in (torch.float16, torch.bfloat16):
                raise ValueError("No dot product attention backend is available for the provided inputs. Please "
                                 "run with NVTE_DEBUG=1 NVTE_DEBUG_LEVEL=2 to find out the reasons for disabling "
                                 "all backends.")
            if "padding" in mask_type:
                raise AssertionError(f"No support for cp_comm_type={self.cp_comm_type!r}, {mask_type=} and {fmt=}.")
            if q.shape[seq_dim] % 2 or k.shape[seq_dim] % 2:
                raise AssertionError("Sequence length per GPU needs to be divisible by 2!")
            if self.cp_comm_type == "a2a" and (q.shape[-2] % cp or k.shape[-2] % cp):
                raise AssertionError("cp_comm_type='a2a' requires num_heads % cp_size == 0")
            if mask_type == "causal":
                raise TypeError("the TE double does not model causal attention under CP (load-balanced order)")
            k, v = _GatherSeq.apply(k, self.cp_group, seq_dim), _GatherSeq.apply(v, self.cp_group, seq_dim)
        b, sq = q.shape[:2]
        sk = k.shape[1]
        keep_q = keep_k = None
        if mask_type == "padding":
            if attention_mask is None:
                raise AssertionError("Please provide attention_mask for padding!")
            if self.attention_type == "self":
                if not torch.is_tensor(attention_mask):
                    raise AssertionError("self-attention takes one padding mask tensor")
                len_q = len_k = _lengths(attention_mask)
            else:
                if torch.is_tensor(attention_mask) or len(attention_mask) != 2:
                    raise AssertionError("cross-attention takes a pair of padding masks (q, kv)")
                len_q, len_k = _lengths(attention_mask[0]), _lengths(attention_mask[1])
            keep_q = torch.arange(sq, device=q.device)[None, :] < len_q[:, None].to(q.device)  # [b, sq]
            keep_k = torch.arange(sk, device=q.device)[None, :] < len_k[:, None].to(q.device)
        acc = torch.promote_types(q.dtype, torch.float32)
        with torch.autocast(q.device.type, enabled=False):
            qh, kh, vh = (t.transpose(1, 2).to(acc) for t in (q, k, v))  # [b, h, s, d]
            if self.kv_heads != self.heads:
                rep = self.heads // self.kv_heads
                kh, vh = kh.repeat_interleave(rep, 1), vh.repeat_interleave(rep, 1)
            mask = None
            if keep_k is not None:
                mask = keep_k[:, None, None, :]
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, is_causal=mask_type == "causal",
                                                 scale=self.scale)
            if keep_q is not None:
                out = out * keep_q[:, None, :, None]
            out = out.transpose(1, 2).to(q.dtype)  # [b, s, h, d]
        if fmt == "sbhd":
            out = out.transpose(0, 1)
        return out.reshape(*out.shape[:2], -1)


def install() -> types.ModuleType:
    """Make `import transformer_engine.pytorch` give this double (in this process and its children's imports)."""
    root = types.ModuleType("transformer_engine")
    root.__path__ = []
    root.pytorch = sys.modules[__name__]
    sys.modules["transformer_engine"] = root
    sys.modules["transformer_engine.pytorch"] = sys.modules[__name__]
    for name in [m for m in sys.modules if m == "tmd_megatron.parallel.te_backend"]:
        del sys.modules[name]  # re-import against the double
    return sys.modules[__name__]
