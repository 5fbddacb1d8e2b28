"""What the battery's cases prepare and check (cases: bad_input_cases.py, harness: bad_inputs.py): broken shards,
planted pickles, broken or escaping checkpoints, the mount-namespace scripts, and the checks run after a case."""
from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

from bad_inputs import Evil, copy_run, edit_index, shard_dir, train_args, unshare_prefix

PY = sys.executable


def marker(w: Path, name: str) -> Path:
    return w / f"PWNED-{name}"


def no_marker(name):
    def check(w, d, out):
        assert not marker(w, name).exists(), "the planted file's command ran"
    return check


# ---- setups -----------------------------------------------------------------------------------------------------
def nan_at(index):
    def edit(i, lat, ctx):
        if i == index:
            lat = lat.copy()
            lat[0, 0, 0, 0] = float("nan")
        return lat, ctx
    return edit


def wrong_dtype(i, lat, ctx):
    return lat.astype("float64"), ctx


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def huge_member(d: Path) -> Path:
    shard_dir(d)
    edit_index(d / "shard-0.tar.idx.json", lambda ix: ix["samples"][3]["members"]["latent.npy"].__setitem__(1, 10**13))
    return d


def planted_metadata(w, d):
    run = copy_run(w, d)
    (run / "checkpoints" / "step_00000002" / ".metadata").write_bytes(
        pickle.dumps(Evil(f"touch {marker(w, 'metadata')}")))


def planted_negative(w, d):
    import torch

    torch.save(Evil(f"touch {marker(w, 'negative')}"), d / "negative.pt")


def with_latest(content: bytes):
    def setup(w, d):
        run = copy_run(w, d)
        (run / "checkpoints" / "latest").write_bytes(content)
    return setup


def absolute_latest(w, d):
    run = copy_run(w, d)
    (run / "checkpoints" / "latest").write_text(f"{w / 'run0' / 'checkpoints' / 'step_00000002'}\n")


def broken_run(*steps, what="distcp"):
    def setup(w, d):
        run = copy_run(w, d)
        for s in steps:
            step = run / "checkpoints" / f"step_{s:08d}"
            if what == "distcp":
                truncate(step / "__0_0.distcp")
            else:
                (step / "meta.json").write_text("{not json")
    return setup


def same_bytes(a: Path, b: Path) -> None:
    fa = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    fb = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert fa == fb, (fa, fb)
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in fa)


def archived(w, d) -> Path:
    found = sorted((d / "run" / "archive").glob("*"))
    assert len(found) == 1, found
    return found[0]


def check_fresh_start(w, d, out):
    """resume=never: the old run's checkpoints, metrics and export are kept byte for byte in archive/; the new
    run's steps are not pruned and `latest` names its last one."""
    old = archived(w, d)
    for s in ("step_00000001", "step_00000002"):
        same_bytes(w / "run0" / "checkpoints" / s, old / "checkpoints" / s)
    assert (old / "metrics.jsonl").read_bytes() == (w / "run0" / "metrics.jsonl").read_bytes()
    same_bytes(w / "run0" / "export", old / "export")
    ck = d / "run" / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_00000003"
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_00000002", "step_00000003"]
    assert [r["step"] for r in map(eval_json, (d / "run" / "metrics.jsonl").read_text().splitlines())] == [1, 2, 3]


def eval_json(line):
    import json

    return json.loads(line)


def check_fresh_start_fewer_steps(w, d, out):
    """The issue's case: a fresh start that saves fewer steps than the old run had. Pruning by name deleted the new
    run's step 1 at once (old step 2 sorted after it), `latest` dangled and the next start continued the old run."""
    from tmd_megatron.training.checkpoint import read_meta, resolve_checkpoint

    old = archived(w, d)
    for s in ("step_00000001", "step_00000002"):
        same_bytes(w / "run0" / "checkpoints" / s, old / "checkpoints" / s)
    ck = d / "run" / "checkpoints"
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_00000001"]
    found = resolve_checkpoint(ck)
    assert found.name == "step_00000001" and read_meta(found)["step"] == 1


def check_resume_earlier(w, d, out):
    old = archived(w, d)
    same_bytes(w / "run0" / "checkpoints" / "step_00000002", old / "checkpoints" / "step_00000002")
    assert (d / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000003"


def check_fallback(w, d, out):
    assert "step_00000002 cannot be loaded" in out and "resumed from" in out and "step_00000001" in out, out
    assert (archived(w, d) / "checkpoints" / "step_00000002").is_dir()  # the broken one, kept
    assert (d / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000003"


def check_disk_full(w, d, out):
    assert "latest still names step_00000001 (complete)" in out, out
    assert "LATEST=step_00000001" in out and "step_00000002.tmp" not in out.split("LATEST=")[-1], out


def check_negative_written(w, d, out):
    """The written embedding is the default negative prompt, the paper's Table 8 English text (not Wan's Chinese
    original), through diffusers' own text rule (WanPipeline's _get_t5_prompt_embeds, an independent
    implementation), cut to its true length, and the trainer's reader accepts it."""
    from types import SimpleNamespace

    import torch
    from diffusers.pipelines.wan.pipeline_wan import WanPipeline
    from transformers import AutoTokenizer, UMT5EncoderModel

    from tmd_megatron.data.text import PAPER_NEGATIVE_PROMPT, WAN_NEGATIVE_PROMPT, load_negative_embedding

    written = load_negative_embedding(d / "negative.pt", text_dim=24, text_len=16)
    pipe = SimpleNamespace(tokenizer=AutoTokenizer.from_pretrained(d / "text"), _execution_device=torch.device("cpu"),
                           text_encoder=UMT5EncoderModel.from_pretrained(d / "text"))
    ref, zh = WanPipeline._get_t5_prompt_embeds(pipe, [PAPER_NEGATIVE_PROMPT, WAN_NEGATIVE_PROMPT],
                                                 max_sequence_length=16)
    rows = int(ref.abs().sum(1).gt(0).sum())
    assert written.shape == (rows, 24) and torch.equal(ref[rows:], torch.zeros_like(ref[rows:]))
    torch.testing.assert_close(written, ref[:rows], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(zh[:rows], ref[:rows], atol=1e-3)  # the check tells the two texts apart


def tiny_umt5(w, d):
    from test_data_preprocess import tiny_tokenizer, tiny_umt5 as model

    tok = tiny_tokenizer()
    tok.save_pretrained(d / "text")
    model(len(tok)).save_pretrained(d / "text")


def text_file(name, content="x"):
    def setup(w, d):
        (d / name).write_text(content)
    return setup


def index_escape(w, d):
    import json
    import shutil

    src = d / "src"
    shutil.copytree(w / "teacher", src)
    (src / "diffusion_pytorch_model.safetensors").rename(src / "part-1.safetensors")
    with __import__("safetensors").safe_open(src / "part-1.safetensors", "pt") as h:
        keys = list(h.keys())
    (src / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: "../../../userdir/data.bin" if i == 0 else "part-1.safetensors" for i, k in enumerate(keys)}}))


def teacher_copy(name="dst"):
    def setup(w, d):
        import shutil

        shutil.copytree(w / "teacher", d / name)
    return setup


def truncated_teacher(w, d):
    teacher_copy("src")(w, d)
    truncate(d / "src" / "diffusion_pytorch_model.safetensors")


def corrupt_student(w, d):
    import shutil

    shutil.copytree(w / "run0" / "export", d / "export")
    (d / "export" / "student.json").write_text('{"flow_head_blocks": 1, "no_such_field": 3}')


# ---- shell cases ------------------------------------------------------------------------------------------------
def launch_env(d: Path, **more) -> dict:
    env = {"PATH": f"{Path(PY).parent}{os.pathsep}{os.environ['PATH']}", "TMD_RECIPE": "tiny_smoke",
           "TMD_DEVICE": "cpu", "TMD_BACKEND": "torch", "TMD_RUN_DIR": str(d / "run"), "TMD_MAX_STEPS": "1"}
    env.update(more)
    return env


def in_namespace(script: str):
    """bash -c script inside a private mount namespace (mounts vanish with it)."""
    return lambda w, d: ([*(unshare_prefix() or []), "bash", "-c", script.format(w=w, d=d, py=PY,
                                                                                 args=" ".join(train_args(w, Path("RUN"))))], {})


READ_ONLY = ("mount -t tmpfs -o ro,size=1m tmpfs {d}/ro && "
             "exec {py} -m tmd_megatron.cli.train {args} run.out_dir={d}/ro/run")
DISK_FULL = (
    "set -u; mount -t tmpfs -o size=24m tmpfs {d}/mnt || exit 99; R={d}/mnt/run; "
    "{py} -m tmd_megatron.cli.train {args} run.out_dir=$R run.max_steps=1 > {d}/mnt/first.log 2>&1 || "
    "{{ cat {d}/mnt/first.log; exit 98; }}; "
    "avail=$(df --output=avail -B1 {d}/mnt | tail -1); head -c $((avail - 262144)) /dev/zero > {d}/mnt/filler; "
    "{py} -m tmd_megatron.cli.train {args} run.out_dir=$R run.max_steps=2; rc=$?; "
    "echo LATEST=$(cat $R/checkpoints/latest); ls $R/checkpoints; exit $rc")
