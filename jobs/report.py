"""The run's report: every task's results in `report.md`, `results.csv` and PNG plots.

Reads only files the stages wrote (manifest.json, each task's run.json / progress.jsonl and the
sweep's results.json), so it also reports partial runs: a failed task is a row that says so.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from nanochat.common import atomic_path, atomic_write_text
from nanochat.plots import read_jsonl


def _load_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def collect(run_dir: Path) -> list[dict]:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    rows = []
    for task in manifest["stages"].get("train", {}).get("tasks", []):
        tdir = Path(task["run_dir"])
        progress = read_jsonl(tdir / "progress.jsonl")
        train = [r for r in progress if r.get("event") == "train"]
        evals = [r for r in progress if r.get("event") == "eval"]
        rates = [r["tok_per_s"] for r in train if "tok_per_s" in r]
        row = {"task": task["index"], "grid": " ".join(task["overrides"]) or "-",
               "state": task.get("state", "?"), "steps": train[-1]["step"] + 1 if train else 0,
               "final_loss": round(train[-1]["loss"], 4) if train else None,
               "val_bpb": round(evals[-1]["val_bpb"], 4) if evals else None,
               "tok_per_s": round(sorted(rates)[len(rates) // 2], 1) if rates else None,
               "run_dir": str(tdir)}
        sweep = _load_json(run_dir / "sweep" / f"{task['index']:03d}" / "results.json")
        if sweep:
            row["sweep"] = str(run_dir / "sweep" / f"{task['index']:03d}")
        rows.append(row)
    return rows


def _plot_curves(run_dir: Path, rows: list[dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for row in rows:
        progress = read_jsonl(Path(row["run_dir"]) / "progress.jsonl")
        tr = [r for r in progress if r.get("event") == "train"]
        ev = [r for r in progress if r.get("event") == "eval"]
        label = f"{row['task']}: {row['grid']}"
        if tr:
            a1.plot([r["step"] + 1 for r in tr], [r["loss"] for r in tr], lw=1, label=label)
        if ev:
            a2.plot([r["step"] for r in ev], [r["val_bpb"] for r in ev], "o-", ms=3, label=label)
    a1.set(xlabel="step", ylabel="loss", title="training loss")
    a2.set(xlabel="step", ylabel="bits per byte", title="validation BPB")
    for a in (a1, a2):
        a.grid(alpha=0.3)
    if len(rows) > 1:
        a2.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(out, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def write_report(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    rows = collect(run_dir)
    cols = ["task", "grid", "state", "steps", "final_loss", "val_bpb", "tok_per_s"]
    with atomic_path(run_dir / "results.csv", suffix=".csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols + ["run_dir"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    if rows:
        _plot_curves(run_dir, rows, run_dir / "curves.png")
    lines = [f"# Report: {run_dir.name}", "", "| " + " | ".join(cols) + " |",
             "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join("" if r.get(c) is None else str(r[c]) for c in cols) + " |")
    lines += ["", "![training curves](curves.png)" if rows else "(no training tasks)"]
    for r in rows:
        if "sweep" in r:
            table = Path(r["sweep"]) / "results.md"
            if table.exists():
                lines += ["", f"## KV-cache sweep, task {r['task']}", "", table.read_text().strip()]
    atomic_write_text(run_dir / "report.md", "\n".join(lines) + "\n")
    return run_dir / "report.md"
