"""Standalone runs and launcher runs never share a run directory: the standalone commands refuse
a directory that holds a launcher run (manifest.json) in one line naming jobs/launch.py and
jobs/status.py, writing nothing there; `standalone_run` recognises a standalone run's directory
(what the launcher refuses). Real commands, a real tiny training."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from nanochat.checkpoint import LAUNCHER_MANIFEST, refuse_launcher_dir, standalone_run
from nanochat.common import UserError

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

# (name, module, where the manifest goes below the run_dir passed: "" = the run_dir itself)
REFUSALS = [("train", "nanochat.train", ""), ("sft", "nanochat.sft", ""),
            ("sft-into-manifest", "nanochat.sft", "sft"), ("check", "nanochat.check", ""),
            ("kv_sweep", "nanochat.kv_bench", "")]


def fake_launcher_run(run_dir: Path) -> None:
    """What jobs/launch.py leaves at the top of a run directory, and a task directory below."""
    (run_dir / "base" / "000").mkdir(parents=True)
    (run_dir / LAUNCHER_MANIFEST).write_text(json.dumps({"run_dir": str(run_dir), "stages": []}))
    (run_dir / "recipe.yaml").write_text("name: tiny\n")
    (run_dir / "base" / "000" / "progress.jsonl").write_text("")


def listing(root: Path) -> list:
    return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in root.rglob("*"))


@pytest.fixture(scope="module")
def refused(tmp_path_factory):
    """Every refusing command on a launcher run's directory, started at once (each spends ~2 s
    importing torch before it reads its recipe): name → (result, directory, listing before)."""
    started = {}
    for name, module, below in REFUSALS:
        run_dir = tmp_path_factory.mktemp(name)
        fake_launcher_run(run_dir / below if below else run_dir)
        before = listing(run_dir)
        proc = subprocess.Popen([sys.executable, "-m", module, str(TINY), f"run_dir={run_dir}"],
                                cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        started[name] = (proc, run_dir, before)
    out = {}
    for name, (proc, run_dir, before) in started.items():
        stdout, stderr = proc.communicate(timeout=120)
        out[name] = (subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr),
                     run_dir, before)
    return out


@pytest.mark.parametrize("name", [r[0] for r in REFUSALS])
def test_standalone_command_refuses_a_launcher_run_dir_and_writes_nothing(refused, name):
    res, run_dir, before = refused[name]
    module = next(m for n, m, _ in REFUSALS if n == name)
    detail = f"\n--- stdout ---\n{res.stdout[-2000:]}\n--- stderr ---\n{res.stderr[-2000:]}"
    assert res.returncode == 2, f"exit code {res.returncode}" + detail
    assert "Traceback" not in res.stderr, detail
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), "not one error line" + detail
    for words in ("jobs/launch.py", "python jobs/status.py", f"python -m {module}",
                  "-standalone", LAUNCHER_MANIFEST):
        assert words in lines[0], f"{words!r} missing from: {lines[0]}"
    assert listing(run_dir) == before, f"{name} wrote into the launcher's run directory"


def test_refusal_names_the_directory_as_typed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fake_launcher_run(tmp_path / "runs" / "tiny")
    with pytest.raises(UserError) as e:
        refuse_launcher_dir(Path("runs/tiny"), "python -m nanochat.train")
    assert str(e.value) == (
        "runs/tiny holds a run of jobs/launch.py (manifest.json); a standalone `python -m "
        "nanochat.train` must not write into it: pass run_dir=runs/tiny-standalone (or another "
        "directory), or follow that run with `python jobs/status.py runs/tiny`")
    refuse_launcher_dir(tmp_path / "runs" / "tiny" / "base" / "000", "python -m nanochat.train")
    refuse_launcher_dir(tmp_path / "nowhere", "python -m nanochat.train")  # a new run: fine


def test_standalone_run_is_found_after_a_real_training(tiny_recipe, tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe))
    run_dir = Path(tiny_recipe["run_dir"])
    res = subprocess.run([sys.executable, "-m", "nanochat.train", str(recipe),
                          "train.num_iterations=2"], cwd=REPO, env=ENV, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    found = standalone_run(run_dir)
    assert found == "checkpoints/step_000002, run.json, progress.jsonl", found
    refuse_launcher_dir(run_dir, "python -m nanochat.train")  # its own directory: no objection
    (run_dir / LAUNCHER_MANIFEST).write_text("{}")
    assert standalone_run(run_dir) is None, "a directory with a manifest is the launcher's"


def test_standalone_run_is_none_for_empty_missing_and_launcher_dirs(tmp_path):
    assert standalone_run(tmp_path) is None
    assert standalone_run(tmp_path / "missing") is None
    fake_launcher_run(tmp_path / "launched")
    assert standalone_run(tmp_path / "launched") is None
    assert standalone_run(tmp_path / "launched" / "base" / "000") == "progress.jsonl"


def test_checkpoint_module_imports_no_torch():
    """The launcher reads run directories on a login node without loading torch."""
    res = subprocess.run([sys.executable, "-c", "import sys, nanochat.checkpoint; "
                          "print('torch' in sys.modules)"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert res.stdout.strip() == "False", res.stderr
