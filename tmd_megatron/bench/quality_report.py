"""The quality benchmark's tables: mean ± std over seeds of each method's scores, with the run's set-up."""
from __future__ import annotations

import statistics


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def table(summary: dict) -> str:
    groups: dict[str, list[dict]] = {}
    for key, r in summary["runs"].items():
        groups.setdefault(key.rsplit(" s", 1)[0], []).append(r)
    real = summary["real"]
    lines = ["| method | effective NFE | overall | quality | semantic | motion acc. | shape acc. | FD | "
             "train iterations | train time |", "|---|---|---|---|---|---|---|---|---|---|",
             f"| real clips (the scores' ceiling) | – | {real['overall']:.1f} | {real['quality']:.1f} | "
             f"{real['semantic']:.1f} | {real['sem_motion']:.1f} | {real['sem_shape']:.1f} | {real['fd']:.1f} | – | – |"]
    for name, rs in groups.items():
        col = lambda k: _mean_std([r[k] for r in rs])  # noqa: E731
        steps = rs[0].get("steps")
        wall = statistics.mean(r["wall"] for r in rs) if "steps" in rs[0] else None
        lines.append(f"| {name} | {rs[0]['nfe']:g} | {col('overall')} | {col('quality')} | {col('semantic')} | "
                     f"{col('sem_motion')} | {col('sem_shape')} | {col('fd')} | {steps if steps else '–'} | "
                     f"{f'{wall / 60:.1f} min' if wall else '–'} |")
    return "\n".join(lines)


def render(summary: dict, command: str) -> str:
    cfg = summary["config"]
    t = summary["teacher_train"]
    seeds = len(cfg["seeds"])
    teacher = (f"reused from {t['reused']}" if t.get("reused") else
               f"{t['steps']} flow-matching iterations in {t['wall'] / 60:.1f} min")
    head = (f"Produced by `{command}` in {summary['minutes']:.0f} min ({cfg['workers']} worker processes). "
            f"Mean ± std over {seeds} seeds. Teacher: {teacher}. Each distilled generator: {cfg['stage1_steps']} + "
            f"{cfg['stage2_steps']} iterations at batch {cfg['batch']}.")
    return head + "\n\n" + table(summary)
