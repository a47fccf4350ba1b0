# Cluster set-up, sourced by every sbatch script in slurm/ (with the script's arguments).
#
# Module loads and the Python environment come from the recipe's `cluster.setup` lines — the
# same lines the launcher's jobs run (configs/site.example.yaml) — when the script's first
# argument is a recipe (or a run/checkpoint directory holding recipe.yaml). Reading the recipe
# takes a `python` that imports nanochat: sbatch passes the submitting shell's environment on
# by default, so submit from the shell where the venv is active.
_nanochat_recipe=""
if [ $# -ge 1 ] && [ -f "$1" ]; then _nanochat_recipe="$1"
elif [ $# -ge 1 ] && [ -f "$1/recipe.yaml" ]; then _nanochat_recipe="$1/recipe.yaml"; fi
if [ -n "$_nanochat_recipe" ]; then
  _nanochat_setup=$(PYTHONPATH="${SLURM_SUBMIT_DIR:-.}${PYTHONPATH:+:$PYTHONPATH}" \
                    python -m nanochat.recipe "$_nanochat_recipe" --setup) ||
    { echo "slurm/env.sh: could not read cluster.setup from $_nanochat_recipe (error above)" >&2; exit 1; }
  eval "$_nanochat_setup"   # the recipe's own shell lines, as in the launcher's jobs
fi
unset _nanochat_recipe _nanochat_setup

# Triton/Inductor compile caches on node-local disk (NFS gives stale handles), one per user and
# node, kept across jobs: a requeued or later job finds its kernels compiled (minutes saved under
# max-autotune; docs/cluster-check.md measures warm vs cold). Safe under concurrent jobs: both
# caches write each entry to a temporary file and rename it into place (torch/_inductor/codecache.py
# `write_atomic`; triton/runtime/cache.py `FileCacheManager.put` uses os.replace), so a reader sees
# a whole entry or none. 0700: compiled code is executed, so nobody else may write it. The same
# rule in Python: jobs/tasks.py `compile_cache_env` (a test keeps them equal). Set the exports
# unconditionally: a path inherited from the submitting job may not exist on this node.
# NANOCHAT_COMPILE_CACHE_ROOT: node-local disk that outlives a job (not a per-job $TMPDIR).
export NANOCHAT_COMPILE_CACHE="${NANOCHAT_COMPILE_CACHE_ROOT:-/tmp}/nanochat-compile-${USER:-$(id -un)}"
mkdir -p -m 0700 "$NANOCHAT_COMPILE_CACHE" && chmod 0700 "$NANOCHAT_COMPILE_CACHE"
# entries neither used nor written for 14 days go (jobs/tasks.py prune_compile_cache: same rule)
find "$NANOCHAT_COMPILE_CACHE" -type f -atime +14 -mtime +14 -delete 2>/dev/null || true
export TRITON_CACHE_DIR="$NANOCHAT_COMPILE_CACHE/triton"
export TORCHINDUCTOR_CACHE_DIR="$NANOCHAT_COMPILE_CACHE/inductor"
export PYTHONUNBUFFERED=1
# export HF_HOME=/scratch/$USER/hf                        # hub cache on shared storage
