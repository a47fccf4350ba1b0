"""The miniseries: configs/ladder.yaml is upstream's ladder, the tiny ladder runs end to end into a
curve.log upstream's parsing reads, and the scaling command prices a ladder before launch."""
import json
import re
from pathlib import Path

import yaml

from jobs import launch
from jobs.miniseries import power_law
from nanochat.recipe import load_recipe
from jobs.estimate import ladder_table, main as scaling_main
from tests.test_logfmt import upstream_parse_records

REPO = Path(__file__).resolve().parent.parent

# Upstream, branch experiment_refactor:
#   runs/run.sh:58            DEPTHS="${DEPTHS:-12 14 16 20 24 28}"
#   runs/run.sh:55-56         "the default spans exactly 1e18 -> 1e20 FLOPs (~13 hours total on 8xH100)"
#   scripts/base_train.py:59  --target-param-data-ratio ... default=12
#   runs/run.sh:113-187       per depth: base_train → infer_bench → chat_sft → chat_eval
UPSTREAM_DEPTHS = [12, 14, 16, 20, 24, 28]
UPSTREAM_RATIO = 12


def test_ladder_yaml_is_upstreams_ladder_and_spans_1e18_to_1e20_flops():
    recipe = load_recipe(REPO / "configs" / "ladder.yaml")
    assert recipe.grid == {"model.depth": UPSTREAM_DEPTHS}
    assert recipe.train.target_param_data_ratio == UPSTREAM_RATIO
    assert {"base", "kv_bench", "sft", "eval", "report"} <= set(recipe.stages)
    t = ladder_table(recipe, [1, 6], gpu="h100")
    flops = [r["flops"] for r in t["rungs"]]
    assert [r["depth"] for r in t["rungs"]] == UPSTREAM_DEPTHS
    assert 0.9e18 < flops[0] < 1.1e18 and 0.9e20 < flops[-1] < 1.1e20 and flops == sorted(flops)


def test_scaling_prints_each_rungs_hours_and_the_makespan_on_n_nodes(capsys):
    recipe = load_recipe(REPO / "configs" / "tiny_ladder.yaml")
    t = ladder_table(recipe, [1, 2, 3], gpu="a100")
    hours = [r["hours"] for r in t["rungs"]]
    spans = {m["nodes"]: m["makespan_hours"] for m in t["makespans"]}
    assert abs(spans[1] - sum(hours)) < 1e-3            # one node: one rung after another
    assert abs(spans[3] - max(hours)) < 1e-3            # a node each: the longest rung
    assert abs(spans[2] - max(max(hours), sum(hours) - max(hours))) < 1e-3  # LPT on two nodes
    assert scaling_main([str(REPO / "configs" / "tiny_ladder.yaml"), "--gpu", "a100", "--nodes", "2"]) == 0
    out = capsys.readouterr().out
    assert "| model.depth=2 | 2 |" in out and "makespan on 2 nodes (16 × A100)" in out


def test_power_law_fit_recovers_the_exponent():
    pts = [(c, 3.0 * c ** -0.05) for c in (1e15, 1e16, 1e17)]
    a, b = power_law(pts)
    assert abs(b + 0.05) < 1e-9 and abs(a - 3.0) < 1e-6


def test_the_tiny_ladder_runs_locally_into_a_curve_upstream_reads(corpus, tmp_path, monkeypatch):
    """configs/tiny_ladder.yaml with the local executor: three depths, each base → kv_bench →
    sft → eval, then the report: curve.log holds one `model` record per rung (upstream's
    namespaces), cost fields, and the report draws and fits the curve."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    root = tmp_path / "runs"
    sections = corpus["sections"]
    args = [str(REPO / "configs" / "tiny_ladder.yaml"), "--executor", "local", "--output-root", str(root),
            f"cache_dir={corpus['cache_dir']}", f"data.data_dir={sections['data']['data_dir']}",
            f"data.offline_cache={sections['data']['offline_cache']}"]
    assert launch.main(args) == 0
    run = root / "tiny_ladder"
    models = upstream_parse_records(run / "curve.log", "model")
    assert [m["depth"] for m in models] == [2, 3, 4]
    for m in models:
        assert m["model_tag"] == f"d{m['depth']}"
        for key in ("base.val_bpb", "base.eflops", "base.num_params", "base.tokens_trained",
                    "infer.tok_per_sec_bs1", "infer.tok_per_sec_bs8", "sft.val_loss", "chat.val_bpb",
                    "sched.wall_s", "sched.gpu_hours"):
            assert key in m, f"{key} missing from {m['model_tag']}"
        assert m["sched.source"] == "local wall time" and m["sched.wall_s"] > 0
        assert m["sched.gpu_hours"] == 0  # a CPU run holds no GPU
    assert [m["base.eflops"] for m in models] == sorted(m["base.eflops"] for m in models)
    assert models[-1]["base.val_bpb"] < models[0]["base.val_bpb"]
    # each stage's own log, read by upstream's parser: the fields its scripts/curve.py joins (d4: task 2)
    m = models[-1]
    bench = upstream_parse_records(run / "kv_bench" / "002" / "infer_bench.log", "bench")
    assert [b["batch"] for b in bench] == [1, 8] and all(b["tok_per_sec"] > 0 for b in bench)
    assert upstream_parse_records(run / "base" / "002" / "sft" / "sft.log", "summary")[-1]["val_loss"] == m["sft.val_loss"]
    chat = upstream_parse_records(run / "base" / "002" / "sft" / "chat_eval.log", "summary")[-1]
    assert chat["source"] == "sft" and "chatcore" in chat and chat["val_bpb"] == m["chat.val_bpb"]
    assert (run / "curve.png").read_bytes()[:4] == b"\x89PNG"
    report = (run / "report.md").read_text()
    assert "### Where the time went: base" in report and "### Where the time went: sft" in report
    assert "| of it imports | of it data + tokenizer |" in report and "| not compiled |" in report
    assert "## Cost per stage" in report and "| kv_bench | 3 |" in report
    assert "## The curve" in report and "Fitted power law" in report and "![val BPB vs training FLOPs](curve.png)" in report
    meta = json.loads((run / "meta.json").read_text())
    assert {"name", "created", "git_commit", "git_dirty", "dataset", "gpu", "node", "ladder"} <= set(meta)
    assert meta["ladder"] == [2, 3, 4] and meta["dataset"] == "offline" and meta["gpu"] == "cpu"
    task = json.loads((run / "base" / "001" / "task_meta.json").read_text())
    assert task["stage"] == "base" and task["depth"] == 3
    assert yaml.safe_load((run / "recipe.yaml").read_text())["grid"] == {"model.depth": [2, 3, 4]}


def test_the_tiny_ladder_runs_on_slurm_as_arrays_with_the_schedulers_costs(slurm, corpus, tmp_path):
    """Two rungs of the tiny ladder, pretraining only, on the local SLURM: one array job, and the
    curve's cost fields come from sacct (queue wait: Start − Submit; Elapsed × the allocated GPUs:
    the local cluster's gres gives each task the one GPU the recipe asks for)."""
    from tests.test_slurm import launch as slurm_launch, wait_until_done
    data = corpus["sections"]["data"]
    res = slurm_launch(REPO / "configs" / "tiny_ladder.yaml", "--output-root", tmp_path / "runs",
                       f"cache_dir={corpus['cache_dir']}", f"data.data_dir={data['data_dir']}",
                       f"data.offline_cache={data['offline_cache']}", "stages=[base, report]",
                       "grid={model.depth: [2, 3]}")
    assert res.returncode == 0, res.stderr
    run = tmp_path / "runs" / "tiny_ladder"
    rows = wait_until_done(run)
    assert all(r["state"] == "COMPLETED" for r in rows), rows
    manifest = json.loads((run / "manifest.json").read_text())
    ids = [t["job_id"] for t in manifest["stages"]["base"]["tasks"]]
    assert len({i.split("_")[0] for i in ids}) == 1 and all("_" in i for i in ids), ids  # one array
    models = upstream_parse_records(run / "curve.log", "model")
    assert [m["depth"] for m in models] == [2, 3]
    for m in models:
        assert m["sched.source"] == "sacct" and m["sched.queue_s"] >= 0 and m["sched.wall_s"] > 0
        assert abs(m["sched.gpu_hours"] - m["sched.wall_s"] / 3600) < 1e-3
    # the report's cost per stage: the same accounting, summed over the stage's tasks
    base = next(ln for ln in (run / "report.md").read_text().split("## Cost per stage")[1].splitlines()
                if ln.startswith("| base |"))
    cells = [c.strip() for c in base.strip("|").split("|")]
    assert cells[1] == "2" and cells[-1] == "sacct", base
    assert abs(float(cells[3]) - sum(m["sched.gpu_hours"] for m in models)) < 1e-3, base


# --------------------------------------------------------------------------------------------
# Where the time went, while it goes: status by rung, the compile cache, the cost per stage

COMPILE_ONCE = """
import torch
from nanochat.runtime import compile_cache_counts, compile_cache_state
before = compile_cache_counts()
model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
model = torch.compile(model)
model(torch.randn(2, 8)).sum().backward()
print(compile_cache_state(before, compile_cache_counts()))
"""


def test_the_compile_cache_state_is_a_miss_when_cold_and_a_hit_when_warm(tmp_path):
    """What the `timing` and `summary` records say of the compile (nanochat/trainer.py): torch's
    own cache counters, in fresh processes sharing one cache directory as jobs on a node do (an
    eager run records none: the status test below)."""
    import os
    import subprocess
    import sys
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
           "TRITON_CACHE_DIR": str(tmp_path / "triton"), "OMP_NUM_THREADS": "1"}

    def state() -> str:
        res = subprocess.run([sys.executable, "-c", COMPILE_ONCE], env=env, cwd=REPO,
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        return res.stdout.strip().splitlines()[-1]

    assert [state(), state()] == ["miss", "hit"]


def test_status_shows_a_ladder_by_rung_and_where_a_running_tasks_time_went(corpus, tmp_path, capsys):
    """A ladder's status: a line per rung (depth, state, step, val_bpb, elapsed), the other
    stages in the usual table; under a running training task its time so far, from the real
    loop's `timing` record (set-up with imports and data, warm-up, steps, evaluation)."""
    from jobs import monitor
    from jobs.manifest import launcher_record, new_manifest, save_manifest
    from jobs.plan import build_plan
    from jobs.tasks import run_task
    from nanochat.recipe import save_resolved_recipe
    data = corpus["sections"]["data"]
    run = tmp_path / "runs" / "l"
    recipe = load_recipe(REPO / "configs" / "tiny_ladder.yaml", [
        f"run_dir={run}", f"cache_dir={corpus['cache_dir']}", f"data.data_dir={data['data_dir']}",
        f"data.offline_cache={data['offline_cache']}", "stages=[base, report]", "grid={model.depth: [2, 3]}",
        "train.num_iterations=4", "train.eval_every=2"])
    run.mkdir(parents=True)
    save_resolved_recipe(recipe, run / "recipe.yaml")
    manifest = new_manifest(build_plan(recipe, run), "local")
    save_manifest(run, manifest)
    run_task(str(run), "base", 0)
    records = [json.loads(ln) for ln in (run / "base" / "000" / "progress.jsonl").read_text().splitlines()]
    timing = next(r for r in records if r["event"] == "timing")
    assert timing["step"] == 0 and "compile_cache" not in timing  # the tiny ladder runs eagerly
    assert 0 <= timing["imports_s"] <= timing["setup_s"] and 0 <= timing["data_s"] <= timing["setup_s"]
    summary = upstream_parse_records(run / "base" / "000" / "base_train.log", "summary")[-1]
    assert summary["imports_s"] == timing["imports_s"] and summary["data_s"] == timing["data_s"]
    # as a live local run shows it: rung 0 training (its launcher: this process), rung 1 queued
    base = manifest["stages"]["base"]["tasks"]
    from datetime import datetime, timedelta
    started = (datetime.now().astimezone() - timedelta(seconds=125)).isoformat(timespec="seconds")
    base[0].update(state="RUNNING", submitted=started)  # a local task's start: its elapsed time so far
    base[1].update(state="PENDING")
    manifest["launcher"] = launcher_record()
    save_manifest(run, manifest)
    capsys.readouterr()
    monitor.show(run)
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["rung", "depth", "state", "step", "val_bpb", "elapsed"], out
    assert out[1].split()[:5] == ["0", "2", "base", "RUNNING", "base"] and "4/4" in out[1], out
    bpb = [r["val_bpb"] for r in records if r["event"] == "eval"][-1]
    assert f"{bpb:.4f}" in out[1] and " 2m0" in out[1], out
    # the job's set-up: this (test) process started after the task's faked start, so any
    assert re.match(r"base time: queue 0s · job set-up \S+ · set-up \S+ \(imports \S+, data \S+\) · warm-up ",
                    out[2].strip()) and \
        "(imports " in out[2] and " · warm-up " in out[2] and " · steps " in out[2] and " · eval " in out[2], out
    assert out[3].split()[:4] == ["1", "3", "base", "PENDING"], out
    assert any(ln.startswith("report") for ln in out), "the report task stays in the usual table"
