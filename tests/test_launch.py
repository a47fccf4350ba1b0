"""The launcher: plan, dry run, bad input, and the local executor running the plan for real.
(Against a real SLURM: tests/test_slurm.py.)"""
import datetime
import difflib
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from jobs import launch
from jobs import manifest as run_manifest
from jobs.plan import build_plan, grid_overrides, resolve_run_dir
from jobs.report import write_report
from nanochat.common import UserError
from jobs.plan import guarded_setup
from nanochat.recipe import load_recipe, recipe_from_dict

REPO = Path(__file__).resolve().parents[1]


def launch_cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "jobs/launch.py", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_grid_is_one_training_task_per_combination():
    r = recipe_from_dict({"grid": {"train.seed": [1, 2, 3], "model.bigram_factor": [0, 5]}})
    combos = grid_overrides(r)
    assert len(combos) == 6 and combos[0] == ["train.seed=1", "model.bigram_factor=0"]
    plan = build_plan(r, Path("/tmp/x"))
    base = plan.stage("base")
    assert [t.index for t in base.tasks] == list(range(6))
    assert plan.stage("kv_bench").dependency == "aftercorr" and plan.stage("report").dependency == "afterany"
    assert plan.skipped == {"discover": "train.device_batch_size is fixed"}


def test_discover_stage_only_when_auto_and_not_cached():
    r = recipe_from_dict({"train": {"device_batch_size": "auto"}})
    assert build_plan(r, Path("/tmp/x"), discovery_cached=False).stages[0].name == "discover"
    cached = build_plan(r, Path("/tmp/x"), discovery_cached=True)
    assert cached.stages[0].name == "base" and cached.stages[0].after == []
    assert "cache" in cached.skipped["discover"]


def test_discover_is_one_task_per_memory_key_of_the_grid():
    """A grid over depth: one discover task per depth, run with that depth, and each training
    task names the discover task of its key (in the plan and the manifest). A grid over learning
    rates and betas: one discover task for all. Keys the cache holds get none."""
    auto = {"train": {"device_batch_size": "auto"}, "stages": ["discover", "base", "sft", "report"],
            "sft": {"device_batch_size": "auto"}}
    r = recipe_from_dict({**auto, "grid": {"model.depth": [2, 4], "train.seed": [1, 2]}})
    plan = build_plan(r, Path("/tmp/x"))
    disc = plan.stage("discover")
    assert [(t.index, t.overrides, t.run_dir) for t in disc.tasks] == [
        (0, ["model.depth=2", "train.seed=1"], "/tmp/x/discover/000"),
        (1, ["model.depth=4", "train.seed=1"], "/tmp/x/discover/001")]
    for stage in ("base", "sft"):
        assert [(t.overrides[0], t.discover_task) for t in plan.stage(stage).tasks] == [
            ("model.depth=2", 0), ("model.depth=2", 0), ("model.depth=4", 1), ("model.depth=4", 1)]
    assert plan.stage("base").after == ["discover"] and plan.stage("base").dependency == "afterok"
    assert "task 0 for training task(s) 0, 1; task 1 for training task(s) 2, 3" in plan.reasons["discover"]
    entries = run_manifest.new_manifest(plan, "local")["stages"]
    assert [t["discover_task"] for t in entries["base"]["tasks"]] == [0, 0, 1, 1]
    assert all("discover_task" not in t for t in entries["discover"]["tasks"])
    # learning rates and betas change no memory: one discover task for the whole grid
    lr = recipe_from_dict({**auto, "grid": {"optim.matrix_lr": [0.01, 0.02, 0.04], "optim.adamw_roles.embedding.eps": [1e-10, 1e-8],
                                            "optim.x0_eps": [1e-10, 1e-9]}})  # an old name too
    plan = build_plan(lr, Path("/tmp/x"))
    assert len(plan.stage("discover").tasks) == 1
    assert {t.discover_task for t in plan.stage("base").tasks} == {0}
    # what the cache holds is not discovered again: only depth 4 is left
    plan = build_plan(r, Path("/tmp/x"), [True, True, False, False], "on this machine")
    assert [t.overrides for t in plan.stage("discover").tasks] == [["model.depth=4", "train.seed=1"]]
    assert [t.discover_task for t in plan.stage("base").tasks] == [None, None, 0, 0]
    assert plan.reasons["discover"].endswith("task(s) 0, 1 cached")
    plan = build_plan(r, Path("/tmp/x"), [True] * 4)
    assert plan.stage("discover") is None and "cache hit" in plan.skipped["discover"]


def test_the_cache_hit_decision_asks_for_every_grid_combination(tiny_recipe, tmp_path):
    """The recipe as written is cached, one of its grid's depths is not: discovery still runs,
    for that depth only (real CPU probes)."""
    from nanochat.batchsize.search import discover_for_recipe
    recipe = recipe_from_dict({**tiny_recipe, "stages": ["discover", "base", "report"],
                               "train": {**tiny_recipe["train"], "device_batch_size": "auto"},
                               "grid": {"model.depth": [2, 1]}, "cluster": {"gpus_per_node": 1},
                               "discovery": {"memory_budget_gb": 1.0, "max_batch_size": 8,
                                             "cache_dir": str(tmp_path / "bs-cache")}})
    discover_for_recipe(recipe, stage="base", world_size=1)  # depth 2, as written
    hits, where = launch.discovery_lookup(recipe)
    assert hits == [True, False] and "not cached yet" in where
    assert launch.discovery_cached(recipe) is False
    plan = build_plan(recipe, tmp_path / "run", hits, where)
    assert [t.overrides for t in plan.stage("discover").tasks] == [["model.depth=1"]]
    assert [t.discover_task for t in plan.stage("base").tasks] == [None, 0]


def test_every_depth_of_a_grid_trains_on_a_key_its_discover_task_probed(recipe_file, tmp_path):
    """The local executor runs a grid over depth: two discover tasks, one after the other (their
    probes measure this machine's memory), and each training task's device batch is a cache hit
    on the key its own discover task probed (before, the second depth probed inside training)."""
    root = tmp_path / "runs"
    assert launch.main([str(recipe_file), "grid={model.depth: [2, 1]}", "stages=[discover,base,report]",
                        "train.device_batch_size=auto", "discovery.memory_budget_gb=1.0",
                        "discovery.max_batch_size=8", f"discovery.cache_dir={tmp_path / 'bs'}",
                        "cluster.gpus_per_node=1", "--executor", "local", "--output-root", str(root)]) == 0
    run = root / "t"
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    disc = stages["discover"]["tasks"]
    assert [t["overrides"] for t in disc] == [["model.depth=2"], ["model.depth=1"]]
    assert [t["discover_task"] for t in stages["base"]["tasks"]] == [0, 1]
    started = [datetime.datetime.fromisoformat(t["submitted"]).timestamp() for t in disc]
    assert started[1] >= started[0] + disc[0]["elapsed_s"] - 1, "one discover task at a time"
    for i, depth in enumerate([2, 1]):
        found = json.loads((run / "discover" / f"{i:03d}" / "discovery.json").read_text())["base"]
        trained = json.loads((run / "base" / f"{i:03d}" / "run.json").read_text())
        assert trained["discovery"]["from_cache"] and trained["discovery"]["probes"] == 0, (depth, trained)
        assert trained["discovery"]["cache_path"] == found["cache_path"] and f"-d{depth}-" in found["cache_path"]


def test_stages_fan_out_sft_eval_after_base_and_report_after_all():
    r = recipe_from_dict({"stages": ["base", "sft", "eval", "kv_bench", "report"],
                          "grid": {"train.seed": [1, 2]}})
    plan = build_plan(r, Path("/tmp/x"))
    deps = {s.name: (s.dependency, s.after) for s in plan.stages}
    assert deps == {"base": ("afterok", []), "sft": ("aftercorr", ["base"]),
                    "eval": ("aftercorr", ["sft"]), "kv_bench": ("aftercorr", ["base"]),
                    "report": ("afterany", ["base", "sft", "eval", "kv_bench"])}
    base, sft, ev = plan.stage("base"), plan.stage("sft"), plan.stage("eval")
    # sft task i fine-tunes base task i, in its directory; eval evaluates sft task i's output
    assert [t.run_dir for t in sft.tasks] == [f"{t.run_dir}/sft" for t in base.tasks]
    assert [t.recipe_run_dir for t in sft.tasks] == [t.run_dir for t in base.tasks]
    assert [t.run_dir for t in ev.tasks] == [t.run_dir for t in sft.tasks]
    assert sft.checkpointable and (sft.nodes, sft.gpus_per_node) == (base.nodes, base.gpus_per_node)
    assert ev.gpus_per_node == 1 and not ev.checkpointable
    # without sft, eval evaluates the base checkpoints
    r = recipe_from_dict({"stages": ["base", "eval", "report"]})
    ev = build_plan(r, Path("/tmp/x")).stage("eval")
    assert (ev.after, ev.tasks[0].run_dir) == (["base"], "/tmp/x/base/000")


def test_discover_is_skipped_only_when_every_auto_key_is_cached(tiny_recipe, tmp_path):
    """Base and SFT both `auto`: one cached key is not enough; the discover job finds both
    (real CPU probes), records both, and the next plan skips it."""
    from nanochat.batchsize.search import discover_for_recipe
    recipe = recipe_from_dict({**tiny_recipe, "run_dir": str(tmp_path / "run"),
                               "stages": ["discover", "base", "sft", "eval", "report"],
                               "train": {**tiny_recipe["train"], "device_batch_size": "auto"},
                               "sft": {"device_batch_size": "auto", "total_batch_size": 512},
                               "cluster": {"gpus_per_node": 1},
                               "discovery": {"memory_budget_gb": 1.0, "max_batch_size": 8,
                                             "cache_dir": str(tmp_path / "bs-cache")}})
    run = tmp_path / "run"
    assert launch.discovery_cached(recipe) is False
    discover_for_recipe(recipe, stage="base", world_size=1)
    assert launch.discovery_cached(recipe) is False, "the sft key is still missing"
    plan = build_plan(recipe, run, launch.discovery_cached(recipe))
    assert plan.stage("discover") and plan.stage("base").after == ["discover"]
    fixed_sft = recipe_from_dict({**tiny_recipe, "stages": recipe.stages, "sft": {"device_batch_size": 8},
                                  "train": {**tiny_recipe["train"], "device_batch_size": "auto"},
                                  "discovery": vars(recipe.discovery), "cluster": {"gpus_per_node": 1}})
    assert launch.discovery_cached(fixed_sft) is True, "only the base key is needed"
    # the discover task itself, from a run directory as the launcher writes it
    run.mkdir()
    from nanochat.recipe import save_resolved_recipe
    save_resolved_recipe(recipe, run / "recipe.yaml")
    run_manifest.save_manifest(run, run_manifest.new_manifest(plan, "local"))
    found = run_task_json(run, "discover", 0)
    assert set(found) == {"base", "sft"} and found["base"]["from_cache"] is True
    assert found["sft"]["from_cache"] is False and found["sft"]["batch_size"] >= 1
    assert json.loads((run / "discover" / "000" / "discovery.json").read_text()) == found
    assert launch.discovery_cached(recipe) is True
    plan = build_plan(recipe, run, launch.discovery_cached(recipe))
    assert plan.stage("discover") is None and "base and sft" in plan.skipped["discover"]
    assert plan.stage("base").after == []


def run_task_json(run_dir, stage, index) -> dict:
    res = subprocess.run([sys.executable, "-m", "jobs.tasks", str(run_dir), stage, str(index)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


FLIGHT_RECORDER_VARS = ("TORCH_NCCL_TRACE_BUFFER_SIZE", "TORCH_NCCL_DUMP_ON_TIMEOUT",
                        "TORCH_NCCL_DEBUG_INFO_TEMP_FILE", "TORCH_FR_BUFFER_SIZE", "TORCH_FR_DUMP_TEMP_FILE")


def test_jobs_turn_on_the_nccl_flight_recorder_into_the_task_directory(tiny_recipe, tmp_path, monkeypatch):
    """run_task sets the flight recorder's variables before the stage runs (before any process
    group), the dump prefix inside the task's own directory; what the user set stands; and
    flight_recorder_dumps lists the files the ranks wrote there, by rank."""
    from jobs import diagnostics, tasks
    from nanochat.recipe import save_resolved_recipe
    recipe = recipe_from_dict({**tiny_recipe, "stages": ["base", "sft"]})
    run = tmp_path / "runs" / "t"
    plan = build_plan(recipe, run)
    run.mkdir(parents=True)
    save_resolved_recipe(recipe, run / "recipe.yaml")
    run_manifest.save_manifest(run, run_manifest.new_manifest(plan, "local"))
    seen = {}
    for stage in ("base", "sft"):
        monkeypatch.setitem(tasks.RUNNERS, stage, lambda run_dir, index, stage=stage: seen.update(
            {stage: {k: os.environ.get(k) for k in FLIGHT_RECORDER_VARS}}) or {})
    for k in FLIGHT_RECORDER_VARS:
        monkeypatch.delenv(k, raising=False)
    tasks.run_task(str(run), "base", 0)
    base_dir = run / "base" / "000"
    assert seen["base"] == {"TORCH_NCCL_TRACE_BUFFER_SIZE": "2000", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
                            "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": str(base_dir / "nccl_trace_base_rank_"),
                            "TORCH_FR_BUFFER_SIZE": None, "TORCH_FR_DUMP_TEMP_FILE": None}
    # the user's own values (old or new names) stand; the sft task writes into its own directory
    for k in FLIGHT_RECORDER_VARS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("TORCH_NCCL_TRACE_BUFFER_SIZE", "50")
    monkeypatch.setenv("TORCH_FR_DUMP_TEMP_FILE", "/scratch/me/fr_")
    assert diagnostics.flight_recorder_env(base_dir / "sft", "sft") == {"TORCH_NCCL_DUMP_ON_TIMEOUT": "1"}
    monkeypatch.delenv("TORCH_FR_DUMP_TEMP_FILE")
    tasks.run_task(str(run), "sft", 0)
    assert seen["sft"]["TORCH_NCCL_TRACE_BUFFER_SIZE"] == "50"
    assert seen["sft"]["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] == str(base_dir / "sft" / "nccl_trace_sft_rank_")
    # the dumps: one file per rank (prefix + rank), found in rank order; nothing else matches
    assert diagnostics.flight_recorder_dumps(base_dir) == [] and diagnostics.flight_recorder_dumps(tmp_path / "none") == []
    (base_dir / "sft").mkdir(parents=True, exist_ok=True)  # (the sft task took its lease there)
    for name in ("nccl_trace_base_rank_10", "nccl_trace_base_rank_2", "nccl_trace_base_rank_0",
                 "nccl_trace_base_rank_x", "progress.jsonl", "sft/nccl_trace_sft_rank_0"):
        (base_dir / name).write_bytes(b"\x80")
    assert diagnostics.flight_recorder_dumps(base_dir) == [base_dir / f"nccl_trace_base_rank_{r}" for r in (0, 2, 10)]
    assert diagnostics.flight_recorder_dumps(base_dir / "sft") == [base_dir / "sft" / "nccl_trace_sft_rank_0"]


def test_dry_run_prints_every_sbatch_script_and_submits_nothing(recipe_file, tmp_path):
    res = launch_cli(recipe_file, "--dry-run", "--output-root", tmp_path / "runs",
                     "stages=[base,kv_bench,report]", "grid={train.seed: [1, 2]}")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert out.count("#!/bin/bash") == 3
    assert "#SBATCH --array=0-1%" in out and "--signal=USR2@300" in out and "#SBATCH --requeue" in out
    assert "aftercorr:<base job id>" in out and "afterany:<base job id>:<kv_bench job id>" in out
    assert "[1] train.seed=2" in out
    assert not (tmp_path / "runs").exists(), "a dry run writes nothing"


def test_dry_run_of_every_stage_shows_the_fan_out(recipe_file, tmp_path):
    res = launch_cli(recipe_file, "--dry-run", "--output-root", tmp_path / "runs", "train.device_batch_size=auto",
                     f"discovery.cache_dir={tmp_path / 'empty-cache'}",
                     "stages=[discover,base,sft,eval,kv_bench,report]", "grid={train.seed: [1, 2]}")
    assert res.returncode == 0, res.stderr
    scripts = dict(part.split("\n", 1) for part in res.stdout.split("# ===== stage ")[1:])
    deps = {head.split(":")[0]: next((ln.split("=", 1)[1].strip("'") for ln in body.splitlines()
                                      if ln.startswith("#SBATCH --dependency=")), None)
            for head, body in scripts.items()}
    assert deps == {"discover": None, "base": "afterok:<discover job id>",
                    "sft": "aftercorr:<base job id>", "eval": "aftercorr:<sft job id>",
                    "kv_bench": "aftercorr:<base job id>",
                    "report": "afterany:<discover job id>:<base job id>:<sft job id>:<eval job id>:<kv_bench job id>"}
    assert "--signal=USR2@300" in scripts["sft: 2 task(s): [0] train.seed=1, [1] train.seed=2"]
    assert "#SBATCH --array=0-1%" in scripts["eval: 2 task(s): [0] train.seed=1, [1] train.seed=2"]


GOLDEN = Path(__file__).resolve().parent / "golden"
# every stage, a 2×2 grid, and each sbatch option a recipe can set
GOLDEN_RECIPE = {
    "name": "golden", "stages": ["discover", "base", "sft", "eval", "kv_bench", "report"],
    "grid": {"train.seed": [1, 2], "model.depth": [2, 4]},
    "model": {"depth": 2, "n_embd": 64, "n_head": 2, "sequence_len": 64},
    "train": {"total_batch_size": 512, "device_batch_size": "auto", "num_iterations": 20},
    "cluster": {"partition": "a100", "account": "myproj", "qos": "high", "constraint": "h100",
                "nodes": 2, "gpus_per_node": 4, "cpus_per_task": 8, "mem_gb": 64, "time": "2:00:00",
                "stage_time": {"sft": "0:45:00"}, "wckey": "proj", "setup": ["module load cuda/12.4"],
                "array_parallelism": 2, "additional": {"mail-type": "END", "exclusive": "user"}}}


def _normalise(text: str, replacements: dict[str, str]) -> str:
    for real, placeholder in replacements.items():
        text = text.replace(real, placeholder)
    return text


def test_dry_run_text_matches_the_golden_file(tmp_path, capsys, monkeypatch):
    """The exact text `python jobs/launch.py RECIPE --dry-run` prints for a fixed recipe: every
    stage's sbatch script (as submitit writes it), host paths replaced by placeholders, equals
    tests/golden/dry_run_every_stage.txt line for line. A change to any line — ours or a new
    submitit's — fails here; when it is meant, regenerate the file and review its diff:

        UPDATE_GOLDEN=1 python -m pytest -q tests/test_launch.py -k golden
    """
    recipe = tmp_path / "golden.yaml"
    # an empty batch-size cache: the discover stage is planned
    recipe.write_text(yaml.safe_dump({**GOLDEN_RECIPE, "discovery": {"cache_dir": str(tmp_path / "bs-cache")}},
                                     sort_keys=False))
    # as on a machine without SLURM: its partition, account, QOS and constraint are none of this
    # cluster's, and sbatch --test-only would (rightly) refuse them
    (tmp_path / "no-slurm").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "no-slurm"))
    assert launch.main([str(recipe), "--dry-run", "--output-root", str(tmp_path / "runs")]) == 0
    text = _normalise(capsys.readouterr().out, {
        shlex.quote(sys.executable): "<PYTHON>", str((tmp_path / "runs" / "golden").resolve()): "<RUN_DIR>",
        str(tmp_path.resolve()): "<TMP>", str(REPO): "<REPO>"})
    golden = GOLDEN / "dry_run_every_stage.txt"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(text)
    assert golden.exists(), f"{golden} is missing: run with UPDATE_GOLDEN=1 to write it"
    expected = golden.read_text()
    diff = "\n".join(difflib.unified_diff(expected.splitlines(), text.splitlines(), str(golden),
                                          "dry run now", lineterm="", n=1))
    assert text == expected, f"the dry run's text changed (UPDATE_GOLDEN=1 to accept):\n{diff}"
    # the fixed recipe reaches every stage and every option it sets
    assert text.count("#!/bin/bash") == 6 and "#SBATCH --array=0-3%2" in text
    assert all(opt in text for opt in ("--partition=a100", "--account=myproj", "--qos=high",
                                       "--constraint=h100", "--mail-type=END", "--exclusive=user"))
    assert str(tmp_path) not in text and sys.executable not in text


@pytest.mark.parametrize("override, expect", [
    ("model.dept=3", "did you mean 'model.depth'"),
    ("cluster.partition=debug; touch /tmp/pwned", "cluster.partition"),
    ("name=x;touch /tmp/pwned", "name"),
    ("run_dir=../../elsewhere", "outside the output root"),
    ("cluster.gpus_per_node=4", "legal device batch sizes: 1, 2"),
    ("grid={model.depht: [1, 2]}", "did you mean 'model.depth'"),
    ("stages=[train,report]", "write base instead"),
    ("stages=[sft,eval,report]", "sft without base needs sft.base_checkpoint"),
    ("stages=[eval,report]", "eval needs base or sft"),
    ("stages=[kv_bench]", "kv_bench needs base"),
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


def test_cluster_settings_reach_every_sbatch_script(recipe_file, tmp_path):
    """cluster.setup lines run before the run's own set-up, no --wckey unless asked (submitit's
    default `submitit` would be rejected where sites check wckeys), per-stage --time."""
    out = launch_cli(recipe_file, "stages=[base,kv_bench,report]", "cluster.time=1-00:00:00",
                     "cluster.stage_time={report: 0:02:00}", "cluster.setup=[module load cuda/12.4, source /s/venv/bin/activate]",
                     "--dry-run", "--no-prepare", "--output-root", tmp_path / "runs")
    assert out.returncode == 0, out.stderr
    scripts = {part.split(":")[0]: part for part in out.stdout.split("# ===== stage ")[1:]}
    assert "wckey" not in out.stdout
    assert {s: re.search(r"#SBATCH --time=(\d+)", t).group(1) for s, t in scripts.items()} == \
        {"base": "1440", "kv_bench": "60", "report": "2"}
    for text in scripts.values():
        setup = text.split("# setup\n")[1].split("\n\n")[0].splitlines()
        assert setup[:7] == guarded_setup(["module load cuda/12.4", "source /s/venv/bin/activate"]) + [setup[6]]
        assert setup[6].startswith("export PYTHONPATH="), "the run's code after the site's environment"
    out = launch_cli(recipe_file, "cluster.wckey=proj", "--dry-run", "--no-prepare", "--output-root", tmp_path / "runs")
    assert out.stdout.count("#SBATCH --wckey=proj") == out.stdout.count("# ===== stage ") == 2


def test_a_run_dir_under_the_cache_root_is_accepted(tmp_path, monkeypatch):
    """run_dir=/scratch/$USER/d16 with the caches under /scratch/$USER: accepted, as with NANOCHAT_HOME."""
    monkeypatch.delenv("NANOCHAT_HOME", raising=False)
    r = recipe_from_dict({"run_dir": str(tmp_path / "scratch" / "d16"), "cache_dir": str(tmp_path / "scratch" / "cache")})
    assert resolve_run_dir(r, tmp_path / "runs") == (tmp_path / "scratch" / "d16").resolve()
    r = recipe_from_dict({"run_dir": str(tmp_path / "elsewhere" / "d16"), "cache_dir": str(tmp_path / "scratch" / "cache")})
    with pytest.raises(UserError, match="outside the output root .* and the cache root"):
        resolve_run_dir(r, tmp_path / "runs")
    monkeypatch.setenv("NANOCHAT_HOME", str(tmp_path / "elsewhere"))
    assert resolve_run_dir(r, tmp_path / "runs") == (tmp_path / "elsewhere" / "d16").resolve()


def test_nanochat_home_holds_the_runs_and_the_caches(recipe_file, tmp_path):
    home = tmp_path / "home"
    out = subprocess.run([sys.executable, "jobs/launch.py", str(recipe_file), "--dry-run", "--no-prepare"],
                         cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "NANOCHAT_HOME": str(home)})
    assert out.returncode == 0, out.stderr
    assert f"--output={home.resolve()}/runs/t/slurm/" in out.stdout


def test_the_sbatch_scripts_run_the_recipes_setup_lines(tmp_path):
    """slurm/env.sh runs cluster.setup from the script's recipe (or run directory), as the launcher's jobs do."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"cluster": {"setup": ["export SITE_MODULE=cuda-12.4", "SITE_B=$SITE_MODULE-ok"]}}))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "recipe.yaml").write_text(recipe.read_text())
    for arg in (recipe, tmp_path / "run"):
        res = subprocess.run(["bash", "-c", 'set -euo pipefail; source slurm/env.sh "$@"; echo "$SITE_MODULE $SITE_B"',
                              "sbatch", str(arg), "train.num_iterations=5"], cwd=REPO, capture_output=True, text=True,
                             env={**os.environ, "SLURM_SUBMIT_DIR": str(REPO), "NANOCHAT_COMPILE_CACHE_ROOT": str(tmp_path)})
        assert res.returncode == 0 and res.stdout.split() == ["cuda-12.4", "cuda-12.4-ok"], res.stderr


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
    assert states == {"base": ["COMPLETED", "COMPLETED"], "report": ["COMPLETED"]}
    # each task trained with its own grid values, in its own directory, from the run's recipe
    for i, seed in enumerate([1, 2]):
        task_recipe = load_recipe(run / "base" / f"{i:03d}" / "recipe.yaml")
        assert task_recipe.train.seed == seed
        assert (run / "base" / f"{i:03d}" / "checkpoints" / "step_000004").is_dir()
    report = (run / "report.md").read_text()
    assert "train.seed=1" in report and "train.seed=2" in report and (run / "curves.png").exists()
    assert (run / "results.csv").read_text().count("\n") == 3
    with pytest.raises(UserError, match="--resume"):
        launch.main(args)
    assert launch.main(args + ["--resume"]) == 0  # finished tasks are skipped
    assert launch.main(args + ["--force"]) == 0
    assert list(root.glob("t.old-*")), "--force keeps the previous run, moved aside"


def test_slurm_leaves_the_tokenizer_to_the_jobs_and_the_local_executor_trains_it_here(recipe_file, tmp_path):
    """Under SLURM the login node prepares with --no-tokenizer (the first job trains it); the
    local executor's machine runs the jobs, so its launch still trains it while preparing — a
    tokenizer nobody trained yet (another vocabulary size), launched locally, end to end."""
    plan = build_plan(load_recipe(recipe_file), tmp_path / "x")
    assert all(c[-1] == "--no-tokenizer" for c in launch.prepare_commands(str(recipe_file), [], plan, "slurm"))
    assert not any("--no-tokenizer" in c for c in launch.prepare_commands(str(recipe_file), [], plan, "local"))
    res = launch_cli(recipe_file, "tokenizer.vocab_size=300", f"cache_dir={tmp_path / 'cache'}", "--executor", "local",
                     "--output-root", tmp_path / "runs")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "--no-tokenizer" not in res.stdout
    assert "prepare: tokenizer: vocab 300" in res.stdout, res.stdout
    assert list((tmp_path / "cache").glob("tokenizer/*/tokenizer.json"))
    manifest = json.loads((tmp_path / "runs" / "t" / "manifest.json").read_text())
    assert [t["state"] for s in manifest["stages"].values() for t in s["tasks"]] == ["COMPLETED"] * 2


def test_local_executor_cancels_dependents_of_a_failed_task(recipe_file, tmp_path, capsys):
    root = tmp_path / "runs"
    # model.vocab_size smaller than the tokenizer's: a user error inside the training job
    args = [str(recipe_file), "model.vocab_size=300", "stages=[base,sft,eval,kv_bench,report]",
            "--executor", "local", "--output-root", str(root)]
    assert launch.main(args) == 1
    out = capsys.readouterr().out
    # eval waited for sft, which waited for base: the reason named is the task that failed
    for stage in ("sft", "eval", "kv_bench"):
        assert f"[{stage} 0] CANCELLED: base task 0 failed" in out, out
    manifest = json.loads((root / "t" / "manifest.json").read_text())
    states = {s: v["tasks"][0]["state"] for s, v in manifest["stages"].items()}
    # sft and kv_bench wait for base task 0, eval for sft task 0; the report runs after all ended
    assert states == {"base": "FAILED", "sft": "CANCELLED", "eval": "CANCELLED",
                      "kv_bench": "CANCELLED", "report": "COMPLETED"}
    report = (root / "t" / "report.md").read_text()
    assert "| 0 | - | FAILED | 0 |" in report and "| CANCELLED |" in report
    err = (root / "t" / "logs" / "base_0.err").read_text()
    assert "model.vocab_size 300 is smaller than the tokenizer's" in err
    status = subprocess.run([sys.executable, "jobs/status.py", str(root / "t")], cwd=REPO,
                            capture_output=True, text=True, timeout=60).stdout
    assert "FAILED" in status and "CANCELLED" in status and "smaller than the tokenizer's" in status
    rows = {ln.split()[0]: ln for ln in status.splitlines() if ln.split() and ln.split()[0] in
            ("base", "sft", "eval", "kv_bench")}
    assert all("cancelled: base task 0 failed" in rows[s] for s in ("sft", "eval", "kv_bench")), status
    assert "cancelled" not in rows["base"], status


def test_cancelling_a_local_run_stops_its_tasks_and_status_says_by_the_user(recipe_file, tmp_path):
    """`status.py --cancel` on a local run signals its launcher, which stops the running task,
    marks the rest cancelled and records who cancelled; it prints how to finish the run."""
    run = tmp_path / "runs" / "t"
    launcher = subprocess.Popen([sys.executable, "jobs/launch.py", str(recipe_file), "train.num_iterations=5000",
                                 "train.eval_every=-1", "--executor", "local", "--output-root", str(tmp_path / "runs")],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and launcher.poll() is None and not (
                (run / "manifest.json").exists() and '"RUNNING"' in (run / "manifest.json").read_text()):
            time.sleep(0.2)
        assert launcher.poll() is None, "the launcher ended before base ran:\n" + launcher.communicate()[0]
        cancel = subprocess.run([sys.executable, "jobs/status.py", str(run), "--cancel"], cwd=REPO,
                                capture_output=True, text=True, timeout=90)
        assert cancel.returncode == 0 and "cancelled the local run" in cancel.stdout, cancel.stdout + cancel.stderr
        out = launcher.communicate(timeout=60)[0]
    finally:
        launcher.kill()
    assert launcher.returncode == 1, out
    assert "[base 0] CANCELLED by the user" in out and "[report 0] CANCELLED by the user" in out, out
    assert "--resume" in out.splitlines()[-1], out
    manifest = json.loads((run / "manifest.json").read_text())
    assert {s: v["tasks"][0]["state"] for s, v in manifest["stages"].items()} == \
        {"base": "CANCELLED", "report": "CANCELLED"}
    assert manifest["cancelled"]["by"] and manifest["cancelled"]["how"] == "SIGTERM"
    status = subprocess.run([sys.executable, "jobs/status.py", str(run)], cwd=REPO,
                            capture_output=True, text=True, timeout=60).stdout
    assert status.count("cancelled by the user") == 2 and "Traceback" not in status, status


def test_discovery_runs_first_and_a_cache_hit_skips_it(recipe_file, tmp_path):
    """device_batch_size: auto → a discover stage (real CPU probes under a memory budget) whose
    cached answer training uses; the next launch finds the cache and runs no discovery."""
    root = tmp_path / "runs"
    args = [str(recipe_file), "stages=[discover,base,report]", "train.device_batch_size=auto", "discovery.memory_budget_gb=1.0",
            "discovery.max_batch_size=8", f"discovery.cache_dir={tmp_path / 'bs-cache'}",
            "--executor", "local", "--output-root", str(root)]
    assert launch.main(args) == 0
    manifest = json.loads((root / "t" / "manifest.json").read_text())
    assert list(manifest["stages"]) == ["discover", "base", "report"]
    found = json.loads((root / "t" / "discover" / "000" / "discovery.json").read_text())["base"]
    assert found["from_cache"] is False and found["batch_size"] in (1, 2, 4, 8)
    run_info = json.loads((root / "t" / "base" / "000" / "run.json").read_text())
    assert run_info["device_batch_size"] == found["batch_size"]
    assert launch.main(args + ["--force"]) == 0
    manifest = json.loads((root / "t" / "manifest.json").read_text())
    assert "discover" not in manifest["stages"] and "cache" in manifest["skipped"]["discover"]


def _jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_the_sft_panel_is_scaled_to_the_fine_tuning_not_to_step_0():
    from jobs.report import sft_ylim
    lo, hi = sft_ylim([2.6, 2.9, 3.1], [8.9])  # the base model's val loss 8.9 before SFT
    assert lo < 2.6 and 3.1 < hi < 4, (lo, hi)
    assert sft_ylim([2.6, 3.1], [2.0]) is None and sft_ylim([2.6], []) is None


def test_report_has_sft_and_eval_columns_and_empty_cells_where_files_are_missing(tmp_path):
    """Task 0 has base, SFT and eval outputs (in the formats nanochat.train / nanochat.sft /
    nanochat.eval write); task 1 only base progress: its SFT and eval cells are empty."""
    r = recipe_from_dict({"stages": ["base", "sft", "eval", "report"], "grid": {"train.seed": [1, 2]}})
    run = tmp_path / "run"
    plan = build_plan(r, run)
    manifest = run_manifest.new_manifest(plan, "local")
    run.mkdir()
    run_manifest.save_manifest(run, manifest)
    for i in (0, 1):
        _jsonl(run / "base" / f"{i:03d}" / "progress.jsonl",
               [{"event": "train", "step": s, "loss": 4.0 - s - i, "tok_per_s": 100.0} for s in range(3)]
               + [{"event": "eval", "step": 3, "val_bpb": 2.5 + i}])
    sft = run / "base" / "000" / "sft"
    _jsonl(sft / "progress.jsonl", [{"event": "train", "step": 0, "loss": 1.5},
                                    {"event": "eval", "step": 1, "val_loss": 1.4},
                                    {"event": "train", "step": 1, "loss": 1.25},
                                    {"event": "eval", "step": 2, "val_loss": 1.3}])
    (sft / "eval.json").write_text(json.dumps({
        "checkpoint": str(sft / "checkpoints" / "step_000002"), "stage": "sft", "step": 2,
        "device": "cpu", "elapsed_s": 1.0, "val_bpb": 2.25,
        "tasks": {"arithmetic": {"metric": "exact", "accuracy": 0.5, "correct": 5, "total": 10, "source": "offline"},
                  "spelling": {"metric": "exact", "accuracy": 0.25, "correct": 1, "total": 4, "source": "offline"}},
        "skipped": {"gsm8k": "the hub does not answer"}}))
    write_report(run)
    import csv
    with open(run / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:11] == ["task", "grid", "state", "steps", "final_loss", "val_bpb", "tok_per_s",
                                  "sft_state", "sft_steps", "sft_loss", "sft_val_loss"]
    assert {k: rows[0][k] for k in ("final_loss", "val_bpb", "sft_loss", "sft_val_loss", "eval_val_bpb",
                                    "eval_arithmetic", "eval_spelling")} == \
        {"final_loss": "2.0", "val_bpb": "2.5", "sft_loss": "1.25", "sft_val_loss": "1.3",
         "eval_val_bpb": "2.25", "eval_arithmetic": "0.5", "eval_spelling": "0.25"}
    assert rows[1]["val_bpb"] == "3.5" and rows[1]["sft_loss"] == rows[1]["eval_arithmetic"] == ""
    assert rows[1]["sft_state"] == "PLANNED"
    report = (run / "report.md").read_text()
    assert "| arithmetic accuracy |" in report and "gsm8k (the hub does not answer)" in report
    assert "| task | grid values | base | steps | train loss | val BPB | tokens/s | SFT | SFT steps | " \
        "SFT train loss | SFT val loss | eval | eval val BPB |" in report, "readable headings, not snake_case"
    header = report.split("\n\n")[1].splitlines()
    assert [ln.split(":")[0] for ln in header] == ["- launched with", "- code", "- hardware", "- GPU-hours",
                                                 "- run directory"]
    assert f"commit {manifest['git_commit']}" in header[1]
    assert (run / "curves.png").stat().st_size > 0
    # nothing written yet at all: still a report, every result cell empty
    empty = tmp_path / "empty"
    empty.mkdir()
    run_manifest.save_manifest(empty, run_manifest.new_manifest(build_plan(r, empty), "local"))
    write_report(empty)
    assert (empty / "results.csv").read_text().splitlines()[1].startswith("0,train.seed=1,PLANNED,0,,,,PLANNED,0,,,")


def test_a_partial_resume_waits_for_the_whole_upstream_array_instead_of_mispairing():
    """aftercorr pairs array index k with upstream index k; a resume renumbers the unfinished
    tasks, so unless both arrays hold the same tasks the stage must wait for all (afterok)."""
    from jobs.plan import Stage, Task
    sft = Stage("sft", [Task(i, [], f"r/{i}") for i in range(3)], after=["base"],
                dependency="aftercorr")
    assert launch.dependency_option(sft, {"base": "7"}) == "aftercorr:7"
    assert launch.dependency_option(sft, {"base": "7"}, {"base": [0, 2]}, [0, 2]) == "aftercorr:7"
    assert launch.dependency_option(sft, {"base": "7"}, {"base": [2]}, [0, 1, 2]) == "afterok:7"
    assert launch.dependency_option(sft, {}, {}, [0]) is None  # upstream all done: no wait


def test_curves_are_titled_by_recipe_task_and_grid_values(tmp_path, monkeypatch):
    """A task's curves.png says which recipe, task and grid values it shows, not "000 (base)"."""
    from jobs.plan import build_plan
    from jobs.tasks import task_recipe
    from nanochat.plots import TASK_LABEL_ENV, plot_title
    from nanochat.recipe import save_resolved_recipe
    monkeypatch.delenv(TASK_LABEL_ENV, raising=False)
    assert plot_title("base", {"recipe": {"name": "tiny"}}, tmp_path / "000") == "tiny — base training"
    r = recipe_from_dict({"name": "g", "stages": ["base", "report"], "grid": {"train.seed": [1, 2]}})
    run = tmp_path / "run"
    run.mkdir()
    save_resolved_recipe(r, run / "recipe.yaml")
    run_manifest.save_manifest(run, run_manifest.new_manifest(build_plan(r, run), "local"))
    task_recipe(run, "base", 1)  # what a launcher's task does first
    assert plot_title("sft", {"recipe": {"name": "g"}}, run / "base" / "001") == "g task 1 (train.seed=2) — SFT"


def test_emit_writes_the_plan_as_sbatch_files_whose_arguments_no_shell_reinterprets(recipe_file, tmp_path):
    """--emit writes scripts only (tests/test_slurm.py submits them); a grid's values, shell
    metacharacters included, come back from the array script's argument selection as written."""
    values = ["a;$(touch PWNED)", "b`touch PWNED` 'q\" \\n|&>x"]
    data = yaml.safe_load(recipe_file.read_text())
    data.update(grid={"train.wandb_name": values}, stages=["base", "eval", "report"])
    recipe_file.write_text(yaml.safe_dump(data))
    out = tmp_path / "emitted"
    res = launch_cli(recipe_file, "train.wandb_name=$(touch PWNED)", "--output-root", tmp_path / "runs",
                     "--emit", out)
    assert res.returncode == 0, res.stderr
    assert "stage report: not emitted" in res.stdout and f"submit script: {out}/submit.sh" in res.stdout
    for script in out.glob("*.s*"):
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, script
    base = (out / "base.sbatch").read_text()
    assert "#SBATCH --array=0-1%8" in base and "#SBATCH --job-name=t-base" in base
    select = base[base.index("set -euo pipefail"):base.index("esac") + 4]
    for i, value in enumerate(values):
        got = subprocess.run(["bash", "-c", select + '\nprintf "%s\\0" "$@"'], capture_output=True, text=True,
                             env={**os.environ, "SLURM_ARRAY_TASK_ID": str(i)}, cwd=tmp_path)
        assert got.stdout.split("\0")[:-1] == [str(out / "recipe.yaml"), f"train.wandb_name={value}",
                                               f"run_dir={tmp_path / 'runs' / 't' / 'base' / f'{i:03d}'}"]
    assert load_recipe(out / "recipe.yaml").train.wandb_name == "$(touch PWNED)"
    assert '"--dependency=aftercorr:${base}"' in (out / "submit.sh").read_text()
    assert not list(tmp_path.rglob("PWNED")) and not (tmp_path / "runs" / "t" / "manifest.json").exists()


def test_emit_refuses_a_launched_run_and_a_run_dir_sbatch_lines_cannot_hold(recipe_file, tmp_path):
    (tmp_path / "runs" / "t").mkdir(parents=True)
    (tmp_path / "runs" / "t" / "manifest.json").write_text("{}")
    res = launch_cli(recipe_file, "--output-root", tmp_path / "runs", "--emit")
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "holds a run of jobs/launch.py" in res.stderr
    res = launch_cli(recipe_file, "--output-root", tmp_path / "my runs", "--emit")
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "run_dir" in res.stderr, res.stderr
    assert not (tmp_path / "my runs").exists()
