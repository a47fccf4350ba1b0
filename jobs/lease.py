"""A task's lease: the record, in the task's directory, of which job runs the task right now.

No action of the kit may run one task twice at once — two jobs training into one directory
overwrite each other's checkpoints. The launcher never submits a live task again (it asks the
scheduler first, jobs/scheduler.py), but a user's second `--resume`, a hand-made sbatch or a
requeue racing a resubmission can still start one. So every job takes its task's lease before it
does anything, and a job that finds the lease held by another *live* job exits at once, in one
line naming that job.

`lease-<stage>.json` (eval runs in the directory of the sft task it evaluates, hence the stage
in the name): {"job": SLURM job id (123 or array task 123_4) or null for the local executor,
"host", "pid", "start" (the pid's start time: with the pid it names one process), "since",
"heartbeat"}. The heartbeat is refreshed from the training loop (at most every
HEARTBEAT_EVERY_S) so that a holder nobody can ask about is judged by its age.

Whether a holder is live: the same job as ours is ours (a requeued job takes its lease back);
another SLURM job is live while the scheduler says so (jobs/scheduler.py LIVE); a local holder is
live while its process runs (same host); where neither can be asked, while its heartbeat is
younger than STALE_AFTER_S.
"""
from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from jobs.manifest import process_start_time
from jobs.scheduler import LIVE, age_s, slurm_states
from nanochat.common import UserError, atomic_write_json, now_iso

HEARTBEAT_EVERY_S = 30.0
STALE_AFTER_S = 15 * 60.0  # a heartbeat this old, from a holder nobody can ask about: gone


class TaskBusy(UserError):
    """Another live job holds the task's lease."""


def this_job() -> str | None:
    """The SLURM job this process belongs to (array tasks as 123_4); None outside SLURM."""
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def _rank() -> int:
    return int(os.environ.get("SLURM_PROCID", os.environ.get("RANK", "0")))


def holder_alive(holder: dict) -> str | None:
    """Why another process's lease still holds ("job 123 is RUNNING"), or None when it does not."""
    job = holder.get("job")
    if job:
        if job == this_job():
            return None  # ours: this job was requeued (or is another rank of it)
        known = slurm_states([job]).get(job)
        if known is not None:
            return f"job {job} is {known['state']}" if known["state"] in LIVE else None
    elif holder.get("host") == socket.gethostname():
        start = holder.get("start")
        alive = start is not None and process_start_time(int(holder.get("pid", -1))) == start
        return f"local process {holder.get('pid')} still runs it" if alive else None
    age = age_s(holder.get("heartbeat"))
    if age < STALE_AFTER_S:
        return f"{'job ' + job if job else 'process ' + str(holder.get('pid'))} on {holder.get('host')} " \
               f"beat {age:.0f} s ago"
    return None


@dataclass
class Lease:
    path: Path
    record: dict
    last_beat: float = 0.0

    def beat(self) -> None:
        """Refresh the heartbeat (rank 0; at most every HEARTBEAT_EVERY_S; never fails the task)."""
        now = time.monotonic()
        if _rank() != 0 or now - self.last_beat < HEARTBEAT_EVERY_S:
            return
        self.last_beat = now
        self.record["heartbeat"] = now_iso()
        try:
            atomic_write_json(self.path, self.record)
        except OSError:
            pass

    def release(self) -> None:
        """Remove the lease if it is still this process's."""
        if _rank() != 0:
            return
        try:
            with FileLock(str(self.path) + ".lock", timeout=30):
                current = json.loads(self.path.read_text())
                if current.get("job") == self.record["job"] and current.get("pid") == self.record["pid"]:
                    self.path.unlink()
        except (OSError, ValueError):
            pass


def acquire(task_dir: str | Path, stage: str, index: int) -> Lease:
    """Take the lease of `stage` task `index` in `task_dir`, or raise TaskBusy naming its holder."""
    path = Path(task_dir) / f"lease-{stage}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"job": this_job(), "stage": stage, "index": index, "host": socket.gethostname(),
          "pid": os.getpid(), "start": process_start_time(os.getpid()), "since": now_iso(), "heartbeat": now_iso()}
    with FileLock(str(path) + ".lock", timeout=60):
        try:
            holder = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            holder = None
        if holder and (why := holder_alive(holder)):
            mine = f"job {me['job']}" if me["job"] else f"process {me['pid']}"
            raise TaskBusy(f"{stage} task {index} ({task_dir}) is already being run: {why} (lease "
                           f"taken {holder.get('since')}); {mine} exits without touching it. Cancel "
                           "one of them, or wait for that one to end")
        if _rank() == 0:
            atomic_write_json(path, me)
    return Lease(path, me, time.monotonic())
