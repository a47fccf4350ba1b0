"""The scheduler as real sites have it (jobs/scheduler.py, jobs/manifest.py): a controller that
does not answer (or hangs, or answers every other time), accounting that keeps a runaway RUNNING
record, two launches of one run at once, and the load one refresh puts on the controller — on the
real local SLURM, with misbehaving squeue/sacct wrapped around its real commands
(tests/scheduler_shims.py)."""
import getpass
import json
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs.executors import select_tasks
from jobs.manifest import launch_lock, new_manifest, save_manifest, save_submitted
from jobs.plan import build_plan
from jobs.scheduler import LIVE, SchedulerUnreachable, refresh
from nanochat.common import UserError
from nanochat.recipe import load_recipe, save_resolved_recipe
from scheduler_shims import ERROR, scheduler_shims  # noqa: F401 (a fixture)
from test_lifecycle import RECIPE_FILE, manifest_of, queued, run_launch  # noqa: F401 (RECIPE_FILE: the recipe_file fixture reads it)

REPO = Path(__file__).resolve().parents[1]


def sbatch(*wrap: str) -> str:
    """A real job of this test's own (squeue/sacct know it as any other)."""
    return subprocess.run(["sbatch", "--parsable", "-o", "/dev/null", "-t", "5", "--wrap", " ".join(wrap)],
                          capture_output=True, text=True, check=True).stdout.strip()


def ended_in_accounting(job: str, timeout_s: float = 60) -> str:
    """Wait until the (real) queue has let the job go and accounting holds its final state."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        out = subprocess.run(["sacct", "-n", "-P", "-X", "-j", job, "-o", "State"], capture_output=True,
                             text=True).stdout.split()
        if out and out[0] in ("COMPLETED", "FAILED") and not queued([job]):
            return out[0]
        time.sleep(0.5)
    raise AssertionError(f"job {job} did not end in {timeout_s} s")


def run_with(tmp_path: Path, recipe_file: Path, jobs: list[tuple[str, str]], launched_by: bool = True) -> Path:
    """A run directory (its recipe.yaml and manifest) whose base tasks are these (job id, state)
    pairs, submitted an hour ago."""
    run = tmp_path / "runs" / "s"
    seeds = ", ".join(str(i + 1) for i in range(len(jobs)))
    recipe = load_recipe(recipe_file, [f"grid={{train.seed: [{seeds}]}}", "stages=[base]", f"run_dir={run}"])
    run.mkdir(parents=True)
    save_resolved_recipe(recipe, run / "recipe.yaml")
    manifest = new_manifest(build_plan(recipe, run), "slurm")
    for task, (job, state) in zip(manifest["stages"]["base"]["tasks"], jobs):
        task.update(job_id=job, state=state, submitted="2026-01-01T00:00:00+00:00")
    if launched_by:
        manifest["launches"] = [{"at": "2026-01-01T00:00:00+00:00", "by": getpass.getuser(), "mode": "new"}]
    save_manifest(run, manifest)
    return run


# --------------------------------------------------------------------------------------------
# A controller that could not answer is not one that forgot the jobs

def test_an_unreachable_controller_settles_nothing_and_nothing_acts_on_it(scheduler_shims, recipe_file, tmp_path):
    """Jobs the real controller never knew (ids from another cluster) would be settled, were it
    asked; while squeue fails, nothing is: status says why and exits 1, --watch goes on, and
    --resume, --only and --force refuse in one line, changing nothing."""
    run = run_with(tmp_path, recipe_file, [("4_0", "RUNNING"), ("4_1", "PENDING")], launched_by=False)
    before = (run / "manifest.json").read_bytes()
    scheduler_shims.set("squeue", "fail")
    res = subprocess.run([sys.executable, "jobs/status.py", str(run)], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 1, res.stdout + res.stderr
    assert f"scheduler unreachable (squeue: {ERROR}): the states above are the last known ones" in res.stdout
    assert (run / "manifest.json").read_bytes() == before, "nothing settled, nothing written"
    with pytest.raises(subprocess.TimeoutExpired):  # no verdict: the watch does not end
        subprocess.run([sys.executable, "jobs/status.py", str(run), "--watch", "--every", "0.2"], cwd=REPO,
                       capture_output=True, text=True, timeout=4)
    for args in (["--resume", run], ["--only", "base", run], [recipe_file, "--force", "--yes", "--output-root",
                                                              tmp_path / "runs"]):
        res = run_launch(*args, "--executor", "slurm", "--no-prepare")
        line = res.stderr.strip()
        assert res.returncode == 2 and len(line.splitlines()) == 1, (args, res.stdout, res.stderr)
        assert line.startswith(f"error: scheduler unreachable (squeue: {ERROR})") and "nothing was changed" in line
        assert (run / "manifest.json").read_bytes() == before and not list(run.parent.glob("s.old-*"))

    scheduler_shims.set("squeue", "hang")  # past the time-out (2 s here) is no answer either
    with pytest.raises(SchedulerUnreachable, match=r"scheduler unreachable \(squeue: no answer within 2 s\)"):
        refresh(run, strict=True)
    assert refresh(run)["stages"]["base"]["tasks"][0]["state"] == "RUNNING"

    scheduler_shims.set("squeue", None)  # it answers: without them, so they have ended
    states = [t["state"] for t in refresh(run)["stages"]["base"]["tasks"]]
    assert states == ["CANCELLED", "CANCELLED"], "no log, no result: they never started"


def test_a_controller_that_fails_every_other_call_never_ends_a_live_job(scheduler_shims, recipe_file, tmp_path):
    job = sbatch("sleep", "120")
    try:
        run = run_with(tmp_path, recipe_file, [(job, "PENDING")])
        scheduler_shims.set("squeue", "alternate")
        scheduler_shims.set("sacct", "alternate")
        seen = [refresh(run)["stages"]["base"]["tasks"][0]["state"] for _ in range(4)]
        assert set(seen) <= LIVE, seen
        assert len(scheduler_shims.calls()) >= 4
    finally:
        subprocess.run(["scancel", job], check=False)


# --------------------------------------------------------------------------------------------
# squeue's silence outranks accounting

def test_a_runaway_accounting_record_does_not_keep_an_ended_job_live(scheduler_shims, recipe_file, tmp_path):
    """slurmdbd missed the job's end: sacct says RUNNING forever. The queue, which answered
    without the job, wins: the task is settled from its files, and a resume waits on nothing."""
    job = sbatch("true")
    assert ended_in_accounting(job) == "COMPLETED"
    run = run_with(tmp_path, recipe_file, [(job, "RUNNING")])
    (run / "slurm" / job).mkdir(parents=True)
    with open(run / "slurm" / job / f"{job}_0_result.pkl", "wb") as f:
        pickle.dump(("success", {"step": 4}), f)
    scheduler_shims.set("sacct", "runaway")
    out = subprocess.run(["sacct", "-n", "-P", "-X", "-j", job, "-o", "JobID,State"], capture_output=True,
                         text=True).stdout
    assert out.split() == [f"{job}|RUNNING"], "the shim keeps a runaway record"
    task = refresh(run)["stages"]["base"]["tasks"][0]
    assert task["state"] == "COMPLETED" and "its result file says COMPLETED" in task["note"], task
    assert select_tasks(manifest_of(run), "resume").waits == {}


# --------------------------------------------------------------------------------------------
# The load on the controller

def test_one_refresh_makes_at_most_two_scheduler_calls(scheduler_shims, recipe_file, tmp_path):
    """Three tasks, one live and two ended: one squeue call filtered by the run's user on the
    controller (never `-j a,b,c`, which loads the whole job table), and one sacct call for the
    ended jobs alone."""
    live, done, failed = sbatch("sleep", "120"), sbatch("true"), sbatch("false")
    try:
        ended_in_accounting(done), ended_in_accounting(failed)
        run = run_with(tmp_path, recipe_file, [(live, "PENDING"), (done, "RUNNING"), (failed, "RUNNING")])
        scheduler_shims.forget_calls()
        states = [t["state"] for t in refresh(run)["stages"]["base"]["tasks"]]
        assert states[0] in LIVE and states[1:] == ["COMPLETED", "FAILED"], states
        calls = scheduler_shims.calls()
        assert len(calls) <= 2, calls
        squeue = [c for c in calls if c[0] == "squeue"]
        assert len(squeue) == 1 and "-u" in squeue[0] and "-j" not in squeue[0], calls
        sacct = [c for c in calls if c[0] == "sacct"]
        assert len(sacct) == 1 and sacct[0][sacct[0].index("-j") + 1] == ",".join(sorted([done, failed])), calls
        scheduler_shims.forget_calls()
        refresh(run)
        assert [c[0] for c in scheduler_shims.calls()] == ["squeue"], "ended tasks are not asked about again"
    finally:
        subprocess.run(["scancel", live], check=False)


# --------------------------------------------------------------------------------------------
# One launch at a time; submitted jobs are never lost

def test_a_second_launch_of_a_run_names_the_first_and_changes_nothing(slurm, recipe_file, tmp_path):
    run = run_with(tmp_path, recipe_file, [("4_0", "FAILED")])
    before = (run / "manifest.json").read_bytes()
    with launch_lock(run):
        res = run_launch("--resume", run, "--executor", "slurm", "--no-prepare")
    line = res.stderr.strip()
    assert res.returncode == 1 and len(line.splitlines()) == 1, res.stdout + res.stderr
    assert line.startswith(f"error: {run} is being launched by pid ") and "nothing was changed" in line, line
    assert (run / "manifest.json").read_bytes() == before


def test_two_resumes_at_once_submit_once(slurm, recipe_file, tmp_path):
    run = run_with(tmp_path, recipe_file, [("4_0", "FAILED")])
    cmd = [sys.executable, str(REPO / "jobs" / "launch.py"), "--resume", str(run), "--executor", "slurm",
           "--no-prepare", "--no-snapshot"]
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    try:
        submitted = [o for o in outs if "submitted base" in o[1]]
        assert len(submitted) == 1, outs
        other = next(o for o in outs if o is not submitted[0])
        assert (other[0] == 1 and "is being launched by" in other[2]) or \
            (other[0] == 0 and "nothing to submit" in other[1]), other
        assert len(manifest_of(run)["launches"]) == 2, "the first launch's record and the resume's"
    finally:
        subprocess.run(["scancel", manifest_of(run)["stages"]["base"]["tasks"][0]["job_id"].split("_")[0]],
                       check=False)


def test_jobs_the_manifest_cannot_record_are_recorded_as_orphans_and_named(tmp_path):
    """After a submission, a manifest that cannot be written (here: its place is taken by a
    directory) loses no job: they go to orphans.json and the error names them."""
    (tmp_path / "manifest.json").mkdir()
    with pytest.raises(UserError, match=r"submitted jobs 123_0 123_1 but could not record them .*scancel 123"):
        save_submitted(tmp_path, {"stages": {}}, ["123_0", "123_1"])
    assert json.loads((tmp_path / "orphans.json").read_text())[0]["jobs"] == ["123_0", "123_1"]


# --------------------------------------------------------------------------------------------
# A resume replaces pending jobs whose dependencies it reruns

def test_resume_replaces_a_pending_report_whose_dependencies_rerun():
    m = {"stages": {
        "base": {"after": [], "dependency": "afterok", "tasks": [
            {"index": 0, "state": "COMPLETED", "job_id": "1_0"}, {"index": 1, "state": "FAILED", "job_id": "1_1"},
            {"index": 2, "state": "RUNNING", "job_id": "1_2"}]},
        "report": {"after": ["base"], "dependency": "afterany", "tasks": [
            {"index": 0, "state": "PENDING", "job_id": "3"}]}}}
    sel = select_tasks(m, "resume")
    assert sel.tasks == {"base": [1], "report": [0]} and sel.replace == ["3"]
    assert sel.waits == {"report": ["1_2"]}, "the new report waits for the running task too"


def test_a_resumed_run_reports_after_its_resubmitted_tasks(slurm, recipe_file, tmp_path):
    """base task 1 is cancelled while the report waits (held here, so that it cannot start
    meanwhile): the resume resubmits base task 1 and replaces the old report, whose dependency
    named only the old jobs, by one that waits for the new base job."""
    run = tmp_path / "runs" / "s"
    res = run_launch(recipe_file, "grid={train.seed: [1, 2]}", "train.num_iterations=100000", "--executor",
                     "slurm", "--no-prepare", "--no-snapshot", "--output-root", tmp_path / "runs")
    assert res.returncode == 0, res.stderr
    base, report = manifest_of(run)["stages"]["base"]["job_id"], manifest_of(run)["stages"]["report"]["job_id"]
    new = []
    try:
        subprocess.run(["scontrol", "hold", report], check=True)
        subprocess.run(["scancel", f"{base}_1"], check=True)
        deadline = time.time() + 60
        while time.time() < deadline and refresh(run)["stages"]["base"]["tasks"][1]["state"] in LIVE:
            time.sleep(0.5)
        res = run_launch("--resume", run, "--executor", "slurm", "--no-prepare", "--no-snapshot")
        assert res.returncode == 0, res.stderr
        assert f"cancelled pending jobs {report}" in res.stdout, res.stdout
        m = manifest_of(run)
        new = [m["stages"]["base"]["tasks"][1]["job_id"], m["stages"]["report"]["job_id"]]
        assert new[1] != report and not queued([report])
        shown = subprocess.run(["scontrol", "show", "job", new[1]], capture_output=True, text=True).stdout
        assert f"afterany:{new[0].split('_')[0]}" in shown and f"afterany:{base}_0" in shown, shown
    finally:
        subprocess.run(["scancel", base, report, *[j.split("_")[0] for j in new]], check=False)


# --------------------------------------------------------------------------------------------
# Cluster filesystems

def test_status_of_a_read_only_run_directory_shows_current_states(slurm, recipe_file, tmp_path):
    """A colleague's run (here: a read-only mount of it): status can't take the manifest's lock,
    and still shows the scheduler's current states, writing nothing."""
    run = run_with(tmp_path, recipe_file, [("4_0", "RUNNING")], launched_by=False)
    view = tmp_path / "view"
    view.mkdir()
    if subprocess.run(["mount", "--bind", str(run), str(view)], capture_output=True).returncode != 0:
        pytest.skip("no bind mounts here (needs root with CAP_SYS_ADMIN) to make a read-only run directory")
    try:
        assert subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], capture_output=True).returncode == 0
        res = subprocess.run([sys.executable, "jobs/status.py", str(view)], cwd=REPO, capture_output=True,
                             text=True, timeout=60)
        assert res.returncode == 0 and "Traceback" not in res.stderr, res.stdout + res.stderr
        assert "SLURM no longer knows job 4_0" in res.stdout, res.stdout
    finally:
        subprocess.run(["umount", str(view)], check=False)
    assert manifest_of(run)["stages"]["base"]["tasks"][0]["state"] == "RUNNING", "nothing written"


# --------------------------------------------------------------------------------------------
# A site without accounting

def test_without_accounting_a_run_completes_and_a_resume_submits_nothing(scheduler_shims, recipe_file, tmp_path):
    """sacct fails everywhere (the launcher, status, the jobs: AccountingStorageType=none): the
    queue's answer and the tasks' files are enough — the run completes, status is right, and a
    resume submits nothing twice."""
    scheduler_shims.set("sacct", "fail")
    run = tmp_path / "runs" / "s"
    res = run_launch(recipe_file, "--executor", "slurm", "--no-prepare", "--no-snapshot",
                     "--output-root", tmp_path / "runs")
    assert res.returncode == 0, res.stderr
    deadline = time.time() + 300
    while time.time() < deadline and not all(t["state"] not in LIVE for s in refresh(run)["stages"].values()
                                             for t in s["tasks"]):
        time.sleep(2)
    states = {name: [t["state"] for t in s["tasks"]] for name, s in manifest_of(run)["stages"].items()}
    assert states == {"base": ["COMPLETED"], "report": ["COMPLETED"]}, (states, manifest_of(run))
    res = run_launch("--resume", run, "--executor", "slurm", "--no-prepare", "--no-snapshot")
    assert res.returncode == 0 and "nothing to submit" in res.stdout, res.stdout + res.stderr
    res = subprocess.run([sys.executable, "jobs/status.py", str(run)], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0 and "unreachable" not in res.stdout, res.stdout
    assert any(c[0] == "sacct" for c in scheduler_shims.calls()), "accounting was asked, and failed"
