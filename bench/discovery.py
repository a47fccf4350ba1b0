"""Batch-size discovery benchmark:  python -m bench.discovery RECIPE [key=value ...]

In one run on the current device:
1. discovery from scratch (a fresh temporary cache dir): wall time and number of probes;
2. cache hits: `--hits` calls of the same discovery, each timed (median, min, max; no probe runs);
3. training throughput of full optimizer steps (total batch of the recipe, gradient accumulation
   included, forward + backward + optimizer) at the recipe's fixed device batch (or `--fixed`)
   versus the discovered one: `--warmup` untimed steps, then `--repeats` timed steps each, with a
   device sync around each step (median, min, max tokens/s).
With `train.compile=true` it also times the same discovery of the eager recipe (compiled
recipes probe eagerly and confirm the chosen size with one compiled probe), and `--peaks 4,16`
measures the eager and the compiled step's peak memory at those batch sizes side by side, each
in a fresh child process as discovery probes (the evidence for probing eagerly).
Prints JSON (`--json PATH` also writes it there). Not a test: the figures depend on the machine
and its load.
"""
from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time

from bench.harness import bench_training, emit, timing_args
from nanochat.timing import environment
from nanochat.batchsize.search import discover, resolve_target
from nanochat.common import UserError, cli_main
from nanochat.config import grad_accum_steps
from nanochat.recipe import load_recipe, recipe_argparser
from nanochat.runtime import recipe_runtime


def _stats(xs: list[float], nd: int = 1) -> dict:
    return {"median": round(statistics.median(xs), nd), "min": round(min(xs), nd),
            "max": round(max(xs), nd), "n": len(xs)}


def training_tok_s(recipe, rt, batch: int, warmup: int, repeats: int) -> dict:
    """Tokens/s of whole optimizer steps (the recipe's total batch, accumulation included) at
    device batch `batch` on one rank — bench.train's timed loop."""
    accum = grad_accum_steps(recipe.train.total_batch_size, batch, recipe.model.sequence_len, 1)
    r = bench_training(recipe, rt, recipe.train.compile, warmup, 1, repeats, batch=batch, accum=accum)
    return {"device_batch_size": batch, "grad_accum": accum, "warmup_s": r["warmup_s"],
            "tok_per_s": {"median": r["tok_per_s_median"], "min": r["tok_per_s_min"],
                          "max": r["tok_per_s_max"], "n": repeats}}


def compare_peaks(recipe, batches: list[int]) -> list[dict]:
    """The training step's peak at each batch, eager and compiled, as discovery probes it."""
    if not batches:
        return []
    from nanochat.batchsize.search import probe_spec
    from nanochat.batchsize.probe import ProbeServer, run_probe
    spec = probe_spec(recipe, resolve_target(recipe))
    out = []
    server = ProbeServer() if spec.device == "cpu" else None
    try:
        for b in batches:
            row = {"batch": b}
            for name, compiled in (("eager", False), ("compiled", True)):
                sp = dataclasses.replace(spec, compile=compiled)
                r = server.probe(sp, b, None) if server else run_probe(sp, b)
                row[f"{name}_peak_gb"] = None if r["oom"] else round(r["peak_bytes"] / 1e9, 3)
                row[f"{name}_s"] = round(r["seconds"], 1)
            if row["eager_peak_gb"] and row["compiled_peak_gb"]:
                row["compiled_over_eager"] = round(row["compiled_peak_gb"] / row["eager_peak_gb"], 3)
            out.append(row)
    finally:
        if server:
            server.close()
    return out


def main(argv: list[str]) -> int:
    ap = recipe_argparser("python -m bench.discovery", __doc__.splitlines()[0])
    ap.add_argument("--fixed", type=int, default=None,
                    help="the hand-set batch to compare with (default: the recipe's)")
    ap.add_argument("--hits", type=int, default=20, help="timed cache hits")
    timing_args(ap, warmup=1, repeats=5)
    ap.add_argument("--peaks", default="", help="batch sizes (comma-separated) at which to measure "
                                                 "the eager vs the compiled step's peak memory")
    args = ap.parse_intermixed_args(argv)
    recipe = load_recipe(args.recipe, args.overrides)
    fixed = args.fixed if args.fixed is not None else recipe.train.device_batch_size
    if fixed == "auto":
        raise UserError("the recipe's train.device_batch_size is auto; pass --fixed N to compare with")
    rt = recipe_runtime(recipe)  # the allocator and device training uses
    with tempfile.TemporaryDirectory(prefix="bs_bench_") as tmp:
        recipe = dataclasses.replace(recipe, discovery=dataclasses.replace(recipe.discovery,
                                                                           cache_dir=tmp))
        t0 = time.perf_counter()
        found = discover(recipe)
        discovery_s = time.perf_counter() - t0
        hits = []
        for _ in range(args.hits):
            t0 = time.perf_counter()
            d = discover(recipe)
            hits.append((time.perf_counter() - t0) * 1e3)
            assert d.from_cache and d.probes_run == 0
        eager_search = None
        if recipe.train.compile:  # the same search for the eager recipe, in its own cache
            eager_recipe = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, compile=False),
                                               discovery=dataclasses.replace(recipe.discovery, cache_dir=tmp + "/eager"))
            t0 = time.perf_counter()
            e = discover(eager_recipe)
            eager_search = {"seconds": round(time.perf_counter() - t0, 2), "probes": e.probes_run,
                            "batch_size": e.batch_size}
    peaks = compare_peaks(recipe, [int(b) for b in args.peaks.split(",") if b.strip()])
    runs = {"fixed": training_tok_s(recipe, rt, fixed, args.warmup, args.repeats)}
    runs["discovered"] = runs["fixed"] if found.batch_size == fixed else \
        training_tok_s(recipe, rt, found.batch_size, args.warmup, args.repeats)
    mem = found.record["memory"]
    report = {
        "benchmark": "batch-size discovery: search, cache hit, training tokens/s fixed vs discovered",
        "recipe": args.recipe, "overrides": args.overrides,
        "method": {"discovery": "fresh temporary cache dir, one call",
                   "cache_hit": f"{args.hits} calls after it, each timed",
                   "training": f"{args.warmup} untimed + {args.repeats} timed optimizer steps of "
                               f"{recipe.train.total_batch_size} tokens, device sync around each",
                   "data": "random tokens"},
        **environment(rt.device, rt.dtype, cpu_name=resolve_target(recipe).name),
        "discovery": {"seconds": round(discovery_s, 2), "probes": found.probes_run,
                      "batch_size": found.batch_size, "largest": found.largest,
                      "fastest": found.fastest, "candidates": found.record["candidates"],
                      "method": found.record.get("method"),
                      "compiled_confirmation": found.record.get("compiled_confirmation"),
                      "usable_gb": round(mem["usable_bytes"] / 1e9, 3), "source": mem["source"],
                      # the memory line peak ≈ fixed + batch × per_sample (None: not fitted)
                      "fixed_gb": mem.get("fixed_bytes") and round(mem["fixed_bytes"] / 1e9, 3),
                      "per_sample_gb": mem.get("per_sample_bytes")
                      and round(mem["per_sample_bytes"] / 1e9, 4),
                      "probes_detail": [{"batch": p["batch"], "fits": p["fits"],
                                         "peak_gb": None if p["peak_bytes"] is None
                                         else round(p["peak_bytes"] / 1e9, 3),
                                         "seconds": round(p["seconds"], 2)}
                                        for p in found.record["probes"]]},
        "cache_hit_ms": _stats(hits, 2),
        "eager_search": eager_search,
        "compiled_vs_eager_search": (round(discovery_s / eager_search["seconds"], 2)
                                     if eager_search else None),
        "peaks_eager_vs_compiled": peaks,
        "training": runs,
        "speedup_discovered_vs_fixed": round(runs["discovered"]["tok_per_s"]["median"]
                                             / runs["fixed"]["tok_per_s"]["median"], 3),
    }
    emit(report, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
