"""A run launched by older code stays usable: resumed, reported, chatted with, its recipe and
checkpoints loaded, its batch-size cache read — by the commands users type, with this checkout.

The fixture, tests/golden/run_before_regroup.tar.gz, is a real run directory made by commit
ba04c60 (before the module regrouping of issue 30) with the local executor:

    git checkout ba04c60 && bash tests/golden/make_run_before_regroup.sh [PIP_DIR]

(the script says what it launches). A tiny recipe ran discover, base, sft and eval to the end,
then the run was cancelled (`jobs/status.py RUN --cancel`) as kv_bench started: kv_bench and
report are CANCELLED, the cheapest stages for `--resume` to finish. It holds the run directory — with its code
snapshot `code/ba04c60ec7-<hash>/`, which `--resume` runs — and the batch-size discovery cache
the discover task wrote (cache/batch_size); not the data nor the pip sdists (`--resume`
prepares the data again, from conftest's `pip_cache`).
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
GOLDEN = REPO / "tests" / "golden" / "run_before_regroup.tar.gz"
MADE_AT = "/tmp/nanochat-golden-ba04c60"  # NANOCHAT_HOME of make_run_before_regroup.sh
SNAPSHOT_COMMIT = "ba04c60ec7678caf9674a391b656b518cc53b531"


def extract(home: Path, pip_cache: Path) -> Path:
    """The golden run under `home` (as if NANOCHAT_HOME had been `home`); returns its run directory.

    A run directory records absolute paths — the launch makes the recipe's paths absolute so that
    jobs need no working directory, and the manifest names the code snapshot, every task's
    directory and the recipe by absolute path — and the kit has no command that moves a run (a
    resume of a moved run stops at "the run's code snapshot ... is gone"). Users don't move runs;
    this test must unpack into a temporary directory, so it rewrites the one prefix the run was
    made under, in the text files that hold it, as if the run had been made here."""
    prefix = MADE_AT.lstrip("/") + "/"
    with tarfile.open(GOLDEN) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        for m in members:
            m.name = m.name[len(prefix):]
        tar.extractall(home, members=members, filter="data")
    for path in home.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".jsonl", ".yaml", ".md", ".csv"):
            text = path.read_text()
            if MADE_AT in text:
                path.write_text(text.replace(MADE_AT, str(home)))
    # the sdists the data is cut from: the session's copy (downloaded at most once per session)
    (home / "cache" / "pip").symlink_to(pip_cache, target_is_directory=True)
    return home / "runs" / "old_run"


@pytest.fixture
def old_run(tmp_path, pip_cache) -> Path:
    return extract(tmp_path, pip_cache)


def run(*args: str, env_home: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    if env_home is not None:
        env["NANOCHAT_HOME"] = str(env_home)
    res = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, f"{' '.join(args)} exited {res.returncode}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def states(run_dir: Path) -> dict[str, list[str]]:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    return {name: [t["state"] for t in info["tasks"]] for name, info in manifest["stages"].items()}


def last_record(progress: Path, key: str) -> dict:
    records = [json.loads(line) for line in progress.read_text().splitlines() if line.strip()]
    return [r for r in records if key in r][-1]


def test_the_golden_run_is_what_the_script_made(old_run):
    """The premise of the other tests: a cancelled run with work left, made by ba04c60."""
    assert states(old_run) == {"discover": ["COMPLETED"], "base": ["COMPLETED"], "sft": ["COMPLETED"],
                               "eval": ["COMPLETED"], "kv_bench": ["CANCELLED"], "report": ["CANCELLED"]}
    manifest = json.loads((old_run / "manifest.json").read_text())
    assert manifest["code"]["commit"] == SNAPSHOT_COMMIT and not manifest["code"]["dirty"]
    assert Path(manifest["code"]["snapshot"]).is_dir()
    assert not (old_run / "kv_bench" / "000" / "results.json").exists()


def test_status_of_an_old_run(old_run):
    out = run("jobs/status.py", str(old_run)).stdout
    rows = {line.split()[0]: line for line in out.splitlines()[1:] if line.strip()}
    assert "COMPLETED" in rows["base"] and "val_bpb" in rows["base"]
    assert "COMPLETED" in rows["sft"] and "val_loss" in rows["sft"]
    assert "COMPLETED" in rows["eval"] and "choice" in rows["eval"]
    assert "CANCELLED" in rows["kv_bench"] and "cancelled by the user" in rows["kv_bench"]
    as_json = json.loads(run("jobs/status.py", str(old_run), "--json").stdout)
    assert as_json


def test_report_of_an_old_run(old_run):
    """The report builds over the run as it was left (kv_bench cancelled) and carries the base
    task's final validation BPB (its progress.jsonl) and the eval's (its eval.json), as the old
    code wrote them."""
    run("jobs/report.py", str(old_run))
    report = (old_run / "report.md").read_text()
    [row] = list(csv.DictReader((old_run / "results.csv").open()))
    final = last_record(old_run / "base" / "000" / "progress.jsonl", "val_bpb")["val_bpb"]
    evaluated = json.loads((old_run / "base" / "000" / "sft" / "eval.json").read_text())["val_bpb"]
    assert abs(float(row["val_bpb"]) - final) < 1e-3 and abs(float(row["eval_val_bpb"]) - evaluated) < 1e-3, row
    assert "old_run" in report


def test_the_old_recipe_loads(old_run):
    """The resolved recipe.yaml the launch froze — every key of its day, the per-role AdamW keys
    among them — loads with this checkout's loader, with the values it had."""
    from nanochat.recipe import load_recipe
    recipe = load_recipe(old_run / "recipe.yaml")
    assert recipe.name == "old_run" and recipe.model.depth == 2 and recipe.model.n_embd == 32
    assert recipe.sft.num_iterations == 12 and recipe.train.num_iterations == 30
    assert list(recipe.optim.adamw_roles["embedding"]["betas"]) == [0.8, 0.95]  # set by hand in the old recipe
    # each task's recipe as the jobs load it (jobs/tasks.py task_recipe): the task's directory
    manifest = json.loads((old_run / "manifest.json").read_text())
    for name, info in manifest["stages"].items():
        for task in info["tasks"]:
            r = load_recipe(old_run / "recipe.yaml", list(task["overrides"]) + [f"run_dir={task['recipe_run_dir']}"])
            assert r.run_dir == task["recipe_run_dir"], name
    # the recipe a checkpoint carries in its meta.json (what `python -m nanochat.eval CHECKPOINT`
    # rebuilds its settings from: nanochat/eval.py _checkpoint_recipe)
    from nanochat.recipe import override_recipe
    for step_dir in old_run.glob("base/000/**/checkpoints/step_*"):
        meta = json.loads((step_dir / "meta.json").read_text())
        assert list(override_recipe(meta["recipe"], []).optim.adamw_roles["embedding"]["betas"]) == [0.8, 0.95], step_dir


def test_the_old_batch_size_cache_is_read(old_run):
    """The batch sizes the old discover task cached are found by this checkout's lookup for the
    run's recipe (no new discovery): the key it computes equals the one stored. The device is
    the one the cache entry names, so the check holds on any machine."""
    from nanochat.batchsize.search import cached_result
    from nanochat.recipe import load_recipe
    from nanochat.batchsize.devices import Target
    from nanochat.tokenizer import Tokenizer
    import torch
    recipe = load_recipe(old_run / "recipe.yaml")
    vocab = Tokenizer.load(old_run / "base" / "000" / "tokenizer").vocab_size
    found = json.loads((old_run / "discover" / "000" / "discovery.json").read_text())
    assert set(found) == {"base", "sft"}
    for stage, entry in found.items():
        stored = json.loads(Path(entry["cache_path"]).read_text())["key"]
        target = Target(torch.device("cpu"), stored["device"], stored["device_memory_bytes"],
                        "the old cache entry", stored["torch"])
        hit = cached_result(recipe, stage=stage, world_size=1, vocab_size=vocab, target=target)
        assert hit is not None, f"{stage}: the cache entry {entry['cache_path']} is not found for the old recipe"
        assert hit["result"]["batch_size"] == entry["batch_size"]


def test_old_checkpoints_load_and_chat(old_run):
    """The chat model the old code saved answers a prompt (the README's `python -m nanochat.chat
    RUN/base/000/sft -p ...`), and the engine loads the base checkpoint."""
    out = run("-m", "nanochat.chat", str(old_run / "base" / "000" / "sft"), "-p", "What is 2 plus 3?",
              "--seed", "1", "--max-new-tokens", "8", "--device", "cpu").stdout
    assert out.strip()
    from nanochat.engine import load_model
    model, meta, step_dir = load_model(old_run / "base" / "000", "cpu")
    assert step_dir.name == "step_000030" and model.config.n_embd == 32 and meta["step"] == 30


def test_resume_finishes_an_old_run_with_its_own_snapshot(tmp_path, pip_cache):
    """`--resume` with this checkout's launcher (and its data preparation, on the old recipe)
    reruns what the cancel left, kv_bench and report, from the run's code snapshot (ba04c60's
    code) and leaves the finished tasks alone; then status and the report work on the run."""
    run_dir = extract(tmp_path, pip_cache)
    snapshot = Path(json.loads((run_dir / "manifest.json").read_text())["code"]["snapshot"])
    out = run("jobs/launch.py", "--resume", str(run_dir), "--executor", "local", env_home=tmp_path,
              timeout=600).stdout
    assert "the run's own snapshot" in out and "left alone: sft task 0: COMPLETED" in out, out
    assert states(run_dir) == {name: ["COMPLETED"] for name in states(run_dir)}, out
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["code"]["snapshot"] == str(snapshot)
    assert [launch["mode"] for launch in manifest["launches"]] == ["new", "resume"]
    assert {name: info["tasks"][0]["code"] for name, info in manifest["stages"].items()} == \
        {name: snapshot.name for name in manifest["stages"]}
    assert (run_dir / "kv_bench" / "000" / "results.json").is_file()
    # the tasks imported the snapshot's modules, not this checkout's: Python left their bytecode
    # beside them (the golden tarball has none), the kv_bench module among them by its old path
    if not os.environ.get("PYTHONDONTWRITEBYTECODE"):
        for module in ("jobs/tasks", "jobs/report", "nanochat/bench/kv_sweep"):
            where = snapshot / Path(module).parent / "__pycache__"
            assert list(where.glob(f"{Path(module).name}.*.pyc")), f"{module} was not imported from {snapshot}"
    # status and the report of the finished run, with this checkout
    status = run("jobs/status.py", str(run_dir)).stdout
    assert "CANCELLED" not in status and "FAILED" not in status, status
    (run_dir / "report.md").unlink()  # the report task's (old code); now this checkout's
    run("jobs/report.py", str(run_dir))
    report = (run_dir / "report.md").read_text()
    assert "## KV-cache benchmark, task 0" in report
    assert (run_dir / "kv_bench" / "000" / "results.md").read_text().strip() in report
