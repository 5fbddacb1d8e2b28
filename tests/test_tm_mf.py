"""TM-MF (paper Eq. 9–10, App. A.2, Algorithm 2): each formula by hand, the composed step against an analytic
student whose loss is known in closed form, and the real step on a tiny Wan model."""
from types import SimpleNamespace

import pytest
import torch

from algo_helpers import gen, single_thread, tiny_batch, tiny_student, tiny_teacher  # noqa: F401  (fixture)
from tmd_megatron.algorithms import TMMFConfig, tm_mf_loss
from tmd_megatron.algorithms.jvp import exact_total_derivative, total_derivative
from tmd_megatron.algorithms.tm_mf import adaptive_loss, jvp_warmup_weight, meanflow_target, mf_guided_velocity
from tmd_megatron.models.student import StudentConfig

pytestmark = pytest.mark.usefixtures("single_thread")


def _t(*v):
    return torch.tensor(v, dtype=torch.float64)


def test_eq10_target_and_guidance_by_hand():
    v, du = torch.full((2, 1, 1, 1, 1), 3.0), torch.full((2, 1, 1, 1, 1), 2.0)
    target = meanflow_target(v, _t(0.5, 0.4), _t(0.25, 0.4), du)
    assert target.flatten().tolist() == [3.0 - 0.25 * 2.0, 3.0]  # û = v − (s − r)·du/ds; r = s: û = v
    u_unc = torch.full_like(v, 1.0)
    guided = mf_guided_velocity(v, u_unc, 3.0, torch.tensor([True, False]))
    assert guided.flatten().tolist() == [1.0 + 3.0 * (3.0 - 1.0), 3.0]  # dropped samples stay unguided


def test_adaptive_normalisation_value_and_gradient():
    u = torch.tensor([[1.0, 2.0], [0.0, 3.0]], requires_grad=True)
    tgt = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    loss, sq = adaptive_loss(u, tgt, c=4.0)
    assert sq.tolist() == [5.0, 4.0]
    assert torch.isclose(loss, torch.tensor((5 / 9 + 4 / 8) / 2))
    loss.backward()
    # sg() in the denominator: ∂/∂u = 2(u − û)/(‖u − û‖² + c)/B, not the gradient of sq/(sq + c).
    expect = torch.stack([2 * (u[0] - tgt[0]) / 9, 2 * (u[1] - tgt[1]) / 8]).detach() / 2
    assert torch.allclose(u.grad, expect)


def test_meanflow_identity_is_a_fixed_point_of_the_target():
    """For y' = a·y the exact average velocity u = y_s(1 − e^{−a(s−r)})/(s − r) satisfies Eq. 8, so with the
    true velocity v = a·y_s the Eq. 10 target equals u (exact JVP and FD)."""
    a = 1.7
    y_s = torch.randn(3, 2, 1, 2, 2, generator=gen(0), dtype=torch.float64)
    s, r = _t(0.9, 0.5, 0.3), _t(0.2, 0.1, 0.25)

    def u_fn(y, s_):
        h = (s_ - r).view(-1, 1, 1, 1, 1)
        return y * (1 - torch.exp(-a * h)) / h

    v = a * y_s
    u = u_fn(y_s, s)
    assert torch.allclose(meanflow_target(v, s, r, exact_total_derivative(u_fn, y_s, s, v)), u, atol=1e-12)
    fd = meanflow_target(v, s, r, total_derivative(u_fn, y_s, s, r, v, "fd", 5e-3))
    assert torch.allclose(fd, u, atol=1e-5)
    wrong_sign = v + (s - r).view(-1, 1, 1, 1, 1) * exact_total_derivative(u_fn, y_s, s, v)
    assert not torch.allclose(wrong_sign, u, atol=1e-3)


class AnalyticStudent:
    """head = v_true + ε(s − r)·z: the loss of the whole TM-MF step is known in closed form.

    It knows the clean batch, so from x_t it recovers the outer noise and the true outer velocity x_1 − x
    (= y for DTM). Calls are recorded to read back the sampled t, s and r.
    """

    def __init__(self, x, target, eps=0.3):
        self.config = StudentConfig(target=target)
        self.x, self.eps, self.calls, self.t = x, eps, [], None
        self.z = torch.randn(x.shape, generator=gen(9), dtype=x.dtype)

    def backbone(self, x_t, t, context, cond=None):
        self.t = t
        return SimpleNamespace(x_t=x_t, t=t, context=context)

    def flow_head(self, y_s, s, r, features):
        tt = features.t.view(-1, 1, 1, 1, 1).to(self.x.dtype)
        x1 = (features.x_t - (1 - tt) * self.x) / tt
        self.calls.append((s.detach().clone(), r.detach().clone()))
        return (x1 - self.x) + self.eps * (s - r).view(-1, 1, 1, 1, 1).to(self.x.dtype) * self.z


@pytest.mark.parametrize("target", ["dtm", "x"])
@pytest.mark.parametrize("jvp", ["fd", "exact"])
def test_composed_step_matches_the_closed_form(target, jvp):
    batch = tiny_batch(batch=4, latent=(1, 2, 2))
    batch.latents = batch.latents.double()
    student = AnalyticStudent(batch.latents, target)
    c = 5.0
    cfg = TMMFConfig(cfg_scale=3.0, cond_dropout=0.5, r_equals_s=0.5, norm_const_per_dim=c / 64, jvp=jvp)
    loss, metrics = tm_mf_loss(student, batch, cfg, gen(1))
    s, r = (v.view(-1, 1, 1, 1, 1) for v in student.calls[-1])
    t = student.t.view(-1, 1, 1, 1, 1)
    eps, z = student.eps, student.z
    if target == "dtm":
        # u = y_1 − y − ε(s−r)z, du/ds = −εz, û = v + ε(s−r)z; the guidance is exact (u_uncond = v).
        err = -2 * eps * (s - r) * z
    else:
        # x̂ = x − tε(s−r)z, u = (y_s − x̂)/s = v + tε(s−r)z/s, du/ds = tεzr/s², û = v − (s−r)tεzr/s².
        err = t * eps * (s - r) * (s + r) * z / s**2
    sq = err.pow(2).flatten(1).sum(1)
    expect = (sq / (sq + c)).mean()
    assert torch.allclose(loss.double(), expect, rtol=1e-4 if jvp == "fd" else 1e-9)
    assert float(expect) > 1e-3 and 0 < float(metrics["r_equals_s"]) < 1  # the check is not vacuous


def test_jvp_warmup_schedule_is_fastgens():
    """FastGen (mean_flow.py:300-303) ramps min(1, iteration/W) over trainer iterations 1, 2, ... (trainer.py:181);
    our step counts the updates already done, so update k (1-based) is step k − 1."""
    W = 2000
    fastgen = [min(1.0, it / W) for it in range(1, 2 * W + 1)]
    assert [jvp_warmup_weight(step, W) for step in range(2 * W)] == fastgen
    assert jvp_warmup_weight(0, W) == 1 / 2000 and jvp_warmup_weight(999, W) == 0.5 and jvp_warmup_weight(1999, W) == 1
    assert all(jvp_warmup_weight(step, 0) == 1.0 for step in (0, 1, 10**6))  # off
    assert TMMFConfig().jvp_warmup_iters == 0
    with pytest.raises(ValueError, match="jvp_warmup_iters"):
        TMMFConfig(jvp_warmup_iters=-1)


@pytest.mark.parametrize("target", ["dtm", "x"])
@pytest.mark.parametrize("w", [0.0, 0.5, 1.0])
def test_jvp_weight_scales_the_jvp_term_in_the_closed_form(target, w):
    """The analytic student of the closed-form test with the JVP term weighted by w: dtm u − û = −(1 + w)ε(s−r)z,
    x target tε(s−r)z(s + w·r)/s²; at w = 0 it is u − v, the loss without the JVP term."""
    batch = tiny_batch(batch=4, latent=(1, 2, 2))
    batch.latents = batch.latents.double()
    student = AnalyticStudent(batch.latents, target)
    c = 5.0
    cfg = TMMFConfig(cfg_scale=3.0, cond_dropout=0.5, r_equals_s=0.5, norm_const_per_dim=c / 64, jvp="exact")
    loss, metrics = tm_mf_loss(student, batch, cfg, gen(1), jvp_weight=w)
    s, r = (v.view(-1, 1, 1, 1, 1) for v in student.calls[-1])
    t, eps, z = student.t.view(-1, 1, 1, 1, 1), student.eps, student.z
    err = -(1 + w) * eps * (s - r) * z if target == "dtm" else t * eps * (s - r) * z * (s + w * r) / s**2
    sq = err.pow(2).flatten(1).sum(1)
    assert torch.allclose(loss.double(), (sq / (sq + c)).mean(), rtol=1e-6)  # the loss is summed in fp32
    assert float(metrics["jvp_weight"]) == w


def test_jvp_weight_zero_gives_the_gradient_without_the_jvp_term(monkeypatch):
    """Tiny Wan student: the gradient at weight 0 equals the gradient with the total derivative replaced by zeros
    (target û = ṽ, no JVP term), and differs from the weight-1 gradient."""
    import tmd_megatron.algorithms.tm_mf as tm

    teacher = tiny_teacher()
    cfg = TMMFConfig(r_equals_s=0.0)

    def grads(weight, zero_jvp=False):
        torch.manual_seed(0)
        student = tiny_student(teacher)
        with torch.no_grad():  # off the identity init, where u does not depend on (y_s, s) and du/ds = 0
            for p in student.parameters():
                p.add_(0.05 * torch.randn_like(p))
        if zero_jvp:
            monkeypatch.setattr(tm, "total_derivative", lambda u_fn, y_s, *a, **k: torch.zeros_like(y_s))
        loss, _ = tm_mf_loss(student, tiny_batch(), cfg, gen(3), jvp_weight=weight)
        monkeypatch.undo()
        loss.backward()
        return torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])

    no_jvp = grads(1.0, zero_jvp=True)
    torch.testing.assert_close(grads(0.0), no_jvp, rtol=1e-6, atol=1e-9)
    assert (grads(1.0) - no_jvp).abs().max() > 1e-3 * no_jvp.abs().max()


def test_step_trains_backbone_and_head_but_not_the_teacher():
    teacher = tiny_teacher()
    student = tiny_student(teacher)
    loss, _ = tm_mf_loss(student, tiny_batch(), TMMFConfig(cfg_source="teacher"), gen(0), teacher=teacher)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())
    assert student.wan.blocks[0].ffn[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    with pytest.raises(ValueError, match="needs the teacher"):
        tm_mf_loss(student, tiny_batch(), TMMFConfig(cfg_source="teacher"), gen(0))


def test_fd_and_exact_jvp_give_the_same_loss_on_the_tiny_model(monkeypatch):
    teacher = tiny_teacher()
    student = tiny_student(teacher)
    from tmd_megatron.algorithms import tm_mf
    from tmd_megatron.algorithms.bench_jvp import band_limit_inner_time, perturb_extras

    perturb_extras(student)
    band_limit_inner_time(student, 0.05)
    batch = tiny_batch()
    cfg = TMMFConfig(r_equals_s=0.0, norm_const_per_dim=1e3)  # every sample uses the JVP term
    with torch.no_grad():
        fd = float(tm_mf_loss(student, batch, cfg, gen(0))[0])
        exact = float(tm_mf_loss(student, batch, cfg.replace(jvp="exact"), gen(0))[0])
        derivative = tm_mf.total_derivative
        monkeypatch.setattr(tm_mf, "total_derivative", lambda *a, **k: 0 * derivative(*a, **k))
        without = float(tm_mf_loss(student, batch, cfg, gen(0))[0])
    assert abs(fd - exact) < 0.01 * exact
    assert abs(without - exact) > 3 * abs(fd - exact)  # the JVP term matters at this tolerance


def test_tm_mf_loss_decreases_on_a_fixed_batch():
    """Acceptance: a few dozen TM-MF steps on one batch (same noise each step) lower the loss."""
    teacher = tiny_teacher()
    student = tiny_student(teacher)
    batch = tiny_batch()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.01)
    losses = []
    for _ in range(25):
        loss, _ = tm_mf_loss(student, batch, TMMFConfig(), gen(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.85 * losses[0]
    assert all(torch.isfinite(p).all() for p in student.parameters())


def _record_autocast(monkeypatch, cls, name):
    """Wrap cls.name to record (grad enabled, autocast enabled, dtype of the result) per call."""
    calls, original = [], getattr(cls, name)

    def wrapped(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls.append((torch.is_grad_enabled(), torch.is_autocast_enabled("cpu")))
        return out

    monkeypatch.setattr(cls, name, wrapped)
    return calls


@pytest.mark.parametrize("fd_dtype", ["fp32", "compute"])
def test_fd_passes_leave_bf16_autocast_only_when_asked(monkeypatch, fd_dtype):
    """Under bf16 autocast, fd_dtype='fp32' runs the two no-grad FD flow-head passes with autocast off and the
    trained pass under autocast; 'compute' keeps all three under autocast. The loss is finite either way."""
    from tmd_megatron.models.student import DecoupledStudent

    calls = _record_autocast(monkeypatch, DecoupledStudent, "flow_head")
    teacher = tiny_teacher()
    student = tiny_student(teacher)
    cfg = TMMFConfig(cfg_scale=1.0, fd_dtype=fd_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = tm_mf_loss(student, tiny_batch(), cfg, gen(0))
    fd = [autocast for grad, autocast in calls if not grad]
    trained = [autocast for grad, autocast in calls if grad]
    assert len(fd) == 2 and trained == [True] and torch.isfinite(loss)
    assert fd == ([False, False] if fd_dtype == "fp32" else [True, True])


def test_trainer_fd_passes_follow_fd_dtype(monkeypatch, tmp_path):
    """The pipelined TM-MF program (training/programs.py) honours fd_dtype the same way, under bf16 compute."""
    import io

    from tmd_megatron.models.student import DecoupledStudent
    from tmd_megatron.parallel import Topology
    from tmd_megatron.training.config import compose, resolve
    from tmd_megatron.training.trainer import Trainer

    seen = {}
    for fd_dtype in ("fp32", "compute"):
        calls = _record_autocast(monkeypatch, DecoupledStudent, "flow_head_given")
        res = resolve(compose(["experiment=tiny_smoke", "method=tm_mf", "model.compute_dtype=bf16",
                               f"method.tm_mf.fd_dtype={fd_dtype}", "method.tm_mf.cfg_scale=1.0",
                               f"run.out_dir={tmp_path / fd_dtype}", "run.tensorboard=false", "run.resume=never"]))
        trainer = Trainer(res, Topology.single(), stream=io.StringIO())
        trainer.start()
        trainer.advance()
        monkeypatch.undo()
        seen[fd_dtype] = sorted({autocast for grad, autocast in calls if not grad})
    assert seen == {"fp32": [False], "compute": [True]}
