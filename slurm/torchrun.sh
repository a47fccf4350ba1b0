#!/bin/bash
# Data-parallel launch inside a SLURM job, shared by train.sbatch and sft.sbatch: one torchrun
# per node, rendezvous on the job's first node.
#   bash slurm/torchrun.sh MODULE RECIPE [section.key=value ...]      (from a batch script)
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: slurm/torchrun.sh MODULE RECIPE [section.key=value ...]" >&2; exit 2; }
MODULE=$1
shift

# MASTER_ADDR: the job's first node (never hard-coded), at the address SLURM reaches it by —
# a node name need not resolve from every node.
FIRST_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_ADDR=$(scontrol show node "$FIRST_NODE" | tr ' ' '\n' | sed -n 's/^NodeAddr=//p' | head -n 1)
MASTER_ADDR=${MASTER_ADDR:-$FIRST_NODE}
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
GPUS=${SLURM_GPUS_ON_NODE:-1}
echo "$MODULE: ${SLURM_JOB_NUM_NODES} node(s) × ${GPUS} GPU(s), rendezvous ${MASTER_ADDR}:${MASTER_PORT}"

# Arguments are passed as an argument vector ("$@"): recipe values never meet a shell.
exec srun --kill-on-bad-exit=1 torchrun \
  --nnodes="$SLURM_JOB_NUM_NODES" --nproc-per-node="$GPUS" \
  --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID" \
  -m "$MODULE" "$@"
