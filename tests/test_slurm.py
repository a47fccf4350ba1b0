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
from jobs.monitor import collect
from nanochat import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"}


RECIPE_FILE = {"name": "s", "cluster": {"gpus_per_node": 1, "cpus_per_task": 1, "time_min": 10}}  # (the recipe_file fixture)


def launch(*args, timeout=120, env: dict | None = None):
    res = subprocess.run([sys.executable, "jobs/launch.py", *map(str, args), "--executor", "slurm"],
                         cwd=REPO, capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, **(env or {})})
    return res


def train_records(progress: Path) -> list[dict]:
    return [r for r in map(json.loads, progress.read_text().splitlines()) if r["event"] == "train"]


def wait_for_train_records(progress: Path, n: int, timeout_s: float, poll_s: float = 0.2) -> None:
    """Until a task's progress.jsonl holds `n` training records: the task is mid-run."""
    deadline = time.time() + timeout_s
    while time.time() < deadline and not (progress.exists() and progress.read_text().count('"train"') >= n):
        time.sleep(poll_s)


def assert_losses_equal_an_uninterrupted_run(run: Path, progress: Path, overrides: list[str], out: Path):
    """The run's recipe with `overrides`, trained again in this process without interruption into
    `out`: the interrupted task's losses equal its, step by step."""
    from nanochat.recipe import load_recipe
    from nanochat.train import train_base
    train_base(load_recipe(run / "recipe.yaml", overrides + [f"run_dir={out}"]))
    assert ([(r["step"], r["loss"]) for r in train_records(progress)]
            == [(r["step"], r["loss"]) for r in train_records(out / "progress.jsonl")])


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


# --------------------------------------------------------------------------------------------
# Never a cluster the tests did not start

def sacct_states(job: str) -> list[str]:
    """The state of each task of a job (one line per array task), from accounting."""
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job, "-o", "State"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


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
