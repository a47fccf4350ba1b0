"""The cluster check (nanochat/check.py), its bus-bandwidth and scaling models, the launcher's
check stage, the node-local compile caches and srun's CPUs. Real gloo ranks: torchrun on this
machine, two processes by hand for a rank that dies, and the 2-node local SLURM."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from jobs.plan import build_plan, slurm_parameters
from jobs.tasks import compile_cache_env
from nanochat.scaling import MB, allreduce_seconds, bus_bandwidth, message_sizes, scope_groups
from nanochat.common import UserError
from nanochat.recipe import load_recipe
from jobs.estimate import ASSUMED_MFU, H100_BF16_DENSE, UPSTREAM_HOURS, cluster_table
from nanochat.scaling import efficiency

REPO = Path(__file__).resolve().parents[1]
# the tiny demo's model, eager, small all-reduces: seconds per rank on 2 CPUs
FAST = ["--no-compile", "--max-mb", "4", "--steps", "1", "--iters", "2", "--warmup", "1", "model.depth=2",
        "model.sequence_len=64", "train.total_batch_size=1024"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_check(tmp_path, *args, timeout=240):
    out = tmp_path / "check.json"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "nanochat.check", "configs/tiny.yaml", *FAST, "--out", str(out), *args],
                         cwd=REPO, capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    return res, (json.loads(out.read_text()) if out.exists() else None)


# --------------------------------------------------------------------------------------------
# The models

def test_busbw_is_nccl_tests_definition_and_inverts_to_the_ring_time():
    # nccl-tests: busbw = algbw · 2(n−1)/n; 1 GB in 1 s over 8 ranks → 1.75 GB/s
    assert bus_bandwidth(10**9, 1.0, 8) == pytest.approx(1.75e9)
    assert bus_bandwidth(10**9, 1.0, 2) == pytest.approx(1e9)
    for n in (2, 3, 8, 64):
        bw = bus_bandwidth(123 * MB, 0.37, n)
        assert allreduce_seconds(123 * MB, bw, n) == pytest.approx(0.37)
    assert allreduce_seconds(10**9, 1e9, 1) == 0.0, "one rank exchanges nothing"


def test_message_sizes_run_from_1mb_to_1gb_by_the_factor():
    assert message_sizes() == [MB, 4 * MB, 16 * MB, 64 * MB, 256 * MB, 1024 * MB]
    assert len(message_sizes(factor=2)) == 11
    assert message_sizes(MB, 16 * MB) == [MB, 4 * MB, 16 * MB]
    with pytest.raises(ValueError):
        message_sizes(MB, MB // 2)


def test_scopes_split_ranks_by_host():
    assert scope_groups(["a", "a", "b", "b"]) == {"intra-node": [[0, 1], [2, 3]], "inter-node": [[0, 2]],
                                                   "world": [[0, 1, 2, 3]]}
    assert scope_groups(["a", "a"]) == {"intra-node": [[0, 1]]}, "one node: the world is the node"
    assert scope_groups(["a", "b"]) == {"inter-node": [[0, 1]]}, "one rank per node: the world is the network"
    assert scope_groups(["a"]) == {}


def test_efficiency_is_compute_over_compute_plus_exposed_communication():
    # 1 GB of gradients over 16 ranks at 50 GB/s: 2·15/16 · 1e9 / 50e9 = 37.5 ms
    m = efficiency(0.5, 1e9, 50e9, 16, overlap=0.0)
    assert m.comm_s == pytest.approx(0.0375)
    assert m.efficiency == pytest.approx(0.5 / 0.5375)
    assert efficiency(0.5, 1e9, 50e9, 16, overlap=1.0).efficiency == pytest.approx(1.0)
    # what can hide is bounded by the backward (2/3 of the compute): 1 s of comm behind 0.3 s
    hidden = efficiency(0.3, 50e9 / (2 * 15 / 16), 50e9, 16, overlap=1.0)
    assert hidden.exposed_s == pytest.approx(1.0 - 0.2)
    assert efficiency(1.0, 1e9, 0.0, 1).efficiency == 1.0, "a single rank has nothing to exchange"
    with pytest.raises(UserError):
        efficiency(1.0, 1e9, 1e9, 2, overlap=1.5)


def test_each_recipe_is_modelled_from_its_own_flops_at_a_stated_mfu():
    d24 = load_recipe(REPO / "configs" / "d24.yaml")
    t = cluster_table(d24, [1, 2, 4])
    one, two, four = t["rows"]
    assert t["modelled"] and t["mfu"] == ASSUMED_MFU and t["flops"] == t["flops_per_token"] * t["tokens"]
    assert one["hours"] == pytest.approx(t["flops"] / (8 * H100_BF16_DENSE * ASSUMED_MFU) / 3600, rel=1e-3)
    assert t["steps"] * t["tokens_per_step"] >= t["tokens"] == 8 * t["scaling_params"]
    assert t["grad_bytes"] == 4 * t["params"]
    assert one["hours"] > two["hours"] > four["hours"], "more nodes, less time"
    assert 1.0 > two["efficiency"] > four["efficiency"] > 0, "and each node adds less"
    assert four["gpu_hours"] == pytest.approx(four["hours"] * 32, abs=0.1)
    a100 = cluster_table(d24, [1], gpu="a100")["rows"][0]
    assert a100["hours"] == pytest.approx(one["hours"] * 989 / 312, rel=1e-3), "the same MFU of a smaller peak"
    d12 = cluster_table(load_recipe(REPO / "configs" / "d12.yaml"), [1])
    assert d12["rows"][0]["hours"] < one["hours"] / 10 and d12["mfu"] == ASSUMED_MFU, \
        "d12 from its own FLOPs, not d24's hours"
    measured = cluster_table(d24, [1, 2], hours_1node=UPSTREAM_HOURS)
    assert measured["rows"][0]["hours"] == pytest.approx(UPSTREAM_HOURS) and not measured["modelled"]
    hidden = cluster_table(d24, [2], overlap=1.0)["rows"][0]
    assert hidden["efficiency"] == pytest.approx(1.0), "fully overlapped: perfect scaling"


def test_the_docs_scaling_table_is_what_the_command_prints():
    res = subprocess.run([sys.executable, "jobs/estimate.py", "configs/d24.yaml", "--nodes", "1", "2", "4"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "| 2 | 16 |" in res.stdout and "assumed (datasheets)" in res.stdout and "modelled, not measured" in res.stdout
    assert res.stdout.strip() in (REPO / "docs" / "scaling.md").read_text(), \
        "docs/scaling.md is stale: paste `python jobs/estimate.py configs/d24.yaml --nodes 1 2 4`"


# --------------------------------------------------------------------------------------------
# The check under two gloo ranks

def test_two_gloo_ranks_measure_busbw_a_step_and_a_predicted_efficiency(tmp_path):
    res, report = torchrun_check(tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert report["status"] == "ok" and report["world_size"] == 2
    assert [r["rank"] for r in report["ranks"]] == [0, 1]
    assert all(r["host"] == socket.gethostname() and r["torch"] and r["memory_gb"] > 0 for r in report["ranks"])
    intra = report["busbw"]["intra-node"]
    assert [row["bytes"] for row in intra["by_group"][0]] == [MB, 4 * MB]
    assert all(row["busbw_gbps"] > 0 for row in intra["by_group"][0])
    assert set(report["step"]) == {"0", "1"} and all(s["mfu_percent"] > 0 for s in report["step"].values())
    p = report["prediction"]
    assert 0 < p["efficiency"] <= 1 and p["busbw_scope"] == "intra-node" and p["world_size"] == 2
    assert p["grad_bytes"] == 4 * report["step"]["0"]["params"], "fp32 gradients of every parameter"
    assert "predicted scaling efficiency on 2 rank(s)" in res.stdout and "check: ok" in res.stdout


def test_a_rank_that_raises_fails_the_check_naming_its_host(tmp_path):
    res, report = torchrun_check(tmp_path, "--fail-rank", "1")
    assert res.returncode != 0
    line = f"rank 1 on {socket.gethostname()}: RuntimeError: forced failure"
    assert line in res.stderr, res.stderr[-3000:]
    assert report["status"] == "failed" and report["failed_phase"] == "step"
    assert list(report["failures"]) == ["1"] and report["failures"]["1"]["host"] == socket.gethostname()


def test_a_rank_that_dies_is_named_when_the_timeout_ends(tmp_path):
    """Two ranks started by hand (rank 0 hosts the store, as under srun); rank 1's process dies
    in the step phase; rank 0 gives up after --timeout naming it."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1"}
    out = tmp_path / "check.json"
    cmd = [sys.executable, "-m", "nanochat.check", "configs/tiny.yaml", *FAST, "--out", str(out),
           "--fail-rank", "1", "--fail-how", "exit", "--timeout", "10"]
    procs = [subprocess.Popen(cmd, cwd=REPO, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    t0 = time.monotonic()
    (_, err0), _ = [p.communicate(timeout=180) for p in procs]
    assert procs[1].returncode == 3, "the forced death"
    assert procs[0].returncode == 1
    assert f"rank 1 on {socket.gethostname()}: did not answer" in err0, err0[-2000:]
    assert time.monotonic() - t0 < 150, "nothing hangs past the timeout"
    assert json.loads(out.read_text())["failures"]["1"]["error"] is None


def test_an_unresolvable_master_addr_is_one_line(tmp_path):
    env = {**os.environ, "MASTER_ADDR": "no-such-host.invalid", "MASTER_PORT": "29999", "WORLD_SIZE": "2",
           "RANK": "1"}
    # its own run_dir: the checkout's runs/tiny may hold a launched demo run, which check refuses
    res = subprocess.run([sys.executable, "-m", "nanochat.check", "configs/tiny.yaml", f"run_dir={tmp_path / 'c'}",
                          "--no-compile"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "MASTER_ADDR='no-such-host.invalid' does not resolve" in lines[0] and "rank 1" in lines[0]


# --------------------------------------------------------------------------------------------
# The launcher's check stage

def _plan(tmp_path, stages, **cluster):
    recipe = load_recipe(REPO / "configs" / "tiny.yaml", [f"stages=[{','.join(stages)}]",
                                                           "train.device_batch_size=2", "sft.device_batch_size=2"]
                         + [f"cluster.{k}={v}" for k, v in cluster.items()])
    return build_plan(recipe, tmp_path / "run"), recipe


def test_the_check_stage_comes_first_on_the_training_allocation_and_everything_waits_for_it(tmp_path):
    plan, recipe = _plan(tmp_path, ["check", "base", "sft", "report"], nodes=2, gpus_per_node=4, cpus_per_task=6)
    names = [s.name for s in plan.stages]
    assert names == ["check", "base", "sft", "report"]
    check = plan.stage("check")
    assert (check.nodes, check.tasks_per_node, check.gpus_per_node, check.cpus_per_task) == (2, 4, 4, 6)
    assert plan.stage("base").after == ["check"] and plan.stage("base").dependency == "afterok"
    assert "check" in plan.stage("report").after
    params = slurm_parameters(recipe, check)
    assert params["nodes"] == 2 and params["ntasks_per_node"] == 4 and params["cpus_per_task"] == 6
    plan, _ = _plan(tmp_path, ["check", "discover", "base"])
    plan.recipe.train.device_batch_size = "auto"
    plan = build_plan(plan.recipe, tmp_path / "run")
    assert plan.stage("discover").after == ["check"] and plan.stage("base").after == ["discover"]


def test_without_check_in_stages_the_plan_has_no_check(tmp_path):
    plan, _ = _plan(tmp_path, ["base", "report"])
    assert plan.stage("check") is None and plan.stage("base").after == []


# --------------------------------------------------------------------------------------------
# Compile caches and CPUs

def test_compile_caches_are_per_user_node_local_0700_and_kept_across_jobs(tmp_path):
    """One rule (nanochat/paths.py): the launcher's tasks take it in-process, and the sbatch
    scripts' shell gets it as exports from `python -m nanochat.paths compile-cache`."""
    env = {**os.environ, "NANOCHAT_COMPILE_CACHE_ROOT": str(tmp_path), "USER": "alice"}
    env.pop("OMP_NUM_THREADS", None)
    py = compile_cache_env({**env, "SLURM_CPUS_PER_TASK": "6"})
    root = tmp_path / "nanochat-compile-alice"
    assert py["TORCHINDUCTOR_CACHE_DIR"] == str(root / "inductor") and py["TRITON_CACHE_DIR"] == str(root / "triton")
    assert (root.stat().st_mode & 0o777) == 0o700
    assert py["OMP_NUM_THREADS"] == "6", "a launcher task is one rank: all its CPUs"
    root.chmod(0o755)
    # an inherited path from the submitting job (another node's) is replaced, never reused
    sh = subprocess.run(["bash", "-c", "source slurm/env.sh && echo $TRITON_CACHE_DIR $TORCHINDUCTOR_CACHE_DIR"],
                        cwd=REPO, env={**env, "SLURM_JOB_ID": "123", "TORCHINDUCTOR_CACHE_DIR": "/elsewhere"},
                        capture_output=True, text=True, check=True)
    assert sh.stdout.split() == [str(root / "triton"), str(root / "inductor")], "kept across jobs: no job id"
    assert (root.stat().st_mode & 0o777) == 0o700, "the sbatch scripts tighten it too"
    quoted = subprocess.run([sys.executable, "-m", "nanochat.paths", "compile-cache"], cwd=REPO, capture_output=True,
                            text=True, check=True, env={**env, "NANOCHAT_COMPILE_CACHE_ROOT": str(tmp_path / "a b;$(x)")})
    assert f"export TRITON_CACHE_DIR='{tmp_path}/a b;$(x)/nanochat-compile-alice/triton'" in quoted.stdout


def test_torchrun_sh_passes_cpus_per_task_to_srun():
    """The text; the 2-node SLURM test below shows what the ranks got."""
    text = (REPO / "slurm" / "torchrun.sh").read_text()
    assert '--cpus-per-task="$SLURM_CPUS_PER_TASK"' in text
    assert "export OMP_NUM_THREADS" in text and "--local-addr" in text


# --------------------------------------------------------------------------------------------
# On the 2-node local SLURM (slurm/check.sbatch: srun + torchrun, one rank per node)

def _sbatch_check(tmp_path, name, *args):
    out_dir = tmp_path / name
    out_dir.mkdir()
    res = subprocess.run(["sbatch", "--parsable", "--nodes=2", "--gpus-per-node=1", "--cpus-per-task=2",
                          f"--output={out_dir / 'job.out'}", "slurm/check.sbatch", "configs/tiny.yaml", *FAST,
                          "--out", str(out_dir / "check.json"), "--timeout", "120", *args],
                         cwd=REPO, capture_output=True, text=True, check=True,
                         env=_allocation_env())
    return res.stdout.strip().split(";")[0], out_dir


def _allocation_env() -> dict:
    """The submitting environment, less conftest's OMP_NUM_THREADS=1: these tests check the
    threads torchrun.sh and the launcher derive from the allocation's CPUs. GLOO_SOCKET_IFNAME:
    the veth both local nodes share."""
    return {**{k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}, "GLOO_SOCKET_IFNAME": "sl0"}


def _wait(job: str, timeout_s: float = 400) -> str:
    deadline, state = time.time() + timeout_s, ""
    while time.time() < deadline:
        state = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job, "-o", "State"],
                               capture_output=True, text=True).stdout.strip()
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            return state
        time.sleep(2)
    raise AssertionError(f"job {job} did not end in {timeout_s}s ({state})")


@pytest.mark.usefixtures("slurm")
def test_check_sbatch_on_two_nodes_measures_the_network_and_names_a_failed_host(tmp_path):
    ok_job, ok_dir = _sbatch_check(tmp_path, "ok")
    bad_job, bad_dir = _sbatch_check(tmp_path, "bad", "--fail-rank", "1")
    assert _wait(ok_job) == "COMPLETED", (ok_dir / "job.out").read_text()[-3000:]
    report = json.loads((ok_dir / "check.json").read_text())
    hosts = {r["host"] for r in report["ranks"]}
    assert len(hosts) == 2 and "node2" in hosts, hosts
    inter = report["busbw"]["inter-node"]["by_group"][0]
    assert all(row["busbw_gbps"] > 0 for row in inter)
    assert 0 < report["prediction"]["efficiency"] <= 1 and report["prediction"]["busbw_scope"] == "inter-node"
    # srun got the CPUs (SLURM ≥ 22.05 does not pass sbatch's on) and each rank's threads match
    assert all(r["slurm_cpus_per_task"] == "2" and r["omp_num_threads"] == "2" for r in report["ranks"])
    assert _wait(bad_job) == "FAILED"
    failed = json.loads((bad_dir / "check.json").read_text())["failures"]["1"]
    assert failed["host"] in hosts
    assert f"rank 1 on {failed['host']}: RuntimeError: forced failure" in (bad_dir / "job.out").read_text()


@pytest.mark.usefixtures("slurm")
def test_the_launchers_check_stage_runs_on_the_two_node_allocation(tmp_path, tiny_recipe):
    """submitit: one task per rank on each node (rank 0 hosts the store); check.json names both."""
    from test_slurm import wait_until_done
    data = {k: v for k, v in tiny_recipe.items() if k != "run_dir"}
    data.update(name="c", stages=["check"], cluster={"nodes": 2, "gpus_per_node": 1, "cpus_per_task": 1,
                                                     "time_min": 10})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(data))
    res = subprocess.run([sys.executable, "jobs/launch.py", str(recipe), "--executor", "slurm", "--no-prepare",
                          "--output-root", str(tmp_path / "runs")], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env=_allocation_env())
    assert res.returncode == 0, res.stderr
    run = tmp_path / "runs" / "c"
    rows = wait_until_done(run)
    logs = "".join(p.read_text() for p in (run / "slurm").glob("*/*_log.err"))
    assert rows[0]["state"] == "COMPLETED", logs[-3000:]
    report = json.loads((run / "check" / "check.json").read_text())
    assert len({r["host"] for r in report["ranks"]}) == 2 and report["status"] == "ok"
    assert all(r["omp_num_threads"] == "1" for r in report["ranks"]), "the task's one CPU"
    assert rows[0]["progress"].startswith("ok, 2 rank(s) on 2 host(s), busbw "), "status says the verdict"


def test_the_check_stage_task_writes_check_json(tmp_path, tiny_recipe):
    """jobs.tasks.run_task runs the check stage of a launched plan in-process (one rank)."""
    recipe = tmp_path / "r.yaml"
    data = {k: v for k, v in tiny_recipe.items() if k != "run_dir"}
    recipe.write_text(yaml.safe_dump({**data, "stages": ["check", "base"], "name": "c"}))
    res = subprocess.run([sys.executable, "jobs/launch.py", str(recipe), "stages=[check]", "--executor", "local",
                          "--no-prepare", "--output-root", str(tmp_path / "runs")],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:] + res.stdout[-2000:]
    report = json.loads((tmp_path / "runs" / "c" / "check" / "check.json").read_text())
    assert report["status"] == "ok" and report["prediction"]["efficiency"] == 1.0
    assert "ok, 1 rank(s) on 1 host(s)" in res.stdout, "the local executor's end line says the verdict"


@pytest.mark.cuda
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_the_check_on_one_gpu_compiles_a_d12_step_and_reports_its_mfu(tmp_path):
    out = tmp_path / "check.json"
    res = subprocess.run([sys.executable, "-m", "nanochat.check", "configs/d12.yaml", "train.device_batch_size=8",
                          "--steps", "3", "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(out.read_text())
    rank = report["ranks"][0]
    assert rank["device"] == "cuda:0" and rank["cuda"] and rank["nccl"]
    step = report["step"]["0"]
    assert step["compile"] and step["dtype"] == "bfloat16" and 0 < step["mfu_percent"] < 100
    assert report["prediction"]["efficiency"] == 1.0, "one rank exchanges nothing"
