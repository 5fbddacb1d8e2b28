"""Bytes a rank receives in one flow-matching training step (one Wan forward + backward and the optimizer step):
measured (the calls `count_comm` recorded, turned into received bytes) against the analytic minimum of the layout.

Received bytes per rank of a call on a group of n ranks, for bandwidth-optimal algorithms (ring / pairwise), in
the counter's conventions (docs/parallel.md): all_gather of output X: (n−1)/n·X; reduce_scatter of input X:
(n−1)/n·X; all_reduce of X: 2(n−1)/n·X; all_to_all of input X: (n−1)/n·X; recv: X; send: nothing received.

The minimum is what the layout's data placement forces every rank to receive, with nothing recomputed or
re-sent, derived here from the model's shapes (not from the implementation):
- TP + SP (Megatron sequence parallelism), per block and direction: each of the three sublayers (self-attention,
  cross-attention, FFN) needs its token-sharded input complete on every TP rank ((t−1)/t·bLD) and its partial
  output summed back onto the token shards ((t−1)/t·bLD); the q/k RMSNorm over all heads needs the squared sums of
  self-q, self-k, cross-q (bL each) and cross-k (bT) reduced. Gradients of TP-replicated parameters (embeddings,
  head, biases after the row-parallel reduction, norm3, modulation) are partial under SP and must be summed.
- CP ring, per block: forward, the K and V of the other c−1 chunks (2(c−1)·bL_cD); backward, the other ranks'
  partial dK and dV of this rank's chunk (2(c−1)·bL_cD), K and V being kept from the forward.
- CP Ulysses, per block and direction: the all-to-all of q, k, v (heads ↔ tokens) and of the attention output:
  (c−1)/c·4·bL_cD.
- Data-parallel-like gradient sync over DP×CP (every parameter's gradient is partial over CP): an all-reduce,
  2(n−1)/n·N (ZeRO-1's reduce-scatter + all-gather of the updated shards is the same volume).
- The model output needs no communication: a loss on each rank's own tokens would only reduce scalars.
Scalars (metrics, the stop flag) are counted in both as they are.
"""
from __future__ import annotations

import math
from collections import defaultdict

from tmd_megatron.models.wan import WanConfig


TP_SUBLAYERS = "TP+SP gathers / reduce-scatters of sublayer inputs and outputs"
TP_ALL_REDUCE = "TP all-reduces: q/k norm sums, gradients of TP-replicated parameters"
CP_RING = "CP ring: K/V forward, dK/dV backward"
CP_ULYSSES = "CP Ulysses: q/k/v and output all-to-alls"
GRAD_SYNC = "gradient sync over CP (ZeRO-1 reduce-scatter + all-gather)"
OUTPUT_MERGE = "model output merged onto every rank"
SCALARS = "metrics and control scalars"


def category(op: str, group: str) -> str:
    """Which part of the step a counted (op, group) belongs to."""
    if group == "world":
        return SCALARS
    if group == "tp":
        return TP_ALL_REDUCE if op == "all_reduce" else TP_SUBLAYERS
    if group == "dp_cp":
        return GRAD_SYNC
    if op in ("send", "recv"):
        return CP_RING
    if op == "all_to_all":
        return CP_ULYSSES
    if op == "all_gather":  # on tp_cp (SP) or cp
        return OUTPUT_MERGE
    raise ValueError(f"no category for {op} on group {group!r}")


def received(table: list, group_sizes: dict[str, int]) -> dict[str, float]:
    """{category: bytes received by this rank} from a count_comm table [[op, group, calls, bytes], ...]."""
    out = defaultdict(float)
    for op, group, _, nbytes in table:
        n = group_sizes[group]
        factor = {"all_gather": (n - 1) / n, "reduce_scatter": (n - 1) / n, "all_reduce": 2 * (n - 1) / n,
                  "all_to_all": (n - 1) / n, "recv": 1.0, "send": 0.0}[op]
        out[category(op, group)] += factor * nbytes
    return dict(out)


def tp_replicated_params(cfg: WanConfig) -> int:
    """Parameters every TP rank holds whole: embeddings, time projection, head, and per block the biases added
    after a row-parallel reduction (self-o, cross-o, FFN-out), norm3 and the modulation table."""
    d = cfg.dim
    patch = cfg.in_dim * cfg.patch_volume * d + d
    text = cfg.text_dim * d + d + d * d + d
    time = cfg.freq_dim * d + d + d * d + d + 6 * d * d + 6 * d
    head = d * cfg.out_dim * cfg.patch_volume + cfg.out_dim * cfg.patch_volume + 2 * d
    per_block = 3 * d + (2 * d if cfg.cross_attn_norm else 0) + 6 * d
    return patch + text + time + head + cfg.num_layers * per_block


def minimum_received(cfg: WanConfig, latent: tuple[int, int, int, int], batch: int, *, tp: int = 1, cp: int = 1,
                     cp_comm: str = "ring", num_params: int, scalars: float = 0.0, e: int = 4) -> dict[str, float]:
    """{what: bytes} a rank must receive in one flow-matching step of `batch` samples (fp32: e = 4)."""
    tokens = math.prod(n // p for n, p in zip(latent[1:], cfg.patch_size))
    b, D, T, blocks = batch, cfg.dim, cfg.text_len, cfg.num_layers
    out = {}
    if tp > 1:
        f = (tp - 1) / tp
        out[TP_SUBLAYERS] = blocks * 2 * (3 * f * b * tokens * D * e + 3 * f * b * tokens * D * e)
        out[TP_ALL_REDUCE] = (blocks * 2 * 2 * f * (3 * b * tokens + b * T) + 2 * f * tp_replicated_params(cfg)) * e
    if cp > 1:
        chunk = b * (tokens / cp) * (D / tp) * e
        if cp_comm == "ring":
            out[CP_RING] = blocks * 4 * (cp - 1) * chunk
        else:
            out[CP_ULYSSES] = blocks * 2 * (cp - 1) / cp * 4 * chunk
        out[GRAD_SYNC] = 2 * (cp - 1) / cp * (num_params / tp) * e
    if scalars:
        out[SCALARS] = scalars
    return out
