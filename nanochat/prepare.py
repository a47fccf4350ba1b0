"""Prepare a recipe's data and tokenizer:  python -m nanochat.prepare RECIPE [key=value ...]

Downloads (fineweb) or builds (offline) the parquet shards into data.data_dir and trains the
tokenizer into cache_dir/tokenizer/<key>, where <key> hashes the data and tokenizer sections.
Training calls the same functions, so running this first is optional; on a cluster it lets a
login or CPU node do the downloading before GPU jobs start. File locks make concurrent jobs safe.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

from filelock import FileLock

from nanochat.common import cli_main
from nanochat.config import Recipe
from nanochat.recipe import load_recipe, recipe_argparser
from nanochat.dataset import prepare_data, split_shards, tokenizer_text_iterator
from nanochat.tokenizer import Tokenizer, train_tokenizer


# --------------------------------------------------------------------------------------------
# Data and tokenizer, prepared once and shared (file locks: several jobs may start together).

def prepare_shards(recipe: Recipe, rt=None) -> tuple[list[Path], list[Path]]:
    """Shards on disk (downloaded/built by local rank 0 under a lock); returns (train, val)."""
    data_dir = Path(recipe.data.data_dir)
    if rt is None or rt.dist.local_rank == 0:
        data_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(str(data_dir) + ".lock"):
            paths = prepare_data(recipe.data)
    if rt is not None:
        _barrier(rt)
    if rt is not None and rt.dist.local_rank != 0:
        paths = prepare_data(recipe.data)  # already done: just lists the shards
    return split_shards(paths)


def tokenizer_key(recipe: Recipe) -> str:
    blob = json.dumps({"data": dataclasses.asdict(recipe.data),
                       "tokenizer": dataclasses.asdict(recipe.tokenizer)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def prepare_tokenizer(recipe: Recipe, train_paths: list[Path], rt=None) -> Tokenizer:
    """Train the tokenizer once per (data, tokenizer) settings into cache_dir/tokenizer/<key>."""
    tok_dir = Path(recipe.cache_dir) / "tokenizer" / tokenizer_key(recipe)
    if rt is None or rt.dist.local_rank == 0:
        tok_dir.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(tok_dir) + ".lock"):
            if not (tok_dir / "tokenizer.json").exists():
                texts = tokenizer_text_iterator(train_paths, recipe.tokenizer.train_chars,
                                                recipe.tokenizer.doc_cap)
                train_tokenizer(recipe.tokenizer, texts, tok_dir)
    if rt is not None:
        _barrier(rt)
    return Tokenizer.load(tok_dir)



def _barrier(rt) -> None:
    """Other ranks wait for local rank 0's preparation (torch imported only when distributed)."""
    if rt is not None and rt.dist.is_distributed:
        import torch.distributed
        torch.distributed.barrier()


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
