"""The report says where each task's device batch came from: the discover job's answer, read
by the training task as a cache hit, with the cache file."""
import json

import yaml

from jobs.manifest import new_manifest, save_manifest
from jobs.plan import build_plan
from jobs.progress import result_summary
from jobs.report import write_report
from jobs.tasks import run_task
from nanochat.recipe import load_recipe, save_resolved_recipe


def test_report_shows_discoverys_answer_and_its_cache_file(tiny_recipe, tmp_path):
    recipe_file = tmp_path / "r.yaml"
    train = {**tiny_recipe["train"], "num_iterations": 3, "eval_every": -1, "device_batch_size": "auto"}
    recipe_file.write_text(yaml.safe_dump({
        **tiny_recipe, "name": "d", "train": train, "stages": ["discover", "base", "report"],
        "discovery": {"cache_dir": str(tmp_path / "bs"), "memory_budget_gb": 2.0, "max_batch_size": 8}}))
    run = tmp_path / "runs" / "d"
    recipe = load_recipe(recipe_file, [f"run_dir={run}"])
    plan = build_plan(recipe, run)
    assert [s.name for s in plan.stages] == ["discover", "base", "report"]
    run.mkdir(parents=True)
    save_resolved_recipe(recipe, run / "recipe.yaml")
    save_manifest(run, new_manifest(plan, "local"))
    found = run_task(str(run), "discover", 0)["base"]
    assert not found["from_cache"] and found["probes"] >= 1
    # what the local executor's end line and status show for the discover task
    said = result_summary("discover", run / "discover")
    assert said.startswith(f"base device batch {found['batch_size']} ({found['probes']} probes in ")
    assert found["cache_path"] in said
    run_task(str(run), "base", 0)
    base_run = json.loads((run / "base" / "000" / "run.json").read_text())
    assert base_run["discovery"]["from_cache"] and base_run["device_batch_size"] == found["batch_size"]
    report = write_report(run).read_text()
    assert "## Device batch size" in report
    line = next(ln for ln in report.splitlines() if ln.startswith("| 0 | base |"))
    assert f"| {found['batch_size']} |" in line
    assert f"cache hit; discovered by the discover job: {found['probes']} probes" in line
    assert f"`{found['cache_path']}`" in line
