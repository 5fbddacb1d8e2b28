"""Finite-difference JVP engine (App. A.2) against closed forms and torch.func.jvp."""

import pytest
import torch

from algo_helpers import gen, tiny_student, tiny_teacher, single_thread  # noqa: F401  (fixture)
from tmd_megatron.algorithms.bench_jvp import band_limit_inner_time, perturb_extras
from tmd_megatron.algorithms.jvp import exact_total_derivative, fd_steps, fd_total_derivative, total_derivative
from tmd_megatron.algorithms.sampling import BlockCounter
from tmd_megatron.algorithms.transition import average_velocity, interpolate

pytestmark = pytest.mark.usefixtures("single_thread")


def _t(*v):
    return torch.tensor(v, dtype=torch.float64)


def test_stencil_is_central_inside_and_one_sided_at_the_bounds():
    s = _t(0.5, 0.002, 0.998, 0.5, 0.5, 0.3)
    r = _t(0.1, 0.0, 0.5, 0.498, 0.5, 0.3)
    hp, hm = fd_steps(s, r, 5e-3)
    assert hp.tolist() == [5e-3, 5e-3, 0.0, 5e-3, 5e-3, 5e-3]  # backward only at the top of [0, 1]
    assert hm.tolist() == [5e-3, 0.0, 5e-3, 0.0, 5e-3, 5e-3]  # forward at 0 and when s − δ < r < s
    with pytest.raises(ValueError, match="positive"):
        fd_steps(s, r, 0.0)


def _analytic():
    """u(y, s) = sin(3s)·y² + s³·y, moved along y' = v: du/ds = 3cos(3s)y² + 3s²y + (2 sin(3s)y + s³)v."""
    y = torch.randn(2, 3, 1, 2, 2, generator=gen(0), dtype=torch.float64)
    v = torch.randn(y.shape, generator=gen(1), dtype=torch.float64)

    def u_fn(y_, s_):
        s5 = s_.view(-1, 1, 1, 1, 1)
        return torch.sin(3 * s5) * y_**2 + s5**3 * y_

    def exact(s_):
        s5 = s_.view(-1, 1, 1, 1, 1)
        return 3 * torch.cos(3 * s5) * y**2 + 3 * s5**2 * y + (2 * torch.sin(3 * s5) * y + s5**3) * v

    return u_fn, y, v, exact


def test_central_difference_is_second_order_and_one_sided_first_order():
    u_fn, y, v, exact = _analytic()
    s, r = _t(0.4, 0.7), _t(0.1, 0.2)
    errs = []
    for delta in (1e-2, 5e-3):
        d = total_derivative(u_fn, y, s, r, v, "fd", delta)
        errs.append(float((d - exact(s)).abs().max()))
    assert 3.5 < errs[0] / errs[1] < 4.5  # O(δ²)
    s_top = _t(0.999, 0.9995)  # no room above: backward difference, O(δ)
    e1, e2 = (float((total_derivative(u_fn, y, s_top, r, v, "fd", d) - exact(s_top)).abs().max()) for d in (2e-3, 1e-3))
    assert 1.7 < e1 / e2 < 2.3
    assert torch.allclose(exact_total_derivative(u_fn, y, s, v), exact(s), atol=1e-12)


def _flow_head_problem(dtype=torch.float64):
    teacher = tiny_teacher()
    student = tiny_student(teacher)
    perturb_extras(student)
    band_limit_inner_time(student, 0.05)  # smooth in s on the scale of δ, so truncation error is visible
    student = student.to(dtype)
    g = gen(2)
    x = torch.randn(1, 16, 2, 4, 4, generator=g, dtype=dtype)
    x1, y1 = torch.randn(x.shape, generator=g, dtype=dtype), torch.randn(x.shape, generator=g, dtype=dtype)
    t, s, r = _t(0.7), _t(0.45), _t(0.2)
    with torch.no_grad():
        feats = student.backbone(interpolate(x, x1, t), t, torch.randn(1, 8, 32, generator=g, dtype=dtype))
    y = x1 - x

    def u_fn(y_, s_):
        head = student.flow_head(y_, s_, r, feats)
        return average_velocity(head, y_s=y_, y1=y1, s=s_, x_t=feats.x_t, t=t)

    return student, u_fn, interpolate(y, y1, s), s, r, y1 - y


def test_fd_matches_torch_func_jvp_on_the_flow_head():
    student, u_fn, y_s, s, r, v = _flow_head_problem()
    exact = exact_total_derivative(u_fn, y_s, s, v)
    assert float(exact.norm()) > 1e-3  # the perturbed head really depends on y_s and s
    errs = [float((total_derivative(u_fn, y_s, s, r, v, "fd", d) - exact).norm() / exact.norm()) for d in (2e-3, 1e-3)]
    assert errs[1] < 3e-3
    assert 3.0 < errs[0] / errs[1] < 5.0  # central differences: O(δ²)


def test_fd_runs_only_the_flow_head_without_graph():
    student, u_fn, y_s, s, r, v = _flow_head_problem(torch.float32)
    student.requires_grad_(True)
    with BlockCounter(student.wan) as counter:
        d = total_derivative(u_fn, y_s, s, r, v, "fd", 5e-3)
    assert counter.calls == 2 * student.config.flow_head_blocks  # two flow-head passes, no backbone block
    assert d.grad_fn is None and not d.requires_grad
    h_plus, h_minus = fd_steps(s, r, 5e-3)
    assert torch.equal(d, fd_total_derivative(u_fn, y_s, s, v, h_plus, h_minus))
