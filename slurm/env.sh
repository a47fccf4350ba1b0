# Cluster set-up, sourced by every sbatch script in slurm/ (with the script's arguments).
#
# Module loads and the Python environment come from the recipe's `cluster.setup` lines — the
# same lines the launcher's jobs run (configs/site.example.yaml) — when the script's first
# argument is a recipe (or a run/checkpoint directory holding recipe.yaml). Reading the recipe
# (jobs/launch.py --setup, from the submit directory: the checkout) takes a `python` that
# imports nanochat: sbatch passes the submitting shell's environment on by default, so submit
# from the shell where the venv is active.
_nanochat_recipe=""
if [ $# -ge 1 ] && [ -f "$1" ]; then _nanochat_recipe="$1"
elif [ $# -ge 1 ] && [ -f "$1/recipe.yaml" ]; then _nanochat_recipe="$1/recipe.yaml"; fi
if [ -n "$_nanochat_recipe" ]; then
  _nanochat_setup=$(PYTHONPATH="${SLURM_SUBMIT_DIR:-.}${PYTHONPATH:+:$PYTHONPATH}" \
                    python -m jobs.launch "$_nanochat_recipe" --setup) ||
    { echo "slurm/env.sh: could not read cluster.setup from $_nanochat_recipe (error above)" >&2; exit 1; }
  eval "$_nanochat_setup"   # the recipe's own shell lines, as in the launcher's jobs
fi
unset _nanochat_recipe _nanochat_setup

# Triton/Inductor compile caches on node-local disk, kept across jobs, 0700, pruned now and then:
# the rule is nanochat/paths.py `compile_cache_env` (the launcher's jobs use it too); this asks it
# for the exports. Always set here: a path inherited from the submitting job may not exist on this node.
_nanochat_cache=$(PYTHONPATH="${SLURM_SUBMIT_DIR:-.}${PYTHONPATH:+:$PYTHONPATH}" python -m nanochat.paths compile-cache) ||
  { echo "slurm/env.sh: could not set up the compile cache (error above)" >&2; exit 1; }
eval "$_nanochat_cache"   # export lines, each value shell-quoted (shlex.quote)
unset _nanochat_cache
export PYTHONUNBUFFERED=1
# export HF_HOME=/scratch/$USER/hf                        # hub cache on shared storage
