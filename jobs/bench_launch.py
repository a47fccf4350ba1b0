"""Wall time from `jobs/launch.py` to the first training step, on the SLURM that answers here:

    python jobs/bench_launch.py configs/tiny.yaml [section.key=value ...]

Runs the recipe twice with `train.device_batch_size=auto` and a fresh batch-size cache: first a
miss (a discovery job runs before training), then `--force` with the cache filled (no discovery
job). Each time measures from the launch command's start to the first `train` record in base task
0's progress log (train_log_every=1), and prints both as JSON. Benchmarks are commands, not tests.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nanochat.common import UserError, cli_main  # noqa: E402
from nanochat.recipe import load_recipe, recipe_argparser  # noqa: E402


def time_to_first_step(recipe: str, overrides: list[str], out_root: Path, extra: list[str],
                       timeout_s: float = 900) -> dict:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "jobs/launch.py", recipe, *overrides, "--executor", "slurm",
                    "--output-root", str(out_root), *extra], cwd=ROOT, check=True,
                   capture_output=True, text=True)
    submitted = time.perf_counter() - t0
    run = out_root / load_recipe(recipe, overrides).name
    progress = run / "base" / "000" / "progress.jsonl"
    while time.perf_counter() - t0 < timeout_s:
        if progress.exists() and '"event": "train"' in progress.read_text():
            break
        time.sleep(0.2)
    else:
        raise UserError(f"no training step within {timeout_s}s; see python jobs/status.py {run}")
    stages = list(json.loads((run / "manifest.json").read_text())["stages"])
    subprocess.run(["scancel", "--name", f"{run.name}-base"], check=False)
    return {"stages": stages, "launch_s": round(submitted, 2),
            "launch_to_first_step_s": round(time.perf_counter() - t0, 2)}


def main(argv: list[str]) -> int:
    ap = recipe_argparser("python jobs/bench_launch.py", "Wall time from jobs/launch.py to the first "
                          "training step on the SLURM that answers here, with a batch-size cache miss "
                          "and then a hit; prints JSON. Submits real jobs (and cancels them).")
    args = ap.parse_intermixed_args(argv)
    recipe, overrides = args.recipe, args.overrides
    load_recipe(recipe, overrides)  # a bad recipe is one line before anything is submitted
    with tempfile.TemporaryDirectory() as tmp:
        ov = overrides + ["train.device_batch_size=auto", "train.train_log_every=1",
                          "stages=[discover,base]", f"discovery.cache_dir={tmp}/bs-cache"]
        miss = time_to_first_step(recipe, ov, Path(tmp) / "runs", [])
        hit = time_to_first_step(recipe, ov, Path(tmp) / "runs", ["--force"])
    print(json.dumps({"recipe": recipe, "overrides": overrides, "cache_miss": miss, "cache_hit": hit,
                      "method": "wall clock from the launch command to the first train record in "
                                "task 0's progress.jsonl; one run each"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
