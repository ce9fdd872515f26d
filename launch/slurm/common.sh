# Sourced by launch/slurm/*.sbatch: environment, launch command, dry run, preemption.
#
# A batch script sets its pretrain.py flags in an array and calls `sat_main "${args[@]}" "$@"`.
# The dry-run path uses bash builtins only, so DRY_RUN=1 works on a laptop without SLURM
# (or even an empty PATH), given SLURM_JOB_NODELIST (and SLURM_NNODES) in the environment.

sat_die() {
    echo "error: $*" >&2
    exit 2
}

# `sat_require VAR hint`: one clear line, exit 2, when a required variable is empty.
sat_require() {
    [[ -n "${!1:-}" ]] || sat_die "$1 is not set; $2"
}

# A path every rank would otherwise reject, once each; only checked when really launching.
sat_require_dir() {
    [[ "${DRY_RUN:-0}" == 1 || -d "${!1}" ]] || sat_die "$1=${!1} is not a directory on $(hostname 2>/dev/null || echo this node)"
}

sat_positive_int() {
    [[ "$2" =~ ^[1-9][0-9]*$ ]] || sat_die "$1=$2: expected a positive integer"
}

# Hostlist expansion without SLURM: "gpu[01-03,07],login1" -> one name per line.
# Zero padding follows the range's first number, like scontrol; several bracket groups
# in one name ("r[1-2]n[1-2]") expand as their product.
sat_expand_hostlist() {
    local list=$1 item="" depth=0 i c
    for ((i = 0; i < ${#list}; i++)); do
        c=${list:i:1}
        case $c in
            "[") depth=$((depth + 1)) ;;
            "]") depth=$((depth - 1)); ((depth >= 0)) || sat_die "bad node list '$list': unmatched ]" ;;
        esac
        if [[ $c == "," && $depth == 0 ]]; then
            _sat_expand_one "$item" "$list" || return
            item=""
        else
            item+=$c
        fi
    done
    ((depth == 0)) || sat_die "bad node list '$list': unmatched ["
    _sat_expand_one "$item" "$list"
}

_sat_expand_one() {
    local name=$1 list=$2 prefix body rest part lo hi n num
    [[ -n "$name" ]] || sat_die "bad node list '$list': empty name"
    if [[ "$name" != *"["* ]]; then
        printf '%s\n' "$name"
        return
    fi
    prefix=${name%%\[*}
    rest=${name#*\[}
    body=${rest%%\]*}
    rest=${rest#*\]}
    local IFS=,
    for part in $body; do
        if [[ "$part" =~ ^([0-9]+)-([0-9]+)$ ]]; then
            lo=${BASH_REMATCH[1]} hi=${BASH_REMATCH[2]}
        elif [[ "$part" =~ ^[0-9]+$ ]]; then
            lo=$part hi=$part
        else
            sat_die "bad node list '$list': '$part' is not a number or range"
        fi
        ((10#$lo <= 10#$hi)) || sat_die "bad node list '$list': range $part runs backwards"
        for ((n = 10#$lo; n <= 10#$hi; n++)); do
            printf -v num '%0*d' "${#lo}" "$n"
            _sat_expand_one "$prefix$num$rest" "$list"
        done
    done
}

# scontrol knows every syntax the cluster uses; the fallback covers the common ones.
sat_hostnames() {
    local out
    if command -v scontrol >/dev/null 2>&1 && out=$(scontrol show hostnames "$1" 2>/dev/null) && [[ -n "$out" ]]; then
        printf '%s\n' "$out"
    else
        sat_expand_hostlist "$1"
    fi
}

# Derives everything the launch needs from SLURM's variables (or the dry run's fake ones).
sat_setup() {
    sat_require SLURM_JOB_NODELIST "submit with sbatch, or for a dry run export SLURM_JOB_NODELIST=gpu[01-04] SLURM_NNODES=4"
    local hosts
    hosts=$(sat_hostnames "$SLURM_JOB_NODELIST") || exit
    mapfile -t SAT_NODES <<<"$hosts"
    NNODES=${SLURM_NNODES:-${#SAT_NODES[@]}}
    [[ "$NNODES" == "${#SAT_NODES[@]}" ]] ||
        sat_die "SLURM_NNODES=$NNODES but SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST names ${#SAT_NODES[@]} nodes"

    GPUS_PER_NODE=${GPUS_PER_NODE:-${SAT_DEFAULT_RANKS_PER_NODE:-8}}
    sat_positive_int GPUS_PER_NODE "$GPUS_PER_NODE"
    WORLD_SIZE=$((NNODES * GPUS_PER_NODE))
    LAUNCHER=${LAUNCHER:-srun}
    [[ "$LAUNCHER" == srun || "$LAUNCHER" == torchrun ]] || sat_die "LAUNCHER=$LAUNCHER: expected srun or torchrun"

    export MASTER_ADDR=${MASTER_ADDR:-${SAT_NODES[0]}}
    # Below Linux's ephemeral range (32768+), and distinct for jobs sharing a first node.
    export MASTER_PORT=${MASTER_PORT:-$((15000 + ${SLURM_JOB_ID:-0} % 15000))}

    # One rank's share of the node's CPUs: srun would otherwise give each task one CPU.
    if [[ -z "${CPUS_PER_TASK:-}" && -n "${SLURM_CPUS_ON_NODE:-}" ]]; then
        local tasks=$GPUS_PER_NODE
        [[ "$LAUNCHER" == torchrun ]] && tasks=1
        CPUS_PER_TASK=$((SLURM_CPUS_ON_NODE / tasks))
        ((CPUS_PER_TASK >= 1)) || CPUS_PER_TASK=1
    fi
    local per_rank=${CPUS_PER_TASK:-1}
    [[ "$LAUNCHER" == torchrun && -n "${CPUS_PER_TASK:-}" ]] && per_rank=$((CPUS_PER_TASK / GPUS_PER_NODE))
    ((per_rank >= 1)) || per_rank=1
    # torch would start one thread per core in every rank: ranks x cores threads thrash.
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$per_rank}
    # A dead rank fails the others' collectives instead of leaving them hung to the time limit.
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    if [[ -n "${SOCKET_IFNAME:-}" ]]; then  # nodes with several networks: pick the fabric
        export NCCL_SOCKET_IFNAME=$SOCKET_IFNAME GLOO_SOCKET_IFNAME=$SOCKET_IFNAME
    fi
    export PYTHONUNBUFFERED=1  # log lines reach logs/*.out as they happen, not at exit

    local name=${SLURM_JOB_NAME:-${SAT_DEFAULT_JOB_NAME:-sat}}
    RUN_DIR=${RUN_DIR:-runs/$name}
    [[ "$RUN_DIR" == /* ]] || RUN_DIR=$PWD/$RUN_DIR  # every node and the requeued job agree
    CKPT_DIR=$RUN_DIR/checkpoints
    TB_DIR=$RUN_DIR/tensorboard
    LOG_DIR=$RUN_DIR/logs
    PYTHON=${PYTHON:-python}
    TORCHRUN=${TORCHRUN:-torchrun}
}

# Checkpoint and TensorBoard flags; --load only when there is something to resume. With
# FINETUNE_FROM (another run's checkpoint directory) the job is a new stage: its first launch
# loads those weights with --finetune, and a requeued job resumes its own checkpoints.
sat_run_args() {
    SAT_RUN_ARGS=(--save "$CKPT_DIR" --tensorboard-dir "$TB_DIR")
    if [[ -f "$CKPT_DIR/latest" ]]; then
        SAT_RUN_ARGS+=(--load "$CKPT_DIR")
    elif [[ -n "${FINETUNE_FROM:-}" ]]; then
        SAT_RUN_ARGS+=(--load "$FINETUNE_FROM" --finetune)
    fi
}

sat_launch_cmd() {
    local script=$SAT_REPO/launch/pretrain.py
    local cpus=()
    [[ -n "${CPUS_PER_TASK:-}" ]] && cpus=(--cpus-per-task="$CPUS_PER_TASK")
    if [[ "$LAUNCHER" == srun ]]; then
        SAT_LAUNCH=(srun --nodes="$NNODES" --ntasks="$WORLD_SIZE" --ntasks-per-node="$GPUS_PER_NODE" "${cpus[@]}"
                    --kill-on-bad-exit=1 "$PYTHON" "$script" "$@")
    else
        # SLURM signals every process of a step; the torchrun agent would die of SIGUSR1, so
        # it ignores it and only the trainer ranks (which install their own handler) react.
        SAT_LAUNCH=(srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 "${cpus[@]}"
                    --kill-on-bad-exit=1 bash -c 'trap "" USR1; exec "$@"' torchrun
                    "$TORCHRUN" --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE"
                    --rdzv-id "${SLURM_JOB_ID:-0}" --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT"
                    "$script" "$@")
    fi
}

# `sat_flag_value --flag args...`: the flag's last value (extra flags from "$@" come last
# and win, as in pretrain.py's argparse); empty when absent.
sat_flag_value() {
    local flag=$1 want="" a
    shift
    SAT_FLAG_VALUE=""
    for a in "$@"; do
        if [[ -n "$want" ]]; then
            SAT_FLAG_VALUE=$a
            want=""
        elif [[ "$a" == "$flag" ]]; then
            want=1
        elif [[ "$a" == "$flag="* ]]; then
            SAT_FLAG_VALUE=${a#*=}
        fi
    done
}

# Layout errors are cheaper here than as one error line from each of hundreds of ranks.
sat_check_layout() {
    local tp mbs gbs dp
    sat_flag_value --tensor-model-parallel-size "$@"; tp=${SAT_FLAG_VALUE:-1}
    sat_flag_value --micro-batch-size "$@"; mbs=$SAT_FLAG_VALUE
    sat_flag_value --global-batch-size "$@"; gbs=$SAT_FLAG_VALUE
    sat_positive_int TP "$tp"
    ((WORLD_SIZE % tp == 0)) ||
        sat_die "TP=$tp does not divide the world size $WORLD_SIZE ($NNODES nodes x $GPUS_PER_NODE); change TP or the node count"
    dp=$((WORLD_SIZE / tp))
    if [[ "$mbs" =~ ^[1-9][0-9]*$ && "$gbs" =~ ^[1-9][0-9]*$ ]] && ((gbs % (mbs * dp))); then
        sat_die "GLOBAL_BATCH_SIZE=$gbs is not a multiple of MICRO_BATCH_SIZE x data-parallel size = $mbs x $dp; change it or the node count"
    fi
}

# Shell words as a person would type them: bare when safe, else in single quotes.
_sat_quote() {
    local out="" w
    for w in "$@"; do
        if [[ -n "$w" && "$w" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
            out+="$w "
        else
            out+="'${w//\'/\'\\\'\'}' "
        fi
    done
    SAT_QUOTED=${out% }
}

sat_print_plan() {
    echo "# sat_dist: job ${SLURM_JOB_ID:-?} (${SLURM_JOB_NAME:-${SAT_DEFAULT_JOB_NAME:-sat}}), restart ${SLURM_RESTART_COUNT:-0}"
    echo "# nodes ($NNODES): ${SAT_NODES[*]}"
    echo "# world size $WORLD_SIZE = $NNODES nodes x $GPUS_PER_NODE ranks per node, launcher $LAUNCHER"
    _sat_quote export MASTER_ADDR="$MASTER_ADDR" MASTER_PORT="$MASTER_PORT" OMP_NUM_THREADS="$OMP_NUM_THREADS" \
        TORCH_NCCL_ASYNC_ERROR_HANDLING="$TORCH_NCCL_ASYNC_ERROR_HANDLING" NCCL_DEBUG="$NCCL_DEBUG" PYTHONUNBUFFERED=1
    echo "$SAT_QUOTED"
    _sat_quote mkdir -p "$LOG_DIR" "$TB_DIR" "$CKPT_DIR"
    echo "$SAT_QUOTED"
    echo "# output also appended to $LOG_DIR/train.log"
    _sat_quote "${SAT_LAUNCH[@]}"
    echo "$SAT_QUOTED"
}

_sat_on_usr1() {
    SAT_PREEMPTED=1
    echo "sat_dist: SIGUSR1 (time limit near): forwarding to the training step, which saves and exits"
    # Without --batch/--full scancel signals the job's steps and not this shell.
    scancel --signal=USR1 "$SLURM_JOB_ID" || echo "sat_dist: scancel --signal=USR1 failed" >&2
}

# Runs the step; after a pre-timeout signal, requeues the job if the run is not finished.
sat_main() {
    SAT_REPO=${SAT_REPO:-$(cd "${BASH_SOURCE[0]%/*}/../.." && pwd)}
    sat_setup
    sat_check_layout "$@"
    sat_run_args
    sat_launch_cmd "$@" "${SAT_RUN_ARGS[@]}"
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        sat_print_plan
        exit 0
    fi

    mkdir -p "$LOG_DIR" "$TB_DIR" "$CKPT_DIR"
    sat_print_plan
    SAT_PREEMPTED=0
    trap _sat_on_usr1 USR1
    # SIGTERM (scancel, the time limit, SLURM's own preemption) reaches the step directly;
    # the shell keeps waiting so the step's checkpoint can finish within KillWait.
    trap 'echo "sat_dist: SIGTERM: waiting for the training step to stop"' TERM

    # The run's log across requeues and resubmissions, besides the job's own logs/*.out. tee
    # outlives the signals: srun would die of SIGPIPE writing to a dead tee mid-checkpoint.
    "${SAT_LAUNCH[@]}" 2>&1 | (trap '' TERM USR1; exec tee -a "$LOG_DIR/train.log") &
    local pid=$! rc
    while :; do
        wait "$pid" && rc=0 || rc=$?
        # wait returns >128 when a trapped signal interrupts it; the step is still running.
        ((rc > 128)) && kill -0 "$pid" 2>/dev/null && continue
        break
    done
    trap - USR1 TERM
    echo "sat_dist: training step exited with $rc"
    if [[ "$SAT_PREEMPTED" == 1 ]]; then
        sat_requeue_if_unfinished "$rc" "$@"
    fi
    exit "$rc"
}

sat_requeue_if_unfinished() {
    local rc=$1 tag="" done_iter
    shift
    if [[ "$rc" != 0 ]]; then
        echo "error: the training step exited with $rc after the pre-timeout signal; not requeueing" >&2
        exit "$rc"
    fi
    sat_flag_value --train-iters "$@"
    SAT_TRAIN_ITERS=$SAT_FLAG_VALUE
    if [[ -f "$CKPT_DIR/latest" ]]; then
        tag=$(<"$CKPT_DIR/latest")
    fi
    done_iter=${tag##*_}
    if [[ -n "$SAT_TRAIN_ITERS" && "$done_iter" =~ ^[0-9]+$ ]] && ((10#$done_iter >= SAT_TRAIN_ITERS)); then
        echo "sat_dist: run finished at iteration $((10#$done_iter)); not requeueing"
        exit 0
    fi
    echo "sat_dist: checkpoint ${tag:-none} of $SAT_TRAIN_ITERS iterations; requeueing job $SLURM_JOB_ID"
    if ! scontrol requeue "$SLURM_JOB_ID"; then
        echo "error: scontrol requeue $SLURM_JOB_ID failed; resubmit with RUN_DIR=$RUN_DIR to resume" >&2
        exit 1
    fi
    exit 0
}
