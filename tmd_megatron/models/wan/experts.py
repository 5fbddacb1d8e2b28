"""Wan2.2 A14B: two Wan DiTs of one config, switched by the timestep (docs/wan_family.md).

The high-noise expert runs where t >= boundary, the low-noise expert below (Wan2.2 wan/image2video.py
`_prepare_model_for_timestep`: `t.item() >= boundary * num_train_timesteps` picks the high noise model;
diffusers' WanPipeline compares with `boundary_ratio * num_train_timesteps` the same way, `transformer` being
the high-noise expert and `transformer_2` the low-noise one). Routing is per sample, so a batch may mix both (then
both experts run on it and each sample keeps its own expert's rows: twice the compute for such a batch).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from torch import nn

from . import checkpoint, saving
from .model import WanModel


def high_noise(timestep: torch.Tensor, boundary: float) -> torch.Tensor:
    """[B] bool: which samples the high-noise expert takes. timestep in Wan units, [B] or per token [B, L]
    (the largest token timestep decides; Wan2.2's per-token timesteps belong to the dense TI2V model)."""
    t = timestep if timestep.ndim == 1 else timestep.amax(dim=1)
    return t >= boundary * 1000.0


class WanExperts(nn.Module):
    """`high` and `low` WanModels with one config; forward routes each sample to its expert.

    Parameter names: `high.<Wan key>`, `low.<Wan key>`. `boundary` is t in [0, 1] (0.875 T2V, 0.9 I2V).
    """

    def __init__(self, high: WanModel, low: WanModel, boundary: float):
        super().__init__()
        if high.config != low.config:
            raise ValueError(f"the two experts differ in config: {high.config} vs {low.config}")
        if not 0.0 < boundary < 1.0:
            raise ValueError(f"expert boundary {boundary} must lie in (0, 1)")
        self.high, self.low, self.boundary = high, low, float(boundary)

    @property
    def config(self):
        return self.high.config

    @property
    def experts(self) -> tuple[WanModel, WanModel]:
        return self.high, self.low

    def route(self, timestep: torch.Tensor) -> torch.Tensor:
        return high_noise(timestep, self.boundary)

    def per_expert(self, timestep, fn, *args):
        """fn(expert, *args) with each sample on its expert: a homogeneous batch calls fn once, a mixed one calls
        it with both experts on the whole batch and keeps each sample's rows of the result (a tensor, or
        (tensor, {k: tensor})); the pipelined ExpertStage does the same, so both paths compute alike."""
        high = self.route(timestep)
        if bool(high.all()) or not bool(high.any()):
            return fn(self.high if bool(high.all()) else self.low, *args)
        return _select(high, fn(self.high, *args), fn(self.low, *args))

    def forward(self, x, timestep, context, image_context=None, return_hidden: tuple[int, ...] = ()):
        """WanModel.forward with each sample on its expert (a homogeneous batch runs one expert once)."""
        return self.per_expert(timestep, lambda m, *a: m(*a, return_hidden=return_hidden), x, timestep, context,
                               image_context)

    # The trainer's pieces read geometry from either expert: both have one config and one layout.
    def geometry(self, grid, device):
        return self.high.geometry(grid, device)

    def tokens_to_grid(self, tokens, geom):
        return self.high.tokens_to_grid(tokens, geom)

    @property
    def layout(self):
        return self.high.layout

    @classmethod
    def from_pretrained(cls, path, boundary: float | None = None, **kwargs) -> "WanExperts":
        """Both experts of an A14B directory (original `high_noise_model/`+`low_noise_model/`, or a diffusers
        pipeline's `transformer/`+`transformer_2/`). boundary: default from the checkpoint (diffusers'
        boundary_ratio) or Wan2.2's value for the task."""
        high = WanModel.from_pretrained(path, expert="high", **kwargs)
        low = WanModel.from_pretrained(path, expert="low", **kwargs)
        if boundary is None:
            boundary = checkpoint.expert_boundary(path, high.config.model_type)
        return cls(high, low, boundary)

    def save_pretrained(self, path, format: str = "original", **kwargs) -> None:
        """Both experts in the release layout of `format` (the boundary in model_index.json for diffusers)."""
        final = Path(path)
        saving.refuse_unless_replaceable(final)
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        names = checkpoint.ORIGINAL_EXPERT_DIRS if format == "original" else checkpoint.DIFFUSERS_EXPERT_DIRS
        for name, expert in (("high", self.high), ("low", self.low)):
            expert.save_pretrained(tmp / names[name], format=format, **kwargs)
        if format == "diffusers":
            saving.write_json_atomic(tmp / "model_index.json", {"boundary_ratio": self.boundary})
        saving.make_group_readable(tmp)
        saving.atomic_replace_dir(tmp, final)


def _select(high: torch.Tensor, a, b):
    """Rows of a where high, else of b: for tensors [B, ...] and (tensor, {k: tensor}) pairs."""
    if isinstance(a, tuple):
        return _select(high, a[0], b[0]), {k: _select(high, a[1][k], b[1][k]) for k in a[1]}
    return torch.where(high.to(a.device).view(-1, *[1] * (a.ndim - 1)), a, b)
