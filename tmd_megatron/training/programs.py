"""One training step of each method, as a program of pipelined passes (any layout, one stage included).

Every rank of a data-parallel replica holds the same microbatches and draws the same per-sample noise
(training/rng.py), so each stage computes the data-side tensors it needs itself; only activations, their
gradients and the student's samples cross stages. Losses of a microbatch are divided by the number of
microbatches, and ZeroAdamW averages over DP ranks, so gradients are those of the mean over the global batch.

Generator step (DMD2-v / TMD, App. A.3): the student's sample x̂ comes from a forward-only pass; the fake
score and the teacher (with CFG, and with the GAN heads on its features) give the gradient of VSD + λ·GAN
with respect to x̂; a second student pass recomputes x̂ with a graph and back-propagates that gradient
(whole-model recomputation: one extra student forward on generator iterations, no graphs held across passes).
The critics then train on the same x̂ (detached), as in DMD2.

Image conditioning (Micro.cond, models/wan/conditioning.py) goes with every model pass of its microbatch; CFG
and condition dropout replace the text only; noise is pinned on a TI2V conditioning frame as in the
single-device steps (algorithms.common.pinned_noise).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tmd_megatron.algorithms import dmd2v as D
from tmd_megatron.algorithms.common import SampleRNG, pinned_noise, randn_like
from tmd_megatron.algorithms.guidance import cfg_combine, drop_condition, match_contexts
from tmd_megatron.algorithms.jvp import exact_total_derivative, fd_difference, fd_precision, fd_steps
from tmd_megatron.algorithms.kd import kd_regression_loss
from tmd_megatron.algorithms.timesteps import per_sample, sample_grid_times, sample_mf_times, sample_shifted, student_grid
from tmd_megatron.algorithms.tm_mf import adaptive_loss, jvp_warmup_weight, meanflow_target, mf_guided_velocity
from tmd_megatron.algorithms.transition import (
    average_velocity, conditional_velocity, inner_flow, inner_noise, inner_target, interpolate, rollout_output,
    x0_from_velocity,
)

from .config import RecipeError, Resolved
from .passes import Passes
from .rng import step_rng
from .roles import Roles


@dataclass
class Micro:
    """One microbatch of this DP rank: clean latents, text, dataset indices (for the per-sample noise)."""

    x: torch.Tensor
    ctx: torch.Tensor
    index: torch.Tensor
    noise: torch.Tensor | None = None  # KD pairs: the noise whose teacher ODE endpoint is x
    cond: object = None  # ImageCondition of the microbatch (I2V / TI2V), or None for text only


@dataclass
class Step:
    res: Resolved
    roles: Roles
    passes: Passes
    micro: list[Micro]
    negative: torch.Tensor  # [T', C] negative-prompt embedding
    step: int
    metrics: dict = field(default_factory=dict)

    @property
    def m(self) -> int:
        return len(self.micro)

    def rng(self, role: str, mb: int) -> SampleRNG:
        return step_rng(self.res.raw.run.seed, self.step, role, self.micro[mb].index, "cpu")

    def add(self, name: str, value) -> None:
        """Accumulate a metric contribution (already divided by the number of microbatches)."""
        self.metrics[name] = self.metrics.get(name, 0.0) + float(value)

    @property
    def conds(self) -> list:
        return [mc.cond for mc in self.micro]

    def shape(self, factor: int = 1) -> tuple[int, ...]:
        x = self.micro[0].x
        return (x.shape[0] * factor, *x.shape[1:])


def _dev(t, topo):
    return t.to(topo.device)


# ---- teacher pretraining (flow matching) -------------------------------------------------------------------
def flow_matching_step(s: Step) -> None:
    gamma = s.res.raw.method.flow_matching.t_shift
    p_drop = s.res.raw.method.flow_matching.cond_dropout
    inputs, targets = [], []
    for mb, micro in enumerate(s.micro):
        gen = s.rng("flow_matching", mb)
        t = sample_shifted(micro.x.shape[0], gamma, gen, 0.001, 0.999)
        x1 = pinned_noise(micro.x, gen, micro.cond)
        context, _ = drop_condition(micro.ctx, s.negative, p_drop, gen)
        dev = s.roles.topo.device
        inputs.append((interpolate(micro.x, x1.to(dev), t), t.to(dev), context))
        targets.append(conditional_velocity(micro.x, x1.to(dev)))

    def grads(mb, outputs):
        v = outputs[0]
        loss = (v.float() - targets[mb].to(v.device)).pow(2).mean() / s.m
        s.add("flow_matching_loss", loss.detach())
        return torch.autograd.grad(loss, v)

    s.passes.wan(s.roles.student, inputs, s.shape(), output_grads=grads, conds=s.conds)


# ---- stage 1: TM-MF --------------------------------------------------------------------------------------
def tm_mf_step(s: Step) -> None:
    cfg, student = s.res.tm_mf, s.roles.student
    target = student.config.target
    if cfg.jvp == "exact" and s.roles.topo.pp.size > 1:
        raise RecipeError("method.tm_mf.jvp=exact needs parallel.pp=1 (forward-mode AD through one process); "
                          "use the finite difference (jvp=fd)")
    outer = student_grid(cfg.outer_steps, cfg.outer_shift, cfg.t_max)
    inner = student_grid(cfg.inner_steps, cfg.inner_shift, cfg.t_max)
    d = []  # per microbatch: the draws of algorithms.tm_mf.tm_mf_loss, in its order
    for mb, micro in enumerate(s.micro):
        gen, x, b = s.rng("tm_mf", mb), micro.x, micro.x.shape[0]
        t = sample_grid_times(b, outer, gen)
        x1 = pinned_noise(x, gen, micro.cond)
        x_t = interpolate(x, x1, t)
        context, keep = drop_condition(micro.ctx, s.negative, cfg.cond_dropout, gen)
        y = inner_target(x, x1, target)
        y1 = pinned_noise(y, gen, micro.cond)
        s_, r = sample_mf_times(b, inner, gen, cfg.s_shift, cfg.r_equals_s, cfg.s_min, cfg.s_max)
        h_plus, h_minus = fd_steps(s_, r, cfg.fd_delta)
        _, negative = match_contexts(micro.ctx, s.negative)
        q = dict(t=t, x_t=x_t, context=context, keep=keep, y1=y1, s=s_, r=r, y_s=interpolate(y, y1, s_),
                 v=conditional_velocity(y, y1), h_plus=h_plus, h_minus=h_minus, negative=negative)
        d.append({k: v.to(s.roles.topo.device) for k, v in q.items()})
    dev = s.roles.topo.device

    def u_of(mb, head, y_in, s_in):
        q = d[mb]
        return average_velocity(head, y_s=y_in, y1=_dev(q["y1"], head), s=s_in, x_t=_dev(q["x_t"], head),
                                t=q["t"], target=target)

    x_t_of = lambda mb: d[mb]["x_t"].to(dev)  # noqa: E731
    t_of = lambda mb: d[mb]["t"].to(dev)  # noqa: E731
    if cfg.cfg_scale != 1.0:  # the guided conditional velocity needs an unconditional prediction first
        uncond = {}
        if cfg.cfg_source == "student":
            def head_uncond(mb, f, e, e0):
                q = d[mb]
                uncond[mb] = student.flow_head_given(_dev(q["y_s"], f.m), e[:, 0], e0[:, 0], f)
                return (uncond[mb],), None

            inputs = [(q["x_t"], q["t"], q["negative"], q["s"][:, None], q["s"][:, None]) for q in d]
            s.passes.student(student, inputs, s.shape(), 1, head_uncond, x_t_of, t_of, conds=s.conds,
                             forward_only=True)
        else:
            res = s.passes.wan(s.roles.teacher, [(q["x_t"], q["t"], q["negative"]) for q in d], s.shape(),
                               forward_only=True, conds=s.conds)
            uncond = {mb: out[0] for mb, out in enumerate(res.outputs)}
        if s.passes.last:
            for mb, q in enumerate(d):
                u_unc = u_of(mb, uncond[mb], _dev(q["y_s"], uncond[mb]), q["s"])
                q["v"] = mf_guided_velocity(_dev(q["v"], u_unc), u_unc, cfg.cfg_scale, q["keep"])

    jvp_weight = jvp_warmup_weight(s.step, cfg.jvp_warmup_iters)  # s.step updates done before this one
    if s.passes.last:
        s.add("jvp_weight", jvp_weight)  # once per last-stage rank: the reduction counts each replica once

    def head_main(mb, f, e, e0):
        q = d[mb]
        y_s, v = _dev(q["y_s"], f.m), _dev(q["v"], f.m)
        s_, r = q["s"], q["r"]
        if cfg.jvp == "exact":
            du_ds = exact_total_derivative(
                lambda y_in, s_in: u_of(mb, student.flow_head(y_in, s_in, r, f), y_in, s_in), y_s, s_, v)
        else:
            with torch.no_grad(), fd_precision(cfg.fd_dtype, y_s.device):
                hp, hm = q["h_plus"], q["h_minus"]
                y_p, y_m = y_s + per_sample(hp, y_s) * v, y_s - per_sample(hm, y_s) * v
                f_fd = f.at_least_fp32() if cfg.fd_dtype == "fp32" else f
                u_p = u_of(mb, student.flow_head_given(y_p, e[:, 1], e0[:, 1], f_fd), y_p, s_ + hp)
                u_m = u_of(mb, student.flow_head_given(y_m, e[:, 2], e0[:, 2], f_fd), y_m, s_ - hm)
                du_ds = fd_difference(u_p, u_m, hp, hm)
        u = u_of(mb, student.flow_head_given(y_s, e[:, 0], e0[:, 0], f), y_s, s_)
        u_target = meanflow_target(v, s_, r, du_ds, jvp_weight)
        loss, sq = adaptive_loss(u, u_target, cfg.norm_const_per_dim * y_s[0].numel())
        s.add("tm_mf_loss", loss.detach() / s.m)
        s.add("mse", (sq / y_s[0].numel()).mean().detach() / s.m)
        return (u.detach(),), loss / s.m

    inputs = [(q["x_t"], q["t"], q["context"], torch.stack([q["s"], q["s"] + q["h_plus"], q["s"] - q["h_minus"]], 1),
               q["r"][:, None].expand(-1, 3)) for q in d]
    s.passes.student(student, inputs, s.shape(), 3, head_main, x_t_of, t_of, conds=s.conds)


# ---- stage 2: DMD2-v and TMD -------------------------------------------------------------------------------
def _stage2_draws(s: Step) -> list[dict]:
    """The draws of algorithms.dmd2v's generator, fake-score and discriminator steps, in their order."""
    cfg, out = s.res.dmd2v, []
    decoupled = s.res.student is not None
    for mb, micro in enumerate(s.micro):
        gen, x, cond = s.rng("dmd", mb), micro.x, micro.cond
        inp = D.sample_student_input(x, cfg, gen, cond)
        q = dict(x_t=inp.x_t, t=inp.t, x1=inp.x1)
        q["y1"] = inner_noise(randn_like(inp.x_t, gen), cond, s.res.student.target) if decoupled else None
        # x̂ and x agree on a TI2V conditioning frame, so noise pinned to x is pinned to x̂ too
        q["t_v"], q["eps_v"] = D.sample_noising(x, cfg, gen, cond)
        q["t_f"], q["eps_f"] = D.sample_noising(x, cfg, gen, cond)
        q["t_d"], q["eps_d"] = D.sample_noising(x, cfg, gen, cond)
        q["t_r"], q["eps_r"] = (q["t_d"], q["eps_d"]) if cfg.gan_same_noise else D.sample_noising(x, cfg, gen, cond)
        _, q["negative"] = match_contexts(micro.ctx, s.negative)
        out.append({k: (v.to(s.roles.topo.device) if torch.is_tensor(v) else v) for k, v in q.items()})
    return out


def _student_pass(s: Step, d: list[dict], forward_only: bool, output_grads=None) -> dict:
    """The student's sample x̂ per microbatch (on the last stage): Eq. 17, or Eq. 15 with flow-head rollout."""
    cfg, student, dev = s.res.dmd2v, s.roles.student, s.roles.topo.device
    samples = {}
    if s.res.student is None:  # plain Wan student: x̂ = x_t − t·v
        res = s.passes.wan(student, [(q["x_t"], q["t"], mc.ctx) for q, mc in zip(d, s.micro)], s.shape(),
                           forward_only=forward_only, output_grads=output_grads, conds=s.conds)
        for mb, out in enumerate(res.outputs):
            samples[mb] = x0_from_velocity(d[mb]["x_t"].to(dev), d[mb]["t"], out[0])
        return samples
    inner = student_grid(cfg.inner_steps, cfg.inner_shift, cfg.t_max)
    s_pts = torch.stack([inner[j] for j in range(len(inner) - 1, 0, -1)])
    r_pts = torch.stack([inner[j - 1] for j in range(len(inner) - 1, 0, -1)])

    def rollout(mb, f, e, e0):
        q = d[mb]
        y_hat = inner_flow(student, f, q["y1"].to(dev), inner, grad_steps=cfg.rollout_grad,
                           head=lambda y, k, s_, r_: student.flow_head_given(y, e[:, k], e0[:, k], f))
        x_hat = rollout_output(f.x_t, f.t, y_hat, student.config.target, cfg.rollout_form, q["x1"].to(dev))
        samples[mb] = x_hat.detach()
        return (x_hat,), None

    b = s.shape()[0]
    inputs = [(q["x_t"], q["t"], mc.ctx, s_pts.expand(b, -1), r_pts.expand(b, -1)) for q, mc in zip(d, s.micro)]
    s.passes.student(student, inputs, s.shape(), cfg.inner_steps, rollout, lambda mb: d[mb]["x_t"].to(dev),
                     lambda mb: d[mb]["t"].to(dev), conds=s.conds, forward_only=forward_only,
                     output_grads=output_grads)
    return samples


def _to_first(s: Step, per_mb: dict) -> list[torch.Tensor]:
    """Last-stage tensors (one per microbatch) on the first stage; placeholders elsewhere."""
    shaped = [per_mb.get(mb, torch.empty(s.shape(), device=s.roles.topo.device)) for mb in range(s.m)]
    got = s.passes.last_to_first(shaped)
    return got if got is not None else shaped


def _gan_part(s: Step, hidden, geom_shape, fn):
    """This stage's share of a loss averaged over all discriminator heads: (local heads / all heads)·fn(logits)."""
    disc, teacher = s.roles.disc, s.roles.teacher
    logits = disc(disc.volumes(teacher, hidden, geom_shape))
    return fn(logits) * (len(disc.layers) / len(s.roles.disc_layers))


def stage2_step(s: Step, generator: bool) -> None:
    """Student forward (x̂); then, as one pipelined pass, everything that needs only x̂: the fake score and teacher
    forwards of the VSD gradient, the teacher with the GAN heads differentiated to its input, the fake score's DSM
    step and the discriminator's step; then (generator steps) the student's F+B with the VSD + GAN gradient."""
    cfg, roles, dev = s.res.dmd2v, s.roles, s.roles.topo.device
    d = _stage2_draws(s)
    x_hat = _student_pass(s, d, forward_only=True)
    use_gan = cfg.gan_weight > 0
    ctx = [mc.ctx for mc in s.micro]
    parts = {}

    if generator:
        noisy = {mb: interpolate(x_hat[mb], d[mb]["eps_v"].to(dev), d[mb]["t_v"]) for mb in x_hat}
        first = _to_first(s, noisy)
        parts["fake"] = s.passes.wan_part(roles.fake, [(first[mb], q["t_v"], ctx[mb]) for mb, q in enumerate(d)],
                                          s.shape(), forward_only=True, conds=s.conds)
        if cfg.cfg_scale != 1.0:  # CFG drops the text only (Wan's I2V sampler keeps the image)
            parts["uncond"] = s.passes.wan_part(roles.teacher, [(first[mb], q["t_v"], q["negative"])
                                                                for mb, q in enumerate(d)],
                                                s.shape(), forward_only=True, conds=s.conds)
        gan_inputs = [(first[mb].detach().requires_grad_(use_gan), q["t_v"], ctx[mb]) for mb, q in enumerate(d)]

        def gan_loss(mb, hidden, geom):
            part = _gan_part(s, hidden, s.shape(), D.gan_generator_loss)
            s.add("gan_generator", part.detach() / s.m)
            return cfg.gan_weight * part / s.m

        has_heads = use_gan and roles.disc is not None
        # the generator's GAN loss trains the student only: the discriminator is frozen during these forwards
        parts["gan"] = s.passes.wan_part(roles.teacher, gan_inputs, s.shape(),
                                         capture=roles.disc_layers if use_gan else (),
                                         hidden_loss=gan_loss if has_heads else None, forward_only=not use_gan,
                                         conditioning_grads=False, conds=s.conds, frozen=roles.disc)

    # critics, on the same (detached) samples
    noisy_f = {mb: interpolate(x_hat[mb], d[mb]["eps_f"].to(dev), d[mb]["t_f"]) for mb in x_hat}
    first_f = _to_first(s, noisy_f)

    def dsm_grads(mb, outputs):
        q = d[mb]
        loss = D.dsm_loss(outputs[0], x_hat[mb], q["eps_f"].to(dev), q["t_f"], cfg.fake_target) / s.m
        s.add("fake_score_loss", loss.detach())
        return torch.autograd.grad(loss, outputs[0])

    parts["dsm"] = s.passes.wan_part(roles.fake, [(first_f[mb], q["t_f"], ctx[mb]) for mb, q in enumerate(d)],
                                     s.shape(), output_grads=dsm_grads, conds=s.conds)
    if use_gan:
        noisy_d = {mb: interpolate(x_hat[mb], d[mb]["eps_d"].to(dev), d[mb]["t_d"]) for mb in x_hat}
        first_d = _to_first(s, noisy_d)
        inputs = []
        for mb, (q, mc) in enumerate(zip(d, s.micro)):
            real = interpolate(mc.x, q["eps_r"], q["t_r"]).to(dev)
            inputs.append((torch.cat([first_d[mb], real]), torch.cat([q["t_d"], q["t_r"]]), torch.cat([ctx[mb]] * 2)))
        b = s.shape()[0]

        def disc_loss(mb, hidden, geom):
            with torch.enable_grad():
                part = _gan_part(s, hidden, s.shape(2), lambda z: D.gan_discriminator_loss(z[b:], z[:b])) / s.m
                part.backward()
            s.add("discriminator_loss", part.detach())
            return part.detach()

        conds = [None if c is None else c.repeat(2) for c in s.conds]  # [fake; real] of the same samples
        parts["disc"] = s.passes.wan_part(roles.teacher, inputs, s.shape(2), capture=roles.disc_layers,
                                          hidden_loss=disc_loss if roles.disc is not None else None,
                                          forward_only=True, conds=conds)
    names = list(parts)
    results = dict(zip(names, s.passes.run_parts([parts[k] for k in names])))
    if not generator:
        return

    v_fake = results["fake"].outputs
    v_unc = results["uncond"].outputs if "uncond" in results else None
    v_cond = results["gan"].outputs
    g_gan = {}
    if use_gan:
        # ∂/∂x̂ of the GAN loss: its input gradient (first stage) times ∂x̂_t/∂x̂ = 1 − t
        if s.passes.first:
            grads = results["gan"].input_grads
            per_mb = [(1 - per_sample(q["t_v"], first[mb])) * grads[mb][0] for mb, q in enumerate(d)]
        else:
            per_mb = [torch.empty(s.shape(), device=dev) for _ in d]
        got = s.passes.first_to_last(per_mb)
        g_gan = dict(enumerate(got)) if got is not None else {}
    g_total = {}
    if s.passes.last:
        for mb, q in enumerate(d):
            xt = noisy[mb]
            g_fake = x0_from_velocity(xt, q["t_v"], v_fake[mb][0])
            v_t = v_cond[mb][0] if v_unc is None else cfg_combine(v_cond[mb][0], v_unc[mb][0], cfg.cfg_scale)
            g_teacher = x0_from_velocity(xt, q["t_v"], v_t)
            direction = D.vsd_direction(g_fake, g_teacher, x_hat[mb], cfg.vsd_norm)
            leaf = x_hat[mb].detach().requires_grad_(True)
            vsd = D.vsd_loss(leaf, direction) / s.m
            (g,) = torch.autograd.grad(vsd, leaf)
            s.add("vsd", vsd.detach())
            g_total[mb] = g + g_gan.get(mb, 0)

    def out_grads(mb, outputs):
        g = g_total[mb]
        if s.res.student is None:  # the pass outputs v; x̂ = x_t − t·v
            g = -per_sample(d[mb]["t"], g) * g
        return (g,)

    _student_pass(s, d, forward_only=False, output_grads=out_grads)


# ---- KD warm-up -----------------------------------------------------------------------------------------------
def kd_step(s: Step) -> None:
    """One-step student (Eq. 17 at t_M) regressed on teacher ODE endpoints: batches carry (noise, endpoint)."""
    t_max = s.res.kd.t_max
    if any(mc.noise is None for mc in s.micro):
        raise RecipeError("method=kd needs KD pairs: data with a `noise` field (tmd-preprocess teacher --kd ...)")
    dev = s.roles.topo.device
    inputs = [(mc.noise, torch.full((mc.x.shape[0],), t_max, dtype=torch.float64, device=dev), mc.ctx) for mc in s.micro]

    def grads(mb, outputs):
        mc, v = s.micro[mb], outputs[0]
        t = torch.full((mc.x.shape[0],), t_max, dtype=torch.float64, device=v.device)
        x_hat = x0_from_velocity(mc.noise.to(v.device), t, v)
        loss = kd_regression_loss(x_hat, mc.x.to(v.device)) / s.m
        s.add("kd_loss", loss.detach())
        return torch.autograd.grad(loss, v)

    s.passes.wan(s.roles.student, inputs, s.shape(), output_grads=grads, conds=s.conds)
