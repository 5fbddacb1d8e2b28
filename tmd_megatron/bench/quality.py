"""`make bench-quality`: the paper's Table 1/2 comparison at a scale this CPU trains in under an hour.

    python -m tmd_megatron.bench.quality                   # the full benchmark (4 seeds), writes the doc table
    python -m tmd_megatron.bench.quality --ablation gan    # one ablation (bench/quality_ablations.py)
    python -m tmd_megatron.bench.quality --smoke           # minutes-long sizes cut to seconds (test suite)

On the synthetic text-to-video task (tmd_megatron.data.synthetic) it trains a Wan teacher by flow matching, then
distils it with the real trainer (`Trainer(resolve(compose(...)))`, the same code `tmd-train` runs):
- DMD2-v M=1 with KD warm-up: KD on teacher ODE pairs (S1 iterations), then DMD2-v (S2);
- DMD2-v M=1 without KD, and M=2: DMD2-v (S2) from the teacher;
- TMD (M, N) for M in {1, 2}, N in {2, 4}, H = `head_blocks`: TM-MF (S1), then TMD stage 2 (S2).
The paper's budget rule: every arm gets S2 stage-2 iterations, the TM-MF stage and the KD warm-up come on top and
are reported (iterations, and the teacher evaluations the KD pairs cost); the same batch and learning rates for
every arm; the wall time each took beside its scores. Each generator, and the teacher at 50×2 NFE (Euler, CFG),
is scored on the same prompts and noise (bench/scores.py: VBench-like quality, semantic and overall). Seeds pair
the arms: every distillation run and its evaluation noise; the teacher is trained once (the fixed model being
distilled, as Wan is in the paper) and scored with each seed's noise. Paired differences with 95 % intervals:
quality_report.paired_table. Finished steps are cached under <out>/cache (bench/jobs.py).

Runs go through a pool of worker processes (one torch thread each), ordered by their dependencies.
"""
from __future__ import annotations

import argparse
import io
import json
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch

from .doc import DOC, command_line, publish
from .jobs import Cache, Job, schedule
from .jobs import digest as jobs_digest
from .quality_ablations import ABLATIONS, variant_of
from .quality_eval import evaluate, evaluate_teacher, prepare, synthetic_task
from .quality_report import render



@dataclass(frozen=True)
class QualityConfig:
    # Temporal patch 3: a token holds all 3 frames of a 4x4-pixel patch, so motion is local to the patch
    # embedding and the output head; with Wan's (1, 2, 2) a 2-pixel step is half a token and motion stayed at
    # chance after 2000 steps (docs/benchmarks.md). 16 tokens, 2.2M parameters.
    model: dict = field(default_factory=lambda: {"dim": 192, "ffn_dim": 384, "num_heads": 4, "num_layers": 4,
                                                 "text_len": 16, "patch_size": [3, 2, 2]})
    frames: int = 3
    size: int = 16
    scale: int = 1  # the synthetic task's geometry (data/synthetic.py)
    train_clips: int = 8192
    teacher_steps: int = 6000
    teacher_lr: float = 1e-3
    teacher_batch: int = 32
    guidance: float = 3.0  # CFG of the teacher everywhere: its 50x2 sampler, KD pairs, DMD2-v/TMD VSD, TM-MF
    teacher_sampling_steps: int = 50
    sampling_shift: float = 3.0  # the teacher's sampling grid shift (= its flow-matching training shift)
    kd_pairs: int = 1024
    stage1_steps: int = 200  # S1: KD, TM-MF, or extra DMD2-v iterations
    stage2_steps: int = 400  # S2: DMD2-v / TMD stage 2
    curve_points: int = 4  # stage 2 scored after each 1/curve_points of S2 (score vs iteration; resumed runs)
    batch: int = 16
    lr: float = 1e-4  # every student update (KD, TM-MF, DMD2-v/TMD generator)
    lr_critic: float = 1e-4  # fake score and discriminator
    student_every: int = 2  # generator update frequency in stage 2 (the paper: 5)
    head_blocks: int = 1  # H
    disc_layers: tuple[int, ...] = (1, 3)
    disc_width: int = 16
    seeds: tuple[int, ...] = (0, 1, 2, 3)  # paired: at least 4 for a t interval worth reading (issue 14)
    eval_prompts: int = 256
    classifier_steps: int = 800
    workers: int = 2
    # ("dmd2v", M, KD warm-up 1/0) and ("tmd", M, N); the main table of the paper's Tables 1/2
    methods: tuple[tuple, ...] = (("dmd2v", 1, 1), ("dmd2v", 1, 0), ("dmd2v", 2, 0), ("tmd", 1, 2), ("tmd", 1, 4),
                                  ("tmd", 2, 2), ("tmd", 2, 4))


SMOKE = QualityConfig(model={"dim": 32, "ffn_dim": 64, "num_heads": 2, "num_layers": 2, "text_len": 16},
                      train_clips=64, teacher_steps=4, teacher_batch=4, teacher_sampling_steps=2, kd_pairs=8,
                      stage1_steps=2, stage2_steps=2, curve_points=1, batch=4, head_blocks=1, disc_layers=(0, 1), disc_width=8,
                      seeds=(0, 1), eval_prompts=16, classifier_steps=4,
                      methods=(("dmd2v", 1, 1), ("dmd2v", 2, 0), ("tmd", 2, 2)))


def method_name(method: tuple) -> str:
    if len(method) > 3:  # an ablation's variant of a main-table arm (bench/quality_ablations.py)
        return f"{method_name(method[:3])} [{method[3]}]"
    if method[0] == "dmd2v":
        return f"DMD2-v M={method[1]}" + (" (KD warm-up)" if has_kd(method) else (" (no KD)" if method[1] == 1 else ""))
    return f"TMD M={method[1]} N={method[2]}"


def has_kd(method: tuple) -> bool:
    """DMD2-v with the KD warm-up; a 2-tuple ("dmd2v", M) is the older spelling: KD at M = 1 only."""
    return method[0] == "dmd2v" and bool(method[2] if len(method) > 2 else method[1] == 1)


def teacher_evaluations(cfg: QualityConfig, method: tuple) -> int:
    """Teacher forward passes spent before stage 2, per sample of pretraining data summed: the KD pairs' ODEs
    (steps x 2 under CFG). TM-MF trains on data with the student's own unconditional velocity (cfg_source
    'student'), so it spends none; stage 2 spends the same per iteration in every arm."""
    if not has_kd(method):
        return 0
    return cfg.kd_pairs * cfg.teacher_sampling_steps * (2 if cfg.guidance != 1.0 else 1)


# ---- runs (in worker processes) ---------------------------------------------------------------------------
def _common(cfg: QualityConfig, out: Path, name: str, seed: int, steps: int) -> list[str]:
    model = [f"++model.overrides.{k}={json.dumps(v, separators=(',', ':'))}" for k, v in cfg.model.items()]
    return ["model.preset=tiny", *model, "++model.overrides.text_dim=32", "data.source=shards",
            f"data.shards=[{out / 'data'}]", f"data.negative={out / 'negative.pt'}", f"data.global_batch={cfg.batch}",
            f"data.latent=[16,{cfg.frames},{cfg.size // 2},{cfg.size // 2}]", f"run.seed={seed}",
            f"run.out_dir={out / 'runs' / name}", f"run.max_steps={steps}", "run.tensorboard=false",
            "run.log_every=50", "run.ckpt_every=0", "run.resume=never", "run.device=cpu"]


def _stage2(cfg: QualityConfig) -> list[str]:
    layers = ",".join(str(i) for i in cfg.disc_layers)
    return [f"++method.dmd2v.cfg_scale={cfg.guidance}", f"++method.dmd2v.disc_layers=[{layers}]",
            f"++method.dmd2v.disc_width={cfg.disc_width}", f"++method.dmd2v.student_every={cfg.student_every}",
            f"optim.lr={cfg.lr}", f"optim.lr_fake={cfg.lr_critic}", f"optim.lr_disc={cfg.lr_critic}"]


def train_run(overrides: list[str]) -> dict:
    """One training run of the real trainer; returns its export directory and wall time."""
    from tmd_megatron.parallel import Topology
    from tmd_megatron.training.config import compose, resolve
    from tmd_megatron.training.trainer import Trainer

    res = resolve(compose(overrides))
    t0 = time.time()
    Trainer(res, Topology.single(), stream=io.StringIO()).fit()
    return {"export": str(Path(res.raw.run.out_dir) / "export"), "wall": time.time() - t0,
            "steps": res.max_steps, "method": res.method}


def make_kd_pairs(cfg: QualityConfig, out: Path, teacher_dir: str, rank: int, world: int) -> dict:
    """This worker's share of the KD pairs: the teacher's 50-step CFG ODE from stored noise (data/teacher_data)."""
    from tmd_megatron.data.teacher_data import generate_teacher_data
    from tmd_megatron.models.wan import WanModel

    t0 = time.time()
    task = synthetic_task(cfg)
    teacher = WanModel.from_pretrained(teacher_dir).eval()
    prompts = [task.sample(i, 0).prompt for i in range(cfg.kd_pairs)]
    generate_teacher_data(teacher, prompts, task.encode_prompts, task.encode_text(""), out / "kd",
                          latent_shape=task.latent_shape, steps=cfg.teacher_sampling_steps, guidance=cfg.guidance,
                          shift=cfg.sampling_shift, seed=1, batch_size=64, samples_per_shard=max(1, cfg.kd_pairs // 4),
                          save_noise=True, dtype=torch.float32, rank=rank, world_size=world, prefix="kd",
                          progress=False)
    return {"wall": time.time() - t0}


def run_name(method: tuple, seed: int, stage: int) -> str:
    """The run directory of one stage of one method and seed (under <out>/runs)."""
    # M = 1 keeps its _KD/_noKD names; M > 1 without KD keeps the plain name, with KD it needs its own (the kd
    # ablation's DMD2-v M=2 + KD once shared the directory, and so the checkpoints, of DMD2-v M=2)
    tag = ("_KD" if has_kd(method) else ("_noKD" if method[1] == 1 else "")) if method[0] == "dmd2v" else ""
    tag += f"_{method[3]}" if len(method) > 3 else ""
    return f"{method_name(method[:3]).split(' (')[0].replace(' ', '_').replace('=', '')}{tag}_s{seed}_stage{stage}"


def segment_steps(cfg: QualityConfig, k: int) -> int:
    """Stage-2 iterations done after segment k = 1..curve_points."""
    return round(k * cfg.stage2_steps / cfg.curve_points)


def distill(cfg: QualityConfig, out: Path, method: tuple, seed: int, init: str | None, teacher: str, stage: int,
            segment: int = 1) -> dict:
    """Stage `stage` (1 or 2) of one method and seed; stage 2 is scored. The paper's budget rule: every arm's
    stage 2 runs `stage2_steps` iterations; the TM-MF stage and the KD warm-up (`stage1_steps`) come on top.
    Stage 2 runs in `curve_points` segments, each resuming the last (run.resume=auto; resumption is bit-identical,
    tests/training/test_resume.py, and the learning rate is constant) and scored at its end."""
    name = run_name(method, seed, stage)
    variant = variant_of(method)
    if has_kd(method) and stage == 1:  # KD warm-up on the teacher's ODE pairs
        over = _common(cfg, out, name, seed, cfg.stage1_steps)
        over = [o for o in over if not o.startswith(("data.shards", "data.negative"))]
        over += ["method=kd", f"model.teacher={teacher}", f"data.shards=[{out / 'kd'}]",
                 f"data.negative={out / 'negative.pt'}", f"optim.lr={cfg.lr}"]
    elif method[0] == "dmd2v":
        over = _common(cfg, out, name, seed, cfg.stage2_steps) + ["method=dmd2v", f"model.teacher={teacher}",
                                                        f"distill.outer_steps={method[1]}", *_stage2(cfg)]
        if init:
            over.append(f"model.init={init}")
    else:
        _, m, n = method[:3]
        over = _common(cfg, out, name, seed, cfg.stage1_steps if stage == 1 else cfg.stage2_steps)
        over += [f"model.teacher={teacher}", f"distill.outer_steps={m}", f"distill.inner_steps={n}",
                 f"distill.head_blocks={cfg.head_blocks}"]
        if stage == 1:
            over += ["method=tm_mf", f"++method.tm_mf.cfg_scale={cfg.guidance}", f"optim.lr={cfg.lr}"]
        else:
            over += ["method=tmd", f"model.init={init or 'teacher'}", *_stage2(cfg)]
    if variant is not None:
        over += list(variant.stage1 if stage == 1 else variant.stage2)
    if stage == 2:
        over = [o for o in over if not o.startswith(("run.max_steps", "run.resume"))]
        over += [f"run.max_steps={segment_steps(cfg, segment)}", f"run.resume={'never' if segment == 1 else 'auto'}"]
    run = train_run(over)
    if stage == 1:
        return run
    kind = "dmd2v" if method[0] == "dmd2v" else "tmd"
    return {**run, **evaluate(cfg, out, kind, run["export"], seed, method)}


# ---- orchestration ------------------------------------------------------------------------------------------------
DATA_FIELDS = ("model", "frames", "size", "scale", "train_clips", "classifier_steps", "eval_prompts")
TEACHER_FIELDS = DATA_FIELDS + ("teacher_steps", "teacher_lr", "teacher_batch")
KD_FIELDS = TEACHER_FIELDS + ("kd_pairs", "teacher_sampling_steps", "guidance", "sampling_shift", "workers")
SCORES = ("overall", "quality", "semantic")
NOT_ARM_FIELDS = ("seeds", "methods", "workers")  # which arms run, not how one runs
STAGE2_FIELDS = ("stage2_steps", "lr_critic", "student_every", "disc_layers", "disc_width",
                 "curve_points")  # not read by stage 1


def cache_key(cfg: QualityConfig, fields=None) -> dict:
    """The configuration a cached result depends on: `fields`, or every field that shapes one arm's run."""
    d = asdict(cfg)
    return {k: d[k] for k in (fields or [k for k in d if k not in NOT_ARM_FIELDS])}


def run(cfg: QualityConfig, out: Path, log=print, teacher_dir: str | None = None, fresh: bool = False,
        results_file: str = "results.json") -> dict:
    """Data and classifier, then the teacher (this process, all its threads; or `teacher_dir`, the export of an
    earlier run with the same model and data), then every distillation run and evaluation on the worker pool (one
    thread each, so the cores are never oversubscribed). Each finished step is cached under <out>/cache with the
    configuration it depends on (bench/jobs.py), so a rerun runs only what changed; fresh=True ignores the cache."""
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    cache = Cache(None if fresh else out / "cache")
    data_key = jobs_digest(["prepare", cache_key(cfg, DATA_FIELDS)])
    real = cache.get("prepare", data_key)
    if real is None:
        real = {**prepare(cfg, out, log), "files": [str(out / n) for n in ("data", "negative.pt", "classifier.pt")]}
        cache.put("prepare", data_key, real)
    if teacher_dir:
        if not (Path(teacher_dir) / "config.json").exists():
            raise FileNotFoundError(f"--teacher {teacher_dir}: no Wan export there (expected <run>/runs/teacher/export)")
        teacher_run = {"export": str(teacher_dir), "wall": 0.0, "steps": 0, "method": "flow_matching",
                       "reused": str(teacher_dir)}
    else:
        teacher_key = jobs_digest(["teacher", cache_key(cfg, TEACHER_FIELDS)])
        teacher_run = cache.get("teacher", teacher_key)
        if teacher_run is None:
            teacher_run = train_run(_common(cfg, out, "teacher", 0, cfg.teacher_steps) + [
                "method=flow_matching", f"optim.lr={cfg.teacher_lr}", "optim.warmup_steps=100",
                "optim.schedule=cosine", f"data.global_batch={cfg.teacher_batch}"])
            cache.put("teacher", teacher_key, teacher_run)
            log(f"teacher trained in {teacher_run['wall']:.0f} s")
        else:
            log(f"cached teacher ({teacher_run['export']})")
    teacher = teacher_run["export"]
    teacher_id = teacher_dir or cache_key(cfg, TEACHER_FIELDS)  # what the distillation runs depend on
    arm_key = cache_key(cfg)
    needs_kd = any(has_kd(method) for method in cfg.methods)
    jobs = [Job(f"kd_pairs{rank}", make_kd_pairs, (cfg, out, teacher, rank, cfg.workers),
                key=["kd", cache_key(cfg, KD_FIELDS), teacher_id, rank]) for rank in range(cfg.workers if needs_kd else 0)]
    kd_deps = tuple(job.name for job in jobs)
    for seed in cfg.seeds:
        jobs.append(Job(f"eval teacher s{seed}", evaluate_teacher, (cfg, out, seed, teacher),
                        key=["eval teacher", cache_key(cfg, KD_FIELDS), teacher_id, seed]))
        for method in cfg.methods:
            name = f"{method_name(method)} s{seed}"
            key = ["arm", arm_key, teacher_id, list(method), seed]
            variant = variant_of(method)
            first = ()  # the stage-1 job stage 2 starts from
            if (method[0] == "tmd" or has_kd(method)) and not (variant and variant.skip_stage1):  # TM-MF or KD first
                deps = kd_deps if method[0] == "dmd2v" else ()
                stage1_key = {k: v for k, v in arm_key.items() if k not in STAGE2_FIELDS}
                jobs.append(Job(name + " stage1", distill, (cfg, out, method, seed, None, teacher, 1), deps,
                                key=["arm", stage1_key, teacher_id, list(method), seed, 1]))
                first = (name + " stage1",)
            prev = first
            for k in range(1, cfg.curve_points + 1):  # stage 2 in segments; the last is the arm's result
                job = name if k == cfg.curve_points else f"{name} @{segment_steps(cfg, k)}"
                jobs.append(Job(job, distill, (cfg, out, method, seed), prev,
                                lambda r, f=first, k=k: (r[f[0]]["export"] if f else None, teacher, 2, k),
                                key=key + [2, k]))
                prev = (job,)
    results = schedule(jobs, cfg.workers, log, cache)
    summary = {"config": asdict(cfg), "real": real, "teacher_train": teacher_run, "runs": {},
               "minutes": (time.time() - t_start) / 60}
    for seed in cfg.seeds:
        summary["runs"][f"Teacher (Euler {cfg.teacher_sampling_steps}x2, CFG {cfg.guidance:g}) s{seed}"] = \
            results[f"eval teacher s{seed}"]
        for method in cfg.methods:
            name = f"{method_name(method)} s{seed}"
            segments = [results[name if k == cfg.curve_points else f"{name} @{segment_steps(cfg, k)}"]
                        for k in range(1, cfg.curve_points + 1)]
            r = {**results[name], "stage2_steps": cfg.stage2_steps, "stage1_steps": 0,
                 "teacher_evals": teacher_evaluations(cfg, method), "wall": sum(g["wall"] for g in segments),
                 "curve": [{"steps": segment_steps(cfg, k + 1), **{m: g[m] for m in SCORES}}
                           for k, g in enumerate(segments)]}
            if name + " stage1" in results:
                r["wall"] += results[name + " stage1"]["wall"]
                r["stage1_steps"] = results[name + " stage1"]["steps"]
            r["steps"] = r["stage1_steps"] + r["stage2_steps"]
            summary["runs"][name] = r
    (out / results_file).write_text(json.dumps(summary, indent=1))  # an ablation's own file: the figures read the table's
    return summary


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (seconds); never writes the doc")
    ap.add_argument("--out", default="runs/bench_quality", help="working directory (runs, checkpoints, results.json)")
    ap.add_argument("--no-write", action="store_true", help=f"do not update {DOC.name}")
    ap.add_argument("--fresh", action="store_true", help="ignore the cache of finished runs under OUT/cache (after a "
                                                         "code change: the cache keys hold the configuration only)")
    ap.add_argument("--teacher", help="use this teacher export (an earlier run's runs/teacher/export) instead of "
                                      "training one")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                    help="change a QualityConfig field, e.g. --set stage1_steps=1000 "
                         "--set 'methods=[[\"tmd\",1,2]]' (a changed configuration only prints)")
    ap.add_argument("--ablation", choices=sorted(ABLATIONS), help="run this ablation's arms (bench/"
                    "quality_ablations.py) instead of the main table; its own section of the doc")
    args = ap.parse_args(argv)
    cfg = with_settings(SMOKE if args.smoke else QualityConfig(), args.set)
    if args.ablation:
        cfg = replace(cfg, methods=tuple(ABLATIONS[args.ablation]))
    summary = run(cfg, Path(args.out), log=lambda msg: print(msg, flush=True), teacher_dir=args.teacher,
                  fresh=args.fresh, results_file=f"results-{args.ablation}.json" if args.ablation else "results.json")
    section = f"quality-ablation-{args.ablation}" if args.ablation else "quality"
    publish(section, render(summary, command_line("tmd_megatron.bench.quality", argv)),
            write=not (args.smoke or args.no_write or args.set))


def with_settings(cfg: QualityConfig, settings: list[str]) -> QualityConfig:
    """cfg with FIELD=JSON changes (lists become tuples where the field holds tuples)."""
    names = {f.name for f in fields(cfg)}
    changes = {}
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep or key not in names:
            raise SystemExit(f"--set {item!r}: use FIELD=JSON with FIELD one of {sorted(names)}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as err:
            raise SystemExit(f"--set {item!r}: the value is not JSON ({err}); quote strings, e.g. [[\"tmd\",1,2]]")
        if isinstance(getattr(cfg, key), tuple):
            parsed = tuple(tuple(v) if isinstance(v, list) else v for v in parsed)
        changes[key] = parsed
    return replace(cfg, **changes)


if __name__ == "__main__":
    main()
