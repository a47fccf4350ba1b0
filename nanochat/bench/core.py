"""CORE evaluation throughput:  python -m nanochat.bench.core RECIPE [key=value ...] [--bundle DIR]
                                                         [--examples N] [--warmup W] [--repeats R]

One process, the current device, nanochat.core.evaluate_core at eval.core_batch_size sequences
per forward on a random-initialised model of the recipe's shape (scores mean nothing: only the
speed is measured, and it does not depend on the weights). The tokenizer is the recipe's when
`nanochat.prepare` has trained it, else a byte-level one (every byte a token: sequences are
~4x longer in tokens than with a trained BPE of the same text; the output says which). The
bundle is `--bundle` (e.g. the real eval_bundle) or a synthetic one written here in the real
layout: CORE's mix of kinds and shot counts (multiple choice 10- and 0-shot, schema 0-shot,
language modelling 10- and 0-shot) over random words, `--examples` per task.

Method: batches as nanochat.eval makes them (eval.core_batch_size sequences, fewer where they
would pass eval.core_batch_size × sequence_len tokens). `--warmup` untimed evaluations of 4
examples per task, then `--repeats` timed evaluations of the whole bundle (max_per_task =
--examples), each between two device syncs. Reported: examples/s median (min–max) over the
repeats, tokens/s (every prompt token forwarded, padding excluded), the number of forwards and
the padding fraction of the batches.
"""
from __future__ import annotations

import csv
import json
import random
import statistics
import tempfile
import time
from pathlib import Path


from nanochat.bench import environment, timing_args
from nanochat.common import cli_main
from nanochat.core import (evaluate_core, example_sequences, fewshot_examples, load_bundle,
                           load_examples, render_prompts)
from nanochat.dataset import tokenizer_key
from nanochat.engine import build_inference_model
from nanochat.gpt import GPTConfig
from nanochat.recipe import load_recipe, recipe_argparser
from nanochat.runtime import recipe_runtime
from nanochat.tokenizer import TOKENIZER_FILE, Tokenizer

CATEGORY = {"multiple_choice": "language_understanding", "schema": "commonsense_reasoning",
            "language_modeling": "world_knowledge"}


def byte_tokenizer() -> Tokenizer:
    """A real nanochat Tokenizer with no merges: token i < 256 is byte i, then the specials."""
    return Tokenizer.from_ranks(r"\s+|\S+", {bytes([i]): i for i in range(256)})


def write_bundle(root: str | Path, tasks: list[dict]) -> Path:
    """Write `root`/eval_bundle in the real layout: core.yaml, eval_data/<category>/<label>.jsonl
    and eval_meta_data.csv. Each task: {"label", "kind", "rows" (the JSONL objects),
    "num_fewshot", "baseline" (percent), optional "delimiter" (default " ")}."""
    import yaml
    bundle = Path(root) / "eval_bundle"
    (bundle / "eval_data").mkdir(parents=True, exist_ok=True)
    entries = []
    for t in tasks:
        uri = f"{CATEGORY[t['kind']] if t['kind'] in CATEGORY else 'misc'}/{t['label']}.jsonl"
        (bundle / "eval_data" / uri).parent.mkdir(parents=True, exist_ok=True)
        (bundle / "eval_data" / uri).write_text("".join(json.dumps(r) + "\n" for r in t["rows"]))
        entries.append({"label": t["label"], "dataset_uri": uri, "num_fewshot": [t["num_fewshot"]],
                        "icl_task_type": t["kind"],
                        "continuation_delimiter": t.get("delimiter", " ")})
    (bundle / "core.yaml").write_text(yaml.safe_dump({"icl_tasks": entries}, sort_keys=False))
    with open(bundle / "eval_meta_data.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Eval Task", "Task Category", "Task Type", "#shots", "#datapoints",
                    "Random baseline", "Centered Metric?", "Description"])
        for t in tasks:
            w.writerow([t["label"], CATEGORY.get(t["kind"], "misc"), t["kind"], t["num_fewshot"],
                        len(t["rows"]), t["baseline"], "", "synthetic"])
    return bundle


def synthetic_tasks(n: int, seed: int = 0) -> list[dict]:
    """CORE's mix of kinds and shot counts over random words (lengths in words like the real
    tasks': hellaswag-, copa-, winogrande-, jeopardy- and lambada-like)."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8)))
             for _ in range(2000)]

    def text(k):
        return " ".join(rng.choice(words) for _ in range(k))

    return [  # lengths in words; with the byte-level tokenizer ~6 tokens a word
        {"label": "mc_10shot", "kind": "multiple_choice", "num_fewshot": 10, "baseline": 25,
         "rows": [{"query": text(10), "choices": [text(5) for _ in range(4)], "gold": i % 4}
                  for i in range(n)]},
        {"label": "mc_0shot", "kind": "multiple_choice", "num_fewshot": 0, "baseline": 50,
         "rows": [{"query": text(12) + " because", "choices": [text(6) for _ in range(2)],
                   "gold": i % 2} for i in range(n)]},
        {"label": "schema_0shot", "kind": "schema", "num_fewshot": 0, "baseline": 50,
         "rows": [{"context_options": [text(15) for _ in range(2)], "continuation": text(6),
                   "gold": i % 2} for i in range(n)]},
        {"label": "lm_10shot", "kind": "language_modeling", "num_fewshot": 10, "baseline": 0,
         "delimiter": "\nAnswer: ", "rows": [{"context": text(12), "continuation": text(2)}
                                              for _ in range(n)]},
        {"label": "lm_0shot", "kind": "language_modeling", "num_fewshot": 0, "baseline": 0,
         "rows": [{"context": text(60), "continuation": text(1)} for _ in range(n)]},
    ]


def token_counts(bundle: Path, tokenizer, max_per_task: int, batch_size: int, max_tokens: int,
                 max_len: int | None) -> tuple[int, int, int]:
    """(real tokens, padded tokens, forwards) of the evaluation: its sequences and batches."""
    real = padded = forwards = 0
    for task in load_bundle(bundle)[0]:
        data = load_examples(task, max_per_task)
        lens = sorted((len(t) for i in range(len(data)) for t, _, _ in example_sequences(
            task.kind, render_prompts(task.kind, data[i], task.delimiter,
                                      fewshot_examples(data, i, task.num_fewshot)),
            tokenizer, max_len)), reverse=True)
        real += sum(lens)
        b = 0
        while b < len(lens):
            rows = max(1, min(batch_size, max_tokens // lens[b], len(lens) - b))
            padded, forwards, b = padded + rows * lens[b], forwards + 1, b + rows
    return real, padded, forwards


def main(argv: list[str]) -> int:
    ap = recipe_argparser("python -m nanochat.bench.core", __doc__.splitlines()[0])
    ap.add_argument("--bundle", help="an eval_bundle directory (default: a synthetic one)")
    ap.add_argument("--examples", type=int, default=16, help="examples per task (max_per_task)")
    timing_args(ap, warmup=1, repeats=3)
    opts = ap.parse_intermixed_args(argv)
    recipe = load_recipe(opts.recipe, opts.overrides)
    rt = recipe_runtime(recipe)
    tok_dir = Path(recipe.cache_dir) / "tokenizer" / tokenizer_key(recipe)
    if (tok_dir / TOKENIZER_FILE).is_file():
        tokenizer, tok_source = Tokenizer.load(tok_dir), f"the recipe's ({tok_dir})"
    else:
        tokenizer, tok_source = byte_tokenizer(), "byte-level (the recipe's is not prepared)"
    vocab = recipe.model.vocab_size or recipe.tokenizer.vocab_size
    model = build_inference_model(GPTConfig.from_args(recipe.model, max(vocab, tokenizer.vocab_size)),
                                  rt.device, rt.dtype, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        if opts.bundle:
            bundle, bundle_source = Path(opts.bundle), opts.bundle
        else:
            bundle = write_bundle(tmp, synthetic_tasks(opts.examples))
            bundle_source = f"synthetic ({opts.examples} examples per task, random words)"
        B, n = recipe.eval.core_batch_size, opts.examples
        max_tokens = B * model.config.sequence_len  # as nanochat.eval
        real, padded, forwards = token_counts(bundle, tokenizer, n, B, max_tokens, model.rotary_len)

        def run(max_per_task):
            rt.sync()
            t0 = time.perf_counter()
            res = evaluate_core(model, tokenizer, bundle, max_per_task, rt.device, B,
                                verbose=False, max_tokens=max_tokens)
            rt.sync()
            return res, time.perf_counter() - t0

        t_warm = time.perf_counter()
        for _ in range(opts.warmup):
            run(4)
        t_warm = time.perf_counter() - t_warm
        runs = [run(n) for _ in range(opts.repeats)]
    res = runs[0][0]
    examples = sum(t["n"] for t in res["tasks"].values())
    eps = [examples / s for _, s in runs]
    report = {**environment(rt.device, rt.dtype), "model": "random init (seed 0)",
              "shape": {"depth": recipe.model.depth, "n_embd": model.config.n_embd,
                        "sequence_len": model.config.sequence_len, "vocab": model.config.vocab_size},
              "tokenizer": tok_source, "bundle": bundle_source, "batch_size": B,
              "max_tokens": max_tokens, "forwards": forwards,
              "tasks": {k: {"kind": t["kind"], "n": t["n"], "elapsed_s": t["elapsed_s"]}
                        for k, t in res["tasks"].items()},
              "examples": examples, "tokens": real, "padding_fraction": round(1 - real / padded, 4),
              "warmup": opts.warmup, "warmup_s": round(t_warm, 2), "repeats": opts.repeats,
              "seconds": [round(s, 3) for _, s in runs],
              "examples_per_s_median": round(statistics.median(eps), 2),
              "examples_per_s_min": round(min(eps), 2), "examples_per_s_max": round(max(eps), 2),
              "tokens_per_s_median": round(real / statistics.median(s for _, s in runs), 1)}
    print(f"CORE evaluation throughput — {report['device']}, {report['dtype']}, torch "
          f"{report['versions']['torch']}")
    print(f"model: random init (seed 0), depth {recipe.model.depth}, width {model.config.n_embd}, "
          f"vocab {model.config.vocab_size:,}; tokenizer: {tok_source}")
    print(f"bundle: {bundle_source}; {examples} examples, {real:,} tokens "
          f"({real / examples:.0f} per example) in {forwards} forwards of ≤ {B} sequences and "
          f"≤ {max_tokens:,} tokens (eval.core_batch_size × sequence_len), padding "
          f"{100 * report['padding_fraction']:.1f}%")
    print(f"method: {opts.warmup} untimed warmup evaluation(s) of 4 examples per task "
          f"({t_warm:.1f} s), then {opts.repeats} timed evaluations of the whole bundle, device "
          f"synced at both ends")
    for k, t in res["tasks"].items():
        print(f"  {k:<14} {t['kind']:<18} {t['n']:>4} examples  {t['elapsed_s']:6.2f} s "
              f"(first timed run)")
    print(f"examples/s: {report['examples_per_s_median']:.2f} median "
          f"({report['examples_per_s_min']:.2f}–{report['examples_per_s_max']:.2f} over "
          f"{opts.repeats} runs: {', '.join(f'{s:.2f} s' for s in report['seconds'])}); "
          f"tokens/s {report['tokens_per_s_median']:,.0f}")
    if opts.json:
        Path(opts.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
