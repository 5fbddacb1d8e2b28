"""Pipelined passes of one model over this rank's microbatches: the building blocks of the step programs.

A pass runs a model (its stage on this rank) over all microbatches with the parallel engine: forward only,
or forward and backward from output gradients on the last stage and/or stage-local losses. With one stage
it is a plain loop, so every layout runs the same program. `WanStage` (tmd_megatron.parallel) runs a Wan
model (`ExpertStage` a two-expert one); `StudentStage` below runs the decoupled student, whose first stage also
computes the flow head's time conditioning for every (s, r) the last stage will need, so the time embeddings live
with the other embeddings and only activations cross stages. Image conditioning (one ImageCondition per
microbatch, every rank holds them) turns x_t into the model's input on the first stage and replaces the
prediction on a TI2V conditioning frame on the last (`ConditionedStage`), so input gradients are those of x_t.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from tmd_megatron.algorithms.timesteps import wan_units
from tmd_megatron.models.student import BackboneFeatures, DecoupledStudent
from tmd_megatron.models.wan import WanExperts
from tmd_megatron.models.wan.conditioning import model_call_inputs
from tmd_megatron.parallel import Topology, WanStage, run_pipeline, transfer
from tmd_megatron.parallel.pipeline import TensorSpec
from tmd_megatron.parallel.stages import ExpertStage


def token_timesteps(conds) -> bool:
    return bool(conds) and conds[0] is not None and conds[0].mode == "first_frame"


class ConditionedStage:
    """A Wan stage function taking (x_t, Wan timesteps [B], context) on the first stage whatever the conditioning:
    the microbatch's ImageCondition builds the model's input (and per-token timesteps, CLIP tokens) there, and
    replaces the prediction on a TI2V conditioning frame on the last stage."""

    def __init__(self, stage, conds, cfg, span):
        self.stage, self.conds, self.cfg, self.span = stage, conds, cfg, span

    def boundary(self, *args, **kwargs):
        return self.stage.boundary(*args, **kwargs)

    def __call__(self, mb: int, inputs: tuple):
        cond = self.conds[mb]
        if self.span.first:
            x_t, t, ctx = inputs
            x_in, timestep, image = model_call_inputs(self.cfg, x_t, t, cond)
            inputs = (x_in, timestep, ctx) + ((image,) if image is not None else ())
        outputs, loss = self.stage(mb, inputs)
        if self.span.last and cond is not None:
            outputs = (cond.output(outputs[0]),)
        return outputs, loss


class StudentStage:
    """Stage function of a (pipeline-pruned) DecoupledStudent.

    First-stage inputs per microbatch: (x_t, t, context, s_pts [b, K], r_pts [b, K]) with times in [0, 1].
    Between stages: (tokens, context, e_t, e0_t, e_pts [b, K, D], e0_pts [b, K, 6, D]) (per token of this rank's
    shard after b for per-token timesteps). conds: the microbatches' image conditioning (or None).
    The last stage finishes the backbone and calls head_fn(mb, features, e_pts, e0_pts) -> (outputs, loss).
    """

    def __init__(self, student: DecoupledStudent, latent_shape: Sequence[int], num_points: int,
                 head_fn: Callable, x_t_of: Callable, t_of: Callable, conds=None):
        self.conds = conds
        self.per_token = token_timesteps(conds)
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
        tok = (local,) if self.per_token else ()
        return [
            TensorSpec((b, local, cfg.dim), dtype),
            TensorSpec((b, cfg.context_len, cfg.dim), context_dtype or dtype),
            TensorSpec((b, *tok, cfg.dim), cond),
            TensorSpec((b, *tok, 6, cfg.dim), cond),
            TensorSpec((b, k, *tok, cfg.dim), cond),
            TensorSpec((b, k, *tok, 6, cfg.dim), cond),
        ]

    def geometry(self, device):
        if self._geometry is None:
            self._geometry = self.wan.geometry(self.grid, device)
        return self._geometry

    def __call__(self, mb: int, inputs: tuple):
        wan, span, student = self.wan, self.span, self.student
        cond = self.conds[mb] if self.conds else None
        if span.first:
            x_t, t, ctx, s_pts, r_pts = inputs
            x_in, timestep, image = model_call_inputs(wan.config, x_t, wan_units(t), cond)
            tokens, geom = wan.embed_tokens(x_in)
            e_t, e0_t = wan.embed_time(timestep)
            context = wan.embed_context(ctx, image)
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
        features = BackboneFeatures(m=tokens, context=context, geom=geom, e_t=e_t, x_t=self.x_t_of(mb), t=self.t_of(mb),
                                    cond=cond)
        return self.head_fn(mb, features, e_pts, e0_pts)


@dataclass
class Part:
    """One model's pass over the m microbatches, to run alone or merged with others (`Passes.run_parts`)."""

    stage: object  # stage function (mb, inputs) -> (outputs, loss), with .boundary(dtype, context_dtype)
    inputs: list  # first stage: per microbatch
    forward_only: bool = False
    output_grads: object = None  # last stage: per microbatch, or a callable (mb, outputs)


class _Merged:
    """Several parts as one pipelined pass: microbatch j of part k runs as k's microbatch j, its forward-only
    parts first (they stream through; the others follow the schedule), so the pipeline fills and drains once."""

    def __init__(self, parts: list[Part], m: int, dtypes):
        self.parts, self.m = parts, m
        self.specs = [p.stage.boundary(*dtypes) for p in parts]

    def locate(self, mb: int) -> tuple[int, int]:
        return mb // self.m, mb % self.m

    def boundary(self, mb: int):
        return self.specs[mb // self.m]

    def __call__(self, mb: int, inputs: tuple):
        k, j = self.locate(mb)
        return self.parts[k].stage(j, inputs)

    def output_grads(self, mb: int, outputs):
        k, j = self.locate(mb)
        grads = self.parts[k].output_grads
        if grads is None:
            return None
        return grads(j, outputs) if callable(grads) else grads[j]


class PartResult:
    """A part's share of a merged pass: outputs on the last stage, input gradients on the first, local losses."""

    def __init__(self, res, k: int, m: int):
        sl = slice(k * m, (k + 1) * m)
        self.outputs = res.outputs[sl] if res.outputs else []
        self.input_grads = res.input_grads[sl]
        self.losses = res.losses[sl]
        self.trace = [t for t in res.trace if sl.start <= t[1] < sl.stop]


class Frozen:
    """A stage function during whose forward `module` takes no gradient (the generator's GAN loss reads the
    discriminator, which that loss must not train); autograd records requires_grad at forward time, so a later
    backward of the microbatch leaves the module alone too."""

    def __init__(self, stage, module):
        self.stage, self.module = stage, module

    def boundary(self, *args, **kwargs):
        return self.stage.boundary(*args, **kwargs)

    def __call__(self, mb: int, inputs: tuple):
        if self.module is None:
            return self.stage(mb, inputs)
        self.module.requires_grad_(False)
        try:
            return self.stage(mb, inputs)
        finally:
            self.module.requires_grad_(True)


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

    def run_parts(self, parts: list[Part]) -> list[PartResult]:
        """Parts of the same step that do not depend on each other, as one pipelined pass (forward-only parts
        first): one pipeline fill and drain instead of one per part. Same results as running them one by one."""
        order = sorted(range(len(parts)), key=lambda k: not parts[k].forward_only)
        ordered = [parts[k] for k in order]
        merged = _Merged(ordered, self.m, (torch.float32, self.autocast_dtype))
        inputs = [mb for p in ordered for mb in p.inputs] if self.first else None
        if self.first:  # draws are made on the CPU (per-sample generators); the model runs on topo.device
            inputs = [tuple(t.to(self.topo.device) if torch.is_tensor(t) else t for t in mb) for mb in inputs]
        leading = sum(p.forward_only for p in ordered) * self.m
        with self._autocast():
            res = run_pipeline(merged, self.topo.pp, self.m * len(ordered), boundary=merged.boundary, inputs=inputs,
                               output_grads=merged.output_grads, schedule=self.schedule,
                               forward_only=leading, device=self.topo.device)
        out = [None] * len(parts)
        for pos, k in enumerate(order):
            out[k] = PartResult(res, pos, self.m)
        return out

    def wan(self, model, inputs, latent_shape, **kw):
        """A Wan model's pass on its own (`wan_part`)."""
        part = self.wan_part(model, inputs, latent_shape, **kw)
        return self.run(part.stage, part.inputs, forward_only=part.forward_only, output_grads=part.output_grads)

    def wan_part(self, model, inputs, latent_shape, *, capture=(), hidden_loss=None, forward_only=False,
                 output_grads=None, conditioning_grads=True, conds=None, frozen=None) -> Part:
        """inputs: per microbatch (x_t, t ∈ [0, 1], context); conds: per microbatch image conditioning (or None).
        The last stage gets the velocity per microbatch; a two-expert model runs each sample on its expert.
        frozen: a module that must not take gradients from this pass (`Frozen`)."""
        kw = dict(conditioning_grads=conditioning_grads, token_timesteps=token_timesteps(conds))
        if isinstance(model, WanExperts):
            high = [model.route(wan_units(t)) for _, t, _ in inputs]  # the draws are known on every stage
            stage = ExpertStage(model, latent_shape, high, capture, hidden_loss, **kw)
            span = model.high.stage
        else:
            stage, span = WanStage(model, latent_shape, capture, hidden_loss, **kw), model.stage
        if conds is not None and any(c is not None for c in conds):
            stage = ConditionedStage(stage, conds, model.config, span)
        if frozen is not None:
            stage = Frozen(stage, frozen)
        wan_inputs = [(x, wan_units(t), c) for x, t, c in inputs] if self.first else []
        return Part(stage, wan_inputs, forward_only, output_grads)

    def student(self, student, inputs, latent_shape, num_points, head_fn, x_t_of, t_of, conds=None, **kw):
        stage = StudentStage(student, latent_shape, num_points, head_fn, x_t_of, t_of, conds)
        return self.run(stage, inputs, **kw)

    def last_to_first(self, tensors: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """Per-microbatch tensors produced on the last stage, delivered to the first (shapes from `tensors`)."""
        return transfer(tensors, self.topo.pp, self.topo.pp.size - 1, 0)

    def first_to_last(self, tensors: list[torch.Tensor]) -> list[torch.Tensor] | None:
        return transfer(tensors, self.topo.pp, 0, self.topo.pp.size - 1)
