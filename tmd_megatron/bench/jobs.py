"""Benchmark jobs on a pool of worker processes, ordered by their dependencies, with finished jobs cached.

A job with a `key` (the JSON of everything its result depends on: configuration, method, seed, and the keys of
the jobs it depends on) keeps its result in <cache>/<name>.json beside that key. A rerun takes the stored result
instead of running the job when the key is unchanged and every path the result names still exists; a changed key
reruns the job and, through the keys that include it, everything after it. Results are plain JSON written by this
process: nothing read back is executed. Code changes are not in the key: pass fresh=True after one.
"""
from __future__ import annotations

import hashlib
import json
import re
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Job:
    name: str
    fn: object
    args: tuple
    deps: tuple[str, ...] = ()
    then: object = None  # callable(results) -> args appended once the deps are done (their outputs)
    key: object = None  # JSON-able: what the result depends on besides the deps (None: never cached)


def _init_worker() -> None:
    torch.set_num_threads(1)  # one worker per core: oversubscribed OpenMP threads spin and slow everyone ~10x


def digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Cache:
    """Finished job results under one directory, each with the digest of its key."""

    def __init__(self, root: Path | None):
        self.root = root

    def _path(self, name: str) -> Path:
        return self.root / (re.sub(r"[^A-Za-z0-9_.=-]+", "_", name) + ".json")

    def get(self, name: str, key: str) -> dict | None:
        if self.root is None or not self._path(name).is_file():
            return None
        try:
            stored = json.loads(self._path(name).read_text())
        except (OSError, json.JSONDecodeError):
            return None  # a torn write: run the job again
        result = stored.get("result") if stored.get("key") == key else None
        if result is None or any(not Path(p).exists() for p in _paths(result)):
            return None
        return result

    def put(self, name: str, key: str, result: dict) -> None:
        if self.root is None:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self._path(name).with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, "result": result}, indent=1))
        tmp.replace(self._path(name))  # atomic: an interrupted run leaves the old entry or none


def _paths(result: dict) -> list[str]:
    """The paths a result names (a run's export, a step's files): all must still exist for it to count."""
    return [str(v) for v in ([result.get("export")] + list(result.get("files", []))) if v]


def schedule(jobs: list[Job], workers: int, log, cache: Cache | None = None) -> dict[str, dict]:
    """Run jobs on a process pool as their dependencies finish; longest remaining chains first. Cached results
    (same key digest, deps included) are taken without running; `log` says which."""
    cache = cache or Cache(None)
    by_name = {j.name: j for j in jobs}
    keys: dict[str, str | None] = {}

    def key_of(name: str) -> str | None:
        if name not in keys:
            job = by_name[name]
            deps = [key_of(d) for d in job.deps]
            keys[name] = None if job.key is None or None in deps else digest([job.key, deps])
        return keys[name]

    results, pending, running = {}, {}, {}
    for job in jobs:
        hit = cache.get(job.name, key_of(job.name)) if key_of(job.name) else None
        if hit is not None:
            results[job.name] = hit
            log(f"cached {job.name}")
        else:
            pending[job.name] = job
    depth = {}

    def chain(name):
        if name not in depth:
            depth[name] = 1 + max((chain(j.name) for j in jobs if name in j.deps), default=0)
        return depth[name]

    if not pending:
        return results
    import multiprocessing as mp

    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker) as pool:
        while pending or running:
            ready = sorted((j for j in pending.values() if all(d in results for d in j.deps)),
                           key=lambda j: -chain(j.name))
            for job in ready[: max(0, workers - len(running))]:
                args = job.args + (job.then(results) if job.then else ())
                running[pool.submit(job.fn, *args)] = job.name
                del pending[job.name]
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in done:
                name = running.pop(fut)
                results[name] = fut.result()
                if key_of(name):
                    cache.put(name, key_of(name), results[name])
                log(f"done {name} ({results[name].get('wall', 0):.0f} s)")
    return results
