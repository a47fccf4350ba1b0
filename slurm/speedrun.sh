#!/bin/bash
# The speedrun with plain sbatch: the launcher's plan for the recipe (jobs/plan.py: its stages,
# resources and dependencies) written as sbatch scripts into RUN_DIR/sbatch by
# `python jobs/launch.py RECIPE --emit`, then submitted by their submit.sh, which prints the job
# ids and the squeue line to watch. This script encodes no stage order of its own.
#   slurm/speedrun.sh configs/d16_bigram.yaml [section.key=value ...]
# First, on a node with internet: python -m nanochat.prepare RECIPE (shards, tokenizer, SFT data).
# Nodes, GPUs, partition and account come from the recipe's cluster section; extra sbatch options
# for every job from SBATCH_ARGS (e.g. SBATCH_ARGS="--reservation=r"). The report stage is the
# launcher's (python jobs/launch.py RECIPE), which also requeues training on SLURM's warning signal.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: slurm/speedrun.sh RECIPE [section.key=value ...]" >&2; exit 2; }
# a bad recipe stops here with its one-line error; nothing is submitted
out=$(python jobs/launch.py "$@" --emit --no-prepare)
printf '%s\n' "$out" | grep -v '^submit script: '
exec bash "$(printf '%s\n' "$out" | sed -n 's/^submit script: //p')"
