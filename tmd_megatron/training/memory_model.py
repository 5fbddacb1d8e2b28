"""The planner's per-block memory model: bytes a Wan block saves for backward, and the transient workspace of
ring attention, fitted on our implementation with saved-tensor hooks and the profiler's allocator events
(tests/training/test_plan.py and tests/test_ring_attention.py re-measure every constant)."""
from __future__ import annotations

from tmd_megatron.models.wan import WanConfig

# Saved-for-backward bytes of one Wan block, fitted on our implementation (tests/test_plan.py re-measures):
# per (L·D, L·F, T·D, L, D², D·F). fp32 = plain fp32 training (CPU); bf16 = fp32 weights under bf16 autocast.
BLOCK_SAVED_BYTES = {
    "fp32": (88.8, 7.92, 20.1, 95.1, 0.26, 0.06),
    "bf16": (64.8, 3.92, 14.1, 95.1, 12.3, 4.06),
}
# Bytes per token x dim that a TP shard saves in full rather than 1/tp of, by (sequence parallelism, dtype)
# (fitted on tp 2 and 4 with saved-tensor hooks; tests/training/test_plan.py re-measures). Under bf16 the TP
# input region casts once before its gather/copy, so q, k and v save one bf16 copy of their input, not three.
TP_UNSPLIT_BYTES = {(True, "fp32"): 25.2, (True, "bf16"): 18.2, (False, "fp32"): 46.2, (False, "bf16"): 37.2}
# Wan2.1 I2V: the CLIP tokens' k/v count like text rows (the T·D term with T = text + image tokens), and the
# second attention output adds bytes per L·D (fitted like the above, re-measured in test_plan.py).
IMAGE_BRANCH_BYTES = {"fp32": 8.0, "bf16": 6.0}
# Per-token timesteps (TI2V): the modulation's scale/gate terms are [L, D] fp32 instead of [1, D]: 32 bytes per
# token x dim of the residual shard in each block, and e/e0 per token once per microbatch (same count).
PER_TOKEN_MODULATION_BYTES = 32.0


# Transient bytes of one ring-attention forward + backward per (token, channel) of a rank's chunk: a·e + b for
# input element size e (accumulators, the merged output and the travelling dK/dV stay fp32). Fitted on the CPU
# flash kernel at 4k and 8k tokens, fp32 and bf16 (`python -m tmd_megatron.bench.perf --only ring` re-measures).
RING_WORKSPACE = (7.5, 35.0)


def ring_attention_workspace(batch: int, tokens: int, channels: int, elem_bytes: int) -> float:
    """Bytes a ring-attention call needs beyond its inputs: linear in the chunk length (fused chunk kernels)."""
    a, b = RING_WORKSPACE
    return batch * tokens * channels * (a * elem_bytes + b)


def block_saved_bytes(cfg: WanConfig, tokens: int, dtype: str, tp: int, sequence_parallel: bool = True,
                      per_token: bool = False) -> float:
    """Saved-for-backward bytes of one block for one sample whose TP group holds `tokens` tokens
    (per_token: timesteps per token, Wan2.2 TI2V)."""
    a, b, c, e, w1, w2 = BLOCK_SAVED_BYTES[dtype]
    d, f, t = cfg.dim, cfg.ffn_dim, cfg.context_len
    if cfg.image_dim is not None:
        a += IMAGE_BRANCH_BYTES[dtype]
    split = (a * tokens * d + b * tokens * f + c * t * d) / tp + e * tokens + (w1 * d * d + w2 * d * f) / tp
    shard = tokens / tp if sequence_parallel and tp > 1 else tokens  # the residual stream's tokens on this rank
    if per_token:
        split += PER_TOKEN_MODULATION_BYTES * shard * d
    # What TP does not split: the gathered sublayer inputs under SP, the whole replicated stream without it.
    return split + TP_UNSPLIT_BYTES[sequence_parallel, dtype] * tokens * d * (1 - 1 / tp)
