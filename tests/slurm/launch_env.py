"""What the launcher tests hand to the launchers: the trainer under test and the tiny CPU recipe over gloo.

THE SWITCH: the tests run the stand-in tests/slurm/contract_trainer.py until tmd-train honours the
contract; `TMD_TEST_TRAINER=tmd-train` (or changing the default below) runs them on the real trainer.
Assertions marked "stand-in only" read what only the stand-in writes (steps.log, its accumulator).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from tmd_megatron.training.checkpoint import load_checkpoint, read_meta, resolve_checkpoint

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"
STAND_IN_PATH = REPO / "tests" / "slurm" / "contract_trainer.py"
TRAINER = os.environ.get("TMD_TEST_TRAINER", "stand-in")  # "stand-in" | "tmd-train"
STAND_IN = TRAINER == "stand-in"
# Hydra overrides the real trainer needs here, e.g. its checkpoint-every-step key (the signal tests wait
# for a first checkpoint before signalling).
REAL_TRAINER_OVERRIDES = os.environ.get("TMD_TEST_OVERRIDES", "")


def launcher_env(run_dir: Path, max_steps: int, step_seconds: float = 0.0, **more: str) -> dict[str, str]:
    """TMD_* settings selecting the tiny CPU recipe and gloo, without editing a launcher."""
    env = {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # this venv's python, torchrun, tmd-train
        "TMD_TRAIN_CMD": f"python {STAND_IN_PATH}" if STAND_IN else TRAINER,
        "TMD_RECIPE": "tiny_tmd",
        "TMD_DEVICE": "cpu",
        "TMD_BACKEND": "torch",
        "TMD_RUN_DIR": str(run_dir),
        "TMD_MAX_STEPS": str(max_steps),
        "TMD_OVERRIDES": "" if STAND_IN else REAL_TRAINER_OVERRIDES,
        "CONTRACT_STEP_S": str(step_seconds),  # read by the stand-in only: keeps a run long enough to signal
        "OMP_NUM_THREADS": "1",
    }
    env.update(more)
    return env


def checkpoint_step(run_dir: Path) -> int | None:
    """Step of the checkpoint `latest` resolves to (trainer-agnostic: the project's checkpoint layout)."""
    found = resolve_checkpoint(Path(run_dir) / "checkpoints")
    return None if found is None else int(read_meta(found)["step"])


def expected_accumulator(steps: int, world: int) -> float:
    """The stand-in adds step * sum(rank + 1) per step: closed form after `steps` steps on `world` ranks."""
    return steps * (steps + 1) / 2 * world * (world + 1) / 2


def stand_in_accumulator(run_dir: Path) -> float:
    """The stand-in's accumulator as restored from the latest checkpoint."""
    state = {"acc": torch.zeros(1, dtype=torch.float64), "step": torch.zeros((), dtype=torch.int64)}
    load_checkpoint(resolve_checkpoint(Path(run_dir) / "checkpoints"), state)
    return state["acc"].item()


def steps_log(run_dir: Path) -> list[tuple[int, int]]:
    """(attempt, step) per executed step, written by the stand-in's rank 0."""
    path = Path(run_dir) / "steps.log"
    return [tuple(map(int, line.split())) for line in path.read_text().splitlines()] if path.exists() else []
