"""Analytic communication per step of the parallel Wan (docs/parallel.md, "Communication"), written from the
layer definitions, independently of the counter (the tests compare the two; the planner uses this model).
Keys: (op, group) -> (calls, bytes) on one rank.

Symbols per microbatch: b samples, L tokens, S = cp*(tp if SP) shards, L_p = ceil(L/S)*S, L_c = L_p/cp (the
chunk attention sees), L_s = L_p/S (the residual shard), D model dim, D_l = D/tp, T text length, N CLIP image
tokens (Wan2.1 I2V; 0 otherwise), P = out_dim*patch volume, e bytes per element of the compute dtype (4 in fp32,
2 under bf16 autocast) and f = max(e, 4) for what stays at least fp32 under autocast: Wan's residual stream
(pipeline boundaries, merged hidden states), the fp32 head output, the time conditioning, q/k norm sums of
squares, ring dK/dV accumulators.
"""
from __future__ import annotations

import math
from collections import defaultdict


class Tally:
    def __init__(self):
        self.calls = defaultdict(int)
        self.bytes = defaultdict(int)

    def add(self, op: str, group: str, calls: int, nbytes_each: int) -> None:
        if calls:
            self.calls[(op, group)] += calls
            self.bytes[(op, group)] += calls * nbytes_each

    def table(self) -> dict:
        return {k: (self.calls[k], self.bytes[k]) for k in sorted(self.calls)}


def pipeline_comm(
    cfg, latent, b, m, *, tp, cp, pp, pp_rank, blocks, sp, cp_comm, ac=False, hidden_block=None, x_grad=True,
    e=4, backward=True, token_timesteps=False,
) -> dict:
    """Forward (+ backward) of m microbatches through this rank's stage (run_pipeline + WanStage).
    token_timesteps: per-token timesteps, so e and e0 cross stage boundaries per token of the shard."""
    grid = tuple(n // p for n, p in zip(latent, cfg.patch_size))
    L = math.prod(grid)
    sp = sp and tp > 1
    S = cp * (tp if sp else 1)
    Lp = -(-L // S) * S
    Lc, Ls = Lp // cp, Lp // S
    D, Dl, T = cfg.dim, cfg.dim // tp, cfg.text_len
    N = cfg.image_len if cfg.image_dim is not None else 0
    P = cfg.out_dim * math.prod(cfg.patch_size)
    first, last = pp_rank == 0, pp_rank == pp - 1
    f = max(e, 4)
    t = Tally()

    def block_forward():
        if tp > 1:
            if sp:  # gather before q/k/v (shared), cross-q, ffn-in; reduce-scatter after o, cross-o, ffn-out
                t.add("all_gather", "tp", 3, b * Lc * D * e)
                t.add("reduce_scatter", "tp", 3, b * Lc * D * e)
            else:  # all-reduce after the three row-parallel linears
                t.add("all_reduce", "tp", 3, b * Lc * D * e)
            t.add("all_reduce", "tp", 3, b * Lc * f)  # sum of squares: self q, self k, cross q
            t.add("all_reduce", "tp", 1, b * T * f)  # cross k on the text
            t.add("all_reduce", "tp", 1 if N else 0, b * N * f)  # image k on the CLIP tokens
        if cp > 1:
            if cp_comm == "ring":  # k and v rotated cp-1 times
                t.add("send", "cp", 2 * (cp - 1), b * Lc * Dl * e)
                t.add("recv", "cp", 2 * (cp - 1), b * Lc * Dl * e)
            else:  # q,k,v stacked in one all-to-all, the output in another
                t.add("all_to_all", "cp", 1, 3 * b * Lc * Dl * e)
                t.add("all_to_all", "cp", 1, b * Lc * Dl * e)

    def block_backward():
        if tp > 1:
            if sp:
                t.add("reduce_scatter", "tp", 3, b * Lc * D * e)
                t.add("all_gather", "tp", 3, b * Lc * D * e)
            else:  # input gradients of the column-parallel linears: tokens x3, text once (k and v share it)
                t.add("all_reduce", "tp", 3, b * Lc * D * e)
                t.add("all_reduce", "tp", 1, b * T * D * e)
                t.add("all_reduce", "tp", 1 if N else 0, b * N * D * e)  # image tokens once (k_img, v_img)
            t.add("all_reduce", "tp", 3, b * Lc * f)
            t.add("all_reduce", "tp", 1, b * T * f)
            t.add("all_reduce", "tp", 1 if N else 0, b * N * f)
        if cp > 1:
            if cp_comm == "ring":  # k, v rotated cp-1 times again; dk, dv (fp32 or wider) reach their owner in cp-1 hops
                for n, size in ((2 * (cp - 1), e), (2 * (cp - 1), f)):
                    t.add("send", "cp", n, b * Lc * Dl * size)
                    t.add("recv", "cp", n, b * Lc * Dl * size)
            else:
                t.add("all_to_all", "cp", 1, 3 * b * Lc * Dl * e)
                t.add("all_to_all", "cp", 1, b * Lc * Dl * e)

    group = "tp_cp" if sp else "cp"
    for _ in range(m):
        for _ in blocks:
            for _ in range(2 if ac and backward else 1):  # activation checkpointing recomputes the forward
                block_forward()
            if backward:
                block_backward()
        if S > 1:
            if last:
                t.add("all_gather", group, 1, b * Lp * P * f)  # merge the head output
            if hidden_block is not None and hidden_block in blocks:
                t.add("all_gather", group, 1, b * Lp * D * f)  # merge the captured hidden state
            if first and x_grad and backward:
                t.add("all_reduce", group, 1, b * cfg.in_dim * math.prod(latent) * f)  # input gradient
        if pp > 1:
            per = b * Ls if token_timesteps else b
            boundary = [b * Ls * D * f, b * (T + N) * D * e, per * D * f, per * 6 * D * f]  # residual, text+image, e, e0
            for nbytes in boundary:
                if not last:
                    t.add("send", "pp", 1, nbytes)  # activations forward
                    if backward:
                        t.add("recv", "pp", 1, nbytes)  # their gradients back
                if not first:
                    t.add("recv", "pp", 1, nbytes)
                    if backward:
                        t.add("send", "pp", 1, nbytes)
    return t.table()


def zero_comm(buckets, *, tp, dp_cp, tp_partial_numel, e=4) -> tuple[dict, dict]:
    """(reduce_grads, step) of ZeroAdamW. buckets: numel of each bucket."""
    reduce, step = Tally(), Tally()
    if tp > 1 and tp_partial_numel:
        reduce.add("all_reduce", "tp", 1, tp_partial_numel * e)
    if dp_cp > 1:
        for n in buckets:
            padded = -(-n // dp_cp) * dp_cp
            reduce.add("reduce_scatter", "dp_cp", 1, padded * e)
            step.add("all_gather", "dp_cp", 1, padded * e)
    return reduce.table(), step.table()
