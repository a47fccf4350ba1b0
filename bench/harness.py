"""What the benchmark commands share: their timing flags, how they report (JSON on stdout, and a
file with --json), and the timed training steps the throughput and discovery benchmarks run. Benchmarks live in the checkout, not the installed package: run them from the
repository root, `python -m bench.NAME`."""
from __future__ import annotations

import json
import statistics

import torch

from nanochat import attention
from nanochat.common import UserError, atomic_write_json
from nanochat.runtime import Runtime, compile_count
from nanochat.timing import recipe_step, seconds_per_call, timed


def timing_args(ap, warmup: int, repeats: int, json_file: bool = True) -> None:
    """The flags every benchmark's method shares: untimed warm-up runs, timed repeats (median,
    min and max over them) and, with `json_file`, `--json PATH` for `emit`."""
    ap.add_argument("--warmup", type=int, default=warmup,
                    help=f"untimed runs first: compilation, allocation, caches (default {warmup})")
    ap.add_argument("--repeats", type=int, default=repeats,
                    help=f"timed runs: median, min and max over them (default {repeats})")
    if json_file:
        ap.add_argument("--json", help="also write the report to this file (atomically)")


def emit(report: dict, json_path=None) -> None:
    """Print a benchmark's report (JSON); with `--json PATH` also write it there, atomically."""
    print(json.dumps(report, indent=2))
    if json_path:
        atomic_write_json(json_path, report)


def bench_training(recipe, rt: Runtime, compile_model: bool, warmup: int, steps: int,
                   repeats: int, batch: int | None = None, accum: int = 1) -> dict:
    """Timed optimizer steps on random tokens, each of `accum` forward/backward micro-batches of
    `batch` rows (default: the recipe's device batch): tokens/s median, min, max over `repeats`
    windows of `steps` steps."""
    B = batch if batch is not None else recipe.train.device_batch_size
    if B == "auto":
        raise UserError("bench.throughput needs a fixed train.device_batch_size (e.g. train.device_batch_size=8)")
    step = recipe_step(recipe, rt, B, compile=compile_model, accum=accum)
    model = step.model
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
    graphs0 = compile_count()
    attention.RAN.clear()
    warmup_s = timed(lambda: [step() for _ in range(warmup)], rt.sync)
    rates = [step.tokens / s for s in seconds_per_call(step, rt.sync, 0, repeats, steps)]
    out = {"compile": compile_model, "warmup_s": round(warmup_s, 2),
           "attention_ran": dict(attention.RAN), "syncs_per_step": syncs_per_step(step, rt),
           "compilations": compile_count() - graphs0,
           "tok_per_s_median": round(statistics.median(rates), 1),
           "tok_per_s_min": round(min(rates), 1), "tok_per_s_max": round(max(rates), 1),
           "params": model.num_params()["total"], "flops_per_token": model.flops_per_token()}
    if rt.device.type == "cuda":
        out["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(rt.device) / 2**30, 3)
        # what discovery's probes measure (and its memory line predicts): the cache's reserve
        out["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved(rt.device) / 2**30, 3)
    return out


def syncs_per_step(step, rt: Runtime, steps: int = 2) -> float | None:
    """Host-device synchronizations per training step (CUDA): `torch.cuda.set_sync_debug_mode`
    warns at each one (a blocking copy, an `.item()`, a data-dependent shape); counted over
    `steps` more steps. None off CUDA."""
    if rt.device.type != "cuda":
        return None
    import warnings
    rt.sync()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    rt.sync()
    return sum("synchroniz" in str(w.message) for w in caught) / steps
