"""Samplers (paper Algorithm 1, Eq. 16, 18) with exact stub models, and the effective NFE by counting blocks."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from algo_helpers import gen, single_thread, tiny_batch, tiny_student, tiny_teacher  # noqa: F401  (fixture)
from tmd_megatron.algorithms import BlockCounter, dmd2v_sample, effective_nfe, teacher_euler_sample, tmd_sample
from tmd_megatron.algorithms.timesteps import student_grid, wan_sampling_grid
from tmd_megatron.models.student import StudentConfig

pytestmark = pytest.mark.usefixtures("single_thread")


class PointMassVelocity(nn.Module):
    """The exact flow velocity for data concentrated at x*: v(x_t, t) = (x_t − x*)/t (Wan's call signature)."""

    def __init__(self, x_star):
        super().__init__()
        self.x_star = x_star

    def forward(self, x_t, t_wan, context, return_hidden=()):
        return ((x_t - self.x_star) / (t_wan / 1000).view(-1, 1, 1, 1, 1)).to(x_t.dtype)


def test_paper_effective_nfe_values():
    # Table 1/2: N2H5 and N4H5 on the 30-block 1.3B and 40-block 14B models.
    assert round(effective_nfe(2, 2, 5, 30), 2) == 2.33 and effective_nfe(2, 4, 5, 30) == 3.0
    assert round(effective_nfe(1, 2, 5, 30), 2) == 1.17 and effective_nfe(1, 4, 5, 30) == 1.5
    assert effective_nfe(2, 4, 5, 40) == 2.75 and round(effective_nfe(1, 4, 5, 40), 2) == 1.38
    assert effective_nfe(4, 1, 5, 30) == 4.0  # N = 1: a plain 4-step model


@pytest.mark.parametrize("m,n,h", [(1, 1, 1), (2, 4, 2), (3, 2, 3)])
def test_counted_block_evaluations_match_eq16(m, n, h):
    teacher = tiny_teacher()
    student = tiny_student(teacher, flow_head_blocks=h)
    b = tiny_batch(batch=1)
    with BlockCounter(student.wan) as counter:
        tmd_sample(student, b.latents, b.context, student_grid(m, 10.0), student_grid(n, 10.0), gen(0))
    assert counter.nfe() == effective_nfe(m, n, h, teacher.config.num_layers)
    with BlockCounter(teacher) as counter:  # CFG costs two passes per step ("50×2" in Table 1)
        teacher_euler_sample(teacher, b.latents, b.context, student_grid(3, 5.0), b.negative, cfg_scale=5.0)
    assert counter.nfe() == 6


def test_euler_and_eq18_samplers_land_on_the_data_with_exact_models():
    x_star = torch.randn(2, 16, 1, 2, 2, generator=gen(1))
    noise = torch.randn(x_star.shape, generator=gen(2))
    model = PointMassVelocity(x_star)
    ctx = torch.zeros(2, 4, 32)
    for grid in (student_grid(2, 10.0), wan_sampling_grid(7, 5.0)):
        assert torch.allclose(teacher_euler_sample(model, noise, ctx, grid), x_star, atol=1e-5)
        assert torch.allclose(dmd2v_sample(model, noise, ctx, grid), x_star, atol=1e-5)
    # Stopping early at t' = 0.3: Eq. 18 keeps the inferred noise, x_{t'} = (1 − t')x* + t'·x_1 with x_1 = noise/0.999
    # (the noise is the state at t_M = 0.999), the value of the same straight path.
    partial = torch.tensor([0.3, 0.999], dtype=torch.float64)
    x1 = (noise - 0.001 * x_star) / 0.999
    assert torch.allclose(dmd2v_sample(model, noise, ctx, partial), 0.7 * x_star + 0.3 * x1, atol=1e-5)


class RecordingStudent:
    """Algorithm 1 bookkeeping: which times the backbone sees and which inner noise each outer step draws."""

    def __init__(self):
        self.config = StudentConfig(target="dtm")
        self.outer, self.inner_noise = [], []

    def backbone(self, x, t, context, cond=None):
        self.outer.append(float(t[0]))
        return SimpleNamespace(x_t=x, t=t)

    def flow_head(self, y, s, r, features):
        if float(s[0]) == 1.0:
            self.inner_noise.append(y.clone())
        return torch.zeros_like(y)


def test_tmd_sampler_draws_fresh_inner_noise_each_outer_step():
    student = RecordingStudent()
    outer = student_grid(3, 10.0)
    x = tmd_sample(student, torch.zeros(1, 2, 1, 1, 1), None, outer, student_grid(2, 10.0, t_max=1.0), gen(0))
    assert student.outer == [float(outer[3]), float(outer[2]), float(outer[1])]
    a, b, c = student.inner_noise
    assert not torch.equal(a, b) and not torch.equal(b, c)
    # head = 0, so ŷ = y_1 − 1·(y_1 − 0) = 0 and x stays put: the outer update only moves by ŷ (Eq. 4).
    assert torch.allclose(x, torch.zeros(1, 2, 1, 1, 1), atol=1e-6)
