"""A run's lifecycle on a real SLURM (slurm/local-cluster.sh, started by the `slurm` fixture):
states from the scheduler, resume by run directory, rerunning stages, --force, partial
submissions, launching from anywhere and the code snapshot — and that no action of the kit ever
runs one task twice at once."""
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from jobs import launch
from jobs.executors import select_tasks
from jobs.lease import TaskBusy, acquire
from jobs.manifest import new_manifest, save_manifest
from jobs.plan import build_plan
from jobs.scheduler import LIVE, refresh
from nanochat.common import UserError
from nanochat.recipe import load_recipe
from test_slurm import wait_until_done

REPO = Path(__file__).resolve().parents[1]


RECIPE_FILE = {"name": "s", "train": {"eval_every": -1, "save_every": -1},  # (the recipe_file fixture)
               "cluster": {"gpus_per_node": 1, "cpus_per_task": 1, "time_min": 10}}


def run_launch(*args, cwd=REPO, script=REPO / "jobs" / "launch.py", timeout=180, stdin=None):
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "sl0"}  # the veth both local nodes share (2-node jobs)
    return subprocess.run([sys.executable, str(script), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, stdin=stdin, env=env)


def manifest_of(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


def job_of(run: Path, stage: str, index: int = 0) -> str:
    return manifest_of(run)["stages"][stage]["tasks"][index]["job_id"]


def queued(job_ids: list[str]) -> set[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%F"], capture_output=True, text=True).stdout.split()
    return {j.split("_")[0] for j in job_ids} & set(out)


def wait_for_training(run: Path, index: int = 0, timeout_s: float = 120) -> None:
    progress = run / "base" / f"{index:03d}" / "progress.jsonl"
    deadline = time.time() + timeout_s
    while time.time() < deadline and not (progress.exists() and '"train"' in progress.read_text()):
        time.sleep(0.5)
    assert progress.exists(), refresh(run)


# --------------------------------------------------------------------------------------------
# Resume

def test_a_failed_and_a_cancelled_task_resume_alone(slurm, recipe_file, tmp_path):
    """Three base tasks one at a time: task 1 cancelled while it waits, task 2 fails (its
    directory is a file). `--resume RUN_DIR` resubmits those two and the report, not task 0."""
    run = tmp_path / "runs" / "s"
    (run / "base").mkdir(parents=True)
    (run / "base" / "002").write_text("in the way")  # task 2 cannot make its directory
    res = run_launch(recipe_file, "grid={train.seed: [1, 2, 3]}", "cluster.array_parallelism=1",
                     "--executor", "slurm", "--output-root", tmp_path / "runs")
    assert res.returncode == 0, res.stderr
    first = {i: job_of(run, "base", i) for i in range(3)}
    subprocess.run(["scancel", first[1]], check=True)  # still pending behind task 0 (%1)
    rows = {(r["stage"], r["task"]): r["state"] for r in wait_until_done(run)}
    assert rows == {("base", 0): "COMPLETED", ("base", 1): "CANCELLED", ("base", 2): "FAILED",
                    ("report", 0): "COMPLETED"}, rows
    (run / "base" / "002").unlink()
    res = run_launch("--resume", run, "--executor", "slurm")
    assert res.returncode == 0, res.stderr
    assert f"left alone: base task 0: COMPLETED (job {first[0]})" in res.stdout, res.stdout
    again = manifest_of(run)
    assert again["stages"]["base"]["tasks"][0]["job_id"] == first[0], "a completed task is not resubmitted"
    assert all(again["stages"]["base"]["tasks"][i]["job_id"] != first[i] for i in (1, 2))
    rows = {(r["stage"], r["task"]): r["state"] for r in wait_until_done(run)}
    assert set(rows.values()) == {"COMPLETED"}, rows
    assert [launch_["mode"] for launch_ in again["launches"]] == ["new", "resume"]


def test_only_eval_and_report_rerun_those_stages_alone(slurm, recipe_file, tmp_path):
    run = tmp_path / "runs" / "s"
    small_eval = ["eval.problems_per_task=2", "eval.hub_tasks=[]", "eval.max_new_tokens=4"]
    res = run_launch(recipe_file, "stages=[base,eval,report]", *small_eval, "--executor", "slurm",
                     "--output-root", tmp_path / "runs")
    assert res.returncode == 0, res.stderr
    assert {r["state"] for r in wait_until_done(run)} == {"COMPLETED"}
    before = {s: job_of(run, s) for s in ("base", "eval", "report")}
    scores = run / "base" / "000" / "eval.json"
    first_eval = scores.stat().st_mtime_ns
    res = run_launch("--resume", run, "--only", "eval,report", "--executor", "slurm")
    assert res.returncode == 0, res.stderr
    assert f"left alone: base task 0: COMPLETED, not rerun (--only eval,report)" in res.stdout, res.stdout
    assert job_of(run, "base") == before["base"], "base is not resubmitted"
    assert job_of(run, "eval") != before["eval"] and job_of(run, "report") != before["report"]
    assert {r["state"] for r in wait_until_done(run)} == {"COMPLETED"}
    assert scores.stat().st_mtime_ns > first_eval, "the eval task ran again"


def test_resume_and_a_second_job_never_run_a_live_task_twice(slurm, recipe_file, tmp_path):
    """While base task 0 trains on two nodes: `--resume` submits nothing, and a second job
    started on the same task by hand exits at once naming the first one."""
    run = tmp_path / "runs" / "s"
    res = run_launch(recipe_file, "train.num_iterations=100000", "cluster.nodes=2", "train.total_batch_size=1024",
                     "--executor", "slurm", "--output-root", tmp_path / "runs")
    assert res.returncode == 0, res.stderr
    base_job = job_of(run, "base")
    try:
        wait_for_training(run)
        assert json.loads((run / "base" / "000" / "run.json").read_text())["world_size"] == 2
        res = run_launch("--resume", run, "--executor", "slurm")
        assert res.returncode == 0, res.stderr
        assert f"left alone: base task 0: still RUNNING as job {base_job}; not submitted again" in res.stdout
        assert "nothing to submit" in res.stdout and job_of(run, "base") == base_job

        out = tmp_path / "second.out"
        second = subprocess.run(
            ["sbatch", "--parsable", f"--output={out}", f"--chdir={REPO}", "--wrap",
             f"{sys.executable} -m jobs.tasks {run} base 0"], capture_output=True, text=True, check=True).stdout.strip()
        deadline = time.time() + 60
        while time.time() < deadline and queued([second]):
            time.sleep(0.5)
        text = out.read_text()
        assert f"base task 0 ({run / 'base' / '000'}) is already being run: job {base_job} is RUNNING" in text, text
        assert "Traceback" not in text and len(text.strip().splitlines()) == 1, text
        assert refresh(run)["stages"]["base"]["tasks"][0]["state"] == "RUNNING", "the first one goes on"
    finally:
        subprocess.run(["scancel", base_job.split("_")[0], job_of(run, "report")], check=False)


def test_force_cancels_the_live_jobs_before_moving_the_run_aside(slurm, recipe_file, tmp_path):
    run = tmp_path / "runs" / "s"
    res = run_launch(recipe_file, "train.num_iterations=100000", "--executor", "slurm",
                     "--output-root", tmp_path / "runs")
    assert res.returncode == 0, res.stderr
    old = [job_of(run, "base"), job_of(run, "report")]
    wait_for_training(run)
    # not a terminal: without --yes nothing is cancelled and nothing moves
    res = run_launch(recipe_file, "--force", "--executor", "slurm", "--output-root", tmp_path / "runs",
                     stdin=subprocess.DEVNULL)
    assert res.returncode == 2 and "pass --yes" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert queued(old) == {j.split("_")[0] for j in old} and (run / "manifest.json").exists()
    res = run_launch(recipe_file, "train.num_iterations=4", "--force", "--yes", "--executor", "slurm",
                     "--output-root", tmp_path / "runs")
    assert res.returncode == 0, res.stderr
    assert "none is in the queue any more" in res.stdout, res.stdout
    assert not queued(old), "the old run's jobs left the queue before its directory moved"
    aside = list((tmp_path / "runs").glob("s.old-*"))
    assert len(aside) == 1 and manifest_of(aside[0])["cancelled"]["jobs"]
    assert {r["state"] for r in wait_until_done(run)} == {"COMPLETED"}
    # the old job wrote nothing into the new run: the new base task trained 4 steps only
    assert json.loads((run / "base" / "000" / "run.json").read_text())["num_iterations"] == 4


def test_a_refused_later_stage_leaves_nothing_queued(slurm, recipe_file, tmp_path):
    """discover (1 GPU) is accepted, base (16 GPUs per node on 8-GPU nodes) is refused: the
    discover job is cancelled and the error says so."""
    res = run_launch(recipe_file, "stages=[discover,base]", "train.device_batch_size=auto",
                     "cluster.gpus_per_node=16", "--executor", "slurm", "--output-root", tmp_path / "runs")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    line = res.stderr.strip()
    assert line.startswith("error: sbatch refused stage base") and len(line.splitlines()) == 1, line
    assert "cancelled what this launch had submitted (discover (job " in line, line
    discover_job = line.split("discover (job ")[1].split(")")[0]
    assert not queued([discover_job])
    assert not (tmp_path / "runs" / "s" / "manifest.json").exists(), "no run is left behind to --force"


# --------------------------------------------------------------------------------------------
# Launching from anywhere; the code snapshot

def test_a_launch_from_another_directory_completes(slurm, recipe_file, tmp_path, corpus):
    """From a scratch directory, with a recipe path relative to it: the jobs run from the
    snapshot and find the data where the relative path meant at launch."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    data = yaml.safe_load(recipe_file.read_text())
    os.symlink(data["data"]["data_dir"], scratch / "shards")
    data["data"]["data_dir"] = "shards"  # relative to the launch directory
    (scratch / "r.yaml").write_text(yaml.safe_dump(data))
    res = run_launch("r.yaml", "--executor", "slurm", cwd=scratch)
    assert res.returncode == 0, res.stderr
    run = scratch / "runs" / "s"
    assert f"follow it: python {REPO / 'jobs' / 'status.py'} runs/s" in res.stdout, res.stdout
    assert load_recipe(run / "recipe.yaml").data.data_dir == str(scratch / "shards")
    assert {r["state"] for r in wait_until_done(run)} == {"COMPLETED"}


def _copy_of_the_repo(dest: Path) -> Path:
    """The code as it is here (tracked and untracked files), committed in a repository of its own."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file() and not name.startswith(("tests/", "README")):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["init", "-q"], cwd=dest, check=True)
    subprocess.run(git + ["add", "-A"], cwd=dest, check=True)
    subprocess.run(git + ["commit", "-qm", "launch"], cwd=dest, check=True)
    return dest


def test_an_edit_after_submission_does_not_change_what_a_queued_job_runs(slurm, recipe_file, tmp_path):
    repo = _copy_of_the_repo(tmp_path / "repo")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    res = run_launch(recipe_file, "stages=[base]", "cluster.additional={begin: now+3600}", "--executor", "slurm",
                     "--output-root", tmp_path / "runs", script=repo / "jobs" / "launch.py", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    run = tmp_path / "runs" / "s"
    job = job_of(run, "base")
    train_py = repo / "nanochat" / "train.py"  # what a `git pull` could do while the job waits
    train_py.write_text(train_py.read_text().replace(
        "def train_base(", "raise SystemExit('edited after the launch')\n\n\ndef train_base(", 1))
    subprocess.run(["scontrol", "update", f"JobId={job.split('_')[0]}", "StartTime=now"], check=True)
    assert [r["state"] for r in wait_until_done(run)] == ["COMPLETED"]
    info = json.loads((run / "base" / "000" / "run.json").read_text())
    assert info["code"]["commit"] == commit and info["code"]["dirty"] is False, info["code"]
    assert Path(info["code"]["snapshot"]).parent == run / "code"
    assert manifest_of(run)["code"]["commit"] == commit


# --------------------------------------------------------------------------------------------
# The scheduler's truth

def _forgotten_run(tmp_path: Path, recipe_file: Path) -> Path:
    """A run whose three base tasks' jobs SLURM never knew (ids from another cluster, submitted an
    hour ago): task 0 left submitit's success pickle, task 1 started (a log) and left no result,
    task 2 never started."""
    run = tmp_path / "runs" / "s"
    recipe = load_recipe(recipe_file, ["grid={train.seed: [1, 2, 3]}", "stages=[base]", f"run_dir={run}"])
    manifest = new_manifest(build_plan(recipe, run), "slurm")
    for i, task in enumerate(manifest["stages"]["base"]["tasks"]):
        task.update(job_id=f"4_{i}", state="RUNNING" if i < 2 else "PENDING", submitted="2026-01-01T00:00:00+00:00")
    for i in (0, 1):
        (run / "slurm" / f"4_{i}").mkdir(parents=True)
        (run / "slurm" / f"4_{i}" / f"4_{i}_0_log.out").write_text("started\n")
    with open(run / "slurm" / "4_0" / "4_0_0_result.pkl", "wb") as f:
        pickle.dump(("success", {"step": 4}), f)
    save_manifest(run, manifest)
    return run


def test_watch_ends_when_the_scheduler_forgets_a_job(slurm, recipe_file, tmp_path):
    run = _forgotten_run(tmp_path, recipe_file)
    res = subprocess.run([sys.executable, "jobs/status.py", str(run), "--watch"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1, res.stdout + res.stderr  # ended, with a failure
    tasks = manifest_of(run)["stages"]["base"]["tasks"]
    assert [t["state"] for t in tasks] == ["COMPLETED", "FAILED", "CANCELLED"]
    assert tasks[0]["note"] == "SLURM no longer knows job 4_0; its result file says COMPLETED"
    assert tasks[1]["note"] == "SLURM no longer knows job 4_1, and it left no result"
    assert tasks[2]["note"] == "SLURM no longer knows job 4_2; it never started"
    assert "SLURM no longer knows job 4_1" in res.stdout


def test_resume_selects_what_is_neither_finished_nor_live():
    """The selection rule on its own: completed and live tasks stay, the rest and what depends
    on them reruns, and new jobs wait for the live ones they need."""
    m = {"stages": {
        "base": {"after": [], "dependency": "afterok", "tasks": [
            {"index": 0, "state": "COMPLETED", "job_id": "1_0"}, {"index": 1, "state": "RUNNING", "job_id": "1_1"},
            {"index": 2, "state": "FAILED", "job_id": "1_2"}]},
        "eval": {"after": ["base"], "dependency": "aftercorr", "tasks": [
            {"index": 0, "state": "COMPLETED", "job_id": "2_0"}, {"index": 1, "state": "PENDING", "job_id": "2_1"},
            {"index": 2, "state": "CANCELLED", "job_id": "2_2"}]},
        "report": {"after": ["base", "eval"], "dependency": "afterany", "tasks": [
            {"index": 0, "state": "COMPLETED", "job_id": "3"}]}}}
    sel = select_tasks(m, "resume")
    assert sel.tasks == {"base": [2], "eval": [2], "report": [0]}
    assert sel.waits == {"report": ["1_1", "2_1"]}, "eval task 2 waits for base task 2 alone"
    assert {"base task 1: still RUNNING as job 1_1; not submitted again", "base task 0: COMPLETED (job 1_0)"} \
        <= set(sel.skipped)
    with pytest.raises(UserError, match="still live: base task 1 .RUNNING as job 1_1"):
        select_tasks(m, "only", ["base"])
    assert select_tasks(m, "only", ["report"]).tasks == {"report": [0]}
    assert LIVE >= {"PENDING", "RUNNING", "REQUEUED"}


def test_a_second_lease_holder_is_refused_while_the_first_lives(tmp_path, monkeypatch):
    """In-process: this process holds the lease; a second taker (another "job") is refused
    naming it; once released, the task is free."""
    lease = acquire(tmp_path, "base", 0)
    monkeypatch.setenv("SLURM_JOB_ID", "999999")  # another job on this host, same live process
    with pytest.raises(TaskBusy, match=f"local process {os.getpid()} still runs it"):
        acquire(tmp_path, "base", 0)
    monkeypatch.delenv("SLURM_JOB_ID")
    lease.release()
    assert not (tmp_path / "lease-base.json").exists()
    acquire(tmp_path, "base", 0).release()


# --------------------------------------------------------------------------------------------
# Bad input: one line, nothing submitted, nothing half-written

def test_resume_of_a_directory_without_a_manifest_is_one_line(tmp_path):
    with pytest.raises(UserError, match="has no manifest.json: not a run directory made by jobs/launch.py"):
        launch.main(["--resume", str(tmp_path), "--executor", "local"])


def test_only_a_stage_the_run_never_had_is_one_line(recipe_file, tmp_path):
    root = tmp_path / "runs"
    assert launch.main([str(recipe_file), "--executor", "local", "--output-root", str(root), "--no-prepare"]) == 0
    before = (root / "s" / "manifest.json").read_text()
    with pytest.raises(UserError, match=r"--only kv_bench: this run has no such stage \(it has: base, report\)"):
        launch.main(["--resume", str(root / "s"), "--only", "kv_bench", "--executor", "local"])
    assert (root / "s" / "manifest.json").read_text() == before


def test_a_snapshot_that_cannot_be_written_submits_nothing(recipe_file, tmp_path):
    run = tmp_path / "runs" / "s"
    run.mkdir(parents=True)
    (run / "code").write_text("a file where the snapshots go")
    res = run_launch(recipe_file, "--executor", "local", "--output-root", tmp_path / "runs", "--no-prepare")
    assert res.returncode == 2 and "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "--no-snapshot" in res.stderr
    assert sorted(p.name for p in run.iterdir()) == ["code"], "nothing else was written"
