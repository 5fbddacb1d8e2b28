"""Time shift, student grids and time sampling (paper Sec. 3.2, App. A.2) against closed forms and brute force."""
import math

import pytest
import torch

from algo_helpers import gen, single_thread  # noqa: F401  (fixture)
from tmd_megatron.algorithms.timesteps import (
    grid_floor,
    is_student_step,
    sample_grid_times,
    sample_mf_times,
    sample_shifted,
    shift_time,
    student_grid,
    unshift_time,
    wan_sampling_grid,
    wan_units,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def test_shift_closed_form_and_inverse():
    t = torch.tensor([0.0, 0.5, 0.25, 1.0], dtype=torch.float64)
    # γt/((γ−1)t+1) by hand for γ = 3: 0, 1.5/2, 0.75/1.5, 1
    assert torch.allclose(shift_time(t, 3.0), torch.tensor([0.0, 0.75, 0.5, 1.0], dtype=torch.float64))
    assert torch.equal(shift_time(t, 1.0), t)
    assert torch.allclose(unshift_time(shift_time(t, 10.0), 10.0), t)
    with pytest.raises(ValueError, match="positive"):
        shift_time(t, 0.0)


def test_student_grids_by_hand():
    assert torch.allclose(student_grid(1, 10.0), torch.tensor([0.0, 0.999], dtype=torch.float64))
    # M = 2, γ = 10: t_1 = shift(1/2) = 5/5.5
    assert torch.allclose(student_grid(2, 10.0), torch.tensor([0.0, 10 / 11, 0.999], dtype=torch.float64))
    g4 = student_grid(4, 5.0)
    expect = [0.0] + [5 * u / (4 * u + 1) for u in (0.25, 0.5, 0.75)] + [0.999]
    assert torch.allclose(g4, torch.tensor(expect, dtype=torch.float64))
    assert student_grid(3, 10.0, t_max=1.0)[-1] == 1.0
    with pytest.raises(ValueError, match="at least one step"):
        student_grid(0, 10.0)


def test_wan_grid_reproduces_the_original_sampler_timesteps():
    # WAN_SPEC §4 (original FlowUniPC, shift 5, 50 steps): 999, 995, 991, 987, 982, 978, ... 302, 241, 172, 92
    sigmas = wan_sampling_grid(50, 5.0).flip(0)[:-1]
    steps = [int(v) for v in wan_units(sigmas)]
    assert steps[:6] == [999, 995, 991, 987, 982, 978] and steps[-4:] == [302, 241, 172, 92]


def _shifted_cdf(x, gamma, lo, hi):
    u = lambda v: v / (gamma - (gamma - 1) * v)  # noqa: E731  (the shifted law's CDF is shift⁻¹)
    return (u(x) - u(lo)) / (u(hi) - u(lo))


def test_sample_shifted_is_the_truncated_shifted_law():
    n, gamma, lo, hi = 40_000, 5.0, 0.001, 0.999
    t = sample_shifted(n, gamma, gen(3), lo, hi)
    assert t.dtype == torch.float64 and float(t.min()) >= lo and float(t.max()) <= hi
    # Independent reference: rejection sampling of shift(U), compared through the empirical CDF (KS distance).
    ref = shift_time(torch.rand(3 * n, generator=gen(4), dtype=torch.float64), gamma)
    ref = ref[(ref >= lo) & (ref <= hi)]
    grid = torch.linspace(lo, hi, 200, dtype=torch.float64)
    ks = max(abs(float((t <= x).double().mean()) - float((ref <= x).double().mean())) for x in grid)
    assert ks < 0.015
    analytic = max(abs(float((t <= x).double().mean()) - _shifted_cdf(float(x), gamma, lo, hi)) for x in grid)
    assert analytic < 0.015


def test_grid_floor_matches_brute_force():
    grid = student_grid(4, 10.0)
    s = torch.rand(500, generator=gen(5), dtype=torch.float64) * 0.999
    s = torch.cat([s, grid])  # exact grid points map to themselves
    brute = torch.tensor([max(float(g) for g in grid if g <= v) for v in s], dtype=torch.float64)
    assert torch.equal(grid_floor(s, grid), brute)


def test_mf_times_discrete_r_and_flow_matching_fraction():
    grid = student_grid(4, 10.0)
    s, r = sample_mf_times(20_000, grid, gen(6), s_shift=3.0, r_equals_s=0.75)
    same = r == s
    assert abs(float(same.double().mean()) - 0.75) < 0.015
    assert torch.all(r <= s)
    floor = grid_floor(s, grid)
    assert torch.equal(r[~same], floor[~same])  # the others sit on the γ=10 grid at or below s
    assert float(s.min()) >= 0.001 and float(s.max()) <= 0.999


def test_outer_times_are_grid_points_never_zero():
    grid = student_grid(3, 10.0)
    t = sample_grid_times(3000, grid, gen(7))
    assert set(t.tolist()) == set(grid[1:].tolist())


def test_student_updates_every_fifth_iteration():
    assert [i for i in range(12) if is_student_step(i)] == [0, 5, 10]
    assert math.isclose(float(wan_units(torch.tensor(0.5))), 500.0)
