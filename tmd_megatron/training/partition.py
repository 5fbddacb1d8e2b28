"""Pipeline stage splits, one per role, balanced by the analytic FLOPs of what each role runs in an iteration.

The roles run different programs on the same blocks: the TMD student runs its flow head N times per pass with a
fusion FFN, patch embedding and output head each time, all on the last stage; the teacher and the fake score run
plain Wan passes, the teacher with discriminator heads on its feature layers. One shared split cannot balance all
of them (with the student's split, the critics' passes leave the first stage idle: docs/benchmarks.md), so each
role gets its own: an exact min-max contiguous partition (parallel.partition_blocks) of per-block costs, with the
embeddings charged to the first stage and the output head (and the student's per-inner-step extras) to the last,
all in units of one block's forward FLOPs (models/flops.py). Checkpoints do not depend on the split (parameter
names are global), so runs resume under any split.
"""
from __future__ import annotations

from tmd_megatron.models import flops as F
from tmd_megatron.parallel import partition_blocks

from .config import RecipeError, Resolved


def _units(res: Resolved):
    cfg, latent = res.wan, tuple(res.raw.data.latent)[1:]
    block = F.wan_blocks(cfg, latent, 1, [0]).forward().total
    unit = lambda call: call.forward().total / block  # noqa: E731
    return cfg, latent, unit


def student_costs(res: Resolved) -> tuple[list[float], float, float]:
    """(per-block cost, first-stage cost, last-stage cost) of the trained model."""
    cfg, latent, unit = _units(res)
    embed = unit(F.wan_embeddings(cfg, latent, 1))
    head = unit(F.wan_head(cfg, latent, 1))
    if res.student is None:
        return [1.0] * cfg.num_layers, embed, head
    h = res.student.flow_head_blocks
    split = cfg.num_layers - h
    # a flow-head pass less its blocks: the patch embedding of y_s, the fusion, the output head
    extras = unit(F.flow_head_call(cfg, latent, 1, split, F.Shard(), res.student.fusion)) - h
    if res.method == "tmd":  # the rollout runs the head N times in every student pass
        repeats, points = float(res.dmd2v.inner_steps), res.dmd2v.inner_steps
    else:  # TM-MF: the flow head's F+B (3 units) and two finite-difference forwards, against the backbone's F+B
        cfg_pass = res.tm_mf.cfg_scale != 1.0 and res.tm_mf.cfg_source == "student"
        repeats, points = (5.0 + cfg_pass) / (3.0 + cfg_pass), 3
    times = unit(F.flow_head_times(cfg, 1, points))
    return [1.0] * split + [repeats] * h, embed + times, repeats * extras


def critic_costs(res: Resolved, role: str) -> tuple[list[float], float, float]:
    """(per-block cost, first-stage cost, last-stage cost) of the fake score or the teacher; the teacher's
    blocks that feed a discriminator head also carry the head (its forward in the generator's GAN pass and its
    step on [fake; real] every iteration, relative to the teacher's own work on a block)."""
    cfg, latent, unit = _units(res)
    costs = [1.0] * cfg.num_layers
    embed, head = unit(F.wan_embeddings(cfg, latent, 1)), unit(F.wan_head(cfg, latent, 1))
    dmd = res.dmd2v
    if role == "teacher" and dmd is not None and dmd.gan_weight > 0:
        every = dmd.student_every
        disc = F.disc_call(cfg, latent, 1, 1, dmd.disc_width, dmd.disc_features, arch=dmd.disc_arch).forward().total
        block = F.wan_blocks(cfg, latent, 1, [0]).forward().total
        # per iteration: teacher block 2x (GAN F + dX) / every + 2 (the [fake; real] forward); head 2 / every + 6
        weight = (2.0 / every + 6.0) / (2.0 / every + 2.0 + (1.0 / every if dmd.cfg_scale != 1.0 else 0.0))
        for i in dmd.disc_layers:
            if 0 <= i < cfg.num_layers:
                costs[i] += weight * disc / block
    return costs, embed, head


def student_ranges(res: Resolved, pp: int) -> list[tuple[int, int]]:
    cfg = res.wan
    costs, embed, head = student_costs(res)
    ranges = partition_blocks(costs, pp, embed_cost=embed, head_cost=head)
    if res.student is not None and pp > 1:
        split = cfg.num_layers - res.student.flow_head_blocks
        if ranges[-1][0] > split:  # the flow head's inner loop must not cross stages
            if split < pp - 1:
                raise RecipeError(
                    f"the flow head ({res.student.flow_head_blocks} blocks) must sit on the last of {pp} stages, "
                    f"leaving {split} backbone blocks for {pp - 1} stages: lower parallel.pp or distill.head_blocks")
            ranges = partition_blocks(costs[:split], pp - 1, embed_cost=embed) + [(split, cfg.num_layers)]
    return ranges


def role_ranges(res: Resolved, pp: int) -> dict[str, list[tuple[int, int]]]:
    """The stage split of every role: student, teacher (and its discriminator heads), fake score."""
    out = {"student": student_ranges(res, pp)}
    for role in ("teacher", "fake"):
        costs, embed, head = critic_costs(res, role)
        out[role] = partition_blocks(costs, pp, embed_cost=embed, head_cost=head)
    return out
