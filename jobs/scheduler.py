"""The scheduler's truth in the manifest: `refresh(run_dir)` is the one function that brings
every task's state in `manifest.json` up to date, and everything that acts on a run's state —
`jobs/status.py` (and `--watch`), `jobs/launch.py --resume / --only / --force`, the report —
reads the manifest through it.

Where a state comes from, first answer wins per job:
1. `squeue -r` for jobs still in the queue (immediate; sacct lags 1–3 s behind a submission);
2. `sacct -X` (accounting: ended jobs, and "CANCELLED by UID");
3. the task's own files, once the scheduler no longer knows the job (no accounting, or its
   record purged after MinJobAge): submitit's result pickle (success → COMPLETED, error →
   FAILED), else the task's outputs (eval.json, a finished progress log, ...) → COMPLETED, else
   FAILED saying the scheduler forgot the job. So every state ends, and `--watch` with it.

States are SLURM's own names (`man squeue`, JOB STATE CODES). A local run's states are written by
its launcher process; while that process lives its manifest is the truth, and once it is gone
the tasks it left unfinished are settled from their files the same way.

The manifest is rewritten atomically under a file lock (`manifest_lock`), the one every writer
of manifest.json takes, so a refresh and a launcher never interleave a read and a write.
"""
from __future__ import annotations

import datetime
import pickle
import re
import subprocess
import time
from pathlib import Path

from jobs.manifest import CANCELLED, DONE, FAILED, launcher_alive, manifest_lock, read_manifest, save_manifest
from jobs.progress import read_progress
from nanochat.common import UserError, now_iso

# SLURM job states (squeue/sacct names). LIVE: the job holds, or will hold, its task.
LIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING",
        "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD",
        "SPECIAL_EXIT"}
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
         "BOOT_FAIL", "DEADLINE", "REVOKED"}
# A job just submitted may be in neither squeue's answer (a busy controller) nor sacct's (its
# record arrives 1–3 s later): only after this long is a job the scheduler does not know settled.
FORGOTTEN_AFTER_S = 120.0


def _run(cmd: list[str]) -> str | None:
    """A scheduler command's stdout; None when it could not answer (no command, error, timeout)."""
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout if res.returncode == 0 else None


def _expand(job_id: str) -> list[str]:
    """sacct's pending array record `123_[0-3,5%2]` → 123_0 … 123_3, 123_5; other ids as they are."""
    m = re.fullmatch(r"(\d+)_\[([0-9,\-]+)(?:%\d+)?\]", job_id)
    if not m:
        return [job_id]
    out = []
    for part in m.group(2).split(","):
        lo, _, hi = part.partition("-")
        out += [f"{m.group(1)}_{i}" for i in range(int(lo), int(hi or lo) + 1)]
    return out


def slurm_states(job_ids: list[str]) -> dict[str, dict]:
    """job id (array tasks as 123_4) → {state, elapsed, reason, cancelled_by} for the jobs SLURM
    knows: sacct first, squeue over it (the queue is current where accounting lags)."""
    if not job_ids:
        return {}
    ids = ",".join(sorted({j.split("_")[0] for j in job_ids}))
    states: dict[str, dict] = {}
    for line in (_run(["sacct", "-n", "-P", "-X", "-j", ids, "-o", "JobID,State,Elapsed,Reason"]) or "").splitlines():
        parts = line.split("|")
        if len(parts) >= 3 and parts[1].split():
            words = parts[1].split()  # "CANCELLED by 1000"
            by = words[2] if len(words) == 3 and words[1] == "by" else ""
            for jid in _expand(parts[0]):
                states[jid] = {"state": words[0], "elapsed": parts[2],
                               "reason": parts[3] if len(parts) > 3 else "", "cancelled_by": by}
    for line in (_run(["squeue", "-h", "-r", "-j", ids, "-o", "%i|%T|%M|%r"]) or "").splitlines():
        parts = line.split("|")
        if len(parts) == 4:
            states[parts[0]] = {"state": parts[1], "elapsed": parts[2], "reason": parts[3], "cancelled_by": ""}
    return states


# --------------------------------------------------------------------------------------------
# A task's own files, for a job the scheduler no longer knows.

def submitit_result(run_dir: Path, job_id: str) -> str | None:
    """COMPLETED / FAILED from the result pickle submitit's job wrote (rank 0's), None without one."""
    path = Path(run_dir) / "slurm" / job_id / f"{job_id}_0_result.pkl"
    try:
        with open(path, "rb") as f:
            outcome = pickle.load(f)[0]
    except (OSError, EOFError, pickle.UnpicklingError, IndexError, TypeError, AttributeError, ImportError):
        return None
    return {"success": DONE, "error": FAILED}.get(outcome)


def outputs_complete(stage: str, task_dir: Path) -> bool:
    """Whether a task's directory holds what its stage writes when it ends well."""
    task_dir = Path(task_dir)
    if stage in ("base", "sft"):
        p = read_progress(task_dir)
        return p is not None and p.total is not None and p.step >= p.total
    marker = {"eval": "eval.json", "kv_bench": "results.json", "sweep": "results.json", "discover": "discovery.json",
              "check": "check.json", "report": "report.md"}.get(stage)
    return marker is not None and (task_dir / marker).exists()


def settle(run_dir: Path, stage: str, task: dict, why: str) -> dict:
    """The final state of a task whose job nobody can ask about any more, from its files."""
    by_result = submitit_result(run_dir, task["job_id"]) if task.get("job_id") else None
    if by_result:
        return {"state": by_result, "note": f"{why}; its result file says {by_result}"}
    if outputs_complete(stage, Path(task["run_dir"])):
        return {"state": DONE, "note": f"{why}; its outputs are complete"}
    if task.get("job_id") and not any((Path(run_dir) / "slurm" / task["job_id"]).glob("*_log.out")):
        # a pending array task cancelled before it started leaves no accounting record at all
        return {"state": CANCELLED, "note": f"{why}; it never started"}
    return {"state": FAILED, "note": f"{why}, and it left no result"}


# --------------------------------------------------------------------------------------------

def age_s(iso: str | None) -> float:
    """Seconds since an ISO timestamp the kit wrote (now_iso); infinite when there is none."""
    try:
        return time.time() - datetime.datetime.fromisoformat(iso).timestamp()
    except (TypeError, ValueError):
        return float("inf")


def _refresh_slurm(run_dir: Path, manifest: dict) -> None:
    tasks = [(name, t) for name, s in manifest["stages"].items() for t in s["tasks"]]
    ids = [t["job_id"] for _, t in tasks if t.get("job_id")]
    known = slurm_states(ids)
    arrays = {j.split("_")[0] for j in known}  # jobs SLURM knows at least one task of
    for name, task in tasks:
        jid = task.get("job_id")
        if not jid:
            continue
        if jid in known:
            task.update(known[jid])
            task.pop("note", None)
        elif task["state"] not in FINAL and (jid.split("_")[0] in arrays or
                                             age_s(task.get("submitted")) > FORGOTTEN_AFTER_S):
            # (an array SLURM knows, without this task: it is gone, no need to wait for sacct)
            task.update(settle(run_dir, name, task, f"SLURM no longer knows job {jid}"))


def _refresh_local(run_dir: Path, manifest: dict) -> None:
    if launcher_alive(manifest.get("launcher")):
        return  # the launcher writes its tasks' states itself
    for name, s in manifest["stages"].items():
        for task in s["tasks"]:
            if task["state"] not in FINAL and task["state"] != "PLANNED":
                task.update(settle(run_dir, name, task, "its local launcher is gone"))


def refresh(run_dir: Path) -> dict:
    """Bring every task's state in RUN_DIR/manifest.json up to date (see the module docstring),
    write it back atomically under the manifest lock, and return it."""
    run_dir = Path(run_dir)
    with manifest_lock(run_dir):
        manifest = read_manifest(run_dir)
        before = repr(manifest["stages"])
        if manifest.get("executor") == "slurm":
            _refresh_slurm(run_dir, manifest)
        else:
            _refresh_local(run_dir, manifest)
        if repr(manifest["stages"]) != before:
            manifest["refreshed"] = now_iso()
            try:
                save_manifest(run_dir, manifest)
            except OSError:
                pass  # a read-only view of someone's run: the states are still current
    return manifest


def live_tasks(manifest: dict) -> list[tuple[str, dict]]:
    """(stage, task) of every task whose job holds or will hold it."""
    return [(name, t) for name, s in manifest["stages"].items() for t in s["tasks"]
            if t["state"] in LIVE and (t.get("job_id") or manifest.get("executor") == "local")]


def job_ids(tasks: list[tuple[str, dict]]) -> list[str]:
    """The SLURM job ids (array jobs once) behind some tasks, sorted."""
    return sorted({t["job_id"].split("_")[0] for _, t in tasks if t.get("job_id")}, key=int)


def cancel_and_wait(ids: list[str], timeout_s: float = 120.0) -> None:
    """scancel the jobs and wait until none is in the queue any more (a job being cancelled is
    COMPLETING while its processes stop; until it has left, it may still write). Raises a
    UserError naming the jobs that stayed."""
    if not ids:
        return
    res = subprocess.run(["scancel", *ids], capture_output=True, text=True, timeout=60)
    if res.returncode != 0 and in_queue(ids) != set():  # (a job that just ended can't be cancelled)
        raise UserError(f"scancel {' '.join(ids)} failed: {res.stderr.strip() or res.returncode}; "
                        "nothing was moved or resubmitted")
    deadline = time.time() + timeout_s
    while (left := in_queue(ids)) != set():
        if time.time() > deadline:
            left = left or set(ids)
            raise UserError(f"jobs {' '.join(sorted(left))} were cancelled but are still in the queue "
                            f"after {timeout_s:.0f} s; wait until `squeue -j {','.join(ids)}` shows "
                            "none of them and try again")
        time.sleep(1.0)


def in_queue(ids: list[str]) -> set[str] | None:
    """Which of these jobs (array jobs by their id) squeue still lists; None when it cannot say."""
    try:
        res = subprocess.run(["squeue", "-h", "-j", ",".join(ids), "-o", "%F"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if res.returncode != 0:  # every id unknown is an error to squeue, and means none is queued
        return set() if "Invalid job id" in res.stderr else None
    return set(res.stdout.split()) & set(ids)
