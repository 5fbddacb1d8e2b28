"""tmd-plan: validate a recipe for a world size and print per-rank memory and traffic estimates.

    tmd-plan wan14b_tmd_n4h5_m1 --world 64 --device-memory 80 model.init=/ckpt/stage1/export
    tmd-plan wan14b_tmd_n4h5_m1 --world 64 --layout-only --time [--cluster h100-ib] model.init=x
    tmd-plan wan14b_tmd_n4h5_m1 --world 64 --layout-only --search --device-memory 80 model.init=x

Checks what tmd-train checks before it builds a model: the recipe and layout, and the files the run reads (teacher
and init checkpoints, the negative-prompt embedding, the shards against the recipe), so a typo is caught before the
job queues. --layout-only skips the files (e.g. planning stage 2 before stage 1 has run). --time predicts one iteration's
time on a cluster profile (training/timing.py: h100-ib, h200-ib, a100-ib from public figures; cpu as measured by
`python -m tmd_megatron.bench.calibrate`; or a profile file); --search ranks every valid layout that fits by that
prediction and prints the ten fastest. Exit 0 when everything is valid (and fits, if --device-memory is given),
2 otherwise; nothing is started or written.
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from tmd_megatron.training.config import RecipeError, compose, describe_error, resolve
    from tmd_megatron.training.inputs import check_inputs
    from tmd_megatron.training.plan import plan_recipe

    p = argparse.ArgumentParser(prog="tmd-plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="experiment name (recipes/experiment/<name>.yaml)")
    p.add_argument("overrides", nargs="*", help="hydra overrides, as for tmd-train")
    p.add_argument("--world", type=int, required=True, help="number of processes (nodes x GPUs per node)")
    p.add_argument("--device-memory", type=float, default=None, help="GiB per device; refuse what does not fit")
    p.add_argument("--layout-only", action="store_true",
                   help="do not look at the teacher, init, negative-prompt and shard files")
    p.add_argument("--time", action="store_true", help="predict one iteration's time on --cluster")
    p.add_argument("--search", action="store_true", help="rank the layouts that fit by predicted time (top ten)")
    p.add_argument("--cluster", default="h100-ib", help="h100-ib | h200-ib | a100-ib | cpu | a profile .json")
    args = p.parse_intermixed_args(argv)  # overrides may come before or after the options
    if args.world < 1 or (args.device_memory is not None and args.device_memory <= 0):
        p.error(f"--world {args.world} must be >= 1 and --device-memory positive")
    try:
        res = resolve(compose([f"experiment={args.recipe}", *args.overrides]))
        plan = plan_recipe(res, args.world, args.device_memory)
        if not args.layout_only and not plan.problems:
            plan.problems += check_inputs(res, out_dir_writable=False)
        timing = None
        if (args.time or args.search) and not plan.problems:
            from tmd_megatron.training.timing import load_profile

            profile = load_profile(args.cluster)
            timing = _time(res, args.world, profile) if args.time else None
            found = _search(res, args.world, profile, args.device_memory) if args.search else None
    except (RecipeError, ValueError, HydraException, OmegaConfBaseException) as err:
        print(f"tmd-plan: {describe_error(err)}", file=sys.stderr)
        return 2
    if plan.rows:
        r = res.raw.parallel
        dp = args.world // (r.tp * r.cp * r.pp)
        print(f"{args.recipe} ({res.method}) on {args.world} ranks: DP{dp} x PP{r.pp} x CP{r.cp} x TP{r.tp}, "
              f"stages {plan.stage_blocks}")
        print(f"per rank, pipeline stage {plan.worst_stage} (the largest):")
        for name, gib in plan.rows:
            print(f"  {name:<58} {gib:9.2f} GiB")
        print(f"  {'total':<58} {plan.total_gib:9.2f} GiB")
        print("traffic per iteration per rank (first stage):")
        for name, gib in plan.comm:
            print(f"  {name:<58} {gib:9.2f} GiB")
        if timing:
            print(timing)
        if args.search and not plan.problems:
            print(found)
    for problem in plan.problems:
        print(f"refused: {problem}", file=sys.stderr)
    return 2 if plan.problems else 0


def _time(res, world, profile) -> str:
    from tmd_megatron.training.timing import StepModel

    pred = StepModel(res, world, profile).predict()
    lines = [f"predicted time per iteration on {profile.name}: {pred.seconds:.3g} s"]
    if len(set(pred.per_step.values())) > 1:
        lines[0] += f" (generator step {pred.per_step[True]:.3g} s, critic-only step {pred.per_step[False]:.3g} s)"
    for name, seconds in pred.table():
        lines.append(f"  {name:<58} {seconds:9.3g} s")
    lines.append(f"  pipeline idle in the passes {pred.idle:.3f}; model FLOPs {pred.model_tflops:.4g} TFLOP per iteration, "
                 f"{pred.tflops_per_device:.4g} TFLOP/s per device, MFU {pred.mfu:.1%} of {profile.peak_tflops:g}")
    return "\n".join(lines)


def _search(res, world, profile, memory) -> str:
    from tmd_megatron.training.search import search

    found, valid, fit = search(res, world, profile, memory)
    lines = [f"layout search on {world} ranks, {profile.name}: {valid} valid layouts, {fit} fit "
             f"{memory or profile.memory_gib:g} GiB; the fastest:",
             f"  {'#':>2} {'layout':<58} {'s/iter':>8} {'MFU':>6} {'GiB':>6} {'traffic GiB':>11} {'idle':>5}"]
    for i, c in enumerate(found, 1):
        p = c.prediction
        lines.append(f"  {i:>2} {c.describe():<58} {p.seconds:8.3g} {p.mfu:6.1%} {c.memory_gib:6.1f} "
                     f"{c.traffic_gib:11.1f} {p.idle:5.3f}")
    if found:
        lines.append("  overrides of #1: " + " ".join(found[0].overrides()))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
