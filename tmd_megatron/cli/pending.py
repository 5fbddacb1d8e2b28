"""Entry points whose implementation lands with a later issue; they say so instead of pretending."""
import sys


def _pending(name: str, issue: str) -> int:
    print(f"{name}: not implemented yet (tracked in the issue '{issue}')", file=sys.stderr)
    return 2


def train() -> int:
    return _pending("tmd-train", "Training system")


def sample() -> int:
    return _pending("tmd-sample", "Training system")


def plan() -> int:
    return _pending("tmd-plan", "Training system")
