#!/bin/bash
# The speedrun with plain sbatch: discover → train → sweep, chained with afterok.
#   slurm/speedrun.sh configs/d16_bigram.yaml [section.key=value ...]
# Nodes and GPUs come from the recipe's cluster section; extra sbatch options from SBATCH_ARGS
# (e.g. SBATCH_ARGS="--partition=a100 --account=proj").
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: slurm/speedrun.sh RECIPE [section.key=value ...]" >&2; exit 2; }
read -r NODES GPUS < <(python -m nanochat.recipe "$@" | python -c \
  'import sys, yaml; c = yaml.safe_load(sys.stdin)["cluster"]; print(c["nodes"], c["gpus_per_node"])')
read -r -a EXTRA <<< "${SBATCH_ARGS:-}"
submit() { sbatch --parsable "${EXTRA[@]}" "$@" | cut -d';' -f1; }

discover=$(submit slurm/discover.sbatch "$@")
train=$(submit --dependency="afterok:$discover" --kill-on-invalid-dep=yes \
          --nodes="$NODES" --gpus-per-node="$GPUS" slurm/train.sbatch "$@")
sweep=$(submit --dependency="afterok:$train" --kill-on-invalid-dep=yes slurm/sweep.sbatch "$@")
echo "discover $discover → train $train → sweep $sweep"
echo "watch:   squeue -j $discover,$train,$sweep -o '%.10i %.16j %.8T %.10M %.20R'"
