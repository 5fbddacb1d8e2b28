"""Generating videos with a trained model: the TMD sampler (Algorithm 1), DMD2-v's deterministic sampler
(Eq. 18) or the teacher's Euler sampler with CFG, with the effective NFE measured by counting block calls.
Used by `tmd-sample` and by the trainer's periodic previews."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tmd_megatron.algorithms.guidance import match_contexts
from tmd_megatron.algorithms.sampling import BlockCounter, dmd2v_sample, teacher_euler_sample, tmd_sample
from tmd_megatron.algorithms.timesteps import student_grid, wan_sampling_grid

SAMPLERS = ("tmd", "dmd2v", "teacher")
SAMPLER_JSON = "sampler.json"


@dataclass(frozen=True)
class SamplerConfig:
    outer_steps: int = 2  # M
    inner_steps: int = 4  # N (TMD)
    outer_shift: float = 10.0
    inner_shift: float = 10.0
    t_max: float = 0.999
    teacher_steps: int = 50
    teacher_shift: float = 5.0
    cfg_scale: float = 5.0  # teacher only


@torch.no_grad()
def sample(kind: str, model, contexts: torch.Tensor, negative: torch.Tensor, latent_shape, cfg: SamplerConfig,
           seed: int = 0, cond=None) -> tuple[torch.Tensor, float]:
    """Latents [B, *latent_shape] for the prompt embeddings `contexts` [B, T, C] (and the image conditioning
    `cond` of an I2V / TI2V model), and the measured effective NFE (DiT block evaluations per sample divided by
    the number of blocks; CFG counts both passes). A two-expert teacher switches experts by t."""
    if kind not in SAMPLERS:
        raise ValueError(f"sampler {kind!r}; choose one of {SAMPLERS}")
    gen = torch.Generator().manual_seed(seed)  # CPU draws (same on every rank and device), moved to the model
    b = contexts.shape[0]
    noise = torch.randn((b, *latent_shape), generator=gen).to(contexts.device)
    wan = model.wan if kind == "tmd" else model
    with BlockCounter(wan) as counter:
        if kind == "tmd":
            x = tmd_sample(model, noise, contexts, student_grid(cfg.outer_steps, cfg.outer_shift, cfg.t_max),
                           student_grid(cfg.inner_steps, cfg.inner_shift, cfg.t_max), gen, cond)
        elif kind == "dmd2v":
            x = dmd2v_sample(model, noise, contexts, student_grid(cfg.outer_steps, cfg.outer_shift, cfg.t_max), cond)
        else:
            _, neg = match_contexts(contexts, negative)
            x = teacher_euler_sample(model, noise, contexts, wan_sampling_grid(cfg.teacher_steps, cfg.teacher_shift),
                                     neg, cfg.cfg_scale, cond=cond)
    return x, counter.nfe()  # the blocks run on the whole batch at once: calls / L is already per sample


def sampler_config_of(res) -> SamplerConfig:
    """The sampling grids a trained student was distilled for (written next to its export)."""
    if res.kd is not None:  # KD warms up a one-step student at t_M
        return SamplerConfig(outer_steps=1, t_max=res.kd.t_max)
    algo = res.dmd2v or res.tm_mf
    if algo is None:
        return SamplerConfig()
    return SamplerConfig(outer_steps=algo.outer_steps, inner_steps=algo.inner_steps, outer_shift=algo.outer_shift,
                         inner_shift=algo.inner_shift, t_max=algo.t_max)
