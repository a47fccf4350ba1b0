"""KV-cache memory with and without ring buffers:  python -m nanochat.bench.kv_memory RECIPE [section.key=value ...] [--batch B] [--max-len N]

Allocates the engine's static cache (nanochat/kv_cache.py) for the recipe's model shape, B rows
of N positions (default: 2 × sequence_len, generation past the training context), once with
every layer keeping all N positions and once with sliding-window layers keeping only their
window in a ring buffer, and prints the bytes each holds (the tensors' sizes, read back from
the allocated cache; on CUDA also the allocator's growth while building it). The recipe's
model.window_pattern decides which layers have a window: with "L" both are the same.
"""
from __future__ import annotations

import torch

from nanochat.bench import environment
from nanochat.common import cli_main
from nanochat.gpt import GPTConfig
from nanochat.kv_cache import KVCache
from nanochat.recipe import load_recipe, recipe_argparser
from nanochat.runtime import compute_dtype


def measure(config: GPTConfig, batch: int, max_len: int, device: torch.device,
            dtype: torch.dtype, ring: bool) -> dict:
    """Bytes of one allocated cache (and, on CUDA, the allocator's growth building it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
    cache = KVCache(batch, max_len, config, device, dtype, ring=ring)
    out = {"bytes": cache.nbytes(), "ring_layers": sum(cache.is_ring(i) for i in range(config.n_layer)),
           "ring_len": cache.ring_len}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        out["cuda_allocated_bytes"] = torch.cuda.memory_allocated(device) - before
    del cache
    return out


def main(argv: list[str]) -> int:
    ap = recipe_argparser("python -m nanochat.bench.kv_memory", __doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8, help="cache rows (default 8)")
    ap.add_argument("--max-len", type=int, default=0, help="positions per row (default 2 × sequence_len)")
    ap.add_argument("--device", default="cpu", help="where to allocate (cpu | cuda; default cpu)")
    opts = ap.parse_intermixed_args(argv)
    recipe = load_recipe(opts.recipe, opts.overrides)
    config = GPTConfig.from_args(recipe.model, recipe.model.vocab_size or recipe.tokenizer.vocab_size)
    device = torch.device(opts.device)
    dtype = compute_dtype(device, recipe.train.dtype)
    max_len = opts.max_len or 2 * config.sequence_len
    env = environment(device, dtype)
    print(f"kv_memory: {recipe.name}, depth {config.n_layer}, n_kv_head {config.n_kv_head}, "
          f"head_dim {config.head_dim}, window_pattern {config.window_pattern!r} "
          f"(windows {config.windows()}), batch {opts.batch}, max_len {max_len}")
    print(f"method: one allocation each, sizes of the cache's tensors; device {env['device']}, "
          f"{env['dtype']}, torch {env['versions']['torch']}")
    full = measure(config, opts.batch, max_len, device, dtype, ring=False)
    ring = measure(config, opts.batch, max_len, device, dtype, ring=True)
    for name, r in (("all positions", full), ("window rings", ring)):
        extra = (f", cuda allocated {r['cuda_allocated_bytes'] / 2**20:.2f} MiB"
                 if "cuda_allocated_bytes" in r else "")
        print(f"  {name:14s} {r['bytes'] / 2**20:10.2f} MiB  ({r['ring_layers']} ring layers of "
              f"{r['ring_len']} slots){extra}")
    print(f"  rings hold {ring['bytes'] / full['bytes']:.3f} of the full cache")
    return 0


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
