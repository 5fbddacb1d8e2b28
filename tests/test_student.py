"""The decoupled student (paper Eq. 12–14, App. A.1, B.3, B.4): names, initialisation, the identity test."""
import pytest
import torch

from algo_helpers import TINY, gen, tiny_student, tiny_teacher, single_thread  # noqa: F401  (fixture)
from tmd_megatron.algorithms.sampling import teacher_euler_sample, tmd_sample
from tmd_megatron.algorithms.timesteps import student_grid
from tmd_megatron.models.student import DecoupledStudent, StudentConfig
from tmd_megatron.models.wan import WanModel
from wan_reference import rel_err

pytestmark = pytest.mark.usefixtures("single_thread")


def _inputs(seed=0, batch=2):
    g = gen(seed)
    x_t = torch.randn(batch, 16, 2, 4, 4, generator=g)
    ctx = torch.randn(batch, 8, 32, generator=g)
    y_s = torch.randn(x_t.shape, generator=g)
    t = torch.tensor([0.9, 0.3], dtype=torch.float64)[:batch]
    s = torch.tensor([0.6, 0.95], dtype=torch.float64)[:batch]
    r = torch.tensor([0.1, 0.95], dtype=torch.float64)[:batch]
    return x_t, ctx, y_s, t, s, r


WB = ("weight", "bias")


def test_extra_parameter_names_are_stable():
    teacher = tiny_teacher()
    gated = tiny_student(teacher)
    assert sorted(gated.extra_parameter_names()) == sorted(
        ["fusion.modulation", "fusion.gate_logit"]
        + [f"fusion.ffn.{i}.{p}" for i in (0, 2) for p in WB]
        + [f"{e}.{i}.{p}" for e in ("delta_time_embedding", "inner_time_embedding") for i in (0, 2) for p in WB]
    )
    concat = tiny_student(teacher, fusion="concat", head_time="inner")
    assert sorted(concat.extra_parameter_names()) == sorted(
        ["fusion.proj.weight", "fusion.proj.bias"] + [f"delta_time_embedding.{i}.{p}" for i in (0, 2) for p in WB]
    )
    # The Wan part keeps the original checkpoint keys under `wan.`.
    assert {k[4:] for k in gated.state_dict() if k.startswith("wan.")} == set(teacher.state_dict())


def test_fresh_flow_head_is_the_teacher_for_any_inner_state():
    teacher = tiny_teacher()
    student = tiny_student(teacher)
    x_t, ctx, y_s, t, s, r = _inputs()
    with torch.no_grad():
        ref = teacher(x_t, 1000 * t, ctx)
        head = student.flow_head(y_s, s, r, student.backbone(x_t, t, ctx))
        head2 = student.flow_head(-3 * y_s, s.flip(0), r * 0, student.backbone(x_t, t, ctx))
    assert torch.equal(head, ref) and torch.equal(head2, ref)


@pytest.mark.parametrize(
    "config",
    [dict(head_time="inner"), dict(fusion_zero_init=False, gate_init=-4.0), dict(fusion="concat")],
    ids=["inner-time", "random-fusion-output", "concat"],
)
def test_alternatives_are_not_the_teacher_at_init(config):
    """The options that follow the paper's text literally do not reproduce the teacher exactly."""
    teacher = tiny_teacher()
    student = tiny_student(teacher, **config)
    x_t, ctx, y_s, t, s, r = _inputs()
    with torch.no_grad():
        err = rel_err(student.flow_head(y_s, s, r, student.backbone(x_t, t, ctx)), teacher(x_t, 1000 * t, ctx))
    assert err > 1e-4


def test_fresh_tmd_sampler_is_the_teacher_euler_sampler_on_the_student_grid():
    teacher = tiny_teacher()
    student = tiny_student(teacher)
    noise = torch.randn(2, 16, 2, 4, 4, generator=gen(1))
    ctx = torch.randn(2, 8, 32, generator=gen(2))
    outer = student_grid(2, 10.0)
    euler = teacher_euler_sample(teacher, noise, ctx, outer)
    exact_top = tmd_sample(student, noise, ctx, outer, student_grid(4, 10.0, t_max=1.0), gen(3))
    assert rel_err(exact_top, euler) < 1e-6
    # With the paper's s_N = 0.999 each ŷ keeps 0.1 % of the inner noise: ŷ = 0.001·y_1 + 0.999·v (by hand).
    paper_top = tmd_sample(student, noise, ctx, outer, student_grid(4, 10.0), gen(3))
    assert 1e-5 < rel_err(paper_top, euler) < 5e-3
    # The x-target parametrisation (App. B.4) is exact even with s_N = 0.999.
    x_student = tiny_student(teacher, target="x")
    assert rel_err(tmd_sample(x_student, noise, ctx, outer, student_grid(4, 10.0), gen(3)), euler) < 1e-5


def test_paper_literal_time_conditioning_breaks_the_identity():
    teacher = tiny_teacher()
    student = tiny_student(teacher, head_time="inner")
    noise = torch.randn(1, 16, 2, 4, 4, generator=gen(1))
    ctx = torch.randn(1, 8, 32, generator=gen(2))
    outer = student_grid(2, 10.0)
    euler = teacher_euler_sample(teacher, noise, ctx, outer)
    assert rel_err(tmd_sample(student, noise, ctx, outer, student_grid(2, 10.0, t_max=1.0), gen(3)), euler) > 1e-3


def test_concat_fusion_is_identity_on_m_plus_small_noise_on_y():
    student = tiny_student(tiny_teacher(), fusion="concat")
    w = student.fusion.proj.weight.detach()
    d = TINY.dim
    assert torch.equal(w[:, :d], torch.eye(d)) and torch.equal(student.fusion.proj.bias, torch.zeros(d))
    assert 0.007 < float(w[:, d:].std()) < 0.013
    m = torch.randn(2, 5, d)
    assert torch.equal(student.fusion(m, torch.zeros(2, 5, d), None), m)


def test_gradients_reach_backbone_flow_head_and_extras():
    teacher = tiny_teacher()
    student = tiny_student(teacher)
    x_t, ctx, y_s, t, s, r = _inputs()
    head = student.flow_head(y_s, s, r, student.backbone(x_t, t, ctx))
    head.square().sum().backward()
    grads = {n: p.grad for n, p in student.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["wan.blocks.0.self_attn.q.weight"].abs().sum() > 0  # the backbone is trained, not detached
    assert grads["fusion.ffn.2.weight"].abs().sum() > 0  # the closed fusion starts learning at once
    assert grads["inner_time_embedding.2.weight"].abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_from_pretrained_matches_from_teacher(tmp_path):
    teacher = tiny_teacher()
    teacher.save_pretrained(tmp_path / "teacher")
    loaded = DecoupledStudent.from_pretrained(tmp_path / "teacher", StudentConfig(flow_head_blocks=2))
    built = tiny_student(teacher)
    x_t, ctx, y_s, t, s, r = _inputs()
    with torch.no_grad():
        a = loaded.flow_head(y_s, s, r, loaded.backbone(x_t, t, ctx))
        b = built.flow_head(y_s, s, r, built.backbone(x_t, t, ctx))
    assert torch.equal(a, b)


def test_bad_student_configs_name_the_fix():
    with pytest.raises(ValueError, match="choose one of"):
        StudentConfig(fusion="add")
    with pytest.raises(ValueError, match="choose one of"):
        StudentConfig(target="eps")
    with pytest.raises(ValueError, match="at most 3"):
        DecoupledStudent(WanModel(TINY), StudentConfig(flow_head_blocks=4))
