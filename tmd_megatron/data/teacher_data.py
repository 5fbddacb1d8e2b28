"""Teacher-generated data: latents sampled from prompts by a teacher DiT with a multi-step CFG Euler sampler, and
KD pairs (the sampler's starting noise beside its ODE result) for the one-step KD warm-up.

The sampler is algorithms.sampling.teacher_euler_sample on Wan's original grid (algorithms.timesteps.
wan_sampling_grid: σ_i = linspace(0.999, 0, N+1) mapped by the shift σ -> sσ / (1 + (s-1)σ)); the network sees
1000σ as a float64 (Wan's UniPC sampler rounds it to an integer, an Euler ODE needs the exact value). CFG as Wan:
v = v_uncond + g (v_cond - v_uncond), uncond = the negative prompt.

Sample i's noise comes from a generator seeded by (seed, i) alone, and sample i lands in shard i // S, so the
dataset does not depend on how many ranks wrote it or in which batches.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from tmd_megatron.algorithms.sampling import teacher_euler_sample
from tmd_megatron.algorithms.timesteps import wan_sampling_grid

from .format import ShardWriter, index_path
from .preprocess import claim_output, entries_digest, my_shards
from .text import pad_context

log = logging.getLogger(__name__)


def sample_noise(shape, seed: int, index: int) -> torch.Tensor:
    """Sample `index`'s starting noise; depends on (seed, index) only."""
    sub_seed = int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sub_seed))


def generate_teacher_data(model, prompts: list[str], encode_prompts: Callable[[list[str]], list[torch.Tensor]],
                          negative_context: torch.Tensor, out_dir, *, latent_shape, steps: int = 50,
                          guidance: float = 5.0, shift: float = 5.0, seed: int = 0, batch_size: int = 1,
                          samples_per_shard: int = 256, save_noise: bool = False,
                          dtype: torch.dtype = torch.bfloat16, rank: int = 0, world_size: int = 1,
                          prefix: str = "teacher", autocast: torch.dtype | None = None,
                          progress: bool = True) -> int:
    """Write this rank's shards `{prefix}-{k:06d}.tar` (k ≡ rank mod world_size); returns samples written.

    encode_prompts maps prompts to true-length embeddings [L_i, C] (PromptEncoder, or the synthetic task's);
    negative_context [L, C] is the unconditional text. save_noise stores each sample's starting noise (KD pairs).
    autocast=torch.bfloat16 runs the teacher as Wan's own inference does (fp32 weights, bf16 autocast).
    """
    out_dir = Path(out_dir)
    text_len = model.config.text_len
    device = next(model.parameters()).device
    grid = wan_sampling_grid(steps, shift)  # ascending, up to σ_max = shift(0.999)
    if rank == 0:
        claim_output(out_dir, {"kind": "teacher", "prompts": entries_digest(prompts), "num_prompts": len(prompts),
                               "latent_shape": list(latent_shape), "steps": steps, "guidance": guidance,
                               "shift": shift, "seed": seed, "samples_per_shard": samples_per_shard,
                               "save_noise": save_noise, "dtype": str(dtype), "prefix": prefix})
    neg = pad_context(negative_context.float(), text_len).to(device)
    todo = [k for k in my_shards(len(prompts), samples_per_shard, rank, world_size)
            if not index_path(out_dir / f"{prefix}-{k:06d}.tar").exists()]
    total = sum(len(range(k * samples_per_shard, min(len(prompts), (k + 1) * samples_per_shard))) for k in todo)
    bar = tqdm(total=total, desc=f"teacher rank {rank}", unit="sample", disable=not progress)
    written = 0
    for k in todo:
        ids = list(range(k * samples_per_shard, min(len(prompts), (k + 1) * samples_per_shard)))
        with ShardWriter(out_dir / f"{prefix}-{k:06d}.tar") as writer:
            for start in range(0, len(ids), batch_size):
                chunk = ids[start:start + batch_size]
                contexts = encode_prompts([prompts[i] for i in chunk])
                ctx = torch.stack([pad_context(c.float(), text_len) for c in contexts]).to(device)
                # Rounded to the storage dtype first, so a stored KD pair is exactly (noise, ODE(noise)).
                noise = torch.stack([sample_noise(latent_shape, seed, i) for i in chunk]).to(dtype).float()
                with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                    x0 = teacher_euler_sample(model, noise.to(device), ctx, grid, neg.expand(len(chunk), -1, -1),
                                              guidance)
                for j, i in enumerate(chunk):
                    meta = {"source": "teacher", "index": i, "seed": seed, "steps": steps, "guidance": guidance,
                            "shift": shift, "sigma_max": float(grid[-1])}
                    writer.add(f"{i:09d}", x0[j].cpu().to(dtype), contexts[j].to(dtype), prompts[i], meta,
                               noise=noise[j].to(dtype) if save_noise else None)
                written += len(chunk)
                bar.update(len(chunk))
    bar.close()
    return written
