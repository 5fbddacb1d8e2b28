"""The trainer's step programs (pipelined passes, recomputed generator, critic passes) against the algorithms'
single-device reference steps (tmd_megatron.algorithms), on one process with the same per-sample noise:
losses and every gradient of every trained role; also with image conditioning (Wan2.1 I2V, Wan2.2 TI2V) and a
two-expert (A14B) teacher and fake score."""
import copy

import pytest
import torch

from tmd_megatron.algorithms import dmd2v as D
from tmd_megatron.algorithms.common import Batch
from layout_cases import tolerance
from tmd_megatron.algorithms.tm_mf import tm_mf_loss
from tmd_megatron.models.wan.conditioning import ImageCondition
from tmd_megatron.parallel import Topology
from tmd_megatron.training.config import compose, resolve
from tmd_megatron.training.passes import Passes
from tmd_megatron.training.programs import Micro, Step, stage2_step, tm_mf_step
from tmd_megatron.training.rng import step_rng
from tmd_megatron.training.roles import build_roles


PRESETS = ["tiny", "tiny-i2v", "tiny-ti2v", "tiny-a14b"]


def _setup(overrides, preset="tiny"):
    res = resolve(compose(["experiment=tiny_smoke", "parallel.microbatches=1", f"model.preset={preset}",
                           *overrides]))
    torch.manual_seed(0)
    roles = build_roles(res, Topology.single())
    x = torch.randn(3, 16, 3, 8, 8)
    ctx = torch.randn(3, 5, 32)
    negative = torch.randn(2, 32)
    index = torch.tensor([4, 9, 17])
    cond = None
    if res.wan.model_type == "i2v":
        cond = ImageCondition.for_model(res.wan, torch.randn(3, 16, 3, 8, 8), torch.randn(3, 5, res.wan.image_dim))
    elif res.wan.model_type == "ti2v":
        cond = ImageCondition.for_model(res.wan, x)
    step = Step(res, roles, Passes(roles.topo, 1, "1f1b", None), [Micro(x, ctx, index, cond=cond)], negative, step=0)
    return res, roles, step, Batch(x, ctx, negative, cond)


def _grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _assert_close(got: dict, want: dict, what: str):
    assert got.keys() == want.keys(), (what, sorted(set(got) ^ set(want))[:5])
    scale = max(float(g.abs().max()) for g in want.values())
    assert scale > 0, what
    worst = max(float((got[k] - want[k]).abs().max()) for k in want) / scale
    assert worst < 1e-5, (what, worst)


@pytest.mark.parametrize("jvp,preset,warmup", [("fd", "tiny", 0), ("exact", "tiny", 0), ("fd", "tiny-i2v", 0),
                                               ("fd", "tiny-ti2v", 0), ("fd", "tiny", 4)])
def test_tm_mf_program_equals_the_reference_step(jvp, preset, warmup):
    """warmup=4: the program reads the JVP weight 1/4 from its step count (step 0, the first update)."""
    res, roles, step, batch = _setup(["method=tm_mf", f"method.tm_mf.jvp={jvp}",
                                      f"method.tm_mf.jvp_warmup_iters={warmup}"], preset)
    reference = copy.deepcopy(roles.student)
    tm_mf_step(step)
    weight = 0.25 if warmup else 1.0
    assert step.metrics["jvp_weight"] == weight
    loss, _ = tm_mf_loss(reference, batch, res.tm_mf, step_rng(res.raw.run.seed, 0, "tm_mf", batch_index(step)),
                         jvp_weight=weight)
    loss.backward()
    assert abs(step.metrics["tm_mf_loss"] - loss.item()) < 1e-6 * abs(loss.item())
    _assert_close(_grads(roles.student), _grads(reference), "student")


def batch_index(step):
    return step.micro[0].index


@pytest.mark.parametrize("method,preset", [("tmd", "tiny"), ("dmd2v", "tiny"), ("tmd", "tiny-i2v"),
                                           ("tmd", "tiny-ti2v"), ("dmd2v", "tiny-a14b"), ("tmd+multiscale", "tiny"),
                                           ("tmd+rollout_last", "tiny")])
def test_stage2_program_equals_the_reference_steps(method, preset):
    extra = ["method=dmd2v", "model.init=null"] if method == "dmd2v" else []
    if method.endswith("+multiscale"):  # FastGen's head structure instead of our Conv3D head
        extra = ["method.dmd2v.disc_arch=multiscale"]
    if method.endswith("+rollout_last"):  # the rollout differentiated through its last inner step only
        extra = ["method.dmd2v.rollout_grad=last"]
    res, roles, step, batch = _setup(extra, preset)
    cfg = res.dmd2v
    student, fake, disc = (copy.deepcopy(m) for m in (roles.student, roles.fake, roles.disc))
    stage2_step(step, generator=True)

    gen = step_rng(res.raw.run.seed, 0, "dmd", batch_index(step))
    fake.requires_grad_(False)
    disc.requires_grad_(False)
    loss, metrics = D.dmd2v_generator_loss(student, roles.teacher, fake, disc, batch, cfg, gen)
    loss.backward()
    # VSD's value is a mean of O(1) terms that cancel: compared on their scale (layout_cases.tolerance); a mixed
    # two-expert batch runs each expert on a subset here and on the whole microbatch in the pipelined pass
    assert abs(step.metrics["vsd"] - float(metrics["vsd"])) < tolerance("vsd", float(metrics["vsd"]))
    assert abs(step.metrics["gan_generator"] - float(metrics["gan_generator"])) < 1e-6
    _assert_close(_grads(roles.student), _grads(student), "student (VSD + GAN through the teacher)")

    # the critics train on the generator's own sample, continuing the same per-sample streams
    gen = step_rng(res.raw.run.seed, 0, "dmd", batch_index(step))
    with torch.no_grad():
        x_hat = D.generate(student, D.sample_student_input(batch.latents, cfg, gen, batch.cond), batch.context, cfg,
                           gen, batch.cond)
    D.sample_noising(x_hat, cfg, gen, batch.cond)  # the generator's VSD noise
    fake.requires_grad_(True)
    disc.requires_grad_(True)
    f_loss, _ = D.fake_score_loss(fake, x_hat, batch, cfg, gen)
    f_loss.backward()
    d_loss, _ = D.discriminator_loss(roles.teacher, disc, x_hat, batch, cfg, gen)
    d_loss.backward()
    assert abs(step.metrics["fake_score_loss"] - float(f_loss)) < 1e-6 * float(f_loss)
    assert abs(step.metrics["discriminator_loss"] - float(d_loss)) < 1e-6 * float(d_loss)
    _assert_close(_grads(roles.fake), _grads(fake), "fake score")
    _assert_close(_grads(roles.disc), _grads(disc), "discriminator")
    assert not any(p.grad is not None for p in roles.teacher.parameters())  # the teacher stays frozen
