# Cluster set-up, sourced by every sbatch script in slurm/. An admin edits this file once per
# cluster: module loads, the Python environment, node-local caches. Keep it free of recipe values.

# module purge; module load cuda/12.4 python/3.11        # e.g. on an Lmod cluster
# source /path/to/venv/bin/activate                      # the environment with `pip install -e .`

# Triton/Inductor compile caches on node-local disk (NFS gives stale handles), one per user and
# node, kept across jobs: a requeued or later job finds its kernels compiled (minutes saved under
# max-autotune; README "Cluster check" measures warm vs cold). Safe under concurrent jobs: both
# caches write each entry to a temporary file and rename it into place (torch/_inductor/codecache.py
# `write_atomic`; triton/runtime/cache.py `FileCacheManager.put` uses os.replace), so a reader sees
# a whole entry or none. 0700: compiled code is executed, so nobody else may write it. The same
# rule in Python: jobs/tasks.py `compile_cache_env` (a test keeps them equal). Set the exports
# unconditionally: a path inherited from the submitting job may not exist on this node.
# NANOCHAT_COMPILE_CACHE_ROOT: node-local disk that outlives a job (not a per-job $TMPDIR).
export NANOCHAT_COMPILE_CACHE="${NANOCHAT_COMPILE_CACHE_ROOT:-/tmp}/nanochat-compile-${USER:-$(id -un)}"
mkdir -p -m 0700 "$NANOCHAT_COMPILE_CACHE" && chmod 0700 "$NANOCHAT_COMPILE_CACHE"
export TRITON_CACHE_DIR="$NANOCHAT_COMPILE_CACHE/triton"
export TORCHINDUCTOR_CACHE_DIR="$NANOCHAT_COMPILE_CACHE/inductor"
export PYTHONUNBUFFERED=1
# export HF_HOME=/scratch/$USER/hf                        # hub cache on shared storage
