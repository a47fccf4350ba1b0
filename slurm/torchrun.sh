#!/bin/bash
# Data-parallel launch inside a SLURM job, shared by train.sbatch and sft.sbatch: one torchrun
# per node, rendezvous on the job's first node.
#   bash slurm/torchrun.sh MODULE RECIPE [section.key=value ...]      (from a batch script)
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: slurm/torchrun.sh MODULE RECIPE [section.key=value ...]" >&2; exit 2; }
MODULE=$1
shift

# the checkout's helpers below (jobs.nodes, nanochat.paths) run on every node, outside its cwd's reach
export PYTHONPATH="${SLURM_SUBMIT_DIR:-$PWD}${PYTHONPATH:+:$PYTHONPATH}"
# MASTER_ADDR: the job's first node (never hard-coded), at the address SLURM reaches it by —
# a node name need not resolve from every node (jobs/nodes.py: the one rule, the launcher's too).
MASTER_ADDR=$(python -m jobs.nodes master)
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
# Per node, inside the step: the compile cache is node-local, so each node sets up its own
# (nanochat/paths.py, as slurm/env.sh did on the first); and torchrun's --local-addr is the node's
# NodeAddr, because rank 0's agent otherwise publishes its FQDN as MASTER_ADDR, which may not
# resolve elsewhere (or be "localhost").
PER_NODE='CACHE=$(python -m nanochat.paths compile-cache) || exit 1
eval "$CACHE"
ADDR=$(python -m jobs.nodes self 2>/dev/null || true)
exec "$1" ${ADDR:+--local-addr="$ADDR"} "${@:2}"'

# Arguments are passed as an argument vector ("$@"): recipe values never meet a shell.
# --rdzv-conf: the c10d store's reads time out after 60 s by default (read_timeout), and an agent
# whose node is slow to start (imports from a loaded shared filesystem, a busy node) then fails
# the rendezvous; the local cluster saw it on a loaded host. Allow 5 min per read and 15 min to join.
exec srun --kill-on-bad-exit=1 ${CPUS_ARGS[@]+"${CPUS_ARGS[@]}"} bash -c "$PER_NODE" _ torchrun \
  --nnodes="$SLURM_JOB_NUM_NODES" --nproc-per-node="$GPUS" \
  --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID" \
  --rdzv-conf=join_timeout=900,read_timeout=300 \
  -m "$MODULE" "$@"
