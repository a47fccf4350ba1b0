"""What a run's tasks cost: queue wait, wall time and GPU-hours, from the scheduler.

Where accounting answers, from sacct (Submit, Start, Elapsed, AllocTRES: the GPUs SLURM really
allocated); else from the manifest (the local executor's wall time per task, or the last elapsed
time squeue/sacct gave) × the GPUs the recipe gives each stage's task. One source for the
curve's `sched.*` fields (jobs/miniseries.py, per rung) and the report's cost per stage.
Torch-free (the report job and status run it).
"""
from __future__ import annotations

import subprocess
from datetime import datetime
from pathlib import Path

from jobs.progress import hms_seconds, task_seconds
from nanochat.common import UserError


def _gpus_from_tres(tres: str) -> int:
    for item in tres.split(","):
        if item.startswith("gres/gpu="):
            return int(item.split("=", 1)[1])
    return 0


def sacct_times(job_ids: list[str]) -> dict[str, dict]:
    """job id → {queue_s, elapsed_s, gpus} from sacct (Submit, Start, Elapsed, AllocTRES); {}
    when there is no accounting (the caller falls back to the manifest's times)."""
    if not job_ids:
        return {}
    try:
        res = subprocess.run(["sacct", "-n", "-P", "-X", "-j", ",".join(job_ids),
                              "-o", "JobID,Submit,Start,Elapsed,AllocTRES"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    out = {}
    for line in res.stdout.splitlines() if res.returncode == 0 else []:
        parts = line.split("|")
        if len(parts) < 5:
            continue
        try:
            submit, start = datetime.fromisoformat(parts[1]), datetime.fromisoformat(parts[2])
            out[parts[0]] = {"queue_s": max(0.0, (start - submit).total_seconds()),
                             "elapsed_s": hms_seconds(parts[3]), "gpus": _gpus_from_tres(parts[4])}
        except ValueError:  # Start "Unknown" / "None": never started
            continue
    return out


def stage_gpus(recipe, stage: str) -> int:
    """GPUs a stage's task holds (jobs/plan.py): training and the check the whole allocation,
    the report none, the others one; none at all when the recipe trains on the CPU."""
    c = recipe.cluster
    if recipe.train.device == "cpu" or stage == "report":
        return 0
    return c.world_size if stage in ("base", "sft", "check") else min(1, c.gpus_per_node)


def recipe_gpus(run_dir) -> dict[str, int] | None:
    """stage → GPUs per task, from the run's recipe.yaml; None when it cannot be read."""
    from nanochat.recipe import load_recipe  # torch-free, but only the report and status need it
    try:
        recipe = load_recipe(Path(run_dir) / "recipe.yaml")
    except UserError:
        return None
    return {name: stage_gpus(recipe, name) for name in recipe.stages}


def accounting(manifest: dict, tasks: list[dict]) -> dict[str, dict]:
    """sacct's answer for these tasks' jobs; {} for a local run or without accounting."""
    if manifest.get("executor") == "local":
        return {}
    return sacct_times([str(t["job_id"]) for t in tasks if t.get("job_id")])


def task_cost(task: dict, gpus: int, acct: dict[str, dict]) -> dict:
    """One task's wall seconds, GPU-seconds and queue wait (None unknown), sacct's where it has
    the job, else the manifest's time × `gpus`."""
    a = acct.get(str(task.get("job_id")))
    if a is not None:
        return {"wall_s": a["elapsed_s"], "gpu_s": a["elapsed_s"] * a["gpus"], "queue_s": a["queue_s"]}
    secs = task_seconds(task)
    return {"wall_s": secs, "gpu_s": secs * gpus, "queue_s": None}


def source(manifest: dict, acct: dict) -> str:
    return "sacct" if acct else "local wall time" if manifest.get("executor") == "local" else "manifest"


def stage_costs(manifest: dict, gpus: dict[str, int]) -> list[dict]:
    """Per stage: its tasks' wall time, GPU-hours and summed queue wait, and where they came from."""
    stages = manifest["stages"]
    acct = accounting(manifest, [t for st in stages.values() for t in st["tasks"]])
    out = []
    for name, info in stages.items():
        costs = [task_cost(t, gpus.get(name, 0), acct) for t in info["tasks"]]
        queues = [c["queue_s"] for c in costs if c["queue_s"] is not None]
        out.append({"stage": name, "tasks": len(costs), "wall_s": round(sum(c["wall_s"] for c in costs), 1),
                    "gpu_hours": round(sum(c["gpu_s"] for c in costs) / 3600, 4),
                    "queue_s": round(sum(queues), 1) if queues else None,
                    "source": "sacct" if any(str(t.get("job_id")) in acct for t in info["tasks"])
                    else source(manifest, {})})
    return out


def report_lines(rows: list[dict]) -> list[str]:
    """The report's table of stage_costs: GPU-hours per stage (sacct's Elapsed × AllocTRES GPUs
    where accounting answers, else the wall time × the GPUs the recipe gives the task)."""
    if not rows:
        return []
    lines = ["", "## Cost per stage", "",
             "| stage | tasks | wall time | GPU-hours | queue wait | from |", "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        queue = "" if r["queue_s"] is None else f"{r['queue_s']:.0f} s"
        lines.append(f"| {r['stage']} | {r['tasks']} | {r['wall_s']:.0f} s | {r['gpu_hours']:.4f} | {queue} | {r['source']} |")
    total = sum(r["gpu_hours"] for r in rows)
    return lines + ["", f"GPU-hours in all: {total:.4f} (a CPU run holds none)."]
