"""The kit on a cluster as harsh as real sites (slurm/local-cluster.sh --profile harsh, started
by the `harsh_slurm` fixture beside the default cluster): no accounting, job records purged after
5 s, and a training task really preempted by a higher-priority job."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from jobs.scheduler import FINAL, refresh
from test_lifecycle import RECIPE_FILE  # noqa: F401 (the recipe_file fixture reads it)

REPO = Path(__file__).resolve().parents[1]


def test_a_preempted_training_task_checkpoints_requeues_and_matches_an_uninterrupted_run(harsh_slurm, recipe_file,
                                                                                          tmp_path):
    """base trains on the preemptible partition; a job on the higher-priority partition asks for
    the whole node: SLURM preempts the task (SIGTERM, 30 s grace), it checkpoints, is requeued,
    resumes once the other job ends and completes with the losses of an uninterrupted run — on a
    cluster without accounting, whose queue forgets ended jobs within seconds."""
    assert subprocess.run(["sacct"], capture_output=True).returncode != 0, "the profile keeps no accounting"
    run = tmp_path / "runs" / "s"
    common = ["train.num_iterations=24", "train.eval_every=-1", "train.save_every=-1", "stages=[base]"]
    res = subprocess.run([sys.executable, "jobs/launch.py", recipe_file, *common, "--executor", "slurm",
                          "--no-prepare", "--output-root", tmp_path / "runs"], cwd=REPO, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "NANOCHAT_STEP_DELAY_S": "0.2"})
    assert res.returncode == 0, res.stderr
    job = json.loads((run / "manifest.json").read_text())["stages"]["base"]["job_id"]
    progress = run / "base" / "000" / "progress.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and not (progress.exists() and progress.read_text().count('"train"') >= 5):
        time.sleep(0.2)
    big = subprocess.run(["sbatch", "--parsable", "-p", "high", "-c", "16", "-o", "/dev/null", "--wrap", "sleep 5"],
                         capture_output=True, text=True, check=True).stdout.strip()
    try:
        deadline = time.time() + 400
        while time.time() < deadline:
            task = refresh(run)["stages"]["base"]["tasks"][0]
            if task["state"] in FINAL:
                break
            time.sleep(2)
    finally:
        subprocess.run(["scancel", job, big], check=False)
    log = "".join(p.read_text() for p in (run / "slurm").glob("*/*_log.*"))
    assert task["state"] == "COMPLETED", (task, log[-3000:])
    assert re.search(r"stopped at step \d+ on SIGTERM \(preempted: requeueing\)", log), log[-3000:]
    assert "resuming from" in log, log[-3000:]
    interrupted = [r for r in map(json.loads, progress.read_text().splitlines()) if r["event"] == "train"]
    from nanochat.recipe import load_recipe
    from nanochat.train import train_base
    straight = load_recipe(run / "recipe.yaml", common[:3] + [f"run_dir={tmp_path / 'straight'}"])
    train_base(straight)
    reference = [r for r in map(json.loads, (tmp_path / "straight" / "progress.jsonl").read_text().splitlines())
                 if r["event"] == "train"]
    assert [(r["step"], r["loss"]) for r in interrupted] == [(r["step"], r["loss"]) for r in reference]


def test_the_harsh_profile_binds_each_task_to_the_cpus_slurm_gave_it(harsh_slurm):
    """Real sites pin a task to its CPUs (task/affinity): a one-CPU step sees one CPU, as the
    kit's ranks do there (srun --cpus-per-task, jobs/plan.py). Where the container forbids
    binding, the profile runs task/none and said so when it started."""
    import pytest
    if "TaskPlugin=task/affinity" not in harsh_slurm.read_text():
        pytest.skip("this container does not let a process set its CPU affinity: the profile binds no CPUs")
    res = subprocess.run(["srun", "-n", "1", "-c", "1", "grep", "Cpus_allowed_list", "/proc/self/status"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    cpus = res.stdout.split()[-1]
    assert cpus.isdigit(), f"a one-CPU step may run on CPUs {cpus}"
