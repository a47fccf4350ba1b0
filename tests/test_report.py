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
    said = result_summary("discover", run / "discover" / "000")
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


def test_time_to_target_excludes_evaluation_and_ranks_grid_tasks(tiny_recipe, tmp_path):
    from nanochat.plots import read_jsonl
    recipe_file = tmp_path / "t.yaml"
    train = {**tiny_recipe["train"], "num_iterations": 12, "eval_every": 3}
    recipe_file.write_text(yaml.safe_dump({
        **tiny_recipe, "name": "t", "train": train, "stages": ["base", "report"],
        "grid": {"optim.matrix_lr": [0.002, 0.05]}, "report": {"targets": {"val_bpb": 0.0, "core": 0.5}}},
        sort_keys=False))
    run = tmp_path / "runs" / "t"
    recipe = load_recipe(recipe_file, [f"run_dir={run}"])
    run.mkdir(parents=True)
    save_resolved_recipe(recipe, run / "recipe.yaml")
    save_manifest(run, new_manifest(build_plan(recipe, run), "local"))
    for i in range(2):
        run_task(str(run), "base", i)
    progress = [read_jsonl(run / "base" / f"{i:03d}" / "progress.jsonl") for i in range(2)]
    for p in progress:
        train_s = [r["train_s"] for r in p if r["event"] == "train"]
        elapsed = [r["elapsed_s"] for r in p if r["event"] == "train"]
        assert train_s == sorted(train_s) and train_s[-1] < elapsed[-1], "evaluation time is not training time"
    # a target both reach, at different evaluations: the one reached first ranks first
    bpb = [{r["step"]: r["val_bpb"] for r in p if r["event"] == "eval"} for p in progress]
    target = max(bpb[0][12], bpb[1][12])
    firsts = [min(s for s, v in b.items() if v <= target) for b in bpb]
    recipe_file.write_text(recipe_file.read_text().replace("val_bpb: 0.0", f"val_bpb: {target}"))
    save_resolved_recipe(load_recipe(recipe_file, [f"run_dir={run}"]), run / "recipe.yaml")
    report = write_report(run).read_text()
    assert "## Time to target" in report and f"val_bpb ≤ {target}" in report
    # the cost per stage: a local run's wall time (a CPU run holds no GPU)
    cost = report.split("## Cost per stage")[1]
    assert "| base | 2 |" in cost and "| 0.0000 |" in cost and "| local wall time |" in cost
    rows = [ln for ln in report.split("## Time to target")[1].splitlines() if ln.startswith("| ") and "s (step" in ln]
    assert len(rows) == 2
    expect = []
    for i, p in enumerate(progress):
        e = next(r for r in p if r["event"] == "eval" and r["step"] == firsts[i])
        expect.append((e["train_s"], i, f"{e['train_s']:.1f} s (step {firsts[i]})"))
    expect.sort()
    for line, (_, i, cell) in zip(rows, expect):
        assert line.startswith(f"| {i} |") and cell in line and line.rstrip().endswith("not reached |"), line
