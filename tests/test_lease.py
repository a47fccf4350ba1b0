"""A task's lease where sites differ (jobs/lease.py): no accounting, a controller that does not
answer, a holder that took the lease over, pids that repeat across hosts, and the ranks of a
multi-node task that must all follow one verdict — against the real local SLURM, with
misbehaving scheduler commands wrapped around its real ones (tests/scheduler_shims.py)."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs import lease as lease_module
from jobs.lease import LeaseLost, TaskBusy, acquire
from nanochat.common import atomic_write_json, now_iso
from scheduler_shims import scheduler_shims  # noqa: F401 (a fixture)
from test_scheduler import ended_in_accounting, sbatch

REPO = Path(__file__).resolve().parents[1]


def held_by(task_dir: Path, job: str, host: str = "node7", pid: int = 4242) -> None:
    """A lease another job took and beat just now."""
    atomic_write_json(task_dir / "lease-base.json",
                      {"job": job, "stage": "base", "index": 0, "host": host, "pid": pid, "start": "1.00",
                       "since": now_iso(), "heartbeat": now_iso()})


def test_without_accounting_a_holder_the_queue_no_longer_lists_has_ended(scheduler_shims, tmp_path):
    """The holder's job ended a moment ago (an OOM, a time-out, --cancel) and beat just before:
    with no accounting to ask, the queue's answer without it is enough — no 15-minute wait."""
    job = sbatch("true")
    ended_in_accounting(job)
    scheduler_shims.set("sacct", "fail")  # a site without accounting
    held_by(tmp_path, job)
    lease = acquire(tmp_path, "base", 0)
    assert json.loads((tmp_path / "lease-base.json").read_text())["pid"] == os.getpid()
    lease.release()


def test_while_the_controller_does_not_answer_a_fresh_heartbeat_holds(scheduler_shims, tmp_path):
    job = sbatch("true")
    ended_in_accounting(job)
    scheduler_shims.set("squeue", "fail")
    held_by(tmp_path, job)
    with pytest.raises(TaskBusy, match=rf"job {job} on node7 beat \d+ s ago"):
        acquire(tmp_path, "base", 0)


def test_a_beat_checks_the_lease_is_still_ours_and_a_release_names_host_pid_and_start(tmp_path):
    lease = acquire(tmp_path, "base", 0)
    lease.beat(force=True)  # ours: beats
    # the same pid on another host (pid namespaces repeat pids) took it over
    held_by(tmp_path, None, host="node7", pid=os.getpid())
    with pytest.raises(LeaseLost, match="taken by process .* on node7"):
        lease.beat(force=True)
    lease.release()
    assert json.loads((tmp_path / "lease-base.json").read_text())["host"] == "node7", "not ours to remove"


def test_every_stage_beats_from_a_thread(tmp_path, monkeypatch):
    monkeypatch.setattr(lease_module, "HEARTBEAT_EVERY_S", 0.1)
    lease = acquire(tmp_path, "eval", 0)
    first = json.loads((tmp_path / "lease-eval.json").read_text())["heartbeat"]
    lease.start_beating()
    time.sleep(1.5)  # nothing else runs: no loop beats, only the thread
    try:
        assert json.loads((tmp_path / "lease-eval.json").read_text())["heartbeat"] != first
    finally:
        lease.release()
    assert not (tmp_path / "lease-eval.json").exists()


def _rank(task_dir: Path, rank: int, job: str) -> subprocess.Popen:
    env = {**os.environ, "SLURM_JOB_ID": job, "SLURM_PROCID": str(rank), "SLURM_RESTART_COUNT": "0"}
    code = (f"from jobs.lease import acquire\nacquire({str(task_dir)!r}, 'base', 0)\nprint('runs')")
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_the_ranks_of_a_task_follow_rank_0s_one_verdict(slurm, tmp_path):
    """Rank 1 starts first and waits; rank 0 asks the scheduler (the holder's job is live) and
    refuses; rank 1 exits with the same line. Then, for a job whose lease is free, both run."""
    live = sbatch("sleep", "120")
    try:
        held_by(tmp_path, live)
        ranks = [_rank(tmp_path, 1, "9000001"), _rank(tmp_path, 0, "9000001")]
        outs = [p.communicate(timeout=60) for p in ranks]
        assert [p.returncode for p in ranks] == [1, 1], outs  # TaskBusy, raised as a bug would be here
        assert all(f"job {live} is " in err for _, err in outs), outs
    finally:
        subprocess.run(["scancel", live], check=False)
    (tmp_path / "lease-base.json").unlink()
    ranks = [_rank(tmp_path, 1, "9000002"), _rank(tmp_path, 0, "9000002")]
    outs = [p.communicate(timeout=60) for p in ranks]
    assert [o.strip() for o, _ in outs] == ["runs", "runs"], outs
    assert json.loads((tmp_path / "lease-base.json").read_text())["job"] == "9000002"
