"""What a recipe's SFT data holds:  python -m nanochat.data RECIPE [key=value ...] [--samples N]

Counts per split and per source, and a few conversations (nanochat/data/conversations.py).
"""
from __future__ import annotations

from nanochat.common import cli_main
from nanochat.data.conversations import SPLITS, load_sft_conversations


def main(argv: list[str]) -> int:
    from nanochat.recipe import load_recipe, recipe_argparser
    ap = recipe_argparser("python -m nanochat.data",
                          "Load the recipe's SFT conversations and print counts and a sample.")
    ap.add_argument("--samples", type=int, default=3, help="conversations shown per split")
    args = ap.parse_intermixed_args(argv)
    recipe = load_recipe(args.recipe, args.overrides)
    for split in SPLITS:
        cs = load_sft_conversations(recipe, split)
        print(f"{split}: {len(cs.conversations):,} conversations ({cs.skipped} malformed skipped)")
        for source, n in sorted(cs.sources.items()):
            print(f"  {source:<24} {n:>8,}")
        for conv in cs.conversations[:max(0, args.samples)]:
            print("  ---")
            for m in conv["messages"]:
                text = m["content"] if len(m["content"]) <= 200 else m["content"][:200] + " …"
                print(f"  {m['role']:>9}: " + text.replace("\n", "\n" + " " * 13))
    return 0


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
