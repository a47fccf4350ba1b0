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

# CPUs: SLURM ≥ 22.05 no longer passes sbatch's --cpus-per-task on to srun (srun(1), "Beginning
# with 22.05, srun will not inherit the --cpus-per-task value requested by salloc or sbatch"), so
# without it the node's torchrun ranks and inductor's compile workers share one CPU. The task's
# CPUs are shared by the node's ranks: OMP_NUM_THREADS per rank (torchrun would set 1).
CPUS_ARGS=()
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
  CPUS_ARGS=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
  PER_RANK=$(( SLURM_CPUS_PER_TASK / GPUS ))
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( PER_RANK > 0 ? PER_RANK : 1 ))}
fi
# Per node, inside the step: the compile cache (slurm/env.sh) is node-local, so it is made 0700
# on every node; and torchrun's --local-addr is the node's NodeAddr, because rank 0's agent
# otherwise publishes its FQDN as MASTER_ADDR, which may not resolve elsewhere (or be "localhost").
CACHE=${NANOCHAT_COMPILE_CACHE:-}
PER_NODE='if [ -n "$1" ]; then mkdir -p -m 0700 "$1" && chmod 0700 "$1"; fi
ADDR=$(scontrol show node "${SLURMD_NODENAME:-}" 2>/dev/null | tr " " "\n" | sed -n "s/^NodeAddr=//p" | head -n 1)
shift; exec "$1" ${ADDR:+--local-addr="$ADDR"} "${@:2}"'

# Arguments are passed as an argument vector ("$@"): recipe values never meet a shell.
exec srun --kill-on-bad-exit=1 ${CPUS_ARGS[@]+"${CPUS_ARGS[@]}"} bash -c "$PER_NODE" _ "$CACHE" torchrun \
  --nnodes="$SLURM_JOB_NUM_NODES" --nproc-per-node="$GPUS" \
  --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID" \
  -m "$MODULE" "$@"
