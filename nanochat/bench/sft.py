"""SFT throughput benchmark:  python -m nanochat.bench.sft RECIPE [key=value ...] [--compile both|on|off]

One process, the current device, the real SFT data (sft.source, rendered with the run's chat
template) and the real training step (forward, backward, Muon + AdamW) of the recipe's model at
sft.device_batch_size × sequence_len. It compares, side by side:

- packing: `bestfit` (whole conversations packed best-fit into fixed rows, what nanochat.sft
  trains with), `pad_longest` (one conversation per row, each batch padded to its longest row:
  a new shape almost every batch), `pad_T` (one conversation per row padded to the full
  sequence: the seeds' fixed shape);
- eager vs torch.compile(dynamic=False) — under which pad_longest recompiles for new shapes
  (counted; torch falls back to eager past its recompile limit).

Method per (packing, compile): `--warmup` untimed steps (compilation happens there; timed
separately), then `--repeats` windows of `--steps` steps with a device sync at both ends; tokens
are counted from the batches themselves. Reports all tokens/s (pad included) median/min/max, the
fraction of real (non-pad) tokens of one epoch of that packing, real tokens/s = tokens/s × that
fraction (the useful rate), and the time one epoch of the data takes at that rate.
Weights are random-initialised: speed does not depend on them.
"""
from __future__ import annotations

import json

from nanochat.bench import environment, timing_args
from nanochat.bench.train import bench_training
from nanochat.common import UserError, cli_main
from nanochat.dataset import prepare_shards, prepare_tokenizer
from nanochat.recipe import load_recipe, recipe_argparser
from nanochat.sft_loader import MODES, SFTLoader, packing_stats, render_conversations
from nanochat.runtime import recipe_runtime


def main(argv: list[str]) -> int:
    ap = recipe_argparser("python -m nanochat.bench.sft", __doc__.splitlines()[0])
    ap.add_argument("--compile", choices=["both", "on", "off"], default="both")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(MODES)}")
    timing_args(ap, warmup=3, repeats=3, json_file=False)
    ap.add_argument("--steps", type=int, default=5)
    opts = ap.parse_intermixed_args(argv)
    modes = opts.modes.split(",")
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise UserError(f"--modes: unknown {', '.join(bad)}; choose from {', '.join(MODES)}")
    recipe = load_recipe(opts.recipe, opts.overrides)
    B = recipe.sft.device_batch_size
    if B == "auto":
        raise UserError("bench.sft needs a fixed sft.device_batch_size (e.g. sft.device_batch_size=16)")
    rt = recipe_runtime(recipe)
    from nanochat.chat_data import load_sft_conversations
    train_paths, _ = prepare_shards(recipe, rt)
    tokenizer = prepare_tokenizer(recipe, train_paths, rt)
    T = recipe.model.sequence_len
    data = load_sft_conversations(recipe, "train")
    rendered = render_conversations(tokenizer, data.conversations, T + 1)
    items = rendered.items
    compiles = {"both": [False, True], "on": [True], "off": [False]}[opts.compile]
    results = []
    for mode in modes:
        stats = packing_stats(items, T, mode=mode, batch_size=B, seed=recipe.train.seed)
        for c in compiles:
            loader = SFTLoader(items, B, T, tokenizer.bos_token_id, device=rt.device,
                               seed=recipe.train.seed, mode=mode)
            r = bench_training(recipe, rt, c, opts.warmup, opts.steps, opts.repeats, batch=B,
                               batches=loader, vocab=tokenizer.vocab_size)
            real = r["tok_per_s_median"] * stats["real_token_fraction"]
            results.append({"packing": mode, **{k: v for k, v in r.items() if k not in ("params", "flops_per_token")},
                            "rows_per_epoch": stats["rows"],
                            "real_token_fraction": round(stats["real_token_fraction"], 4),
                            "real_tok_per_s": round(real, 1),
                            "epoch_s": round(stats["tokens"] / r["tok_per_s_median"], 1)})
            print(f"{mode:12s} compile={str(c):5s} tok/s {r['tok_per_s_median']:>10,.0f} "
                  f"({r['tok_per_s_min']:,.0f}–{r['tok_per_s_max']:,.0f})  real "
                  f"{100 * stats['real_token_fraction']:5.1f}%  real tok/s {real:>10,.0f}  "
                  f"compilations {r['compilations']}", flush=True)
    base = next((r for r in results if r["packing"] == "bestfit" and not r["compile"]), None)
    for r in results:
        if base:
            r["real_tok_per_s_vs_bestfit_eager"] = round(r["real_tok_per_s"] / base["real_tok_per_s"], 3)
    report = {
        "benchmark": "sft train_step (forward + backward + optimizer step) on packed chat data",
        "recipe": opts.recipe, "overrides": opts.overrides,
        "shape": {"depth": recipe.model.depth, "batch": B, "seq": T},
        "data": {"source": recipe.sft.source, "conversations": len(items),
                 "truncated": rendered.truncated, "sources": data.sources,
                 "mean_tokens": round(sum(len(i) for i, _ in items) / max(1, len(items)), 1)},
        "method": {"warmup_steps": opts.warmup, "steps_per_window": opts.steps,
                   "windows": opts.repeats, "sync": "device sync before/after each window",
                   "real_tok_per_s": "tok/s median × the packing's real-token fraction over one epoch"},
        **environment(rt.device, rt.dtype),
        "results": results,
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
