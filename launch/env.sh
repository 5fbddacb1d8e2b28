# shellcheck shell=bash
# Environment shared by the launchers (sourced; also fine to source in an interactive allocation).
# Cluster-specific values are commented examples: set them here, or export them before sbatch (sbatch
# passes the submitting shell's environment to the job).

# ---- NCCL / network -------------------------------------------------------------------------------
# Warnings only: INFO prints topology for every rank at start-up, useful once when bringing up a new cluster.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# A rank that dies leaves the others blocked in a collective; with async error handling the watchdog
# aborts them after the process-group timeout, so the job fails (and frees the nodes) instead of hanging
# until its time limit.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# Frees collective buffers when the collective finishes instead of when the caching allocator next syncs:
# lower peak memory with TP/CP all-gathers of long video token sequences.
export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
# One hardware queue per device keeps communication kernels in issue order, which Megatron-style
# TP/SP overlap relies on; harmless otherwise.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
# InfiniBand: NCCL picks every active HCA by default. Pin them (and the bootstrap interface, which
# must be the one the node names resolve to) when a node has HCAs or NICs that must not be used:
#   export NCCL_IB_HCA=mlx5_0,mlx5_1,mlx5_2,mlx5_3,mlx5_4,mlx5_5,mlx5_6,mlx5_7
#   export NCCL_SOCKET_IFNAME=ib0            # or the Ethernet interface of the management network
#   export GLOO_SOCKET_IFNAME=$NCCL_SOCKET_IFNAME
# Multi-node jobs without InfiniBand (e.g. a TCP test cluster) need NCCL_IB_DISABLE=1.

# ---- processes ------------------------------------------------------------------------------------
# Each rank gets its share of the CPUs; the default (all cores per rank) oversubscribes 8 ranks per node.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
# Log lines appear in the job log as they happen (and survive a kill at the time limit).
export PYTHONUNBUFFERED=1

# ---- rendezvous -----------------------------------------------------------------------------------
# Rank 0 runs on the allocation's first node; it hosts the TCP store every rank connects to. The port
# is derived from the job id (stable across requeues, distinct for jobs sharing a node) and kept below
# Linux's ephemeral range (32768+) so an outgoing connection cannot be holding it.
if [[ -n ${SLURM_JOB_NODELIST:-} ]]; then
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    MASTER_PORT=${TMD_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 10000))}
    export MASTER_ADDR MASTER_PORT
fi
