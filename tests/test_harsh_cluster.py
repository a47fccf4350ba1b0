"""The kit on a cluster as harsh as real sites (slurm/local-cluster.sh --profile harsh, started
by the `harsh_slurm` fixture beside the default cluster): no accounting, job records purged after
5 s, and a training task really preempted by a higher-priority job."""
import json
import re
import subprocess
import time
from pathlib import Path

from jobs.scheduler import FINAL, refresh
from test_lifecycle import RECIPE_FILE  # noqa: F401 (the recipe_file fixture reads it)
from test_slurm import assert_losses_equal_an_uninterrupted_run, launch, wait_for_train_records

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
    res = launch(recipe_file, *common, "--no-prepare", "--output-root", tmp_path / "runs",
                 env={"NANOCHAT_STEP_DELAY_S": "0.2"})
    assert res.returncode == 0, res.stderr
    job = json.loads((run / "manifest.json").read_text())["stages"]["base"]["job_id"]
    progress = run / "base" / "000" / "progress.jsonl"
    wait_for_train_records(progress, 5, 180)
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
    assert_losses_equal_an_uninterrupted_run(run, progress, common[:3], tmp_path / "straight")
