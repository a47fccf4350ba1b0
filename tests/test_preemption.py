"""Preemption as sites do it (jobs/tasks.py, nanochat/trainer.py): SIGTERM with no warning
signal is a stop request that checkpoints; a failed `scontrol requeue` is one line, not a crash;
the kit counts its own requeues; a time-based checkpoint cadence bounds what a kill without
warning loses; the warning about the signal's lead counts evaluation time."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs import tasks
from nanochat import checkpoint as ckpt
from nanochat.common import UserError
from nanochat.recipe import recipe_from_dict
from nanochat.trainer import LoopSpec, lead_warning
from test_lifecycle import RECIPE_FILE  # noqa: F401 (the recipe_file fixture reads it)
from test_slurm import attempts

REPO = Path(__file__).resolve().parents[1]


def test_sigterm_checkpoints_and_exits_without_requeueing_itself(slurm, recipe_file, tmp_path):
    """Preemption with PreemptMode=REQUEUE/CANCEL and no user signal, or a scancel, sends the
    training step SIGTERM only (then SIGKILL): the loop checkpoints at the next step boundary and
    the job exits — never `scontrol requeue` (a cancelled job must stay cancelled; SLURM requeues
    a preempted one itself) — and a resume continues from that checkpoint."""
    run = tmp_path / "runs" / "s"
    env_delay = {**os.environ, "NANOCHAT_STEP_DELAY_S": "0.2"}  # a slow run, the CPUs idle
    res = subprocess.run([sys.executable, "jobs/launch.py", recipe_file, "train.num_iterations=100000",
                          "stages=[base]", "--executor", "slurm", "--no-prepare", "--output-root", tmp_path / "runs"],
                         cwd=REPO, capture_output=True, text=True, timeout=120, env=env_delay)
    assert res.returncode == 0, res.stderr
    job = json.loads((run / "manifest.json").read_text())["stages"]["base"]["job_id"]
    progress = run / "base" / "000" / "progress.jsonl"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (progress.exists() and progress.read_text().count('"train"') >= 5):
            time.sleep(0.2)
        subprocess.run(["scancel", "--signal=TERM", job], check=True)  # the steps only, as preemption does
        deadline = time.time() + 60
        while time.time() < deadline and subprocess.run(["squeue", "-h", "-j", job], capture_output=True,
                                                        text=True).stdout.strip():
            time.sleep(0.5)
    finally:
        subprocess.run(["scancel", job], check=False)
    log = "".join(p.read_text() for p in (run / "slurm").glob("*/*_log.*"))
    stopped = re.search(r"stopped at step (\d+) on SIGTERM", log)
    assert stopped, log[-3000:]
    assert [c.name for c in ckpt.list_checkpoints(run / "base" / "000")] == [f"step_{int(stopped.group(1)):06d}"]
    assert "REQUEUED" not in {r["State"] for r in attempts(job)}, attempts(job)


def test_a_refused_requeue_is_one_line_and_not_a_crash(slurm, monkeypatch, capsys):
    """`scontrol requeue` fails while SLURM requeues the job itself (or no longer knows it)."""
    monkeypatch.setenv("SLURM_JOB_ID", "4")  # no such job on the local cluster
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    tasks._requeue_self()
    err = capsys.readouterr().err
    assert err.startswith("scontrol requeue 4 failed (") and "the checkpoint is saved" in err, err
    assert len(err.strip().splitlines()) == 1


def test_the_kit_counts_its_own_requeues_not_slurms_restarts(tmp_path, monkeypatch):
    """SLURM_RESTART_COUNT also counts preemptions and node failures; the cap counts only the
    requeues the task asked for itself, per job (a --resume's new job starts again at 0)."""
    recipe = recipe_from_dict({"cluster": {"max_requeues": 2}})
    monkeypatch.setenv("SLURM_RESTART_COUNT", "7")  # preempted seven times: no reason to fail
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    for expected in (0, 1):
        done = tasks.count_requeue(tmp_path, "base")
        assert done == expected
        tasks.refuse_another_requeue(recipe, {"step": 10}, done)
    with pytest.raises(UserError, match=r"after 2 requeues \(cluster.max_requeues=2\)"):
        tasks.refuse_another_requeue(recipe, {"step": 10}, tasks.count_requeue(tmp_path, "base"))
    monkeypatch.setenv("SLURM_JOB_ID", "124")
    assert tasks.count_requeue(tmp_path, "base") == 0


def test_save_every_min_checkpoints_on_the_clock(tiny_recipe, tmp_path, monkeypatch):
    """train.save_every_min bounds the steps a kill without warning loses, whatever save_every is."""
    from nanochat.train import train_base
    monkeypatch.setenv("NANOCHAT_STEP_DELAY_S", "0.2")  # every step outlasts the cadence
    recipe = recipe_from_dict({**tiny_recipe, "train": {**tiny_recipe["train"], "num_iterations": 4,
                                                        "save_every": -1, "eval_every": -1,
                                                        "save_every_min": 0.002}})  # 0.12 s
    train_base(recipe)
    events = [json.loads(line) for line in (Path(recipe.run_dir) / "progress.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [1, 2, 3, 4]
    with pytest.raises(UserError, match="train.save_every_min"):
        recipe_from_dict({"train": {"save_every_min": 0}})


def test_the_lead_warning_counts_the_evaluation_a_stop_waits_for():
    spec = LoopSpec(num_steps=10, grad_accum=1, tokens_per_step=1, flops_per_token=1.0,
                    train=recipe_from_dict({}).train, optim=recipe_from_dict({}).optim, stop_lead_s=60)
    assert lead_warning(spec, checkpoint_s=5, step_s=1) is None
    warning = lead_warning(spec, checkpoint_s=5, step_s=1, eval_s=40)
    assert "an evaluation 40 s" in warning and "at least 94" in warning, warning
