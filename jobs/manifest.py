"""The run's manifest (`RUN_DIR/manifest.json`): the one record of what a launch planned and
submitted — git commit, executor, every stage's dependency, job id, and per task its grid
values, directories and state. The launcher writes it (atomically) before anything is
submitted and after every change; the jobs, `jobs/status.py` and the report read it here.
"""
from __future__ import annotations

import json
from pathlib import Path

from jobs.plan import Plan
from nanochat.common import UserError, atomic_write_json, git_commit, now_iso

MANIFEST = "manifest.json"
DONE, FAILED, CANCELLED = "COMPLETED", "FAILED", "CANCELLED"


def new_manifest(plan: Plan, executor: str) -> dict:
    return {"run_dir": str(plan.run_dir), "recipe": str(plan.run_dir / "recipe.yaml"),
            "git_commit": git_commit(), "created": now_iso(), "executor": executor,
            "skipped": plan.skipped,
            "stages": {s.name: {"after": s.after, "dependency": s.dependency, "job_id": None,
                                "tasks": [{"index": t.index, "overrides": t.overrides,
                                           "run_dir": t.run_dir, "recipe_run_dir": t.recipe_run_dir or t.run_dir,
                                           "job_id": None, "state": "PLANNED"}
                                          for t in s.tasks]}
                       for s in plan.stages}}


def save_manifest(run_dir: Path, manifest: dict) -> None:
    atomic_write_json(Path(run_dir) / MANIFEST, manifest)


def has_manifest(run_dir: Path) -> bool:
    return (Path(run_dir) / MANIFEST).exists()


def read_manifest(run_dir: Path) -> dict:
    try:
        return json.loads((Path(run_dir) / MANIFEST).read_text())
    except FileNotFoundError:
        raise UserError(f"{run_dir} has no {MANIFEST}: not a run directory made by jobs/launch.py") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{Path(run_dir) / MANIFEST} is not valid JSON (line {e.lineno}); it was "
                        "edited or damaged: relaunch with --force") from None
