"""A task's lease: the record, in the task's directory, of which job runs the task right now.

No action of the kit may run one task twice at once — two jobs training into one directory
overwrite each other's checkpoints. The launcher never submits a live task again (it asks the
scheduler first, jobs/scheduler.py), but a user's second `--resume`, a hand-made sbatch or a
requeue racing a resubmission can still start one. So every job takes its task's lease before it
does anything, and a job that finds the lease held by another *live* job exits at once, in one
line naming that job.

`lease-<stage>.json` (eval runs in the directory of the sft task it evaluates, hence the stage
in the name): {"job": SLURM job id (123 or array task 123_4) or null for the local executor,
"host", "pid", "start" (the pid's start time), "since", "heartbeat"}. Job, host, pid and start
time together name one process (pids repeat across hosts and pid namespaces). A thread beats
the heartbeat every HEARTBEAT_EVERY_S in every stage, so that a holder nobody can ask about is
judged by its age; every beat first checks that the lease is still ours — a job that finds it
taken (another job judged it gone) stops at once rather than run the task twice.

Whether a holder is live: the same job as ours is ours (a requeued job takes its lease back);
another SLURM job is live while the queue lists it, and has ended once the queue answers without
it — accounting or not (jobs/scheduler.py); a local holder is live while its process runs (same
host); where neither can be asked (the controller does not answer, another host), while its
heartbeat is younger than STALE_AFTER_S.

Several ranks (a multi-node task): rank 0 alone decides and writes its verdict
(`lease-<stage>.verdict.json`, for this job and attempt); the other ranks wait for it and follow
it, so that all ranks run or all exit, never half of them. No lock is held while the scheduler is
asked: the lock guards reading and writing the file, and a holder that changed meanwhile is
judged again.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock, Timeout

from jobs.manifest import process_start_time
from jobs.scheduler import age_s, ask
from nanochat.common import UserError, atomic_write_json, now_iso

HEARTBEAT_EVERY_S = 30.0
STALE_AFTER_S = 15 * 60.0  # a heartbeat this old, from a holder nobody can ask about: gone
VERDICT_WAIT_S = 600.0     # how long ranks other than 0 wait for rank 0's verdict
IDENTITY = ("job", "host", "pid", "start")


class TaskBusy(UserError):
    """Another live job holds the task's lease."""


class LeaseLost(UserError):
    """The lease this process held was taken by another."""


def this_job() -> str | None:
    """The SLURM job this process belongs to (array tasks as 123_4); None outside SLURM."""
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def _rank() -> int:
    return int(os.environ.get("SLURM_PROCID", os.environ.get("RANK", "0")))


def _attempt() -> str:
    """This job's attempt: a requeued job keeps its id and counts its restarts."""
    return f"{this_job()}#{os.environ.get('SLURM_RESTART_COUNT', '0')}"


def holder_alive(holder: dict) -> str | None:
    """Why another process's lease still holds ("job 123 is RUNNING"), or None when it does not."""
    job = holder.get("job")
    if job:
        if job == this_job():
            return None  # ours: this job was requeued (or is another rank of it)
        answer = ask([job], accounting_for=set())
        if answer.live(job):
            return f"job {job} is {answer.listed[job]['state']}"
        if answer.live(job) is False:
            return None  # the queue answered without it: it has ended (accounting or not)
    elif holder.get("host") == socket.gethostname():
        start = holder.get("start")
        alive = start is not None and process_start_time(int(holder.get("pid", -1))) == start
        return f"local process {holder.get('pid')} still runs it" if alive else None
    age = age_s(holder.get("heartbeat"))
    if age < STALE_AFTER_S:
        return f"{'job ' + job if job else 'process ' + str(holder.get('pid'))} on {holder.get('host')} " \
               f"beat {age:.0f} s ago"
    return None


def _same(a: dict | None, b: dict | None) -> bool:
    return bool(a) and bool(b) and all(a.get(k) == b.get(k) for k in IDENTITY)


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def _locked(path: Path):
    """The lock over one lease file: held only to read and write it (never across a scheduler
    call), so a short wait suffices."""
    return FileLock(str(path) + ".lock", timeout=60)


@dataclass
class Lease:
    path: Path
    record: dict
    last_beat: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def beat(self, force: bool = False) -> None:
        """Refresh the heartbeat (rank 0; at most every HEARTBEAT_EVERY_S unless `force`), after
        checking the lease is still ours: LeaseLost when another holder took it. An unwritable
        file never fails the task."""
        now = time.monotonic()
        if _rank() != 0 or (not force and now - self.last_beat < HEARTBEAT_EVERY_S):
            return
        self.last_beat = now
        try:
            with _locked(self.path):
                current = _read(self.path)
                if current is not None and not _same(current, self.record):
                    who = f"job {current.get('job')}" if current.get("job") else f"process {current.get('pid')}"
                    raise LeaseLost(f"the lease of {self.path.parent} was taken by {who} on {current.get('host')} "
                                    f"(since {current.get('since')}): this job stops so as not to run the task twice")
                self.record["heartbeat"] = now_iso()
                atomic_write_json(self.path, self.record)
        except (OSError, Timeout):
            pass

    def start_beating(self) -> None:
        """Beat from a thread, whatever the stage does (evaluation, a benchmark, discovery).
        A lost lease ends the process at once (exit 2): its work is another job's now."""
        if _rank() != 0 or self._thread is not None:
            return

        def loop():
            while not self._stop.wait(HEARTBEAT_EVERY_S):
                try:
                    self.beat(force=True)
                except LeaseLost as e:
                    print(f"error: {e}", file=sys.stderr, flush=True)
                    os._exit(2)

        self._thread = threading.Thread(target=loop, name="lease-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop beating; remove the lease if it is still this process's (job, host, pid, start)."""
        self._stop.set()
        if _rank() != 0:
            return
        try:
            with _locked(self.path):
                if _same(_read(self.path), self.record):
                    self.path.unlink()
        except (OSError, Timeout):
            pass


def acquire(task_dir: str | Path, stage: str, index: int) -> Lease:
    """Take the lease of `stage` task `index` in `task_dir`, or raise TaskBusy naming its holder.
    Rank 0 decides; other ranks follow its verdict (see the module docstring)."""
    path = Path(task_dir) / f"lease-{stage}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"job": this_job(), "stage": stage, "index": index, "host": socket.gethostname(),
          "pid": os.getpid(), "start": process_start_time(os.getpid()), "since": now_iso(), "heartbeat": now_iso()}
    verdict_path = Path(task_dir) / f"lease-{stage}.verdict.json"
    if _rank() != 0:  # (outside SLURM there is no job whose rank 0 could decide: rank 0 of torchrun)
        return _follow_verdict(path, verdict_path, me) if me["job"] else Lease(path, me)
    refusal = None
    try:
        for _ in range(5):  # a holder that changed while it was judged is judged again
            with _locked(path):
                holder = _read(path)
            why = holder_alive(holder) if holder and not _same(holder, me) else None  # no lock held
            with _locked(path):
                if _read(path) != holder:
                    continue
                if why:
                    mine = f"job {me['job']}" if me["job"] else f"process {me['pid']}"
                    refusal = (f"{stage} task {index} ({task_dir}) is already being run: {why} (lease "
                               f"taken {holder.get('since')}); {mine} exits without touching it. Cancel "
                               "one of them, or wait for that one to end")
                else:
                    atomic_write_json(path, me)
                break
        else:
            refusal = f"{stage} task {index} ({task_dir}): its lease kept changing hands; this job exits"
    except Timeout:
        refusal = f"{stage} task {index} ({task_dir}): its lease file stayed locked for 60 s; this job exits"
    if me["job"]:  # the other ranks of this job follow
        atomic_write_json(verdict_path, {"attempt": _attempt(), "refusal": refusal, "at": now_iso()})
    if refusal:
        raise TaskBusy(refusal)
    return Lease(path, me, time.monotonic())


def _follow_verdict(path: Path, verdict_path: Path, me: dict) -> Lease:
    deadline = time.monotonic() + VERDICT_WAIT_S
    pause = 0.2
    while time.monotonic() < deadline:
        verdict = _read(verdict_path)
        if verdict and verdict.get("attempt") == _attempt():
            if verdict.get("refusal"):
                raise TaskBusy(verdict["refusal"])
            return Lease(path, me, time.monotonic())
        time.sleep(pause)
        pause = min(pause * 1.5, 2.0)
    raise TaskBusy(f"rank {_rank()}: rank 0 of job {me['job']} gave no verdict on the lease of "
                   f"{path.parent} in {VERDICT_WAIT_S:.0f} s; this rank exits")
