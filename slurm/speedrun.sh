#!/bin/bash
# The speedrun with plain sbatch: the recipe's stages, chained with afterok:
#   discover → base → sft → eval, and base → kv_bench     (report is the launcher's)
#   slurm/speedrun.sh configs/d16_bigram.yaml [section.key=value ...]
# First, on a node with internet: python -m nanochat.prepare RECIPE (shards, tokenizer, SFT data).
# Nodes and GPUs come from the recipe's cluster section; extra sbatch options from SBATCH_ARGS
# (e.g. SBATCH_ARGS="--partition=a100 --account=proj").
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: slurm/speedrun.sh RECIPE [section.key=value ...]" >&2; exit 2; }
# The resolved recipe (a bad one stops here with its one-line error): nodes, GPUs, run dir, stages.
IFS=$'\t' read -r NODES GPUS RUN_DIR STAGES < <(python -m nanochat.recipe "$@" | python -c '
import sys, yaml
r = yaml.safe_load(sys.stdin)
c = r["cluster"]
print(c["nodes"], c["gpus_per_node"], r.get("run_dir") or "runs/" + r["name"], ",".join(r["stages"]), sep="\t")')
read -r -a EXTRA <<< "${SBATCH_ARGS:-}"
submit() { sbatch --parsable "${EXTRA[@]}" "$@" | cut -d';' -f1; }
wants() { [[ ",$STAGES," == *",$1,"* ]]; }
after() { [ -n "$1" ] && echo "--dependency=afterok:$1 --kill-on-invalid-dep=yes" || true; }

discover="" base="" sft="" eval="" kv_bench=""
wants discover && discover=$(submit slurm/discover.sbatch "$@")
# shellcheck disable=SC2046  # after() prints zero or two options, split on purpose
wants base && base=$(submit $(after "$discover") --nodes="$NODES" --gpus-per-node="$GPUS" \
                       slurm/train.sbatch "$@")
# shellcheck disable=SC2046
wants sft && sft=$(submit $(after "$base") --nodes="$NODES" --gpus-per-node="$GPUS" \
                     slurm/sft.sbatch "$@")
# shellcheck disable=SC2046
wants eval && eval=$(submit $(after "${sft:-$base}") slurm/eval.sbatch \
                       "$RUN_DIR$(wants sft && echo /sft)")
# shellcheck disable=SC2046
wants kv_bench && kv_bench=$(submit $(after "$base") slurm/kv_bench.sbatch "$@")
echo "discover ${discover:--} → base ${base:--} → sft ${sft:--} → eval ${eval:--}; kv_bench ${kv_bench:--}"
jobs=$(echo "$discover,$base,$sft,$eval,$kv_bench" | tr -s ',' | sed 's/^,//; s/,$//')
echo "watch:   squeue -j $jobs -o '%.10i %.16j %.8T %.10M %.20R'"
