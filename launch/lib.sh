# shellcheck shell=bash disable=SC2153 # the TMD_* settings come from the launcher that sources this file
# The job flow shared by tmd_14b.sh and tmd_1p3b.sh: start the ranks, turn the time-limit signal into
# "checkpoint and exit 75" (a stop file the trainer polls), requeue on 75 (at most TMD_MAX_REQUEUES times,
# never after scancel's SIGTERM), stop on anything else. Sourced after the launcher has set its TMD_*
# variables (see tmd_14b.sh). docs/operations.md explains the policy.
#
# Trainer contract: exit 0 = finished, 75 = checkpoint saved, requeue me, anything else = failure.
# On start the trainer resumes from <run dir>/checkpoints/latest when it exists.

TMD_EXIT_REQUEUE=75

tmd_log() {
    printf '[tmd-launch %(%F %T)T] %s\n' -1 "$*"
}

tmd_die() {
    tmd_log "error: $*" >&2
    exit 2
}

# The trainer's command line: the only place that knows tmd-train's hydra keys.
tmd_trainer_args() {
    TMD_ARGS=( # experiment= first: tmd_precheck hands the rest to tmd-plan
        "experiment=$TMD_RECIPE"
        "run.out_dir=$TMD_RUN_DIR"
        "parallel.tp=$TMD_TP"
        "parallel.cp=$TMD_CP"
        "parallel.pp=$TMD_PP"
    )
    [[ -z ${TMD_STOP_FILE:-} ]] || TMD_ARGS+=("run.stop_file=$TMD_STOP_FILE")
    [[ -z ${TMD_DEVICE:-} ]] || TMD_ARGS+=("run.device=$TMD_DEVICE")
    [[ -z ${TMD_BACKEND:-} ]] || TMD_ARGS+=("model.backend=$TMD_BACKEND")
    [[ -z ${TMD_MAX_STEPS:-} ]] || TMD_ARGS+=("run.max_steps=$TMD_MAX_STEPS")
    local extra=()
    read -r -a extra <<<"${TMD_OVERRIDES:-}"
    TMD_ARGS+=("${extra[@]}")
}

tmd_check_layout() {
    local name
    for name in TMD_TP TMD_CP TMD_PP; do
        [[ ${!name} =~ ^[1-9][0-9]*$ ]] || tmd_die "$name=${!name}: must be a positive integer"
    done
    local world=$1 model_parallel=$((TMD_TP * TMD_CP * TMD_PP))
    ((world % model_parallel == 0)) ||
        tmd_die "$world ranks do not divide into TP$TMD_TP x CP$TMD_CP x PP$TMD_PP = $model_parallel;" \
            "change TMD_TP/TMD_CP/TMD_PP or the number of nodes"
    TMD_DP=$((world / model_parallel))
}

# One process checks the recipe, the layout for $1 ranks and the files the run reads (tmd-plan, what tmd-train
# checks before it builds a model) before any rank starts: a mistake ends in one message and exit 2, not one
# message per rank (or, under torchrun, its launcher's traceback). Skipped where tmd-plan is not installed
# (a container given through TMD_SRUN_ARGS): the ranks then check the same things themselves.
tmd_precheck() {
    local plan=()
    read -r -a plan <<<"${TMD_PLAN_CMD:-tmd-plan}"
    if ! command -v "${plan[0]}" >/dev/null; then
        tmd_log "${plan[0]} not found here: the ranks check the recipe and its inputs themselves"
        return 0
    fi
    "${plan[@]}" "$TMD_RECIPE" --world "$1" "${TMD_ARGS[@]:1}" >/dev/null ||
        tmd_die "the recipe, its layout or its inputs were refused (above): nothing was started"
}

# Starts the job step in the background; TMD_STEP_PID is srun's pid.
tmd_start_step() {
    local cmd=()
    read -r -a cmd <<<"$TMD_TRAIN_CMD"
    # --kill-on-bad-exit=0 overrides a cluster-wide KillOnBadExit: a rank that exits 75 first must not get
    # the others killed while they finish the checkpoint. --cpus-per-task is given explicitly: srun 22.05
    # does not inherit it from sbatch.
    local cpus=${SLURM_CPUS_PER_TASK:-1} extra=()
    read -r -a extra <<<"${TMD_SRUN_ARGS:-}" # e.g. pyxis: --container-image=... --container-mounts=...
    if [[ $TMD_LAUNCH_MODE == srun ]]; then
        # One task per rank; the trainer reads SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID. The launcher never
        # signals the ranks, but an operator's `scancel --signal=USR1 <job>` does: ranks ignore SIGUSR1 (kept
        # across exec) until the trainer installs its handler. The few ms before the trap are still exposed.
        # shellcheck disable=SC2016 # $@ is expanded by the inner bash
        srun --kill-on-bad-exit=0 --label --cpus-per-task="$cpus" --ntasks-per-node="$TMD_PROCS_PER_NODE" \
            "${extra[@]}" bash -c 'trap "" USR1; exec "$@"' tmd-rank "${cmd[@]}" "${TMD_ARGS[@]}" &
    else
        # One torchrun per node, holding all of the node's CPUs; it starts the node's ranks.
        srun --kill-on-bad-exit=0 --label --cpus-per-task=$((cpus * TMD_PROCS_PER_NODE)) \
            --ntasks-per-node=1 --ntasks="$SLURM_JOB_NUM_NODES" "${extra[@]}" \
            bash "$TMD_LAUNCH_DIR/torchrun_node.sh" "$TMD_PROCS_PER_NODE" "${cmd[@]}" "${TMD_ARGS[@]}" &
    fi
    TMD_STEP_PID=$!
}

# Trap for the batch shell: SIGUSR1 from sbatch --signal=B:USR1@T before the time limit (or an operator's
# scancel --batch --signal=USR1), SIGTERM from scancel or preemption. The ranks are asked through
# run.stop_file, which rank 0 checks after every step, not by a signal: a signal that reaches a rank before
# it has set its handler (while srun is starting the tasks) kills it, and the others then wait in the
# rendezvous until its timeout. A file asked for during start-up is answered after the first step.
tmd_on_signal() {
    TMD_TRAPPED=1
    [[ $1 != TERM ]] || TMD_TERMINATED=1
    if ((TMD_STOP_ASKED)); then
        return
    fi
    TMD_STOP_ASKED=1
    tmd_log "got SIG$1: asking every rank to checkpoint and exit ($TMD_EXIT_REQUEUE): writing $TMD_STOP_FILE"
    if ! : >"$TMD_STOP_FILE"; then
        tmd_log "cannot write $TMD_STOP_FILE: signalling the ranks instead (a rank still starting may die)"
        scancel --signal=USR1 "$SLURM_JOB_ID" || true
    fi
}

# Waits for the step through trapped signals and returns its exit code. A trap interrupts `wait`
# (status 128+n) while the step runs on; wait again. If the signal came right after the step ended,
# the second wait has nothing left to report (127) and the first status stands.
tmd_wait_step() {
    local rc again
    TMD_TRAPPED=0
    wait "$TMD_STEP_PID" && rc=0 || rc=$?
    while ((TMD_TRAPPED)); do
        TMD_TRAPPED=0
        wait "$TMD_STEP_PID" && again=0 || again=$?
        ((again == 127)) && break
        rc=$again
    done
    return "$rc"
}

tmd_latest() {
    cat "$TMD_RUN_DIR/checkpoints/latest" 2>/dev/null || echo none
}

tmd_requeue() {
    local restarts=${SLURM_RESTART_COUNT:-0}
    if ((restarts >= TMD_MAX_REQUEUES)); then
        tmd_log "not requeueing: already requeued $restarts times (TMD_MAX_REQUEUES=$TMD_MAX_REQUEUES);" \
            "resubmit the same command to resume from $(tmd_latest)"
        exit "$TMD_EXIT_REQUEUE"
    fi
    tmd_log "checkpoint $(tmd_latest) saved; requeueing job $SLURM_JOB_ID (requeue $((restarts + 1)) of at most $TMD_MAX_REQUEUES)"
    scontrol requeue "$SLURM_JOB_ID" || tmd_die "scontrol requeue failed; resubmit to resume from $(tmd_latest)"
    exit 0
}

tmd_main() {
    [[ -n ${SLURM_JOB_ID:-} ]] || tmd_die "run this through sbatch (or inside salloc); for one node without SLURM see smoke_8gpu.sh"
    [[ $TMD_LAUNCH_MODE == srun || $TMD_LAUNCH_MODE == torchrun ]] ||
        tmd_die "TMD_LAUNCH_MODE=$TMD_LAUNCH_MODE: use srun (one task per rank) or torchrun (one torchrun per node)"
    # (With TMD_SRUN_ARGS, e.g. a container image, the trainer may exist only where the ranks run.)
    [[ -n ${TMD_SRUN_ARGS:-} ]] || command -v "${TMD_TRAIN_CMD%% *}" >/dev/null ||
        tmd_die "trainer '${TMD_TRAIN_CMD%% *}' not found on PATH: activate the environment before sbatch," \
            "run in the container (TMD_SRUN_ARGS), or set TMD_TRAIN_CMD"
    TMD_PROCS_PER_NODE=${TMD_PROCS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}}
    TMD_PROCS_PER_NODE=${TMD_PROCS_PER_NODE%%(*} # "8(x2)" form when nodes differ
    tmd_check_layout $((SLURM_JOB_NUM_NODES * TMD_PROCS_PER_NODE))
    TMD_STOP_FILE=$TMD_RUN_DIR/stop_request
    tmd_trainer_args
    tmd_precheck $((SLURM_JOB_NUM_NODES * TMD_PROCS_PER_NODE))
    mkdir -p "$TMD_RUN_DIR"
    # A request an earlier attempt already answered; removed before the traps can write a new one.
    rm -f "$TMD_STOP_FILE"

    # Traps next: the default action of SIGUSR1 would kill this shell.
    TMD_STOP_ASKED=0
    TMD_TERMINATED=0
    trap 'tmd_on_signal USR1' USR1
    trap 'tmd_on_signal TERM' TERM

    tmd_log "job $SLURM_JOB_ID attempt $((${SLURM_RESTART_COUNT:-0} + 1)) on $SLURM_JOB_NODELIST:" \
        "$SLURM_JOB_NUM_NODES nodes x $TMD_PROCS_PER_NODE ranks ($TMD_LAUNCH_MODE mode)," \
        "TP$TMD_TP x CP$TMD_CP x PP$TMD_PP x DP$TMD_DP, rendezvous $MASTER_ADDR:$MASTER_PORT"
    tmd_log "run dir $TMD_RUN_DIR, resume point: $(tmd_latest)"
    tmd_log "trainer: $TMD_TRAIN_CMD ${TMD_ARGS[*]}"

    tmd_start_step
    local rc=0
    tmd_wait_step || rc=$?
    tmd_log "trainer exited $rc; latest checkpoint: $(tmd_latest)"

    if ((rc == 0)); then
        tmd_log "finished"
        exit 0
    fi
    # SIGTERM means scancel (the operator wants the job gone) or preemption (SLURM requeues the job
    # itself when the partition's PreemptMode is REQUEUE): keep the checkpoint, never requeue here.
    if ((TMD_TERMINATED)); then
        tmd_log "SIGTERM (scancel or preemption): not requeueing; resubmit to resume from $(tmd_latest)"
        exit "$rc"
    fi
    if ((rc == TMD_EXIT_REQUEUE)); then
        tmd_requeue
    fi
    # torchrun reports any failed rank as 1, so its 75 is lost; after our stop request the step's
    # end is the requeue we asked for (the requeue cap bounds a trainer that keeps failing).
    if [[ $TMD_LAUNCH_MODE == torchrun ]] && ((TMD_STOP_ASKED)); then
        tmd_requeue
    fi
    tmd_log "trainer failed (exit $rc): not requeueing; fix the cause and resubmit (it resumes from $(tmd_latest))"
    exit "$rc"
}
