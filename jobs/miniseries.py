"""A run as upstream's miniseries: meta.json per task, the run's curve.log and its picture
(`python jobs/ladder.py RUN_DIR` rewrites them; the report job writes them too).

Upstream (branch experiment_refactor) trains one model per depth and joins each depth's stage
`summary` records into curve.log: one `model` record per model, fields namespaced by stage
(scripts/curve.py:29-53: base.*, infer.*, sft.*, chat.*). Here a rung is one grid task: base task
i's directory holds base_train.log and (kv_bench task i's) infer_bench.log; its sft directory
sft.log and chat_eval.log (nanochat/logfmt.py writes them). What upstream cannot know comes
from the scheduler: each rung's queue wait and GPU-hours (`sched.*`), from sacct's Submit,
Start, Elapsed and AllocTRES where accounting answers, else the local executor's wall time.

The picture: val_bpb (and CORE, when measured) against training FLOPs, log-x, each point
labelled with its depth and cost, with the power law val_bpb = a · C^b fitted in log-log space.
Torch-free (the report job runs it; the job that writes meta.json names its device itself).
"""
from __future__ import annotations

import math
import os
import socket
from pathlib import Path

from jobs.cost import accounting, recipe_gpus, source, task_cost
from jobs.manifest import read_manifest
from nanochat.common import atomic_path, atomic_write_json, atomic_write_text, code_provenance, now_iso
from nanochat.logfmt import CURVE_NAMESPACE, STAGE_LOGS, format_record, last_summary, parse_records

CURVE = "curve.log"
META = "meta.json"             # the run's identity, at its root (upstream: experiments/<name>/meta.json)
TASK_META = "task_meta.json"   # the same fields per task directory (meta.json there marks a checkpoint)
BENCH_BATCHES = (1, 8, 32, 128)   # the kv_bench rows curve.log names (upstream: tok_s_bs{1,8,32,128})


# --------------------------------------------------------------------------------------------
# meta.json: the experiment's identity, in every task directory and at the run's root

def ladder_of(recipe) -> list[int]:
    """The depths a run trains: its grid's model.depth axis, else its one depth."""
    return list(recipe.grid.get("model.depth") or [recipe.model.depth])


def dataset_name(recipe) -> str:
    """The data's name, as upstream names datasets (climbmix, ...): the hub repo's, or offline."""
    return "offline" if recipe.data.source == "offline" else recipe.data.hub_repo.rstrip("/").split("/")[-1]


def write_meta(task_dir: Path, recipe, stage: str, index: int, run_dir: Path, device: str) -> dict:
    """Upstream's meta.json fields (nanochat/experiment.py:53-60 and the design doc's "commit,
    dirty, date, GPU/node info, ladder, dataset"), for this task, and once for the run. `device`:
    what the job's process trains on, as nanochat names it (nanochat.batchsize.devices.device_name)."""
    prov = code_provenance()
    meta = {"name": recipe.name, "created": now_iso(), "git_commit": prov.get("commit"),
            "git_dirty": bool(prov.get("dirty")), "dataset": dataset_name(recipe),
            "gpu": device, "node": socket.gethostname(),
            "world_size": recipe.cluster.world_size, "ladder": ladder_of(recipe),
            "stage": stage, "task": index, "depth": recipe.model.depth,
            "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
    if int(os.environ.get("RANK", "0")) == 0:
        Path(task_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(task_dir) / TASK_META, meta)
        if not (Path(run_dir) / META).exists():
            atomic_write_json(Path(run_dir) / META, {k: v for k, v in meta.items()
                                                     if k not in ("stage", "task", "depth", "slurm_job_id")})
    return meta


# --------------------------------------------------------------------------------------------
# Cost: queue wait and GPU-hours per rung

def rung_cost(manifest: dict, index: int, gpus_per_task: dict[str, int]) -> dict:
    """One rung's (grid task i's) cost over its stages: queue wait of its first job (base),
    wall time and GPU-hours of all its tasks (jobs/cost.py: sacct's, else the manifest's time ×
    `gpus_per_task`, stage → GPUs held)."""
    tasks = {name: st["tasks"][index] for name, st in manifest["stages"].items()
             if name in STAGE_LOGS and index < len(st["tasks"])}
    acct = accounting(manifest, list(tasks.values()))
    costs = {name: task_cost(t, gpus_per_task.get(name, 0), acct) for name, t in tasks.items()}
    queue = costs["base"]["queue_s"] if "base" in costs else None
    return {"wall_s": round(sum(c["wall_s"] for c in costs.values()), 1),
            "gpu_hours": round(sum(c["gpu_s"] for c in costs.values()) / 3600, 4),
            "queue_s": None if queue is None else round(queue, 1), "source": source(manifest, acct)}


# --------------------------------------------------------------------------------------------
# curve.log

def build_row(base_dir: Path, sft_dir: Path | None, eval_dir: Path | None, kv_dir: Path | None) -> dict:
    """One rung's stage summaries, namespaced as upstream's scripts/curve.py:build_row does."""
    row: dict = {}
    logs = [("base", base_dir), ("kv_bench", kv_dir), ("sft", sft_dir), ("eval", eval_dir)]
    for stage, d in logs:
        summary = last_summary(d / STAGE_LOGS[stage]) if d is not None else None
        summary = dict(summary or {})
        tag = summary.pop("model_tag", None)
        if stage == "base":
            row["model_tag"] = tag
            if "depth" in summary:
                row["depth"] = summary.pop("depth")
        for k, v in summary.items():
            row[f"{CURVE_NAMESPACE[stage]}.{k}"] = v
    if kv_dir is not None:
        bench = {r["batch"]: r for r in parse_records(kv_dir / STAGE_LOGS["kv_bench"], "bench")}
        for b in sorted(bench):
            if b in BENCH_BATCHES or b == min(bench) or b == max(bench):
                row[f"infer.tok_per_sec_bs{b}"] = bench[b]["tok_per_sec"]
    return {k: v for k, v in row.items() if v is not None}


def _task_dir(manifest: dict, stage: str, index: int) -> Path | None:
    tasks = manifest["stages"].get(stage, {}).get("tasks", [])
    return Path(tasks[index]["run_dir"]) if index < len(tasks) else None


def curve_rows(run_dir: Path, manifest: dict | None = None) -> list[dict]:
    """One row per grid task that finished pretraining (its base summary exists), by depth."""
    manifest = manifest or read_manifest(run_dir)
    gpus = recipe_gpus(run_dir) or {}
    rows = []
    for i, task in enumerate(manifest["stages"].get("base", {}).get("tasks", [])):
        row = build_row(Path(task["run_dir"]), _task_dir(manifest, "sft", i),
                        _task_dir(manifest, "eval", i), _task_dir(manifest, "kv_bench", i))
        if "base.eflops" not in row:
            continue
        cost = rung_cost(manifest, i, gpus)
        row.update({"task": i, "grid": " ".join(task["overrides"]) or "-",
                    "sched.wall_s": cost["wall_s"], "sched.gpu_hours": cost["gpu_hours"],
                    "sched.source": cost["source"]})
        if cost["queue_s"] is not None:
            row["sched.queue_s"] = cost["queue_s"]
        rows.append(row)
    rows.sort(key=lambda r: (r.get("depth", 0), r["task"]))
    return rows


def write_curve(run_dir: Path, manifest: dict | None = None) -> list[dict]:
    """RUN_DIR/curve.log (upstream's `model` records) and curve.png; returns the rows."""
    rows = curve_rows(run_dir, manifest)
    atomic_write_text(Path(run_dir) / CURVE, "".join(format_record("model", **r) + "\n" for r in rows))
    if rows:
        plot_curve(rows, Path(run_dir) / "curve.png", Path(run_dir).name)
    return rows


# --------------------------------------------------------------------------------------------
# The picture and the fit

def power_law(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """(a, b) of y = a · x^b, least squares in log-log space; None with < 2 distinct x."""
    pts = [(math.log(x), math.log(y)) for x, y in points if x > 0 and y > 0]
    if len({p[0] for p in pts}) < 2:
        return None
    n = len(pts)
    mx, my = sum(p[0] for p in pts) / n, sum(p[1] for p in pts) / n
    b = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
    return math.exp(my - b * mx), b


def cost_label(row: dict) -> str:
    gh = row.get("sched.gpu_hours") or 0.0
    return f"d{row.get('depth', '?')}, " + (f"{gh:.2f} GPU-h" if gh > 0 else f"{row.get('sched.wall_s', 0):.0f} s CPU")


def plot_curve(rows: list[dict], out: Path, title: str) -> None:
    from nanochat.plots import pyplot
    plt = pyplot()
    metrics = [("base.val_bpb", "val BPB")] + ([("base.core", "CORE")] if any("base.core" in r for r in rows)
                                                else [("chat.core", "CORE")] if any("chat.core" in r for r in rows) else [])
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.4 * len(metrics), 4.4), squeeze=False)
    for ax, (key, name) in zip(axes[0], metrics):
        pts = [(r["base.eflops"] * 1e18, r[key], r) for r in rows if isinstance(r.get(key), (int, float))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", color="#2a78d6")
        for x, y, r in pts:
            ax.annotate(cost_label(r), (x, y), xytext=(5, 4), textcoords="offset points", fontsize=8)
        fit = power_law([(x, y) for x, y, _ in pts])
        if fit is not None:
            xs = [min(p[0] for p in pts) * 0.8, max(p[0] for p in pts) * 1.25]
            a, b = fit
            ax.plot(xs, [a * x ** b for x in xs], "--", color="#52514e", lw=1,
                    label=f"fit: {name} = {a:.3g} · C^{b:.3f}")
            ax.legend(fontsize=8)
        ax.set(xscale="log", xlabel="training FLOPs (C)", ylabel=name, title=f"{title}: {name} vs compute")
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    with atomic_path(out, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def report_lines(run_dir: Path, rows: list[dict]) -> list[str]:
    """The report's section: the curve as a table and a picture, and the fitted law."""
    if not rows:
        return []
    lines = ["", "## The curve (curve.log: one `model` record per rung, upstream's grammar)", "",
             "| depth | params | training FLOPs | val BPB | CORE | SFT val loss | wall s | GPU-h | queue s |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        core = r.get("base.core", r.get("chat.core", ""))
        lines.append(f"| {r.get('depth', '?')} | {r.get('base.num_params', '')} | {r['base.eflops'] * 1e18:.3e} | "
                     f"{r.get('base.val_bpb', '')} | {core} | {r.get('sft.val_loss', '')} | {r['sched.wall_s']} | "
                     f"{r['sched.gpu_hours']} | {r.get('sched.queue_s', '')} |")
    fit = power_law([(r["base.eflops"] * 1e18, r["base.val_bpb"]) for r in rows if "base.val_bpb" in r])
    if fit is not None:
        lines += ["", f"Fitted power law (least squares in log-log): val_bpb = {fit[0]:.4g} · C^{fit[1]:.4f}"]
    lines += ["", "![val BPB vs training FLOPs](curve.png)"]
    return lines + time_lines(rows)


TIME_FIELDS = [("setup_s", "set-up (all)"), ("imports_s", "of it imports"), ("data_s", "of it data + tokenizer"),
               ("warmup_s", "warm-up + first step (compile)"), ("compile_cache", "compile cache"),
               ("train_time_sec", "training steps (the first included)"), ("eval_total_s", "evaluation"),
               ("checkpoint_total_s", "checkpoints")]


def time_lines(rows: list[dict]) -> list[str]:
    """Where each rung's training time went, per training stage (the summary's breakdown), with
    the rung's queue wait and its tasks' wall time from the scheduler."""
    out = []
    for stage in ("base", "sft"):
        have = [r for r in rows if f"{stage}.setup_s" in r]
        if not have:
            continue
        out += ["", f"### Where the time went: {stage} (seconds)", "",
                "| depth | queue | " + " | ".join(label for _, label in TIME_FIELDS) + " |",
                "|---:|---:|" + "---:|" * len(TIME_FIELDS)]
        for r in have:
            out.append(f"| {r.get('depth', '?')} | {r.get('sched.queue_s', '') if stage == 'base' else ''} | " +
                       " | ".join(str(r.get(f"{stage}.{k}", "not compiled" if k == "compile_cache" else ""))
                                  for k, _ in TIME_FIELDS) + " |")
    return out
