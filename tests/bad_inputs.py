"""The bad-input battery: what an operator (or someone with write access to a shared run directory) can hand the five
CLIs, the launchers and the run directory, and what must come back.

Every case states the exit code and a phrase of the one message expected; the runner checks, besides, that no
traceback was printed and that nothing in the battery's world changed except the paths the case may write (the
run's own new files). The world (a tiny teacher, shards, a negative-prompt embedding, a finished run, a user's
directory) is built once; each case prepares its own inputs under cases/<id>/ before the snapshot.

Cases run in-process (the CLI's main/run with captured output: what the entry point does, minus interpreter
start-up) unless the exit code or traceback of the real entry point matters (mode "python": `python -m`), or they
are shell scripts (mode "bash") or need a private mount namespace (mode "unshare": a read-only or full filesystem).

    python tests/bad_input_cases.py /tmp/world    # prints the table (input, exit code, traceback?, changed, message)
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import traceback
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
NO_SLURM = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}


# ---- the world --------------------------------------------------------------------------------------------------
class Evil:
    """Unpickling this runs a shell command: what a planted file would do."""

    def __init__(self, cmd: str):
        self.cmd = cmd

    def __reduce__(self):
        return os.system, (self.cmd,)


def train_args(w: Path, out: Path, *more: str) -> list[str]:
    """Stage 1 (TM-MF) on the tiny model with the world's teacher and the synthetic task: small and quick."""
    return ["experiment=tiny_tmd", "method=tm_mf", f"model.teacher={w / 'teacher'}", f"run.out_dir={out}",
            "run.tensorboard=false", "run.device=cpu", "run.max_steps=2", "run.ckpt_every=1",
            "data.synthetic.num_samples=16", *more]


def shard_args(shards) -> list[str]:
    return ["data.source=shards", f"data.shards={shards}", "data.latent=[16,3,8,8]", "data.loader=torch",
            "data.negative=zeros"]


def build_world(w: Path) -> Path:
    """The battery's inputs, written by the project's own writers (nothing downloaded)."""
    import torch

    from tmd_megatron.cli.train import run
    from tmd_megatron.data.synthetic import SyntheticTask
    from tmd_megatron.models.wan import WanConfig, WanModel
    from tmd_megatron.training.roles import fresh_wan_state

    w.mkdir(parents=True, exist_ok=True)
    cfg = WanConfig.preset("tiny")
    with torch.device("meta"):
        teacher = WanModel(cfg)
    teacher.load_state_dict(fresh_wan_state(cfg, 0, zero_head=False), assign=True)
    teacher.save_pretrained(w / "teacher", format="original")
    task = SyntheticTask(text_dim=cfg.text_dim)
    task.write_shards(w / "shards", 16, 0, samples_per_shard=8)
    torch.save(task.encode_text(""), w / "negative.pt")
    (w / "userdir").mkdir()
    (w / "userdir" / "notes.txt").write_text("a user's notes\n")
    (w / "userdir" / "data.bin").write_bytes(os.urandom(1000))
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        assert run(train_args(w, w / "run0"), stream=quiet) == 0, quiet.getvalue()
        assert run(["experiment=tiny_teacher", f"run.out_dir={w / 'run_fm'}", "run.max_steps=2", "run.ckpt_every=1",
                    "run.tensorboard=false", "run.device=cpu", "data.synthetic.num_samples=16"], stream=quiet) == 0
    (w / "cases").mkdir()
    return w


# ---- hand-made shards -------------------------------------------------------------------------------------------
def npy(arr) -> bytes:
    import numpy as np

    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(arr), version=(1, 0), allow_pickle=False)
    return buf.getvalue()


def write_raw_shard(path: Path, samples: list[dict], describe: dict | None = None) -> None:
    """A shard built member by member (ShardWriter refuses bad data), with an index that describes each sample as
    `describe` claims (default: what the arrays are, as a correct index would)."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            for ext, data in s["members"].items():
                info = tarfile.TarInfo(f"{s['key']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    entries = []
    with open(path, "rb") as f, tarfile.open(fileobj=f) as tar:
        by_key: dict[str, dict] = {}
        for info in tar:
            key, _, ext = info.name.partition(".")
            f.seek(info.offset_data)
            by_key.setdefault(key, {})[ext] = [info.offset_data, info.size, zlib.crc32(f.read(info.size))]
    for s in samples:
        entries.append({"key": s["key"], "members": by_key[s["key"]], **s["describe"], **(describe or {})})
    index = {"format": "tmd-shard", "version": 1, "shard": path.name, "tar_bytes": path.stat().st_size,
             "samples": entries}
    Path(str(path) + ".idx.json").write_text(json.dumps(index))


def raw_sample(key: str, latent, context) -> dict:
    return {"key": key, "members": {"latent.npy": npy(latent), "context.npy": npy(context), "txt": b"a prompt",
                                    "json": json.dumps({"context_len": int(context.shape[0]), "meta": {}}).encode()},
            "describe": {"latent_shape": list(latent.shape), "latent_dtype": "float32",
                         "context_len": int(context.shape[0]), "text_dim": int(context.shape[1]),
                         "context_dtype": "float32"}}


def shard_dir(d: Path, n: int = 8, latent=(16, 3, 8, 8), rows: int = 5, width: int = 32, edit=None) -> Path:
    """d/shard-0.tar with n samples of the given shapes; edit(i, latent, context) may change a sample's arrays."""
    import numpy as np

    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        lat = rng.standard_normal(latent).astype(np.float32)
        ctx = rng.standard_normal((rows, width)).astype(np.float32)
        if edit:
            lat, ctx = edit(i, lat, ctx)
        samples.append(raw_sample(f"{i:04d}", lat, ctx))
    write_raw_shard(d / "shard-0.tar", samples)
    return d


def edit_index(idx: Path, fn) -> None:
    index = json.loads(idx.read_text())
    fn(index)
    idx.write_text(json.dumps(index))


def copy_run(w: Path, d: Path, name: str = "run0") -> Path:
    shutil.copytree(w / name, d / "run")
    return d / "run"


# ---- cases ------------------------------------------------------------------------------------------------------
@dataclass
class Case:
    id: str
    tool: str  # tmd-train | tmd-plan | tmd-sample | tmd-convert | tmd-preprocess | launcher | run dir
    what: str  # the input, in words (the table's first column)
    argv: Callable  # (world, case dir) -> argv (mode bash: (script, env))
    code: int
    says: str
    setup: Callable | None = None  # (world, case dir) -> None
    mode: str = "inproc"  # inproc | python | bash | unshare
    writes: tuple[str, ...] = ()  # paths under the case dir the case may create or change (the run's own files)
    check: Callable | None = None  # (world, case dir, output) -> None: more assertions


@dataclass
class Result:
    code: int
    output: str
    traceback: bool
    changed: list[str] = field(default_factory=list)
    seconds: float = 0.0


CLI_MODULES = {"tmd-train": "tmd_megatron.cli.train", "run dir": "tmd_megatron.cli.train",
               "tmd-plan": "tmd_megatron.cli.plan", "tmd-sample": "tmd_megatron.cli.sample",
               "tmd-convert": "tmd_megatron.cli.convert", "tmd-preprocess": "tmd_megatron.cli.preprocess"}


def _inproc(case: Case, argv: list[str]) -> tuple[int, str, bool]:
    import importlib

    module = importlib.import_module(CLI_MODULES[case.tool])
    out = io.StringIO()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    tb = False
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            code = module.run(argv, stream=out) if case.tool in ("tmd-train", "run dir") else module.main(argv)
        except SystemExit as e:  # argparse
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if not isinstance(e.code, int) and e.code is not None:
                out.write(str(e.code) + "\n")
        except BaseException:  # noqa: BLE001 -- the real entry point would print this traceback and exit 1
            out.write(traceback.format_exc())
            code, tb = 1, True
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass
    return code, out.getvalue(), tb


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def run_case(case: Case, w: Path) -> Result:
    d = w / "cases" / case.id
    d.mkdir(parents=True, exist_ok=True)
    if case.setup:
        case.setup(w, d)
    before = snapshot(w)
    t0 = time.monotonic()
    if case.mode == "inproc":
        code, output, tb = _inproc(case, [str(a) for a in case.argv(w, d)])
    elif case.mode == "python":
        proc = subprocess.run([sys.executable, "-m", CLI_MODULES[case.tool], *map(str, case.argv(w, d))],
                              capture_output=True, text=True, env=_env(), timeout=300, stdin=subprocess.DEVNULL)
        code, output = proc.returncode, proc.stdout + proc.stderr
        tb = "Traceback (most recent call last)" in output
    else:  # bash, unshare: argv gives (command list, extra environment)
        cmd, env = case.argv(w, d)
        base = NO_SLURM if case.mode == "bash" else os.environ
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(base, OMP_NUM_THREADS="1", **env),
                              timeout=300, stdin=subprocess.DEVNULL, cwd=d)
        code, output = proc.returncode, proc.stdout + proc.stderr
        tb = "Traceback (most recent call last)" in output
    seconds = time.monotonic() - t0
    tb = tb or "Traceback (most recent call last)" in output
    after = snapshot(w)
    allowed = [f"cases/{case.id}/{p}" for p in case.writes]
    changed = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p)
                     and not any(p == a or p.startswith(a + "/") for a in allowed))
    return Result(code, output, tb, changed, seconds)


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under root with its type, mode, size, inode and mtime (a rewrite or a replace by rename shows)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            out[rel] = ("dir", st.st_mode) if name in dirnames and not os.path.islink(p) else (
                st.st_mode, st.st_size, st.st_ino, st.st_mtime_ns)
    return out


def unshare_prefix() -> list[str] | None:
    """A private mount namespace (as root, or as a user through a user namespace), or None if the kernel refuses."""
    if shutil.which("unshare") is None:
        return None
    prefix = ["unshare", "--mount"] if os.geteuid() == 0 else ["unshare", "--user", "--map-root-user", "--mount"]
    try:
        ok = subprocess.run([*prefix, "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt 2>/dev/null || "
                             "mount -t tmpfs -o size=1m tmpfs \"$(mktemp -d)\""], capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return prefix if ok.returncode == 0 else None


def table(w: Path, cases, ids=None) -> list[tuple[Case, Result]]:
    rows = []
    for case in cases:
        if ids and case.id not in ids:
            continue
        if case.mode == "unshare" and unshare_prefix() is None:
            continue
        rows.append((case, run_case(case, w)))
    return rows


def first_line(text: str, says: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip() and "Warning" not in ln and "warn(" not in ln]
    hit = [ln for ln in lines if says and says in ln]
    chosen = (hit or [ln for ln in lines if "Error" in ln or "error" in ln or "tmd-" in ln] or lines or [""])[-1]
    return chosen.strip()[:150]
