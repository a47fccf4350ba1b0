"""KV-cache sweep:  python -m nanochat.kv_bench RECIPE [section.key=value ...] [checkpoint=PATH] [--out DIR]

Greedy generation from random prompts at every batch size of `kv_bench.batch_sizes` (and the largest
that fits, `kv_bench.include_largest`), with the KV cache (nanochat.engine.Engine) and without it
(every step recomputes the whole sequence; logits only at the last position). The model is
`kv_bench.checkpoint` (a run or checkpoint directory; `checkpoint=PATH` is short for it), else the
run's latest checkpoint, else a random-initialised model of the recipe's shape — decode speed
depends on the shapes, not the weights, except through where stop tokens fall (none are used).

Method: `kv_bench.warmup` untimed runs per point (compilation and CUDA-graph capture happen there;
their time is reported as warmup_s), then `kv_bench.repeats` timed runs, each starting after a device
sync. Every step's tokens reach the host (the engine streams them), and each arrival is
timestamped: time to first token = prefill + first sample; per-token latency = the gaps between
arrivals (p50/p90 over all timed runs); tokens/s = batch × new tokens / run time (median, min,
max over runs). Peak memory: CUDA max_memory_allocated; CPU the process's peak resident set
(VmHWM, reset before each point), weights included.

Decode roofline: a decode step must read every weight matrix once (lookup tables only their B
rows) and each row's keys and values so far; that many bytes divided by the device's memory
bandwidth — measured here with a large device-to-device copy, read + write counted — bounds
decode steps per second. Reported: tokens/s at that bound and the fraction the measured decode
rate (batch / median per-token latency) reaches. At large batches compute, not bandwidth, bounds
a step; results.json also has the compute bound (a large matmul's measured FLOP/s).

Matmul floor: the decode step's matrix multiplies alone — the same weights, shapes, layouts and
order as the engine's step (compiled on CPU: every one MKL's packed sgemm, as inductor's freezing
emits them), back to back, nothing else — timed on this device. Where a BLAS can't
stream weights at the copy bandwidth (small batches on CPU: the lm_head's gemm at batch 8 runs
far below both bounds), this floor, not the roofline, is what removing every other cost of the
step could reach; the table gives it and the fraction of it reached.

Writes results.json, results.csv, results.md (the table) and tokens_per_s.png to --out (default:
RUN_DIR/kv_sweep). `python -m jobs.tasks RUN_DIR sweep I` calls `sweep_for_recipe` the same way.
"""
from __future__ import annotations

import csv
import dataclasses
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nanochat.timing import device_sync, environment, seconds_per_call, timed_run
from nanochat import checkpoint as ckpt
from nanochat.logfmt import write_stage_records
from nanochat.common import UserError, atomic_path, atomic_write_json, atomic_write_text, cli_main, print0
from nanochat.config import Recipe
from nanochat.decode import mkl_packed_available
from nanochat.engine import Engine, argmax_first, resolve_model
from nanochat.gpt import GPT
from nanochat.batchsize.probe import host_ram_bytes, is_oom, proc_status, reset_peak_rss
from nanochat.plots import pyplot
from nanochat.recipe import load_recipe, recipe_argparser
from nanochat.runtime import Runtime, measure_matmul_flops, recipe_runtime, tune_cpu_allocator


# --------------------------------------------------------------------------------------------
# Device facts

def measure_bandwidth(device: torch.device, repeats: int = 5) -> float:
    """Memory bandwidth in bytes/s: the best of `repeats` copies of a buffer far larger than any
    cache (256 MiB on CPU, 1 GiB on GPUs), counting bytes read + written (STREAM's convention)."""
    n = (2**30 if device.type == "cuda" else 2**28) // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    # one untimed copy first: it faults the pages in
    return 2 * n * 4 / min(seconds_per_call(lambda: dst.copy_(src), lambda: device_sync(device), 1, repeats, 1))


def decode_bytes_per_step(model: GPT, batch: int, context: float) -> float:
    """Bytes one decode step reads: every parameter once, except the lookup tables (token and
    bigram embeddings) of which only `batch` rows are read, plus keys and values for `context`
    positions per row in every layer."""
    c = model.config
    tables = {id(model.wte.weight)} | ({id(model.bigram.weight)} if model.bigram is not None else set())
    elt = model.lm_head.weight.element_size()
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in tables)
    rows = batch * c.n_embd * elt * (1 + (model.bigram is not None))
    kv = 2 * c.n_layer * batch * c.n_kv_head * c.head_dim * elt * context
    return weights + rows + kv


def decode_flops_per_step(model: GPT, batch: int, context: float) -> float:
    c = model.config
    matmul = sum(p.numel() for b in model.blocks for p in b.parameters()) + model.lm_head.weight.numel()
    return batch * (2 * matmul + 4 * c.n_layer * c.n_head * c.head_dim * context)


def peak_memory_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return proc_status("VmHWM") / 2**30


def largest_batch(model: GPT, prompt_len: int, new_tokens: int, cap: int, device: torch.device) -> int:
    """An estimate of the largest batch whose decode fits: 90% of free GPU memory (half the RAM
    on CPU, less what the process holds) over the bytes a row needs — its KV cache, the
    prefill's activations (~16 × width per prompt token) and a few vocab-sized logit rows. On
    CUDA an out-of-memory at that batch halves it (see run_point)."""
    c, elt = model.config, model.lm_head.weight.element_size()
    per_row = (2 * c.n_layer * c.n_kv_head * c.head_dim * (prompt_len + new_tokens) * elt
               + 16 * prompt_len * c.n_embd * elt + 8 * c.vocab_size * 4)
    if device.type == "cuda":
        # the caching allocator still holds freed blocks (the bandwidth probe's 2 GiB):
        # mem_get_info counts them as used until they are given back
        torch.cuda.empty_cache()
        budget = 0.9 * torch.cuda.mem_get_info(device)[0]
    else:
        budget = 0.5 * host_ram_bytes() - proc_status("VmRSS")
    return int(max(1, min(cap, budget // per_row)))


# --------------------------------------------------------------------------------------------
# One run: a stream of steps, timestamped on arrival

def matmul_floor_s(model: GPT, engine: Engine, batch: int, device: torch.device,
                   steps: int = 20, repeats: int = 5) -> float:
    """Seconds per decode step spent in its matmuls alone (see the module docstring): median of
    `repeats` windows of `steps` steps, synced at both ends."""
    c = model.config
    dtype = model.lm_head.weight.dtype
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, c.n_embd, device=device, dtype=dtype, generator=gen)
    h = torch.randn(batch, 4 * c.n_embd, device=device, dtype=dtype, generator=gen)
    w = engine.step(batch)
    mats = []
    for blk, qkv in zip(model.blocks, w.qkv):
        mats += [(x, qkv), (x, blk.attn.c_proj.weight), (x, blk.mlp.c_fc.weight), (h, blk.mlp.c_proj.weight)]
    # compiled on CPU, inductor's freezing runs every linear, the lm_head's too, as MKL's packed
    # sgemm (tests/test_engine.py checks it): the floor does the same
    packed = engine.compiled and device.type == "cpu" and dtype == torch.float32 \
        and mkl_packed_available()
    if packed:
        mats.append((x, model.lm_head.weight))
        mats = [(inp, m, torch.ops.mkl._mkl_reorder_linear_weight(m, batch)) for inp, m in mats]

    def step():
        if packed:
            for inp, m, p in mats:
                torch.ops.mkl._mkl_linear(inp, p, m, None, batch)
            return
        for inp, m in mats:
            F.linear(inp, m)
        w.head_matmul(x)

    with torch.inference_mode():
        return statistics.median(seconds_per_call(step, lambda: device_sync(device), 3, repeats, steps))


def nocache_stream(model: GPT, idx: torch.Tensor, new_tokens: int):
    """Greedy decoding without a cache: every step runs the whole sequence again (logits only at
    the last position), takes the argmax as the engine does and brings the tokens to the host."""
    B = idx.size(0)
    for _ in range(new_tokens):
        last = torch.full((B,), idx.size(1) - 1, device=idx.device)
        tok = argmax_first(model(idx, logits_at=last)[:, 0])
        yield tok.view(-1).tolist()
        idx = torch.cat([idx, tok], dim=1)


def run_point(model: GPT, engine: Engine, mode: str, batch: int, prompt_len: int,
              new_tokens: int, warmup: int, repeats: int, device: torch.device) -> dict:
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=gen)
    if mode == "cache":
        ids = prompts.tolist()

        def stream():
            return engine.generate(ids, max_new_tokens=new_tokens, temperature=0.0)
    else:
        idx = prompts.to(device)

        @torch.inference_mode()
        def stream():
            yield from nocache_stream(model, idx, new_tokens)
    peak_memory_reset(device)
    t0 = time.perf_counter()
    for _ in range(warmup):
        timed_run(stream, device)
    warmup_s = time.perf_counter() - t0
    runs = [timed_run(stream, device) for _ in range(repeats)]
    assert all(r["steps"] == new_tokens for r in runs), "a run ended early"
    rates = [batch * new_tokens / r["total_s"] for r in runs]
    gaps = [g for r in runs for g in r["gaps_s"]] or [r["total_s"] for r in runs]
    p50, p90 = np.percentile(gaps, [50, 90])
    return {"mode": mode, "batch": batch,
            "tok_per_s_median": statistics.median(rates), "tok_per_s_min": min(rates),
            "tok_per_s_max": max(rates), "decode_tok_per_s": batch / p50,
            "ttft_ms_median": 1e3 * statistics.median(r["ttft_s"] for r in runs),
            "latency_ms_p50": 1e3 * p50, "latency_ms_p90": 1e3 * p90,
            "peak_mem_gb": peak_memory_gb(device), "warmup_s": warmup_s}


# --------------------------------------------------------------------------------------------
# The sweep

def check_lengths(recipe: Recipe, model: GPT) -> None:
    sw = recipe.kv_bench
    if sw.prompt_len > model.config.sequence_len:
        raise UserError(f"kv_bench.prompt_len {sw.prompt_len} is longer than the model's context "
                        f"({model.config.sequence_len} tokens); lower it")
    if sw.prompt_len + sw.max_new_tokens > model.rotary_len:
        raise UserError(f"kv_bench.prompt_len + kv_bench.max_new_tokens = "
                        f"{sw.prompt_len + sw.max_new_tokens} exceeds what the model can position "
                        f"({model.rotary_len}); lower kv_bench.max_new_tokens")


def sweep(recipe: Recipe, model: GPT, source: str, rt: Runtime, out_dir: Path,
          malloc: str | None = None, bandwidth: float | None = None,
          flops: float | None = None) -> dict:
    """Run every point, write the files to out_dir and return the report. `bandwidth` (bytes/s)
    and `flops` (FLOP/s) are measured here unless given."""
    sw, c, device = recipe.kv_bench, model.config, rt.device
    check_lengths(recipe, model)
    cuda_graph = sw.cuda_graph and device.type == "cuda"
    engine = Engine(model, cuda_graph=cuda_graph, compile=sw.compile)
    batches = sorted(set(sw.batch_sizes))
    largest = None
    if sw.include_largest:
        largest = largest_batch(model, sw.prompt_len, sw.max_new_tokens, sw.max_batch_size, device)
        batches = sorted(set(batches) | {largest})
    bandwidth = bandwidth or measure_bandwidth(device)
    flops = flops or measure_matmul_flops(device, rt.dtype)
    # Eager and compiled decoding attend to the keys so far (on average prompt + half the new
    # tokens); a CUDA-graphed step reads the whole cache.
    context = sw.prompt_len + sw.max_new_tokens if engine.cuda_graph else sw.prompt_len + sw.max_new_tokens / 2
    results = []
    for batch in batches:
        for mode in ("nocache", "cache"):
            if mode == "nocache" and sw.nocache_max_batch_size and batch > sw.nocache_max_batch_size:
                continue
            while True:
                print0(f"kv_sweep: {mode} batch {batch} ...", end=" ")
                try:
                    r = run_point(model, engine, mode, batch, sw.prompt_len, sw.max_new_tokens,
                                  sw.warmup, sw.repeats, device)
                    break
                except Exception as e:  # noqa: BLE001 — only an out-of-memory is handled
                    if not is_oom(e) or batch == 1:
                        raise
                    engine.cache = engine._graph = None
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    print0("out of memory")
                    if batch != largest:
                        r = {"mode": mode, "batch": batch, "error": "out of memory"}
                        break
                    batch = largest = batch // 2  # the estimate was too high: halve and retry
            if "error" not in r:
                step_bytes = decode_bytes_per_step(model, batch, context)
                r["bytes_per_step"] = step_bytes
                r["roofline_tok_per_s"] = batch * bandwidth / step_bytes
                r["roofline_fraction"] = r["decode_tok_per_s"] / r["roofline_tok_per_s"]
                r["compute_bound_tok_per_s"] = batch * flops / decode_flops_per_step(model, batch, context)
                if mode == "cache":
                    r["matmul_floor_tok_per_s"] = batch / matmul_floor_s(model, engine, batch, device)
                    r["matmul_floor_fraction"] = r["decode_tok_per_s"] / r["matmul_floor_tok_per_s"]
                print0(f"{r['tok_per_s_median']:.1f} tok/s")
            results.append(r)
    nocache = {r["batch"]: r["tok_per_s_median"] for r in results if r["mode"] == "nocache" and "error" not in r}
    for r in results:
        if r["mode"] == "cache" and r["batch"] in nocache and "error" not in r:
            r["speedup_vs_nocache"] = r["tok_per_s_median"] / nocache[r["batch"]]
    report = {
        "benchmark": "kv_cache_sweep (greedy decoding with and without the KV cache)",
        "recipe": recipe.name, "model": {"source": source, "params": model.num_params()["total"],
                                         "config": dataclasses.asdict(c)},
        "shape": {"prompt_len": sw.prompt_len, "max_new_tokens": sw.max_new_tokens},
        "method": {"warmup_runs": sw.warmup, "timed_runs": sw.repeats, "sampling": "greedy",
                   "prompts": "random token ids (seed 0)", "stop_tokens": "none",
                   "sync": "device sync before each run; tokens reach the host every step",
                   "engine": {"cuda_graph": cuda_graph, "compile": sw.compile,
                              "attention": "whole cache (static)" if engine.cuda_graph else "keys so far"},
                   "cpu_allocator": malloc, "largest_batch_estimate": largest,
                   "context_for_roofline": context},
        **environment(device, rt.dtype),
        "memory_bandwidth_gb_s": bandwidth / 1e9, "matmul_tflop_s": flops / 1e12,
        "results": results,
    }
    write_outputs(report, Path(out_dir))
    return report


# --------------------------------------------------------------------------------------------
# Outputs

COLUMNS = ["mode", "batch", "tok_per_s_median", "tok_per_s_min", "tok_per_s_max",
           "speedup_vs_nocache", "ttft_ms_median", "latency_ms_p50", "latency_ms_p90",
           "decode_tok_per_s", "peak_mem_gb", "bytes_per_step", "roofline_tok_per_s",
           "roofline_fraction", "compute_bound_tok_per_s", "matmul_floor_tok_per_s",
           "matmul_floor_fraction", "warmup_s", "error"]


def _fmt(v, digits=1) -> str:
    return "" if v is None else f"{v:,.{digits}f}"


def markdown_table(report: dict) -> str:
    m, s = report["model"], report["shape"]
    head = (f"KV-cache sweep — {report['device']}, {report['dtype']}; model {m['source']} "
            f"({m['params'] / 1e6:.1f}M params, depth {m['config']['n_layer']}, width "
            f"{m['config']['n_embd']}); prompt {s['prompt_len']}, {s['max_new_tokens']} new "
            f"tokens, greedy; {report['method']['timed_runs']} timed runs after "
            f"{report['method']['warmup_runs']} warm-up; memory bandwidth "
            f"{report['memory_bandwidth_gb_s']:.1f} GB/s (copy)")
    lines = [head, "",
             "| mode | batch | tok/s median (min–max) | × no cache | TTFT ms | ms/token p50 / p90 "
             "| peak mem GB | decode roofline tok/s | % of roofline | matmul floor tok/s | % of floor |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        name = "cache" if r["mode"] == "cache" else "no cache"
        if "error" in r:
            lines.append(f"| {name} | {r['batch']} | {r['error']} | | | | | | | | |")
            continue
        roof = f"{r['roofline_tok_per_s']:,.0f}" if r["mode"] == "cache" else ""
        frac = f"{100 * r['roofline_fraction']:.0f}%" if r["mode"] == "cache" else ""
        floor = f"{r['matmul_floor_tok_per_s']:,.0f}" if "matmul_floor_tok_per_s" in r else ""
        ffrac = f"{100 * r['matmul_floor_fraction']:.0f}%" if "matmul_floor_fraction" in r else ""
        lines.append(
            f"| {name} | {r['batch']} | {_fmt(r['tok_per_s_median'])} ({_fmt(r['tok_per_s_min'])}"
            f"–{_fmt(r['tok_per_s_max'])}) | {_fmt(r.get('speedup_vs_nocache'), 2)} | "
            f"{_fmt(r['ttft_ms_median'])} | {_fmt(r['latency_ms_p50'], 2)} / "
            f"{_fmt(r['latency_ms_p90'], 2)} | {_fmt(r['peak_mem_gb'], 2)} | {roof} | {frac} | {floor} | {ffrac} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, out_png: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for mode, label, style in (("cache", "KV cache", "o-"), ("nocache", "no cache", "s-")):
        rows = [r for r in report["results"] if r["mode"] == mode and "error" not in r]
        if rows:
            ax.plot([r["batch"] for r in rows], [r["tok_per_s_median"] for r in rows], style, label=label)
    roof = [r for r in report["results"] if r["mode"] == "cache" and "error" not in r]
    if roof:
        ax.plot([r["batch"] for r in roof], [r["roofline_tok_per_s"] for r in roof], "k--", lw=1,
                label="decode memory roofline")
    ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="tokens/s",
           title=f"{report['recipe']}: {report['device']}, {report['dtype']}")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    with atomic_path(out_png, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def stage_records(report: dict) -> list[dict]:
    """The sweep as upstream's infer_bench records (scripts/infer_bench.py): a `bench` row per
    batch size with the KV cache, then a `summary` — written beside results.json from the same
    dict (nanochat/logfmt.py)."""
    rows = [r for r in report["results"] if r["mode"] == "cache" and "error" not in r]
    bench = [{"event": "bench", "batch": r["batch"], "ttft_sec": round(r["ttft_ms_median"] / 1e3, 6),
              "tok_per_sec": round(r["tok_per_s_median"], 1), "peak_vram_bytes": round(r["peak_mem_gb"] * 2**30),
              **({"speedup_vs_nocache": round(r["speedup_vs_nocache"], 3)} if "speedup_vs_nocache" in r else {})}
             for r in rows]
    summary = {"event": "summary", "model_tag": f"d{report['model']['config']['n_layer']}",
               "source": report["model"]["source"], "gpu": report.get("device", "?"),
               "params": report["model"]["params"], "prompt_tokens": report["shape"]["prompt_len"],
               "decode_tokens": report["shape"]["max_new_tokens"]}
    return bench + [summary]


def write_outputs(report: dict, out_dir: Path) -> None:
    atomic_write_json(out_dir / "results.json", report)
    write_stage_records(out_dir, "kv_bench", stage_records(report))
    with atomic_path(out_dir / "results.csv", suffix=".csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(report["results"])
    atomic_write_text(out_dir / "results.md", markdown_table(report))
    plot(report, out_dir / "tokens_per_s.png")


# --------------------------------------------------------------------------------------------
# Entry points

def sweep_for_recipe(recipe: Recipe, out_dir: Path | None = None, malloc: str = "tuned") -> dict:
    """Run the sweep the recipe describes; returns a short summary (the files hold the rest)."""
    rt = recipe_runtime(recipe, tune_allocator=False)
    model, source = resolve_model(recipe, rt)
    check_lengths(recipe, model)
    # Measured before the allocator is tuned: tuned glibc would keep the copy's 512 MB resident
    # and every peak-memory figure after it would include them.
    bandwidth = measure_bandwidth(rt.device)
    flops = measure_matmul_flops(rt.device, rt.dtype)
    if rt.device.type == "cpu":
        tune_cpu_allocator(malloc == "tuned")
    out_dir = Path(out_dir) if out_dir is not None else recipe.out_dir / "kv_sweep"
    report = sweep(recipe, model, source, rt, out_dir,
                   malloc=malloc if rt.device.type == "cpu" else None,
                   bandwidth=bandwidth, flops=flops)
    best = max((r for r in report["results"] if r["mode"] == "cache" and "error" not in r),
               key=lambda r: r["tok_per_s_median"])
    return {"out_dir": str(out_dir), "best_batch": best["batch"],
            "best_tok_per_s": round(best["tok_per_s_median"], 1)}


def main(argv: list[str]) -> int:
    ap = recipe_argparser("python -m nanochat.kv_bench", __doc__.splitlines()[0])
    ap.add_argument("--out", help="output directory (default: RUN_DIR/kv_sweep)")
    ap.add_argument("--malloc", choices=["tuned", "default"], default="tuned",
                    help="CPU: glibc allocator settings (see nanochat.runtime.tune_cpu_allocator)")
    args = ap.parse_intermixed_args(argv)
    # `checkpoint=PATH` is short for kv_bench.checkpoint=PATH
    overrides = [f"kv_bench.{o}" if o.startswith("checkpoint=") else o for o in args.overrides]
    recipe = load_recipe(args.recipe, overrides)
    if not args.out:  # an --out the user names is theirs to choose
        ckpt.refuse_launcher_dir(recipe.out_dir, "python -m nanochat.kv_bench")
    summary = sweep_for_recipe(recipe, args.out, args.malloc)
    print(Path(summary["out_dir"], "results.md").read_text(), end="")
    print0(f"wrote {summary['out_dir']}/results.json, results.csv, results.md, tokens_per_s.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
