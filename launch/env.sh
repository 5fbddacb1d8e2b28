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
# InfiniBand: NCCL picks every active HCA by default. Pin them when a node has HCAs that must not be used:
#   export NCCL_IB_HCA=mlx5_0,mlx5_1,mlx5_2,mlx5_3,mlx5_4,mlx5_5,mlx5_6,mlx5_7
# Multi-node jobs without InfiniBand (e.g. a TCP test cluster) need NCCL_IB_DISABLE=1.

# Hangs leave evidence: NCCL's flight recorder keeps the last collectives of every rank and writes them
# when the watchdog times a collective out (TORCH_NCCL_DUMP_ON_TIMEOUT), one file per rank in the run directory
# (nccl_trace_rank_<r>; decode: python -m torch.distributed.flight_recorder.fr_trace); the trainer writes every
# rank's Python stacks to the job log when a step runs past run.hang_dump_s (1500 s by default).
export TORCH_NCCL_TRACE_BUFFER_SIZE=${TORCH_NCCL_TRACE_BUFFER_SIZE:-2000}
export TORCH_NCCL_DUMP_ON_TIMEOUT=${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}
# The run directory exists by the time a collective can time out (the trainer creates it); nothing is created
# here, so a launch refused before it starts leaves no trace.
if [[ -n ${TMD_RUN_DIR:-} && -z ${TORCH_NCCL_DEBUG_INFO_TEMP_FILE:-} ]]; then
    export TORCH_NCCL_DEBUG_INFO_TEMP_FILE=$TMD_RUN_DIR/nccl_trace_rank_
fi

# Interfaces for the socket traffic: gloo carries barriers, object gathers and checkpoint collectives, NCCL
# its bootstrap. Left unset, gloo binds to whatever the host name resolves to -- 127.0.1.1 on many images,
# which hangs every multi-node job in its first barrier. Default: the interface that reaches MASTER_ADDR
# (on the master node itself, the interface holding its address), computed here on the first node and
# passed to every task by srun, so all nodes must name that interface alike (ib0, eth0, bond0...). Set
# TMD_SOCKET_IFNAME, or GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME themselves, where that guess is wrong.
tmd_socket_ifname() {
    local addr dev
    addr=$(getent ahostsv4 "$1" 2>/dev/null | awk 'NR == 1 {print $1}')
    [[ -n $addr ]] || return 0
    dev=$(ip -o route get "$addr" 2>/dev/null | sed -n 's/.* dev \([^ ]*\).*/\1/p')
    if [[ $dev == lo && $addr != 127.* ]]; then # our own address: the interface that carries it
        dev=$(ip -o -4 addr show 2>/dev/null | awk -v a="$addr" '{split($4, p, "/")} p[1] == a {print $2; exit}')
    fi
    printf '%s\n' "$dev"
}

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
if [[ -n ${MASTER_ADDR:-} ]]; then
    : "${TMD_SOCKET_IFNAME:=$(tmd_socket_ifname "$MASTER_ADDR")}"
    if [[ -n $TMD_SOCKET_IFNAME ]]; then
        export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$TMD_SOCKET_IFNAME}
        export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-$TMD_SOCKET_IFNAME}
    fi
fi
