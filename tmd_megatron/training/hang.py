"""Every thread's Python stack in the job log when a training step runs too long (run.hang_dump_s).

A timer thread takes the GIL and reads `sys._current_frames()`: a rank blocked in a collective has released the
GIL (torch.distributed waits in C++ without it), so its stack is read safely. faulthandler's watchdog reads
frames without the GIL instead, and crashed a rank that was busy rather than hung (SIGSEGV while the main
thread parsed a numpy header, seen in the suite), so it is not used for this.
"""
from __future__ import annotations

import sys
import threading
import time
import traceback


def format_stacks(header: str) -> str:
    names = {t.ident: t.name for t in threading.enumerate()}
    parts = [header]
    for ident, frame in sys._current_frames().items():
        if ident == threading.get_ident():
            continue  # the watchdog itself
        parts.append(f"Thread {names.get(ident, ident)} (most recent call last):")
        parts.append("".join(traceback.format_stack(frame)).rstrip())
    return "\n".join(parts) + "\n"


class StepWatchdog:
    """arm(step) before a step, disarm() after it; a step still running after `seconds` prints the stacks once."""

    def __init__(self, seconds: float, rank: int, stream=None):
        self.seconds, self.rank = seconds, rank
        self.stream = stream or sys.__stderr__  # fd 2: the job log, also under pytest's capture
        self._timer = None

    def arm(self, step: int) -> None:
        self.disarm()
        if self.seconds <= 0:
            return
        started = time.monotonic()

        def fire():
            took = time.monotonic() - started
            self.stream.write(format_stacks(f"rank {self.rank}: step {step} has run for {took:.0f} s "
                                            f"(run.hang_dump_s={self.seconds:g}); Python stacks:"))
            self.stream.flush()

        self._timer = threading.Timer(self.seconds, fire)
        self._timer.daemon = True
        self._timer.start()

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
