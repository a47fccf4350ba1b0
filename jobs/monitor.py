"""A launched run's state, as `python jobs/status.py` shows it (and `jobs/launch.py --watch`,
`--force` follow and cancel it).

Per stage and task: the job state — from the scheduler, through the manifest's refresh
(jobs/scheduler.py: squeue, sacct, then the task's own files once SLURM has forgotten a job; a
local run's launcher records its states) — elapsed time, the last training step / loss /
tokens/s / ETA from the progress log of base and sft tasks (jobs/progress.py) and the training
time at which a base task first met each of the recipe's report.targets, an eval task's scores
from its eval.json, why a cancelled task was cancelled (by the user, or because a task it waited
for failed), the stderr tail of failed tasks, and the NCCL flight-recorder dumps a task left
(jobs/diagnostics.py). Under a running training task: where its time went so far
(jobs/progress.py time_so_far: queue wait, the job's set-up, imports, data, warm-up and whether
the compile cache hit, steps, evaluation, checkpoints). A ladder (a grid over model.depth) shows
one line per rung instead.
"""
from __future__ import annotations

import getpass
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from jobs.diagnostics import GPU_UNUSED, flight_recorder_dumps
from jobs.manifest import CANCELLED, DONE, cancel_reason, launcher_alive, read_manifest, record_cancel, save_manifest
from jobs.plan import SETUP_FAILED
from jobs.progress import (PROGRESS_STAGES, describe_time, duration, job_start, progress_text, read_progress,
                           result_summary, task_seconds, time_so_far)
from jobs.scheduler import FINAL, job_ids, live_tasks, refresh
from nanochat.common import UserError
from nanochat.logfmt import STAGE_LOGS
from nanochat.recipe import load_recipe


def _detail(stage: str, task_dir: Path, running: bool, targets: dict[str, float]) -> str:
    return result_summary(stage, task_dir) or progress_text(stage, task_dir, running, targets)


def run_targets(run_dir: Path) -> dict[str, float]:
    """The run's report.targets (its recipe.yaml), for the time to each target once reached."""
    try:
        return load_recipe(run_dir / "recipe.yaml").report.targets
    except UserError:
        return {}


def is_ladder(run_dir: Path) -> bool:
    """A run whose grid has a model.depth axis (configs/ladder.yaml): status shows it by rung."""
    try:
        return len(load_recipe(run_dir / "recipe.yaml").grid.get("model.depth") or []) > 1
    except UserError:
        return False


def _stderr_path(run_dir: Path, stage: str, task: dict) -> Path | None:
    """The task's stderr log: the local executor's, or its SLURM job's (the newest run of it)."""
    candidates = [run_dir / "logs" / f"{stage}_{task['index']}.err"]
    if task.get("job_id"):
        jid = task["job_id"]
        candidates += sorted((run_dir / "slurm").glob(f"{jid}/*_log.err"))
    return next((p for p in candidates if p.exists() and p.stat().st_size), None)


def _stderr_tail(run_dir: Path, stage: str, task: dict, n: int = 5) -> list[str]:
    path = _stderr_path(run_dir, stage, task)
    return path.read_text(errors="replace").strip().splitlines()[-n:] if path else []


def _stderr_warning(path: Path | None, n: int = 40) -> str:
    """The job's own warning in its first lines (jobs/diagnostics.py: GPUs given, torch sees none)."""
    if path is None:
        return ""
    with open(path, errors="replace") as f:
        head = [line.strip() for _, line in zip(range(n), f)]
    return next((line for line in head if line.startswith(GPU_UNUSED)), "")


def collect(run_dir: Path, manifest: dict | None = None) -> list[dict]:
    manifest = manifest or refresh(run_dir)
    rows, targets = [], run_targets(run_dir)
    for stage, info in manifest["stages"].items():
        for task in info["tasks"]:
            state = task["state"]
            elapsed = duration(task_seconds(task)) if task.get("elapsed") or "elapsed_s" in task else ""
            rows.append({"stage": stage, "task": task["index"], "job_id": task.get("job_id") or "-",
                         "state": state, "elapsed": elapsed, "reason": task.get("reason", ""),
                         "cancelled_by": task.get("cancelled_by", ""), "note": task.get("note", ""),
                         "progress": _detail(stage, Path(task["run_dir"]), state == "RUNNING", targets),
                         # where a running training task's time has gone so far (queue, set-up, compile, ...)
                         "time": time_so_far(task) if state == "RUNNING" and stage in PROGRESS_STAGES else {},
                         "overrides": task.get("overrides", []), "elapsed_s": _seconds_so_far(task),
                         "run_dir": task["run_dir"]})
    states = {(r["stage"], r["task"]): r["state"] for r in rows}
    for r in rows:
        # why it ended: a cancelled job's stderr holds only the noise of the SIGTERM that stopped
        # it (a traceback, SLURM's "CANCELLED AT"), so say who or what cancelled it instead; a
        # failed job keeps its tail
        r["why"] = cancel_reason(manifest, r["stage"], r["task"], lambda st, i: states.get((st, i)),
                                 r["cancelled_by"]) if r["state"] == CANCELLED else ""
        ended_badly = r["state"] in FINAL - {DONE, CANCELLED}
        task = _task(manifest, r)
        r["stderr"] = _stderr_tail(run_dir, r["stage"], task) if ended_badly else []
        log = _stderr_path(run_dir, r["stage"], task) if r["state"] != "PENDING" else None
        r["log"] = str(log) if ended_badly and log else ""
        # which cluster.setup line stopped the job (jobs/plan.py guarded_setup), and a
        # job training on the CPU although it was given GPUs
        setup = next((ln for ln in r["stderr"] if ln.startswith(SETUP_FAILED.split("{")[0])), "")
        r["why"] = "; ".join(filter(None, [r["why"], setup, _stderr_warning(log)]))
        task_dir = Path(task["run_dir"])
        r["nccl_dumps"] = [str(p) for p in flight_recorder_dumps(task_dir)
                           if p.name.startswith(f"nccl_trace_{r['stage']}_")]
    return rows


def _seconds_so_far(task: dict) -> float:
    """A task's run time, a running local task's included (its launcher records it at the end)."""
    if task["state"] == "RUNNING" and (start := job_start(task, time.time())) is not None:
        return max(0.0, time.time() - start)
    return task_seconds(task)


def _task(manifest: dict, row: dict) -> dict:
    return next(t for t in manifest["stages"][row["stage"]]["tasks"] if t["index"] == row["task"])


def show(run_dir: Path) -> tuple[list[dict], str | None]:
    """Print the run's table; (its rows, the line saying the scheduler could not answer, if so)."""
    manifest = refresh(run_dir)
    rows = collect(run_dir, manifest)
    rest = rows
    if is_ladder(run_dir):
        rest = [r for r in rows if r["stage"] not in STAGE_LOGS]
        _print_rungs([r for r in rows if r["stage"] in STAGE_LOGS])
        if rest:
            print()
    if rest:
        print(f"{'stage':<9}{'task':>4}  {'job':<14}{'state':<12}{'elapsed':<11}progress / reason")
    for r in rest:
        reason = r["reason"] if r["state"] == "PENDING" and r["reason"] not in ("", "None") else ""
        if "held" in reason.lower() or r["state"] == "REQUEUE_HOLD":  # waits for a person, forever
            reason = (f"{reason or r['state']}: held until released — `scontrol release {r['job_id']}`, "
                      f"or cancel it")
        extra = "; ".join(filter(None, [r["why"], r["note"], r["progress"]])) or reason
        print(f"{r['stage']:<9}{r['task']:>4}  {r['job_id']:<14}{r['state']:<12}{r['elapsed']:<11}{extra}")
        _print_details(r)
    if unreachable := manifest.get("unreachable"):
        print(f"{unreachable}: the states above are the last known ones "
              f"(refreshed {manifest.get('refreshed') or manifest.get('created')})")
    return rows, unreachable


def _print_details(r: dict, prefix: str = "") -> None:
    """The lines under a task's row: where its time went, its stderr tail, log, NCCL dumps."""
    if r["time"]:
        print(f"{'':>15}{prefix}time: {describe_time(r['time'])}")
    for line in r["stderr"]:
        print(f"{'':>15}{prefix}| {line}")
    if r["log"]:
        print(f"{'':>15}{prefix}log: {r['log']}")
    if r["nccl_dumps"]:
        prefix_ = Path(r["nccl_dumps"][0]).name.rstrip("0123456789")
        print(f"{'':>15}{prefix}NCCL flight-recorder dumps of {len(r['nccl_dumps'])} rank(s) in "
              f"{Path(r['nccl_dumps'][0]).parent}: python -m torch.distributed.flight_recorder.fr_trace "
              f"{Path(r['nccl_dumps'][0]).parent} --prefix {prefix_}")


def rung_rows(rows: list[dict]) -> list[dict]:
    """One row per rung (grid task i over base → kv_bench → sft → eval): its depth, state (the
    stage it is at), the step of its newest training stage, its newest val_bpb, and the elapsed
    time of its tasks together."""
    order = {name: k for k, name in enumerate(STAGE_LOGS)}
    out = []
    for i in sorted({r["task"] for r in rows}):
        tasks = sorted((r for r in rows if r["task"] == i), key=lambda r: order[r["stage"]])
        over = dict(o.split("=", 1) for o in tasks[0]["overrides"] if "=" in o)
        bad = [r for r in tasks if r["state"] in FINAL - {DONE, CANCELLED}]
        live = [r for r in tasks if r["state"] not in FINAL]
        if bad:
            state = f"{bad[0]['stage']} {bad[0]['state']}"
        elif all(r["state"] == DONE for r in tasks):
            state = DONE
        elif live:
            at = next((r for r in live if r["state"] == "RUNNING"), live[0])
            state = f"{at['stage']} {at['state']}"
        else:
            state = CANCELLED
        step, val = "", ""
        for r in tasks:
            if r["stage"] in PROGRESS_STAGES and (p := read_progress(r["run_dir"])) is not None:
                step = f"{r['stage']} {p.step}/{p.total}" if p.total else f"{r['stage']} {p.step}"
                if r["stage"] == "base" and p.val and p.val[0] == "val_bpb":
                    val = f"{p.val[1]:.4f}"
        out.append({"rung": i, "depth": over.pop("model.depth", "?"),
                    "other": " ".join(f"{k}={v}" for k, v in over.items()), "state": state, "step": step,
                    "val_bpb": val, "elapsed": duration(sum(r["elapsed_s"] for r in tasks)), "tasks": tasks})
    return out


def _print_rungs(rows: list[dict]) -> None:
    """A ladder's status: a line per rung, then under it what its tasks have to say."""
    print(f"{'rung':<5}{'depth':<7}{'state':<24}{'step':<15}{'val_bpb':<9}{'elapsed':<9}")
    for g in rung_rows(rows):
        print(f"{g['rung']:<5}{g['depth']:<7}{g['state']:<24}{g['step']:<15}{g['val_bpb']:<9}{g['elapsed']:<9}"
              f"{g['other']}".rstrip())
        for r in g["tasks"]:
            said = "; ".join(filter(None, [r["why"], r["note"]]))
            if said:
                print(f"{'':>15}{r['stage']}: {said}")
            _print_details(r, f"{r['stage']} ")


WATCH_EVERY_S = 30.0  # between refreshes while something changes
WATCH_MAX_S = 300.0   # the longest pause, reached by doubling while nothing changes


def watch(run_dir: Path, every_s: float = WATCH_EVERY_S) -> int:
    """Refresh until every task has ended (exit 0 when all completed, else 1). One refresh is one
    squeue call (and a sacct call when a job has left the queue, jobs/scheduler.py); the pause
    doubles, up to WATCH_MAX_S, while nothing changes. A scheduler that does not answer ends
    nothing: the watch goes on."""
    pause, last = every_s, None
    while True:
        rows, unreachable = show(run_dir)
        if not unreachable and all(r["state"] in FINAL for r in rows):
            ok = all(r["state"] == "COMPLETED" for r in rows)
            # the line the local executor ends with (jobs/launch.py)
            print(f"{'finished' if ok else 'finished with failures'}: {run_dir / 'report.md'}")
            return 0 if ok else 1
        seen = [(r["state"], r["progress"]) for r in rows]
        pause = every_s if seen != last else min(pause * 2, max(every_s, WATCH_MAX_S))
        last = seen
        time.sleep(pause)
        print()


def cancel(run_dir: Path) -> None:
    """Cancel the run's jobs, recording in the manifest first who did it and when (status then
    says "cancelled by the user" instead of showing the SIGTERM's traceback). A local run is
    stopped by signalling its launcher, which stops its tasks and records the cancel itself
    (it rewrites the manifest as tasks end, so a record written here could be lost)."""
    manifest = read_manifest(run_dir)
    if manifest.get("executor") == "local":
        launcher = manifest.get("launcher")
        if launcher and launcher.get("host") != socket.gethostname():
            raise UserError(f"{run_dir} runs locally on {launcher.get('host')} (launcher pid "
                            f"{launcher.get('pid')}); run --cancel there")
        if launcher_alive(launcher):
            os.kill(launcher["pid"], signal.SIGTERM)
            deadline = time.time() + 60  # it gives its tasks 10 s to stop, then kills them
            while launcher_alive(launcher) and time.time() < deadline:
                time.sleep(0.2)
            print(f"cancelled the local run (launcher pid {launcher['pid']})")
            return
        # no launcher: tasks it left RUNNING (it was killed) will never end on their own
        stale = [t for s in manifest["stages"].values() for t in s["tasks"] if t["state"] not in FINAL]
        for t in stale:
            t["state"] = CANCELLED
        save_manifest(run_dir, manifest)
        if stale:
            record_cancel(run_dir, getpass.getuser(), [])
        print(f"no launcher runs for {run_dir}; {len(stale)} unfinished task(s) marked cancelled")
        return
    ids = job_ids(live_tasks(refresh(run_dir)))  # only what still runs: ended jobs stay as they ended
    record_cancel(run_dir, getpass.getuser(), ids)
    if ids:
        subprocess.run(["scancel", *ids], check=False, timeout=30)
    print(f"cancelled jobs: {' '.join(ids) or 'none'}")
