#!/bin/bash
# Smoke test on one node: the tiny recipe over TP2 x CP2 x PP2 (8 ranks) for a few steps, then a check
# that the run ended on a committed checkpoint of its last step. No SLURM needed (torchrun --standalone).
#   bash launch/smoke_8gpu.sh                    # 8 GPUs: NCCL, Transformer Engine backend, bf16
#   TMD_DEVICE=cpu bash launch/smoke_8gpu.sh     # 8 CPU processes: gloo, torch backend (make smoke, CI)
#   mkdir -p logs && sbatch launch/smoke_8gpu.sh # on a GPU node of the cluster
#SBATCH --job-name=tmd-smoke
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=00:30:00
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

: "${TMD_DEVICE:=cuda}"            # cuda | cpu
: "${TMD_RECIPE:=tiny_smoke}"
: "${TMD_MAX_STEPS:=3}"
: "${TMD_TP:=2}"
: "${TMD_CP:=2}"
: "${TMD_PP:=2}"
: "${TMD_NPROC:=8}"
: "${TMD_OVERRIDES:=}"
: "${TMD_TRAIN_CMD:=tmd-train}"
: "${TMD_TORCHRUN:=torchrun}"
: "${TMD_PYTHON:=python}"
if [[ $TMD_DEVICE == cpu ]]; then
    : "${TMD_BACKEND:=torch}"
else
    : "${TMD_BACKEND:=te}"
    # Transformer Engine has no fp32 attention kernel under context parallelism (tmd-plan refuses it): the GPU
    # smoke runs in bf16 autocast, the policy of the real recipes. Later overrides still win.
    [[ $TMD_BACKEND != te ]] || TMD_OVERRIDES="model.compute_dtype=bf16 ${TMD_OVERRIDES}"
fi
# Intra-op threads: the node's cores shared by its ranks (torchrun would set 1; torch alone, all cores per rank).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(($(nproc) / TMD_NPROC > 1 ? $(nproc) / TMD_NPROC : 1))}
keep_run_dir=${TMD_RUN_DIR:+1}
: "${TMD_RUN_DIR:=$(mktemp -d "${TMPDIR:-/tmp}/tmd-smoke.XXXXXX")}"

TMD_LAUNCH_DIR=${TMD_LAUNCH_DIR:-$(dirname "${BASH_SOURCE[0]}")}
if [[ ! -f $TMD_LAUNCH_DIR/lib.sh ]]; then # sbatch runs a copy of this script from slurmd's spool
    TMD_LAUNCH_DIR=$(dirname "$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Command=//p')")
fi
# shellcheck source=env.sh
source "$TMD_LAUNCH_DIR/env.sh"
# shellcheck source=lib.sh
source "$TMD_LAUNCH_DIR/lib.sh"

tmd_check_layout "$TMD_NPROC"
tmd_trainer_args
tmd_precheck "$TMD_NPROC"
cmd=()
read -r -a cmd <<<"$TMD_TRAIN_CMD"
tmd_log "smoke: $TMD_NPROC ranks on $TMD_DEVICE, TP$TMD_TP x CP$TMD_CP x PP$TMD_PP x DP$TMD_DP, backend $TMD_BACKEND"
tmd_log "trainer: $TMD_TRAIN_CMD ${TMD_ARGS[*]}"
"$TMD_TORCHRUN" --standalone --nproc-per-node="$TMD_NPROC" --max-restarts=0 --no-python "${cmd[@]}" "${TMD_ARGS[@]}" ||
    tmd_die "smoke: the trainer failed (exit $?); run dir kept: $TMD_RUN_DIR"

step=$("$TMD_PYTHON" -c 'import sys
from tmd_megatron.training.checkpoint import read_meta, resolve_checkpoint
found = resolve_checkpoint(sys.argv[1])
print(read_meta(found)["step"] if found else "none")' "$TMD_RUN_DIR/checkpoints")
[[ $step == "$TMD_MAX_STEPS" ]] ||
    tmd_die "smoke: expected a committed checkpoint at step $TMD_MAX_STEPS, found: $step (run dir kept: $TMD_RUN_DIR)"
tmd_log "smoke passed: $TMD_MAX_STEPS steps on $TMD_NPROC ranks, checkpoint step $step"
[[ -n $keep_run_dir ]] || rm -rf "$TMD_RUN_DIR"
