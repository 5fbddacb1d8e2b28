"""Stage 2 and the DMD2-v baseline (paper Eq. 11, 15, 17, Sec. 3.2, App. A.3).

Pure functions carry the math: `vsd_direction`/`vsd_loss` (Eq. 11, normalised as DMD/FastGen or as A.3 prints), `dsm_loss` (the
fake score), `gan_generator_loss`/`gan_discriminator_loss` (averaged non-saturating losses over heads).
Single-device steps compose them: `generate` (Eq. 17 for a plain Wan student, Eq. 15 flow-head rollout with
gradients through all N inner steps for a decoupled one), `dmd2v_generator_loss`, `fake_score_loss`,
`discriminator_loss`. Outer states x_{t_i} come from real data (no backward simulation, App. A.3).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .common import Batch, pinned_noise, randn_like
from .config import DMD2vConfig
from .guidance import cfg_combine, match_contexts, wan_velocity
from .timesteps import per_sample, sample_grid_times, sample_shifted, student_grid
from .transition import inner_flow, inner_noise, interpolate, rollout_output, x0_from_velocity


# ---- pure functions ----------------------------------------------------------------------------------------
DMD_NORM_EPS = 1e-6  # FastGen's ε in 1/(mean|x̂ − x̂₀_teacher| + ε) (fastgen/methods/common_loss.py, line 90)


def vsd_direction(
    g_fake: torch.Tensor, g_teacher: torch.Tensor, x_hat: torch.Tensor | None = None, norm: str = "dmd"
) -> torch.Tensor:
    """sg(g_fake − g_teacher) per sample divided by a per-element mean-abs normaliser, detached and in fp32.

    norm="dmd" (default): 1/(mean|x̂ − g_teacher| + 1e-6), the mean over every non-batch element, as the authors'
    NVlabs/FastGen computes it (fastgen/methods/common_loss.py, variational_score_distillation_loss, lines 80–99:
    weight under no_grad from gen_data − teacher_x0, teacher_x0 already CFG'd). FastGen casts the weight and the
    difference back to the sample's dtype (bf16 in training); we keep them fp32.
    norm="teacher_fake": ‖g_fake − g_teacher‖₁ as App. A.3 prints it (the same mean, floored at 1e-12).
    """
    diff = (g_fake - g_teacher).detach().float()
    if norm == "dmd":
        if x_hat is None:
            raise ValueError("vsd_direction(norm='dmd') needs the student's sample x_hat")
        ref = x_hat.detach().float() - g_teacher.detach().float()
        scale = ref.abs().flatten(1).mean(1) + DMD_NORM_EPS
    elif norm == "teacher_fake":
        scale = diff.abs().flatten(1).mean(1).clamp_min(1e-12)
    else:
        raise ValueError(f"vsd norm {norm!r}; choose 'dmd' or 'teacher_fake'")
    return diff / per_sample(scale, diff)


def vsd_loss(x_hat: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """Eq. 11: E[sg(D)ᵀ x̂], D already normalised; the element mean makes ∂L/∂x̂ = D/(B·d), matching the
    DMD2 pseudo-target form. Its value is a surrogate (it does not measure the divergence)."""
    return (direction.detach() * x_hat.float()).flatten(1).mean(1).mean()


def dsm_loss(v_pred: torch.Tensor, x_hat: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, target: str = "x0"):
    """Fake-score denoising score matching on noisy student samples x̂_t = (1 − t)x̂ + t·ε.

    target="x0": ‖(x̂_t − t·v) − x̂‖² (the fake score parametrised like Eq. 17, A.3) = t²‖v − (ε − x̂)‖²;
    target="flow": ‖v − (ε − x̂)‖² (flow matching). Mean over elements and batch.
    """
    err = v_pred.float() - (noise - x_hat).detach().float()
    if target == "x0":
        err = err * per_sample(t, err)
    elif target != "flow":
        raise ValueError(f"unknown fake-score target {target!r}; choose 'x0' or 'flow'")
    return err.pow(2).mean()


def gan_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss averaged over heads: mean softplus(−D(fake)) = −log σ(D(fake))."""
    return F.softplus(-fake_logits.float()).mean()


def gan_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Minimax log-likelihood averaged over heads: mean softplus(−D(real)) + mean softplus(D(fake))."""
    return F.softplus(-real_logits.float()).mean() + F.softplus(fake_logits.float()).mean()


# ---- the student as a generator ------------------------------------------------------------------------------
@dataclass
class StudentInput:
    x_t: torch.Tensor  # (1 − t_i)·x + t_i·x_1 from real data
    t: torch.Tensor  # t_i on the outer grid [B]
    x1: torch.Tensor  # the noise that made x_t


def sample_student_input(x: torch.Tensor, cfg: DMD2vConfig, gen: torch.Generator, cond=None) -> StudentInput:
    """t_i ~ Unif{t_1..t_M} on the γ-shifted outer grid; x_{t_i} from real data (no backward simulation)."""
    grid = student_grid(cfg.outer_steps, cfg.outer_shift, cfg.t_max)
    t = sample_grid_times(x.shape[0], grid, gen).to(x.device)
    x1 = pinned_noise(x, gen, cond)
    return StudentInput(interpolate(x, x1, t), t, x1)


def generate(student, inp: StudentInput, context: torch.Tensor, cfg: DMD2vConfig, gen: torch.Generator, cond=None):
    """The student's sample x̂: Eq. 17 for a Wan model, Eq. 15 (N-step flow-head rollout, fresh y_1) for a
    student with a flow head (DecoupledStudent). Differentiable; wrap in no_grad for the critics' updates."""
    if hasattr(student, "flow_head"):
        features = student.backbone(inp.x_t, inp.t, context, cond)
        inner = student_grid(cfg.inner_steps, cfg.inner_shift, cfg.t_max)
        y_hat = inner_flow(student, features, inner_noise(randn_like(inp.x_t, gen), cond, student.config.target), inner,
                           grad_steps=cfg.rollout_grad)
        return rollout_output(inp.x_t, inp.t, y_hat, student.config.target, cfg.rollout_form, inp.x1)
    v, _ = wan_velocity(student, inp.x_t, inp.t, context, cond=cond)
    return x0_from_velocity(inp.x_t, inp.t, v)


def sample_noising(x_hat: torch.Tensor, cfg: DMD2vConfig, gen: torch.Generator, cond=None):
    """(t_dmd, ε): t_dmd shifted (γ = 5) in [t_min, t_max_dmd], fresh noise."""
    t = sample_shifted(x_hat.shape[0], cfg.t_shift, gen, cfg.t_min, cfg.t_max_dmd).to(x_hat.device)
    return t, pinned_noise(x_hat, gen, cond)


# ---- the three updates ---------------------------------------------------------------------------------------
def dmd2v_generator_loss(
    student, teacher, fake_score, discriminator, batch: Batch, cfg: DMD2vConfig, gen: torch.Generator
):
    """Student loss VSD + λ·GAN (Algorithm 2, stage two). Gradients flow to the student only: the teacher,
    fake score and discriminator are used as functions (their parameters should be frozen by the caller)."""
    cond = batch.cond
    inp = sample_student_input(batch.latents, cfg, gen, cond)
    x_hat = generate(student, inp, batch.context, cfg, gen, cond)
    t, eps = sample_noising(x_hat, cfg, gen, cond)
    x_hat_t = interpolate(x_hat, eps, t)
    use_gan = discriminator is not None and cfg.gan_weight > 0

    with torch.no_grad():
        v_fake, _ = wan_velocity(fake_score, x_hat_t, t, batch.context, cond=cond)
        if cfg.cfg_scale != 1.0:  # CFG drops the text only (Wan's I2V sampler keeps the image)
            _, negative = match_contexts(batch.context, batch.negative)
            v_uncond, _ = wan_velocity(teacher, x_hat_t, t, negative, cond=cond)
    with torch.set_grad_enabled(use_gan and torch.is_grad_enabled()):
        # One conditional teacher pass serves both the VSD target (detached) and the GAN features (which
        # must carry gradients back to x̂).
        layers = tuple(discriminator.layers) if use_gan else ()
        v_cond, hidden = wan_velocity(teacher, x_hat_t, t, batch.context, capture=layers, cond=cond)
    x_hat_t_sg = x_hat_t.detach()
    g_fake = x0_from_velocity(x_hat_t_sg, t, v_fake)
    v_teacher = v_cond.detach() if cfg.cfg_scale == 1.0 else cfg_combine(v_cond.detach(), v_uncond, cfg.cfg_scale)
    g_teacher = x0_from_velocity(x_hat_t_sg, t, v_teacher)
    direction = vsd_direction(g_fake, g_teacher, x_hat, cfg.vsd_norm)
    vsd = vsd_loss(x_hat, direction)
    loss = vsd
    metrics = {"vsd": vsd.detach(), "vsd_gap": (g_fake - g_teacher).abs().mean().detach()}
    if use_gan:
        gan = gan_generator_loss(discriminator(discriminator.volumes(teacher, hidden, x_hat_t.shape)))
        loss = loss + cfg.gan_weight * gan
        metrics["gan_generator"] = gan.detach()
    metrics["generator_loss"] = loss.detach()
    return loss, metrics


def student_sample(student, batch: Batch, cfg: DMD2vConfig, gen: torch.Generator) -> torch.Tensor:
    """A detached student sample for the critics' updates (the fake score and the discriminator share it)."""
    with torch.no_grad():
        inp = sample_student_input(batch.latents, cfg, gen, batch.cond)
        return generate(student, inp, batch.context, cfg, gen, batch.cond)


def fake_score_loss(fake_score, x_hat: torch.Tensor, batch: Batch, cfg: DMD2vConfig, gen: torch.Generator):
    """Denoising score matching of the fake score on the student's samples (App. A.3)."""
    t, eps = sample_noising(x_hat, cfg, gen, batch.cond)
    v, _ = wan_velocity(fake_score, interpolate(x_hat.detach(), eps, t), t, batch.context, cond=batch.cond)
    loss = dsm_loss(v, x_hat, eps, t, cfg.fake_target)
    return loss, {"fake_score_loss": loss.detach()}


def discriminator_loss(teacher, discriminator, x_hat: torch.Tensor, batch: Batch, cfg: DMD2vConfig, gen):
    """Conv3D heads on teacher features of noisy fake (x̂_t, t) vs noisy real (x_t, t) data (App. A.3)."""
    cond = batch.cond
    t, eps = sample_noising(x_hat, cfg, gen, cond)
    if cfg.gan_same_noise:
        t_real, eps_real = t, eps
    else:
        t_real, eps_real = sample_noising(x_hat, cfg, gen, cond)
    layers = tuple(discriminator.layers)
    with torch.no_grad():
        fake_in = interpolate(x_hat.detach(), eps, t)
        real_in = interpolate(batch.latents, eps_real, t_real)
        _, fake_hidden = wan_velocity(teacher, fake_in, t, batch.context, capture=layers, cond=cond)
        _, real_hidden = wan_velocity(teacher, real_in, t_real, batch.context, capture=layers, cond=cond)
    fake_logits = discriminator(discriminator.volumes(teacher, fake_hidden, fake_in.shape))
    real_logits = discriminator(discriminator.volumes(teacher, real_hidden, real_in.shape))
    loss = gan_discriminator_loss(real_logits, fake_logits)
    return loss, {"discriminator_loss": loss.detach()}
