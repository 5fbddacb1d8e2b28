"""The quality benchmark's tables: mean ± std over seeds of each method's scores, with the run's set-up, and the
paired differences of each arm from its baseline with 95 % confidence intervals (bench/stats.py)."""
from __future__ import annotations

import statistics

from .stats import paired_difference


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def by_method(summary: dict) -> dict[str, dict[str, dict]]:
    """method -> seed label -> run."""
    groups: dict[str, dict[str, dict]] = {}
    for key, r in summary["runs"].items():
        name, seed = key.rsplit(" s", 1)
        groups.setdefault(name, {})[seed] = r
    return groups


def _iterations(r: dict) -> str:
    if "stage1_steps" in r:
        return f"{r['stage1_steps']} + {r['stage2_steps']}"
    return str(r["steps"]) if r.get("steps") else "–"


def table(summary: dict) -> str:
    real = summary["real"]
    lines = ["| method | effective NFE | overall | quality | semantic | motion acc. | shape acc. | FD | "
             "iterations (stage 1 + stage 2) | teacher evaluations before stage 2 | train time |",
             "|---|---|---|---|---|---|---|---|---|---|---|",
             f"| real clips (the scores' ceiling) | – | {real['overall']:.1f} | {real['quality']:.1f} | "
             f"{real['semantic']:.1f} | {real['sem_motion']:.1f} | {real['sem_shape']:.1f} | {real['fd']:.1f} | – | "
             "– | – |"]
    for name, by_seed in by_method(summary).items():
        rs = list(by_seed.values())
        col = lambda k: _mean_std([r[k] for r in rs])  # noqa: E731
        wall = statistics.mean(r["wall"] for r in rs) if "steps" in rs[0] else None
        evals = f"{rs[0]['teacher_evals']:,}" if "teacher_evals" in rs[0] else "–"
        lines.append(f"| {name} | {rs[0]['nfe']:g} | {col('overall')} | {col('quality')} | {col('semantic')} | "
                     f"{col('sem_motion')} | {col('sem_shape')} | {col('fd')} | {_iterations(rs[0])} | {evals} | "
                     f"{f'{wall / 60:.1f} min' if wall else '–'} |")
    return "\n".join(lines)


def baseline_of(name: str, names: list[str]) -> str | None:
    """The arm a method is compared with: DMD2-v at the same M (its KD warm-up variant where there is one); the
    DMD2-v arms without KD against the one with it; an ablation's variant ("<arm> [variant]") against its arm."""
    if name.endswith("]") and " [" in name:
        base = name.rsplit(" [", 1)[0]
        return base if base in names else None
    if not name.startswith(("TMD M=", "DMD2-v M=")) or "KD warm-up" in name:
        return None
    m = name.split("M=")[1].split()[0]
    candidates = [n for n in names if n.startswith(f"DMD2-v M={m}") and n != name]
    kd = [n for n in candidates if "KD warm-up" in n]
    if name.startswith("DMD2-v"):
        return kd[0] if kd else None
    return (kd or candidates or [None])[0]


def paired_table(summary: dict, scores=("overall", "quality", "semantic")) -> str:
    """Each arm minus its baseline over the seeds both ran: mean [95 % CI]; an interval that excludes 0 is the
    evidence of an ordering."""
    groups = by_method(summary)
    names = list(groups)
    lines = ["| method − baseline | seeds | " + " | ".join(f"Δ {s} [95 % CI]" for s in scores) + " |",
             "|---|---|" + "---|" * len(scores)]
    for name in names:
        base = baseline_of(name, names)
        if base is None:
            continue
        seeds = sorted(set(groups[name]) & set(groups[base]))
        if len(seeds) < 2:
            continue
        cells = []
        for s in scores:
            mean, lo, hi = paired_difference([groups[name][k][s] for k in seeds], [groups[base][k][s] for k in seeds])
            cells.append(f"{mean:+.1f} [{lo:+.1f}, {hi:+.1f}]")
        lines.append(f"| {name} − {base} | {len(seeds)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def curve_table(summary: dict, score: str = "overall") -> str:
    """Score vs stage-2 iteration (mean ± std over seeds), from the scored segments of each arm's stage 2."""
    groups = {n: list(rs.values()) for n, rs in by_method(summary).items() if len(next(iter(rs.values())).get(
        "curve", [])) > 1}
    if not groups:
        return ""
    steps = [p["steps"] for p in next(iter(groups.values()))[0]["curve"]]
    lines = ["| method | " + " | ".join(f"{score} at {s} it." for s in steps) + " |", "|---|" + "---|" * len(steps)]
    for name, rs in groups.items():
        cells = [_mean_std([r["curve"][i][score] for r in rs]) for i in range(len(steps))]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render(summary: dict, command: str) -> str:
    cfg = summary["config"]
    t = summary["teacher_train"]
    seeds = len(cfg["seeds"])
    teacher = (f"reused from {t['reused']}" if t.get("reused") else
               f"{t['steps']} flow-matching iterations in {t['wall'] / 60:.1f} min")
    head = (f"Produced by `{command}` in {summary['minutes']:.0f} min ({cfg['workers']} worker processes). "
            f"Mean ± std over {seeds} seeds. Teacher: {teacher}. Budget as in the paper: every arm's stage 2 runs "
            f"{cfg['stage2_steps']} iterations at batch {cfg['batch']}; TMD's TM-MF stage and DMD2-v's KD warm-up "
            f"({cfg['stage1_steps']} iterations) come on top, and the KD pairs' teacher evaluations are counted.")
    paired = paired_table(summary)
    text = head + "\n\n" + table(summary)
    curve = curve_table(summary)
    if curve:
        text += "\n\nScore vs stage-2 iteration (each arm's stage 2 scored after every segment):\n\n" + curve
    if paired:
        text += ("\n\nPaired by seed (the same seed gives both arms the same data order, draws and evaluation "
                 "noise): each arm minus its baseline, mean over seeds with the Student-t 95 % interval.\n\n" + paired)
    return text
