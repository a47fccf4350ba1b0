"""Optimizer step benchmark:  python -m nanochat.bench.optim RECIPE [key=value ...]

Times the optimizer step alone (Muon + AdamW as `build_optimizers` makes them, gradient clipping
off) on the recipe's model — its real parameter shapes — with fixed random gradients: first with
the recipe's optim section, then with each of upstream's Muon options switched on over it:
variance reduction (NorMuon), cautious weight decay (optim.muon_weight_decay=0.28), both. These
options only add work to the optimizer step; forward and backward are unchanged
(`nanochat.bench.train` times the whole training step).

Method: `--warmup` untimed steps per variant (optimizer state is allocated in the first), then
`--repeats` rounds; each round times one window of `--steps` steps of every variant in turn
(round-robin, so a load change on a shared machine hits all variants alike), with a device sync
at both ends of every window. Milliseconds per step: median, min and max over the windows, and
the median's change against the recipe's row. Prints JSON (`--json PATH` also writes it there)
with the device and software versions.
"""
from __future__ import annotations

import dataclasses
import statistics

import torch

from nanochat.bench import emit, environment, seconds_per_call, timing_args
from nanochat.common import cli_main
from nanochat.config import OptimArgs
from nanochat.gpt import GPTConfig, build_model
from nanochat.optim import build_optimizers
from nanochat.recipe import load_recipe, recipe_argparser
from nanochat.runtime import recipe_runtime

VARIANTS = {  # name: optim fields set over the recipe's
    "recipe": {},
    "+variance_reduction": {"variance_reduction": True},
    "+cautious_weight_decay": {"muon_weight_decay": 0.28},
    "+both": {"variance_reduction": True, "muon_weight_decay": 0.28},
}


def bench_optimizers(model, variants: dict[str, OptimArgs], rt, warmup: int, steps: int,
                     repeats: int) -> list[dict]:
    """ms per optimizer step of `model`'s parameters under each variant's args (gradients fixed,
    random; the variants share the parameters, each has its own optimizer state)."""
    gen = torch.Generator(device=rt.device).manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen, device=rt.device, dtype=p.dtype) * 1e-3
    stepping = {}
    for name, args in variants.items():
        opts = build_optimizers(model.param_groups(), args, model.config.n_embd,
                                all_params=model.parameters())
        stepping[name] = lambda opts=opts: [o.step() for o in opts]
        seconds_per_call(stepping[name], rt.sync, warmup, 0, 0)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, step in stepping.items():
            times[name] += seconds_per_call(step, rt.sync, 0, 1, steps)
    return [{"variant": name, "ms_per_step_median": round(1e3 * statistics.median(t), 3),
             "ms_per_step_min": round(1e3 * min(t), 3), "ms_per_step_max": round(1e3 * max(t), 3)}
            for name, t in times.items()]


def main(argv: list[str]) -> int:
    ap = recipe_argparser("python -m nanochat.bench.optim", __doc__.splitlines()[0])
    timing_args(ap, warmup=3, repeats=5)
    ap.add_argument("--steps", type=int, default=10)
    opts = ap.parse_intermixed_args(argv)
    recipe = load_recipe(opts.recipe, opts.overrides)
    rt = recipe_runtime(recipe)
    vocab = recipe.model.vocab_size or recipe.tokenizer.vocab_size
    torch.manual_seed(0)
    model = build_model(GPTConfig.from_args(recipe.model, vocab), rt.device)
    variants = {name: dataclasses.replace(recipe.optim, **fields) for name, fields in VARIANTS.items()}
    results = bench_optimizers(model, variants, rt, opts.warmup, opts.steps, opts.repeats)
    base = results[0]["ms_per_step_median"]
    for r in results:
        r["vs_recipe_percent"] = round(100 * (r["ms_per_step_median"] / base - 1), 1)
    params = {name: sum(p.numel() for p in ps) for name, ps in model.param_groups().items()}
    report = {
        "benchmark": "optimizer step (Muon + AdamW), gradients fixed",
        "recipe": opts.recipe, "overrides": opts.overrides,
        "params_per_group": params,
        "method": {"warmup_steps": opts.warmup, "steps_per_window": opts.steps,
                   "windows": opts.repeats, "order": "round-robin over variants",
                   "sync": "device sync before/after each window"},
        **environment(rt.device, rt.dtype),
        "results": results,
    }
    emit(report, opts.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
