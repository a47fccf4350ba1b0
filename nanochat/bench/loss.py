"""Chunked vs unchunked loss:  python -m nanochat.bench.loss RECIPE [key=value ...]

The loss's memory and speed before and after nanochat/loss.py, in one process, on the recipe's
model (e.g. configs/d4.yaml: width 256, vocab 32,768, where the lm_head is most of the model):
"unchunked" is model.loss_chunk_rows=0 (the whole rows × vocab fp32 logits, the old forward),
"chunked" is the recipe's own setting (default -1, automatic chunks).

1. Peak memory of the training step at each `--peaks` batch size, measured as batch-size
   discovery measures it: a probe (nanochat.memory_probe) in a fresh child process (CPU: bytes
   resident above the child's baseline; CUDA: reserved bytes), two optimizer steps and one
   evaluation forward.
2. Tokens/s of forward + backward at the recipe's device batch (`--batch` overrides): `--warmup`
   untimed calls, then `--repeats` timed calls, a device sync around each; median, min, max.
3. The device batch size that discovery finds for each (a fresh temporary cache per search), at
   the recipe's discovery settings — set a budget, e.g. discovery.memory_budget_gb=2, and
   train.total_batch_size large enough that the candidates reach the memory limit.
Prints JSON (`--json PATH` also writes it). Not a test: figures depend on the machine and its load.
"""
from __future__ import annotations

import dataclasses
import statistics
import tempfile

import torch

from nanochat.batch_size import discover, probe_spec
from nanochat.bench import emit, environment, seconds_per_call, timing_args
from nanochat.common import UserError, cli_main
from nanochat.gpt import GPTConfig, build_model
from nanochat.memory_probe import ProbeServer, run_probe
from nanochat.recipe import load_recipe, recipe_argparser
from nanochat.runtime import recipe_runtime
from nanochat.targets import resolve_target


def with_chunk(recipe, rows: int):
    """The recipe with model.loss_chunk_rows = rows, the device batch left to discovery."""
    return dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, loss_chunk_rows=rows))


def variants(recipe) -> dict:
    own = recipe.model.loss_chunk_rows
    if own == 0:
        raise UserError("model.loss_chunk_rows is 0 (unchunked): leave it at -1 (auto) or set the "
                        "chunk rows to compare against the unchunked loss")
    return {"unchunked": with_chunk(recipe, 0), "chunked": with_chunk(recipe, own)}


def peaks(recipes: dict, batches: list[int]) -> list[dict]:
    """Training-step peak (GB) of each variant at each batch, one child process per probe."""
    rows = []
    target = resolve_target(next(iter(recipes.values())))
    server = ProbeServer() if target.device.type == "cpu" else None
    try:
        for b in batches:
            row = {"batch": b}
            for name, r in recipes.items():
                spec = probe_spec(r, target)
                p = server.probe(spec, b, None) if server else run_probe(spec, b)
                row[f"{name}_peak_gb"] = None if p["oom"] else round(p["peak_bytes"] / 1e9, 3)
            if row["unchunked_peak_gb"] and row["chunked_peak_gb"]:
                row["saved_gb"] = round(row["unchunked_peak_gb"] - row["chunked_peak_gb"], 3)
            rows.append(row)
    finally:
        if server:
            server.close()
    return rows


def fwd_bwd_tok_s(recipe, rt, batch: int, warmup: int, repeats: int) -> dict:
    """Tokens/s of one forward + backward (no optimizer) at `batch` rows, random tokens."""
    vocab = recipe.model.vocab_size or recipe.tokenizer.vocab_size
    config = GPTConfig.from_args(recipe.model, vocab)
    torch.manual_seed(0)
    model = build_model(config, rt.device).train()
    T = config.sequence_len
    gen = torch.Generator().manual_seed(0)
    xy = torch.randint(0, config.vocab_size, (batch, T + 1), generator=gen).to(rt.device)
    x, y = xy[:, :-1], xy[:, 1:]
    losses = []

    def step():
        with rt.autocast():
            loss = model(x, y)
        loss.backward()
        model.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    times = seconds_per_call(step, rt.sync, warmup, repeats, 1)
    rates = [batch * T / s for s in times]
    return {"batch": batch, "loss": round(losses[0].item(), 6),
            "tok_per_s": {"median": round(statistics.median(rates), 1), "min": round(min(rates), 1),
                          "max": round(max(rates), 1), "n": repeats}}


def discovered(recipe) -> dict:
    with tempfile.TemporaryDirectory(prefix="loss_bench_") as tmp:
        r = dataclasses.replace(recipe, discovery=dataclasses.replace(recipe.discovery, cache_dir=tmp))
        d = discover(r)
    mem = d.record["memory"]
    return {"batch_size": d.batch_size, "largest": d.largest, "probes": d.probes_run,
            "usable_gb": round(mem["usable_bytes"] / 1e9, 3), "memory_source": mem["source"],
            "probes_detail": [{"batch": p["batch"], "fits": p["fits"],
                               "peak_gb": None if p["peak_bytes"] is None else round(p["peak_bytes"] / 1e9, 3)}
                              for p in d.record["probes"]]}


def main(argv: list[str]) -> int:
    ap = recipe_argparser("python -m nanochat.bench.loss", __doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=None, help="device batch of the tokens/s runs "
                                                             "(default: the recipe's)")
    ap.add_argument("--peaks", default="8,32", help="batch sizes (comma-separated) at which to "
                                                    "probe each variant's training-step peak")
    timing_args(ap, warmup=2, repeats=5)
    ap.add_argument("--no-discovery", action="store_true", help="skip the two discovery searches")
    args = ap.parse_intermixed_args(argv)
    recipe = load_recipe(args.recipe, args.overrides)
    batch = args.batch if args.batch is not None else recipe.train.device_batch_size
    if batch == "auto":
        raise UserError("train.device_batch_size is auto; pass --batch N for the tokens/s runs")
    rt = recipe_runtime(recipe)
    recipes = variants(recipe)
    speed = {name: fwd_bwd_tok_s(r, rt, batch, args.warmup, args.repeats) for name, r in recipes.items()}
    found = {} if args.no_discovery else {name: discovered(r) for name, r in recipes.items()}
    peak_rows = peaks(recipes, [int(b) for b in args.peaks.split(",") if b.strip()])
    vocab = recipe.model.vocab_size or recipe.tokenizer.vocab_size
    report = {
        "benchmark": "loss: unchunked (model.loss_chunk_rows=0) vs chunked (nanochat/loss.py)",
        "recipe": args.recipe, "overrides": args.overrides,
        "shape": {"depth": recipe.model.depth, "vocab": vocab, "seq": recipe.model.sequence_len,
                  "chunk_rows": recipe.model.loss_chunk_rows},
        "method": {"peak": "training step (2 optimizer steps + 1 eval forward) probed as discovery "
                           "does, fresh child process per probe",
                   "tok_per_s": f"forward+backward at batch {batch}: {args.warmup} untimed + "
                                f"{args.repeats} timed calls, device sync around each",
                   "discovery": "fresh temporary cache dir per variant", "data": "random tokens"},
        **environment(rt.device, rt.dtype),
        "peaks": peak_rows, "fwd_bwd": speed,
        "speed_chunked_over_unchunked": round(speed["chunked"]["tok_per_s"]["median"]
                                              / speed["unchunked"]["tok_per_s"]["median"], 3),
        "discovery": found,
    }
    emit(report, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
