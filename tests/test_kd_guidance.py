"""KD warm-up (Sec. 3.2, Table 7) and classifier-free guidance with the negative prompt / skip-layer guidance."""
import pytest
import torch

from algo_helpers import copy_of, gen, single_thread, tiny_batch, tiny_teacher  # noqa: F401  (fixture)
from test_sampling import PointMassVelocity
from tmd_megatron.algorithms import KDConfig, kd_loss, teacher_ode_pairs
from tmd_megatron.algorithms.guidance import cfg_combine, drop_condition, guided_velocity, match_contexts, wan_velocity
from tmd_megatron.algorithms.kd import kd_teacher_grid
from tmd_megatron.algorithms.timesteps import shift_time

pytestmark = pytest.mark.usefixtures("single_thread")


def test_skip_layer_unconditional_pass_equals_running_around_the_block():
    teacher = tiny_teacher()
    b = tiny_batch()
    t = torch.tensor([0.8, 0.3], dtype=torch.float64)
    with torch.no_grad():
        skipped, _ = wan_velocity(teacher, b.latents, t, b.context, skip_layers=(1,))
        tokens, geom = teacher.embed_tokens(b.latents)
        e, e0 = teacher.embed_time(1000 * t)
        c = teacher.embed_text(b.context)
        tokens = teacher.blocks[0](tokens, c, e0, geom.rope_cos, geom.rope_sin)
        for block in teacher.blocks[2:]:
            tokens = block(tokens, c, e0, geom.rope_cos, geom.rope_sin)
        manual = teacher.head_out(tokens, e, geom)
        full, _ = wan_velocity(teacher, b.latents, t, b.context)
        guided = guided_velocity(teacher, b.latents, t, b.context, b.negative, 5.0, skip_layers=(1,))
        _, neg = match_contexts(b.context, b.negative)
        uncond, _ = wan_velocity(teacher, b.latents, t, neg, skip_layers=(1,))
    assert torch.allclose(skipped, manual, atol=1e-6) and not torch.allclose(skipped, full, atol=1e-3)
    assert torch.allclose(guided, uncond + 5.0 * (full - uncond), atol=1e-5)
    assert torch.allclose(cfg_combine(full, uncond, 1.0), full, atol=1e-6)


def test_negative_prompt_padding_and_condition_dropout():
    ctx = torch.randn(4, 3, 8, generator=gen(0))
    neg = torch.randn(5, 8, generator=gen(1))
    c, n = match_contexts(ctx, neg)
    assert c.shape == n.shape == (4, 5, 8) and torch.equal(c[:, 3:], torch.zeros(4, 2, 8))
    assert torch.equal(n[2], neg)
    used, keep = drop_condition(ctx, neg, 0.5, gen(2))
    for i in range(4):
        assert torch.equal(used[i], c[i] if keep[i] else n[i])
    _, keep = drop_condition(torch.zeros(20_000, 1, 8), neg, 0.1, gen(3))
    assert abs(float(keep.float().mean()) - 0.9) < 0.01
    with pytest.raises(ValueError, match="negative-prompt embedding"):
        match_contexts(ctx, torch.zeros(5, 7))


def test_kd_pairs_come_from_the_teacher_ode():
    cfg = KDConfig(teacher_steps=6)
    grid = kd_teacher_grid(cfg)
    assert float(grid[0]) == 0.0 and torch.isclose(grid[-1], shift_time(torch.tensor(0.999, dtype=torch.float64), 5.0))
    x_star = torch.randn(2, 16, 1, 2, 2, generator=gen(4))
    noise = torch.randn(x_star.shape, generator=gen(5))
    exact = PointMassVelocity(x_star)
    pairs = teacher_ode_pairs(exact, noise, torch.zeros(2, 1, 32), None, KDConfig(cfg_scale=1.0, teacher_steps=6))
    assert torch.allclose(pairs, x_star, atol=1e-5)


def test_kd_regression_decreases_for_a_one_step_student():
    teacher = tiny_teacher()
    student = copy_of(teacher)
    b = tiny_batch()
    cfg = KDConfig(teacher_steps=4, skip_layers=(1,))
    with pytest.raises(ValueError, match="skip layers"):
        # the default skip layer 10 belongs to the 30-block model
        teacher_ode_pairs(teacher, b.latents, b.context, b.negative, KDConfig(teacher_steps=2))
    noise = torch.randn(b.latents.shape, generator=gen(6))
    target = teacher_ode_pairs(teacher, noise, b.context, b.negative, cfg)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    losses = []
    for _ in range(20):
        loss, _ = kd_loss(student, noise, target, b.context, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
    assert all(p.grad is None for p in teacher.parameters())
