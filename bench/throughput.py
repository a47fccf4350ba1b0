"""Training throughput benchmark:  python -m bench.throughput RECIPE [key=value ...] [--compile both|on|off]

On CPU it also compares glibc's allocator defaults with the tuned settings training uses
(`--malloc both`, see `nanochat.runtime.tune_cpu_allocator`).

Measures, on the current device, the real training step of the recipe's model — forward,
backward and the optimizer step (Muon + AdamW) — on random tokens at the recipe's device batch
and sequence length. Eager and compiled run side by side in one process (`--compile both`).

Method: `--warmup` untimed steps (compilation happens there and is timed separately), then
`--repeats` timed windows of `--steps` steps each, with a device sync at both ends of every
window. Prints JSON (`--json PATH` also writes it there): tokens/s (median, min, max over
windows), FLOPs per token, MFU against a peak measured on this device with a large matmul
(`mfu_percent`) and, on a GPU the datasheet table knows, against its datasheet peak
(`mfu_datasheet_percent`), peak memory (allocated, and reserved: what discovery measures), the
attention kernel each layer kind ran with, host-device syncs per step (CUDA: counted under
`torch.cuda.set_sync_debug_mode("warn")` over two more steps), and the software versions.
"""
from __future__ import annotations

import resource

from bench.harness import bench_training, emit, timing_args
from nanochat.timing import environment
from nanochat.common import cli_main
from nanochat.recipe import load_recipe, recipe_argparser
from nanochat.runtime import measure_matmul_flops, peak_flops, recipe_runtime, tune_cpu_allocator


def main(argv: list[str]) -> int:
    ap = recipe_argparser("python -m bench.throughput", __doc__.splitlines()[0])
    ap.add_argument("--compile", choices=["both", "on", "off"], default="both")
    ap.add_argument("--malloc", choices=["both", "tuned", "default"], default="both",
                    help="CPU only: glibc allocator defaults vs tuned (see runtime.tune_cpu_allocator)")
    timing_args(ap, warmup=3, repeats=5)
    ap.add_argument("--steps", type=int, default=5)
    opts = ap.parse_intermixed_args(argv)
    path, overrides = opts.recipe, opts.overrides
    recipe = load_recipe(path, overrides)
    rt = recipe_runtime(recipe, tune_allocator=False)
    compiles = {"both": [False, True], "on": [True], "off": [False]}[opts.compile]
    mallocs = [None] if rt.device.type != "cpu" else \
        {"both": ["default", "tuned"], "tuned": ["tuned"], "default": ["default"]}[opts.malloc]
    results = []
    for malloc in mallocs:  # default first: glibc's settings can't be fully restored afterwards
        if malloc is not None:
            tune_cpu_allocator(malloc == "tuned")
        for c in compiles:
            r = bench_training(recipe, rt, c, opts.warmup, opts.steps, opts.repeats)
            results.append({"malloc": malloc, **r} if malloc else r)
    peak = measure_matmul_flops(rt.device, rt.dtype, n=8192 if rt.device.type == "cuda" else 2048,
                                seconds=2.0)
    for r in results:
        r["mfu_percent"] = round(100 * r["flops_per_token"] * r["tok_per_s_median"] / peak, 2)
    # and against the datasheet peak where this GPU is in the table (peak_flops measures otherwise)
    sheet = peak_flops(rt.device, rt.dtype) if rt.device.type == "cuda" else None
    if sheet is not None and not sheet[1].startswith("datasheet"):
        sheet = None
    if sheet is not None:
        for r in results:
            r["mfu_datasheet_percent"] = round(100 * r["flops_per_token"] * r["tok_per_s_median"]
                                               / sheet[0], 2)
    if rt.device.type != "cuda":
        # ru_maxrss is KiB on Linux: the process peak over all modes (compilation included).
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    report = {
        "benchmark": "train_step (forward + backward + optimizer step)",
        "recipe": path, "overrides": overrides,
        "shape": {"depth": recipe.model.depth, "batch": recipe.train.device_batch_size,
                  "seq": recipe.model.sequence_len},
        "method": {"warmup_steps": opts.warmup, "steps_per_window": opts.steps,
                   "windows": opts.repeats, "sync": "device sync before/after each window",
                   "data": "random tokens"},
        **environment(rt.device, rt.dtype),
        "peak_flops_measured": round(peak, 1),
        **({"peak_flops_datasheet": sheet[0], "peak_datasheet": sheet[1]} if sheet else {}),
        "results": results,
    }
    if rt.device.type != "cuda":
        report["peak_rss_gb"] = round(peak_rss, 3)
    emit(report, opts.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
