"""Run logging: a console line with a progress bar, JSON lines, TensorBoard, and optionally wandb.

Only global rank 0 writes. Every record is one dict of floats per step, so the JSONL file doubles as the
loss trajectory that resume tests compare bit for bit.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

# Metrics that measure the machine, not the training: left out where runs are compared (resume, layouts).
TIMING_METRICS = ("step_time_s", "tflops_per_device", "mfu")


class MetricLogger:
    def __init__(self, out_dir, total_steps: int, enabled: bool = True, tensorboard: bool = True,
                 wandb_project: str | None = None, config: dict | None = None, stream=None):
        self.enabled = enabled
        self.total = total_steps
        self.stream = stream or sys.stdout
        self._t0 = time.monotonic()
        self._tb = self._wandb = self._jsonl = None
        if not enabled:
            return
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        # Appending keeps one trajectory across requeues; a resumed run rewrites from its step onwards.
        self._jsonl = open(out / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(out / "tensorboard"))
        if wandb_project:
            try:
                import wandb
            except ImportError:
                print("wandb is not installed: pip install wandb, or drop logging.wandb_project", file=sys.stderr)
            else:
                self._wandb = wandb.init(project=wandb_project, config=config or {}, dir=str(out), resume="allow")

    def log(self, step: int, values: dict[str, float], console: bool = True) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: float(v) for k, v in values.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, float(v), step)
        if self._wandb is not None:
            self._wandb.log(values, step=step)
        if console:
            self.stream.write(self.format_line(step, values) + "\n")
            self.stream.flush()

    def format_line(self, step: int, values: dict[str, float]) -> str:
        frac = min(1.0, step / self.total) if self.total else 1.0
        bar = "#" * int(20 * frac) + "." * (20 - int(20 * frac))
        elapsed = time.monotonic() - self._t0
        shown = "  ".join(f"{k}={_fmt(v)}" for k, v in values.items())
        return f"[{bar}] {step}/{self.total} {elapsed:6.1f}s  {shown}"

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _fmt(v: float) -> str:
    v = float(v)
    if v != v or math.isinf(v):
        return str(v)
    return f"{v:.4g}"


def read_metrics(path) -> list[dict]:
    """Records of a metrics.jsonl; for a step logged twice (a resume re-ran it) the later record wins."""
    by_step: dict[int, dict] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            by_step[r["step"]] = r
    return [by_step[s] for s in sorted(by_step)]
