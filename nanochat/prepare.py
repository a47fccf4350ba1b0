"""Prepare a recipe's data and tokenizer:  python -m nanochat.prepare RECIPE [key=value ...]

Downloads (fineweb) or builds (offline) the parquet shards into data.data_dir and trains the
tokenizer into cache_dir/tokenizer/<key>, where <key> hashes the data and tokenizer sections.
Training calls the same functions, so running this first is optional; on a cluster it lets a
login or CPU node do the downloading before GPU jobs start. File locks make concurrent jobs safe.
"""
from __future__ import annotations

import time
from pathlib import Path

from nanochat.common import cli_main
from nanochat.dataset import prepare_shards, prepare_tokenizer, tokenizer_key
from nanochat.recipe import load_recipe, recipe_argparser


def main(argv: list[str]) -> int:
    ap = recipe_argparser("python -m nanochat.prepare", "Download/build shards, train the tokenizer, fetch the SFT data.")
    args = ap.parse_intermixed_args(argv)
    recipe = load_recipe(args.recipe, args.overrides)
    t0 = time.perf_counter()
    train, val = prepare_shards(recipe)
    tok = prepare_tokenizer(recipe, train)
    print(f"data: {len(train)} train + {len(val)} val shards in {recipe.data.data_dir}")
    print(f"tokenizer: vocab {tok.vocab_size} in "
          f"{Path(recipe.cache_dir) / 'tokenizer' / tokenizer_key(recipe)} "
          f"({time.perf_counter() - t0:.1f} s)")
    if "sft" in recipe.stages or "eval" in recipe.stages:
        # compute nodes often have no internet: fetch the chat data (the chatterbot wheel, or
        # SmolTalk into the datasets cache) and the task word list here, on the login node
        from nanochat.chat_data import load_sft_conversations
        for split in ("train", "val"):
            n = len(load_sft_conversations(recipe, split).conversations)
            print(f"sft data: {n:,} {split} conversations ({recipe.sft.source})")
    return 0


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
