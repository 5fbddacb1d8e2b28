"""Classifier-free guidance with the negative prompt (Table 8) and condition dropout (App. A.2)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tmd_megatron.models.wan.conditioning import model_call_inputs

from .common import rand
from .timesteps import per_sample, wan_units


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Standard CFG: uncond + g·(cond − uncond), g = 1 returns cond."""
    return uncond + scale * (cond - uncond)


def match_contexts(context: torch.Tensor, negative: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Context [B, T, C] and the negative-prompt embedding ([T', C], [1, T', C] or [B, T', C]) zero-padded to
    one length and broadcast to the batch; Wan pads text with zeros anyway (WAN_SPEC §2.3)."""
    if negative.ndim == 2:
        negative = negative.unsqueeze(0)
    if negative.ndim != 3 or negative.shape[-1] != context.shape[-1]:
        raise ValueError(
            f"negative-prompt embedding must be [T, {context.shape[-1]}] or [B, T, {context.shape[-1]}], "
            f"got {tuple(negative.shape)}"
        )
    length = max(context.shape[1], negative.shape[1])
    context = F.pad(context, (0, 0, 0, length - context.shape[1]))
    negative = F.pad(negative, (0, 0, 0, length - negative.shape[1])).to(context)
    return context, negative.expand(context.shape[0], -1, -1)


def drop_condition(
    context: torch.Tensor, negative: torch.Tensor, p_drop: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Condition dropout (App. A.2): each sample's prompt is replaced by the negative prompt with probability
    p_drop. Returns the context to use and `keep` [B] (True = still conditional)."""
    context, negative = match_contexts(context, negative)
    keep = rand(context.shape[0], gen) >= p_drop
    keep = keep.to(context.device)
    return torch.where(per_sample(keep, context).bool(), context, negative), keep


def wan_velocity(model, x_t, t, context, capture: tuple[int, ...] = (), skip_layers: tuple[int, ...] = (),
                 cond=None):
    """A Wan model's velocity at (x_t, t ∈ [0,1]) and {block: hidden tokens} for `capture`.

    cond: the batch's image conditioning (models/wan/conditioning.py), or None for text only. A two-expert model
    runs each sample on its expert. skip_layers bypasses those blocks (skip-layer guidance for the unconditional
    branch, Table 7 KD).
    """
    if hasattr(model, "per_expert"):
        def one(expert, x_t, t, context, cond):
            return wan_velocity(expert, x_t, t, context, capture, skip_layers, cond)

        return model.per_expert(wan_units(t), one, x_t, t, context, cond)
    if cond is None:
        x_in, timestep, image = x_t, wan_units(t), None
    else:
        x_in, timestep, image = model_call_inputs(model.config, x_t, wan_units(t), cond)
    if not skip_layers:
        image_arg = () if image is None else (image,)  # text-only models need not take the argument
        out = model(x_in, timestep, context, *image_arg, return_hidden=tuple(capture))
        out, hidden = out if capture else (out, {})
        return (out if cond is None else cond.output(out)), hidden
    bad = [i for i in skip_layers if not 0 <= i < model.config.num_layers]
    if bad:
        raise ValueError(
            f"skip layers {bad} are outside the model's {model.config.num_layers} blocks; set KDConfig.skip_layers"
        )
    tokens, geom = model.embed_tokens(x_in)
    e, e0 = model.embed_time(timestep)
    ctx = model.embed_context(context, image)
    hidden, start = {}, 0
    for stop in sorted(set(skip_layers)) + [model.config.num_layers]:
        tokens, h = model.run_blocks(tokens, ctx, e0, geom, start, stop, capture=tuple(capture))
        hidden.update(h)
        start = stop + 1
    out = model.head_out(tokens, e, geom)
    return (out if cond is None else cond.output(out)), hidden


def guided_velocity(
    model, x_t, t, context, negative, scale: float, skip_layers: tuple[int, ...] = (), cond=None
) -> torch.Tensor:
    """Teacher velocity with CFG against the negative prompt; the unconditional pass may skip layers. With image
    conditioning the unconditional pass keeps the image and drops the text only (Wan's I2V sampler)."""
    cond_v, _ = wan_velocity(model, x_t, t, context, cond=cond)
    if scale == 1.0:
        return cond_v
    context, negative = match_contexts(context, negative)
    uncond, _ = wan_velocity(model, x_t, t, negative, skip_layers=skip_layers, cond=cond)
    return cfg_combine(cond_v, uncond, scale)
