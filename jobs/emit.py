"""`python jobs/launch.py RECIPE [overrides] --emit [DIR]`: the launch plan as plain sbatch files.

The plan the launcher submits (jobs/plan.py) written out for people who submit by hand, and for
slurm/speedrun.sh: one script per stage (`<stage>.sbatch`, an array for a grid) whose #SBATCH
lines come from the plan's resources, and `submit.sh`, which submits them in the plan's order
with its dependencies (`sbatch --parsable`, `--dependency=afterok:`/`aftercorr:`) and prints the
job ids and the squeue line to watch. Emitting writes files only; `bash DIR/submit.sh` submits.

Each stage script runs the stage's wrapper in slurm/ (train.sbatch, sft.sbatch, ...) with the
task's arguments: the wrappers stay the one place a stage's command is written (srun + torchrun
across nodes, slurm/torchrun.sh), and stay usable by hand. What differs from the launcher's jobs:
they run this checkout (no code snapshot), keep no manifest (so no `report` stage: the report
reads the manifest) and do not requeue themselves on SLURM's warning signal — resubmitting a
training script resumes from its newest checkpoint.

No value of the recipe is ever read by a shell: the arguments are written with shlex.quote,
the resolved recipe (overrides applied, paths absolute) is a YAML file next to the scripts, and
#SBATCH values are plain tokens (jobs/plan.py SAFE_VALUE).
"""
from __future__ import annotations

import os
import shlex
from pathlib import Path

from jobs.executors import REPO, dependency_option
from jobs.plan import SAFE_VALUE, Plan, Stage, stage_partition
from nanochat.common import UserError, atomic_write_text
from nanochat.recipe import save_resolved_recipe

# the wrapper in slurm/ that runs each stage (report: the launcher's, see above)
WRAPPERS = {"check": "check.sbatch", "discover": "discover.sbatch", "base": "train.sbatch",
            "sft": "sft.sbatch", "eval": "eval.sbatch", "kv_bench": "kv_bench.sbatch"}
SQUEUE_FORMAT = "%.10i %.16j %.8T %.10M %.20R"


def task_arguments(stage: Stage, recipe_path: Path, compile_: bool) -> list[list[str]]:
    """The wrapper's arguments for each task of a stage: the resolved recipe, the task's grid
    values and the directory the plan gives it (as jobs/tasks.py's runners read them)."""
    out = []
    for t in stage.tasks:
        rec = [str(recipe_path), *t.overrides]
        out.append({
            "check": rec + [f"run_dir={t.recipe_run_dir}"] + ([] if compile_ else ["--no-compile"]),
            "discover": rec,
            "base": rec + [f"run_dir={t.recipe_run_dir}"],
            "sft": rec + [f"run_dir={t.recipe_run_dir}"],
            "eval": [t.run_dir],  # the checkpoint's directory: its own recipe.yaml says the rest
            "kv_bench": rec + [f"run_dir={t.recipe_run_dir}", "--out", t.run_dir],
        }[stage.name])
    return out


def sbatch_options(plan: Plan, stage: Stage, log_dir: Path) -> list[str]:
    """The #SBATCH options of a stage. One task per node (the wrappers start one torchrun per
    node), holding the CPUs of the node's ranks (cluster.cpus_per_task is per GPU)."""
    c = plan.recipe.cluster
    n = len(stage.tasks)
    opts = [f"--job-name={plan.recipe.name}-{stage.name}", f"--nodes={stage.nodes}", "--ntasks-per-node=1",
            f"--cpus-per-task={stage.cpus_per_task * max(1, stage.tasks_per_node)}", f"--time={stage.time_min}",
            f"--output={log_dir}/%x-{'%A_%a' if n > 1 else '%j'}.out"]
    if stage.gpus_per_node:
        opts.append(f"--gpus-per-node={stage.gpus_per_node}")
    if n > 1:
        opts.append(f"--array=0-{n - 1}%{c.array_parallelism}")
    named = {"partition": stage_partition(plan.recipe, stage.name), "account": c.account, "qos": c.qos,
             "constraint": c.constraint, "wckey": c.wckey, "mem": f"{c.mem_gb}G" if c.mem_gb else None}
    named.update(c.additional)
    for key, value in named.items():
        if value is True:
            opts.append(f"--{key}")
        elif value not in (None, False):
            opts.append(f"--{key}={value}")
    for opt in opts:  # the run directory is the one value here a recipe did not already check
        if not SAFE_VALUE.fullmatch(opt.lstrip("-")):
            raise UserError(f"#SBATCH {opt!r} has characters an sbatch line can't hold (allowed: letters, "
                            "digits and _.:,=@%/+-); choose a run_dir (or --output-root) without them")
    return opts


def stage_script(plan: Plan, stage: Stage, args: list[list[str]], log_dir: Path) -> str:
    header = "\n".join(f"#SBATCH {o}" for o in sbatch_options(plan, stage, log_dir))
    if len(args) == 1:
        select = f"set -- {shlex.join(args[0])}"
    else:  # an array: task i's arguments, chosen by SLURM_ARRAY_TASK_ID
        cases = "\n".join(f"  {i}) set -- {shlex.join(a)} ;;" for i, a in enumerate(args))
        select = (f'case "${{SLURM_ARRAY_TASK_ID:?{stage.name} is an array: submit it with its --array line}}" in\n'
                  f'{cases}\n  *) echo "{stage.name}: no task $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;\nesac')
    repo = shlex.quote(str(REPO))
    return f"""#!/bin/bash
# Stage {stage.name} of {plan.recipe.name}, written by `python jobs/launch.py ... --emit` from the
# launch plan (jobs/plan.py); submitted by submit.sh beside it, or by hand: sbatch {stage.name}.sbatch
{header}
set -euo pipefail
{select}
# the wrapper finds the checkout by SLURM_SUBMIT_DIR (sbatch runs a copy of this script): name it
cd {repo}
SLURM_SUBMIT_DIR={repo} exec bash slurm/{WRAPPERS[stage.name]} "$@"
"""


def submit_script(plan: Plan, stages: list[Stage]) -> str:
    """Submits the stage scripts beside it in the plan's order; each waits for the stages the
    plan says (a stage's job id is its shell variable: digits from `sbatch --parsable`)."""
    lines = []
    for stage in stages:
        dep = dependency_option(stage, {a: f"${{{a}}}" for a in stage.after if a in WRAPPERS})
        if dep and len(stage.tasks) == 1:  # task-wise afterok between single jobs is afterok
            dep = dep.replace("aftercorr:", "afterok:")
        opts = f'"--dependency={dep}" --kill-on-invalid-dep=yes ' if dep else ""
        lines.append(f'{stage.name}=$(submit {opts}"$here/{stage.name}.sbatch"); queued+=("${stage.name}")')
    names = [s.name for s in stages]
    chain = " ".join(f"{n} ${n}" for n in names)
    ids = ",".join(f"${n}" for n in names)
    return f"""#!/bin/bash
# Submits the stages of {plan.recipe.name} (written by `python jobs/launch.py ... --emit`) with the
# plan's dependencies; prints the job ids and the squeue line to watch. Extra sbatch options for
# every job: SBATCH_ARGS (split on spaces, never evaluated), e.g. SBATCH_ARGS="--reservation=r".
set -euo pipefail
here=$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)
read -r -a EXTRA <<< "${{SBATCH_ARGS:-}}"
submit() {{ sbatch --parsable ${{EXTRA[@]+"${{EXTRA[@]}}"}} "$@" | cut -d';' -f1; }}
# a refused sbatch leaves no half-submitted plan: the jobs queued before it are cancelled
queued=()
trap '[ ${{#queued[@]}} -eq 0 ] || {{ scancel "${{queued[@]}}"; echo "submit.sh: sbatch failed (above); cancelled the jobs it had queued: ${{queued[*]}}" >&2; }}' ERR
{chr(10).join(lines)}
echo "{chain}"
echo "watch:   squeue -j {ids} -o '{SQUEUE_FORMAT}'"
"""


def emit(plan: Plan, out_dir: Path, prepare: list[list[str]]) -> Path:
    """Write the resolved recipe, one script per stage and submit.sh into `out_dir`; print what
    was written and how to submit it. Returns submit.sh's path. Submits nothing."""
    out_dir = Path(out_dir).resolve()
    stages = [s for s in plan.stages if s.name in WRAPPERS]
    if not stages:
        raise UserError(f"stages {plan.recipe.stages}: nothing to emit (--emit writes the check, discover, "
                        "base, sft, eval and kv_bench stages); add one to stages")
    log_dir = plan.run_dir / "slurm"
    recipe_path = out_dir / "recipe.yaml"
    scripts = {s.name: stage_script(plan, s, task_arguments(s, recipe_path, plan.recipe.train.compile), log_dir)
               for s in stages}  # every script rendered (and checked) before any is written
    out_dir.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)  # sbatch writes no log into a missing directory
    save_resolved_recipe(plan.recipe, recipe_path)
    for name, text in scripts.items():
        atomic_write_text(out_dir / f"{name}.sbatch", text)
    submit = out_dir / "submit.sh"
    atomic_write_text(submit, submit_script(plan, stages))
    for path in [submit, *(out_dir / f"{n}.sbatch" for n in scripts)]:
        path.chmod(0o755)
    for args in prepare:
        print(f"first, on a node with internet: {shlex.join(['python', *args])}")
    for name, why in plan.skipped.items():
        print(f"stage {name}: not emitted ({why})")
    if plan.stage("report"):
        print("stage report: not emitted (it reads the launcher's manifest; launch with jobs/launch.py for it)")
    print(f"wrote {_shown(out_dir)}: recipe.yaml, {', '.join(f'{n}.sbatch' for n in scripts)}, submit.sh "
          "(nothing submitted)")
    print(f"submit script: {submit}")
    return submit


def _shown(path: Path) -> str:
    rel = os.path.relpath(path)
    return rel if not rel.startswith("..") else str(path)
