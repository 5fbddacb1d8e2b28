"""Outer/inner flows (paper Eq. 1, 3–5, 13–15, 17, 18, App. B.4) on exact paths worked out by hand."""
from types import SimpleNamespace

import pytest
import torch

from algo_helpers import gen, single_thread  # noqa: F401  (fixture)
from tmd_megatron.algorithms.timesteps import student_grid
from tmd_megatron.algorithms.transition import (
    average_velocity,
    conditional_velocity,
    ddim_step,
    inner_flow,
    inner_target,
    interpolate,
    outer_step,
    rollout_output,
    x0_from_velocity,
)
from tmd_megatron.models.student import StudentConfig

pytestmark = pytest.mark.usefixtures("single_thread")


def _pair(seed=0, shape=(3, 4, 2, 2, 2)):
    g = gen(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)


def _t(*vals):
    return torch.tensor(vals, dtype=torch.float64)


def test_eq1_eq17_eq18_on_the_exact_path():
    x, x1 = _pair()
    t, t_next = _t(0.9, 0.5, 0.3), _t(0.4, 0.0, 0.1)
    x_t = interpolate(x, x1, t)
    assert torch.allclose(x_t[1], 0.5 * x[1] + 0.5 * x1[1])
    v = conditional_velocity(x, x1)  # the exact velocity of a single path
    assert torch.allclose(x0_from_velocity(x_t, t, v), x)  # Eq. 17 recovers the data
    # Eq. 18 with the true data prediction lands exactly on the same path at t'.
    assert torch.allclose(ddim_step(x_t, t, t_next, x), interpolate(x, x1, t_next))
    # DTM outer step (Eq. 4) with the true y = x_1 − x does the same.
    assert torch.allclose(outer_step(x_t, t, t_next, inner_target(x, x1, "dtm"), "dtm"), interpolate(x, x1, t_next))
    assert torch.allclose(outer_step(x_t, t, t_next, x, "x"), interpolate(x, x1, t_next))


def test_eq13_sign_moves_along_the_inner_path():
    y, y1 = _pair(1)
    s, r = _t(0.8, 0.6, 0.999), _t(0.3, 0.0, 0.5)
    u = y1 - y  # average velocity of the straight inner path (Eq. 5)
    y_s = interpolate(y, y1, s)
    from tmd_megatron.algorithms.transition import flow_map_step

    assert torch.allclose(flow_map_step(y_s, s, r, u), interpolate(y, y1, r))
    assert not torch.allclose(flow_map_step(y_s, s, r, u, sign=+1), interpolate(y, y1, r))  # Eq. 13 as printed


def test_eq14_one_step_from_one_to_zero_returns_head_and_b4_matches():
    y, y1 = _pair(2)
    head = torch.randn(y.shape, generator=gen(3), dtype=torch.float64)
    one, zero = _t(1, 1, 1), _t(0, 0, 0)
    from tmd_megatron.algorithms.transition import flow_map_step

    u = average_velocity(head, y_s=y1, y1=y1, s=one, x_t=None, t=None, target="dtm")
    assert torch.allclose(flow_map_step(y1, one, zero, u), head)
    # App. B.4 (y = x): with head = the true outer velocity, u is the conditional inner velocity y_1 − x.
    x, x1 = _pair(4)
    t, s = _t(0.7, 0.2, 0.9), _t(0.5, 0.9, 0.1)
    x_t = interpolate(x, x1, t)
    y_s = interpolate(x, y1, s)
    u_x = average_velocity(x1 - x, y_s=y_s, y1=None, s=s, x_t=x_t, t=t, target="x")
    assert torch.allclose(u_x, y1 - x)


def test_eq15_forms_agree_only_at_t_one():
    x, x1 = _pair(5)
    t = _t(1.0, 0.6, 0.3)
    x_t = interpolate(x, x1, t)
    y_hat = (x1 - x) + 0.1 * torch.randn(x.shape, generator=gen(6), dtype=torch.float64)  # an imperfect ŷ
    outer = rollout_output(x_t, t, y_hat, "dtm", "outer")
    printed = rollout_output(x_t, t, y_hat, "dtm", "eq15", x1=x1)
    assert torch.allclose(outer, x_t - t.view(-1, 1, 1, 1, 1) * y_hat)
    assert torch.allclose(outer[0], printed[0]) and not torch.allclose(outer[1:], printed[1:])
    with pytest.raises(ValueError, match="needs the noise"):
        rollout_output(x_t, t, y_hat, "dtm", "eq15")


class LinearPathStudent:
    """A 'student' whose head is the exact y: the inner flow must reproduce y exactly (s_N = 1)."""

    def __init__(self, y, target="dtm"):
        self.config = StudentConfig(target=target)
        self.y, self.calls = y, []

    def flow_head(self, y_s, s, r, features):
        self.calls.append((float(s[0]), float(r[0])))
        if self.config.target == "dtm":
            return self.y
        return (features.x_t - self.y) / features.t.view(-1, 1, 1, 1, 1)  # the velocity whose x-pred is y


def test_inner_flow_walks_the_grid_top_down_and_is_exact():
    y, y1 = _pair(7)
    grid = student_grid(4, 10.0, t_max=1.0)
    student = LinearPathStudent(y)
    out = inner_flow(student, SimpleNamespace(x_t=None, t=None), y1, grid)
    assert torch.allclose(out, y)
    steps = [(float(grid[j]), float(grid[j - 1])) for j in range(4, 0, -1)]
    assert student.calls == steps
    # x target: exact even with the default s_N = 0.999 (the last step to r = 0 returns x̂ itself).
    x, x1 = _pair(8)
    t = _t(0.7, 0.7, 0.7)
    feats = SimpleNamespace(x_t=interpolate(x, x1, t), t=t)
    out_x = inner_flow(LinearPathStudent(x, "x"), feats, y1, student_grid(3, 10.0))
    assert torch.allclose(out_x, x)


class ScaledStudent:
    """head(y) = w·y with a learnable scalar w: the rollout's gradient in w depends on how many steps carry it."""

    def __init__(self, w):
        self.config = StudentConfig()
        self.w = w

    def flow_head(self, y_s, s, r, features):
        return self.w * y_s


def test_rollout_grad_last_differentiates_only_the_last_inner_step():
    """grad_steps="last" equals a hand-made rollout whose first N − 1 steps use a detached w (no graph), and differs
    from the full rollout's gradient (Sec. 3.2: through all N steps)."""
    from tmd_megatron.algorithms.transition import flow_map_step

    _, y1 = _pair(9)
    grid = student_grid(3, 10.0)
    feats = SimpleNamespace(x_t=None, t=None)
    grads = {}
    for mode in ("all", "last"):
        w = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
        inner_flow(ScaledStudent(w), feats, y1, grid, grad_steps=mode).square().sum().backward()
        grads[mode] = w.grad
    w = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    y, b = y1, y1.shape[0]
    for k, j in enumerate(range(3, 0, -1)):
        s, r = grid[j].expand(b), grid[j - 1].expand(b)
        wk = w if k == 2 else w.detach()
        y = flow_map_step(y, s, r, average_velocity(wk * y, y_s=y, y1=y1, s=s, x_t=None, t=None, target="dtm"))
    y.square().sum().backward()
    assert torch.allclose(grads["last"], w.grad)
    assert not torch.allclose(grads["last"], grads["all"], rtol=1e-3)
    with pytest.raises(ValueError, match="grad_steps"):
        inner_flow(ScaledStudent(w), feats, y1, grid, grad_steps="none")
