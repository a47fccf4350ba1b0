"""Decode modes side by side:  python -m bench.decode_modes RECIPE [section.key=value ...] [--rounds N]

Greedy KV-cache generation (nanochat.engine.Engine) of `kv_bench.max_new_tokens` tokens after
`kv_bench.prompt_len` random prompt tokens, at each of `kv_bench.batch_sizes`, in every decode mode this
device has: eager; compiled (torch.compile, static shapes; on CPU with inductor's freezing, see
nanochat/decode.py); on CUDA also the CUDA graph, and compiled + CUDA graph. One process, one
model (`kv_bench.checkpoint`, the run's latest checkpoint, or a random-initialised model of the
recipe's shape, as the KV sweep).

Method: per batch, every mode's engine warms up (`kv_bench.warmup` runs: compilation and capture
happen there, reported as warmup_s), then `--rounds` rounds each time every mode once, in a
rotating order, so that drift in the machine's speed reaches every mode alike. A run starts and
ends with a device sync; every step's tokens reach the host. Reported per mode: tokens/s median
(min–max) over the rounds, the median's ratio to eager, and the fraction of generated tokens equal
to eager's (every mode computes the same products in another order or kernel, so a near-tie
between two logits may resolve differently). `--modes` picks some of the modes (eager always
runs: the reference); `--json PATH` also writes the report there.
"""
from __future__ import annotations

import statistics

import torch

from bench.harness import emit
from nanochat.timing import environment
from nanochat.engine import resolve_model
from nanochat.timing import timed_run
from nanochat.common import UserError, cli_main
from nanochat.engine import Engine
from nanochat.recipe import load_recipe, recipe_argparser
from nanochat.runtime import recipe_runtime


def modes_for(device: torch.device) -> dict[str, dict]:
    modes = {"eager": {}, "compiled": {"compile": True}}
    if device.type == "cuda":
        modes |= {"cuda graph": {"cuda_graph": True},
                  "compiled + cuda graph": {"compile": True, "cuda_graph": True}}
    return modes


def main(argv: list[str]) -> int:
    ap = recipe_argparser("python -m bench.decode_modes", __doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="timed runs of every mode, interleaved")
    ap.add_argument("--modes", help="comma-separated modes to run (default: every mode this device "
                                    "has: eager, compiled; CUDA: cuda graph, compiled + cuda graph)")
    ap.add_argument("--json", help="also write the report to this file")
    opts = ap.parse_intermixed_args(argv)
    recipe = load_recipe(opts.recipe, opts.overrides)
    rt = recipe_runtime(recipe)  # on CPU with the tuned allocator, as training
    sw = recipe.kv_bench
    modes = modes_for(rt.device)
    if opts.modes:
        wanted = [m.strip() for m in opts.modes.split(",") if m.strip()]
        unknown = [m for m in wanted if m not in modes]
        if unknown:
            raise UserError(f"--modes: {', '.join(unknown)} not a decode mode on {rt.device.type}; "
                            f"choose from {', '.join(modes)}")
        modes = {m: kw for m, kw in modes.items() if m == "eager" or m in wanted}
    model, source = resolve_model(recipe, rt)
    results = []
    for batch in sorted(set(sw.batch_sizes)):
        gen = torch.Generator().manual_seed(0)
        prompts = torch.randint(0, model.config.vocab_size, (batch, sw.prompt_len), generator=gen).tolist()
        engines = {name: Engine(model, **kw) for name, kw in modes.items()}
        tokens: dict[str, list] = {name: [] for name in modes}

        def stream(name):
            def run():
                for step in engines[name].generate(prompts, max_new_tokens=sw.max_new_tokens,
                                                   temperature=0.0):
                    tokens[name].append(step)
                    yield step
            return run

        warmup_s = {}
        for name in modes:
            warmup_s[name] = sum(timed_run(stream(name), rt.device)["total_s"]
                                 for _ in range(max(1, sw.warmup)))
        rates: dict[str, list[float]] = {name: [] for name in modes}
        names = list(modes)
        for r in range(opts.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                tokens[name] = []
                run = timed_run(stream(name), rt.device)
                rates[name].append(batch * sw.max_new_tokens / run["total_s"])
        eager_med = statistics.median(rates["eager"])
        ref = [t for step in tokens["eager"] for t in step]
        for name in names:
            med = statistics.median(rates[name])
            got = [t for step in tokens[name] for t in step]
            same = sum(a == b for a, b in zip(ref, got)) / max(1, len(ref))
            results.append({"batch": batch, "mode": name, "tok_per_s_median": round(med, 1),
                            "tok_per_s_min": round(min(rates[name]), 1),
                            "tok_per_s_max": round(max(rates[name]), 1),
                            "vs_eager": round(med / eager_med, 3),
                            "tokens_equal_to_eager": round(same, 4),
                            "warmup_s": round(warmup_s[name], 3)})
            print(f"batch {batch:>4} {name:<22} {med:>9.1f} tok/s ({min(rates[name]):.1f}–"
                  f"{max(rates[name]):.1f})  ×{med / eager_med:.2f} eager  tokens = eager: "
                  f"{100 * same:.1f}%  warmup {warmup_s[name]:.1f} s", flush=True)
        engines.clear()  # free this batch size's caches and compiled steps before the next
    report = {
        "benchmark": "KV-cache decode modes side by side",
        "recipe": opts.recipe, "overrides": opts.overrides, "model": source,
        "prompt_len": sw.prompt_len, "new_tokens": sw.max_new_tokens, "sampling": "greedy",
        "method": {"warmup_runs": max(1, sw.warmup), "rounds": opts.rounds,
                   "order": "every mode once per round, rotating", "sync": "device sync per run"},
        **environment(rt.device, rt.dtype),
        "results": results}
    emit(report, opts.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
