"""GPU self-test:  python -m bench.selftest [--out DIR] [--quick]

Every GPU path checked and the GPU figures measured by one command, in one process tree: each
part is a child process (`python -m ...`) with its own timeout, timed.

1. cuda_tests: `pytest -m cuda tests/` — every test marked `cuda`, in whichever file (test_cuda.py
   holds most; the optimizer, the cluster check and others keep theirs beside their CPU tests):
   passed / failed / skipped from pytest's junit
   XML; tests that all skip (no CUDA) mean "not run", never a pass (`--quick` leaves out tests
   also marked `slow`);
2. train: `bench.train configs/d12.yaml` at batch 16, eager vs compiled — tokens/s, MFU against
   the datasheet peak and against a measured matmul, the attention kernel each layer kind ran
   with, host-device syncs per step, the reserved peak;
3. kv_sweep: `bench.kv_sweep configs/d12.yaml` at batch 1, (8,) 64 — KV cache (CUDA graph on) vs no
   cache: tokens/s, time to first token, % of the memory roofline;
4. decode: `bench.decode configs/d12.yaml` at batch 1 — eager vs compiled vs CUDA graph
   (`--quick`: eager vs CUDA graph; the CUDA tests check compiled decode);
5. batch_size: `bench.batch_size configs/d12.yaml model.sequence_len=2048` — discovery time,
   probes, the chosen device batch.

Sized for one H100/H200: about 8 minutes in all, `--quick` about 3 (the budgets in `plan`, each
part's elapsed time next to its budget in the table). The GPU goals of issue 15 (d12 decode at
batch 1 ≥ 1,000 tok/s with the CUDA graph; batch 64 ≥ 25% of the memory roofline; compiled d12
training at sequence 2048 ≥ 40% bf16 MFU; discovery ≤ 20 s uncompiled) are shown next to the
measured values, met or not, when measured on CUDA.

Without CUDA the CUDA tests skip (not run) and the same benches run at a small CPU shape
(configs/tiny.yaml made smaller; `--quick` in about a minute on 2 cores) to check the commands
and their reports; the output says plainly that the GPU parts were not run.

Then one facts table with the device name (bench/selftest_facts.py): attention kernel
per layer kind, syncs per step, reserved memory against discovery's prediction, MFU and tok/s
of the compiled d12 step, decode tok/s with and without the CUDA graph.

Writes DIR/selftest.json (the device, torch and CUDA versions; per part its command, elapsed
seconds, status ok / failed / not run and why, key figures, the error tail of a failed part; the
goals) — rewritten after every part, so a killed run keeps what finished — and DIR/selftest.md,
the table, also printed. Each part's output is in DIR/<part>/log.txt. Exit code 1 when a part
that ran failed (the other parts still run), 2 for bad input (an unwritable --out, checked before
anything runs), 143 on SIGTERM (the running part and its children stopped, the report written).

For tests and debugging: `--parts train,decode` runs only those parts (the others: not run, not
selected); `--set PART:ARG` appends ARG — a recipe override `section.key=value` or a flag — to
that part's command (repeatable), e.g. `--set train:train.no_such_key=1` makes train fail.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from bench import selftest_facts
from nanochat.common import UserError, atomic_write_json, atomic_write_text, cli_main, git_commit, now_iso

REPO = Path(__file__).resolve().parents[1]
D12 = REPO / "configs" / "d12.yaml"
TINY = REPO / "configs" / "tiny.yaml"
CUDA_TESTS = REPO / "tests"  # every cuda-marked test, not only tests/test_cuda.py's
PART_NAMES = ("cuda_tests", "train", "kv_sweep", "decode", "batch_size")
TOTAL_BUDGET_S = {("cuda", False): 480, ("cuda", True): 180, ("cpu", False): 150, ("cpu", True): 60}
# The CPU stand-in for d12: a tiny shape whose compiles take seconds, not minutes.
CPU_SHAPE = ["model.depth=1", "model.n_embd=32", "model.n_head=1", "model.sequence_len=32",
             "model.vocab_size=256", "train.device=cpu"]
CPU_SHAPE_NAME = "configs/tiny.yaml at depth 1, width 32, sequence 32"
TAIL_LINES, TAIL_CHARS = 40, 4000

# What the environment probe prints: where the parts run (a child, so that this process never
# holds a CUDA context while the parts measure free memory).
PROBE = r"""
import json, os, platform, socket, torch
cuda = torch.cuda.is_available()
env = {"host": socket.gethostname(), "python": platform.python_version(), "torch": torch.__version__,
       "cuda_build": torch.version.cuda, "cuda_available": cuda, "cpu_count": os.cpu_count(),
       "platform": platform.platform()}
if cuda:
    p = torch.cuda.get_device_properties(0)
    env |= {"device": torch.cuda.get_device_name(0), "gpu_count": torch.cuda.device_count(),
            "capability": "%d.%d" % (p.major, p.minor), "gpu_memory_gb": round(p.total_memory / 2**30, 1),
            "cudnn": torch.backends.cudnn.version(), "sm_count": p.multi_processor_count}
else:
    env["device"] = "cpu (%s, %d cores)" % (platform.processor() or platform.machine(), os.cpu_count())
print(json.dumps(env))
"""


@dataclass
class Part:
    name: str
    title: str
    args: list[str]                 # after `python -m`
    budget_s: int                   # planned elapsed time on the target machine
    timeout_s: int                  # killed (with its children) past this
    report: Path                    # what the part writes: its JSON report, pytest's junit XML


def plan(cuda: bool, quick: bool, out: Path) -> list[Part]:
    """The parts, sized for one H100/H200 (8 min in all, quick 3) or, without CUDA, for a small
    CPU shape (quick: a minute on 2 cores). Budgets on CUDA are estimates until a GPU run
    measures them (its elapsed times are in selftest.json)."""
    def q(full, fast):
        return fast if quick else full

    if cuda:
        recipe, shape = str(D12), []
        # d12.yaml discovers its batch; the step is measured at a fixed one (bench.train)
        train = ["train.device_batch_size=16", "--warmup", q("3", "2"), "--steps", q("5", "3"),
                 "--repeats", q("3", "2")]
        sweep = [f"kv_bench.batch_sizes={q('[1,8,64]', '[1,64]')}", "kv_bench.include_largest=false",
                 "kv_bench.cuda_graph=true", "kv_bench.warmup=1", f"kv_bench.repeats={q(3, 2)}",
                 f"kv_bench.max_new_tokens={q(200, 100)}"]
        decode = ["kv_bench.batch_sizes=[1]", "kv_bench.warmup=1", f"kv_bench.max_new_tokens={q(200, 100)}",
                  "--rounds", q("3", "2")] + q([], ["--modes", "cuda graph"])
        discover = [str(D12), "model.sequence_len=2048", "--hits", q("5", "3"), "--warmup", "1",
                    "--repeats", q("2", "1")]
        budgets = q({"cuda_tests": 180, "train": 100, "kv_sweep": 60, "decode": 90, "batch_size": 50},
                    {"cuda_tests": 70, "train": 50, "kv_sweep": 25, "decode": 15, "batch_size": 20})
    else:
        recipe, shape = str(TINY), CPU_SHAPE
        train = ["train.device_batch_size=4", "--malloc", "tuned", "--warmup", "2",
                 "--steps", q("4", "2"), "--repeats", q("3", "2")]
        sweep = [f"kv_bench.batch_sizes={q('[1,4,16]', '[1,4]')}", "kv_bench.include_largest=false",
                 "kv_bench.prompt_len=8", f"kv_bench.max_new_tokens={q(32, 16)}", "kv_bench.warmup=1",
                 f"kv_bench.repeats={q(3, 2)}", "--malloc", "tuned"]
        decode = [f"kv_bench.batch_sizes={q('[1,4]', '[1]')}", "kv_bench.prompt_len=8",
                  f"kv_bench.max_new_tokens={q(32, 16)}", "kv_bench.warmup=1", "--rounds", q("3", "2")]
        # candidates 2, 4 (, 8): two probes in quick, and the fixed batch is the one found
        discover = [recipe, *shape, "train.device_batch_size=4", "train.total_batch_size=256",
                    "discovery.min_batch_size=2", f"discovery.max_batch_size={q(8, 4)}",
                    "--hits", "3", "--warmup", "2", "--repeats", "2"]
        budgets = q({"cuda_tests": 8, "train": 45, "kv_sweep": 20, "decode": 35, "batch_size": 30},
                    {"cuda_tests": 6, "train": 22, "kv_sweep": 10, "decode": 12, "batch_size": 10})
    def part(name: str, title: str, args: list[str], report: Path) -> Part:
        # timeouts: room for a slow machine, but a hung part can't eat the whole run
        budget = budgets[name]
        return Part(name, title, args, budget, max(60, 2 * budget) if cuda else max(90, 4 * budget),
                    report)

    mark = "cuda and not slow" if quick else "cuda"  # quick: tests marked `slow` stay out
    return [
        part("cuda_tests", "CUDA tests",
             ["pytest", "-m", mark, "-q", "-rfEs", "-p", "no:cacheprovider",
              str(CUDA_TESTS.relative_to(REPO)), f"--junitxml={out / 'cuda_tests' / 'junit.xml'}"],
             out / "cuda_tests" / "junit.xml"),
        part("train", "training step, eager vs compiled",
             ["bench.throughput", recipe, *shape, *train, "--compile", "both",
              "--json", str(out / "train" / "report.json")], out / "train" / "report.json"),
        part("kv_sweep", "KV-cache sweep, cache vs no cache",
             ["nanochat.kv_bench", recipe, *shape, *sweep, f"run_dir={out / 'kv_sweep' / 'run'}",
              "--out", str(out / "kv_sweep")], out / "kv_sweep" / "results.json"),
        part("decode", "decode modes, eager vs " + ("CUDA graph" if cuda and quick else
                                                    "compiled vs CUDA graph" if cuda else "compiled"),
             ["bench.decode_modes", recipe, *shape, *decode, f"run_dir={out / 'decode' / 'run'}",
              "--json", str(out / "decode" / "report.json")], out / "decode" / "report.json"),
        part("batch_size", "batch-size discovery",
             ["bench.discovery", *discover, "--json", str(out / "batch_size" / "report.json")],
             out / "batch_size" / "report.json"),
    ]


# --------------------------------------------------------------------------------------------
# Running a part

class Terminated(Exception):
    """SIGTERM (e.g. SLURM's time limit): stop the running part's process group, then exit."""


def _on_sigterm(signum, frame):
    raise Terminated()


def _stop(proc: subprocess.Popen) -> None:
    """Stop a part and every process it started (its own session: compile workers, pytest's
    children): SIGTERM, then SIGKILL after 5 s."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_part(part: Part, out: Path, env: dict) -> tuple[int | None, float, Path]:
    """Run the part as a child (`python -m ...`, output to DIR/<part>/log.txt): (exit code or
    None when it timed out, elapsed seconds, log path)."""
    part_dir = out / part.name
    part_dir.mkdir(parents=True, exist_ok=True)
    if part.report.exists():
        part.report.unlink()  # a report left by an earlier run must not pass for this one's
    log = part_dir / "log.txt"
    cmd = [sys.executable, "-m", *part.args]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc = proc.wait(timeout=part.timeout_s)
        except subprocess.TimeoutExpired:
            _stop(proc)
            rc = None
        except BaseException:  # interrupted or terminated: never leave the part running
            _stop(proc)
            raise
    return rc, time.perf_counter() - t0, log


def log_tail(log: Path) -> str:
    lines = log.read_text(errors="replace").splitlines()[1:]
    return "\n".join(lines[-TAIL_LINES:])[-TAIL_CHARS:]


# --------------------------------------------------------------------------------------------
# Reading what each part reports: (status, reason or None, figures, one-line summary)

def read_cuda_tests(part: Part, rc: int, cuda: bool) -> tuple[str, str | None, dict, str]:
    if rc == 5:
        return "not run", "pytest collected no CUDA tests", {}, ""
    if rc not in (0, 1) or not part.report.exists():
        raise ValueError(f"pytest exited with code {rc}")
    suites = ET.parse(part.report).getroot()
    suites = [suites] if suites.tag == "testsuite" else list(suites.iter("testsuite"))
    total = sum(int(s.get("tests", 0)) for s in suites)
    failed = sum(int(s.get("failures", 0)) for s in suites)
    errors = sum(int(s.get("errors", 0)) for s in suites)
    skipped = sum(int(s.get("skipped", 0)) for s in suites)
    passed = total - failed - errors - skipped
    reasons = sorted({el.get("message", "").strip() for s in suites for el in s.iter("skipped")} - {""})
    figures = {"passed": passed, "failed": failed, "errors": errors, "skipped": skipped,
               "tests": total, "skip_reasons": reasons}
    summary = f"{passed} passed, {failed} failed, {errors} errors, {skipped} skipped"
    if failed or errors:
        bad = [tc.get("name") for s in suites for tc in s.iter("testcase")
               if tc.find("failure") is not None or tc.find("error") is not None]
        figures["failing"] = bad
        return "failed", None, figures, summary + ": " + ", ".join(bad[:6])
    if passed == 0:
        why = "; ".join(reasons) or "every test skipped"
        where = "no CUDA device" if not cuda else "CUDA is here, yet"
        return "not run", f"{where}: pytest skipped all {skipped} CUDA tests ({why})", figures, summary
    return "ok", None, figures, summary


def _load(part: Part) -> dict:
    if not part.report.exists():
        raise ValueError(f"it wrote no report ({part.report.name})")
    return json.loads(part.report.read_text())


def read_train(part: Part, cuda: bool) -> tuple[str, str | None, dict, str]:
    r = _load(part)
    runs = {("compiled" if x["compile"] else "eager"): x for x in r["results"]}
    keys = ("tok_per_s_median", "tok_per_s_min", "tok_per_s_max", "mfu_percent",
            "mfu_datasheet_percent", "warmup_s", "compilations", "peak_mem_gb", "peak_reserved_gb",
            "attention_ran", "syncs_per_step")
    figures = {"shape": r["shape"], "dtype": r["dtype"], "peak_datasheet": r.get("peak_datasheet"),
               **{k: {f: v[f] for f in keys if f in v} for k, v in runs.items()}}
    e, c = runs["eager"], runs["compiled"]
    figures["compiled_vs_eager"] = round(c["tok_per_s_median"] / e["tok_per_s_median"], 3)
    mfu = "mfu_datasheet_percent" if "mfu_datasheet_percent" in c else "mfu_percent"
    what = "datasheet" if mfu == "mfu_datasheet_percent" else "measured-matmul"
    summary = (f"eager {e['tok_per_s_median']:,.0f} tok/s, compiled {c['tok_per_s_median']:,.0f} "
               f"(×{figures['compiled_vs_eager']:.2f}, warm-up {c['warmup_s']:.0f} s); MFU "
               f"({what} peak) eager {e[mfu]:.1f}%, compiled {c[mfu]:.1f}%")
    return "ok", None, figures, summary


def read_kv_sweep(part: Part, cuda: bool) -> tuple[str, str | None, dict, str]:
    r = _load(part)
    points = []
    for x in r["results"]:
        p = {"mode": x["mode"], "batch": x["batch"]}
        if "error" in x:
            p["error"] = x["error"]
        else:
            p |= {"tok_per_s_median": round(x["tok_per_s_median"], 1),
                  "ttft_ms_median": round(x["ttft_ms_median"], 2),
                  "roofline_percent": round(100 * x["roofline_fraction"], 3)}
            if "speedup_vs_nocache" in x:
                p["speedup_vs_nocache"] = round(x["speedup_vs_nocache"], 2)
        points.append(p)
    figures = {"cuda_graph": r["method"]["engine"]["cuda_graph"],
               "memory_bandwidth_gb_s": round(r["memory_bandwidth_gb_s"], 1), "points": points}
    bits = []
    for p in points:
        if p["mode"] == "cache" and "error" not in p:
            bits.append(f"b{p['batch']} {p['tok_per_s_median']:,.0f} tok/s, TTFT "
                        f"{p['ttft_ms_median']:.1f} ms, {p['roofline_percent']:.0f}% roofline"
                        + (f", ×{p['speedup_vs_nocache']:.1f} no cache"
                           if "speedup_vs_nocache" in p else ""))
    errors = [f"{p['mode']} b{p['batch']}: {p['error']}" for p in points if "error" in p]
    summary = ("cache" + (" (CUDA graph)" if figures["cuda_graph"] else "") + ": " + "; ".join(bits)
               + ("; " + "; ".join(errors) if errors else ""))
    return "ok", None, figures, summary


def read_decode(part: Part, cuda: bool) -> tuple[str, str | None, dict, str]:
    r = _load(part)
    keys = ("batch", "mode", "tok_per_s_median", "vs_eager", "tokens_equal_to_eager", "warmup_s")
    points = [{k: x[k] for k in keys} for x in r["results"]]
    by_batch: dict[int, list[str]] = {}
    for p in points:  # a mode whose tokens differ from eager's says so
        same = p["tokens_equal_to_eager"]
        by_batch.setdefault(p["batch"], []).append(
            f"{p['mode']} {p['tok_per_s_median']:,.0f}" + (f" ({100 * same:.1f}% tokens = eager)"
                                                           if same < 1 else ""))
    summary = "; ".join(f"b{b}: " + ", ".join(v) + " tok/s" for b, v in by_batch.items())
    return "ok", None, {"new_tokens": r["new_tokens"], "points": points}, summary


def read_batch_size(part: Part, cuda: bool) -> tuple[str, str | None, dict, str]:
    r = _load(part)
    d = r["discovery"]
    figures = {"discovery_s": d["seconds"], "probes": d["probes"], "batch_size": d["batch_size"],
               "largest": d["largest"], "usable_gb": d["usable_gb"],
               "probed": [(p["batch"], p["fits"]) for p in d["probes_detail"]],
               "cache_hit_ms_median": r["cache_hit_ms"]["median"],
               "discovered_vs_fixed": r["speedup_discovered_vs_fixed"]}
    summary = (f"discovery {d['seconds']:.1f} s, {d['probes']} probes → batch {d['batch_size']} "
               f"(usable {d['usable_gb']:.1f} GB); tok/s discovered vs fixed ×"
               f"{r['speedup_discovered_vs_fixed']:.2f}")
    return "ok", None, figures, summary


READERS = {"train": read_train, "kv_sweep": read_kv_sweep, "decode": read_decode,
           "batch_size": read_batch_size}


# --------------------------------------------------------------------------------------------
# The GPU goals (issue 15; "targets" elsewhere are the report's time-to-target metrics)

def _point(parts: dict, part: str, **match) -> dict | None:
    for p in parts.get(part, {}).get("figures", {}).get("points", []):
        if all(p.get(k) == v for k, v in match.items()) and "error" not in p:
            return p
    return None


def goals(parts: dict, cuda: bool) -> list[dict]:
    """Each GPU goal with the measured value and met / not met (None when not measured)."""
    train = parts.get("train", {}).get("figures", {})
    compiled = train.get("compiled", {})
    bs = parts.get("batch_size", {}).get("figures", {})
    b1 = _point(parts, "decode", batch=1, mode="cuda graph")
    b64 = _point(parts, "kv_sweep", batch=64, mode="cache")
    seq_ok = train.get("shape", {}).get("seq") == 2048 and train.get("dtype") == "bfloat16"
    rows = [
        ("decode_b1_cuda_graph", "d12 decode, batch 1, CUDA graph (bench.decode)", "tok/s", ">=", 1000,
         "decode", b1 and b1["tok_per_s_median"]),
        ("roofline_b64", "d12 KV-cache decode, batch 64 (kv_sweep)", "% of memory roofline", ">=", 25,
         "kv_sweep", b64 and b64["roofline_percent"]),
        ("train_mfu", "compiled d12 training, sequence 2048, bf16 (H100/H200)", "% MFU (datasheet)",
         ">=", 40, "train", compiled.get("mfu_datasheet_percent") if seq_ok else None),
        ("discovery_s", "batch-size discovery, d12, sequence 2048, uncompiled", "s", "<=", 20,
         "batch_size", bs.get("discovery_s")),
    ]
    out = []
    for name, what, unit, op, goal, part, value in rows:
        t = {"name": name, "what": what, "goal": f"{op.replace('>=', '≥').replace('<=', '≤')} "
             f"{goal:,} {unit}", "measured": None, "met": None}
        status = parts.get(part, {}).get("status", "not run")
        if not cuda:
            t["note"] = "not measured: no CUDA device"
        elif value is None:
            t["note"] = f"not measured: part {part} {status}" if status != "ok" else \
                "not measured: the part's report has no such figure"
        else:
            t["measured"] = value
            t["met"] = value >= goal if op == ">=" else value <= goal
        out.append(t)
    return out


# --------------------------------------------------------------------------------------------
# The report

def markdown(report: dict) -> str:
    env = report["environment"]
    cuda = env["cuda_available"]
    versions = f"torch {env['torch']}" + (f", CUDA {env['cuda_build']}" if env.get("cuda_build") else "")
    lines = [f"# nanochat self-test{' (quick)' if report['quick'] else ''} — {env['device']}", "",
             f"{versions}; Python {env['python']}; host {env['host']}; commit "
             f"{report['git_commit']}; {report['started']}", ""]
    if not cuda:
        lines += [f"**{report['gpu_parts']}**", ""]
    lines += ["| part | status | elapsed s (budget) | figures |", "|---|---|---:|---|"]
    for p in report["parts"]:
        status = p["status"] + (f": {p['reason']}" if p.get("reason") else "")
        elapsed = "" if p["elapsed_s"] is None else f"{p['elapsed_s']:.1f} ({p['budget_s']})"
        figures = p.get("summary") or ""
        if p["status"] == "failed" and p.get("error_tail"):
            last = [ln for ln in p["error_tail"].splitlines() if ln.strip()]
            figures = (figures + "; " if figures else "") + (last[-1] if last else "")
        lines.append(f"| {p['title']} | {status} | {elapsed} | {figures.replace('|', '/')} |")
    total = report.get("total_s")
    if total is not None:
        lines += ["", f"Total {total:.1f} s (budget {report['budget_s']} s"
                  f"{'' if cuda else ', CPU shape'}). Logs: {report['out_dir']}/<part>/log.txt"]
    lines += ["", *selftest_facts.markdown(report.get("facts") or [])]
    lines += ["", "| GPU target | goal | measured | met |", "|---|---|---:|---|"]
    for t in report["goals"]:
        measured = t.get("note") if t["measured"] is None else f"{t['measured']:,}"
        met = "—" if t["met"] is None else ("met" if t["met"] else "**not met**")
        lines.append(f"| {t['what']} | {t['goal']} | {measured} | {met} |")
    return "\n".join(lines) + "\n"


def check_out_dir(out: Path) -> None:
    """Bad --out is one line before anything runs."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".selftest-write-check-"):
            pass
    except OSError as e:
        raise UserError(f"--out {out}: can't write there ({e.strerror or e}); "
                        f"pass a writable directory") from None


def probe_environment(env: dict) -> dict:
    res = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)
    if res.returncode != 0:
        raise UserError("selftest: `import torch` fails in this environment: "
                        + (res.stderr.strip().splitlines() or ["(no output)"])[-1])
    return json.loads(res.stdout.strip().splitlines()[-1])


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.selftest",
                                 description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:]))
    ap.add_argument("--out", default="runs/selftest", help="output directory (default: runs/selftest)")
    ap.add_argument("--quick", action="store_true", help="the 3-minute variant (CPU: about a minute)")
    ap.add_argument("--parts", help=f"comma-separated subset of {', '.join(PART_NAMES)} (default: all)")
    ap.add_argument("--set", action="append", default=[], metavar="PART:ARG",
                    help="append ARG to PART's command (a section.key=value override or a flag)")
    return ap.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    selected = PART_NAMES if not args.parts else [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in selected if p not in PART_NAMES]
    if unknown:
        raise UserError(f"--parts: unknown part {', '.join(unknown)}; choose from {', '.join(PART_NAMES)}")
    extra: dict[str, list[str]] = {}
    for s in args.set:
        name, sep, arg = s.partition(":")
        if not sep or name not in PART_NAMES or not arg:
            raise UserError(f"--set {s!r}: expected PART:ARG with PART one of {', '.join(PART_NAMES)}")
        extra.setdefault(name, []).append(arg)
    for path in (D12, TINY):
        if not path.is_file():
            raise UserError(f"{path} not found: run the self-test from a checkout (pip install -e .)")
    out = Path(args.out).expanduser().resolve()
    check_out_dir(out)

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = now_iso()
    environment = probe_environment(env)
    cuda = environment["cuda_available"]
    parts = plan(cuda, args.quick, out)
    for p in parts:
        p.args += extra.get(p.name, [])
    report = {
        "selftest": "nanochat GPU self-test (issue 15)", "quick": args.quick, "started": started,
        "git_commit": git_commit(REPO),
        "command": shlex.join(["python", "-m", "bench.selftest", *argv]),
        "out_dir": str(out), "environment": environment,
        "gpu_parts": "run on " + environment["device"] if cuda else
        "GPU parts not run: no CUDA device on this machine. The CUDA tests were skipped and the "
        f"benches ran at a small CPU shape ({CPU_SHAPE_NAME}) to check the commands "
        "and their reports; no GPU figure was measured and no GPU target checked. On a GPU node: "
        "python -m bench.selftest (or sbatch slurm/selftest.sbatch).",
        "budget_s": TOTAL_BUDGET_S[("cuda" if cuda else "cpu", args.quick)],
        "total_s": None, "complete": False,
        "parts": [{"name": p.name, "title": p.title, "variant": "pytest -m cuda" if p.name == "cuda_tests"
                   else "d12" if cuda else f"CPU shape: {CPU_SHAPE_NAME}",
                   "command": shlex.join(["python", "-m", *p.args]), "budget_s": p.budget_s,
                   "timeout_s": p.timeout_s, "elapsed_s": None, "status": "pending"} for p in parts],
        "goals": [],
    }
    print(f"selftest: {environment['device']}, torch {environment['torch']}"
          + (f", CUDA {environment['cuda_build']}" if cuda else " — no CUDA: GPU parts not run, "
             "CPU shape") + f"; writing {out}", flush=True)
    atomic_write_json(out / "selftest.json", report)
    t_all = time.perf_counter()
    terminated = run_parts(parts, report, selected, cuda, out, env)
    report["total_s"] = round(time.perf_counter() - t_all, 1)
    report["complete"] = not terminated
    report["goals"] = goals({e["name"]: e for e in report["parts"]}, cuda)
    report["facts"] = selftest_facts.facts({e["name"]: e for e in report["parts"]}, environment)
    failed = [e["name"] for e in report["parts"] if e["status"] == "failed"]
    report["ok"] = not failed
    atomic_write_json(out / "selftest.json", report)
    table = markdown(report)
    atomic_write_text(out / "selftest.md", table)
    print(table, end="")
    print(f"selftest: wrote {out / 'selftest.json'} and {out / 'selftest.md'}"
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 143 if terminated else 1 if failed else 0


def run_parts(parts: list[Part], report: dict, selected, cuda: bool, out: Path, env: dict) -> bool:
    """Run the selected parts in order, filling their report entries and rewriting selftest.json
    after each. True when SIGTERM stopped the run (the running part is failed, the rest not run)."""
    old = signal.signal(signal.SIGTERM, _on_sigterm)
    by_name = {e["name"]: e for e in report["parts"]}
    try:
        for i, p in enumerate(parts, 1):
            entry = by_name[p.name]
            if p.name not in selected:
                entry |= {"status": "not run", "reason": "not selected (--parts)"}
                continue
            if p.name == "cuda_tests" and not CUDA_TESTS.is_dir():
                entry |= {"status": "failed" if cuda else "not run",
                          "reason": f"{CUDA_TESTS.relative_to(REPO)} not found"}
                continue
            print(f"selftest: [{i}/{len(parts)}] {p.name}: {entry['command']}", flush=True)
            entry["status"] = "running"
            rc, elapsed, log = run_part(p, out, env)
            entry |= {"elapsed_s": round(elapsed, 1), "returncode": rc,
                      "log": str(log.relative_to(out))}
            entry |= judge(p, rc, cuda, log)
            print(f"selftest: [{i}/{len(parts)}] {p.name}: {entry['status']}"
                  + (f" ({entry['reason']})" if entry.get("reason") else "")
                  + f" in {elapsed:.1f} s (budget {p.budget_s} s)"
                  + (f" — {entry['summary']}" if entry.get("summary") else ""), flush=True)
            report["goals"] = goals(by_name, cuda)
            atomic_write_json(out / "selftest.json", report)
    except Terminated:
        for entry in report["parts"]:
            if entry["status"] == "running":
                entry |= {"status": "failed", "reason": "terminated (SIGTERM) while running"}
            elif entry["status"] == "pending":
                entry |= {"status": "not run", "reason": "terminated (SIGTERM) before it started"}
        print("selftest: terminated (SIGTERM)", file=sys.stderr, flush=True)
        return True
    finally:
        signal.signal(signal.SIGTERM, old)
    return False


def judge(part: Part, rc: int | None, cuda: bool, log: Path) -> dict:
    """status ok / failed / not run, the reason, figures and summary, the error tail if failed."""
    if rc is None:
        return {"status": "failed", "reason": f"timed out after {part.timeout_s} s",
                "error_tail": log_tail(log)}
    if rc != 0 and "No module named pytest" in log.read_text(errors="replace"):
        return {"status": "failed", "reason": "pytest is not installed (pip install -e '.[test]')",
                "error_tail": log_tail(log)}
    if part.name == "cuda_tests" and rc not in (0, 1, 5):  # 2-4: interrupted, internal, usage
        return {"status": "failed", "reason": f"pytest exit code {rc}", "error_tail": log_tail(log)}
    try:
        if part.name == "cuda_tests":
            status, reason, figures, summary = read_cuda_tests(part, rc, cuda)
        elif rc != 0:
            return {"status": "failed", "reason": f"exit code {rc}", "error_tail": log_tail(log)}
        else:
            status, reason, figures, summary = READERS[part.name](part, cuda)
    except (ValueError, KeyError, TypeError, ZeroDivisionError, ET.ParseError) as e:
        return {"status": "failed", "reason": f"report unreadable: {type(e).__name__}: {e}",
                "error_tail": log_tail(log)}
    entry = {"status": status, "figures": figures, "summary": summary}
    if reason:
        entry["reason"] = reason
    if status == "failed":
        entry["error_tail"] = log_tail(log)
    return entry


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
