"""Per-sample randomness makes a step independent of how its batch is split (the basis of layout equality)."""
import torch

from tmd_megatron.algorithms import tm_mf
from tmd_megatron.algorithms.common import Batch, SampleRNG, rand, randint, randn
from tmd_megatron.algorithms.config import TMMFConfig
from tmd_megatron.models.student import DecoupledStudent, StudentConfig
from tmd_megatron.models.wan import WanConfig, WanModel
from tmd_megatron.training.rng import sample_seed, step_rng


def test_draws_split_like_the_batch():
    full = step_rng(0, 3, "outer", [5, 9, 2, 7])
    a, b = step_rng(0, 3, "outer", [5, 9]), step_rng(0, 3, "outer", [2, 7])
    for draw in (lambda g, n: randn((n, 2, 3), g), lambda g, n: rand(n, g), lambda g, n: randint(0, 10, n, g)):
        whole = draw(full, 4)
        assert torch.equal(whole, torch.cat([draw(a, 2), draw(b, 2)]))
    assert sample_seed(0, 3, "outer", 5) != sample_seed(0, 3, "inner", 5) != sample_seed(0, 4, "outer", 5)


def test_batch_generator_still_works_and_sizes_are_checked():
    g = torch.Generator().manual_seed(0)
    assert randn((2, 3), g).shape == (2, 3)
    try:
        randn((3, 2), SampleRNG([1, 2]))
    except ValueError as err:
        assert "3 samples from a SampleRNG of 2" in str(err)
    else:
        raise AssertionError("size mismatch not refused")


def test_tm_mf_loss_of_a_batch_is_the_mean_of_its_halves():
    torch.manual_seed(0)
    teacher = WanModel(WanConfig.preset("tiny"))
    student = DecoupledStudent.from_teacher(teacher, StudentConfig(flow_head_blocks=1))
    x = torch.randn(4, 16, 1, 4, 4)
    ctx = torch.randn(4, 6, 32)
    neg = torch.randn(5, 32)
    cfg = TMMFConfig(outer_steps=2, inner_steps=2)
    ids = [10, 11, 12, 13]
    whole, _ = tm_mf.tm_mf_loss(student, Batch(x, ctx, neg), cfg, step_rng(1, 0, "tm_mf", ids))
    halves = [
        tm_mf.tm_mf_loss(student, Batch(x[i : i + 2], ctx[i : i + 2], neg), cfg, step_rng(1, 0, "tm_mf", ids[i : i + 2]))[0]
        for i in (0, 2)
    ]
    assert torch.allclose(whole, (halves[0] + halves[1]) / 2, rtol=1e-5, atol=1e-7)
