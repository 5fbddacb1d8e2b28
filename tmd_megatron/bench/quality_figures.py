"""Figures of a finished `make bench-quality` run, in the shape of the paper's: overall score vs effective NFE
(Figures 6/11), score vs stage-2 iteration (Figures 7/13) and a grid of sample frames per method (Figure 3).

    python -m tmd_megatron.bench.quality_figures                 # after `make bench-quality`: docs/figures/*.png
    python -m tmd_megatron.bench.quality_figures --smoke --out <dir of a --smoke run> --dir <where>

The points are read from <out>/results.json (means over seeds, bars the Student-t 95 % interval of the mean); the
sample grid decodes each generator's latents for the first evaluation prompts with seed 0's noise, the same
latents the scores read.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from .quality_report import by_method
from .stats import t_quantile

FIGURES = Path(__file__).resolve().parents[2] / "docs" / "figures"
NAMES = {"nfe": "quality_score_vs_nfe.png", "curve": "quality_score_vs_iteration.png",
         "samples": "quality_samples.png"}


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half width of its Student-t 95 % interval (0 for one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, t_quantile(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5


def nfe_series(summary: dict, score: str = "overall") -> dict[str, tuple[float, float, float]]:
    """method -> (effective NFE, mean score, 95 % half width) over its seeds."""
    return {name: (next(iter(rs.values()))["nfe"], *mean_ci([r[score] for r in rs.values()]))
            for name, rs in by_method(summary).items()}


def curve_series(summary: dict, score: str = "overall") -> dict[str, tuple[list[int], list[float], list[float]]]:
    """method -> (stage-2 iterations, mean score, 95 % half width) at each scored segment; arms without a curve
    (the teacher) are left out."""
    out = {}
    for name, rs in by_method(summary).items():
        runs = list(rs.values())
        if not runs[0].get("curve"):
            continue
        points = [mean_ci([r["curve"][i][score] for r in runs]) for i in range(len(runs[0]["curve"]))]
        out[name] = ([p["steps"] for p in runs[0]["curve"]], [m for m, _ in points], [h for _, h in points])
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node or in CI
    import matplotlib.pyplot as plt

    return plt


def _finish(plt, fig, ax, path: Path, xlabel: str, score: str, against: str) -> None:
    """Labels, grid and legend shared by the two score plots, then the file."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{score} score")
    ax.set_title(f"{score} score vs {against} (mean, 95 % CI over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_nfe(summary: dict, path: Path, score: str = "overall") -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, (nfe, mean, half) in nfe_series(summary, score).items():
        marker = "*" if name.startswith("Teacher") else ("o" if name.startswith("TMD") else "s")
        ax.errorbar([nfe], [mean], yerr=[half], fmt=marker, capsize=3, label=name)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())  # 1, 2, 100 rather than 10^0 ...
    _finish(plt, fig, ax, path, "effective NFE (log scale)", score, "effective NFE")


def plot_curve(summary: dict, path: Path, score: str = "overall") -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, (steps, mean, half) in curve_series(summary, score).items():
        ax.errorbar(steps, mean, yerr=half, marker="o" if name.startswith("TMD") else "s", capsize=3, label=name)
    for name, (_, mean, _) in nfe_series(summary, score).items():
        if name.startswith("Teacher"):  # the ceiling the students approach
            ax.axhline(mean, color="grey", linestyle="--", label=name)
    _finish(plt, fig, ax, path, "stage-2 iteration", score, "stage-2 iteration")


def sample_rows(cfg, summary: dict, prompts: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """Row label -> clips [prompts, 3, F, S, S] in [-1, 1]: the real clips of the first evaluation prompts, the
    teacher's and each arm's samples for them with `seed`'s noise."""
    from .quality import method_name
    from .quality_eval import EVAL_SEED, generate, synthetic_task

    task = synthetic_task(cfg)
    rows = {"real": task.clips(prompts, seed=EVAL_SEED)[0]}
    teacher = summary["teacher_train"]["export"]
    rows[f"teacher ({cfg.teacher_sampling_steps}x2)"] = task.decode_latent(
        generate(cfg, "teacher", teacher, seed, count=prompts)[0])
    for method in cfg.methods:
        run = summary["runs"].get(f"{method_name(method)} s{seed}")
        if run is None:
            continue
        kind = "dmd2v" if method[0] == "dmd2v" else "tmd"
        rows[method_name(method)] = task.decode_latent(generate(cfg, kind, run["export"], seed, method,
                                                                count=prompts)[0])
    return rows


def plot_samples(rows: dict[str, torch.Tensor], prompts: list[str], path: Path) -> None:
    """One row per generator, one column per prompt; a cell holds the clip's frames side by side."""
    plt = _pyplot()
    n, f = next(iter(rows.values())).shape[0], next(iter(rows.values())).shape[2]
    fig, axes = plt.subplots(len(rows), n, figsize=(1.1 * f * n, 1.25 * len(rows)), squeeze=False)
    for i, (label, clips) in enumerate(rows.items()):
        for j in range(n):
            frames = clips[j].clamp(-1, 1).add(1).div(2)  # [3, F, S, S] in [0, 1]
            gap = torch.full((3, frames.shape[2], 1), 0.5)  # a grey column between frames
            parts = [t for frame in frames.unbind(1) for t in (frame, gap)][:-1]
            strip = torch.cat(parts, dim=-1).permute(1, 2, 0)  # [S, F*(S+1)-1, 3]
            ax = axes[i][j]
            ax.imshow(strip.numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
            if i == 0:
                ax.set_title(prompts[j], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def make_figures(cfg, out: Path, where: Path, prompts: int = 4, log=print) -> list[Path]:
    from .quality_eval import EVAL_SEED, synthetic_task

    results = out / "results.json"
    if not results.exists():
        raise FileNotFoundError(f"{results} is missing: run `python -m tmd_megatron.bench.quality --out {out}` first")
    summary = json.loads(results.read_text())
    where.mkdir(parents=True, exist_ok=True)
    paths = {k: where / v for k, v in NAMES.items()}
    plot_nfe(summary, paths["nfe"])
    plot_curve(summary, paths["curve"])
    task = synthetic_task(cfg)
    texts = [task.sample(i, EVAL_SEED).prompt for i in range(prompts)]
    plot_samples(sample_rows(cfg, summary, prompts), texts, paths["samples"])
    for p in paths.values():
        log(f"wrote {p}")
    return list(paths.values())


def main(argv=None) -> None:
    from .quality import SMOKE, QualityConfig, with_settings

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="the figures of a --smoke run")
    ap.add_argument("--out", default="runs/bench_quality", help="the working directory of the quality run")
    ap.add_argument("--dir", default=str(FIGURES), help="where the PNG files go")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                    help="the --set changes the quality run was made with")
    args = ap.parse_args(argv)
    cfg = with_settings(SMOKE if args.smoke else QualityConfig(), args.set)
    make_figures(cfg, Path(args.out), Path(args.dir), log=lambda msg: print(msg, flush=True))


if __name__ == "__main__":
    main()
