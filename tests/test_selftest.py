"""The self-test (`python -m bench.selftest`): on CPU the quick run end to end (CPU parts
measured, GPU parts plainly not run), a part that fails for real while the others still run, bad
--out; and the GPU-side logic reachable without a GPU — the d12 plan and its budgets, pytest's
junit summary, the goals' met / not met."""
import json
from pathlib import Path

import pytest
import torch

from bench.selftest import PART_NAMES, TOTAL_BUDGET_S, Part, goals, plan, read_cuda_tests
from test_cli import error_line, run_cli

CPU_PARTS = ("train", "kv_sweep", "decode", "batch_size")
# the command each part runs (benchmarks from the checkout's bench/, the KV-cache stage from the library)
MODULE = {"train": "bench.throughput", "kv_sweep": "nanochat.kv_bench", "decode": "bench.decode_modes",
          "batch_size": "bench.discovery"}
on_cpu = pytest.mark.skipif(torch.cuda.is_available(),
                            reason="the CPU variant; on CUDA run the self-test itself")


def _parts(report: dict) -> dict:
    return {p["name"]: p for p in report["parts"]}


@on_cpu
def test_quick_selftest_on_cpu_measures_the_cpu_parts_and_says_the_gpu_parts_were_not_run(tmp_path):
    out = tmp_path / "st"
    res = run_cli("bench.selftest", "--quick", "--out", out, timeout=240)
    detail = f"\n--- stdout ---\n{res.stdout[-4000:]}\n--- stderr ---\n{res.stderr[-4000:]}"
    assert res.returncode == 0, detail
    report = json.loads((out / "selftest.json").read_text())
    assert report["complete"] and report["ok"] and report["quick"], detail
    env = report["environment"]
    assert env["cuda_available"] is False and env["torch"] == torch.__version__
    assert env["device"].startswith("cpu")
    assert report["gpu_parts"].startswith("GPU parts not run: no CUDA device"), report["gpu_parts"]
    parts = _parts(report)
    assert list(parts) == list(PART_NAMES), "every part is in the report, in order"
    cuda = parts["cuda_tests"]
    assert cuda["status"] == "not run" and "no CUDA device" in cuda["reason"], cuda
    assert cuda["figures"]["passed"] == 0 and cuda["figures"]["skipped"] == cuda["figures"]["tests"] > 0, \
        "all CUDA tests skipped = not run, never a pass"
    for name in CPU_PARTS:
        p = parts[name]
        assert p["status"] == "ok" and p["elapsed_s"] > 0 and p["summary"], p
        assert p["command"].startswith(f"python -m {MODULE[name]} "), p["command"]
        assert "train.device=cpu" in p["command"], "the CPU shape, not d12"
        assert (out / name / "log.txt").is_file()
    train = parts["train"]["figures"]
    assert train["eager"]["tok_per_s_median"] > 0 and train["compiled"]["tok_per_s_median"] > 0
    assert train["compiled"]["mfu_percent"] > 0 and "mfu_datasheet_percent" not in train["compiled"], \
        "no datasheet MFU on a CPU"
    kv = parts["kv_sweep"]["figures"]["points"]
    assert {(p["mode"], p["batch"]) for p in kv} == {(m, b) for m in ("cache", "nocache") for b in (1, 4)}
    assert all(p["tok_per_s_median"] > 0 and p["ttft_ms_median"] > 0 and p["roofline_percent"] > 0
               for p in kv)
    assert {p["mode"] for p in parts["decode"]["figures"]["points"]} == {"eager", "compiled"}
    bs = parts["batch_size"]["figures"]
    assert bs["discovery_s"] > 0 and bs["probes"] >= 1 and bs["batch_size"] in (2, 4)
    assert report["total_s"] >= sum(parts[n]["elapsed_s"] for n in CPU_PARTS)
    for t in report["goals"]:
        assert t["measured"] is None and t["met"] is None and t["note"] == "not measured: no CUDA device", t
    facts = dict(report["facts"])  # the one facts table, the device first
    assert list(facts)[0] == "device" and facts["device"].startswith("cpu")
    assert facts["attention kernel per layer kind (compiled step)"] == "L: sdpa"
    assert facts["host-device syncs per training step (compiled)"] == "not measured (CUDA only)"
    assert facts["reserved peak vs discovery's prediction (eager step)"] == "not measured (CUDA only)"
    assert "tok/s" in facts["compiled d12 step: tok/s, MFU"]
    table = (out / "selftest.md").read_text()
    assert "**GPU parts not run: no CUDA device" in table
    assert "| fact | value |" in table and "| host-device syncs per training step (compiled) |" in table
    assert table.count("| ok |") == len(CPU_PARTS) and "| CUDA tests | not run: no CUDA device" in table
    assert "| ≥ 1,000 tok/s | not measured: no CUDA device | — |" in table
    assert table in res.stdout, "the table is printed"
    assert not list(out.glob(".*tmp")) and not list(out.glob(".selftest-write-check-*"))


@on_cpu
def test_a_failing_part_leaves_the_others_run_and_the_exit_code_nonzero(tmp_path):
    out = tmp_path / "st"
    res = run_cli("bench.selftest", "--quick", "--out", out, "--parts", "train,kv_sweep",
                  "--set", "train:train.no_such_key=1", timeout=180)
    detail = f"\n--- stdout ---\n{res.stdout[-4000:]}\n--- stderr ---\n{res.stderr[-4000:]}"
    assert res.returncode == 1, detail
    assert "Traceback" not in res.stderr, detail
    parts = _parts(json.loads((out / "selftest.json").read_text()))
    train = parts["train"]
    assert train["status"] == "failed" and train["reason"] == "exit code 2" and train["returncode"] == 2
    assert "no_such_key" in train["error_tail"] and "train.no_such_key=1" in train["command"], train
    assert parts["kv_sweep"]["status"] == "ok" and parts["kv_sweep"]["figures"]["points"], \
        "the part after the failed one still ran"
    for name in ("cuda_tests", "decode", "batch_size"):
        assert parts[name]["status"] == "not run" and parts[name]["reason"] == "not selected (--parts)"
    table = (out / "selftest.md").read_text()
    assert "| training step, eager vs compiled | failed: exit code 2 |" in table and "no_such_key" in table
    assert "failed: train" in res.stdout


def test_unwritable_out_is_one_line_before_any_part_runs(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    res = run_cli("bench.selftest", "--quick", "--out", blocker / "st", timeout=60)
    line = error_line(res)
    assert line.startswith(f"--out {blocker / 'st'}: can't write there"), line
    assert "selftest: [" not in res.stdout, "no part ran"
    res = run_cli("bench.selftest", "--parts", "train,gpu", "--out", tmp_path / "x", timeout=60)
    assert "unknown part gpu; choose from cuda_tests, train" in error_line(res)
    assert not (tmp_path / "x").exists(), "bad flags are caught before --out is made"


def test_gpu_plan_is_d12_and_fits_8_minutes_quick_3(tmp_path):
    for quick in (False, True):
        parts = {p.name: p for p in plan(True, quick, tmp_path)}
        assert list(parts) == list(PART_NAMES)
        total = TOTAL_BUDGET_S[("cuda", quick)]
        assert sum(p.budget_s for p in parts.values()) <= total <= (180 if quick else 480)
        for name in CPU_PARTS:
            args = parts[name].args
            assert args[0] == MODULE[name] and args[1].endswith("configs/d12.yaml"), args
            assert not any(a.startswith("train.device=") or a.startswith("model.depth") for a in args)
        assert parts["cuda_tests"].args[:3] == ["pytest", "-m", "cuda and not slow" if quick else "cuda"]
        assert "tests" in parts["cuda_tests"].args, "the whole tests/ directory, every cuda mark"
        assert "--compile" in parts["train"].args and "both" in parts["train"].args
        kv = parts["kv_sweep"].args
        assert "kv_bench.cuda_graph=true" in kv and any(a.startswith("kv_bench.batch_sizes=[1,") and
                                                      a.endswith(",64]") for a in kv)
        assert "model.sequence_len=2048" in parts["batch_size"].args
        decode = parts["decode"].args
        assert "kv_bench.batch_sizes=[1]" in decode
        assert ("cuda graph" in decode) if quick else ("--modes" not in decode), "full: every mode"
        assert all(p.timeout_s > p.budget_s for p in parts.values())


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="{e}"
failures="{f}" skipped="{s}" tests="{n}" time="1.0">{cases}</testsuite></testsuites>"""


def _junit(tmp_path: Path, passed: int, failed: int, skipped: int) -> Part:
    cases = "".join(f'<testcase classname="t" name="test_ok_{i}"/>' for i in range(passed))
    cases += "".join(f'<testcase classname="t" name="test_bad_{i}"><failure message="boom"/></testcase>'
                     for i in range(failed))
    cases += "".join(f'<testcase classname="t" name="test_skip_{i}"><skipped type="pytest.skip" '
                     f'message="needs a CUDA device"/></testcase>' for i in range(skipped))
    path = tmp_path / f"junit-{passed}-{failed}-{skipped}.xml"
    path.write_text(JUNIT.format(e=0, f=failed, s=skipped, n=passed + failed + skipped, cases=cases))
    return Part("cuda_tests", "CUDA tests", [], 1, 1, path)


def test_cuda_tests_status_from_pytests_junit_xml(tmp_path):
    status, reason, figures, summary = read_cuda_tests(_junit(tmp_path, 3, 1, 2), 1, cuda=True)
    assert status == "failed" and figures["failing"] == ["test_bad_0"] and "1 failed" in summary
    status, reason, figures, _ = read_cuda_tests(_junit(tmp_path, 3, 0, 2), 0, cuda=True)
    assert status == "ok" and (figures["passed"], figures["skipped"]) == (3, 2)
    status, reason, _, _ = read_cuda_tests(_junit(tmp_path, 0, 0, 5), 0, cuda=False)
    assert status == "not run"
    assert reason == "no CUDA device: pytest skipped all 5 CUDA tests (needs a CUDA device)"
    status, reason, _, _ = read_cuda_tests(_junit(tmp_path, 0, 0, 5), 0, cuda=True)
    assert status == "not run", "all skipped on a CUDA machine is still not a pass"
    none = read_cuda_tests(_junit(tmp_path, 0, 0, 0), 5, cuda=True)
    assert none[0] == "not run", "exit 5: none collected"
    with pytest.raises(ValueError, match="exit"):
        read_cuda_tests(_junit(tmp_path, 1, 0, 0), 4, cuda=True)  # usage error: the part failed


def test_gpu_targets_met_and_not_met_from_the_figures():
    parts = {
        "decode": {"status": "ok", "figures": {"points": [
            {"batch": 1, "mode": "eager", "tok_per_s_median": 300.0},
            {"batch": 1, "mode": "cuda graph", "tok_per_s_median": 1234.5}]}},
        "kv_sweep": {"status": "ok", "figures": {"points": [
            {"mode": "nocache", "batch": 64, "tok_per_s_median": 1.0, "roofline_percent": 1.0},
            {"mode": "cache", "batch": 64, "tok_per_s_median": 9.0, "roofline_percent": 21.5}]}},
        "train": {"status": "ok", "figures": {"shape": {"seq": 2048}, "dtype": "bfloat16",
                                              "compiled": {"mfu_datasheet_percent": 41.2}}},
        "batch_size": {"status": "failed"},
    }
    got = {t["name"]: t for t in goals(parts, cuda=True)}
    assert (got["decode_b1_cuda_graph"]["measured"], got["decode_b1_cuda_graph"]["met"]) == (1234.5, True)
    assert (got["roofline_b64"]["measured"], got["roofline_b64"]["met"]) == (21.5, False), "the cache row"
    assert got["train_mfu"]["met"] is True and got["train_mfu"]["goal"] == "≥ 40 % MFU (datasheet)"
    assert got["discovery_s"]["met"] is None
    assert got["discovery_s"]["note"] == "not measured: part batch_size failed"
    parts["train"]["figures"]["shape"]["seq"] = 1024
    assert goals(parts, cuda=True)[2]["measured"] is None, "MFU target only at sequence 2048"
    parts["batch_size"] = {"status": "ok", "figures": {"discovery_s": 20.0}}
    assert goals(parts, cuda=True)[3]["met"] is True, "≤ 20 s"


def test_the_cuda_part_collects_every_cuda_marked_test_in_every_file():
    """The self-test's pytest call collects the cuda-marked tests of every file — the
    optimizer's, the cluster check's and the others beside their CPU tests — not only
    tests/test_cuda.py's (on a CPU they are collected, then skip)."""
    import subprocess
    import sys
    from bench.selftest import CUDA_TESTS, REPO
    res = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "--collect-only", "-q",
                          "-p", "no:cacheprovider", str(CUDA_TESTS.relative_to(REPO))],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    files = {line.split("::")[0] for line in res.stdout.splitlines() if "::" in line}
    assert {"tests/test_cuda.py", "tests/test_optim_parity.py", "tests/test_check.py"} <= files, res.stdout[-2000:]
