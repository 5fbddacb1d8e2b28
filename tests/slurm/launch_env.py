"""What the launcher tests hand to the launchers: the real tmd-train on the tiny self-contained recipe
(experiment=tiny_smoke: the whole TMD stage-2 trio on a seeded random teacher) over gloo."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from tmd_megatron.training.checkpoint import read_meta, resolve_checkpoint

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"
RECIPE = "tiny_smoke"


def launcher_env(run_dir: Path, max_steps: int, **more: str) -> dict[str, str]:
    """TMD_* settings selecting the tiny CPU recipe and gloo, without editing a launcher."""
    env = {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # this venv's python, torchrun, tmd-train
        "TMD_TRAIN_CMD": "tmd-train",
        "TMD_RECIPE": RECIPE,
        "TMD_DEVICE": "cpu",
        "TMD_BACKEND": "torch",
        "TMD_RUN_DIR": str(run_dir),
        "TMD_MAX_STEPS": str(max_steps),
        "TMD_OVERRIDES": "",
        "OMP_NUM_THREADS": "1",
    }
    env.update(more)
    return env


def checkpoint_step(run_dir: Path) -> int | None:
    """Step of the checkpoint `latest` resolves to (trainer-agnostic: the project's checkpoint layout)."""
    found = resolve_checkpoint(Path(run_dir) / "checkpoints")
    return None if found is None else int(read_meta(found)["step"])


def logged_steps(run_dir: Path) -> list[int]:
    """Steps the trainer logged, one per line of metrics.jsonl (a step re-run after a resume appears twice)."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []
