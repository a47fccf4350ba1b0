"""Checkpoint and requeue on a real SLURM: the warning signal sent to a whole job, and SLURM's own
signal before a real time limit. Apart from tests/test_slurm.py (same fixtures and helpers) so
that pytest-xdist's --dist loadfile runs these minutes of waiting beside the rest of the SLURM
tests instead of after them."""
import json
import os
import re
import subprocess
import sys

from nanochat import checkpoint as ckpt
from test_slurm import (RECIPE_FILE, REPO, assert_losses_equal_an_uninterrupted_run, attempts, launch,  # noqa: F401
                        scontrol_job, wait_for_train_records, wait_until_done)  # (RECIPE_FILE: the recipe_file fixture reads it)


def test_the_warning_signal_to_the_whole_job_checkpoints_requeues_and_resumes(slurm, recipe_file, tmp_path):
    """USR2 (what SLURM sends 90 s before the limit) sent to the whole job — `scancel --full`, the
    batch shell too, as some sites' preemption tools do — mid-run: checkpoint, requeue, resume,
    and the loss curve equals an uninterrupted run's.

    The batch shell must survive the signal (jobs/plan.py BATCH_SHELL_USR2_TRAP): bash's default
    for USR2 is to die (sacct: the batch step's ExitCode 0:12), the job then ends FAILED 0:12 and
    SLURM kills the training step, SIGKILL KillWait after a SIGTERM that submitit ignores. The
    task's checkpoint and requeue only survive if they land within KillWait (10 s on the local
    cluster; a tiny step takes milliseconds, and a d4 step of ~8 s still made it, 9 s after the
    signal; a longer step or checkpoint loses the job), so this test tells the two apart by the
    first attempt's batch step, not by the outcome alone."""
    run = tmp_path / "runs" / "s"
    common = ["train.num_iterations=150", "train.eval_every=50", "train.save_every=-1", "stages=[base]"]
    res = launch(recipe_file, *common, "--output-root", tmp_path / "runs")
    assert res.returncode == 0, res.stderr
    job = json.loads((run / "manifest.json").read_text())["stages"]["base"]["job_id"]
    progress = run / "base" / "000" / "progress.jsonl"
    wait_for_train_records(progress, 40, 120, poll_s=0.05)
    subprocess.run(["scancel", "--signal=USR2", "--full", job], check=True)
    rows = wait_until_done(run, 400)
    assert rows[0]["state"] == "COMPLETED"
    log = "".join(p.read_text() for p in (run / "slurm").glob("*/*_log.out"))
    assert "stopped at step" in log and "resuming from" in log, log[-3000:]
    first = attempts(job)
    assert first[0]["State"] == "REQUEUED", first
    batch = next(r for r in first if r["JobID"] == f"{job}.batch")
    assert batch["ExitCode"] != "0:12", f"the batch shell died of the warning signal: {first}"
    stopped = int(re.search(r"stopped at step (\d+)", log).group(1))
    assert 0 < stopped < 150, "the signal came mid-run"
    assert_losses_equal_an_uninterrupted_run(run, progress, common[:3], tmp_path / "straight")


def test_at_the_time_limit_training_checkpoints_and_requeues_until_its_cap(slurm, recipe_file, tmp_path):
    """A real time limit (2 min, the warning 60 s before it — slurmctld sends it on its 30 s timer
    up to 60 s early, so 30-60 s into each attempt, and ends the attempt at 2 min at the
    earliest; NANOCHAT_STEP_DELAY_S keeps the run slow and the CPUs idle): the first attempt is
    signalled by SLURM itself, checkpoints and
    requeues before the limit (REQUEUED, never TIMEOUT); the second resumes from that
    checkpoint, is signalled again, checkpoints, and — cluster.max_requeues=1 — fails with one
    line naming the cap instead of requeueing a third time. The jobs are submitted with
    --requeue (sites with JobRequeue=0 refuse `scontrol requeue` otherwise)."""
    run = tmp_path / "runs" / "s"
    res = subprocess.run(
        [sys.executable, "jobs/launch.py", recipe_file, "train.num_iterations=100000",
         "train.eval_every=-1", "train.save_every=-1", "train.train_log_every=50", "stages=[base]",
         "cluster.time_min=2", "cluster.signal_lead_s=60", "cluster.max_requeues=1",
         "--output-root", tmp_path / "runs", "--executor", "slurm"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "NANOCHAT_STEP_DELAY_S": "0.2"})
    assert res.returncode == 0, res.stderr
    job = json.loads((run / "manifest.json").read_text())["stages"]["base"]["job_id"]
    assert "Requeue=1" in scontrol_job(job)
    rows = wait_until_done(run, 600)
    log = "".join(p.read_text() for p in (run / "slurm").glob("*/*_log.*"))
    assert rows[0]["state"] == "FAILED", (rows, log[-3000:])
    stops = [int(k) for k in re.findall(r"stopped at step (\d+) on request", log)]
    assert len(stops) == 2 and 0 < stops[0] < stops[1], log[-3000:]
    assert "resuming from" in log and "after 1 requeue (cluster.max_requeues=1)" in log, log[-3000:]
    states = [r["State"] for r in attempts(job) if "." not in r["JobID"]]
    assert "REQUEUED" in states and "TIMEOUT" not in states, states
    assert [c.name for c in ckpt.list_checkpoints(run / "base" / "000")] == \
        [f"step_{stops[0]:06d}", f"step_{stops[1]:06d}"]
