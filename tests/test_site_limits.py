"""What a site's scheduler accepts (issue 27's "launches refused" and smaller items): a
per-stage partition for the CPU-only report, srun's own --cpus-per-task and
--kill-on-bad-exit, a dry run that shows the job submitit really submits, on the real local SLURM."""
import subprocess

import pytest

from jobs.plan import build_plan, slurm_parameters
from nanochat.common import UserError
from nanochat.recipe import load_recipe
from scheduler_shims import scheduler_shims  # noqa: F401 (a fixture)
from test_lifecycle import RECIPE_FILE, manifest_of, run_launch  # noqa: F401 (RECIPE_FILE: the recipe_file fixture reads it)


def test_the_report_goes_to_its_own_partition(slurm, recipe_file, tmp_path):
    """cluster.stage_partition: {report: debug} with the training on a100: sites whose GPU
    partition refuses CPU-only jobs get the report on a CPU partition."""
    run = tmp_path / "runs" / "s"
    res = run_launch(recipe_file, "cluster.partition=a100", "cluster.stage_partition={report: debug}",
                     "train.num_iterations=100000", "--executor", "slurm", "--no-prepare", "--no-snapshot",
                     "--output-root", tmp_path / "runs")
    assert res.returncode == 0, res.stderr
    jobs = {s: manifest_of(run)["stages"][s]["job_id"].split("_")[0] for s in ("base", "report")}
    try:
        parts = {s: subprocess.run(["squeue", "-h", "-j", j, "-o", "%P"], capture_output=True, text=True).stdout.split()
                 for s, j in jobs.items()}
        assert parts == {"base": ["a100"], "report": ["debug"]}, parts
    finally:
        subprocess.run(["scancel", *jobs.values()], check=False)
    with pytest.raises(UserError, match=r"cluster.stage_partition.reprot.*is not a stage"):
        load_recipe(recipe_file, ["cluster.stage_partition={reprot: debug}"])


def test_srun_gets_the_cpus_per_rank_and_ends_the_step_when_one_rank_exits(recipe_file, tmp_path):
    """SLURM >= 22.05 no longer passes sbatch's --cpus-per-task to srun; without
    --kill-on-bad-exit, the ranks of a task whose one rank exited hang until a time-out."""
    recipe = load_recipe(recipe_file, ["cluster.cpus_per_task=3", f"run_dir={tmp_path / 'r'}"])
    plan = build_plan(recipe, tmp_path / "r")
    for stage in plan.stages:
        srun = slurm_parameters(recipe, stage)["srun_args"]
        assert "--kill-on-bad-exit=1" in srun and f"--cpus-per-task={stage.cpus_per_task}" in srun, (stage.name, srun)


def test_the_dry_run_of_a_one_task_array_is_the_plain_job_submitit_submits(recipe_file, tmp_path):
    res = run_launch(recipe_file, "grid={train.seed: [1]}", "--dry-run", "--executor", "slurm", "--no-prepare",
                     "--output-root", tmp_path / "runs")
    assert res.returncode == 0, res.stderr
    assert "--array=" not in res.stdout and "/slurm/%j/%j_%t_log.out" in res.stdout, res.stdout


def test_status_names_the_release_of_a_held_job(slurm, recipe_file, tmp_path):
    """A held job ("launch failed requeued held", or held by hand) waits for a person forever:
    status says which command releases it."""
    import sys
    from pathlib import Path
    from test_scheduler import run_with
    job = subprocess.run(["sbatch", "--parsable", "--hold", "-o", "/dev/null", "-t", "5", "--wrap", "sleep 60"],
                         capture_output=True, text=True, check=True).stdout.strip()  # held from the start
    try:
        run = run_with(tmp_path, recipe_file, [(job, "PENDING")])
        res = subprocess.run([sys.executable, "jobs/status.py", str(run)], cwd=Path(__file__).parents[1],
                             capture_output=True, text=True, timeout=60)
        assert f"held until released — `scontrol release {job}`" in res.stdout, res.stdout
    finally:
        subprocess.run(["scancel", job], check=False)


def test_the_node_local_compile_cache_sheds_what_no_job_used_for_two_weeks_once_a_day(tmp_path):
    """Kept across jobs, the cache would grow without end (every recipe, torch and triton version
    leaves kernels): entries neither read nor written for 14 days go — looked for at most once a
    day per node (a job's start walks no cache the day's first job already walked), in the
    launcher's jobs and the sbatch scripts alike (one rule: nanochat/paths.py)."""
    import os
    import time
    from pathlib import Path
    from nanochat.paths import PRUNE_STAMP, compile_cache_env
    env = {**os.environ, "NANOCHAT_COMPILE_CACHE_ROOT": str(tmp_path), "USER": "alice"}
    root = tmp_path / "nanochat-compile-alice"
    month_ago = time.time() - 30 * 86400
    for how in ("python", "bash"):
        (root / "inductor").mkdir(parents=True, exist_ok=True)
        old, fresh = root / "inductor" / "old.so", root / "inductor" / "fresh.so"
        old.write_text("x")
        fresh.write_text("x")
        os.utime(old, (month_ago, month_ago))
        os.utime(fresh, (time.time() - 86400, month_ago))  # written long ago, used yesterday
        if (root / PRUNE_STAMP).exists():
            os.utime(root / PRUNE_STAMP, (month_ago, time.time() - 86400 - 60))  # the last walk: over a day ago
        if how == "python":
            compile_cache_env(env)
        else:
            subprocess.run(["bash", "-c", "source slurm/env.sh"], cwd=Path(__file__).parents[1], env=env, check=True)
        assert not old.exists() and fresh.exists(), how
        old.write_text("x")  # aged again: the next job the same day leaves it (no walk)
        os.utime(old, (month_ago, month_ago))
        compile_cache_env(env)
        assert old.exists(), how


def test_a_job_an_sbatch_queued_before_it_timed_out_is_found_by_its_comment_and_cancelled(scheduler_shims,
                                                                                          recipe_file, tmp_path):
    """sbatch queues base, then never answers (a reply lost on a busy controller): the launch gives
    up after its time-out (2 x 2 s here), finds the job by the launch's comment and cancels it,
    in one line. With squeue unreachable as well, the manifest stays and names the comment."""
    import re
    import time
    from test_lifecycle import queued
    from jobs.scheduler import tagged_jobs
    scheduler_shims.set("sbatch", "late")
    args = [recipe_file, "train.num_iterations=100000", "--executor", "slurm", "--no-prepare", "--no-snapshot",
            "--output-root", tmp_path / "runs"]
    start = time.monotonic()
    res = run_launch(*args)
    assert time.monotonic() - start < 60, "the launch waited for sbatch past its time-out"
    line = res.stderr.strip()
    assert res.returncode == 2 and len(line.splitlines()) == 1, res.stderr
    assert line.startswith("error: sbatch refused stage base: sbatch: error: no answer within 4 s"), line
    found = re.search(r"base \(job (\d+), queued although sbatch failed: found by the launch's comment\)", line)
    assert found, line
    assert not queued([found.group(1)]), "the job the late sbatch queued was left in the queue"
    assert not (tmp_path / "runs" / "s" / "manifest.json").exists()

    scheduler_shims.set("squeue", "fail")
    res = run_launch(*args)
    scheduler_shims.set("squeue", None)
    comment = manifest_of(tmp_path / "runs" / "s")["orphans"]["comment"]
    left = tagged_jobs(comment)
    subprocess.run(["scancel", *left], check=False)
    line = res.stderr.strip()
    assert res.returncode == 2 and len(line.splitlines()) == 1, res.stderr
    assert f"look for jobs with the comment {comment}" in line, line
    assert len(left) == 1, left  # the manifest's comment finds the job the launch could not


def test_a_launch_past_maxsubmitjobs_is_refused_before_anything_is_submitted(slurm, recipe_file, tmp_path):
    """A grid of 3 (base as one array, the report: 4 jobs) under a QOS allowing 2 queued jobs per
    user: refused in one line, nothing queued, no run directory; the dry run says how many jobs
    a launch queues at once. (The QOS is made for the test and removed: no other job uses it.)"""
    from jobs.preflight import submit_limits
    grid = "grid={train.seed: [1, 2, 3]}"
    res = run_launch(recipe_file, grid, "--dry-run", "--executor", "slurm", "--no-prepare",
                     "--output-root", tmp_path / "runs")
    assert res.returncode == 0 and "# would queue 4 jobs at once (2 submissions;" in res.stdout, res.stdout + res.stderr
    qos = f"nanochat-limit-{tmp_path.name[-12:]}".lower()
    made = subprocess.run(["sacctmgr", "-i", "add", "qos", qos, "MaxSubmitJobsPerUser=2"], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"this cluster keeps no accounting to hold a QOS: {made.stderr.strip()}")
    try:
        res = run_launch(recipe_file, grid, f"cluster.qos={qos}", "--executor", "slurm", "--no-prepare",
                         "--no-snapshot", "--output-root", tmp_path / "runs")
    finally:
        subprocess.run(["sacctmgr", "-i", "delete", "qos", qos], capture_output=True)
    line = res.stderr.strip()
    assert res.returncode == 2 and len(line.splitlines()) == 1, res.stderr
    assert line.startswith("error: this launch would queue 4 jobs") and f"QOS {qos} (MaxSubmitJobsPerUser) allows 2" \
        in line and line.endswith("nothing was submitted"), line
    assert not (tmp_path / "runs" / "s").exists()
    # an association's own limit, in sacctmgr's parsable format, binds only for its account
    assoc = "root||3||normal\nother||1||normal\n"
    assert submit_limits(assoc, "normal|\n", "root", set(), None) == [(3, "the association of account root")]
