"""What a run reads: checked before any model is built (tmd-train, and tmd-plan with the same checks, so planning
before queueing catches a typo), then opened as the trainer's data stream.

Checked: the teacher and init checkpoints (headers and config against the recipe; tensors are read later), the
negative-prompt embedding, the shards (every index; one sample read in full; latent shape, text width and
length against the recipe) and that the run directory is writable.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from tmd_megatron.data.format import ShardError
from tmd_megatron.models.wan.checkpoint import CheckpointError

from .config import RecipeError, Resolved, num_microbatches

# Shards opened by the check, reused by make_data (the indexes of a large dataset are read once per rank).
_OPENED: dict = {}
ENV_HINT = {"model.teacher": "TMD_TEACHER_14B / TMD_TEACHER_1P3B", "data.shards": "TMD_SHARDS",
            "data.negative": "TMD_NEGATIVE"}


def _hint(key: str) -> str:
    return f" (the Wan recipes read it from {ENV_HINT[key]})" if key in ENV_HINT else ""


def check_checkpoints(res: Resolved) -> list[str]:
    from .roles import read_student_init, teacher_state

    problems = []
    m = res.raw.model
    if m.teacher is not None and not str(m.teacher).startswith("random:"):
        try:
            teacher_state(res)
        except (CheckpointError, RecipeError) as err:
            problems.append(f"model.teacher={m.teacher}: {err}; set model.teacher=<Wan2.1 checkpoint dir>"
                            + _hint("model.teacher"))
    if m.init not in (None, "teacher"):
        try:
            read_student_init(m.init, res)
        except (CheckpointError, RecipeError, OSError) as err:
            problems.append(f"model.init={m.init}: {err}")
    return problems


def check_shards(res: Resolved) -> list[str]:
    """The shards against the recipe: readable, one latent shape equal to data.latent, text width and length."""
    from tmd_megatron.data.stream import ShardSet

    d, wan = res.raw.data, res.wan
    try:
        shards = ShardSet(d.shards, on_corrupt=d.on_corrupt)
    except (ShardError, OSError) as err:
        return [f"data.shards={d.shards}: {err}" + _hint("data.shards")]
    try:
        shards.read(0)  # one whole sample: CRCs, npy headers, dtypes, finite values
    except ShardError as err:
        return [f"data.shards: {err}"]
    finally:
        shards.close()
    _OPENED[(str(d.shards), d.on_corrupt)] = shards
    got, problems = shards.describe, []
    if list(got["latent_shape"]) != list(d.latent):
        problems.append(f"data.shards hold latents {got['latent_shape']}, the recipe's data.latent is {list(d.latent)}: "
                        "set data.latent to the shards' shape (the planner and the model's patching use it) or "
                        "point data.shards at data of that resolution")
    if got["text_dim"] != wan.text_dim:
        problems.append(f"data.shards hold text embeddings {got['text_dim']} wide, the model takes text_dim="
                        f"{wan.text_dim}: encode the prompts with the text encoder of this model (umT5-XXL: 4096)")
    longest = max(e["context_len"] for s in shards.shards for e in s.samples)
    if longest > wan.text_len:
        problems.append(f"data.shards hold prompts of {longest} text rows, more than text_len={wan.text_len}: "
                        f"re-encode with --text-len {wan.text_len}")
    if res.method == "kd" and not got["has_noise"]:
        problems.append("method=kd trains on (noise, teacher sample) pairs: data.shards have no noise member; "
                        "write them with `tmd-preprocess teacher --kd`")
    return problems


def check_inputs(res: Resolved, out_dir_writable: bool = True) -> list[str]:
    """Every problem with the files this run would read (and, for tmd-train, the run directory), each naming
    its fix. Cheap: headers, indexes and one sample."""
    problems = check_checkpoints(res)
    d = res.raw.data
    if d.source == "shards":
        if d.shards:
            problems += check_shards(res)
        if d.negative != "zeros":
            from tmd_megatron.data.text import load_negative_embedding

            try:
                load_negative_embedding(d.negative, res.wan.text_dim, res.wan.text_len)
            except ValueError as err:
                problems.append(str(err) + _hint("data.negative"))
    if out_dir_writable:
        from .run_dir import check_writable

        problem = check_writable(Path(res.raw.run.out_dir))
        if problem:
            problems.append(problem)
    return problems


@dataclass
class Data:
    loader: object
    negative: torch.Tensor


def make_data(res: Resolved, topo, start: dict | None) -> Data:
    from tmd_megatron.data import make_loader

    d = res.raw.data
    dp = topo.dp.size
    if d.global_batch % dp:
        raise RecipeError(f"data.global_batch={d.global_batch} is not divisible by the {dp} data-parallel ranks")
    local = d.global_batch // dp
    m = num_microbatches(res, dp)
    if local % m:
        raise RecipeError(f"the per-rank batch {local} is not divisible into {m} microbatches: change "
                          "parallel.microbatches / parallel.micro_batch_size or data.global_batch")
    if d.source == "synthetic":
        from tmd_megatron.data.synthetic import SyntheticTask

        syn = dict(d.synthetic)
        task = SyntheticTask(frames=syn.get("frames", 3), size=syn.get("size", 16), text_dim=res.wan.text_dim,
                             image_dim=res.wan.image_dim, image_len=res.wan.image_len)
        shard_dir = Path(res.raw.run.out_dir) / "data"
        if topo.world.rank == 0:  # I2V models read the first frame's conditioning latent (and image tokens)
            task.write_shards(shard_dir, syn.get("num_samples", 256), syn.get("seed", 0),
                              image=res.wan.model_type == "i2v")
        if dist.is_initialized():
            dist.barrier()
        shards, negative = shard_dir, task.encode_text("")
    elif d.source == "shards":
        shards = _OPENED.pop((str(d.shards), d.on_corrupt), d.shards)
        negative = None
    else:
        raise RecipeError(f"data.source={d.source!r}; choose 'synthetic' or 'shards'")
    if d.negative != "zeros" and d.source == "shards":
        from tmd_megatron.data.text import load_negative_embedding

        try:
            negative = load_negative_embedding(d.negative, res.wan.text_dim, res.wan.text_len)
        except ValueError as err:
            raise RecipeError(str(err)) from None
    if negative is None:
        negative = torch.zeros(1, res.wan.text_dim)
    loader = make_loader(shards, local, topo.dp.rank, dp, res.raw.run.seed, d.loader, start=start,
                         text_len=res.wan.text_len, on_corrupt=d.on_corrupt)
    return Data(loader, negative.float())
