"""The run's manifest (`RUN_DIR/manifest.json`): the one record of what a launch planned and
submitted — git commit, executor, every stage's dependency, job id, and per task its grid
values, directories and state; who cancelled the run and when (`cancelled`), and the local
executor's process (`launcher`). The launcher writes it (atomically) before anything is
submitted and after every change; the jobs, `jobs/status.py` and the report read it here.
"""
from __future__ import annotations

import contextlib
import getpass
import json
import os
import socket
import sys
from pathlib import Path

import psutil
from filelock import FileLock, Timeout

from jobs.plan import Plan
from nanochat.checkpoint import LAUNCHER_MANIFEST
from nanochat.common import UserError, atomic_write_json, git_commit, now_iso

MANIFEST = LAUNCHER_MANIFEST  # named in nanochat/checkpoint.py: standalone training refuses such a directory
DONE, FAILED, CANCELLED = "COMPLETED", "FAILED", "CANCELLED"


def new_manifest(plan: Plan, executor: str) -> dict:
    return {"run_dir": str(plan.run_dir), "recipe": str(plan.run_dir / "recipe.yaml"),
            "git_commit": git_commit(), "created": now_iso(), "executor": executor,
            "skipped": plan.skipped,
            "stages": {s.name: {"after": s.after, "dependency": s.dependency, "job_id": None,
                                "tasks": [{"index": t.index, "overrides": t.overrides,
                                           "run_dir": t.run_dir, "recipe_run_dir": t.recipe_run_dir or t.run_dir,
                                           "job_id": None, "state": "PLANNED",
                                           **({"discover_task": t.discover_task}
                                              if t.discover_task is not None else {})}
                                          for t in s.tasks]}
                       for s in plan.stages}}


_LOCKS: dict[str, FileLock] = {}


class ReadOnlyRun(UserError):
    """The run directory can be read but not written (its lock file cannot be opened)."""


@contextlib.contextmanager
def manifest_lock(run_dir: Path, timeout_s: float = 60.0):
    """The lock every write of manifest.json holds (a file beside it), so that a refresh's read,
    update and write (jobs/scheduler.py) never interleaves with another writer. Reentrant in a
    process: one FileLock object per run directory (flock locks of two objects would deadlock)."""
    path = str(Path(run_dir).resolve() / f".{MANIFEST}.lock")
    lock = _LOCKS.setdefault(path, FileLock(path))
    try:
        lock.acquire(timeout=timeout_s)
    except OSError as e:  # a colleague's run, a read-only mount: the lock file can't be opened
        raise ReadOnlyRun(f"{Path(run_dir) / MANIFEST} can't be written here ({e.strerror or e}); "
                          "run this as the run's owner") from None
    except Timeout:
        raise UserError(f"{Path(run_dir) / MANIFEST} stayed locked for {timeout_s:.0f} s (another "
                        f"launch or status is writing it); try again, or delete .{MANIFEST}.lock "
                        "there if no such process runs") from None
    try:
        yield
    finally:
        lock.release()


class LaunchBusy(UserError):
    """Another launch of the same run directory is under way."""
    exit_code = 1


@contextlib.contextmanager
def launch_lock(run_dir: Path):
    """One launch at a time per run directory: an exclusive lock taken without waiting, beside the
    directory (so that --force, which moves the directory aside, keeps it). A second launch (a
    second terminal, a cron loop) exits at once naming the holder, having changed nothing — two
    launches would both submit, and the jobs of the one whose manifest write lost would be out of
    --cancel's reach."""
    run_dir = Path(run_dir).resolve()
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(run_dir.parent / f".{run_dir.name}.launch.lock"))
    holder_file = run_dir.parent / f".{run_dir.name}.launch.json"
    try:
        lock.acquire(timeout=0)
    except Timeout:
        try:
            holder = json.loads(holder_file.read_text())
            who = (f"pid {holder.get('pid')} on {holder.get('host')} ({holder.get('by')}, since "
                   f"{holder.get('since')}: {holder.get('argv')})")
        except (OSError, ValueError):
            who = "another process"
        raise LaunchBusy(f"{run_dir} is being launched by {who}; nothing was changed. Wait for "
                         "that launch to end, then try again") from None
    try:
        atomic_write_json(holder_file, {**launcher_record(), "by": getpass.getuser(), "since": now_iso(),
                                        "argv": " ".join(sys.argv)})
        yield
    finally:
        holder_file.unlink(missing_ok=True)
        lock.release()


class NothingQueued(UserError):
    """A launch failed, and made sure that nothing it submitted is queued."""


ORPHANS = "orphans.json"


def save_submitted(run_dir: Path, manifest: dict, jobs: list[str]) -> None:
    """Record jobs just submitted. The manifest must never lose them (out of --cancel's reach,
    and --resume would submit their tasks again): when it cannot be written, they go to
    RUN_DIR/orphans.json (no lock) and the error names them."""
    try:
        save_manifest(run_dir, manifest)
        return
    except (UserError, OSError) as e:
        why = str(e)
    path = Path(run_dir) / ORPHANS
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = []
    try:
        atomic_write_json(path, known + [{"jobs": jobs, "at": now_iso(), "why": why}])
        where = f"recorded in {path}"
    except OSError as e:
        where = f"and not in {path} either ({e})"
    raise UserError(f"submitted jobs {' '.join(jobs)} but could not record them in {Path(run_dir) / MANIFEST} "
                    f"({why}); they are {where}: cancel them with `scancel {' '.join(sorted({j.split('_')[0] for j in jobs}))}` "
                    "or let them run, and fix the manifest's lock or permissions before the next launch") from None


def save_manifest(run_dir: Path, manifest: dict) -> None:
    # `unreachable` (jobs/scheduler.py) describes one refresh's question, not the run
    record = {k: v for k, v in manifest.items() if k != "unreachable"}
    with manifest_lock(run_dir):
        atomic_write_json(Path(run_dir) / MANIFEST, record)


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


# --------------------------------------------------------------------------------------------
# Why a task was cancelled: the user (`jobs/status.py --cancel` records it here), or a task it
# waited for that ended badly (SLURM kills a job whose dependency can no longer be satisfied,
# `--kill-on-invalid-dep=yes`; the local executor never starts it).

ENDED_BADLY = {FAILED: "failed", "TIMEOUT": "timed out", "OUT_OF_MEMORY": "ran out of memory",
               "NODE_FAIL": "lost its node", "PREEMPTED": "was preempted", "BOOT_FAIL": "failed to boot",
               "DEADLINE": "missed its deadline"}


def record_cancel(run_dir: Path, by: str, jobs: list[str]) -> dict:
    """Note in the manifest who cancelled the run and when, before the jobs are cancelled (so
    that a cancelled job is never seen without its reason)."""
    manifest = read_manifest(run_dir)
    manifest["cancelled"] = {"by": by, "at": now_iso(), "jobs": jobs}
    save_manifest(run_dir, manifest)
    return manifest


def upstream_tasks(manifest: dict, stage: str, index: int) -> list[tuple[str, int]]:
    """The tasks whose failure cancels task `index` of `stage`: aftercorr pairs it with task
    `index` of each stage it waits for, afterok with every task of them; afterany runs whatever
    they did, so none."""
    info = manifest["stages"][stage]
    if info["dependency"] == "afterany":
        return []
    out = []
    for up in info["after"]:
        tasks = manifest["stages"][up]["tasks"]
        if info["dependency"] == "aftercorr":
            out += [(up, t["index"]) for t in tasks if t["index"] == index]
        else:
            out += [(up, t["index"]) for t in tasks]
    return out


def failed_dependency(manifest: dict, stage: str, index: int, state_of) -> str | None:
    """"base task 0 failed" when a task this one waits for ended badly — following cancelled
    upstream tasks back to the one that failed (eval waits for sft, which waited for base).
    `state_of(stage, index)` is a task's current state."""
    ups = upstream_tasks(manifest, stage, index)
    for up, j in ups:
        state = state_of(up, j)
        if state in ENDED_BADLY:
            return f"{up} task {j} {ENDED_BADLY[state]}"
    for up, j in ups:
        if state_of(up, j) == CANCELLED and (why := failed_dependency(manifest, up, j, state_of)):
            return why
    return None


def cancel_reason(manifest: dict, stage: str, index: int, state_of, cancelled_by: str = "") -> str:
    """Why a CANCELLED task ended, in words. `cancelled_by`: the uid SLURM names for a job
    someone cancelled ("CANCELLED by 1000"), if any."""
    if why := failed_dependency(manifest, stage, index, state_of):
        return f"cancelled: {why}"
    if rec := manifest.get("cancelled"):
        return f"cancelled by the user ({rec['by']}, {rec['at']})"
    if cancelled_by:
        return f"cancelled by uid {cancelled_by} (not through jobs/status.py --cancel)"
    return "cancelled (neither through jobs/status.py --cancel nor by a failed dependency)"


# --------------------------------------------------------------------------------------------
# The local executor's process: `jobs/status.py --cancel` stops a local run by signalling it.

def process_start_time(pid: int) -> str | None:
    """The process's start time (psutil: Linux and macOS): with the pid, it names one process,
    where a pid alone may have been reused. None once it has exited (a zombie whose parent has
    not yet reaped it has exited too)."""
    try:
        proc = psutil.Process(pid)
        return None if proc.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD) else f"{proc.create_time():.2f}"
    except (psutil.Error, ValueError):
        return None


def launcher_record() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "start": process_start_time(os.getpid())}


def launcher_alive(record: dict | None) -> bool:
    """Whether the launcher process a manifest names still runs (on this host)."""
    if not record or record.get("host") != socket.gethostname():
        return False
    start = process_start_time(record["pid"])
    return start is not None and start == record.get("start")
