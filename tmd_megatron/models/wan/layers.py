"""Layer classes a backend supplies to the Wan model, and the single-device torch backend.

The model asks a backend for its projections, q/k norms and attention cores, so tensor, sequence and
context parallelism (tmd_megatron.parallel) and Transformer Engine swap in without touching model code.
Every backend must create parameters with the same names, so checkpoints do not know who wrote them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import kernels


class RMSNormAcrossHeads(nn.Module):
    """Wan's q/k norm: RMS over the full hidden size (all heads at once), eps inside the root.

    Math in fp32, cast back to the input dtype, then the fp32 gain (WanRMSNorm's order). A tensor-parallel
    subclass overrides `mean_square` to reduce the squared sums over all head shards.
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def mean_square(self, x32: torch.Tensor) -> torch.Tensor:
        return x32.pow(2).mean(dim=-1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        normed = x32 * torch.rsqrt(self.mean_square(x32) + self.eps)
        return normed.to(x.dtype) * self.weight


class KernelRMSNormAcrossHeads(RMSNormAcrossHeads):
    """RMSNormAcrossHeads by the Triton kernel where kernels run on x's device (kernels/), else the parent.

    A separate class so that a tensor-parallel subclass of RMSNormAcrossHeads never takes the local kernel.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = kernels.try_rms_norm(x, self.weight, self.eps)
        return super().forward(x) if out is None else out


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in at least fp32 and returned in the input dtype (WanLayerNorm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        w = self.weight.to(x32.dtype) if self.weight is not None else None
        b = self.bias.to(x32.dtype) if self.bias is not None else None
        return F.layer_norm(x32, self.normalized_shape, w, b, self.eps).to(x.dtype)


def real_key_slice(x_B_L_H_d: torch.Tensor, real_keys: int | None) -> torch.Tensor:
    """The first `real_keys` tokens (padding sits at the end of the sequence); all when None."""
    return x_B_L_H_d if real_keys is None else x_B_L_H_d[:, :real_keys]


class SDPAttention(nn.Module):
    """Global (non-causal) softmax attention on [B, L, heads, d] tensors, scale 1/sqrt(d).

    `real_keys` (int) keeps only the first keys: padding added for parallel splits sits at the end, and a slice
    keeps the fused kernels that a mask would rule out. Queries are never masked. q and k arrive in fp32 from
    RoPE; like the original's flash-attn call they are cast to v's dtype (bf16 under autocast).
    """

    def forward(self, q, k, v, real_keys: int | None = None) -> torch.Tensor:
        k, v = real_key_slice(k, real_keys), real_key_slice(v, real_keys)
        q, k = q.to(v.dtype), k.to(v.dtype)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)


class TorchLayers:
    """Single-device reference backend: plain nn.Linear and torch SDPA."""

    name = "torch"

    def linear_in(self, in_features: int, out_features: int, *, token_input: bool = True) -> nn.Module:
        """A projection whose output features a tensor-parallel backend shards (column parallel).

        token_input says whether the input is the video-token stream (sharded along tokens under sequence
        parallelism) or replicated text context.
        """
        return nn.Linear(in_features, out_features)

    def linear_out(self, in_features: int, out_features: int) -> nn.Module:
        """A projection whose input features a tensor-parallel backend shards (row parallel)."""
        return nn.Linear(in_features, out_features)

    def qk_norm(self, dim: int, eps: float) -> nn.Module:
        return KernelRMSNormAcrossHeads(dim, eps)

    def self_attention(self) -> nn.Module:
        return SDPAttention()

    def cross_attention(self) -> nn.Module:
        return SDPAttention()


def get_backend(backend) -> object:
    """The single-device torch backend for "torch", or pass a backend instance through (the parallel and
    Transformer Engine backends are built by tmd_megatron.parallel, which knows the topology)."""
    if not isinstance(backend, str):
        return backend
    if backend == "torch":
        return TorchLayers()
    raise ValueError(f"unknown backend {backend!r}: WanModel takes 'torch' or a backend instance; build parallel "
                     "or Transformer Engine models with tmd_megatron.parallel.parallelize(backend=...)")
