"""DMD2-v / TMD stage 2 (paper Eq. 11, 15, 17, App. A.3): each loss by hand or on a Gaussian toy with closed-form
denoisers, gradient routing, and the three updates on a tiny Wan model."""
import pytest
import torch

from algo_helpers import copy_of, gen, tiny_batch, tiny_student, tiny_teacher, single_thread  # noqa: F401  (fixture)
from tmd_megatron.algorithms import (
    DMD2vConfig,
    discriminator_loss,
    dmd2v_generator_loss,
    fake_score_loss,
    student_sample,
)
from tmd_megatron.algorithms.dmd2v import (
    StudentInput,
    dsm_loss,
    gan_discriminator_loss,
    gan_generator_loss,
    generate,
    vsd_direction,
    vsd_loss,
)
from tmd_megatron.algorithms.timesteps import is_student_step
from tmd_megatron.models.discriminator import Discriminator
from wan_reference import rel_err

pytestmark = pytest.mark.usefixtures("single_thread")


def test_vsd_direction_normalisers_by_hand():
    g_fake = torch.tensor([[1.0, -3.0], [2.0, 2.0]])
    g_teacher = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    x_hat = torch.tensor([[4.0, 1.0], [1.0, 0.0]])
    d = vsd_direction(g_fake, g_teacher, x_hat, "teacher_fake")  # D / mean|D|
    assert torch.allclose(d, torch.tensor([[1 / 2.5, -4 / 2.5], [1.0, 1.0]]))
    d = vsd_direction(g_fake, g_teacher, x_hat, "dmd")  # D / mean|x̂ − g_teacher|
    assert torch.allclose(d, torch.tensor([[1 / 2.0, -4 / 2.0], [2 / 0.5, 2 / 0.5]]))


def test_default_vsd_gradient_is_fastgen_pseudo_target_gradient():
    """The default normaliser is the authors' code: FastGen's VSD loss (fastgen/methods/common_loss.py:80-102),
    0.5·mean((x̂ − sg(x̂ − w·(g_fake − g_teacher)))²) with w_b = 1/(mean_b|x̂ − g_teacher| + 1e-6), written out
    per sample here, has the same x̂-gradient as vsd_loss(vsd_direction(...)). On this data the printed (A.3)
    normaliser differs by ~20x, so the comparison fails if the default were the other one."""
    g = gen(7)
    x_hat = torch.randn(3, 4, 2, 3, 3, generator=g, requires_grad=True)
    g_teacher = 2 * torch.randn(x_hat.shape, generator=g)
    g_fake = g_teacher + 0.1 * torch.randn(x_hat.shape, generator=g)
    x64 = x_hat.detach().double().requires_grad_(True)  # fp64: x̂ − (x̂ − w·D) cancels
    target = torch.empty_like(x64)
    for b in range(3):
        n = x64[b].numel()
        w = 1.0 / (float((x64[b].detach() - g_teacher[b].double()).abs().sum()) / n + 1e-6)
        target[b] = x64[b].detach() - w * (g_fake[b] - g_teacher[b]).double()
    (want,) = torch.autograd.grad(0.5 * (x64 - target).pow(2).mean(), x64)
    want = want.float()

    def grad_with(norm):
        (got,) = torch.autograd.grad(vsd_loss(x_hat, vsd_direction(g_fake, g_teacher, x_hat, norm)), x_hat)
        return got

    assert DMD2vConfig().vsd_norm == "dmd"
    torch.testing.assert_close(grad_with(DMD2vConfig().vsd_norm), want, rtol=1e-5, atol=0)
    printed = grad_with("teacher_fake")
    assert (printed.abs().mean() / want.abs().mean()) > 5  # the check above can tell the two apart


def test_vsd_loss_gradient_is_the_direction():
    x_hat = torch.randn(3, 4, 1, 2, 2, requires_grad=True)
    direction = torch.randn(3, 4, 1, 2, 2)
    vsd_loss(x_hat, direction).backward()
    assert torch.allclose(x_hat.grad, direction / (3 * 16))


def _gaussian_denoiser(mu, t, x_t):
    """E[x | x_t] for x ~ N(mu, 1), x_t = (1 − t)x + tε (closed form)."""
    a = 1 - t
    return mu + a / (a**2 + t**2) * (x_t - a * mu)


@pytest.mark.parametrize("norm", ["teacher_fake", "dmd"])
def test_vsd_moves_the_student_distribution_onto_the_teacher(norm):
    """Toy: teacher data N(μ_T, 1), student x̂ = μ_S + ξ, exact fake score. Descending Eq. 11 carries μ_S to μ_T."""
    mu_t, mu_s = -1.0, torch.tensor(2.0, requires_grad=True)
    xi, eps = torch.randn(8, 64, generator=gen(0)), torch.randn(8, 64, generator=gen(1))
    opt = torch.optim.SGD([mu_s], lr=0.1)
    for _ in range(60):
        t = torch.full((8, 1), 0.6)
        x_hat = mu_s + xi
        x_t = (1 - t) * x_hat + t * eps
        g_fake = _gaussian_denoiser(mu_s.detach(), t, x_t.detach())
        g_teacher = _gaussian_denoiser(torch.tensor(mu_t), t, x_t.detach())
        loss = vsd_loss(x_hat, vsd_direction(g_fake, g_teacher, x_hat, norm))  # ∂/∂μ_S = mean(D)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert abs(float(mu_s.detach()) - mu_t) < 0.25


def test_dsm_loss_weightings_and_minimiser():
    x_hat, noise = torch.randn(2, 3, 1, 2, 2, generator=gen(2)), torch.randn(2, 3, 1, 2, 2, generator=gen(3))
    t = torch.tensor([0.5, 0.2], dtype=torch.float64)
    v = torch.randn(x_hat.shape, generator=gen(4))
    flow = ((v - (noise - x_hat)) ** 2).mean()
    assert torch.isclose(dsm_loss(v, x_hat, noise, t, "flow"), flow)
    x_t = (1 - t.view(-1, 1, 1, 1, 1)) * x_hat + t.view(-1, 1, 1, 1, 1) * noise
    x0 = ((x_t - t.view(-1, 1, 1, 1, 1) * v - x_hat) ** 2).mean()  # ‖g_fake − x̂‖² with g_fake = x_t − t·v
    assert torch.isclose(dsm_loss(v, x_hat, noise, t, "x0").double(), x0.double(), rtol=1e-5)
    assert float(dsm_loss(noise - x_hat, x_hat, noise, t, "x0")) == 0.0


def test_gan_losses_are_averaged_non_saturating_log_likelihoods():
    real, fake = torch.tensor([[2.0, -1.0, 0.5]]), torch.tensor([[0.3, 1.5, -2.0]])
    assert torch.isclose(gan_generator_loss(fake), -torch.log(torch.sigmoid(fake)).mean())
    expect = -torch.log(torch.sigmoid(real)).mean() - torch.log(1 - torch.sigmoid(fake)).mean()
    assert torch.isclose(gan_discriminator_loss(real, fake), expect)


def test_generators_eq17_and_fresh_tmd_rollout():
    teacher = tiny_teacher()
    batch = tiny_batch()
    t = torch.tensor([0.999, 10 / 11], dtype=torch.float64)
    x1 = torch.randn(batch.latents.shape, generator=gen(5))
    tt = t.float().view(-1, 1, 1, 1, 1)
    inp = StudentInput((1 - tt) * batch.latents + tt * x1, t, x1)
    with torch.no_grad():
        eq17 = inp.x_t - tt * teacher(inp.x_t, 1000 * t, batch.context)
        plain = generate(copy_of(teacher), inp, batch.context, DMD2vConfig(), gen(0))
        tmd = generate(tiny_student(teacher), inp, batch.context, DMD2vConfig(t_max=1.0), gen(0))
    assert torch.equal(plain, eq17)
    # The outer grid tops at t_max too, so compare with inner s_N = 1: a fresh TMD student is DMD2-v's teacher.
    assert rel_err(tmd, eq17) < 1e-5


def _trio(tmd: bool):
    teacher = tiny_teacher()
    student = tiny_student(teacher) if tmd else copy_of(teacher)
    fake = copy_of(teacher)
    disc = Discriminator.for_teacher(teacher, layers=(1, 3), width=16)
    return teacher, student, fake, disc


CFG = DMD2vConfig(disc_layers=(1, 3), disc_width=16, inner_steps=2)


@pytest.mark.parametrize("tmd", [False, True], ids=["dmd2v", "tmd"])
def test_each_update_trains_exactly_its_own_parameters(tmd):
    teacher, student, fake, disc = _trio(tmd)
    batch = tiny_batch()
    fake.requires_grad_(False)
    disc.requires_grad_(False)
    loss, _ = dmd2v_generator_loss(student, teacher, fake, disc, batch, CFG, gen(0))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())
    assert all(p.grad is None for m in (teacher, fake, disc) for p in m.parameters())

    student.requires_grad_(False)
    fake.requires_grad_(True)
    disc.requires_grad_(True)
    x_hat = student_sample(student, batch, CFG, gen(1))
    fake_loss, _ = fake_score_loss(fake, x_hat, batch, CFG, gen(2))
    disc_loss, _ = discriminator_loss(teacher, disc, x_hat, batch, CFG, gen(3))
    (fake_loss + disc_loss).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for m in (fake, disc) for p in m.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_tmd_generator_backpropagates_through_every_inner_step():
    teacher, student, fake, disc = _trio(True)
    fake.requires_grad_(False)
    disc.requires_grad_(False)
    passes = []
    student.wan.blocks[-1].register_full_backward_hook(lambda *a: passes.append(1))
    loss, _ = dmd2v_generator_loss(student, teacher, fake, disc, tiny_batch(), CFG.replace(inner_steps=3), gen(0))
    loss.backward()
    assert len(passes) == 3  # the last flow-head block is in the graph once per inner step


@pytest.mark.parametrize("tmd", [False, True], ids=["dmd2v", "tmd"])
def test_dmd2v_updates_decrease_their_losses_on_a_fixed_batch(tmd):
    """Acceptance. A DMD2-v/TMD loop on one batch (same noise every iteration): the student updates every 5th
    iteration, the fake score and discriminator on the others. Their losses fall; the student's loss is a
    surrogate of a moving game, so it is checked with the critics held fixed (the other players' moves would
    otherwise dominate it)."""
    teacher, student, fake, disc = _trio(tmd)
    batch = tiny_batch()
    opt = {
        name: torch.optim.AdamW(m.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.01)
        for name, m in (("student", student), ("fake", fake), ("disc", disc))
    }
    history = {"fake": [], "disc": []}
    for it in range(26):
        if is_student_step(it):
            fake.requires_grad_(False)
            disc.requires_grad_(False)
            loss, _ = dmd2v_generator_loss(student, teacher, fake, disc, batch, CFG, gen(0))
            opt["student"].zero_grad()
            loss.backward()
            opt["student"].step()
            fake.requires_grad_(True)
            disc.requires_grad_(True)
        else:
            x_hat = student_sample(student, batch, CFG, gen(0))
            lf, _ = fake_score_loss(fake, x_hat, batch, CFG, gen(1))
            ld, _ = discriminator_loss(teacher, disc, x_hat, batch, CFG, gen(2))
            opt["fake"].zero_grad()
            opt["disc"].zero_grad()
            (lf + ld).backward()
            opt["fake"].step()
            opt["disc"].step()
            history["fake"].append(float(lf.detach()))
            history["disc"].append(float(ld.detach()))
    assert history["fake"][-1] < 0.8 * history["fake"][0]
    assert history["disc"][-1] < history["disc"][0] - 0.01

    fake.requires_grad_(False)
    disc.requires_grad_(False)
    generator = []
    opt_g = torch.optim.AdamW(student.parameters(), lr=1e-4, betas=(0.9, 0.99))
    for _ in range(8):
        loss, metrics = dmd2v_generator_loss(student, teacher, fake, disc, batch, CFG, gen(0))
        opt_g.zero_grad()
        loss.backward()
        opt_g.step()
        generator.append(float(loss.detach()))
        assert torch.isfinite(metrics["vsd_gap"]) and torch.isfinite(metrics["gan_generator"])
    assert all(b < a for a, b in zip(generator, generator[1:]))


@pytest.mark.parametrize(
    "student_cfg,cfg",
    [
        (dict(target="x", fusion="concat"), dict(rollout_form="outer", vsd_norm="dmd", fake_target="flow")),
        (dict(head_time="inner", flow_map_sign=1), dict(rollout_form="eq15", gan_same_noise=False, gan_weight=0.0)),
    ],
    ids=["x-target-concat-dmdnorm", "inner-time-printed-signs"],
)
def test_alternative_options_run_end_to_end(student_cfg, cfg):
    teacher = tiny_teacher()
    student = tiny_student(teacher, **student_cfg)
    fake, disc = copy_of(teacher, trainable=False), Discriminator.for_teacher(teacher, (1, 3), width=16)
    disc.requires_grad_(False)
    batch, config = tiny_batch(), CFG.replace(**cfg)
    loss, metrics = dmd2v_generator_loss(student, teacher, fake, disc, batch, config, gen(0))
    loss.backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads)
    x_hat = student_sample(student, batch, config, gen(1))
    assert torch.isfinite(fake_score_loss(copy_of(teacher), x_hat, batch, config, gen(2))[0])
    assert torch.isfinite(discriminator_loss(teacher, disc, x_hat, batch, config, gen(3))[0])


class AffineVelocity(torch.nn.Module):
    """A stand-in Wan model: v = a·x_t + mean(context), so the conditional and the negative prompt differ."""

    def __init__(self, a, trainable=False):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(a), requires_grad=trainable)
        self.seen = []

    def forward(self, x, t_wan, context, return_hidden=()):
        self.seen.append((x.detach().clone(), t_wan.detach().clone() / 1000))
        return self.a * x + context.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)


@pytest.mark.parametrize("norm", [None, "teacher_fake"], ids=["default-dmd", "printed"])
def test_generator_loss_matches_the_closed_form_with_stub_models(norm):
    """Eq. 17 student, Eq. 11 with the normalised teacher−fake difference (the default: DMD's/FastGen's
    mean|x̂ − g_teacher| + 1e-6; or A.3's mean|g_fake − g_teacher|) and the CFG'd teacher (scale 5, negative
    prompt), recomputed by hand from what each stub model saw."""
    batch = tiny_batch()
    student, teacher, fake = AffineVelocity(0.3, trainable=True), AffineVelocity(-0.2), AffineVelocity(0.1)
    cfg = DMD2vConfig(gan_weight=0.0) if norm is None else DMD2vConfig(gan_weight=0.0, vsd_norm=norm)
    loss, metrics = dmd2v_generator_loss(student, teacher, fake, None, batch, cfg, gen(0))
    x_t, t_i = student.seen[0]
    cond = batch.context.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)
    x_hat = x_t - t_i.view(-1, 1, 1, 1, 1).float() * (0.3 * x_t + cond)
    xs_t, t = fake.seen[0]
    tt = t.view(-1, 1, 1, 1, 1).float()
    neg = (batch.negative.sum() / (8 * batch.negative.shape[-1])).expand_as(cond)  # zero-padded to 8 rows
    v_teacher = (-0.2 * xs_t + neg) + 5.0 * ((-0.2 * xs_t + cond) - (-0.2 * xs_t + neg))
    v_fake = 0.1 * xs_t + cond
    g_teacher = xs_t - tt * v_teacher
    d = (xs_t - tt * v_fake) - g_teacher
    if norm is None:
        d = d / ((x_hat - g_teacher).abs().flatten(1).mean(1) + 1e-6).view(-1, 1, 1, 1, 1)
    else:
        d = d / d.abs().flatten(1).mean(1).view(-1, 1, 1, 1, 1)
    expect = (d * x_hat).flatten(1).mean(1).mean()
    assert torch.allclose(loss, expect, rtol=1e-5) and torch.allclose(metrics["vsd"], expect, rtol=1e-5)
    loss.backward()
    assert student.a.grad is not None and teacher.a.grad is None and fake.a.grad is None
