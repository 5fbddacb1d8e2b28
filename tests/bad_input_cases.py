"""The battery's cases (harness: bad_inputs.py). Each: the tool, the input in words, its argv builder, the exit code
and a phrase of the message expected, what the case prepares, and which of its own paths it may write.

    python tests/bad_input_cases.py /tmp/world [case ids]    # the table, against whatever tmd_megatron imports
"""
from __future__ import annotations

import sys
from pathlib import Path

from bad_input_setups import (DISK_FULL, READ_ONLY, absolute_latest, broken_run, check_disk_full, check_fallback,
                              check_fresh_start, check_fresh_start_fewer_steps, check_negative_written,
                              check_resume_earlier, corrupt_student, huge_member, in_namespace, index_escape,
                              launch_env, marker, nan_at, no_marker, planted_metadata, planted_negative, teacher_copy,
                              text_file, tiny_umt5, truncate, truncated_teacher, with_latest, wrong_dtype)
from bad_inputs import LAUNCH, Case, copy_run, first_line, shard_args, shard_dir, table, train_args

T = "tmd-train"
CASES: list[Case] = [
    # ---- tmd-train: what is checked before a model is built --------------------------------------------------------
    Case("train-teacher-missing", T, "model.teacher names no directory", lambda w, d: train_args(
        w, d / "run", f"model.teacher={w / 'nope'}"), 2, "model.teacher=", mode="python"),
    Case("train-teacher-not-ckpt", T, "model.teacher is a user's directory", lambda w, d: train_args(
        w, d / "run", f"model.teacher={w / 'userdir'}"), 2, "no *.safetensors weights"),
    Case("train-teacher-other-model", T, "teacher of another size (num_layers 4, recipe 3)", lambda w, d: train_args(
        w, d / "run", "+model.overrides.num_layers=3"), 2, "does not match model.preset"),
    Case("train-init-missing", T, "stage 2 with model.init naming nothing", lambda w, d: train_args(
        w, d / "run", "method=tmd", f"model.init={w / 'nope'}"), 2, "model.init="),
    Case("train-init-not-export", T, "stage 2 with model.init = a Wan checkpoint", lambda w, d: train_args(
        w, d / "run", "method=tmd", f"model.init={w / 'teacher'}"), 2, "not a TMD student export"),
    Case("train-shards-empty", T, "data.shards = an empty directory", lambda w, d: train_args(
        w, d / "run", *shard_args(d)), 2, "no .tar shards"),
    Case("train-shards-truncated", T, "a truncated shard", lambda w, d: train_args(w, d / "run", *shard_args(d)), 2,
         "truncated", setup=lambda w, d: truncate(shard_dir(d) / "shard-0.tar", 0.7)),
    Case("train-shards-no-index", T, "a shard without its index", lambda w, d: train_args(w, d / "run", *shard_args(d)),
         2, "has no index", setup=lambda w, d: (shard_dir(d) / "shard-0.tar.idx.json").unlink()),
    Case("train-shards-float64", T, "latents stored as float64", lambda w, d: train_args(w, d / "run", *shard_args(d)),
         2, "expected C-order <f4 or <u2", setup=lambda w, d: shard_dir(d, edit=wrong_dtype)),
    Case("train-shards-nan-first", T, "NaN in the first sample", lambda w, d: train_args(w, d / "run", *shard_args(d)),
         2, "non-finite", setup=lambda w, d: shard_dir(d, edit=nan_at(0))),
    Case("train-shards-nan-later", T, "NaN in a sample read at step 1 or 2", lambda w, d: train_args(
        w, d / "run", *shard_args(d), "data.global_batch=4"), 2, "non-finite",
         setup=lambda w, d: shard_dir(d, edit=nan_at(5)), writes=("run",)),
    Case("train-shards-text-too-long", T, "prompts of 80 text rows (text_len 64)", lambda w, d: train_args(
        w, d / "run", *shard_args(d)), 2, "more than text_len=64", setup=lambda w, d: shard_dir(d, rows=80)),
    Case("train-shards-text-width", T, "text embeddings 16 wide (model: 32)", lambda w, d: train_args(
        w, d / "run", *shard_args(d)), 2, "16 wide", setup=lambda w, d: shard_dir(d, width=16)),
    Case("train-shards-latent-shape", T, "latents [16,3,16,16], recipe [16,3,8,8]", lambda w, d: train_args(
        w, d / "run", *shard_args(d)), 2, "data.latent", setup=lambda w, d: shard_dir(d, latent=(16, 3, 16, 16))),
    Case("train-shards-huge-size", T, "index gives a member size of 1e13", lambda w, d: train_args(
        w, d / "run", *shard_args(d)), 2, "lies outside", setup=lambda w, d: huge_member(d)),
    Case("train-shards-one-path", T, "data.shards=/path (no brackets), good shards", lambda w, d: train_args(
        w, d / "run", *shard_args(w / "shards"), "run.max_steps=1"), 0, "finished 1 steps", writes=("run",)),
    Case("train-negative-missing", T, "data.negative names no file", lambda w, d: train_args(
        w, d / "run", *shard_args(w / "shards"), f"data.negative={w / 'nope.pt'}"), 2, "tmd-preprocess negative"),
    Case("train-negative-pickle", T, "data.negative is a pickle that runs a command", lambda w, d: train_args(
        w, d / "run", *shard_args(w / "shards"), f"data.negative={d / 'negative.pt'}"), 2, "weights_only",
         setup=planted_negative, check=no_marker("negative")),
    Case("train-negative-width", T, "negative embedding [4, 16] (model: 32 wide)", lambda w, d: train_args(
        w, d / "run", *shard_args(w / "shards"), f"data.negative={d / 'n.pt'}"), 2, "encoded for another model",
         setup=lambda w, d: __import__("torch").save(__import__("torch").ones(4, 16), d / "n.pt")),
    Case("train-plus-unknown-key", T, "+run.foo=1 (the + hydra suggests)", lambda w, d: train_args(
        w, d / "run", "+run.foo=1"), 2, "unknown recipe keys ['run.foo']"),
    Case("train-unknown-key", T, "run.foo=1 (misspelt key)", lambda w, d: train_args(w, d / "run", "run.foo=1"), 2,
         "run.foo is not a recipe key"),
    Case("train-gan-weight-negative", T, "method.dmd2v.gan_weight=-0.03", lambda w, d: [
        "experiment=tiny_smoke", f"run.out_dir={d / 'run'}", "method.dmd2v.gan_weight=-0.03"], 2, "gan_weight=-0.03"),
    Case("train-cfg-negative", T, "method.tm_mf.cfg_scale=-3", lambda w, d: train_args(
        w, d / "run", "method.tm_mf.cfg_scale=-3"), 2, "cfg_scale=-3"),
    Case("train-shift-zero", T, "method.tm_mf.outer_shift=0", lambda w, d: train_args(
        w, d / "run", "method.tm_mf.outer_shift=0"), 2, "outer_shift=0 must be positive"),
    Case("train-out-is-file", T, "run.out_dir inside a file's path", lambda w, d: train_args(
        w, w / "userdir" / "notes.txt" / "run"), 2, "is not a directory"),
    Case("train-out-read-only", T, "run.out_dir on a read-only filesystem", in_namespace(READ_ONLY), 2,
         "is not writable", mode="unshare", setup=lambda w, d: (d / "ro").mkdir()),
    # ---- the run directory --------------------------------------------------------------------------------------
    Case("rundir-latest-binary", "run dir", "checkpoints/latest holds binary bytes", lambda w, d: train_args(
        w, d / "run", "run.max_steps=3"), 2, "not the name of a step directory",
         setup=with_latest(b"\x89PNG\x00\xff\xfe\n"), mode="python"),
    Case("rundir-latest-relative-escape", "run dir", "latest = ../../../../run0/checkpoints/step_00000002",
         lambda w, d: train_args(w, d / "run", "run.max_steps=3"), 2, "not the name of a step directory",
         setup=with_latest(b"../../../../run0/checkpoints/step_00000002\n")),
    Case("rundir-latest-absolute-escape", "run dir", "latest = another run's checkpoint (absolute path)",
         lambda w, d: train_args(w, d / "run", "run.max_steps=3"), 2, "not the name of a step directory",
         setup=absolute_latest),
    Case("rundir-planted-pickle", "run dir", "latest checkpoint's .metadata replaced by a command-running pickle",
         lambda w, d: train_args(w, d / "run", "run.max_steps=3"), 2, "not written by tmd-train",
         setup=planted_metadata, mode="python", check=no_marker("metadata")),
    Case("rundir-truncated-distcp", "run dir", "latest checkpoint's .distcp truncated", lambda w, d: train_args(
        w, d / "run", "run.max_steps=3"), 0, "cannot be loaded", setup=broken_run(2), writes=("run",),
         check=check_fallback),
    Case("rundir-corrupt-meta", "run dir", "latest checkpoint's meta.json garbled", lambda w, d: train_args(
        w, d / "run", "run.max_steps=3"), 0, "cannot be loaded", setup=broken_run(2, what="meta"), writes=("run",),
         check=check_fallback),
    Case("rundir-all-corrupt", "run dir", "every checkpoint's .distcp truncated", lambda w, d: train_args(
        w, d / "run", "run.max_steps=3"), 2, "none of the checkpoints", setup=broken_run(1, 2)),
    Case("rundir-other-architecture", "run dir", "resume with num_layers 4 -> 3", lambda w, d: [
        "experiment=tiny_teacher", f"run.out_dir={d / 'run'}", "run.max_steps=3", "run.tensorboard=false",
        "data.synthetic.num_samples=16", "+model.overrides.num_layers=3"], 2, "written for another model",
         setup=lambda w, d: copy_run(w, d, "run_fm")),
    Case("rundir-other-method", "run dir", "resume a TM-MF run as flow matching", lambda w, d: train_args(
        w, d / "run", "method=flow_matching", "run.max_steps=3"), 2, "written by method 'tm_mf'",
         setup=lambda w, d: copy_run(w, d)),
    Case("rundir-resume-never", "run dir", "run.resume=never in a used run dir (keep_last=2)", lambda w, d: train_args(
        w, d / "run", "run.resume=never", "run.max_steps=3", "run.keep_last=2"), 0, "archived",
         setup=lambda w, d: copy_run(w, d), writes=("run",), check=check_fresh_start),
    Case("rundir-resume-never-fewer", "run dir", "run.resume=never, new run shorter than the old (keep_last=1)",
         lambda w, d: train_args(w, d / "run", "run.resume=never", "run.max_steps=1", "run.keep_last=1"), 0,
         "archived", setup=lambda w, d: copy_run(w, d), writes=("run",), check=check_fresh_start_fewer_steps),
    Case("rundir-resume-earlier", "run dir", "run.resume=1 with step 2 present", lambda w, d: train_args(
        w, d / "run", "run.resume=1", "run.max_steps=3"), 0, "resumed from", setup=lambda w, d: copy_run(w, d),
         writes=("run",), check=check_resume_earlier),
    Case("rundir-resume-missing-step", "run dir", "run.resume=7 (no such step)", lambda w, d: train_args(
        w, d / "run", "run.resume=7"), 2, "not a complete checkpoint", setup=lambda w, d: copy_run(w, d)),
    Case("rundir-disk-full", "run dir", "disk full during the step-2 save (tmpfs)", in_namespace(DISK_FULL), 2,
         "no space left on", mode="unshare", check=check_disk_full, setup=lambda w, d: (d / "mnt").mkdir()),
    # ---- tmd-plan -----------------------------------------------------------------------------------------------
    Case("plan-teacher-missing", "tmd-plan", "model.teacher names no directory", lambda w, d: [
        "tiny_tmd", "--world", "1", "method=tm_mf", f"model.teacher={w / 'nope'}"], 2, "model.teacher=", mode="python"),
    Case("plan-shift-zero", "tmd-plan", "method.dmd2v.outer_shift=0", lambda w, d: [
        "tiny_smoke", "--world", "1", "method.dmd2v.outer_shift=0"], 2, "outer_shift=0 must be positive"),
    Case("plan-shards-wrong-shape", "tmd-plan", "shards of another latent shape", lambda w, d: [
        "tiny_tmd", "--world", "1", "method=tm_mf", f"model.teacher={w / 'teacher'}", *shard_args(d)], 2,
         "data.latent", setup=lambda w, d: shard_dir(d, latent=(16, 3, 16, 16))),
    Case("plan-world-indivisible", "tmd-plan", "TP2 on 3 processes", lambda w, d: [
        "tiny_smoke", "--world", "3", "parallel.tp=2"], 2, "not divisible by tp*cp*pp"),
    Case("plan-unknown-recipe", "tmd-plan", "a recipe name that does not exist", lambda w, d: [
        "no_such_recipe", "--world", "8"], 2, "Could not find 'experiment/no_such_recipe'"),
    Case("plan-world-zero", "tmd-plan", "--world 0", lambda w, d: ["tiny_smoke", "--world", "0"], 2, "--world 0"),
    Case("plan-plus-key", "tmd-plan", "+parallel.fast=true", lambda w, d: [
        "tiny_smoke", "--world", "1", "+parallel.fast=true"], 2, "unknown recipe keys"),
    Case("plan-layout-only", "tmd-plan", "14B stage 2 before stage 1 exists, --layout-only", lambda w, d: [
        "wan14b_tmd_n4h5_m1", "--world", "64", "--device-memory", "80", "model.init=/not/yet", "--layout-only"], 0,
         "DP4 x PP2 x CP2 x TP4"),
    # ---- tmd-sample ---------------------------------------------------------------------------------------------
    Case("sample-teacher-steps-zero", "tmd-sample", "--teacher-steps 0", lambda w, d: [
        w / "teacher", "--sampler", "teacher", "--teacher-steps", "0", "--prompts", "a", "--synthetic", "--out",
        d / "o"], 2, "--teacher-steps 0", mode="python"),
    Case("sample-teacher-steps-huge", "tmd-sample", "--teacher-steps 1000000", lambda w, d: [
        w / "teacher", "--sampler", "teacher", "--teacher-steps", "1000000", "--prompts", "a", "--synthetic",
        "--out", d / "o"], 2, "--teacher-steps 1000000"),
    Case("sample-outer-zero", "tmd-sample", "--outer-steps 0", lambda w, d: [
        w / "run0" / "export", "--outer-steps", "0", "--prompts", "a", "--synthetic", "--out", d / "o"], 2,
         "--outer-steps 0"),
    Case("sample-inner-zero", "tmd-sample", "--inner-steps 0", lambda w, d: [
        w / "run0" / "export", "--inner-steps", "0", "--prompts", "a", "--synthetic", "--out", d / "o"], 2,
         "--inner-steps 0"),
    Case("sample-model-missing", "tmd-sample", "model directory does not exist", lambda w, d: [
        w / "nope", "--prompts", "a", "--synthetic", "--out", d / "o"], 2, "does not exist"),
    Case("sample-model-not-ckpt", "tmd-sample", "model = a user's directory", lambda w, d: [
        w / "userdir", "--prompts", "a", "--synthetic", "--out", d / "o"], 2, "no *.safetensors weights"),
    Case("sample-latent-malformed", "tmd-sample", "--latent 16,3,8", lambda w, d: [
        w / "run0" / "export", "--latent", "16,3,8", "--prompts", "a", "--synthetic", "--out", d / "o"], 2,
         "four positive sizes"),
    Case("sample-latent-channels", "tmd-sample", "--latent 8,3,8,8 (model: 16 channels)", lambda w, d: [
        w / "run0" / "export", "--latent", "8,3,8,8", "--prompts", "a", "--synthetic", "--out", d / "o"], 2,
         "16 channels"),
    Case("sample-prompts-file-missing", "tmd-sample", "--prompts-file names no file", lambda w, d: [
        w / "run0" / "export", "--prompts-file", w / "nope.txt", "--synthetic", "--out", d / "o"], 2, "nope.txt"),
    Case("sample-cfg-negative", "tmd-sample", "--cfg-scale -5", lambda w, d: [
        w / "teacher", "--sampler", "teacher", "--cfg-scale", "-5", "--prompts", "a", "--synthetic", "--out", d / "o"],
         2, "--cfg-scale -5"),
    Case("sample-out-is-file", "tmd-sample", "--out = a user's file", lambda w, d: [
        w / "run0" / "export", "--prompts", "a", "--synthetic", "--out", w / "userdir" / "notes.txt"], 2,
         "holds other files"),
    Case("sample-out-user-dir", "tmd-sample", "--out = a user's directory", lambda w, d: [
        w / "run0" / "export", "--prompts", "a", "--synthetic", "--out", w / "userdir"], 2, "holds other files"),
    Case("sample-student-json-bad", "tmd-sample", "student.json of another version", lambda w, d: [
        d / "export", "--prompts", "a", "--synthetic", "--out", d / "o"], 2, "not a complete TMD student export",
         setup=corrupt_student),
    # ---- tmd-convert --------------------------------------------------------------------------------------------
    Case("convert-over-user-dir", "tmd-convert", "DST = a user's directory with files", lambda w, d: [
        w / "teacher", w / "userdir", "--to", "diffusers"], 2, "is not empty", mode="python"),
    Case("convert-over-run", "tmd-convert", "RUN/export/wan -> RUN (a whole run)", lambda w, d: [
        d / "run" / "export" / "wan", d / "run", "--to", "diffusers", "--replace"], 2, "overlap",
         setup=lambda w, d: copy_run(w, d)),
    Case("convert-dst-is-src", "tmd-convert", "DST = SRC", lambda w, d: [
        d / "dst", d / "dst", "--to", "original", "--replace"], 2, "overlap", setup=teacher_copy()),
    Case("convert-student-export", "tmd-convert", "SRC = a TMD student export", lambda w, d: [
        w / "run0" / "export", d / "out", "--to", "diffusers"], 2, "is a TMD student export"),
    Case("convert-existing-ckpt", "tmd-convert", "DST = an existing checkpoint, no --replace", lambda w, d: [
        w / "teacher", d / "dst", "--to", "diffusers"], 2, "--replace", setup=teacher_copy()),
    Case("convert-replace-ckpt", "tmd-convert", "DST = an existing checkpoint, --replace", lambda w, d: [
        w / "teacher", d / "dst", "--to", "diffusers", "--replace"], 0, "wrote", setup=teacher_copy(),
         writes=("dst",)),
    Case("convert-replace-user-dir", "tmd-convert", "DST = a user's directory, --replace", lambda w, d: [
        w / "teacher", w / "userdir", "--to", "diffusers", "--replace"], 2, "not a checkpoint's"),
    Case("convert-index-escape", "tmd-convert", "index names a shard outside its directory", lambda w, d: [
        d / "src", d / "out", "--to", "original"], 2, "outside", setup=index_escape),
    Case("convert-truncated", "tmd-convert", "SRC safetensors truncated", lambda w, d: [
        d / "src", d / "out", "--to", "original"], 2, "truncated or corrupt", setup=truncated_teacher),
    Case("convert-dst-file", "tmd-convert", "DST = a file", lambda w, d: [
        w / "teacher", w / "userdir" / "notes.txt", "--to", "original"], 2, "not a directory"),
    Case("convert-bad-size", "tmd-convert", "--shard-size 5XB", lambda w, d: [
        w / "teacher", d / "out", "--to", "original", "--shard-size", "5XB"], 2, "cannot read size"),
    # ---- tmd-preprocess -----------------------------------------------------------------------------------------
    Case("pre-negative", "tmd-preprocess", "negative: umT5 embedding of the negative prompt (tiny umT5)", lambda w, d: [
        "negative", d / "text", d / "negative.pt", "--text-len", "16"], 0, "wrote", setup=tiny_umt5,
         writes=("negative.pt",), check=check_negative_written),
    Case("pre-negative-no-encoder", "tmd-preprocess", "negative: encoder folder missing", lambda w, d: [
        "negative", w / "nope", d / "negative.pt"], 2, "nope"),
    Case("pre-negative-exists", "tmd-preprocess", "negative: output file exists", lambda w, d: [
        "negative", w / "nope", w / "userdir" / "notes.txt"], 2, "exists"),
    Case("pre-verify-huge-size", "tmd-preprocess", "verify: one good shard, one whose index gives a size of 1e13",
         lambda w, d: ["verify", d], 1, "lies outside", setup=lambda w, d: (
             huge_member(d), __import__("shutil").copy(w / "shards" / "synthetic-000000.tar", d),
             __import__("shutil").copy(w / "shards" / "synthetic-000000.tar.idx.json", d))),
    Case("pre-index-not-tar", "tmd-preprocess", "index: a text file", lambda w, d: ["index", d / "x.tar"], 2, "x.tar",
         setup=text_file("x.tar", "not a tar\n")),
    Case("pre-teacher-latent-shape", "tmd-preprocess", "teacher: --latent-shape 16,21", lambda w, d: [
        "teacher", d / "p.txt", d / "out", "--teacher", w / "teacher", "--text-encoder", "synthetic",
        "--latent-shape", "16,21"], 2, "--latent-shape 16,21", setup=text_file("p.txt", "a red circle\n"),
         mode="python"),
    Case("pre-teacher-missing", "tmd-preprocess", "teacher: --teacher names nothing", lambda w, d: [
        "teacher", d / "p.txt", d / "out", "--teacher", w / "nope", "--text-encoder", "synthetic",
        "--latent-shape", "16,3,8,8"], 2, "does not exist", setup=text_file("p.txt", "a red circle\n")),
    Case("pre-synthetic-zero", "tmd-preprocess", "synthetic: --num-samples 0", lambda w, d: [
        "synthetic", d / "out", "--num-samples", "0"], 2, "--num-samples 0"),
    Case("pre-videos-no-manifest", "tmd-preprocess", "videos: manifest missing", lambda w, d: [
        "videos", w / "nope.jsonl", d / "out", "--vae", w / "nope", "--text-encoder", w / "nope"], 2, "nope.jsonl"),
    Case("pre-synthetic-out-file", "tmd-preprocess", "synthetic: out = a user's file", lambda w, d: [
        "synthetic", w / "userdir" / "notes.txt", "--num-samples", "4"], 2, "notes.txt"),
    # ---- launchers ----------------------------------------------------------------------------------------------
    Case("launch-smoke-tp-word", "launcher", "smoke_8gpu.sh with TMD_TP=two", lambda w, d: (
        ["bash", str(LAUNCH / "smoke_8gpu.sh")], launch_env(d, TMD_TP="two")), 2, "TMD_TP=two: must be a positive",
         mode="bash"),
    Case("launch-smoke-nproc", "launcher", "smoke_8gpu.sh with 6 ranks for TP2xCP2xPP2", lambda w, d: (
        ["bash", str(LAUNCH / "smoke_8gpu.sh")], launch_env(d, TMD_NPROC="6")), 2, "6 ranks do not divide",
         mode="bash"),
    Case("launch-outside-slurm", "launcher", "tmd_1p3b.sh run with bash, no SLURM", lambda w, d: (
        ["bash", str(LAUNCH / "tmd_1p3b.sh")], launch_env(d)), 2, "run this through sbatch", mode="bash"),
    Case("launch-mode-bogus", "launcher", "tmd_14b.sh in a job with TMD_LAUNCH_MODE=mpi", lambda w, d: (
        ["bash", str(LAUNCH / "tmd_14b.sh")], launch_env(d, SLURM_JOB_ID="1", TMD_LAUNCH_MODE="mpi")), 2,
         "TMD_LAUNCH_MODE=mpi", mode="bash"),
    Case("launch-trainer-missing", "launcher", "tmd_14b.sh in a job, TMD_TRAIN_CMD not installed", lambda w, d: (
        ["bash", str(LAUNCH / "tmd_14b.sh")], launch_env(d, SLURM_JOB_ID="1", TMD_TRAIN_CMD="tmd-train-missing")), 2,
         "not found on PATH", mode="bash"),
    Case("launch-precheck", "launcher", "tmd_14b.sh in a job with a misspelt override (no rank started)",
         lambda w, d: (["bash", str(LAUNCH / "tmd_14b.sh")], launch_env(
             d, SLURM_JOB_ID="1", SLURM_JOB_NUM_NODES="1", SLURM_NTASKS_PER_NODE="1", TMD_TP="1", TMD_CP="1",
             TMD_PP="1", TMD_OVERRIDES="run.no_such_key=1")), 2, "nothing was started", mode="bash"),
    Case("launch-overrides-shell", "launcher", "TMD_OVERRIDES with $(...), `...` and ; (1 rank)", lambda w, d: (
        ["bash", str(LAUNCH / "smoke_8gpu.sh")], launch_env(
            d, TMD_NPROC="1", TMD_TP="1", TMD_CP="1", TMD_PP="1",
            TMD_OVERRIDES=f"$(touch {marker(w, 'a')}) `touch {marker(w, 'b')}` ;touch {marker(w, 'c')}")), 2,
         "nothing was started", mode="bash", check=lambda w, d, out: [no_marker(m)(w, d, out) for m in "abc"]),
]


if __name__ == "__main__":
    from bad_inputs import build_world

    world = Path(sys.argv[1])
    if not (world / "cases").exists():
        build_world(world)
    for case, r in table(world, CASES, set(sys.argv[2:])):
        print(" | ".join([case.id, case.tool, case.what, f"exit {r.code}", "traceback" if r.traceback else "-",
                          f"changed {r.changed[:3]}" if r.changed else "-", first_line(r.output, case.says),
                          f"{r.seconds:.1f}s"]), flush=True)
