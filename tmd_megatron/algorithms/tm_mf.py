"""Stage 1: transition matching MeanFlow (TM-MF; paper Eq. 9–10, Sec. 3.1, App. A.2, Algorithm 2).

Pure functions (`mf_guided_velocity`, `meanflow_target`, `adaptive_loss`, `jvp_warmup_weight`) carry the math; `tm_mf_loss` is
the single-device step composing them with the student's backbone and flow head.
"""
from __future__ import annotations

import torch

from .common import Batch, pinned_noise
from .config import TMMFConfig
from .guidance import cfg_combine, drop_condition, match_contexts, wan_velocity
from .jvp import fd_precision, total_derivative
from .timesteps import per_sample, sample_grid_times, sample_mf_times, student_grid
from .transition import average_velocity, conditional_velocity, inner_target, interpolate


def mf_guided_velocity(v_cond: torch.Tensor, u_uncond: torch.Tensor, scale: float, keep: torch.Tensor) -> torch.Tensor:
    """The guided conditional velocity (App. A.2; MeanFlow's Eq. 19 without the mixing term):
    ṽ = u_uncond + w·(v − u_uncond) for samples that kept their prompt, ṽ = v for dropped ones.
    u_uncond is the model's own unconditional average velocity at r = s (no gradient)."""
    guided = cfg_combine(v_cond, u_uncond, scale)
    return torch.where(per_sample(keep, v_cond).bool(), guided, v_cond)


def jvp_warmup_weight(step: int, warmup_iters: int) -> float:
    """Weight of the JVP term at the update after `step` completed ones: min(1, (step + 1)/warmup_iters), 1 when
    off. FastGen's MeanFlow ramps it the same way, min(1, iteration/tangent_warmup_steps) with iterations counted
    from 1 (fastgen/methods/consistency_model/mean_flow.py:300-307; fastgen/trainer.py:181)."""
    return 1.0 if warmup_iters == 0 else min(1.0, (step + 1) / warmup_iters)


def meanflow_target(
    v: torch.Tensor, s: torch.Tensor, r: torch.Tensor, du_ds: torch.Tensor, jvp_weight: float = 1.0
) -> torch.Tensor:
    """Eq. 10: û = sg(v − w·(s − r)·du/ds), w the warm-up weight of the JVP term (1: Eq. 10 as printed)."""
    return (v - jvp_weight * per_sample(s - r, v) * du_ds).detach()


def adaptive_loss(u: torch.Tensor, u_target: torch.Tensor, c: float) -> tuple[torch.Tensor, torch.Tensor]:
    """App. A.2: mean over samples of ||u − û||² / (sg(||u − û||²) + c), ||·||² summed over the d elements of
    one sample. Returns (loss, per-sample squared error)."""
    sq = (u.float() - u_target.float()).pow(2).flatten(1).sum(1)
    return (sq / (sq.detach() + c)).mean(), sq


def tm_mf_loss(student, batch: Batch, cfg: TMMFConfig, gen: torch.Generator, teacher=None, jvp_weight: float = 1.0):
    """One TM-MF student loss (Algorithm 2, stage one). Returns (loss, metrics).

    Gradients reach the flow head and, through m, the backbone (not detached, Sec. 3.1). `jvp_weight` scales the
    JVP term of the target (the trainer passes `jvp_warmup_weight(step, cfg.jvp_warmup_iters)`).
    """
    if cfg.cfg_source == "teacher" and cfg.cfg_scale != 1.0 and teacher is None:
        raise ValueError("TMMFConfig.cfg_source='teacher' needs the teacher; pass teacher= or use 'student'")
    x, target, cond = batch.latents, student.config.target, batch.cond
    n = x.shape[0]
    outer = student_grid(cfg.outer_steps, cfg.outer_shift, cfg.t_max)
    inner = student_grid(cfg.inner_steps, cfg.inner_shift, cfg.t_max)

    t = sample_grid_times(n, outer, gen).to(x.device)
    x1 = pinned_noise(x, gen, cond)
    x_t = interpolate(x, x1, t)
    context, keep = drop_condition(batch.context, batch.negative, cfg.cond_dropout, gen)  # text only, image kept
    features = student.backbone(x_t, t, context, cond)

    y = inner_target(x, x1, target)
    y1 = pinned_noise(y, gen, cond)
    s, r = (z.to(x.device) for z in sample_mf_times(n, inner, gen, cfg.s_shift, cfg.r_equals_s, cfg.s_min, cfg.s_max))
    y_s = interpolate(y, y1, s)
    v = conditional_velocity(y, y1)

    def u_of(head, y_in, s_in):
        return average_velocity(head, y_s=y_in, y1=y1, s=s_in, x_t=x_t, t=t, target=target)

    with torch.no_grad():
        if cfg.cfg_scale != 1.0:
            _, negative = match_contexts(batch.context, batch.negative)
            if cfg.cfg_source == "student":
                uncond_features = student.backbone(x_t, t, negative, cond)
                head_uncond = student.flow_head(y_s, s, s, uncond_features)
            else:
                head_uncond, _ = wan_velocity(teacher, x_t, t, negative, cond=cond)
            v = mf_guided_velocity(v, u_of(head_uncond, y_s, s), cfg.cfg_scale, keep)

    def u_fn(y_in, s_in):
        return u_of(student.flow_head(y_in, s_in, r, features), y_in, s_in)

    if cfg.jvp == "fd" and cfg.fd_dtype == "fp32" and torch.is_autocast_enabled(x.device.type):
        wide = features.at_least_fp32()
        with fd_precision(cfg.fd_dtype, x.device):
            du_ds = total_derivative(lambda y_in, s_in: u_of(student.flow_head(y_in, s_in, r, wide), y_in, s_in),
                                     y_s, s, r, v, cfg.jvp, cfg.fd_delta)
    else:
        du_ds = total_derivative(u_fn, y_s, s, r, v, cfg.jvp, cfg.fd_delta)
    u = u_fn(y_s, s)
    u_target = meanflow_target(v, s, r, du_ds, jvp_weight)
    loss, sq = adaptive_loss(u, u_target, cfg.norm_const_per_dim * y_s[0].numel())
    metrics = {
        "tm_mf_loss": loss.detach(),
        "mse": (sq / y_s[0].numel()).mean().detach(),
        "r_equals_s": (r == s).float().mean(),
        "cond_kept": keep.float().mean(),
        "jvp_weight": torch.tensor(jvp_weight),
    }
    return loss, metrics
