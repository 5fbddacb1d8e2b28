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

import errno
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from .safe_dcp import CorruptCheckpoint, SafeFileSystemReader, TensorsOnlyLoadPlanner

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
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def step_name(step: int) -> str:
    return f"step_{step:08d}"


class CheckpointSaveError(RuntimeError):
    """A save that could not complete; `latest` still names the previous checkpoint (the message says which)."""


def _free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _mount_point(path: Path) -> Path:
    path = path.resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def _causes(err: BaseException) -> list[BaseException]:
    """The error and what it wraps (DCP collects each rank's exception in CheckpointException.failures)."""
    out, todo = [], [err]
    while todo:
        e = todo.pop()
        if e is None or any(e is o for o in out):
            continue
        out.append(e)
        todo += [e.__cause__, e.__context__]
        for failure in getattr(e, "failures", {}).values():
            todo.append(failure[0] if isinstance(failure, tuple) else failure)
    return out


def describe_failure(err: BaseException) -> str:
    """`Type: first line` of the innermost cause (DCP wraps each rank's error in a CheckpointException)."""
    root = _causes(err)[-1]
    text = str(root).strip().splitlines()
    return f"{type(root).__name__}: {text[0][:200] if text else ''}"


def _save_failed(err: BaseException, ckpt_dir: Path, tmp: Path, step: int) -> CheckpointSaveError:
    """Why a save failed, for the operator; recognises a full disk (torch's zip writer reports it only as an
    `inline_container.cc` failure, without errno) by the free space left next to what a checkpoint needs."""
    previous = complete_checkpoints(ckpt_dir)
    survived = (f"checkpoints/latest still names {previous[-1].name} (complete)" if previous
                else "no earlier checkpoint exists")
    need = _dir_bytes(previous[-1]) if previous else _dir_bytes(tmp)
    try:
        free = _free_bytes(ckpt_dir)
    except OSError:
        free = None
    full = any(getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) for e in _causes(err)) or (
        free is not None and free < max(need, 1 << 20))
    if full:
        where = _mount_point(ckpt_dir)
        return CheckpointSaveError(
            f"no space left on {where} (the filesystem of {ckpt_dir}; {free / 2**20:.1f} MiB free, a checkpoint takes "
            f"about {need / 2**20:.1f} MiB) while saving step {step}: {survived}. Free space (or lower run.keep_last), "
            "then resubmit: the run resumes from there")
    return CheckpointSaveError(f"saving step {step} into {ckpt_dir} failed ({describe_failure(err)}); {survived}")


def save_checkpoint(ckpt_dir, step: int, state: dict, meta: dict, keep_last: int | None = 3) -> Path:
    """Collective: every rank calls with its (possibly DTensor-sharded) state dict.

    Pruning removes only committed checkpoints of earlier steps than this one, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / step_name(step)
    tmp = ckpt_dir / (step_name(step) + ".tmp")
    if _rank() == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_dir.glob("step_*.tmp"):
            shutil.rmtree(stale)  # left by a save that died; never referenced by `latest`
        tmp.mkdir()
    _barrier()
    err = None
    try:
        dcp.save(state, checkpoint_id=str(tmp))  # collective: a failure on any rank raises on every rank
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        err = e
    if err is None:
        _barrier()
        if _rank() == 0:
            try:
                (tmp / META).write_text(json.dumps(dict(meta, step=step), indent=2, sort_keys=True))
                _fsync_tree(tmp)
                if final.exists():  # re-saving a step (e.g. after a resume) replaces it
                    shutil.rmtree(final)
                os.replace(tmp, final)
                _fsync_dir(ckpt_dir)
                _write_atomic(ckpt_dir / "latest", final.name + "\n")
            except OSError as e:
                err = e
        if _any_rank(err is not None) and err is None:
            err = RuntimeError("rank 0 could not commit the checkpoint (its log says why)")
    if err is not None:
        failure = _save_failed(err, ckpt_dir, tmp, step)
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # ours, and never referenced by `latest`
        raise failure from None
    if _rank() == 0 and keep_last:
        older = [p for p in complete_checkpoints(ckpt_dir) if step_of(p) < step]
        for old in older[: max(0, len(older) - (keep_last - 1))]:
            shutil.rmtree(old)
    _barrier()
    return final


def _any_rank(flag: bool) -> bool:
    if not dist.is_initialized():
        return flag
    flags = [None] * dist.get_world_size()
    dist.all_gather_object(flags, flag)
    return any(flags)


def step_of(path: Path) -> int:
    return int(STEP_DIR.match(Path(path).name).group(1))


def complete_checkpoints(ckpt_dir) -> list[Path]:
    """Committed checkpoints, oldest (lowest step) first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if STEP_DIR.match(p.name) and (p / META).exists() and (p / ".metadata").exists()]
    return sorted(found, key=step_of)


def _pointer(ckpt_dir: Path) -> str | None:
    """The step directory name `latest` holds; anything but the name of a step directory is refused, so a
    planted pointer cannot lead a resume outside this run's checkpoints/."""
    pointer = ckpt_dir / "latest"
    if not pointer.exists():
        return None
    try:
        name = pointer.read_bytes().decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        name = f"<unreadable: {err}>"
    if not STEP_DIR.match(name):
        shown = name if len(name) < 80 else name[:77] + "..."
        done = complete_checkpoints(ckpt_dir)
        raise ResumeError(
            f"{pointer} holds {shown!r}, not the name of a step directory of {ckpt_dir} (tmd-train writes e.g. "
            f"'step_00000100'): it was not written by tmd-train. Write the step to resume from into it "
            f"({'e.g. ' + done[-1].name if done else 'there are no complete checkpoints'}), or delete it")
    return name


def resume_candidates(ckpt_dir, which: str = "latest") -> tuple[list[Path], list[str]]:
    """Checkpoints to try in order (the first that loads wins), and notes for the operator.

    `latest`: the step `checkpoints/latest` names, then older complete ones (a checkpoint that fails to load falls
    back to the previous one); a step number or a checkpoint directory: only that one."""
    ckpt_dir = Path(ckpt_dir)
    if which != "latest":
        path = ckpt_dir / step_name(int(which)) if str(which).isdigit() else Path(which)
        if not ((path / META).exists() and (path / ".metadata").exists()):
            raise ResumeError(f"{path} is not a complete checkpoint (no {META} / .metadata); pick one of "
                              f"{[p.name for p in complete_checkpoints(ckpt_dir)]}")
        return [path], []
    name = _pointer(ckpt_dir)
    done = complete_checkpoints(ckpt_dir)
    notes = []
    if name is not None and ckpt_dir / name not in done:
        notes.append(f"checkpoints/latest names {name}, which is not a complete checkpoint; "
                     + (f"using the newest complete one, {done[-1].name}" if done else "starting from scratch"))
        name = None
    if name is None:
        return done[::-1], notes
    first = ckpt_dir / name
    return [first] + [p for p in done[::-1] if step_of(p) < step_of(first)], notes


def resolve_checkpoint(ckpt_dir, which: str = "latest") -> Path | None:
    """`latest` (or None when the run has none yet), a step number, or a checkpoint directory path."""
    found, _ = resume_candidates(ckpt_dir, which)
    return found[0] if found else None


def load_checkpoint(path, state: dict) -> dict:
    """Collective: fill `state` in place (resharding as needed); returns the checkpoint's meta. Nothing read from
    the checkpoint is executed (training/safe_dcp.py)."""
    path = Path(path)
    meta = read_meta(path)
    dcp.load(state, storage_reader=SafeFileSystemReader(path), planner=TensorsOnlyLoadPlanner())
    return meta


def read_meta(path) -> dict:
    where = Path(path) / META
    try:
        meta = json.loads(where.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptCheckpoint(f"{where} cannot be read ({err}): the checkpoint is incomplete or corrupt") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise CorruptCheckpoint(f"{where} is not a checkpoint's meta.json (no integer 'step')")
    return meta
