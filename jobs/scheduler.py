"""The scheduler's truth in the manifest: `refresh(run_dir)` is the one function that brings
every task's state in `manifest.json` up to date, and everything that acts on a run's state —
`jobs/status.py` (and `--watch`), `jobs/launch.py --resume / --only / --force`, the report —
reads the manifest through it.

A question to the scheduler has three outcomes, never two (`ask`):
1. it answered and lists the job: squeue's state is the job's (one squeue call per refresh,
   filtered on the server: `-u` the run's submitter, or `-j` a single id — squeue loads the
   whole job table for `-j a,b,c`);
2. it answered without it: the job has ended, whatever accounting says (slurmdbd can miss a
   job's end and keep a "runaway" RUNNING record forever). Its final state comes from `sacct`
   (asked once, only for the jobs the queue no longer lists), and where accounting has no
   final record (no accounting on the site, a purged record) from the task's own files:
   submitit's result pickle (success → COMPLETED, error → FAILED), else its outputs
   (eval.json, a finished progress log, ...) → COMPLETED, else FAILED, or CANCELLED when it
   never started;
3. it could not answer (an error, a time-out, no squeue): nothing is settled and nothing is
   written; the manifest keeps its last known states, `manifest["unreachable"]` says
   `scheduler unreachable (squeue: <its message>)`, and whoever would act on the states
   (`--resume`, `--only`, `--force`) refuses (`refresh(..., strict=True)`).

States are SLURM's own names (`man squeue`, JOB STATE CODES). A local run's states are written by
its launcher process; while that process lives its manifest is the truth, and once it is gone
the tasks it left unfinished are settled from their files the same way.

The scheduler is asked with no lock held (a slow controller must not block the launcher's
writes); the answer is then applied under the manifest's lock (`manifest_lock`) to the manifest
as it is by then, to the tasks whose job is still the one asked about.
"""
from __future__ import annotations

import datetime
import getpass
import os
import pickle
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from jobs.manifest import (CANCELLED, DONE, FAILED, ReadOnlyRun, launcher_alive, manifest_lock, read_manifest,
                           save_manifest)
from jobs.progress import read_progress
from nanochat.common import UserError, now_iso

# SLURM job states (squeue/sacct names). LIVE: the job holds, or will hold, its task.
LIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING",
        "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD",
        "SPECIAL_EXIT"}
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
         "BOOT_FAIL", "DEADLINE", "REVOKED"}
# How long one scheduler command may take before it counts as not answering (a site's busy
# controller may need more: the environment variable sets it).
TIMEOUT_ENV = "NANOCHAT_SCHEDULER_TIMEOUT_S"


def timeout_s() -> float:
    try:
        return float(os.environ.get(TIMEOUT_ENV, "30"))
    except ValueError:
        return 30.0


class SchedulerUnreachable(UserError):
    """The scheduler could not say which jobs live; acting on the states now could run a task twice."""


@dataclass
class Reply:
    """A scheduler command's outcome: its stdout, or None and why it could not answer."""
    out: str | None
    error: str = ""


def run_command(cmd: list[str]) -> Reply:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s())
    except FileNotFoundError:
        return Reply(None, f"{cmd[0]} not found")
    except subprocess.TimeoutExpired:
        return Reply(None, f"no answer within {timeout_s():.0f} s")
    except OSError as e:
        return Reply(None, str(e))
    if res.returncode != 0:
        lines = res.stderr.strip().splitlines()
        return Reply(None, lines[-1] if lines else f"exit status {res.returncode}")
    return Reply(res.stdout)


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


@dataclass
class Answer:
    """What the scheduler said about some jobs (array tasks as 123_4): `listed`, the queue's
    jobs (squeue) → {state, elapsed, reason, cancelled_by}; `ended`, accounting's final record of
    jobs the queue no longer lists; `unreachable`, the line saying why it could not answer
    (then nothing else holds)."""
    asked: set[str] = field(default_factory=set)
    listed: dict[str, dict] = field(default_factory=dict)
    ended: dict[str, dict] = field(default_factory=dict)
    unreachable: str | None = None

    def live(self, job_id: str) -> bool | None:
        """Whether the job holds its task: None when the scheduler could not say."""
        if self.unreachable:
            return None
        return job_id in self.listed and self.listed[job_id]["state"] in LIVE


def queue_query(job_ids: list[str], users: list[str] | None = None) -> list[str]:
    """The one squeue command for these jobs: all jobs of the run's one submitter (`-u`: slurmctld
    filters by user itself), else the ids (`-j`; one id is a single-job query)."""
    fmt = ["-h", "-r", "-o", "%i|%T|%M|%r"]
    arrays = sorted({j.split("_")[0] for j in job_ids})
    if users and len(set(users)) == 1 and len(arrays) > 1:
        return ["squeue", *fmt, "-u", users[0]]
    return ["squeue", *fmt, "-j", ",".join(arrays)]


def ask(job_ids: list[str], users: list[str] | None = None, accounting_for: set[str] | None = None) -> Answer:
    """Ask the scheduler about these jobs: one squeue call, then one sacct call for the jobs of
    `accounting_for` (default: all asked) that the queue does not list. At most two calls."""
    answer = Answer(asked=set(job_ids))
    if not job_ids:
        return answer
    reply = run_command(queue_query(job_ids, users))
    if reply.out is None and "Invalid job id" in reply.error:
        reply = Reply("")  # squeue's way of saying that none of the ids is queued
    if reply.out is None:
        answer.unreachable = f"scheduler unreachable (squeue: {reply.error})"
        return answer
    for line in reply.out.splitlines():
        parts = line.split("|")
        if len(parts) == 4 and parts[0] in answer.asked | {j.split("_")[0] for j in answer.asked}:
            answer.listed[parts[0]] = {"state": parts[1], "elapsed": parts[2], "reason": parts[3], "cancelled_by": ""}
    gone = [j for j in job_ids if j not in answer.listed and (accounting_for is None or j in accounting_for)]
    if gone:
        answer.ended = accounting(gone)
    return answer


def accounting(job_ids: list[str]) -> dict[str, dict]:
    """sacct's final records of these jobs (none where the site keeps no accounting, or sacct fails).
    A record still LIVE is a runaway (the queue, asked first, no longer lists the job): left out."""
    ids = ",".join(sorted({j.split("_")[0] for j in job_ids}))
    out: dict[str, dict] = {}
    reply = run_command(["sacct", "-n", "-P", "-X", "-j", ids, "-o", "JobID,State,Elapsed,Reason"])
    for line in (reply.out or "").splitlines():
        parts = line.split("|")
        if len(parts) >= 3 and parts[1].split():
            words = parts[1].split()  # "CANCELLED by 1000"
            by = words[2] if len(words) == 3 and words[1] == "by" else ""
            for jid in _expand(parts[0]):
                if words[0] in FINAL:
                    out[jid] = {"state": words[0], "elapsed": parts[2],
                                "reason": parts[3] if len(parts) > 3 else "", "cancelled_by": by}
    return out


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


def _slurm_tasks(manifest: dict) -> list[tuple[str, dict]]:
    return [(name, t) for name, s in manifest["stages"].items() for t in s["tasks"] if t.get("job_id")]


def submitters(manifest: dict) -> list[str]:
    """The users who launched the run (its jobs are theirs)."""
    return sorted({launch["by"] for launch in manifest.get("launches", []) if launch.get("by")})


def ask_for(manifest: dict) -> Answer:
    """The scheduler's answer about a run's jobs: accounting asked only for tasks that have not ended
    (an ended task changes only when the queue lists its job again: a requeue)."""
    tasks = _slurm_tasks(manifest)
    open_ids = {t["job_id"] for _, t in tasks if t["state"] not in FINAL}
    if not open_ids:
        return Answer()  # every task has ended: nothing to ask
    return ask([t["job_id"] for _, t in tasks], submitters(manifest), accounting_for=open_ids)


def _apply_slurm(run_dir: Path, manifest: dict, answer: Answer) -> None:
    for name, task in _slurm_tasks(manifest):
        jid = task["job_id"]
        if jid not in answer.asked:
            continue  # submitted since the question was asked
        known = answer.listed.get(jid) or answer.ended.get(jid)
        if known:
            task.update(known)
            task.pop("note", None)
        elif task["state"] not in FINAL:
            task.update(settle(run_dir, name, task, f"SLURM no longer knows job {jid}"))


def _refresh_local(run_dir: Path, manifest: dict) -> None:
    if launcher_alive(manifest.get("launcher")):
        return  # the launcher writes its tasks' states itself
    for name, s in manifest["stages"].items():
        for task in s["tasks"]:
            if task["state"] not in FINAL and task["state"] != "PLANNED":
                task.update(settle(run_dir, name, task, "its local launcher is gone"))


def refresh(run_dir: Path, strict: bool = False) -> dict:
    """Bring every task's state in RUN_DIR/manifest.json up to date (see the module docstring),
    write it back atomically under the manifest lock, and return it. When the scheduler could not
    answer: the manifest as it was, with `unreachable` saying why — or, `strict`, a
    SchedulerUnreachable error (for whoever would act on the states)."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    answer = None
    if manifest.get("executor") == "slurm":
        answer = ask_for(manifest)  # no lock held while the scheduler thinks
        if answer.unreachable:
            if strict:
                raise SchedulerUnreachable(f"{answer.unreachable}: the run's job states are unknown, so "
                                           "nothing was changed; try again when squeue answers")
            manifest["unreachable"] = answer.unreachable
            return manifest
    def updated() -> tuple[dict, bool]:
        manifest = read_manifest(run_dir)
        before = repr(manifest["stages"])
        if answer is not None:
            _apply_slurm(run_dir, manifest, answer)
        else:
            _refresh_local(run_dir, manifest)
        changed = repr(manifest["stages"]) != before
        if changed:
            manifest["refreshed"] = now_iso()
        return manifest, changed

    try:
        with manifest_lock(run_dir):
            manifest, changed = updated()
            if changed:
                save_manifest(run_dir, manifest)
    except ReadOnlyRun:  # a read-only view of someone's run: the states are current, not written
        manifest, _ = updated()
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
    deadline, pause = time.time() + timeout_s, 1.0
    while (left := in_queue(ids)) != set():
        if time.time() > deadline:
            left = left or set(ids)
            raise UserError(f"jobs {' '.join(sorted(left))} were cancelled but are still in the queue "
                            f"after {timeout_s:.0f} s; wait until `squeue -j {','.join(ids)}` shows "
                            "none of them and try again")
        time.sleep(pause)
        pause = min(pause * 2, 10.0)  # the controller is busy stopping them: ask less and less often


def tagged_jobs(tag: str) -> list[str] | None:
    """The ids of this user's queued jobs whose comment is `tag` (a launch's own, jobs/executors.py):
    how a launch finds the job an sbatch that timed out (or failed) may have queued all the same.
    One squeue call, filtered by user on the server; None when squeue could not answer."""
    reply = run_command(["squeue", "-h", "-u", getpass.getuser(), "-o", "%F|%k"])
    if reply.out is None:
        return None
    return sorted({line.split("|", 1)[0] for line in reply.out.splitlines()
                   if line.partition("|")[2].strip() == tag}, key=int)


def in_queue(ids: list[str]) -> set[str] | None:
    """Which of these jobs (array jobs by their id) squeue still lists; None when it cannot say."""
    reply = run_command(["squeue", "-h", "-r", "-j", ",".join(sorted({i.split("_")[0] for i in ids})), "-o", "%F %i"])
    if reply.out is None:  # every id unknown is an error to squeue, and means none is queued
        return set() if "Invalid job id" in reply.error else None
    return set(reply.out.split()) & set(ids)  # (an array by its id, or one of its tasks as 123_4)
