#!/bin/bash
# One per node under srun (TMD_LAUNCH_MODE=torchrun): torchrun starts this node's ranks.
#   torchrun_node.sh <ranks per node> <trainer command and arguments...>
# Static rendezvous on MASTER_ADDR:MASTER_PORT (set by env.sh); the node rank is SLURM's. Elastic restarts
# are off: a failed step ends the job step, and recovery is the requeue in lib.sh.
set -euo pipefail
procs=$1
shift
# torchrun must survive an operator's `scancel --signal=USR1 <job>` (default action: terminate), which
# slurmstepd delivers to every process of the step; an ignored signal stays ignored across exec, and the
# ranks install their own handler. (The launcher itself asks the ranks to stop through run.stop_file.)
# SIGTERM stays torchrun's: it forwards it, then kills ranks after TORCH_ELASTIC_SHUTDOWN_TIMEOUT, raised
# here from 30 s so a rank that is saving a large checkpoint is not cut short.
trap '' USR1
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}
exec "${TMD_TORCHRUN:-torchrun}" --nnodes="$SLURM_JOB_NUM_NODES" --node-rank="$SLURM_NODEID" \
    --nproc-per-node="$procs" --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" \
    --max-restarts=0 --no-python "$@"
