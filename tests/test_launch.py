"""The launcher: plan, dry run, bad input, and the local executor running the plan for real.
(Against a real SLURM: tests/test_slurm.py.)"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jobs import launch
from jobs.plan import build_plan, grid_overrides, resolve_run_dir
from nanochat.common import UserError
from nanochat.recipe import load_recipe, recipe_from_dict

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def recipe_file(tiny_recipe, tmp_path):
    """The conftest tiny recipe as a YAML file, run_dir left to the launcher (output root/name)."""
    data = {k: v for k, v in tiny_recipe.items() if k != "run_dir"}
    data["name"] = "t"
    data["train"] = {**data["train"], "num_iterations": 4, "eval_every": 2}
    data["stages"] = ["train", "report"]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def launch_cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "jobs/launch.py", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_grid_is_one_training_task_per_combination():
    r = recipe_from_dict({"grid": {"train.seed": [1, 2, 3], "model.bigram_factor": [0, 5]}})
    combos = grid_overrides(r)
    assert len(combos) == 6 and combos[0] == ["train.seed=1", "model.bigram_factor=0"]
    plan = build_plan(r, Path("/tmp/x"))
    train = plan.stage("train")
    assert [t.index for t in train.tasks] == list(range(6))
    assert plan.stage("sweep").dependency == "aftercorr" and plan.stage("report").dependency == "afterany"
    assert plan.skipped == {"discover": "train.device_batch_size is fixed"}


def test_discover_stage_only_when_auto_and_not_cached():
    r = recipe_from_dict({"train": {"device_batch_size": "auto"}})
    assert build_plan(r, Path("/tmp/x"), discovery_cached=False).stages[0].name == "discover"
    cached = build_plan(r, Path("/tmp/x"), discovery_cached=True)
    assert cached.stages[0].name == "train" and cached.stages[0].after is None
    assert "cache" in cached.skipped["discover"]


def test_dry_run_prints_every_sbatch_script_and_submits_nothing(recipe_file, tmp_path):
    res = launch_cli(recipe_file, "--dry-run", "--output-root", tmp_path / "runs",
                     "stages=[train,sweep,report]", "grid={train.seed: [1, 2]}")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert out.count("#!/bin/bash") == 3
    assert "#SBATCH --array=0-1%" in out and "--signal=USR2@90" in out
    assert "aftercorr:<train job id>" in out and "afterany:<sweep job id>" in out
    assert "[1] train.seed=2" in out
    assert not (tmp_path / "runs").exists(), "a dry run writes nothing"


@pytest.mark.parametrize("override, expect", [
    ("model.dept=3", "did you mean 'model.depth'"),
    ("cluster.partition=debug; touch /tmp/pwned", "cluster.partition"),
    ("name=x;touch /tmp/pwned", "name"),
    ("run_dir=../../elsewhere", "outside the output root"),
    ("cluster.gpus_per_node=4", "legal device batch sizes: 1, 2"),
    ("grid={model.depht: [1, 2]}", "did you mean 'model.depth'"),
])
def test_bad_plans_are_one_line_and_submit_nothing(recipe_file, tmp_path, override, expect):
    Path("/tmp/pwned").unlink(missing_ok=True)
    res = launch_cli(recipe_file, override, "--output-root", tmp_path / "runs", "--executor", "local")
    assert res.returncode == 2, res.stdout + res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], res.stderr
    assert "Traceback" not in res.stderr
    assert not Path("/tmp/pwned").exists()
    assert not (tmp_path / "runs").exists()


def test_run_dir_must_stay_under_the_output_root(tmp_path):
    r = recipe_from_dict({"name": "a", "run_dir": str(tmp_path / "runs" / "a" / ".." / ".." / "b")})
    with pytest.raises(UserError, match="outside the output root"):
        resolve_run_dir(r, tmp_path / "runs")
    assert resolve_run_dir(recipe_from_dict({"name": "a"}), tmp_path / "runs") == (tmp_path / "runs" / "a").resolve()


def test_local_executor_runs_the_plan_and_refuses_to_rerun_silently(recipe_file, tmp_path, capsys):
    root = tmp_path / "runs"
    args = [str(recipe_file), "grid={train.seed: [1, 2]}", "--executor", "local", "--output-root", str(root)]
    assert launch.main(args) == 0
    run = root / "t"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["executor"] == "local" and manifest["git_commit"]
    states = {s: [t["state"] for t in v["tasks"]] for s, v in manifest["stages"].items()}
    assert states == {"train": ["COMPLETED", "COMPLETED"], "report": ["COMPLETED"]}
    # each task trained with its own grid values, in its own directory, from the run's recipe
    for i, seed in enumerate([1, 2]):
        task_recipe = load_recipe(run / "train" / f"{i:03d}" / "recipe.yaml")
        assert task_recipe.train.seed == seed
        assert (run / "train" / f"{i:03d}" / "checkpoints" / "step_000004").is_dir()
    report = (run / "report.md").read_text()
    assert "train.seed=1" in report and "train.seed=2" in report and (run / "curves.png").exists()
    assert (run / "results.csv").read_text().count("\n") == 3
    with pytest.raises(UserError, match="--resume"):
        launch.main(args)
    assert launch.main(args + ["--resume"]) == 0  # finished tasks are skipped
    assert launch.main(args + ["--force"]) == 0
    assert list(root.glob("t.old-*")), "--force keeps the previous run, moved aside"


def test_local_executor_cancels_dependents_of_a_failed_task(recipe_file, tmp_path):
    root = tmp_path / "runs"
    # model.vocab_size smaller than the tokenizer's: a user error inside the training job
    args = [str(recipe_file), "model.vocab_size=300", "stages=[train,sweep,report]",
            "--executor", "local", "--output-root", str(root)]
    assert launch.main(args) == 1
    manifest = json.loads((root / "t" / "manifest.json").read_text())
    assert manifest["stages"]["train"]["tasks"][0]["state"] == "FAILED"
    assert manifest["stages"]["sweep"]["tasks"][0]["state"] == "CANCELLED"
    assert manifest["stages"]["report"]["tasks"][0]["state"] == "COMPLETED"
    err = (root / "t" / "logs" / "train_0.err").read_text()
    assert "model.vocab_size 300 is smaller than the tokenizer's" in err
    status = subprocess.run([sys.executable, "jobs/status.py", str(root / "t")], cwd=REPO,
                            capture_output=True, text=True, timeout=60).stdout
    assert "FAILED" in status and "CANCELLED" in status and "smaller than the tokenizer's" in status


def test_discovery_runs_first_and_a_cache_hit_skips_it(recipe_file, tmp_path):
    """device_batch_size: auto → a discover stage (real CPU probes under a memory budget) whose
    cached answer training uses; the next launch finds the cache and runs no discovery."""
    root = tmp_path / "runs"
    args = [str(recipe_file), "stages=[discover,train,report]", "train.device_batch_size=auto", "discovery.memory_budget_gb=1.0",
            "discovery.max_batch_size=8", f"discovery.cache_dir={tmp_path / 'bs-cache'}",
            "--executor", "local", "--output-root", str(root)]
    assert launch.main(args) == 0
    manifest = json.loads((root / "t" / "manifest.json").read_text())
    assert list(manifest["stages"]) == ["discover", "train", "report"]
    found = json.loads((root / "t" / "discover" / "discovery.json").read_text())
    assert found["from_cache"] is False and found["batch_size"] in (1, 2, 4, 8)
    run_info = json.loads((root / "t" / "train" / "000" / "run.json").read_text())
    assert run_info["device_batch_size"] == found["batch_size"]
    assert launch.main(args + ["--force"]) == 0
    manifest = json.loads((root / "t" / "manifest.json").read_text())
    assert "discover" not in manifest["stages"] and "cache" in manifest["skipped"]["discover"]
