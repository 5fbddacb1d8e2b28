"""Rank functions for the harness's own test."""
import os
import time


def fail_on_rank_one():
    if int(os.environ["RANK"]) == 1:
        raise ValueError("deliberate failure")
    time.sleep(120)  # rank 0 stands for a rank stuck in a collective


def hang(marker_dir):
    open(os.path.join(marker_dir, f"pid{os.getpid()}"), "w").close()
    time.sleep(120)
