"""Multi-rank benchmark cases, run on every rank by torchrun (see launch.py): the real trainer on a recipe,
measured from inside. `python -m tmd_megatron.bench.ranks CASES_JSON OUT_DIR` runs the cases
([[name, kwargs], ...]) one after another in this process and writes their results to OUT_DIR/rank{r}.json.

- comm:     bytes counted by `count_comm` in one training step (after a warm-up step), per (op, group);
- pipeline: busy and wall time of every pipelined pass of stage-2 steps (PipelineResult.trace), and step times;
- live_memory: peak bytes of live tensors over the same steps (profiler allocator events);
- ring_memory: live-tensor peak and time of one ring-attention forward + backward at a given length;
- memory:   peak resident memory of the process during training steps above its level before the models were
            built, beside the exact bytes of the model states (weights, gradients, optimizer states). The peak is
            the process's high-water mark, so a memory case must be the only case of its launch.
"""
from __future__ import annotations

import io
import json
import os
import resource
import sys
import time
from pathlib import Path

import psutil
import torch


def _trainer(overrides: list[str], out_dir: str):
    """The recipe resolved, its topology (re-initialised for this case's layout), and a Trainer factory."""
    from tmd_megatron.parallel import init_topology
    from tmd_megatron.training.config import compose, resolve
    from tmd_megatron.training.trainer import Trainer

    res = resolve(compose([*overrides, f"run.out_dir={out_dir}/run", "run.tensorboard=false", "run.ckpt_every=0",
                           "run.resume=never", "run.device=cpu"]))
    p = res.raw.parallel
    topo = init_topology(p.tp, p.cp, p.pp, device="cpu", timeout_s=300)
    return res, topo, lambda: Trainer(res, topo, stream=io.StringIO())


def comm_case(overrides: list[str], out_dir: str) -> dict:
    from tmd_megatron.parallel import count_comm

    res, topo, make = _trainer(overrides, out_dir)
    trainer = make()
    trainer.start()
    trainer.advance()  # warm-up
    with count_comm() as counter:
        trainer.advance()
    table = [[op, group, calls, nbytes] for (op, group), (calls, nbytes) in counter.table().items()]
    return {"rank": topo.world.rank, "table": table,
            "group_sizes": {g: getattr(topo, g).size for g in ("tp", "cp", "pp", "dp", "dp_cp", "tp_cp", "world")}}


def _busy(result) -> float:
    return sum(end - start for _, _, start, end in result.trace)


def _runqueue_wait() -> float | None:
    """Seconds this thread has been ready to run but not running (another thread held the core; pinning each rank's
    main thread to a core of its own did not reduce it, measured), from Linux's /proc/<pid>/task/<tid>/schedstat
    (on-CPU ns, run-queue wait ns, timeslices); None where it does not exist."""
    import threading

    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return None


def pipeline_case(overrides: list[str], out_dir: str, steps: int) -> dict:
    from tmd_megatron.training.passes import Passes

    res, topo, make = _trainer(overrides, out_dir)
    trainer = make()
    passes = []

    class TimedPasses(Passes):
        def run(self, stage, inputs, *, forward_only=False, output_grads=None):
            result = super().run(stage, inputs, forward_only=forward_only, output_grads=output_grads)
            passes.append({"stage_fn": type(stage).__name__, "forward_only": forward_only, "wall": result.wall,
                           "busy": _busy(result)})
            return result

        def run_parts(self, parts):
            t0 = time.perf_counter()
            got = super().run_parts(parts)
            passes.append({"stage_fn": "merged", "forward_only": all(p.forward_only for p in parts),
                           "wall": time.perf_counter() - t0,
                           "busy": sum(end - start for r in got for _, _, start, end in r.trace)})
            return got

    p = res.raw.parallel
    trainer.passes = TimedPasses(topo, p.microbatches, p.schedule, trainer.passes.autocast_dtype)
    trainer.start()
    trainer.advance()  # warm-up (also a generator step: the student updates on step 0)
    records = []
    from tmd_megatron.parallel import comm

    for _ in range(steps):
        passes.clear()
        generator = "student" in trainer.updates_this_step()
        comm.all_reduce(torch.zeros(1), topo.world)  # both stages start the step together
        t0, c0, q0 = time.perf_counter(), time.thread_time(), _runqueue_wait()
        trainer.advance()
        # the main thread's CPU time is its busy time: gloo waits block without spinning (measured: a 2 s recv
        # costs 0 s of thread time), and one thread per rank computes
        q1 = _runqueue_wait()
        records.append({"generator": generator, "wall": time.perf_counter() - t0, "cpu": time.thread_time() - c0,
                        "runqueue": None if q0 is None else q1 - q0, "passes": list(passes)})
    return {"rank": topo.world.rank, "stage": topo.pp.rank, "steps": records}


class _CommClock:
    """Wall time spent inside parallel/comm.py's transfers (the calls and the waits of asynchronous ones) while
    it is installed: how much of a step the ranks spend communicating or waiting for each other."""

    NAMES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "exchange")

    def __init__(self):
        from tmd_megatron.parallel import comm

        self.comm, self.seconds, self.saved = comm, 0.0, {}

    def _wrap(self, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
        return timed

    def __enter__(self):
        for name in self.NAMES:
            self.saved[name] = getattr(self.comm, name)
            setattr(self.comm, name, self._wrap(self.saved[name]))
        self.saved["wait"] = self.comm._Pending.wait
        self.comm._Pending.wait = self._wrap(self.saved["wait"])
        return self

    def __exit__(self, *exc):
        for name in self.NAMES:
            setattr(self.comm, name, self.saved[name])
        self.comm._Pending.wait = self.saved["wait"]


def _probe_alone(topo) -> float:
    """`calibrate.speed_probe` on each rank in turn while the others wait (a blocking gloo wait takes no core):
    the speed of one core of the machine now, not of ranks crowding each other."""
    from tmd_megatron.parallel import comm

    from .calibrate import speed_probe

    got = 0.0
    for rank in range(topo.world.size):
        if rank == topo.world.rank:
            got = speed_probe()
        comm.all_reduce(torch.zeros(1), topo.world)
    return got


def step_time_case(overrides: list[str], out_dir: str, warmup: int = 2, steps: int = 4) -> dict:
    """Wall time of each trainer step (after `warmup` steps), with whether it was a generator step, and the
    latent shape the steps ran on: what the step-time model predicts (training/timing.py)."""
    from tmd_megatron.parallel import comm

    res, topo, make = _trainer(overrides, out_dir)
    trainer = make()
    trainer.start()
    warm = []
    for _ in range(warmup):  # the first steps also pay one-time costs (model.compile=true: the compilation)
        t0 = time.perf_counter()
        trainer.advance()
        warm.append(time.perf_counter() - t0)
    probe = _probe_alone(topo)  # the machine's speed during this launch, against the calibration's
    records = []
    comm.all_reduce(torch.zeros(1), topo.world)
    busy0, own0, wall0 = _busy_cpu(), time.process_time(), time.perf_counter()
    for _ in range(steps):
        generator = "student" in trainer.updates_this_step()
        comm.all_reduce(torch.zeros(1), topo.world)  # every rank starts the step together
        with _CommClock() as clock:
            t0 = time.perf_counter()
            trainer.advance()
        records.append({"generator": generator, "wall": time.perf_counter() - t0, "comm": clock.seconds})
    own = sum(comm.all_gather_object(time.process_time() - own0, topo.world))
    wall = time.perf_counter() - wall0
    # the machine's CPU use besides this launch's ranks, in cores: another job's load skews every timing here
    others = max(0.0, (_busy_cpu() - busy0 - own) / wall)
    return {"rank": topo.world.rank, "steps": records, "latent": list(trainer.last_batch["latent"].shape[2:]),
            "other_cores": others, "warmup": warm, "probe": (probe + _probe_alone(topo)) / 2}


def _busy_cpu() -> float:
    t = psutil.cpu_times()
    return t.user + t.system + getattr(t, "nice", 0.0)


def _state_bytes(trainer) -> int:
    """Weights and gradients of every role on this rank, plus the optimizers' master weights, reduced gradients and
    moments."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if t is not None and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()

    roles = trainer.roles
    for module in (roles.student, roles.teacher, roles.fake, roles.disc):
        if module is not None:
            for p in module.parameters():
                add(p)
                add(p.grad)
    for opt in trainer.optims.values():
        for bucket in opt.buckets:
            add(bucket.master)
            add(bucket.master.grad)
        for state in opt.optimizer.state.values():
            for t in state.values():
                if torch.is_tensor(t) and t.numel() > 1:
                    add(t)
    return total


def memory_case(overrides: list[str], out_dir: str, steps: int) -> dict:
    res, topo, make = _trainer(overrides, out_dir)
    torch.zeros(1).sum()  # let torch finish its lazy initialisation before the baseline
    baseline = psutil.Process().memory_info().rss
    trainer = make()
    trainer.start()
    for _ in range(steps):
        trainer.advance()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {"rank": topo.world.rank, "stage": topo.pp.rank, "baseline": baseline, "peak": peak,
            "peak_above_baseline": peak - baseline, "state_bytes": _state_bytes(trainer)}


def live_tensor_peak(fn) -> tuple[int, object]:
    peak, _, result = live_tensor_bytes(fn)
    return peak, result


def live_tensor_bytes(fn) -> tuple[int, int, object]:
    """(peak bytes of live tensors while fn() runs, bytes still live when it returns, its result), from the
    profiler's allocator events: its
    running "Total Allocated" counts every tensor allocated after profiling started, less those freed. The CPU
    counterpart of torch.cuda.max_memory_allocated, without malloc's fragmentation and caching that a resident-
    memory peak also holds. Tensors alive before the call are not counted."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        with trace.open() as f:
            events = json.load(f)["traceEvents"]
    mem = sorted((e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0),
                 key=lambda e: e["ts"])
    if not mem:
        raise RuntimeError("the profiler recorded no CPU allocations; this torch build does not report them")
    mem = [e["args"] for e in mem]
    # The counter (c10 ProfiledCPUMemoryReporter) also holds tensors allocated under an earlier profile of this
    # process and still alive: start from its value before the first allocation seen here.
    start = mem[0]["Total Allocated"] - mem[0]["Bytes"]
    return max(a["Total Allocated"] for a in mem) - start, mem[-1]["Total Allocated"] - start, result


def live_memory_case(overrides: list[str], out_dir: str, steps: int) -> dict:
    """Peak bytes of live tensors over the same steps as `memory_case` (building the models included). The
    counter is per process: alone in its launch."""
    res, topo, make = _trainer(overrides, out_dir)

    def run():
        trainer = make()
        trainer.start()
        for _ in range(steps):
            trainer.advance()

    peak, _ = live_tensor_peak(run)
    return {"rank": topo.world.rank, "stage": topo.pp.rank, "live_peak": peak}


def ring_memory_case(tokens: int, heads: int, head_dim: int, kernel: str, dtype: str = "float32",
                     out_dir: str = "", keep_kv: bool = False) -> dict:
    """Live-tensor peak of one ring-attention forward + backward at `tokens` tokens per rank (batch 1)
    above its inputs, and its time: the attention workspace the CP path needs; and the bytes a forward leaves
    for its backward (keep_kv=True also keeps the other ranks' K/V chunks)."""
    from tmd_megatron.parallel import init_topology
    from tmd_megatron.parallel.attention import RingAttention

    topo = init_topology(cp=int(os.environ["WORLD_SIZE"]), device="cpu", timeout_s=600)
    g = torch.Generator().manual_seed(topo.cp.rank)
    q, k, v, dout = (torch.randn(1, tokens, heads, head_dim, generator=g).to(getattr(torch, dtype)) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(True)
    attn = RingAttention(topo.cp, kernel, keep_kv=keep_kv)

    def run():
        t0 = time.perf_counter()
        attn(q, k, v).backward(dout)
        return time.perf_counter() - t0

    peak, seconds = live_tensor_peak(run)
    # what the forward leaves alive for the backward (its output included): what every attention of a model holds
    # from its forward to its backward
    _, held, out = live_tensor_bytes(lambda: attn(q, k, v))
    del out
    return {"rank": topo.world.rank, "live_peak": peak, "seconds": seconds, "held": held}


def gloo_bandwidth_case(out_dir: str = "", sizes=(1 << 14, 1 << 17, 1 << 20, 1 << 22), reps: int = 12) -> dict:
    """Seconds of each collective of comm.py between the ranks of the world, per size, as the trainer meets them:
    between products that keep every core busy (a collective then also pays for waking the peer and gloo's
    threads, which an idle loop would not show). Samples (latency units, wire bytes, seconds) in the step-time
    model's ring form (training/timing.py, StepModel._collective)."""
    from tmd_megatron.parallel import comm, init_topology

    topo = init_topology(device="cpu", timeout_s=300)
    g = topo.world
    n = g.size
    peer = g.ranks[(g.rank + 1) % n]
    a = torch.randn(256, 512)
    b = torch.randn(512, 512)

    def work():
        torch.mm(a, b)

    def timed(fn):
        comm.all_reduce(torch.zeros(1), g)  # start together
        t0 = time.perf_counter()
        for _ in range(reps):
            work()
            if fn is not None:
                fn()
        return time.perf_counter() - t0

    samples = []
    for nbytes in sizes:
        x = torch.ones(nbytes // 4)
        ops = {
            "send": (1, nbytes, lambda: comm.exchange(g, [(x, peer)], [(torch.empty_like(x), peer)])),
            "all_reduce": (2 * (n - 1), 2 * (n - 1) / n * nbytes, lambda: comm.all_reduce(x.clone(), g)),
            "all_gather": (n - 1, (n - 1) * nbytes, lambda: comm.all_gather(x, g)),  # gathers n x
            "reduce_scatter": (n - 1, (n - 1) / n * nbytes, lambda: comm.reduce_scatter(x, g)),
            "all_to_all": (n - 1, (n - 1) / n * nbytes, lambda: comm.all_to_all(x.view(n, -1), g)),
        }
        for units, wire, fn in ops.values():
            timed(fn)
            compute = min(timed(None) for _ in range(3))
            total = min(timed(fn) for _ in range(3))
            samples.append((units, wire, max(total - compute, 0.0) / reps))
    return {"rank": g.rank, "samples": samples}


CASES = {"comm": comm_case, "gloo_bandwidth": gloo_bandwidth_case, "step_time": step_time_case,
         "pipeline": pipeline_case, "memory": memory_case, "live_memory": live_memory_case,
         "ring_memory": ring_memory_case}


def main() -> None:
    cases, out = json.loads(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)
    results = [CASES[name](out_dir=str(out / f"case{i}"), **kwargs) for i, (name, kwargs) in enumerate(cases)]
    (out / f"rank{int(os.environ.get('RANK', 0))}.json").write_text(json.dumps(results))
    from tmd_megatron.parallel import destroy_topology

    destroy_topology()
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown, which can abort gloo (shared/notes/STACK_ON_CPU.md)


if __name__ == "__main__":
    main()
