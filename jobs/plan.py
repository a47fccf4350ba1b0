"""The launch plan: a recipe → stages of jobs with resources and dependencies. Pure data.

   (check ─afterok─▶) discover ─afterok─▶ base[0..n) ─aftercorr─▶ sft[0..n) ─aftercorr─▶ eval[0..n) ──┐
                            │                                                        ├─afterany─▶ report
                            └──────────aftercorr─────────▶ kv_bench[0..n) ──────────┘

The recipe's `stages` list decides which of these run (order fixed, as drawn).

- check: the cluster check (`python -m nanochat.check`, nanochat/check.py) on the training
  allocation (`cluster.nodes` × `cluster.gpus_per_node` processes); only when `stages` lists it.
  Every other stage waits for it (afterok), so an unhealthy allocation trains nothing.
- discover: short jobs on one GPU that find the device batch size of every stage that asks for
  `auto` (base: `train.device_batch_size`, sft: `sft.device_batch_size`): an array with one task
  per distinct memory key among the grid's combinations (nanochat/batchsize/key.py: a grid over
  depth is one task per depth, a grid over learning rates one task), each run with the grid
  values of the first combination of its key; a key the batch-size cache already answers gets
  no task, and the stage is skipped when none is left or no stage asks (nothing then depends on
  it). Each training task records the discover task of its key (`discover_task`); SLURM gives
  an array one dependency, so the training array waits for every discover task.
- base: pretraining, a job array over the recipe's `grid` (one task per combination; one task if
  no grid), each task `cluster.nodes` × `cluster.gpus_per_node` processes, checkpointable.
- sft: task i fine-tunes base task i's checkpoint into `<base task i dir>/sft`; same resources,
  checkpointable. `aftercorr`: task i starts when base task i succeeded (for a one-task array
  that is plain `afterok`). Without base in the plan it needs `sft.base_checkpoint`.
- eval: task i evaluates sft task i's output (or base task i's, without sft), on one GPU, and
  writes `eval.json` there; `aftercorr` on sft (or base).
- kv_bench: the KV-cache benchmark (nanochat.kv_bench) of base task i's checkpoint,
  `aftercorr` on base. (`sweep`, its old name, is read as kv_bench in recipes.)
- report: one small CPU job after every other stage ended (`afterany` on all of them: the graph
  fans out, and it reports failures too).

Every task has an index (its grid combination) and two directories: `run_dir`, where its
outputs go, and `recipe_run_dir`, the `run_dir` its recipe is given (task i's base directory
for base, sft, eval and kv_bench, so they find base task i's checkpoint).

This module knows nothing of tensors or of submitit; `jobs/launch.py` executes a plan.
"""
from __future__ import annotations

import itertools
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from nanochat.common import UserError
from nanochat.config import HOME_ENV, STAGE_ALIASES, TRAINING_SECTIONS, Recipe, grad_accum_steps
from nanochat.batchsize.key import plan_key
from nanochat.recipe import override_recipe, recipe_to_dict

# What may appear in an sbatch header line: no shell or line-breaking characters, ever.
SAFE_VALUE = re.compile(r"[A-Za-z0-9_.:,=@%/+-]+")
SAFE_KEY = re.compile(r"[a-z][a-z0-9-]*")


@dataclass
class Task:
    index: int
    overrides: list[str]            # section.key=value applied to the run's recipe
    run_dir: str                    # this task's outputs
    recipe_run_dir: str = ""        # the run_dir its recipe gets ("" = run_dir)
    discover_task: int | None = None  # training tasks: the discover task probing its memory key


ARRAYS = ("base", "sft", "eval", "kv_bench")  # one task per grid combination


@dataclass
class Stage:
    name: str
    tasks: list[Task]
    after: list[str] = field(default_factory=list)  # stages this one depends on
    dependency: str = "afterok"     # afterok | aftercorr | afterany, on every stage in `after`
    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    time_min: int = 30
    checkpointable: bool = False    # requeue on SLURM's warning signal (training)

    @property
    def is_array(self) -> bool:  # (discover: one task per memory key, an array when several)
        return self.name in ARRAYS or len(self.tasks) > 1


@dataclass
class Plan:
    run_dir: Path
    recipe: Recipe
    stages: list[Stage] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # stage → why it is not run
    reasons: dict[str, str] = field(default_factory=dict)  # stage → why it runs (when that is news)

    def stage(self, name: str) -> Stage | None:
        return next((s for s in self.stages if s.name == name), None)


# The grid: the recipe's sweep axes, one task per combination

def grid_overrides(recipe: Recipe) -> list[list[str]]:
    """One override list per grid combination, in a stable order (keys as written)."""
    if not recipe.grid:
        return [[]]
    keys = list(recipe.grid)
    combos = itertools.product(*(recipe.grid[k] for k in keys))
    return [[f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
             for k, v in zip(keys, combo)] for combo in combos]


def grid_recipes(recipe: Recipe) -> list[Recipe]:
    """The recipe of each grid combination (in `grid_overrides` order), as its tasks load it."""
    if not recipe.grid:
        return [recipe]
    base = recipe_to_dict(recipe)
    return [override_recipe(base, overrides, source="grid combination") for overrides in grid_overrides(recipe)]


def check_safe(recipe: Recipe) -> None:
    """Values that reach an sbatch header must be plain tokens: they are never given to a shell,
    and a newline or `;` could only be an attempt to make them one."""
    c = recipe.cluster
    fields = {"name": recipe.name, "cluster.partition": c.partition, "cluster.account": c.account,
              "cluster.qos": c.qos, "cluster.constraint": c.constraint, "cluster.wckey": c.wckey}
    fields.update({f"cluster.additional.{k}": v for k, v in c.additional.items()})
    for key, value in fields.items():
        if value is not None and not SAFE_VALUE.fullmatch(str(value)):
            raise UserError(f"{key} {value!r} has characters sbatch options can't hold (allowed: "
                            "letters, digits and _.:,=@%/+-); fix the recipe")
    for k in c.additional:
        if not SAFE_KEY.fullmatch(k):
            raise UserError(f"cluster.additional key {k!r} is not an sbatch option name "
                            "(lowercase letters, digits, dashes, e.g. exclusive or mail-type)")


def resolve_run_dir(recipe: Recipe, output_root: Path) -> Path:
    """The run directory, which must lie inside the output root or the root of the recipe's
    caches ($NANOCHAT_HOME, else the directory holding cache_dir: run_dir=/scratch/$USER/d16
    with cache_dir /scratch/$USER/cache) — never escaping both with `..`."""
    root = output_root.resolve()
    run_dir = (Path(recipe.run_dir) if recipe.run_dir else root / recipe.name).resolve()
    home = os.environ.get(HOME_ENV)
    cache_root = Path(home).expanduser().resolve() if home else \
        Path(recipe.cache_dir or "cache").expanduser().resolve().parent
    if not any(run_dir == r or r in run_dir.parents for r in (root, cache_root)):
        raise UserError(f"run_dir {recipe.run_dir} resolves to {run_dir}, outside the output root "
                        f"{root} and the cache root {cache_root} ({HOME_ENV if home else 'the directory holding cache_dir'}); "
                        f"choose a run_dir under one of them (or pass --output-root, or set {HOME_ENV})")
    return run_dir


def discovery_stages(recipe: Recipe) -> list[str]:
    """The training stages in the plan whose device batch size is `auto`: the keys the discover
    job finds (batch-size discovery names them "base" and "sft")."""
    return [stage for stage in TRAINING_SECTIONS
            if stage in recipe.stages and recipe.training_section(stage).device_batch_size == "auto"]


def build_plan(recipe: Recipe, run_dir: Path, discovery_cached: bool | list[bool] | None = None,
               discovery_why: str = "") -> Plan:
    """`discovery_cached`: whether the batch-size cache already answers for every `auto` stage
    of each grid combination (a list, in `grid_overrides` order; one bool for all of them; None
    when unknown): those get no discover task. `discovery_why`: on whose device the cache was
    asked, or why it could not be."""
    check_safe(recipe)
    c = recipe.cluster
    world = c.world_size
    wanted = recipe.stages
    for stage, name in TRAINING_SECTIONS.items():  # fail before submitting anything
        section = recipe.training_section(stage)  # (SFT rows are sequence_len long too)
        if stage in wanted and section.device_batch_size != "auto":
            grad_accum_steps(section.total_batch_size, section.device_batch_size,
                             recipe.model.sequence_len, world, section=name)
    if "sft" in wanted and "base" not in wanted and not recipe.sft.base_checkpoint:
        raise UserError("stages: sft without base needs sft.base_checkpoint (the run dir or "
                        "checkpoint to fine-tune); set it or add base to stages")
    if "eval" in wanted and not {"base", "sft"} & set(wanted):
        raise UserError("stages: eval needs base or sft in stages (it evaluates their checkpoints)")
    if "kv_bench" in wanted and "base" not in wanted:
        raise UserError("stages: kv_bench needs base (it benchmarks the base checkpoints)")
    plan = Plan(run_dir=run_dir, recipe=recipe)
    grid = grid_overrides(recipe)
    # task i's directory: base writes its checkpoint there; sft, eval and kv_bench of task i read it
    task_dirs = [str(run_dir / ("base" if "base" in wanted else "sft") / f"{i:03d}") for i in range(len(grid))]

    def array(sub, training: bool = False) -> list[Task]:
        return [Task(i, ov, sub(i), task_dirs[i], discover_of.get(i) if training else None)
                for i, ov in enumerate(grid)]

    train_like = dict(nodes=c.nodes, tasks_per_node=c.gpus_per_node, gpus_per_node=c.gpus_per_node,
                      cpus_per_task=c.cpus_per_task, checkpointable=True)
    one_gpu = dict(gpus_per_node=min(1, c.gpus_per_node), cpus_per_task=c.cpus_per_task)
    if "check" in wanted:
        d = str(run_dir / "check")
        plan.stages.append(Stage("check", [Task(0, [], d, d)], nodes=c.nodes, tasks_per_node=c.gpus_per_node,
                                 gpus_per_node=c.gpus_per_node, cpus_per_task=c.cpus_per_task,
                                 time_min=c.time_limit_min("check")))
    first = ["check"] if plan.stage("check") else []
    discover_of: dict[int, int] = {}  # training task → discover task of its memory key
    if "discover" in wanted:
        points = grid_recipes(recipe)
        asks = [discovery_stages(p) for p in points]
        keys = [k for k in TRAINING_SECTIONS if any(k in a for a in asks)]
        cached = discovery_cached if isinstance(discovery_cached, list) else [discovery_cached] * len(points)
        groups: dict[str, list[int]] = {}
        for i, (point, stages) in enumerate(zip(points, asks)):
            if stages and not cached[i]:
                groups.setdefault(plan_key(point, stages), []).append(i)
        if not keys:
            fixed = [f"{sec}.device_batch_size" for st, sec in TRAINING_SECTIONS.items() if st in wanted]
            plan.skipped["discover"] = (f"{' and '.join(fixed)} {'are' if len(fixed) > 1 else 'is'} fixed"
                                        if fixed else "no base or sft stage to discover for")
        elif not groups:
            plan.skipped["discover"] = (f"the batch-size cache already holds the {' and '.join(keys)} "
                                        f"key(s): cache hit" + (f" ({discovery_why})" if discovery_why else ""))
        else:
            tasks = []
            for k, members in enumerate(groups.values()):
                d = str(run_dir / "discover" / f"{k:03d}")
                tasks.append(Task(k, grid[members[0]], d, d))
                discover_of.update({i: k for i in members})
            why = [discovery_why] if discovery_why else []
            if len(grid) > 1:
                held = [i for i, a in enumerate(asks) if a and cached[i]]
                why.append("one task per memory key: " + "; ".join(
                    f"task {k} for training task(s) {', '.join(map(str, members))}"
                    for k, members in enumerate(groups.values()))
                    + (f"; task(s) {', '.join(map(str, held))} cached" if held else ""))
            if why:
                plan.reasons["discover"] = "; ".join(why)
            plan.stages.append(Stage("discover", tasks, after=first, **one_gpu,
                                     time_min=c.time_limit_min("discover")))
    discover = ["discover"] if plan.stage("discover") else first
    if "base" in wanted:
        plan.stages.append(Stage("base", array(lambda i: task_dirs[i], True), after=discover,
                                 dependency="afterok", **train_like, time_min=c.time_limit_min("base")))
    if "sft" in wanted:
        # sft task i fine-tunes base task i: task-wise afterok (without base: after discovery)
        after, dep = (["base"], "aftercorr") if "base" in wanted else (discover, "afterok")
        plan.stages.append(Stage("sft", array(lambda i: str(Path(task_dirs[i]) / "sft"), True), after=after,
                                 dependency=dep, **train_like, time_min=c.time_limit_min("sft")))
    if "eval" in wanted:
        src = "sft" if "sft" in wanted else "base"
        plan.stages.append(Stage("eval", [Task(t.index, t.overrides, t.run_dir, t.recipe_run_dir)
                                          for t in plan.stage(src).tasks], after=[src],
                                 dependency="aftercorr", **one_gpu, time_min=c.time_limit_min("eval")))
    if "kv_bench" in wanted:
        plan.stages.append(Stage("kv_bench", array(lambda i: str(run_dir / "kv_bench" / f"{i:03d}")),
                                 after=["base"], dependency="aftercorr", **one_gpu,
                                 time_min=c.time_limit_min("kv_bench")))
    if "report" in wanted and plan.stages:
        plan.stages.append(Stage("report", [Task(0, [], str(run_dir), str(run_dir))],
                                 after=[s.name for s in plan.stages], dependency="afterany",
                                 cpus_per_task=1, time_min=c.time_limit_min("report")))
    return plan


# The batch shell outlives SLURM's warning signal; the training tasks handle it (jobs/tasks.py
# `_train_checkpointable`: checkpoint at a step boundary, `scontrol requeue`, exit). Steps-only
# `scancel --signal=USR2 JOB` never reaches the shell, but `--full` (as some sites' preemption
# and admins' tools send it) does, and bash's default for USR2 is to die: the job then ends
# (FAILED 0:12) and SLURM kills the step, whose checkpoint and requeue race the kill. A handler,
# not `trap '' USR2`: an ignored signal stays ignored in what the shell execs (srun, and any
# command a site adds), a handled one is reset to the default there. bash runs the handler once
# srun returns; the line says what happened in the job's stderr.
BATCH_SHELL_USR2_TRAP = ("trap 'echo \"batch shell: SIGUSR2 received; the training tasks "
                         "checkpoint and requeue\" >&2' USR2")


SETUP_FAILED = "cluster.setup line {n} failed"  # the line status reads back from a job's stderr (jobs/monitor.py)


def guarded_setup(lines: list[str]) -> list[str]:
    """cluster.setup as the shell text a job runs: each line in the job's own shell (a `source`
    or `module load` must change its environment), and the first that fails stops the job with
    one line naming it — a missing module otherwise shows only as noise in the stderr of a job
    that runs on without it and ends COMPLETED. The line's own text is quoted, never re-read.
    The launcher's jobs run it (jobs/executors.py) and so do the sbatch scripts in slurm/
    (slurm/env.sh asks `python jobs/launch.py RECIPE --setup`)."""
    out = []
    for n, line in enumerate(lines, 1):
        out += ["{", line, f"}} || {{ _rc=$?; printf '%s (exit %s): %s\\n' {shlex.quote(SETUP_FAILED.format(n=n))} "
                           f"\"$_rc\" {shlex.quote(line)} >&2; exit 1; }}"]
    return out


# A multi-node job's rendezvous address, looked up once per job by its batch shell (one
# `scontrol show node` for the job, not one per rank) with jobs/nodes.py, the one rule for it;
# jobs/tasks.py reads it. (The batch shell has the run's code on PYTHONPATH: jobs/executors.py.)
MASTER_ADDR_LINE = (f"NANOCHAT_MASTER_ADDR=$({shlex.quote(sys.executable)} -m jobs.nodes master); "
                    "export NANOCHAT_MASTER_ADDR")


def stage_partition(recipe: Recipe, stage: str) -> str | None:
    """The partition a stage's jobs go to: cluster.stage_partition's, else cluster.partition."""
    per_stage = {STAGE_ALIASES.get(k, k): v for k, v in recipe.cluster.stage_partition.items()}
    return per_stage.get(stage, recipe.cluster.partition)


def slurm_parameters(recipe: Recipe, stage: Stage) -> dict:
    """submitit `SlurmExecutor.update_parameters` keywords for a stage."""
    c = recipe.cluster
    params = {"job_name": f"{recipe.name}-{stage.name}", "nodes": stage.nodes,
              "ntasks_per_node": stage.tasks_per_node, "cpus_per_task": stage.cpus_per_task,
              "time": stage.time_min, "partition": stage_partition(recipe, stage.name)}
    if stage.gpus_per_node:
        params["gpus_per_node"] = stage.gpus_per_node
    if c.mem_gb is not None:
        params["mem"] = f"{c.mem_gb}G"
    if stage.is_array:
        params["array_parallelism"] = c.array_parallelism
    additional = {k: v for k, v in (("account", c.account), ("qos", c.qos),
                                    ("constraint", c.constraint)) if v}
    additional.update(c.additional)
    if stage.checkpointable:
        # --signal=USR2@lead: time to agree, checkpoint and requeue before the limit; --requeue:
        # sites with JobRequeue=0 refuse `scontrol requeue` for jobs submitted without it
        params["signal_delay_s"] = c.signal_lead_s
        params["setup"] = [BATCH_SHELL_USR2_TRAP]
        additional["requeue"] = True
    if stage.nodes > 1:
        params["setup"] = params.get("setup", []) + [MASTER_ADDR_LINE]
    params["additional_parameters"] = additional
    # srun: one rank that exits (a refused lease, a crash) ends the step instead of leaving the
    # others hanging in a collective until init_timeout_min; and the CPUs per rank, which SLURM
    # >= 22.05 no longer passes from sbatch to srun (srun(1), SLURM_CPUS_PER_TASK)
    params["srun_args"] = ["--kill-on-bad-exit=1"] + ([f"--cpus-per-task={stage.cpus_per_task}"]
                                                      if stage.cpus_per_task else [])
    params = {k: v for k, v in params.items() if v is not None}
    # submitit writes --wckey=submitit unless told None (sites that validate wckeys reject it)
    params["wckey"] = c.wckey
    return params
