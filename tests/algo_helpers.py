"""Tiny models and batches for the algorithm tests (CPU-sized, seeded)."""
from __future__ import annotations

import pytest
import torch

from tmd_megatron.algorithms import Batch
from tmd_megatron.models.student import DecoupledStudent, StudentConfig
from tmd_megatron.models.wan import WanConfig, WanModel

TINY = WanConfig.preset("tiny")  # dim 64, 4 blocks, text 32-d


def tiny_teacher(seed: int = 0) -> WanModel:
    torch.manual_seed(seed)
    teacher = WanModel(TINY)
    teacher.requires_grad_(False)
    return teacher


def tiny_student(teacher: WanModel, **config) -> DecoupledStudent:
    return DecoupledStudent.from_teacher(teacher, StudentConfig(**{"flow_head_blocks": 2, **config}))


def copy_of(model: WanModel, trainable: bool = True) -> WanModel:
    clone = WanModel(model.config)
    clone.load_state_dict(model.state_dict())
    clone.requires_grad_(trainable)
    return clone


def tiny_batch(batch: int = 2, latent=(2, 4, 4), seed: int = 1) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, TINY.in_dim, *latent, generator=g)
    ctx = torch.randn(batch, 8, TINY.text_dim, generator=g)
    negative = torch.randn(5, TINY.text_dim, generator=g)  # a fixed random "negative prompt" embedding
    return Batch(x, ctx, negative)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def single_thread():
    """Tiny-tensor tests are latency bound: one intra-op thread avoids OpenMP hand-offs that cost 100x on a
    loaded 2-core machine (measured: 2.6 ms vs 220 ms per tiny forward). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
