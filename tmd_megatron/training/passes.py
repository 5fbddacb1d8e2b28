"""Pipelined passes of one model over this rank's microbatches: the building blocks of the step programs.

A pass runs a model (its stage on this rank) over all microbatches with the parallel engine: forward only,
or forward and backward from output gradients on the last stage and/or stage-local losses. With one stage
it is a plain loop, so every layout runs the same program. `WanStage` (tmd_megatron.parallel) runs a Wan
model; `StudentStage` below runs the decoupled student, whose first stage also computes the flow head's
time conditioning for every (s, r) the last stage will need, so the time embeddings live with the other
embeddings and only activations cross stages.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from tmd_megatron.algorithms.timesteps import wan_units
from tmd_megatron.models.student import BackboneFeatures, DecoupledStudent
from tmd_megatron.parallel import Topology, WanStage, run_pipeline, transfer
from tmd_megatron.parallel.pipeline import TensorSpec


class StudentStage:
    """Stage function of a (pipeline-pruned) DecoupledStudent.

    First-stage inputs per microbatch: (x_t, t, context, s_pts [b, K], r_pts [b, K]) with times in [0, 1].
    Between stages: (tokens, text, e_t, e0_t, e_pts [b, K, D], e0_pts [b, K, 6, D]).
    The last stage finishes the backbone and calls head_fn(mb, features, e_pts, e0_pts) -> (outputs, loss).
    """

    def __init__(self, student: DecoupledStudent, latent_shape: Sequence[int], num_points: int,
                 head_fn: Callable, x_t_of: Callable, t_of: Callable):
        self.student, self.wan = student, student.wan
        self.span = self.wan.stage
        cfg = self.wan.config
        self.batch = latent_shape[0]
        self.grid = tuple(n // p for n, p in zip(latent_shape[2:], cfg.patch_size))
        self.k = num_points
        self.head_fn, self.x_t_of, self.t_of = head_fn, x_t_of, t_of
        self._geometry = None

    def boundary(self, dtype=torch.float32, context_dtype=None) -> list[TensorSpec]:
        cfg, b, k = self.wan.config, self.batch, self.k
        local = self.wan.layout.local_len(self.grid[0] * self.grid[1] * self.grid[2])
        cond = torch.promote_types(dtype, torch.float32)
        return [
            TensorSpec((b, local, cfg.dim), dtype),
            TensorSpec((b, cfg.text_len, cfg.dim), context_dtype or dtype),
            TensorSpec((b, cfg.dim), cond),
            TensorSpec((b, 6, cfg.dim), cond),
            TensorSpec((b, k, cfg.dim), cond),
            TensorSpec((b, k, 6, cfg.dim), cond),
        ]

    def geometry(self, device):
        if self._geometry is None:
            self._geometry = self.wan.geometry(self.grid, device)
        return self._geometry

    def __call__(self, mb: int, inputs: tuple):
        wan, span, student = self.wan, self.span, self.student
        if span.first:
            x_t, t, ctx, s_pts, r_pts = inputs
            tokens, geom = wan.embed_tokens(x_t)
            e_t, e0_t = wan.embed_time(wan_units(t))
            context = wan.embed_text(ctx)
            pts = [student.flow_head_time(s_pts[:, i], r_pts[:, i], e_t) for i in range(self.k)]
            e_pts = torch.stack([e for e, _ in pts], 1)
            e0_pts = torch.stack([e0 for _, e0 in pts], 1)
        else:
            tokens, context, e_t, e0_t, e_pts, e0_pts = inputs
            geom = self.geometry(tokens.device)
        end = min(span.end, student.split)
        if span.start < end:
            tokens, _ = wan.run_blocks(tokens, context, e0_t, geom, span.start, end)
        if not span.last:
            return (tokens, context, e_t, e0_t, e_pts, e0_pts), None
        features = BackboneFeatures(m=tokens, context=context, geom=geom, e_t=e_t, x_t=self.x_t_of(mb), t=self.t_of(mb))
        return self.head_fn(mb, features, e_pts, e0_pts)


class Passes:
    """Runs passes of the roles over this rank's microbatches and moves tensors between stages."""

    def __init__(self, topo: Topology, microbatches: int, schedule: str, autocast_dtype: torch.dtype | None):
        self.topo, self.m, self.schedule = topo, microbatches, schedule
        self.autocast_dtype = autocast_dtype
        self.first, self.last = topo.is_first_stage, topo.is_last_stage

    def _autocast(self):
        dev = self.topo.device.type
        return torch.autocast(dev, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def run(self, stage, inputs, *, forward_only=False, output_grads=None):
        if self.first:  # draws are made on the CPU (per-sample generators); the model runs on topo.device
            inputs = [tuple(t.to(self.topo.device) if torch.is_tensor(t) else t for t in mb) for mb in inputs]
        with self._autocast():
            return run_pipeline(
                stage, self.topo.pp, self.m, boundary=stage.boundary(torch.float32, self.autocast_dtype),
                inputs=inputs if self.first else None, output_grads=output_grads, schedule=self.schedule,
                forward_only=forward_only, device=self.topo.device,
            )

    def wan(self, model, inputs, latent_shape, *, capture=(), hidden_loss=None, forward_only=False,
            output_grads=None, conditioning_grads=True):
        """inputs: per microbatch (x, t ∈ [0, 1], context); the last stage gets the velocity per microbatch."""
        stage = WanStage(model, latent_shape, capture, hidden_loss, conditioning_grads)
        wan_inputs = [(x, wan_units(t), c) for x, t, c in inputs] if self.first else []
        return self.run(stage, wan_inputs, forward_only=forward_only, output_grads=output_grads)

    def student(self, student, inputs, latent_shape, num_points, head_fn, x_t_of, t_of, **kw):
        stage = StudentStage(student, latent_shape, num_points, head_fn, x_t_of, t_of)
        return self.run(stage, inputs, **kw)

    def last_to_first(self, tensors: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """Per-microbatch tensors produced on the last stage, delivered to the first (shapes from `tensors`)."""
        return transfer(tensors, self.topo.pp, self.topo.pp.size - 1, 0)

    def first_to_last(self, tensors: list[torch.Tensor]) -> list[torch.Tensor] | None:
        return transfer(tensors, self.topo.pp, 0, self.topo.pp.size - 1)
