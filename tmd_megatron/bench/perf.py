"""`make bench`: performance ratios, each measured side by side in one run, written as markdown tables into
docs/benchmarks.md (each part between its `perf-PART:begin` / `perf-PART:end` markers) with the command that produced them.

    python -m tmd_megatron.bench.perf                 # all ratios (about 10 minutes on 2 shared CPU cores)
    python -m tmd_megatron.bench.perf --smoke         # tiny sizes, prints only (the test suite runs this)
    python -m tmd_megatron.bench.perf --only dit,sampling --no-write

Multi-rank ratios run the real trainer under torchrun (gloo, one thread per rank); see ranks.py.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import torch

from . import perf_model
from .doc import DOC, command_line, publish
from .comm_bound import SCALARS, minimum_received, received
from .launch import run_cases
from .perf_time import _compile_cases, _quiet_run, _time_cases, compile_table, time_table
from .timing import load_average

PARTS = ("dit", "jvp", "comm", "pipeline", "memory", "ring", "sampling", "time", "compile")


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f} ms"


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:,.1f} MiB"


def _kib(nbytes: float) -> str:
    return f"{nbytes / 2**10:,.1f} KiB" if nbytes >= 1024 else f"{nbytes:,.0f} B"


# ---- single-process ratios ------------------------------------------------------------------------------------
def dit_table(smoke: bool) -> str:
    r = perf_model.dit_vs_diffusers(reps=2 if smoke else 7, smoke=smoke)
    c = r["config"]
    ours, ref = r["ours"], r["diffusers"]
    return "\n".join([
        f"Forward + backward, fp32, batch 1, {r['tokens']} video tokens, {c.text_len} text tokens; dim {c.dim}, "
        f"FFN {c.ffn_dim}, {c.num_heads} heads, {c.num_layers} blocks, text dim {c.text_dim}. Same weights and inputs "
        f"(max relative output difference {r['max_rel_diff']:.1e}); interleaved runs, median of "
        f"{2 if smoke else 7}.",
        "",
        "| model | wall | process CPU | wall ratio (ours / diffusers) |",
        "|---|---|---|---|",
        f"| ours (`WanModel`, torch backend) | {_ms(ours['wall'])} | {_ms(ours['cpu'])} | "
        f"**{ours['wall'] / ref['wall']:.2f}** |",
        f"| diffusers `WanTransformer3DModel` | {_ms(ref['wall'])} | {_ms(ref['cpu'])} | 1 |",
    ])


def jvp_table(smoke: bool) -> str:
    r = perf_model.fd_vs_exact_jvp(smoke=smoke)
    c, costs = r["config"], r["costs"]
    d_fd = costs["derivative, FD (2 flow-head passes, no_grad)"]
    d_ex = costs["derivative, exact (torch.func.jvp, math SDPA)"]
    s_fd = costs["TM-MF step fwd+bwd, jvp=fd"]
    s_ex = costs["TM-MF step fwd+bwd, jvp=exact"]
    return "\n".join([
        f"`tmd_megatron.algorithms.bench_jvp.cost_table`: dim {c.dim}, {c.num_layers} blocks, flow head "
        f"H = {r['head_blocks']}, latent {r['latent']}; median CPU time of one thread.",
        "",
        "| what | FD-JVP | exact `torch.func.jvp` | ratio exact / FD |",
        "|---|---|---|---|",
        f"| d/ds u (the JVP alone, batch 1) | {_ms(d_fd)} | {_ms(d_ex)} | {d_ex / d_fd:.2f} |",
        f"| whole TM-MF step, forward + backward (batch 2) | {_ms(s_fd)} | {_ms(s_ex)} | **{s_ex / s_fd:.2f}** |",
    ])


def sampling_table(smoke: bool) -> str:
    rows = perf_model.sampling_cost(reps=1 if smoke else 3, smoke=smoke)
    base = next(r for r in rows if r["sampler"] == "DMD2-v M=1")
    out = ["Blocks counted with `BlockCounter` during one sampling run (divided by L); time per sample, median of "
           f"{1 if smoke else 3} interleaved runs; ratios against the one-step DMD2-v sampler.",
           "", "| sampler | effective NFE (Eq. 16) | measured NFE | time per sample | time ratio | NFE ratio |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['sampler']} | {r['nfe']:g} | {r['measured_nfe']:g} | {_ms(r['time_per_sample'])} | "
                   f"{r['time_per_sample'] / base['time_per_sample']:.2f} | {r['nfe'] / base['nfe']:.2f} |")
    return "\n".join(out)


# ---- multi-rank ratios ----------------------------------------------------------------------------------------
COMM_LAYOUTS = {"TP2 + SP": ["parallel.tp=2"], "CP2 ring": ["parallel.cp=2", "parallel.cp_comm=ring"],
                "CP2 Ulysses": ["parallel.cp=2", "parallel.cp_comm=ulysses"]}
COMM_RECIPE = ["method=flow_matching", "model.preset=tiny", "data.global_batch=8", "data.synthetic.num_samples=16",
               "run.max_steps=10"]


def _comm_cases(smoke: bool):
    layouts = dict(list(COMM_LAYOUTS.items())[:1]) if smoke else COMM_LAYOUTS
    return [(name, ("comm", {"overrides": COMM_RECIPE + extra})) for name, extra in layouts.items()]


def comm_table(results: dict) -> str:
    from tmd_megatron.models.wan import WanConfig, WanModel

    cfg = WanConfig.preset("tiny")
    with torch.device("meta"):
        num_params = sum(p.numel() for p in WanModel(cfg).parameters())
    out = ["One flow-matching training step of the real trainer (tiny Wan: dim 64, 4 blocks, 48 video tokens, 64 text "
           "tokens; batch 8, fp32), after a warm-up step; bytes received by rank 0. Measured: the calls `count_comm` "
           "recorded, as received bytes of bandwidth-optimal collectives. Minimum: `bench/comm_bound.py`, derived "
           "from the layout's data placement.", "",
           "| layout | part of the step | measured | minimum | measured / minimum |", "|---|---|---|---|---|"]
    for name, per_rank in results.items():
        r0 = per_rank[0]
        got = received(r0["table"], r0["group_sizes"])
        sizes = r0["group_sizes"]
        mode = "ulysses" if "Ulysses" in name else "ring"
        least = minimum_received(cfg, (16, 3, 8, 8), 8, tp=sizes["tp"], cp=sizes["cp"], cp_comm=mode,
                                 num_params=num_params, scalars=got.get(SCALARS, 0.0))
        for part in sorted(set(got) | set(least)):
            m, lo = got.get(part, 0.0), least.get(part, 0.0)
            ratio = f"{m / lo:.2f}" if lo else ("–" if not m else "∞ (minimum 0)")
            out.append(f"| {name} | {part} | {_kib(m)} | {_kib(lo)} | {ratio} |")
        total, total_min = sum(got.values()), sum(least.values())
        out.append(f"| {name} | **step total** | **{_kib(total)}** | **{_kib(total_min)}** | "
                   f"**{total / total_min:.2f}** |")
    return "\n".join(out)


PIPE_MODEL = {"dim": 256, "ffn_dim": 1024, "num_heads": 4, "num_layers": 4}


def _pipeline_cases(smoke: bool):
    ms = (2,) if smoke else (1, 2, 4, 8)
    cases = []
    for m in ms:
        over = ["experiment=tiny_smoke", "parallel.pp=2", f"parallel.microbatches={m}", f"data.global_batch={2 * m}",
                "data.synthetic.num_samples=32", "run.max_steps=100"]
        if not smoke:
            over += [f"++model.overrides.{k}={v}" for k, v in PIPE_MODEL.items()]
            over += ["++data.synthetic.size=32", "data.latent=[16,3,16,16]"]
        cases.append((m, ("pipeline", {"overrides": over, "steps": 1 if smoke else 6})))
    return cases


def pipeline_table(results: dict) -> str:
    out = ["TMD stage-2 steps of the real trainer under PP2 (the whole trio: student rollout, fake score, teacher with "
           "CFG and the GAN heads, discriminator; 2 samples per microbatch; dim 256, 4 blocks, 192 video tokens), "
           "1F1B, 6 steps (three generator steps) after a warm-up step; per-role stage splits (training/partition.py) "
           "and the critics' passes merged into one pipelined pass (programs.stage2_step). Whole step: idle = 1 − "
           "busy / wall with busy = the rank's main-thread CPU time over the step (all its work: passes, VSD, "
           "transfers issued, gradient reduction, optimizer; gloo waits block without spinning), so idle is the time "
           "a stage waits or is descheduled. Waiting = idle less the thread's run-queue wait (Linux schedstat: time "
           "it was ready but another process held the core; two ranks fill both cores, so any other process takes "
           "time from one of them), i.e. the time the stage waited for the other stage. Pipelined passes: 1 − "
           "(compute ops in the traces) / (the passes' wall time). The issue's bar: whole-step idle ≤ "
           "1.3 × (p−1)/(m+p−1) at m ≥ 4; the ratio is given for both.", "",
           "| m | stage | idle, whole step | of which descheduled | waiting for the other stage | (p−1)/(m+p−1) "
           "| ratio idle / waiting | idle, pipelined passes | pipelined runs per step | step time |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for m, per_rank in results.items():
        for r in per_rank:
            busy = sum(p["busy"] for s in r["steps"] for p in s["passes"])
            wall = sum(p["wall"] for s in r["steps"] for p in s["passes"])
            step_wall = sum(s["wall"] for s in r["steps"])
            cpu = sum(s["cpu"] for s in r["steps"])
            n_passes = statistics.mean(len(s["passes"]) for s in r["steps"])
            bound = 1 / (m + 1)
            idle = 1 - cpu / step_wall
            queued = [s.get("runqueue") for s in r["steps"]]
            if None in queued:
                sched = waiting = "n/a"
                ratio = f"{idle / bound:.2f} / n/a"
            else:
                sched, wait = sum(queued) / step_wall, idle - sum(queued) / step_wall
                sched, waiting, ratio = f"{sched:.3f}", f"**{wait:.3f}**", f"{idle / bound:.2f} / {wait / bound:.2f}"
            out.append(f"| {m} | {r['stage']} | **{idle:.3f}** | {sched} | {waiting} | {bound:.3f} | {ratio} | "
                       f"{1 - busy / wall:.3f} | {n_passes:g} | {_ms(step_wall / len(r['steps']))} |")
    return "\n".join(out)


MEM_MODEL = {"dim": 512, "ffn_dim": 2048, "num_heads": 8, "num_layers": 4}
MEM_LAYOUTS = {"single": (1, []), "TP2 + SP": (2, ["parallel.tp=2"]),
               "PP2 (m = 2)": (2, ["parallel.pp=2", "parallel.microbatches=2"])}


def _memory_recipe(extra: list[str], smoke: bool) -> list[str]:
    over = ["experiment=tiny_smoke", "data.global_batch=4", "data.synthetic.num_samples=16", "run.max_steps=100",
            "parallel.microbatches=1", *extra]
    if not smoke:
        over += [f"++model.overrides.{k}={v}" for k, v in MEM_MODEL.items()]
        over += ["++data.synthetic.size=32", "data.latent=[16,3,16,16]"]
    return over


def memory_table(results: dict, smoke: bool) -> str:
    from tmd_megatron.training.config import compose, resolve
    from tmd_megatron.training.plan import plan_recipe

    out = ["TMD stage-2 steps of the real trainer (whole trio; dim 512, FFN 2048, 8 heads, 4 blocks, 192 video "
           "tokens, 4 samples per step, fp32, no activation checkpointing), 3 steps (two generator steps). "
           "Live-tensor peak = the highest total of live tensor bytes over the run, from the profiler's allocator "
           "events (what `torch.cuda.max_memory_allocated` reports on a GPU, and what the planner models); "
           "resident peak = the process's peak resident memory (`ru_maxrss`, a separate launch without the "
           "profiler) minus its resident memory before the models were built: it adds malloc's fragmentation and "
           "caching. Model states = the exact bytes of every weight, gradient, master weight, reduced gradient and Adam moment on the "
           "rank after the steps.", "",
           "| layout | rank (stage) | planner estimate | live-tensor peak | **estimate / live** | resident peak | "
           "estimate / resident | model states (exact) |",
           "|---|---|---|---|---|---|---|---|"]
    for name, per_rank in results.items():
        world = len(per_rank)
        res = resolve(compose(_memory_recipe(MEM_LAYOUTS[name][1], smoke)))
        plan = plan_recipe(res, world)
        if plan.problems:
            raise ValueError(f"the planner refuses the {name} recipe: {plan.problems}")
        est = plan.total_gib * 2**30
        for r in per_rank:
            live, rss = r["live_peak"], r["peak_above_baseline"]
            out.append(f"| {name} | {r['rank']} ({r['stage']}) | {_mib(est)} | {_mib(live)} | **{est / live:.2f}** | "
                       f"{_mib(rss)} | {est / rss:.2f} | {_mib(r['state_bytes'])} |")
    return "\n".join(out)


RING_HEADS, RING_HEAD_DIM = 2, 64  # a 2-head toy model: the 2.6 GB per rank at 16k tokens


def _ring_cases(smoke: bool):
    lengths = {"math": (1024,), "auto": (1024, 2048)} if smoke else \
        {"math": (2048, 4096, 8192), "auto": (2048, 4096, 8192, 16384, 32768)}
    keep = (1024,) if smoke else (4096, 16384)  # the forward's K/V chunks kept for the backward (minimum traffic)
    return [((kernel, n), ("ring_memory", {"tokens": n, "heads": RING_HEADS, "head_dim": RING_HEAD_DIM,
                                            "kernel": kernel}))
            for kernel, ns in lengths.items() for n in ns] + \
        [(("auto, K/V kept", n), ("ring_memory", {"tokens": n, "heads": RING_HEADS, "head_dim": RING_HEAD_DIM,
                                                  "kernel": "auto", "keep_kv": True})) for n in keep]


def ring_table(results: dict) -> str:
    from tmd_megatron.training.plan import ring_attention_workspace

    out = [f"One ring-attention forward + backward under CP2 (gloo, fp32, batch 1, {RING_HEADS} heads x "
           f"{RING_HEAD_DIM}), each length in its own launch; live-tensor peak per rank above the inputs (q, k, v "
           "and the output gradient), from the profiler's allocator events. `math` = the explicit score-block "
           "kernel the ring used before (the tests' reference); `auto` = the fused kernel that returns the "
           "log-sum-exp (here torch's CPU flash kernel); `auto, K/V kept` = the same with the other ranks' K/V "
           "chunks kept from the forward for the backward (`RingAttention(keep_kv=True)`: 2/3 of the bytes, the "
           "minimum of the comm table). Planner = `ring_attention_workspace`. Held for the backward = live bytes a "
           "forward leaves until its backward (output included): what every attention of a model holds at once.",
           "", "| kernel | tokens per rank | live peak (max over ranks) | bytes per token | planner | held for the "
           "backward | time (fwd+bwd) |", "|---|---|---|---|---|---|---|"]
    for (kernel, n), per_rank in results.items():
        peak = max(r["live_peak"] for r in per_rank)
        plan = ring_attention_workspace(1, n, RING_HEADS * RING_HEAD_DIM, 4) if kernel == "auto" else None
        out.append(f"| {kernel} | {n:,} | {_mib(peak)} | {peak / n:,.0f} | {_mib(plan) if plan else '–'} | "
                   f"{_mib(max(r['held'] for r in per_rank))} | {_ms(max(r['seconds'] for r in per_rank))} |")
    return "\n".join(out)


# ---- the run --------------------------------------------------------------------------------------------------
def run(parts, smoke: bool) -> dict[str, str]:
    tables = {}
    if "dit" in parts:
        tables["dit"] = dit_table(smoke)
    if "jvp" in parts:
        tables["jvp"] = jvp_table(smoke)
    two_rank = []
    if "comm" in parts:
        two_rank += [("comm", key, case) for key, case in _comm_cases(smoke)]
    if "pipeline" in parts:
        two_rank += [("pipeline", key, case) for key, case in _pipeline_cases(smoke)]
    if two_rank:
        got = run_cases([case for _, _, case in two_rank], 2, timeout=900)
        for part in ("comm", "pipeline"):
            res = {key: per_rank for (p, key, _), per_rank in zip(two_rank, got) if p == part}
            if res:
                tables[part] = comm_table(res) if part == "comm" else pipeline_table(res)
    if "memory" in parts:
        layouts = {"PP2 (m = 2)": MEM_LAYOUTS["PP2 (m = 2)"]} if smoke else MEM_LAYOUTS
        res = {}
        for name, (world, extra) in layouts.items():  # a fresh launch each: the peak is per process
            kwargs = {"overrides": _memory_recipe(extra, smoke), "steps": 1 if smoke else 3}
            rss = run_cases([("memory", kwargs)], world, timeout=900)[0]
            live = run_cases([("live_memory", kwargs)], world, timeout=900)[0]
            res[name] = [{**a, **b} for a, b in zip(rss, live)]
        tables["memory"] = memory_table(res, smoke)
    if "ring" in parts:  # a fresh launch per length: the peak is per process
        res = {key: run_cases([case], 2, timeout=1800)[0] for key, case in _ring_cases(smoke)}
        tables["ring"] = ring_table(res)
    if "sampling" in parts:
        tables["sampling"] = sampling_table(smoke)
    if "time" in parts:
        from .calibrate import measure
        from tmd_megatron.training.timing import cpu_profile_path, save_profile

        profile = measure(smoke)[0]  # the `cpu` profile of this machine now, as `bench.calibrate` writes it
        if not smoke:
            save_profile(profile, cpu_profile_path())
        res = {key: _quiet_run(case, world) for key, world, case in _time_cases(smoke)}
        tables["time"] = time_table(res, smoke, profile)
    if "compile" in parts:
        res = {key: _quiet_run(case, world) for key, world, case in _compile_cases(smoke)}
        from tmd_megatron.training.timing import load_profile

        tables["compile"] = compile_table(res, smoke, profile if "time" in parts else load_profile("cpu"))
    return tables


TITLES = {"dit": "Our Wan DiT vs diffusers", "jvp": "TM-MF step: FD-JVP vs exact JVP",
          "comm": "Bytes communicated per step vs the analytic minimum",
          "pipeline": "Pipeline idle fraction of the trio vs (p−1)/(m+p−1)",
          "memory": "Planner memory estimate vs measured peak",
          "ring": "Ring attention memory vs length (CP2)", "sampling": "Sampling cost vs effective NFE",
          "time": "Step time: predicted (`cpu` profile) vs measured, with the MFU column",
          "compile": "Compiled blocks vs eager"}


def render(key: str, table: str, command: str, seconds: float, load: tuple[float, float]) -> str:
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    head = (f"Produced by `{command}` on {when} ({platform.machine()}, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}) in {seconds / 60:.1f} min; load average {load[0]:.1f} at the start, "
            f"{load[1]:.1f} at the end (the 2 cores are shared with other jobs).")
    return f"{head}\n\n{table}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat; prints, never writes the doc")
    ap.add_argument("--only", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    ap.add_argument("--no-write", action="store_true", help=f"print only; do not update {DOC.name}")
    args = ap.parse_args(argv)
    parts = [p for p in args.only.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        ap.error(f"unknown parts {unknown}; choose from {PARTS}")
    command = command_line("tmd_megatron.bench.perf", argv)
    for key in parts:  # each part is its own section of the doc: a rerun of one part rewrites only its table
        t0, load0 = time.time(), load_average()
        table = run([key], args.smoke)[key]
        print(f"\n### {TITLES[key]}\n")
        publish(f"perf-{key}", render(key, table, command, time.time() - t0, (load0, load_average())),
                write=not (args.smoke or args.no_write))


if __name__ == "__main__":
    main()
