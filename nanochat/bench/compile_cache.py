"""A requeued task's time to its first step, with a warm vs a cold compile cache:

    python -m nanochat.bench.compile_cache RECIPE [section.key=value ...] [--steps 2] [--repeats 2]

Why: slurm/env.sh and jobs/tasks.py keep the Triton/Inductor caches per user and node across
jobs, so a requeued (or later) job finds its kernels compiled; keyed by job id, as before, every
job and requeue compiled from scratch.

Method, per repeat: (1) a compiled training run of `--steps` steps from scratch with a fresh,
empty cache directory, saving a checkpoint at its end; its run directory is copied; (2) the
"requeue" with a warm cache: the run resumed from that checkpoint for `--steps` more steps, the
same cache directory; (3) the requeue with a cold cache: the copy resumed the same way, a new,
empty cache directory. Each is a fresh `python -m nanochat.train` process (what a requeued job
runs); its time to first step is from the process's start to the first new `train` record in
progress.jsonl (polled every 50 ms; train.train_log_every=1), so it holds the interpreter and
torch import, data and checkpoint loading, and the compilation. Prints JSON: median, min, max
per case over the repeats, the device and versions.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from nanochat.bench import emit, environment
from nanochat.common import UserError, cli_main
from nanochat.recipe import load_recipe, recipe_argparser


def first_step_seconds(recipe: str, overrides: list[str], run_dir: Path, cache: Path, steps: int,
                       timeout_s: float = 1800) -> float:
    """Seconds from starting `python -m nanochat.train` (compiled, cache dirs under `cache`) to
    the first train record it appends to run_dir/progress.jsonl; the run then finishes."""
    log = run_dir / "progress.jsonl"
    seen = len(log.read_text().splitlines()) if log.exists() else 0
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"), "TRITON_CACHE_DIR": str(cache / "triton")}
    cmd = [sys.executable, "-m", "nanochat.train", recipe, *overrides, f"run_dir={run_dir}",
           "train.compile=true", "train.train_log_every=1", f"train.num_iterations={steps}",
           "train.save_every=-1", "train.progress_bar=false"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = None
    while proc.poll() is None and first is None:
        if log.exists():
            new = log.read_text().splitlines()[seen:]
            if any(json.loads(line).get("event") == "train" for line in new if line.strip()):
                first = time.perf_counter() - t0
        if time.perf_counter() - t0 > timeout_s:
            proc.kill()
            raise UserError(f"the training run took over {timeout_s:.0f} s to its first step: {' '.join(cmd)}")
        time.sleep(0.05)
    err = proc.communicate()[1]
    if proc.returncode != 0:
        raise UserError(f"the training run failed ({' '.join(cmd)}): {err.strip().splitlines()[-1] if err.strip() else ''}")
    if first is None:  # it ended between two polls
        first = time.perf_counter() - t0
    return first


def main(argv: list[str]) -> int:
    ap = recipe_argparser("python -m nanochat.bench.compile_cache", __doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2, help="steps of the first run; the requeue adds as many")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", help="also write the report to this file")
    opts = ap.parse_intermixed_args(argv)
    recipe = load_recipe(opts.recipe, opts.overrides)  # fails here, in one line, on a bad recipe
    if recipe.train.device_batch_size == "auto":
        raise UserError("bench.compile_cache needs a fixed train.device_batch_size (e.g. train.device_batch_size=8)")
    cases: dict[str, list[float]] = {"fresh run, cold cache": [], "requeue, warm cache": [], "requeue, cold cache": []}
    with tempfile.TemporaryDirectory(prefix="nanochat-cc-") as tmp:
        tmp = Path(tmp)
        for r in range(opts.repeats):
            run, copy, cache = tmp / f"run{r}", tmp / f"copy{r}", tmp / f"cache{r}"
            cases["fresh run, cold cache"].append(first_step_seconds(opts.recipe, opts.overrides, run, cache, opts.steps))
            shutil.copytree(run, copy)
            cases["requeue, warm cache"].append(first_step_seconds(opts.recipe, opts.overrides, run, cache, 2 * opts.steps))
            cases["requeue, cold cache"].append(first_step_seconds(opts.recipe, opts.overrides, copy,
                                                                   tmp / f"cold{r}", 2 * opts.steps))
    dtype = torch.float32 if not torch.cuda.is_available() else torch.bfloat16
    report = {
        "benchmark": "time to first step of a requeued training task, warm vs cold compile cache",
        "recipe": opts.recipe, "overrides": opts.overrides,
        "method": {"repeats": opts.repeats, "steps_first_run": opts.steps,
                   "timer": "process start → first new train record in progress.jsonl (50 ms polls)",
                   "compile": recipe.train.compile_mode},
        **environment(torch.device("cuda" if torch.cuda.is_available() else "cpu"), dtype),
        "results": {k: {"median_s": round(statistics.median(v), 2), "min_s": round(min(v), 2),
                        "max_s": round(max(v), 2), "runs_s": [round(x, 2) for x in v]} for k, v in cases.items()},
    }
    emit(report, opts.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
