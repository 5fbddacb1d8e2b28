"""tmd-plan: validate a recipe for a world size and print per-rank memory and traffic estimates.

    tmd-plan wan14b_tmd_n4h5_m1 --world 64 --device-memory 80 model.init=/ckpt/stage1/export

Checks what tmd-train checks before it builds a model: the recipe and layout, and the files the run reads (teacher
and init checkpoints, the negative-prompt embedding, the shards against the recipe), so a typo is caught before the
job queues. --layout-only skips the files (e.g. planning stage 2 before stage 1 has run). Exit 0 when everything is
valid (and fits, if --device-memory is given), 2 otherwise; nothing is started or written.
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
    args = p.parse_intermixed_args(argv)  # overrides may come before or after the options
    if args.world < 1 or (args.device_memory is not None and args.device_memory <= 0):
        p.error(f"--world {args.world} must be >= 1 and --device-memory positive")
    try:
        res = resolve(compose([f"experiment={args.recipe}", *args.overrides]))
        plan = plan_recipe(res, args.world, args.device_memory)
        if not args.layout_only and not plan.problems:
            plan.problems += check_inputs(res, out_dir_writable=False)
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
    for problem in plan.problems:
        print(f"refused: {problem}", file=sys.stderr)
    return 2 if plan.problems else 0


if __name__ == "__main__":
    sys.exit(main())
