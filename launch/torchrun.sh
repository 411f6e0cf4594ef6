#!/usr/bin/env bash
# torchrun around launch/train.py: one node or several (docs/distributed.md).
#
#   launch/torchrun.sh NPROC --config configs/paper.yaml [key.path=value ...]
#
# One node (the default): torchrun --standalone (a c10d rendezvous on a free local port).
# Several nodes: run the same command on every node, with the same NNODES and rendezvous address:
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 launch/torchrun.sh 4 --config configs/paper.yaml
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 MASTER_PORT=29500 launch/torchrun.sh 4 --config configs/paper.yaml
#
# or the same as flags before NPROC:
#
#   launch/torchrun.sh --nnodes 2 --node-rank 1 --master-addr node0 --master-port 29500 4 --config ...
#
# NPROC is the number of processes on this node (one per GPU on GPU nodes); the world size is
# NNODES * NPROC and must not exceed expert.num. The rendezvous is torchrun's c10d one
# (--rdzv_backend=c10d --rdzv_endpoint=MASTER_ADDR:MASTER_PORT); NODE_RANK, when given, says which
# node hosts the rendezvous store (rank 0) instead of torchrun guessing it from the host name. Global
# ranks are assigned by the rendezvous, so rank 0 need not be on NODE_RANK 0: run.out_dir (and
# data.root) should be on a filesystem that every node sees.
#
# Other environment:
#   OMP_NUM_THREADS  threads per process; default: this node's CPU cores / NPROC (at least 1)
#   RDZV_ID          rendezvous id shared by the nodes of one job (default: $SLURM_JOB_ID or icm-dist)
#   MAX_RESTARTS     torchrun --max-restarts (default 0); a restarted group resumes from the last checkpoint
#   PYTHON           the interpreter that runs torchrun's launcher (default: python)
#   DRY_RUN=1        print the command instead of running it
set -euo pipefail

usage() {
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

nnodes="${NNODES:-1}"
node_rank="${NODE_RANK:-}"
master_addr="${MASTER_ADDR:-}"
master_port="${MASTER_PORT:-29500}"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --nnodes) nnodes="$2"; shift 2 ;;
        --node-rank|--node_rank) node_rank="$2"; shift 2 ;;
        --master-addr|--master_addr) master_addr="$2"; shift 2 ;;
        --master-port|--master_port) master_port="$2"; shift 2 ;;
        -h|--help) usage ;;
        --*) echo "torchrun.sh: '$1' is not a launcher option; the first argument after the options is NPROC" >&2; usage ;;
        *) break ;;
    esac
done
[[ $# -ge 1 && "$1" =~ ^[1-9][0-9]*$ ]] || { echo "torchrun.sh: the first argument must be NPROC, a positive integer" >&2; usage; }
nproc="$1"
shift
[[ "$nnodes" =~ ^[1-9][0-9]*$ ]] || { echo "torchrun.sh: NNODES must be a positive integer, got '$nnodes'" >&2; exit 2; }

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
train="$here/train.py"
agent="$here/torchrun_agent.py"  # torch.distributed.run, ending on a user error without a traceback

if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
    cores="$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)"
    threads=$(( cores / nproc ))
    export OMP_NUM_THREADS=$(( threads > 0 ? threads : 1 ))
fi

cmd=("${PYTHON:-python}" "$agent" --nproc_per_node="$nproc" --max_restarts="${MAX_RESTARTS:-0}")
if [[ "$nnodes" == 1 ]]; then
    cmd+=(--standalone)
else
    [[ -n "$master_addr" ]] || { echo "torchrun.sh: NNODES=$nnodes needs MASTER_ADDR (or --master-addr): the rendezvous host" >&2; exit 2; }
    cmd+=(--nnodes="$nnodes" --rdzv_backend=c10d --rdzv_endpoint="$master_addr:$master_port"
          --rdzv_id="${RDZV_ID:-${SLURM_JOB_ID:-icm-dist}}")
    if [[ -n "$node_rank" ]]; then
        if [[ "$node_rank" == 0 ]]; then cmd+=(--rdzv_conf=is_host=1); else cmd+=(--rdzv_conf=is_host=0); fi
    fi
    # Workers get a store of their own each round instead of a prefix of the rendezvous store: torchrun keys
    # that prefix by the local restart count, which only the node whose worker failed increments, so after a
    # restart the healthy node's workers read the dead round's addresses (pytorch/pytorch#135712).
    export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
fi
cmd+=("$train" "$@")

echo "torchrun.sh: OMP_NUM_THREADS=$OMP_NUM_THREADS ${cmd[*]}" >&2
if [[ "${DRY_RUN:-0}" == 1 ]]; then
    exit 0
fi
exec "${cmd[@]}"
