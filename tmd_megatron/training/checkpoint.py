"""Training checkpoints: sharded (torch.distributed.checkpoint), committed atomically, resolved by `latest`.

Layout of a run directory:
    checkpoints/step_00000100/   .metadata + *.distcp (DCP shards) + meta.json
    checkpoints/latest           text: the name of the newest complete checkpoint
A save writes into `step_X.tmp/`, and only after every rank has finished and meta.json is fsynced does rank 0
rename it to `step_X/` and then replace `latest` (write-new + os.replace). A process killed at any moment
therefore leaves `latest` naming a complete checkpoint. DCP stores each tensor with its global shape and
shard placement (DTensor), so a checkpoint saved under one parallel layout loads under another.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

# One process without a process group is a supported case, not something to warn about on every save.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

STEP_DIR = re.compile(r"^step_(\d{8})$")
META = "meta.json"


class ResumeError(RuntimeError):
    pass


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(ckpt_dir, step: int, state: dict, meta: dict, keep_last: int | None = 3) -> Path:
    """Collective: every rank calls with its (possibly DTensor-sharded) state dict."""
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / step_name(step)
    tmp = ckpt_dir / (step_name(step) + ".tmp")
    if _rank() == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_dir.glob("step_*.tmp"):
            shutil.rmtree(stale)  # left by a save that died; never referenced by `latest`
        tmp.mkdir()
    _barrier()
    dcp.save(state, checkpoint_id=str(tmp))
    _barrier()
    if _rank() == 0:
        (tmp / META).write_text(json.dumps(dict(meta, step=step), indent=2, sort_keys=True))
        _fsync_tree(tmp)
        if final.exists():  # re-saving a step (e.g. after a resume) replaces it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(ckpt_dir)
        _write_atomic(ckpt_dir / "latest", final.name + "\n")
        if keep_last:
            for old in complete_checkpoints(ckpt_dir)[:-keep_last]:
                shutil.rmtree(old)
    _barrier()
    return final


def complete_checkpoints(ckpt_dir) -> list[Path]:
    """Committed checkpoints, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if STEP_DIR.match(p.name) and (p / META).exists() and (p / ".metadata").exists()]
    return sorted(found, key=lambda p: p.name)


def resolve_checkpoint(ckpt_dir, which: str = "latest") -> Path | None:
    """`latest` (or None when the run has none yet), a step number, or a checkpoint directory path."""
    ckpt_dir = Path(ckpt_dir)
    if which != "latest":
        path = ckpt_dir / step_name(int(which)) if str(which).isdigit() else Path(which)
        if not ((path / META).exists() and (path / ".metadata").exists()):
            raise ResumeError(f"{path} is not a complete checkpoint (no {META} / .metadata); pick one of "
                              f"{[p.name for p in complete_checkpoints(ckpt_dir)]}")
        return path
    pointer = ckpt_dir / "latest"
    if pointer.exists():
        path = ckpt_dir / pointer.read_text().strip()
        if (path / META).exists() and (path / ".metadata").exists():
            return path
    done = complete_checkpoints(ckpt_dir)
    return done[-1] if done else None


def load_checkpoint(path, state: dict) -> dict:
    """Collective: fill `state` in place (resharding as needed); returns the checkpoint's meta."""
    path = Path(path)
    dcp.load(state, checkpoint_id=str(path))
    return json.loads((path / META).read_text())


def read_meta(path) -> dict:
    return json.loads((Path(path) / META).read_text())

