"""Side-by-side timing on a shared CPU: the contenders run interleaved (A B A B ...), so a burst of load from
other jobs hits both, and each is reported as its median wall time and median process CPU time."""
from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable


def interleaved(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 1) -> dict[str, dict[str, float]]:
    """{name: {"wall": median s, "cpu": median s}} of each fn over `reps` interleaved rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    wall = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    return {name: {"wall": statistics.median(wall[name]), "cpu": statistics.median(cpu[name])} for name in fns}


def load_average() -> float:
    """The 1-minute load average (how busy the shared machine was), or -1 where the OS does not say."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return -1.0
