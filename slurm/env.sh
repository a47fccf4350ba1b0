# Cluster set-up, sourced by every sbatch script in slurm/. An admin edits this file once per
# cluster: module loads, the Python environment, node-local caches. Keep it free of recipe values.

# module purge; module load cuda/12.4 python/3.11        # e.g. on an Lmod cluster
# source /path/to/venv/bin/activate                      # the environment with `pip install -e .`

# Triton/Inductor compile caches on node-local disk: NFS gives stale handles, and a cache path
# inherited from a parent job breaks child jobs.
export TRITON_CACHE_DIR="${SLURM_TMPDIR:-${TMPDIR:-/tmp}}/triton-${USER:-user}-${SLURM_JOB_ID:-0}"
export TORCHINDUCTOR_CACHE_DIR="${SLURM_TMPDIR:-${TMPDIR:-/tmp}}/inductor-${USER:-user}-${SLURM_JOB_ID:-0}"
export PYTHONUNBUFFERED=1
# export HF_HOME=/scratch/$USER/hf                        # hub cache on shared storage
