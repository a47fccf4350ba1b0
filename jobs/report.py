"""The run's report: every task's results in `report.md`, `results.csv` and PNG plots.

    python jobs/report.py RUN_DIR      rebuild them at any time (the report stage runs the same)

Reads only files the stages wrote (manifest.json; per task the base run's run.json /
progress.jsonl, the SFT run's `sft/progress.jsonl`, the evaluated directory's `eval.json` and the
kv_bench's results.json), so it also reports partial runs: a failed or missing stage of a task is
its state and empty cells.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python jobs/report.py` from anywhere

from jobs.cost import recipe_gpus, report_lines as cost_lines, stage_costs  # noqa: E402
from jobs.multiplier import grid_report_lines  # noqa: E402
from jobs.miniseries import report_lines, write_curve  # noqa: E402
from jobs.manifest import read_manifest  # noqa: E402
from jobs.progress import first_reached, target_label, task_seconds as _seconds  # noqa: E402
from jobs.scheduler import refresh  # noqa: E402
from nanochat.common import UserError, atomic_path, atomic_write_text, cli_main  # noqa: E402
from nanochat.plots import pyplot, read_jsonl  # noqa: E402
from nanochat.recipe import load_recipe  # noqa: E402
from nanochat.tracking import run_info  # noqa: E402

def _load_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _median(xs: list[float]) -> float | None:
    return sorted(xs)[len(xs) // 2] if xs else None


def _r(x, nd: int = 4):
    return None if x is None else round(x, nd)


def _progress_cells(run: Path, metric: str) -> tuple[list[dict], dict]:
    """A run's train records and its steps, final loss and last `metric` from progress.jsonl."""
    progress = read_jsonl(run / "progress.jsonl")
    train = [r for r in progress if r.get("event") == "train"]
    evals = [r for r in progress if r.get("event") == "eval" and metric in r]
    return train, {"steps": train[-1]["step"] + 1 if train else 0,
                   "loss": _r(train[-1]["loss"]) if train else None,
                   metric: _r(evals[-1][metric]) if evals else None}


def _base_cells(tdir: Path) -> dict:
    train, c = _progress_cells(tdir, "val_bpb")
    return {"steps": c["steps"], "final_loss": c["loss"], "val_bpb": c["val_bpb"],
            "tok_per_s": _r(_median([r["tok_per_s"] for r in train if "tok_per_s" in r]), 1)}


def _sft_cells(sft_dir: Path) -> dict:
    _, c = _progress_cells(sft_dir, "val_loss")
    return {"sft_steps": c["steps"], "sft_loss": c["loss"], "sft_val_loss": c["val_loss"]}


def _eval_cells(result: dict | None) -> dict:
    if not result:
        return {}
    cells = {"eval_val_bpb": _r(result.get("val_bpb"))}
    if isinstance(result.get("core"), dict) and result["core"].get("score") is not None:
        cells["eval_core"] = _r(result["core"]["score"])
    for kind, t in (result.get("tasks") or {}).items():
        cells[f"eval_{kind}"] = _r(t.get("accuracy"))
    return cells


def collect(run_dir: Path, manifest: dict | None = None) -> list[dict]:
    """One row per task index (grid combination), with the cells of every stage it has."""
    stages = (manifest or read_manifest(run_dir))["stages"]
    rows: dict[int, dict] = {}
    for name in ("base", "sft", "eval", "kv_bench", "sweep"):  # sweep: kv_bench's old name
        for task in stages.get(name, {}).get("tasks", []):
            row = rows.setdefault(task["index"], {
                "task": task["index"], "grid": " ".join(task["overrides"]) or "-",
                "run_dir": task.get("recipe_run_dir", task["run_dir"])})
            row["state" if name == "base" else f"{name}_state"] = task.get("state", "?")
            tdir = Path(task["run_dir"])
            if name in ("base", "sft") and (info := run_info(tdir)):
                row.setdefault("wandb", {})[name] = info
            if name in ("base", "sft") and (run := _load_json(tdir / "run.json")):
                row.setdefault("batch", {})[name] = run
            if name == "base":
                row.update(_base_cells(tdir))
            elif name == "sft":
                row.update(_sft_cells(tdir), sft_dir=str(tdir))
            elif name == "eval":
                result = _load_json(tdir / "eval.json")
                row.update(_eval_cells(result))
                if result and result.get("skipped"):
                    row["eval_skipped"] = result["skipped"]
            elif _load_json(tdir / "results.json"):
                row["kv_bench"] = str(tdir)
    return [rows[i] for i in sorted(rows)]


def columns(manifest_stages: dict, rows: list[dict]) -> list[str]:
    cols = ["task", "grid"]
    if "base" in manifest_stages:
        cols += ["state", "steps", "final_loss", "val_bpb", "tok_per_s"]
    if "sft" in manifest_stages:
        cols += ["sft_state", "sft_steps", "sft_loss", "sft_val_loss"]
    if "eval" in manifest_stages:
        kinds = sorted({k for r in rows for k in r if k.startswith("eval_")} -
                       {"eval_state", "eval_val_bpb", "eval_skipped"})
        cols += ["eval_state", "eval_val_bpb"] + kinds
    return cols


# The report's column headings (results.csv keeps the snake_case names, for programs).
LABELS = {"task": "task", "grid": "grid values", "state": "base", "steps": "steps",
          "final_loss": "train loss", "val_bpb": "val BPB", "tok_per_s": "tokens/s",
          "sft_state": "SFT", "sft_steps": "SFT steps", "sft_loss": "SFT train loss",
          "sft_val_loss": "SFT val loss", "eval_state": "eval", "eval_val_bpb": "eval val BPB",
          "eval_core": "CORE"}


def label(col: str) -> str:
    """A column's heading: `eval_<task>` columns are that task's accuracy."""
    if col in LABELS:
        return LABELS[col]
    return f"{col.removeprefix('eval_')} accuracy" if col.startswith("eval_") else col.replace("_", " ")


def _header_lines(run_dir: Path, manifest: dict, rows: list[dict], costs: list[dict] | None) -> list[str]:
    """What ran, from what, where, at what cost: the launch command, the code's commit, the
    devices the training tasks used and the GPU-hours of all tasks (jobs/cost.py stage_costs)."""
    from nanochat.common import now_iso
    try:
        recipe = load_recipe(run_dir / "recipe.yaml")
        name = recipe.name
    except UserError:
        recipe, name = None, run_dir.name
    launches = manifest.get("launches") or []
    command = "python jobs/launch.py " + " ".join(launches[0]["argv"]) if launches else "unknown"
    devices = sorted({f"{run.get('device')} × {run.get('world_size')} rank(s), {run.get('dtype', '').removeprefix('torch.')}, "
                      f"torch {run.get('torch')}" for r in rows for run in (r.get("batch") or {}).values()})
    cpu_only = bool(devices) and all(d.startswith("cpu") for d in devices)
    seconds = {name_: sum(_seconds(t) for t in info["tasks"]) for name_, info in manifest["stages"].items()}
    gpu_h = sum(c["gpu_hours"] for c in costs) if costs is not None else None
    cost = ("0 (the tasks ran on CPU)" if cpu_only else "unknown" if gpu_h is None else
            f"{gpu_h:.2f} (each task's run time × the GPUs it held; per stage below)")
    return [f"# Report: {name}", "",
            f"- launched with: `{command}`" + (f" ({len(launches)} launches; manifest.json lists them)"
                                              if len(launches) > 1 else ""),
            f"- code: commit {manifest.get('git_commit') or 'unknown'}; run created {manifest.get('created', '?')}; "
            f"report written {now_iso()}" + _task_code(manifest),
            f"- hardware: {'; '.join(devices) or 'no training task has started'} ({manifest.get('executor', '?')} executor)",
            f"- GPU-hours: {cost}; task time: " +
            ", ".join(f"{st} {seconds[st] / 60:.1f} min" for st in seconds),
            f"- run directory: `{run_dir}`"]


def _task_code(manifest: dict) -> str:
    """Which tasks ran which code snapshot (code/<id>, jobs/snapshot.py): one, unless a resume
    with --new-code ran newer code for some of them."""
    codes: dict[str, list[str]] = {}
    for stage, info in manifest["stages"].items():
        for t in info["tasks"]:
            if t.get("code"):
                codes.setdefault(t["code"], []).append(f"{stage} {t['index']}")
    shown = {c: "the checkout (--no-snapshot)" if c == "checkout" else f"code/{c}" for c in codes}
    if len(codes) == 1:
        return f"; every task ran {shown[next(iter(codes))]}"
    return "".join(f"; {shown[c]} ran {', '.join(tasks)}" for c, tasks in codes.items())


def sft_ylim(shown: list[float], step0: list[float]) -> tuple[float, float] | None:
    """The SFT panel's y range: the fine-tuning points' (train losses, validation after step 0),
    when the step-0 validation loss — the base model's, before any fine-tuning, often several
    times larger — would otherwise flatten them. None: matplotlib's own range is fine."""
    if not shown or not step0 or max(step0) <= max(shown):
        return None
    lo, hi = min(shown), max(shown)
    pad = hi - lo or 1.0
    return lo - 0.05 * pad, hi + 0.15 * pad


def _plot_curves(run_dir: Path, rows: list[dict], out: Path) -> None:
    plt = pyplot()
    sft = {r["task"]: read_jsonl(Path(r["sft_dir"]) / "progress.jsonl") for r in rows if "sft_dir" in r}
    sft = {k: v for k, v in sft.items() if v}
    try:
        name = load_recipe(run_dir / "recipe.yaml").name
    except UserError:
        name = run_dir.name
    fig, axes = plt.subplots(1, 3 if sft else 2, figsize=(15 if sft else 10, 3.8))
    a1, a2 = axes[0], axes[1]
    one = rows[0] if len(rows) == 1 else None  # one task: its grid values go in the title
    for row in rows:
        progress = read_jsonl(Path(row["run_dir"]) / "progress.jsonl")
        tr = [r for r in progress if r.get("event") == "train"]
        ev = [r for r in progress if r.get("event") == "eval" and "val_bpb" in r]
        label = f"task {row['task']}: {row['grid']}" if row["grid"] != "-" else f"task {row['task']}"
        if tr:
            a1.plot([r["step"] + 1 for r in tr], [r["loss"] for r in tr], lw=1, label=label)
        if ev:
            a2.plot([r["step"] for r in ev], [r["val_bpb"] for r in ev], "o-", ms=3, label=label)
    a1.set(xlabel="step", ylabel="loss (nats/token)", title="base training loss")
    a2.set(xlabel="step", ylabel="bits per byte", title="base validation BPB")
    fig.suptitle(f"{name}" + (f", task {one['task']}" + (f" ({one['grid']})" if one["grid"] != "-" else "")
                              if one else f": {len(rows)} tasks"))
    if sft:
        a3 = axes[2]
        shown, before = [], []  # the scale: every point after step 0 (the base model's step-0
        for row in rows:        # validation loss, before any fine-tuning, would flatten the rest)
            progress = sft.get(row["task"], [])
            tr = [r for r in progress if r.get("event") == "train"]
            ev = [r for r in progress if r.get("event") == "eval" and "val_loss" in r]
            shown += [r["loss"] for r in tr] + [r["val_loss"] for r in ev if r["step"] > 0]
            before += [r["val_loss"] for r in ev if r["step"] == 0]
            label = f"task {row['task']}: {row['grid']}" if row["grid"] != "-" else f"task {row['task']}"
            if tr:
                line, = a3.plot([r["step"] + 1 for r in tr], [r["loss"] for r in tr], lw=1, label=label)
            if ev:
                a3.plot([r["step"] for r in ev], [r["val_loss"] for r in ev], "o--", ms=3,
                        color=line.get_color() if tr else None, label=f"{label} (val)")
        a3.set(xlabel="step", ylabel="loss (nats/token)", title="SFT loss (train, o-- validation)")
        if (limits := sft_ylim(shown, before)) is not None:
            a3.set_ylim(*limits)
            a3.annotate(f"step 0 (before SFT): val {max(before):.2f}, above the scale", xy=(0.02, 0.97),
                        xycoords="axes fraction", va="top", fontsize=7, color="0.3")
    for a in axes:
        a.grid(alpha=0.3)
    if len(rows) > 1 and a2.get_legend_handles_labels()[0]:
        a2.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(out, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _batch_lines(run_dir: Path, rows: list[dict]) -> list[str]:
    """Where each training task's device batch came from: the recipe, or discovery (a cache
    hit, or probes — by the discover job or the task itself), and corrections the run made."""
    # what the discover tasks found (one per memory key, discover/NNN/), by cache file
    by_file = {d["cache_path"]: d for path in sorted((run_dir / "discover").glob("*/discovery.json"))
               for d in (_load_json(path) or {}).values() if isinstance(d, dict) and d.get("cache_path")}
    out = []
    for r in rows:
        for stage, run in (r.get("batch") or {}).items():
            d = run.get("discovery")
            if d is None:
                how, where = "fixed by the recipe", ""
            else:
                by_job = by_file.get(d.get("cache_path")) or {}
                if not d["from_cache"]:
                    how = f"discovered by this task: {d['probes']} probes in {d['seconds']:.1f} s"
                elif by_job and not by_job.get("from_cache"):
                    how = (f"cache hit; discovered by the discover job: {by_job.get('probes')} probes "
                           f"in {by_job.get('seconds', 0):.1f} s")
                else:
                    how = "cache hit"
                how += f" ({d.get('method', 'probes')})"
                where = f"`{d['cache_path']}`" if d.get("cache_path") else "(not cached)"
            fixes = "; ".join(f"{c['from']} → {c['to']}" for c in run.get("batch_corrections", []))
            out.append(f"| {r['task']} | {stage} | {run.get('device_batch_size')} | {how} | {where} | {fixes} |")
    if not out:
        return []
    return ["", "## Device batch size", "", "| task | stage | device batch | how | cache file | corrected |",
            "|---|---|---:|---|---|---|"] + out


def _reached(metric: str, target: float, progress: list[dict], row: dict, train: list[dict]):
    """(training seconds, step) when `metric` first met `target`, or None: from the progress
    log's evaluations (val_bpb, and CORE with train.core_every), else CORE of the eval stage,
    which scored the final checkpoint."""
    hit = first_reached(metric, target, progress)
    if hit is not None:
        return hit
    final = row.get("eval_core") if metric == "core" else None  # CORE: higher is better
    if final is not None and final >= target and train and "train_s" in train[-1]:
        return train[-1]["train_s"], train[-1]["step"] + 1
    return None


def _time_to_target_lines(run_dir: Path, rows: list[dict]) -> list[str]:
    """Per base task: training time without evaluation and checkpoints (what the speedrun
    leaderboard counts), total FLOPs, final val BPB and CORE, and for each of the recipe's
    `report.targets` the training time and step it was first reached; ranked by the first."""
    try:
        targets = load_recipe(run_dir / "recipe.yaml").report.targets
    except UserError:
        targets = {}
    table = []
    for r in rows:
        tdir = Path(r["run_dir"])
        progress = read_jsonl(tdir / "progress.jsonl")
        train = [e for e in progress if e.get("event") == "train"]
        if not train or "train_s" not in train[-1]:
            continue
        run = _load_json(tdir / "run.json") or {}
        flops = (run.get("flops_per_token") or 0) * (train[-1]["step"] + 1) * (run.get("tokens_per_step") or 0)
        reached = {m: _reached(m, t, progress, r, train) for m, t in targets.items()}
        table.append((r, train[-1]["train_s"], flops, reached))
    if not table:
        return []
    first = next(iter(targets), None)
    table.sort(key=lambda t: (t[3][first][0] if first and t[3][first] else float("inf")))
    head = ["task", "grid", "training time", "total FLOPs", "val_bpb", "core"] + \
        [target_label(m, t) for m, t in targets.items()]
    out = ["", "## Time to target", "",
           "Training time excludes evaluation and checkpointing" +
           (f"; ranked by the time to {first}." if first else "; set report.targets to rank tasks."), "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r, train_s, flops, reached in table:
        cells = [str(r["task"]), r["grid"], f"{train_s:.1f} s", f"{flops:.3e}",
                 "" if r.get("val_bpb") is None else str(r["val_bpb"]),
                 "" if r.get("eval_core") is None else str(r["eval_core"])]
        cells += [f"{v[0]:.1f} s (step {v[1]})" if v else "not reached" for v in reached.values()]
        out.append("| " + " | ".join(cells) + " |")
    return out


def _task_lines(run_dir: Path, rows: list[dict]) -> list[str]:
    """Per task: its own curves (base, SFT) and the command that chats with its model."""
    out = []
    for r in rows:
        links = []
        for what, d in (("base curves", Path(r["run_dir"])), ("SFT curves", Path(r["sft_dir"]) if "sft_dir" in r else None)):
            if d is not None and (d / "curves.png").exists():
                rel = (d / "curves.png").relative_to(run_dir) if run_dir in (d / "curves.png").parents else d / "curves.png"
                links.append(f"[{what}]({rel})")
        model = r.get("sft_dir") or r["run_dir"]
        chat = f"`python -m nanochat.chat {model}`" if list(Path(model).glob("checkpoints/step_*")) else ""
        if links or chat:
            out.append(f"- task {r['task']} ({r['grid']}): " + ", ".join(links + ([f"chat: {chat}"] if chat else [])))
    return ["", "## Tasks", ""] + out if out else []


def _tracking_lines(rows: list[dict]) -> list[str]:
    """Links to the wandb runs (train.wandb_project); offline runs by directory, with the
    command that uploads them."""
    out = []
    for r in rows:
        for stage, info in (r.get("wandb") or {}).items():
            where = (f"[{info['name']}]({info['url']})" if info.get("url") else
                     f"{info['name']}: offline run `{info['dir']}` (upload: `wandb sync {info['dir']}`)")
            out.append(f"- task {r['task']} {stage}: {where}")
    return ["", "## Experiment tracking (wandb)", ""] + out if out else []


def write_report(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    manifest = refresh(run_dir)  # the task states as the scheduler knows them now
    rows = collect(run_dir, manifest)
    cols = columns(manifest["stages"], rows)
    with atomic_path(run_dir / "results.csv", suffix=".csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols + ["run_dir"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    if rows:
        _plot_curves(run_dir, rows, run_dir / "curves.png")
    gpus = recipe_gpus(run_dir)
    costs = stage_costs(manifest, gpus) if gpus is not None else None
    lines = _header_lines(run_dir, manifest, rows, costs) + ["", "| " + " | ".join(map(label, cols)) + " |",
                                                       "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join("" if r.get(c) is None else str(r[c]) for c in cols) + " |")
    lines += ["", "![training curves](curves.png)" if rows else "(no training tasks)"]
    lines += _task_lines(run_dir, rows)
    for r in rows:
        if r.get("eval_skipped"):
            lines += ["", f"Evaluation of task {r['task']} skipped: " +
                      "; ".join(f"{k} ({v})" for k, v in r["eval_skipped"].items())]
    lines += report_lines(run_dir, write_curve(run_dir, manifest))  # curve.log + curve.png (jobs/miniseries.py)
    lines += cost_lines(costs or [])
    lines += grid_report_lines(run_dir, manifest)  # report.compare: the CM of an idea per depth (jobs/multiplier.py)
    lines += _time_to_target_lines(run_dir, rows)
    lines += _batch_lines(run_dir, rows)
    lines += _tracking_lines(rows)
    for r in rows:
        if "kv_bench" in r:
            table = Path(r["kv_bench"]) / "results.md"
            if table.exists():
                lines += ["", f"## KV-cache benchmark, task {r['task']}", "", table.read_text().strip()]
    atomic_write_text(run_dir / "report.md", "\n".join(lines) + "\n")
    return run_dir / "report.md"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python jobs/report.py",
                                 description="Rebuild a launched run's report.md, results.csv and plots.")
    ap.add_argument("run_dir", help="the run directory jobs/launch.py printed, e.g. runs/tiny")
    run_dir = Path(ap.parse_args(argv).run_dir)
    if not (run_dir / "manifest.json").exists():
        raise UserError(f"{run_dir} has no manifest.json: pass the run directory jobs/launch.py printed")
    print(write_report(run_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
