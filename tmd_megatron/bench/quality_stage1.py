"""Scores of the stage-1 students of a finished `make bench-quality` run: the KD warm-up of DMD2-v M=1 and the TM-MF
student of each TMD variant, sampled as their stage 2 will be. Where each method stands before stage 2, to read the
ordering of the main table.

    python -m tmd_megatron.bench.quality_stage1            # after `make bench-quality`; writes its doc section
    python -m tmd_megatron.bench.quality_stage1 --smoke --out <dir of a --smoke run>
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .doc import DOC, command_line, publish
from .jobs import Job, schedule
from .quality import SMOKE, QualityConfig, evaluate, has_kd, method_name, run_name, with_settings
from .quality_report import table


def score(cfg: QualityConfig, out: Path, log=print) -> dict:
    """The main table's summary format, with one row per stage-1 method (mean over the run's seeds)."""
    results = out / "results.json"
    if not results.exists():
        raise FileNotFoundError(f"{results} is missing: run `python -m tmd_megatron.bench.quality --out {out}` first")
    summary = json.loads(results.read_text())
    if summary["config"]["stage1_steps"] != cfg.stage1_steps or list(summary["config"]["seeds"]) != list(cfg.seeds):
        raise ValueError(f"{results} was made with another configuration (--smoke or not): use the same flag here")
    jobs = []
    for method in cfg.methods:
        if method[0] == "dmd2v" and not has_kd(method):
            continue  # single-stage
        label = ("KD" if method[0] == "dmd2v" else "TM-MF") + f" (stage 1 of {method_name(method).split(' (')[0]})"
        kind = "dmd2v" if method[0] == "dmd2v" else "tmd"
        for seed in cfg.seeds:
            export = str(out / "runs" / run_name(method, seed, 1) / "export")
            jobs.append(Job(f"{label} s{seed}", evaluate, (cfg, out, kind, export, seed, method)))
    runs = schedule(jobs, cfg.workers, log)
    steps = {"steps": cfg.stage1_steps}
    return {"real": summary["real"], "runs": {name: {**r, **steps, "wall": 0.0} for name, r in runs.items()}}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="score a --smoke run; never writes the doc")
    ap.add_argument("--out", default="runs/bench_quality", help="the working directory of the quality run")
    ap.add_argument("--no-write", action="store_true", help=f"do not update {DOC.name}")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                    help="the --set changes the quality run was made with (then only prints)")
    args = ap.parse_args(argv)
    cfg = with_settings(SMOKE if args.smoke else QualityConfig(), args.set)
    summary = score(cfg, Path(args.out), log=lambda msg: print(msg, flush=True))
    text = (f"Produced by `{command_line('tmd_megatron.bench.quality_stage1', argv)}` from the run above "
            f"({cfg.stage1_steps} iterations each; the train-time column does not apply).\n\n" + table(summary))
    publish("quality-stage1", text, write=not (args.smoke or args.no_write or args.set))


if __name__ == "__main__":
    main()
