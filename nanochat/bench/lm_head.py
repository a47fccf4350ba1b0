"""lm_head layouts at decode batch sizes:  python -m nanochat.bench.lm_head RECIPE [key=value ...]

The lm_head is most of a small model's decode step (at the d4 shape 33.5 of its 46 MB of
weights). This times its matmul — normed hidden states (B, n_embd) → logits (B, vocab) — in every
layout the decode step can use (decode.HEAD_LAYOUTS: nn.Linear's weight, the weight transposed,
MKL's packed sgemm), side by side in one process, at each of `kv_bench.batch_sizes`, on a
random-initialised model of the recipe's shape in its inference dtype. All layouts compute the
same products; the bench also checks their outputs agree.

Method: per (batch, layout) `--warmup` untimed calls, then `--repeats` windows of `--calls`
calls with a device sync at both ends; median, min and max µs per call, and the weight bytes
per call ÷ the median time (GB/s), to compare with the copy bandwidth of nanochat.bench.kv_sweep.
"""
from __future__ import annotations

import json
import statistics
from functools import partial

import torch

from nanochat.bench import environment, seconds_per_call, timing_args
from nanochat.common import cli_main
from nanochat.engine import build_inference_model
from nanochat.decode import HEAD_LAYOUTS, DecodeStep, mkl_packed_available
from nanochat.gpt import GPTConfig
from nanochat.recipe import load_recipe, recipe_argparser
from nanochat.runtime import recipe_runtime


def main(argv: list[str]) -> int:
    ap = recipe_argparser("python -m nanochat.bench.lm_head", __doc__.splitlines()[0])
    timing_args(ap, warmup=10, repeats=5, json_file=False)
    ap.add_argument("--calls", type=int, default=20)
    opts = ap.parse_intermixed_args(argv)
    recipe = load_recipe(opts.recipe, opts.overrides)
    rt = recipe_runtime(recipe)
    config = GPTConfig.from_args(recipe.model, recipe.model.vocab_size or recipe.tokenizer.vocab_size)
    model = build_inference_model(config, rt.device, rt.dtype)
    layouts = [h for h in HEAD_LAYOUTS if h != "packed" or
               (mkl_packed_available() and rt.device.type == "cpu" and rt.dtype == torch.float32)]
    weight_bytes = model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    gen = torch.Generator(device=rt.device).manual_seed(0)
    results = []
    # the layouts sum the same products in different orders: bf16 rounds each partial sum to 8
    # mantissa bits (~4e-3 relative), fp32 to 24
    tol = 1e-4 if rt.dtype == torch.float32 else 2e-2
    with torch.inference_mode():
        for batch in sorted(set(recipe.kv_bench.batch_sizes)):
            x = torch.randn(batch, 1, config.n_embd, device=rt.device, dtype=rt.dtype, generator=gen)
            reference = None
            for layout in layouts:
                step = DecodeStep(model, head=layout, batch=batch)
                out = step.head_matmul(x)
                reference = out if reference is None else reference
                agree = torch.allclose(out.float(), reference.float(), rtol=tol, atol=tol)
                times = [s * 1e6 for s in seconds_per_call(partial(step.head_matmul, x), rt.sync,
                                                           opts.warmup, opts.repeats, opts.calls)]
                med = statistics.median(times)
                results.append({"batch": batch, "layout": layout, "us_median": round(med, 1),
                                "us_min": round(min(times), 1), "us_max": round(max(times), 1),
                                "weight_gb_s": round(weight_bytes / med / 1e3, 1),
                                "agrees_with_linear": bool(agree)})
                print(f"batch {batch:>4} {layout:<10} {med:>9.1f} µs ({min(times):.1f}–{max(times):.1f})"
                      f"  {weight_bytes / med / 1e3:6.1f} GB/s", flush=True)
                del step
    print(json.dumps({
        "benchmark": "lm_head matmul per decode layout",
        "recipe": opts.recipe, "overrides": opts.overrides,
        "shape": {"n_embd": config.n_embd, "vocab": config.vocab_size, "weight_mb": weight_bytes / 1e6},
        "method": {"warmup_calls": opts.warmup, "calls_per_window": opts.calls,
                   "windows": opts.repeats, "sync": "device sync before/after each window"},
        **environment(rt.device, rt.dtype),
        "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
