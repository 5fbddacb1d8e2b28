#!/bin/bash
# TMD distillation of Wan2.1-T2V-14B on 8 nodes x 8 H100 (80 GB): TP4 + SP x CP2 ring inside each node (NVLink),
# two pipeline stages, DP4 with ZeRO-1 (the layout search's choice: recipes/parallel/h100_14b.yaml). Submit from any directory that has a logs/ subdirectory:
#   mkdir -p logs && sbatch launch/tmd_14b.sh
# Every TMD_* value below can be overridden at submission (VAR=value sbatch ...), and every #SBATCH
# option on the sbatch command line (sbatch --nodes=4 launch/tmd_14b.sh). The job checkpoints and
# requeues itself before its time limit and on preemption, and resumes from the run's latest checkpoint.
# Account and partition are the cluster's: sbatch --account=<acct> --partition=<part> launch/tmd_14b.sh
# (or export SBATCH_ACCOUNT / SBATCH_PARTITION once). A real run needs TMD_TEACHER_*, TMD_SHARDS and
# TMD_NEGATIVE (or the matching overrides); `tmd-plan` checks them before queueing (docs/operations.md).
#SBATCH --job-name=tmd-14b
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

# What to train and where (run dir on the shared filesystem: every node writes its checkpoint shards there).
: "${TMD_RECIPE:=wan14b_tmd_n4h5_m1}"
: "${TMD_RUN_DIR:=$PWD/runs/${SLURM_JOB_NAME:-tmd-14b}}"
: "${TMD_OVERRIDES:=}"             # extra hydra overrides, space separated
: "${TMD_TRAIN_CMD:=tmd-train}"
# Parallel layout of one model replica; DP = nodes * ranks per node / (TP * CP * PP). The recipe's own layout
# (recipes/parallel/h100_14b.yaml: TP4 x CP2 x PP2, 65.1 GiB per rank for stage 2, 40.1 s per iteration predicted;
# TMD_TP=8 TMD_CP=1 TMD_PP=1: 55.6 GiB, 44.2 s): `tmd-plan wan14b_tmd_n4h5_m1 --world 64 --time ...`.
: "${TMD_TP:=4}"
: "${TMD_CP:=2}"
: "${TMD_PP:=2}"
: "${TMD_DEVICE:=}"                # empty: the recipe's (cuda); cpu selects gloo (tests)
: "${TMD_BACKEND:=}"               # empty: the recipe's; te | torch
: "${TMD_MAX_STEPS:=}"             # empty: the recipe's
: "${TMD_LAUNCH_MODE:=srun}"       # srun: one task per rank | torchrun: one torchrun per node
: "${TMD_MAX_REQUEUES:=30}"        # at 4 h per attempt: ~5 days of wall time before a human must look

# sbatch runs a copy of this script from slurmd's spool; lib.sh lives next to the original.
TMD_LAUNCH_DIR=${TMD_LAUNCH_DIR:-$(dirname "${BASH_SOURCE[0]}")}
if [[ ! -f $TMD_LAUNCH_DIR/lib.sh ]]; then
    TMD_LAUNCH_DIR=$(dirname "$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Command=//p')")
fi
# shellcheck source=env.sh
source "$TMD_LAUNCH_DIR/env.sh"
# shellcheck source=lib.sh
source "$TMD_LAUNCH_DIR/lib.sh"
tmd_main
