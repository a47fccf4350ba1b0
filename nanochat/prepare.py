"""Prepare what a recipe's stages need:  python -m nanochat.prepare RECIPE [key=value ...]

Compute nodes often have no internet, so jobs never download (nanochat.common.not_prepared):
this command fetches everything on a login node, and `jobs/launch.py` runs it before it
submits anything (`--no-prepare` skips that). Cheap when already done. By the recipe's stages:

- every stage: the parquet shards in data.data_dir (downloaded for fineweb, built from the
  PyPI sdist for offline) and the tokenizer trained into cache_dir/tokenizer/<key> — except with
  `--no-tokenizer`, which `jobs/launch.py` passes when it submits to SLURM: training rustbpe over
  tokenizer.train_chars (2 B by default) takes a CPU for minutes and gigabytes of memory, which
  login-node limits kill, and it needs no network, so the run's first job trains it on its own
  CPUs (nanochat.data.shards.prepare_tokenizer, under a file lock: parallel jobs train it once);
- sft: the conversations (the chatterbot-corpus wheel, or SmolTalk into the datasets cache);
- sft, eval: the generated tasks' word list (Debian's wamerican, else the chatterbot wheel);
- eval: the hub tasks of eval.hub_tasks into the datasets cache, when the hub answers
  (otherwise they are skipped, here and in the eval job, with the reason);
- eval.core or train.core_every: the CORE eval bundle from eval.core_url into cache_dir/eval_bundle (resumable,
  retried, unpacked atomically), or eval.core_bundle's local copy.

File locks make concurrent preparations safe; each step prints what it found and how long it took.
"""
from __future__ import annotations

import time
from pathlib import Path

from nanochat.common import cli_main
from nanochat.config import Recipe
from nanochat.data.shards import prepare_shards, prepare_tokenizer, tokenizer_key
from nanochat.recipe import load_recipe, recipe_argparser
from nanochat.tokenizer import TOKENIZER_FILE


def _step(what: str, fn) -> None:
    t0 = time.perf_counter()
    line = fn()
    print(f"prepare: {what}: {line} ({time.perf_counter() - t0:.1f} s)", flush=True)


def prepare(recipe: Recipe, tokenizer: bool = True) -> None:
    """Everything the recipe's stages need; `tokenizer=False` leaves an untrained tokenizer to
    the first job (and says so)."""
    def data():
        train, val = prepare_shards(recipe)
        state["train"] = train
        return f"{len(train)} train + {len(val)} val shards in {recipe.data.data_dir}"

    def train_tokenizer():
        tok = prepare_tokenizer(recipe, state["train"])
        return f"vocab {tok.vocab_size:,} in {tok_dir}"

    tok_dir = Path(recipe.cache_dir) / "tokenizer" / tokenizer_key(recipe)
    state: dict = {}
    _step("data", data)
    if tokenizer or (tok_dir / TOKENIZER_FILE).exists():
        _step("tokenizer", train_tokenizer)
    else:
        print(f"prepare: tokenizer: not trained yet ({tok_dir}); the run's first job trains it on its "
              "own CPUs, not this node (a file lock makes parallel jobs train it once)", flush=True)
    stages = set(recipe.stages)
    if "sft" in stages:
        from nanochat.data.conversations import load_sft_conversations
        for split in ("train", "val"):
            _step("sft data", lambda split=split: f"{len(load_sft_conversations(recipe, split).conversations):,} "
                                                 f"{split} conversations ({recipe.sft.source})")
    if stages & {"sft", "eval"}:
        from nanochat.data import problems as generated
        _step("task words", lambda: f"{len(generated.load_words(offline_cache=recipe.data.offline_cache, package=recipe.sft.offline_package)):,} words")
    if "eval" in stages and recipe.eval.hub_tasks:
        from nanochat.data.problems import hub_unreachable, load_hub_problems
        why = hub_unreachable()
        for name in recipe.eval.hub_tasks:
            if why is not None:
                print(f"prepare: hub task {name}: skipped ({why}); the eval job will skip it too", flush=True)
                continue
            _step(f"hub task {name}", lambda name=name: f"{len(load_hub_problems(name, recipe.eval.hub_problems))} "
                                                        "problems in the datasets cache")
    if recipe.eval.core or recipe.train.core_every > 0:
        from nanochat.core_eval import ensure_bundle, load_bundle

        def core_bundle():
            path, how = ensure_bundle(recipe.eval, recipe.cache_dir)
            tasks, skipped = load_bundle(path)
            return f"{len(tasks)} tasks in {path} ({how})" + (f"; {len(skipped)} unusable: " + "; ".join(
                f"{k}: {v}" for k, v in skipped.items()) if skipped else "")
        _step("CORE bundle", core_bundle)


def main(argv: list[str]) -> int:
    ap = recipe_argparser("python -m nanochat.prepare", __doc__.splitlines()[0])
    ap.add_argument("--no-tokenizer", action="store_true",
                    help="fetch and build the data, but leave an untrained tokenizer to the first job "
                         "(a login node: training it takes minutes of CPU and gigabytes)")
    args = ap.parse_intermixed_args(argv)
    recipe = load_recipe(args.recipe, args.overrides)
    t0 = time.perf_counter()
    prepare(recipe, tokenizer=not args.no_tokenizer)
    print(f"prepare: done in {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
