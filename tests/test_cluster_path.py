"""The README's "Run on a SLURM cluster" section, followed literally (issue 31): a site file that
wins, a dry run that checks what the launch checks, setup lines that stop a job, a resume that
runs the code it was launched with, and messages that send the user the right way. The SLURM
tests use the local cluster (slurm/local-cluster.sh; the `slurm` fixture)."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from jobs import launch
from jobs.progress import duration, task_seconds
from jobs.monitor import collect
from nanochat.common import UserError
from jobs.plan import guarded_setup

REPO = Path(__file__).resolve().parents[1]
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"}


RECIPE_FILE = {"name": "c", "train": {"num_iterations": 2},  # (the recipe_file fixture)
               "cluster": {"gpus_per_node": 1, "cpus_per_task": 1, "time": 10}}


def cli(script: str, *args, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=env)


def one_error_line(res: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


# -------------------------------------------------------------------------------------------
# Without SLURM

def test_a_resume_runs_the_runs_own_snapshot_unless_new_code_is_asked(recipe_file, tmp_path, capsys):
    """The run's snapshot stands for code launched earlier (renamed, as a snapshot of other code
    would be named): --resume --only report runs in it and takes no new snapshot; --new-code takes
    one of the checkout, records it in the launch and per task, and the report says which ran which."""
    root = tmp_path / "runs"
    assert launch.main([str(recipe_file), "--executor", "local", "--output-root", str(root)]) == 0
    run = root / "c"
    manifest = json.loads((run / "manifest.json").read_text())
    current = Path(manifest["code"]["snapshot"])
    older = current.with_name("0123456789-launched0000")
    current.rename(older)
    manifest["code"]["snapshot"] = str(older)
    for info in manifest["stages"].values():
        for t in info["tasks"]:
            assert t["code"] == current.name
            t["code"] = older.name
    (run / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()

    assert launch.main(["--resume", str(run), "--only", "report", "--executor", "local"]) == 0
    out = capsys.readouterr().out
    assert "the run's own snapshot: --new-code runs this checkout's code instead" in out, out
    manifest = json.loads((run / "manifest.json").read_text())
    assert sorted(p.name for p in (run / "code").iterdir()) == [older.name], "no new snapshot"
    assert manifest["launches"][-1]["code"]["snapshot"] == str(older)
    assert manifest["stages"]["report"]["tasks"][0]["code"] == older.name
    assert "new_code" not in manifest["launches"][-1]

    assert launch.main(["--resume", str(run), "--only", "report", "--new-code", "--executor", "local"]) == 0
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["launches"][-1]["new_code"] is True
    assert sorted(p.name for p in (run / "code").iterdir()) == sorted([older.name, current.name])
    assert manifest["stages"]["report"]["tasks"][0]["code"] == current.name
    assert manifest["stages"]["base"]["tasks"][0]["code"] == older.name
    report = (run / "report.md").read_text()
    assert f"code/{older.name} ran base 0; code/{current.name} ran report 0" in report, report
    with pytest.raises(UserError, match="--new-code changes the code of a run being resumed"):
        launch.main([str(recipe_file), "--new-code", "--output-root", str(root)])


def test_a_missing_run_directory_is_named_so_with_nanochat_home_unset(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "NANOCHAT_HOME"}
    for res in (cli("jobs/launch.py", "--resume", "/runs/d20", env=env),
                cli("jobs/status.py", "/runs/d20", env=env)):
        line = one_error_line(res)
        assert line.startswith("error: run directory /runs/d20 not found; pass the run directory"), line
        assert "NANOCHAT_HOME is not set in this shell" in line and "shell profile" in line
    line = one_error_line(cli("jobs/launch.py", "--resume", "/runs/d20",
                              env={**env, "NANOCHAT_HOME": str(tmp_path)}))
    assert "NANOCHAT_HOME" not in line


def test_setup_lines_run_in_the_jobs_shell_and_the_first_failing_one_stops_it(tmp_path):
    script = "\n".join(guarded_setup(["export SITE_A=1  # a comment", "nanochat-no-such-command load cuda/12.4",
                                      "echo never"]) + ['echo "reached $SITE_A"'])
    res = subprocess.run(["bash", "-c", script], capture_output=True, text=True)
    assert res.returncode == 1 and "reached" not in res.stdout and "never" not in res.stdout
    assert res.stderr.strip().splitlines()[-1] == \
        "cluster.setup line 2 failed (exit 127): nanochat-no-such-command load cuda/12.4"
    res = subprocess.run(["bash", "-c", "\n".join(guarded_setup(["export SITE_A='it''s'"]) + ['echo "$SITE_A"'])],
                         capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout == "its\n"


def test_the_sbatch_scripts_stop_at_a_failing_setup_line(tmp_path):
    """slurm/env.sh runs the same guarded lines: the plain sbatch scripts stop there too."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"cluster": {"setup": ["nanochat-no-such-command load cuda/12.4"]}}))
    res = subprocess.run(["bash", "-c", 'set -euo pipefail; source slurm/env.sh "$@"; echo after', "sbatch", str(recipe)],
                         cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "SLURM_SUBMIT_DIR": str(REPO), "NANOCHAT_COMPILE_CACHE_ROOT": str(tmp_path)})
    assert res.returncode == 1 and "after" not in res.stdout
    assert "cluster.setup line 1 failed (exit 127): nanochat-no-such-command load cuda/12.4" in res.stderr
    # what env.sh asks the launcher for; the recipe printer's old flag names the new place in one line
    printed = subprocess.run([sys.executable, "jobs/launch.py", str(recipe), "--setup"], cwd=REPO,
                             capture_output=True, text=True)
    assert printed.returncode == 0 and printed.stdout.splitlines() == guarded_setup(["nanochat-no-such-command load cuda/12.4"])
    old = subprocess.run([sys.executable, "-m", "nanochat.recipe", str(recipe), "--setup"], cwd=REPO,
                         capture_output=True, text=True)
    assert old.returncode == 2 and old.stderr.splitlines() == [
        "error: --setup moved to the launcher: python jobs/launch.py RECIPE --setup prints the recipe's "
        "cluster.setup as the shell text its jobs run"]


def test_the_cluster_check_on_a_launched_recipe_is_one_line_before_torchrun(tiny_recipe, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text("{}")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({**tiny_recipe, "run_dir": str(run)}))
    res = subprocess.run(["bash", "slurm/check.sbatch", str(recipe)], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "SLURM_SUBMIT_DIR": str(REPO), "NANOCHAT_COMPILE_CACHE_ROOT": str(tmp_path)},
                         timeout=120)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert "holds a run of jobs/launch.py" in lines[0] and "--out check.json" in lines[0]
    assert "torchrun" not in res.stdout + res.stderr


def test_site_files_and_own_recipes_under_configs_are_not_part_of_the_snapshot():
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    res = subprocess.run(["git", "check-ignore", "configs/site.yaml", "configs/my-d20.yaml", "configs/d20.yaml"],
                         cwd=REPO, capture_output=True, text=True)
    assert res.stdout.split() == ["configs/site.yaml", "configs/my-d20.yaml"]


def test_elapsed_times_are_shown_in_one_format():
    assert [duration(task_seconds(t)) for t in ({"elapsed": "0:20"}, {"elapsed": "00:00:27"},
                                                {"elapsed": "1-02:03:04"}, {"elapsed_s": 95.2})] == \
        ["20s", "27s", "26h03m", "1m35s"]


# -------------------------------------------------------------------------------------------
# On the local SLURM

def one_gpu_site(tmp_path: Path, partition: str = "debug") -> Path:
    """configs/site.example.yaml filled in for the local cluster's nodes as for 1-GPU nodes."""
    text = (REPO / "configs" / "site.example.yaml").read_text()
    account = subprocess.run(["sacctmgr", "-nP", "show", "assoc", f"user={os.environ.get('USER', 'root')}",
                              "format=account"], capture_output=True, text=True).stdout.split() or ["root"]
    for old, new in (("partition: a100", f"partition: {partition}"), ("YOUR_ACCOUNT", account[0]),
                     ("gpus_per_node: 8", "gpus_per_node: 1"), ("cpus_per_task: 8", "cpus_per_task: 2"),
                     ("time: 480", "time: 60"), ("module load cuda/12.4", "export SITE_CUDA=12.4"),
                     ("source /scratch/YOUR_USER/nanochat/venv/bin/activate", "export SITE_VENV=none")):
        assert old in text, old
        text = text.replace(old, new)
    path = tmp_path / "site.yaml"
    path.write_text(text)
    return path


def test_the_readme_cluster_path_with_a_one_gpu_site_file_asks_for_one_gpu(slurm, tmp_path):
    one_gpu_site(tmp_path)
    (tmp_path / "my-d20.yaml").write_text(f"base: [{REPO / 'configs' / 'd20.yaml'}, site.yaml]\n")
    env = {**os.environ, "NANOCHAT_HOME": str(tmp_path / "home")}
    res = cli("jobs/launch.py", tmp_path / "my-d20.yaml", "--dry-run", "--no-prepare", env=env)
    assert res.returncode == 0, res.stderr
    scripts = res.stdout.split("# ===== stage ")[1:]
    assert [s.split(":")[0] for s in scripts] == ["discover", "base", "sft", "eval", "kv_bench", "report"]
    assert "#SBATCH --gpus-per-node=1" in scripts[1] and "#SBATCH --time=60" in scripts[1]
    assert "note:" not in res.stdout and "# stage discover: would submit (" in res.stdout
    assert f"the run directory would be {tmp_path / 'home' / 'runs' / 'd20'}" in res.stdout
    # the order the README used to show: d20's cluster settings win (8 GPUs × 8 CPUs a node),
    # one line says so, and the dry run fails as the launch would, with sbatch's reason
    (tmp_path / "old.yaml").write_text(f"base: [site.yaml, {REPO / 'configs' / 'd20.yaml'}]\n")
    res = cli("jobs/launch.py", tmp_path / "old.yaml", "--dry-run", "--no-prepare", env=env)
    notes = [ln for ln in res.stdout.splitlines() if ln.startswith("note:")]
    assert len(notes) == 1 and "cluster.gpus_per_node=8 (site: 1)" in notes[0] \
        and "list the site file last" in notes[0], res.stdout
    assert one_error_line(res).startswith("error: sbatch would refuse stage base: "), res.stderr


def test_the_dry_run_refuses_what_the_launch_refuses(slurm, recipe_file, tmp_path):
    root = ["--output-root", tmp_path / "runs", "--no-prepare"]
    for override, expect in (("cluster.partition=nosuchpart", "error: cluster.partition 'nosuchpart' is not a partition"),
                             ("cluster.account=YOUR_ACCOUNT", "error: cluster.account is 'YOUR_ACCOUNT': YOUR_ACCOUNT is a placeholder"),
                             ("cache_dir=/scratch/YOUR_USER/nanochat/cache", "error: cache_dir is '/scratch/YOUR_USER/"),
                             ("cluster.cpus_per_task=17", "error: sbatch would refuse stage base: ")):
        dry = one_error_line(cli("jobs/launch.py", recipe_file, override, "--dry-run", *root))
        assert dry.startswith(expect) and dry.endswith("nothing was submitted"), (override, dry)
        if not override.startswith("cluster.cpus"):  # sbatch's own refusal is test_slurm's
            real = one_error_line(cli("jobs/launch.py", recipe_file, override, "--executor", "slurm", *root))
            assert real.startswith(expect), (override, real)
    assert not (tmp_path / "runs" / "c" / "manifest.json").exists()
    res = cli("jobs/launch.py", recipe_file, "stages=[discover,base,report]", "--dry-run", *root)
    assert res.returncode == 0 and "# stage discover: would not submit (" in res.stdout and ": submitted" not in res.stdout


def wait_until_done(run_dir: Path, timeout_s: float = 400) -> list[dict]:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        rows = collect(run_dir)
        if rows and all(r["state"] in FINAL for r in rows):
            return rows
        time.sleep(2)
    raise AssertionError(f"run did not finish in {timeout_s}s: {collect(run_dir)}")


def test_a_failing_setup_line_fails_the_job_and_status_names_the_line(slurm, recipe_file, tmp_path):
    res = cli("jobs/launch.py", recipe_file, "stages=[base]", "--executor", "slurm", "--no-prepare",
              "cluster.setup=[export SITE_A=1, nanochat-no-such-command load cuda/12.4]",
              "--output-root", tmp_path / "runs", env={k: v for k, v in os.environ.items() if k != "NANOCHAT_HOME"})
    assert res.returncode == 0, res.stderr
    assert "note: NANOCHAT_HOME is not set in this shell, so runs go under ./runs" in res.stdout
    (row,) = wait_until_done(tmp_path / "runs" / "c")
    assert row["state"] == "FAILED", row
    assert "cluster.setup line 2 failed (exit 127): nanochat-no-such-command load cuda/12.4" in row["why"]
    out = cli("jobs/status.py", tmp_path / "runs" / "c").stdout
    assert "cluster.setup line 2 failed" in out and f"log: {tmp_path / 'runs' / 'c' / 'slurm'}" in out, out


def test_a_job_given_a_gpu_that_trains_on_the_cpu_warns_and_watch_ends_with_the_report(slurm, recipe_file, tmp_path):
    res = cli("jobs/launch.py", recipe_file, "train.device=auto", "--executor", "slurm", "--no-prepare",
              "--output-root", tmp_path / "runs")
    assert res.returncode == 0, res.stderr
    run = tmp_path / "runs" / "c"
    watch = cli("jobs/status.py", run, "--watch", timeout=400)
    assert watch.returncode == 0, watch.stdout + watch.stderr
    assert watch.stdout.strip().splitlines()[-1] == f"finished: {run / 'report.md'}"
    rows = {r["stage"]: r for r in collect(run)}
    assert rows["base"]["why"].startswith("warning: this job was given GPUs (1 on this node) but torch"), rows
    assert rows["report"]["why"] == "", "the report asks for no GPU"
