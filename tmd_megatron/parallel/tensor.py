"""Tensor + sequence parallel layers on torch.distributed, and the `TorchParallelLayers` backend.

Megatron's scheme on the token stream [B, L, D]: column-parallel linears (q, k, v, FFN-in) shard output
features, row-parallel linears (o, FFN-out) shard input features. Without sequence parallelism (SP) the
stream is replicated on the TP ranks (copy in, all-reduce out); with SP it is split along tokens between
the layers (all-gather in, reduce-scatter out).

Gradient rule this module keeps (data.py relies on it): without SP every TP-replicated parameter gets the
same full gradient on all TP ranks; with SP every TP-replicated parameter gets a partial gradient that must
be summed over the TP group. That is why the text context (replicated, token_input=False) enters the
k/v projections with no communication under SP: its gradient stays partial like everything else.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tmd_megatron.models.wan.layers import RMSNormAcrossHeads

from . import comm
from .attention import make_local_attention, make_self_attention
from .comm import CommGroup


# ---- autograd-aware collectives ----------------------------------------------------------------------------------
class _CopyToGroup(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the group (a replicated input used by shards)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return comm.all_reduce(grad.contiguous().clone(), ctx.group), None


class _SumOverGroup(torch.autograd.Function):
    """All-reduce forward; the backward is an all-reduce too because every rank uses the sum differently."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return comm.all_reduce(x.contiguous().clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return comm.all_reduce(grad.contiguous().clone(), ctx.group), None


class _ReduceFromGroup(torch.autograd.Function):
    """All-reduce forward, identity backward (row-parallel output without SP: the sum is used replicated)."""

    @staticmethod
    def forward(ctx, x, group):
        return comm.all_reduce(x.contiguous().clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherAlong(torch.autograd.Function):
    """All-gather along `dim`; backward reduce-scatters (the gathered tensor feeds different shards)."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return comm.all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return comm.reduce_scatter(grad, ctx.group, ctx.dim), None, None


class _ReduceScatterAlong(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return comm.reduce_scatter(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return comm.all_gather(grad, ctx.group, ctx.dim), None, None


class _GatherReplicated(torch.autograd.Function):
    """All-gather along `dim` for a result every rank then uses identically: backward keeps its own chunk."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim, ctx.n = group, dim, x.shape[dim]
        return comm.all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return grad.narrow(ctx.dim, ctx.group.rank * ctx.n, ctx.n), None, None


def copy_to_group(x: torch.Tensor, group: CommGroup) -> torch.Tensor:
    return x if group.size == 1 else _CopyToGroup.apply(x, group)


def sum_over_group(x: torch.Tensor, group: CommGroup) -> torch.Tensor:
    return x if group.size == 1 else _SumOverGroup.apply(x, group)


def reduce_from_group(x: torch.Tensor, group: CommGroup) -> torch.Tensor:
    return x if group.size == 1 else _ReduceFromGroup.apply(x, group)


def gather_along(x: torch.Tensor, group: CommGroup, dim: int) -> torch.Tensor:
    return x if group.size == 1 else _GatherAlong.apply(x, group, dim)


def reduce_scatter_along(x: torch.Tensor, group: CommGroup, dim: int) -> torch.Tensor:
    return x if group.size == 1 else _ReduceScatterAlong.apply(x, group, dim)


def gather_replicated(x: torch.Tensor, group: CommGroup, dim: int) -> torch.Tensor:
    return x if group.size == 1 else _GatherReplicated.apply(x, group, dim)


# ---- layers -------------------------------------------------------------------------------------------------------
class InputRegion:
    """Enters the TP region once per input tensor, so q, k and v (which read the same tensor) share one
    all-gather forward and one reduce-scatter (or all-reduce) backward instead of three.

    Under autocast the input is cast to the autocast dtype first: the linears would cast it anyway (same values),
    and the gather and its reduce-scatter then move bf16, as Megatron's do, instead of Wan's fp32 stream."""

    def __init__(self, group: CommGroup):
        self.group = group
        self._last = None  # (input, its version, grad mode, mode, output)

    def enter(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        if mode == "none" or self.group.size == 1:
            return x
        last = self._last
        if last and last[0] is x and last[1] == x._version and last[2] == torch.is_grad_enabled() and last[3] == mode:
            return last[4]
        dev = x.device.type
        cast = x.to(torch.get_autocast_dtype(dev)) if torch.is_autocast_enabled(dev) and x.is_floating_point() else x
        out = gather_along(cast, self.group, 1) if mode == "gather" else copy_to_group(cast, self.group)
        self._last = (x, x._version, torch.is_grad_enabled(), mode, out)
        return out


def _init_linear(weight: nn.Parameter, bias: nn.Parameter | None, fan_in: int) -> None:
    """nn.Linear's default init with the full layer's fan-in (shards keep the single-device distribution)."""
    if weight.is_meta:
        return
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        weight.uniform_(-bound, bound)
        if bias is not None:
            bias.uniform_(-bound, bound)


class ColumnParallelLinear(nn.Module):
    """y[..., out/tp] = x @ W_shard^T + b_shard. `mode`: 'gather' (SP token input), 'copy' (replicated
    input, gradient summed over TP) or 'none' (replicated input, gradient left partial)."""

    def __init__(self, in_features: int, out_features: int, region: InputRegion, mode: str):
        super().__init__()
        tp = region.group.size
        if out_features % tp:
            raise ValueError(f"column-parallel output size {out_features} is not divisible by tp={tp}")
        self.region, self.mode = region, mode
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features // tp, in_features))
        self.bias = nn.Parameter(torch.empty(out_features // tp))
        self.tp_split = {"weight": 0, "bias": 0}
        _init_linear(self.weight, self.bias, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.region.enter(x, self.mode), self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = reduce(x[..., in/tp] @ W_shard^T) + b: all-reduce, or reduce-scatter along tokens under SP."""

    def __init__(self, in_features: int, out_features: int, group: CommGroup, sequence_parallel: bool):
        super().__init__()
        if in_features % group.size:
            raise ValueError(f"row-parallel input size {in_features} is not divisible by tp={group.size}")
        self.group, self.sequence_parallel = group, sequence_parallel
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features // group.size))
        self.bias = nn.Parameter(torch.empty(out_features))
        self.tp_split = {"weight": 1}
        _init_linear(self.weight, self.bias, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = F.linear(x, self.weight)
        if self.sequence_parallel:
            y = reduce_scatter_along(partial, self.group, 1)
        else:
            y = reduce_from_group(partial, self.group)
        return y + self.bias


class TPRMSNormAcrossHeads(RMSNormAcrossHeads):
    """Wan's q/k RMSNorm over all heads when this rank holds dim/tp channels: squared sums summed over TP."""

    def __init__(self, dim: int, eps: float, group: CommGroup):
        if dim % group.size:
            raise ValueError(f"q/k norm size {dim} is not divisible by tp={group.size}")
        super().__init__(dim // group.size, eps)
        self.group, self.full_dim = group, dim
        self.tp_split = {"weight": 0}

    def mean_square(self, x32: torch.Tensor) -> torch.Tensor:
        return sum_over_group(x32.pow(2).sum(dim=-1, keepdim=True), self.group) / self.full_dim


class TorchParallelLayers:
    """The torch backend under TP (+SP) and CP. Parameter names equal the single-device backend's; TP-sharded
    modules carry `tp_split` = {parameter name: split dim} for the sharding code."""

    name = "torch"

    def __init__(self, topo, sequence_parallel: bool = True, cp_comm: str = "ring", attention: str = "sdpa"):
        self.topo = topo
        self.sequence_parallel = bool(sequence_parallel and topo.tp.size > 1)
        self.cp_comm = cp_comm
        self.attention = attention
        self.region = InputRegion(topo.tp)

    def linear_in(self, in_features: int, out_features: int, *, token_input: bool = True) -> nn.Module:
        if self.sequence_parallel:
            mode = "gather" if token_input else "none"
        else:
            mode = "copy"
        return ColumnParallelLinear(in_features, out_features, self.region, mode)

    def linear_out(self, in_features: int, out_features: int) -> nn.Module:
        return RowParallelLinear(in_features, out_features, self.topo.tp, self.sequence_parallel)

    def qk_norm(self, dim: int, eps: float) -> nn.Module:
        return TPRMSNormAcrossHeads(dim, eps, self.topo.tp)

    def self_attention(self) -> nn.Module:
        return make_self_attention(self.topo.cp, self.cp_comm, self.attention)

    def cross_attention(self) -> nn.Module:
        return make_local_attention(self.attention)
