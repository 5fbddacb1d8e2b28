"""Pipeline stages of a Wan DiT: balanced block partition and the stage function the engine runs.

Between stages travels (tokens, text context, e, e0): the residual-stream shard plus the embedded
conditioning, so embedding parameters live only on the first stage. Geometry (RoPE, masks) is recomputed
from the latent grid on every stage; it has no parameters.
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

    First stage inputs: (x [B, C, F, H, W], timestep [B], context [B, T, text_dim]). Other stages receive
    (tokens, context, e, e0). The last stage returns (velocity,), the others what they send on.
    `hidden_loss(mb, {block: tokens}, geometry)` adds a local loss term from captured hidden states of blocks
    on this stage (e.g. a discriminator reading teacher features); it joins this stage's backward.
    """

    def __init__(
        self,
        model,
        latent_shape: Sequence[int],
        capture: Sequence[int] = (),
        hidden_loss: Callable | None = None,
        conditioning_grads: bool = True,
    ):
        self.model, self.span = model, model.stage
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
        return [
            TensorSpec((b, local, cfg.dim), dtype),
            TensorSpec((b, cfg.text_len, cfg.dim), context_dtype, cond),
            TensorSpec((b, cfg.dim), cond_dtype, cond),
            TensorSpec((b, 6, cfg.dim), cond_dtype, cond),
        ]

    def geometry(self, device):
        if self._geometry is None:
            self._geometry = self.model.geometry(self.grid, device)
        return self._geometry

    def __call__(self, mb: int, inputs: tuple) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
        model, span = self.model, self.span
        if span.first:
            x, t, ctx = inputs
            if x.requires_grad:
                x = model.layout.replicated_input(x)
            if ctx.requires_grad:
                ctx = model.layout.replicated_input(ctx)
            tokens, geom = model.embed_tokens(x)
            if geom.grid != self.grid:
                raise ValueError(f"latent grid {geom.grid} differs from the stage's {self.grid}")
            e, e0 = model.embed_time(t)
            context = model.embed_text(ctx)
        else:
            tokens, context, e, e0 = inputs
            geom = self.geometry(tokens.device)
        tokens, hidden = model.run_blocks(tokens, context, e0, geom, span.start, span.end, capture=self.capture)
        loss = self.hidden_loss(mb, hidden, geom) if self.hidden_loss is not None and hidden else None
        if span.last:
            return (model.head_out(tokens, e, geom),), loss
        return (tokens, context, e, e0), loss
