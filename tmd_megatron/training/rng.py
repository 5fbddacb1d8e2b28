"""Per-sample randomness of a training step.

Every random draw of a step (outer time, noise, inner noise, dropout, critic noise) comes from one generator
per sample seeded by (run seed, step, role, dataset index of the sample). TP/CP/PP ranks holding a sample
therefore draw the same noise, different samples draw different noise, and the union of the DP ranks'
batches draws exactly what one process with the global batch draws: results do not depend on the layout.
"""
from __future__ import annotations

import hashlib

import torch

from tmd_megatron.algorithms.common import SampleRNG


def sample_seed(seed: int, step: int, role: str, index: int) -> int:
    digest = hashlib.sha256(f"{seed}:{step}:{role}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def step_rng(seed: int, step: int, role: str, indices, device="cpu") -> SampleRNG:
    """The SampleRNG of `role` at `step` for samples with these dataset indices."""
    if isinstance(indices, torch.Tensor):
        indices = indices.tolist()
    return SampleRNG([sample_seed(seed, step, role, int(i)) for i in indices], device)
