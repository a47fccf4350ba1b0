"""PNG plots people would rather look at than read: training curves from a run's progress log.

matplotlib is imported lazily with the Agg backend (no display on cluster nodes) and every plot
is written atomically, so a failed plot never leaves a truncated PNG.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from nanochat.common import atomic_path


def pyplot():
    """matplotlib.pyplot on the Agg backend (cluster nodes have no display)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def read_jsonl(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


GPT2_CORE = 0.256525  # GPT-2 (1.5B)'s CORE: the speedrun's target (DCLM, arXiv 2406.11794; nanochat)

# validation metrics a stage logs (base: bits per byte; SFT: loss per assistant token)
VAL_METRICS = {"val_bpb": ("bits per byte", "validation BPB"),
               "val_loss": ("loss per assistant token (nats)", "validation loss")}


# Set by the launcher's task (jobs/tasks.py) to "RECIPE task I (grid values)": curves a grid's
# tasks draw are told apart by what differs, not by their directory names ("000").
TASK_LABEL_ENV = "NANOCHAT_TASK_LABEL"


def plot_title(stage: str, meta: dict, run_dir: Path) -> str:
    """The title of a run's curves.png: the task label the launcher gave, else the recipe's name
    (a standalone run), and the stage."""
    name = (meta.get("recipe") or {}).get("name") if isinstance(meta.get("recipe"), dict) else None
    label = os.environ.get(TASK_LABEL_ENV) or name or Path(run_dir).name
    return f"{label} — {'base training' if stage == 'base' else stage.upper() if stage == 'sft' else stage}"


def plot_progress(progress_path: Path, out_png: Path, title: str = "") -> Path | None:
    """Training loss and the validation metric (val_bpb, or SFT's val_loss) against step, and
    CORE when the run scores it during training (train.core_every)."""
    records = read_jsonl(progress_path)
    train = [r for r in records if r.get("event") == "train"]
    metric = next((m for m in VAL_METRICS if any(m in r for r in records)), "val_bpb")
    evals = [r for r in records if r.get("event") == "eval" and metric in r]
    cores = [r for r in records if r.get("event") == "eval" and isinstance(r.get("core"), (int, float))]
    if not train and not evals:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, 3 if cores else 2, figsize=(15 if cores else 10, 3.8))
    ax1, ax2 = axes[0], axes[1]
    if cores:
        axes[2].plot([r["step"] for r in cores], [r["core"] for r in cores], "o-", color="C2", ms=3)
        axes[2].axhline(GPT2_CORE, color="0.5", ls="--", lw=1, label=f"GPT-2 ({GPT2_CORE})")
        axes[2].set(xlabel="step", ylabel="CORE (mean centered accuracy)", title="CORE")
        axes[2].legend(loc="lower right", fontsize=8)
    if train:
        ax1.plot([r["step"] + 1 for r in train], [r["loss"] for r in train], lw=1.2)
    ax1.set(xlabel="step", ylabel="training loss (nats/token)", title="training loss")
    if evals:
        ax2.plot([r["step"] for r in evals], [r[metric] for r in evals], "o-", color="C1", ms=3)
    ylabel, name = VAL_METRICS[metric]
    ax2.set(xlabel="step", ylabel=ylabel, title=name)
    for ax in axes:
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(out_png, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return Path(out_png)
