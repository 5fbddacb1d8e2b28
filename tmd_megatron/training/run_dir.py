"""The run directory: what a run writes there, archiving an earlier run's outputs, and telling the operator.

    <run.out_dir>/checkpoints/   step_X/ and `latest` (training/checkpoint.py)
                  metrics.jsonl  tensorboard/  samples/   logs of this run
                  export/        export_info.json         the trained model, written at the end
                  data/          the synthetic task's shards (data.source=synthetic)
                  archive/<UTC time>/   an earlier run's outputs, moved aside by a fresh start

A fresh start in a used directory (run.resume=never) moves the earlier run's outputs into archive/ instead of
deleting them or mixing the new run with them; a resume from an earlier step (run.resume=N, or a fallback past a
checkpoint that does not load) moves the checkpoints after it. Nothing else in the directory is touched.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from . import checkpoint as ckpt

# What a run writes and a fresh start moves aside (data/ is regenerated identically; stop_request is the launcher's).
RUN_OUTPUTS = ("metrics.jsonl", "tensorboard", "samples", "export", "export_info.json")


def check_writable(out: Path) -> str | None:
    """Why `out` cannot hold a run (None if it can). Nothing is created: the directory, or its nearest existing
    ancestor, must be a directory this process may write (access(2) also reports a read-only filesystem)."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"run.out_dir={out}: {existing} is not a directory; choose a directory for the run"
    if not os.access(existing, os.W_OK | os.X_OK):
        return (f"run.out_dir={out} is not writable ({existing} is read-only to this user): choose a directory this "
                "user can write (checkpoints and the export go there)")
    return None


def archive_outputs(out: Path, after_step: int | None) -> Path | None:
    """Move checkpoints of steps after `after_step` (all of them, and the run's logs and export, when None) into
    archive/<UTC time>/; returns that folder, or None when there was nothing to move. Rank 0 only."""
    ckpt_dir = out / "checkpoints"
    moving = [p for p in ckpt.complete_checkpoints(ckpt_dir) if after_step is None or ckpt.step_of(p) > after_step]
    if after_step is None:
        moving += [ckpt_dir / "latest"] if (ckpt_dir / "latest").exists() else []
        moving += [p for p in ckpt_dir.glob("step_*") if p not in moving and ckpt.STEP_DIR.match(p.name)]
        moving += [out / name for name in RUN_OUTPUTS if (out / name).exists()]
    if not moving:
        return None
    dest = out / "archive" / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    while dest.exists():  # two fresh starts within a second
        dest = dest.with_name(dest.name + "+")
    for p in moving:
        target = dest / p.relative_to(out)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(p, target)  # same filesystem: a rename, nothing copied or deleted
    return dest


def flat_shapes(state: dict, prefix: str = "") -> dict[str, tuple]:
    """{DCP key: global shape} of a (nested) state dict, keys joined with '.' as DCP flattens them."""
    out = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out.update(flat_shapes(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = tuple(v.shape)
    return out


def _flat(d, prefix=""):
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def incompatibility(path: Path, saved: dict[str, tuple], expected: dict[str, tuple], saved_recipe: dict | None,
                    recipe: dict) -> str | None:
    """Why the checkpoint at `path` (tensor shapes `saved`) cannot resume a run whose state has `expected`, or None.
    DCP would load the common subset silently (e.g. 3 of 4 blocks), so any difference is refused."""
    missing = sorted(set(expected) - set(saved))
    extra = sorted(set(saved) - set(expected))
    shapes = sorted(k for k in set(saved) & set(expected) if tuple(saved[k]) != tuple(expected[k]))
    if not (missing or extra or shapes):
        return None
    parts = []
    if extra:
        parts.append(f"{len(extra)} tensors this run lacks, e.g. {extra[:3]}")
    if missing:
        parts.append(f"none of {len(missing)} tensors this run has, e.g. {missing[:3]}")
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} tensors of other shapes, e.g. {k} {tuple(saved[k])} (this run: {tuple(expected[k])})")
    hint = ""
    if saved_recipe:
        old, new = _flat({s: saved_recipe.get(s) for s in ("model", "distill", "method")}), \
            _flat({s: recipe.get(s) for s in ("model", "distill", "method")})
        diff = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                if old.get(k) != new.get(k) and not k.endswith(("teacher", "init", "backend", "dtype"))]
        if diff:
            hint = f" The recipe changed since: {'; '.join(diff[:5])}."
    return (f"{path} was written for another model: it holds {'; '.join(parts)}.{hint} Resume with the settings "
            "the run started with (its meta.json records the recipe), or start a new run.out_dir")


def check_compatible(path: Path, state: dict, meta: dict, res, topo) -> None:
    """Refuse (ResumeError) a checkpoint whose tensors differ from this run's state; pipeline stages each hold
    some of them, so the union over ranks is compared. Collective."""
    import torch.distributed as dist
    from omegaconf import OmegaConf

    from tmd_megatron.parallel import comm

    from .safe_dcp import read_metadata

    expected = flat_shapes(state)
    if dist.is_initialized():
        for part in comm.all_gather_object(expected, topo.world):
            expected.update(part)
    saved = {k: tuple(v.size) for k, v in read_metadata(Path(path) / ".metadata").state_dict_metadata.items()}
    problem = incompatibility(path, saved, expected, meta.get("recipe"),
                              OmegaConf.to_container(OmegaConf.structured(res.raw)))
    if problem:
        raise ckpt.ResumeError(problem)


def banner(res, topo, out: Path, resumed: Path | None, step: int, notes: list[str], archived: Path | None) -> str:
    r = res.raw
    lines = [f"tmd-train: {res.method} on {topo.world.size} process(es), DP{topo.dp.size} x PP{topo.pp.size} x "
             f"CP{topo.cp.size} x TP{topo.tp.size}, device {topo.device}, model {r.model.preset}",
             f"  run dir     {out.resolve()}"]
    lines += [f"  note        {n}" for n in notes]
    if archived is not None:
        lines.append(f"  archived    the earlier run's outputs moved to {archived}")
    lines.append(f"  start       {'resumed from ' + str(resumed) if resumed else 'from scratch'} at step {step} "
                 f"of {res.max_steps}")
    every = f"every {r.run.ckpt_every} steps, " if r.run.ckpt_every else ""
    lines.append(f"  writes      checkpoints/ ({every}at the end and on preemption; keeps {r.run.keep_last}), "
                 "metrics.jsonl" + (", tensorboard/" if r.run.tensorboard else "")
                 + (", samples/" if r.run.sample_every else "") + ", export/ at the end")
    return "\n".join(lines)


def summary(res, out: Path, export: Path, metrics: dict, step: int) -> str:
    from .metrics import TIMING_METRICS

    shown = "  ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()) if k not in TIMING_METRICS)
    export = export.resolve()
    if res.method in ("tm_mf",):
        nxt = f"stage 2: tmd-train experiment=<recipe> method=tmd model.init={export} run.out_dir=<new dir>"
    elif res.method == "kd":
        nxt = f"DMD2-v from the warm-up: tmd-train experiment=<recipe> method=dmd2v model.init={export}"
    elif res.method == "flow_matching":
        nxt = f"distil it: tmd-train experiment=<recipe> method=tm_mf model.teacher={export}"
    else:
        synthetic = res.raw.data.source == "synthetic" or res.raw.model.preset == "tiny"  # the synthetic task's text
        nxt = (f"sample: tmd-sample {export} --prompts \"...\" "
               + ("--synthetic" if synthetic else "--umt5 <dir> --vae <dir>") + " --out <dir>")
    return "\n".join([f"tmd-train: finished {step} steps of {res.method}",
                      f"  export      {export}", f"  last step   {shown}", f"  next        {nxt}"])
