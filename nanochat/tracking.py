"""Experiment tracking with Weights & Biases: what progress.jsonl logs, also in a wandb run.

Off unless the recipe names a project (`train.wandb_project`); rank 0 only; wandb is an optional
extra (`pip install 'nanochat-slurm[wandb]'`). One wandb run per training run directory (base
and SFT are two runs, grouped by the recipe name, `job_type` = stage). The run's id is kept in
`RUN_DIR/wandb.json` (with its project, name, URL and mode), so a requeued or resumed job keeps
logging into the same wandb run, and the report can link it.

Steps are the optimizer steps completed, so a train record (logged after step s, which completes
s + 1 steps) and the evaluation that follows it share one step. Keys are `train/<metric>` and
`eval/<metric>`. `WANDB_MODE=offline` keeps everything on disk (`wandb sync RUN_DIR/wandb` later):
the mode for compute nodes without internet, and what the tests use.
"""
from __future__ import annotations

import json
from pathlib import Path

from nanochat.common import UserError, atomic_write_json, print0
from nanochat.config import TrainArgs

WANDB_FILE = "wandb.json"


class Tracker:
    """A live wandb run: `log(record)` for every progress record, `finish(ok)` at the end."""

    def __init__(self, run, run_dir: Path):
        self.run, self.run_dir = run, run_dir

    def log(self, record: dict) -> None:
        event = record.get("event", "train")
        data = {f"{event}/{k}": v for k, v in record.items()
                if k not in ("event", "step") and isinstance(v, (int, float))}
        steps_done = record["step"] + 1 if event == "train" else record["step"]
        self.run.log(data, step=steps_done)

    def finish(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)


def run_info(run_dir: Path) -> dict | None:
    """What RUN_DIR/wandb.json says of the run's wandb run (None when it was not tracked)."""
    try:
        return json.loads((Path(run_dir) / WANDB_FILE).read_text())
    except (OSError, json.JSONDecodeError):  # missing (or no directory there): not tracked
        return None


def start_tracking(args: TrainArgs, run_dir: Path, stage: str, meta: dict) -> Tracker | None:
    """Start (or resume) the wandb run of `run_dir`, or None when `train.wandb_project` is unset.
    `meta` holds the resolved recipe (logged as the run's config) and the model config."""
    if not args.wandb_project:
        return None
    try:
        import wandb
    except ImportError:
        raise UserError("train.wandb_project is set but wandb is not installed; pip install "
                        "'nanochat-slurm[wandb]' (or pip install wandb), or set "
                        "train.wandb_project: null") from None
    run_dir = Path(run_dir)
    recipe = meta.get("recipe") or {}
    name = args.wandb_name or recipe.get("name") or run_dir.name
    previous = run_info(run_dir)
    same = previous and previous.get("project") == args.wandb_project
    run_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=args.wandb_project, entity=args.wandb_entity, name=f"{name} ({stage})",
                     group=recipe.get("name") or name, job_type=stage, dir=str(run_dir),
                     id=previous["id"] if same else None, resume="allow" if same else None,
                     config={"recipe": recipe, "model_config": meta.get("model_config"), "stage": stage},
                     settings=wandb.Settings(console="off", silent=True))
    info = {"project": args.wandb_project, "entity": args.wandb_entity, "id": run.id,
            "name": run.name, "url": None if run.offline else run.url,
            "mode": "offline" if run.offline else "online",
            "dir": str(Path(run.dir).parent)}
    atomic_write_json(run_dir / WANDB_FILE, info)
    print0(f"[{stage}] wandb: {info['url'] or 'offline run ' + info['dir']} "
           f"({info['mode']}{'; resumed' if same else ''})")
    return Tracker(run, run_dir)
