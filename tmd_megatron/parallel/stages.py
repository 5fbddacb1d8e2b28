"""Pipeline stages of a Wan DiT: balanced block partition and the stage functions the engine runs.

Between stages travels (tokens, context, e, e0): the residual-stream shard plus the embedded conditioning
(context: CLIP image tokens, if any, then text; e/e0 per sample, or per token for Wan2.2's per-token timesteps,
then sharded with their tokens), so embedding parameters live only on the first stage. Geometry (RoPE, masks)
is recomputed from the latent grid on every stage; it has no parameters. `ExpertStage` runs a two-expert
(A14B) model: each microbatch on the expert(s) its timesteps select.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from .pipeline import TensorSpec


def partition_blocks(
    costs: Sequence[float], num_stages: int, embed_cost: float = 0.0, head_cost: float = 0.0
) -> list[tuple[int, int]]:
    """Contiguous block ranges, one non-empty range per stage, minimising the most expensive stage.

    costs[i] is block i's cost (e.g. N for each of the TMD student's flow-head blocks that run N inner
    steps); embed_cost is charged to the first stage and head_cost to the last. Exact (dynamic programming).
    """
    n = len(costs)
    if not 1 <= num_stages <= n:
        raise ValueError(f"cannot split {n} blocks into {num_stages} non-empty stages")
    if min(costs) < 0 or embed_cost < 0 or head_cost < 0:
        raise ValueError("costs must be non-negative")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))

    def stage_cost(k: int, i: int, j: int) -> float:  # stage k holds blocks [i, j)
        extra = (embed_cost if k == 0 else 0.0) + (head_cost if k == num_stages - 1 else 0.0)
        return prefix[j] - prefix[i] + extra

    # best[k][j]: minimal max cost of putting blocks [0, j) on stages 0..k; cut[k][j]: where stage k starts
    best = [[math.inf] * (n + 1) for _ in range(num_stages)]
    cut = [[0] * (n + 1) for _ in range(num_stages)]
    for j in range(1, n + 1):
        best[0][j] = stage_cost(0, 0, j)
    for k in range(1, num_stages):
        for j in range(k + 1, n + 1):
            for i in range(k, j):
                value = max(best[k - 1][i], stage_cost(k, i, j))
                if value < best[k][j]:
                    best[k][j], cut[k][j] = value, i
    ranges, j = [], n
    for k in range(num_stages - 1, 0, -1):
        i = cut[k][j]
        ranges.append((i, j))
        j = i
    ranges.append((0, j))
    return ranges[::-1]


def student_block_costs(num_layers: int, flow_head_blocks: int = 0, inner_steps: int = 1) -> list[float]:
    """Per-block cost of a TMD student: the last `flow_head_blocks` blocks run `inner_steps` times."""
    if not 0 <= flow_head_blocks <= num_layers:
        raise ValueError(f"flow_head_blocks={flow_head_blocks} must be within 0..{num_layers}")
    return [1.0] * (num_layers - flow_head_blocks) + [float(inner_steps)] * flow_head_blocks


class WanStage:
    """Stage function of a parallelized WanModel (see parallelize) for `run_pipeline`.

    First stage inputs: (x [B, C_in, F, H, W], timestep [B] or [B, L], context [B, T, text_dim], and for a model
    with an image branch the CLIP tokens [B, image_len, image_dim]). Other stages receive (tokens, context, e,
    e0). The last stage returns (velocity,), the others what they send on. token_timesteps: the timesteps are
    per token (e, e0 then carry this rank's tokens). `hidden_loss(mb, {block: tokens}, geometry)` adds a local
    loss term from captured hidden states of blocks on this stage (e.g. a discriminator reading teacher
    features); it joins this stage's backward.
    """

    def __init__(
        self,
        model,
        latent_shape: Sequence[int],
        capture: Sequence[int] = (),
        hidden_loss: Callable | None = None,
        conditioning_grads: bool = True,
        token_timesteps: bool = False,
    ):
        self.model, self.span = model, model.stage
        self.token_timesteps = token_timesteps
        cfg = model.config
        *_, f, h, w = latent_shape
        self.batch = latent_shape[0]
        self.grid = (f // cfg.patch_size[0], h // cfg.patch_size[1], w // cfg.patch_size[2])
        self.capture = tuple(i for i in capture if self.span.start <= i < self.span.end)
        self.hidden_loss = hidden_loss
        self.conditioning_grads = conditioning_grads
        self._geometry = None

    def boundary(self, dtype: torch.dtype | None = None, context_dtype: torch.dtype | None = None) -> list[TensorSpec]:
        """What travels between stages for one microbatch (same on every boundary). dtype: of the residual
        stream (default: the parameters'); context_dtype: of the embedded text (the autocast dtype under
        autocast, else dtype); e and e0 are at least fp32 like the time embedding."""
        cfg, b = self.model.config, self.batch
        dtype = dtype or next(self.model.parameters()).dtype
        context_dtype = context_dtype or dtype
        cond_dtype = torch.promote_types(dtype, torch.float32)
        local = self.model.layout.local_len(math.prod(self.grid))
        cond = self.conditioning_grads
        per = (b, local) if self.token_timesteps else (b,)
        return [
            TensorSpec((b, local, cfg.dim), dtype),
            TensorSpec((b, cfg.context_len, cfg.dim), context_dtype, cond),
            TensorSpec((*per, cfg.dim), cond_dtype, cond),
            TensorSpec((*per, 6, cfg.dim), cond_dtype, cond),
        ]

    def geometry(self, device):
        if self._geometry is None:
            self._geometry = self.model.geometry(self.grid, device)
        return self._geometry

    def run(self, mb: int, inputs: tuple):
        """(outputs, {block: hidden tokens}, geometry) of this stage for one microbatch."""
        model, span = self.model, self.span
        if span.first:
            x, t, ctx, *image = inputs
            image = image[0] if image else None
            x, ctx, image = (model.layout.replicated_input(v) if v is not None and v.requires_grad else v
                             for v in (x, ctx, image))
            tokens, geom = model.embed_tokens(x)
            if geom.grid != self.grid:
                raise ValueError(f"latent grid {geom.grid} differs from the stage's {self.grid}")
            if (t.ndim == 2) != self.token_timesteps:
                raise ValueError(f"timesteps of shape {tuple(t.shape)}; this stage was built with "
                                 f"token_timesteps={self.token_timesteps}")
            e, e0 = model.embed_time(t)
            context = model.embed_context(ctx, image)
        else:
            tokens, context, e, e0 = inputs
            geom = self.geometry(tokens.device)
        tokens, hidden = model.run_blocks(tokens, context, e0, geom, span.start, span.end, capture=self.capture)
        if span.last:
            return (model.head_out(tokens, e, geom),), hidden, geom
        return (tokens, context, e, e0), hidden, geom

    def __call__(self, mb: int, inputs: tuple) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
        outputs, hidden, geom = self.run(mb, inputs)
        loss = self.hidden_loss(mb, hidden, geom) if self.hidden_loss is not None and hidden else None
        return outputs, loss


class ExpertStage:
    """Stage function of a two-expert model (WanExperts of two parallelized stage models): microbatch mb runs
    on the expert `high[mb]` ([b] bool, from its timesteps; every stage knows them) selects. A microbatch
    whose samples all take one expert runs that expert once; a mixed one runs both and keeps each sample's own
    rows of every output and hidden state, so gradients reach only the expert that served a sample (twice the
    compute for such microbatches; a microbatch of one sample is never mixed)."""

    def __init__(self, experts, latent_shape: Sequence[int], high: Sequence[torch.Tensor], capture=(),
                 hidden_loss: Callable | None = None, **kw):
        self.high = [h.bool() for h in high]
        self.stages = {e: WanStage(m, latent_shape, capture, None, **kw) for e, m in (("high", experts.high),
                                                                                     ("low", experts.low))}
        self.hidden_loss = hidden_loss

    def boundary(self, *args, **kwargs) -> list[TensorSpec]:
        return self.stages["high"].boundary(*args, **kwargs)

    def __call__(self, mb: int, inputs: tuple):
        high = self.high[mb]
        if bool(high.all()) or not bool(high.any()):
            outputs, hidden, geom = self.stages["high" if bool(high.all()) else "low"].run(mb, inputs)
        else:
            (out_h, hid_h, geom), (out_l, hid_l, _) = (self.stages[e].run(mb, inputs) for e in ("high", "low"))
            pick = lambda a, b: torch.where(high.to(a.device).view(-1, *[1] * (a.ndim - 1)), a, b)  # noqa: E731
            outputs = tuple(pick(a, b) for a, b in zip(out_h, out_l))
            hidden = {k: pick(hid_h[k], hid_l[k]) for k in hid_h}
        loss = self.hidden_loss(mb, hidden, geom) if self.hidden_loss is not None and hidden else None
        return outputs, loss
