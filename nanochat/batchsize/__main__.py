"""Batch-size discovery for a recipe:  python -m nanochat.batchsize RECIPE [key=value ...] [--stage S]

Prints the device batch size the recipe's stage would train at on this machine, probing only
when the cache (`discovery.cache_dir`) does not have it yet (nanochat/batchsize/search.py).
"""
from __future__ import annotations

from nanochat.batchsize.search import discover
from nanochat.common import UserError, cli_main
from nanochat.config import TRAINING_SECTIONS


def main(argv: list[str]) -> int:
    from nanochat.recipe import load_recipe, recipe_argparser
    ap = recipe_argparser("python -m nanochat.batchsize",
                          "Find the device batch size for a recipe (or read it from the cache).")
    ap.add_argument("--stage", choices=list(TRAINING_SECTIONS), default="base")
    ap.add_argument("--world-size", type=int, default=None,
                    help="ranks of the run the answer is for (default: cluster.nodes × "
                         "cluster.gpus_per_node; the legal sizes depend on it)")
    ap.add_argument("--fresh", action="store_true", help="probe even if the cache has the answer")
    args = ap.parse_intermixed_args(argv)
    recipe = load_recipe(args.recipe, args.overrides)
    world = args.world_size or recipe.cluster.world_size
    if world < 1:
        raise UserError(f"--world-size must be ≥ 1, got {world}")
    d = discover(recipe, args.stage, world, use_cache=not args.fresh)
    print(f"device_batch_size: {d.batch_size}")
    print(f"largest: {d.largest}")
    print(f"fastest: {d.fastest}")
    print(f"choose: {recipe.discovery.choose}")
    print(f"world_size: {world}")
    print(f"from_cache: {'true' if d.from_cache else 'false'}")
    print(f"probes: {d.probes_run}")
    print(f"seconds: {d.seconds:.3f}")
    print(f"cache_file: {d.cache_path.resolve() if d.cache_path else 'none (cache dir not usable)'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
