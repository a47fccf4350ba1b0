"""The launch plan: a recipe → stages of jobs with resources and dependencies. Pure data.

    discover ──afterok──▶ train[0..n) ──aftercorr──▶ sweep[0..n) ──afterany──▶ report

- discover: one short job on one GPU; skipped when the device batch size is fixed or when the
  batch-size cache already answers (nothing then depends on it).
- train: a job array over the recipe's `grid` (one task per combination; one task if no grid),
  each task `cluster.nodes` × `cluster.gpus_per_node` processes.
- sweep: the KV-cache sweep of train task i, after train task i succeeded (aftercorr).
- report: one small CPU job after everything else ended (afterany: it reports failures too).

This module knows nothing of tensors or of submitit; `jobs/launch.py` executes a plan.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from nanochat.common import UserError
from nanochat.config import Recipe, grad_accum_steps

# What may appear in an sbatch header line: no shell or line-breaking characters, ever.
SAFE_VALUE = re.compile(r"[A-Za-z0-9_.:,=@%/+-]+")
SAFE_KEY = re.compile(r"[a-z][a-z0-9-]*")


@dataclass
class Task:
    index: int
    overrides: list[str]            # section.key=value applied to the run's recipe
    run_dir: str                    # this task's outputs


@dataclass
class Stage:
    name: str
    tasks: list[Task]
    after: str | None = None        # stage this one depends on
    dependency: str = "afterok"     # afterok | aftercorr | afterany
    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    time_min: int = 30
    checkpointable: bool = False    # requeue on SLURM's warning signal (training)

    @property
    def is_array(self) -> bool:
        return self.name in ("train", "sweep")


@dataclass
class Plan:
    run_dir: Path
    recipe: Recipe
    stages: list[Stage] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # stage → why it is not run

    def stage(self, name: str) -> Stage | None:
        return next((s for s in self.stages if s.name == name), None)


def grid_overrides(recipe: Recipe) -> list[list[str]]:
    """One override list per grid combination, in a stable order (keys as written)."""
    if not recipe.grid:
        return [[]]
    keys = list(recipe.grid)
    combos = itertools.product(*(recipe.grid[k] for k in keys))
    return [[f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
             for k, v in zip(keys, combo)] for combo in combos]


def check_safe(recipe: Recipe) -> None:
    """Values that reach an sbatch header must be plain tokens: they are never given to a shell,
    and a newline or `;` could only be an attempt to make them one."""
    c = recipe.cluster
    fields = {"name": recipe.name, "cluster.partition": c.partition, "cluster.account": c.account,
              "cluster.qos": c.qos, "cluster.constraint": c.constraint}
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
    """The run directory, which must lie inside the output root (no escaping with `..`)."""
    root = output_root.resolve()
    run_dir = (Path(recipe.run_dir) if recipe.run_dir else root / recipe.name).resolve()
    if run_dir != root and root not in run_dir.parents:
        raise UserError(f"run_dir {recipe.run_dir} resolves to {run_dir}, outside the output root "
                        f"{root}; choose a run_dir under it (or pass --output-root)")
    return run_dir


def build_plan(recipe: Recipe, run_dir: Path, discovery_cached: bool | None = None) -> Plan:
    """`discovery_cached`: whether the batch-size cache already answers for this recipe (None
    when unknown, e.g. no discovery module): then the discover stage is skipped."""
    check_safe(recipe)
    c = recipe.cluster
    world = c.nodes * c.gpus_per_node
    if recipe.train.device_batch_size != "auto":  # fail before submitting anything
        grad_accum_steps(recipe.train.total_batch_size, recipe.train.device_batch_size,
                         recipe.model.sequence_len, world)
    plan = Plan(run_dir=run_dir, recipe=recipe)
    grid = grid_overrides(recipe)
    tasks = [Task(i, ov, str(run_dir / "train" / f"{i:03d}")) for i, ov in enumerate(grid)]
    wanted = recipe.stages
    if "discover" in wanted:
        if recipe.train.device_batch_size != "auto":
            plan.skipped["discover"] = "train.device_batch_size is fixed"
        elif discovery_cached:
            plan.skipped["discover"] = "the batch-size cache already holds this recipe's key"
        else:
            plan.stages.append(Stage("discover", [Task(0, [], str(run_dir / "discover"))],
                                     gpus_per_node=min(1, c.gpus_per_node), cpus_per_task=c.cpus_per_task,
                                     time_min=min(30, c.time_min)))
    prev = plan.stages[-1].name if plan.stages else None
    if "train" in wanted:
        plan.stages.append(Stage("train", tasks, after=prev, dependency="afterok", nodes=c.nodes,
                                 tasks_per_node=c.gpus_per_node, gpus_per_node=c.gpus_per_node,
                                 cpus_per_task=c.cpus_per_task, time_min=c.time_min,
                                 checkpointable=True))
    if "sweep" in wanted:
        if "train" not in wanted:
            raise UserError("stages: sweep needs train (it sweeps the trained checkpoints)")
        plan.stages.append(Stage("sweep", [Task(t.index, t.overrides, str(run_dir / "sweep" / f"{t.index:03d}"))
                                           for t in tasks], after="train", dependency="aftercorr",
                                 gpus_per_node=min(1, c.gpus_per_node), cpus_per_task=c.cpus_per_task,
                                 time_min=min(60, c.time_min)))
    if "report" in wanted and plan.stages:
        plan.stages.append(Stage("report", [Task(0, [], str(run_dir))], after=plan.stages[-1].name,
                                 dependency="afterany", cpus_per_task=1, time_min=10))
    return plan


def slurm_parameters(recipe: Recipe, stage: Stage) -> dict:
    """submitit `SlurmExecutor.update_parameters` keywords for a stage."""
    c = recipe.cluster
    params = {"job_name": f"{recipe.name}-{stage.name}", "nodes": stage.nodes,
              "ntasks_per_node": stage.tasks_per_node, "cpus_per_task": stage.cpus_per_task,
              "time": stage.time_min, "partition": c.partition}
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
        params["signal_delay_s"] = 90   # --signal=USR2@90: time to checkpoint before the limit
    params["additional_parameters"] = additional
    return {k: v for k, v in params.items() if v is not None}
