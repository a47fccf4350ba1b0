"""Supervised fine-tuning:  python -m nanochat.sft RECIPE [section.key=value ...] [--refuse-existing]

Starts from a base checkpoint (`sft.base_checkpoint`, default: this run's base training) and
writes a chat model to RUN_DIR/sft (checkpoints, progress.jsonl, curves.png, tokenizer/), which
`python -m nanochat.chat RUN_DIR/sft` talks to and `python -m nanochat.eval RUN_DIR/sft` scores.

The step is base training's (`trainer.train_loop`: accumulation, schedule, logging, checkpoints,
exact resume, preemption); what differs is the data — whole conversations packed best-fit into
fixed (B, T) rows, loss only on assistant tokens (nanochat/data/loaders.py) — and the optimizer's
LRs (× sft.lr_frac, decayed over sft.warmdown_ratio of the steps). Fixed shapes let
torch.compile(dynamic=False) compile once for the whole run; the count is logged.

The model, tokenizer and their settings come from the base checkpoint; the recipe must describe
the same model and tokenizer (checked, one line each when not).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from nanochat import checkpoint as ckpt
from nanochat.batchsize.verify import at_device_batch, batch_check, discovery_summary
from nanochat.batchsize.search import resolve_device_batch_size
from nanochat.data.conversations import load_sft_conversations
from nanochat.common import UserError, cli_main, print0
from nanochat.config import Recipe, grad_accum_steps
from nanochat.gpt import GPTConfig, build_model
from nanochat.grad_sync import training_model
from nanochat.loss_eval import make_loss_evaluator
from nanochat.optim import build_optimizers
from nanochat.recipe import load_recipe, recipe_argparser
from nanochat.runtime import Runtime, compile_count, runtime
from nanochat.data.loaders import SFTLoader, packing_stats, render_conversations
from nanochat.tokenizer import Tokenizer
from nanochat.timing import imports_done, setup_phase
from nanochat.trainer import LoopSpec, start_run, train_loop


def sft_dir(recipe: Recipe) -> Path:
    return recipe.out_dir / "sft"


def load_base(recipe: Recipe) -> tuple[Path, dict, Tokenizer, GPTConfig]:
    """The base checkpoint, its meta, its run's tokenizer and model config — checked against
    the recipe (one line for each mismatch)."""
    where = recipe.sft.base_checkpoint or recipe.out_dir
    try:
        step_dir = ckpt.resolve_checkpoint(where)
    except UserError as e:
        hint = "" if recipe.sft.base_checkpoint else " (run base training first, or set sft.base_checkpoint)"
        raise UserError(f"sft.base_checkpoint: {e}{hint}") from None
    meta = ckpt.read_meta(step_dir)
    tok_dir = ckpt.run_dir_of(step_dir) / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        raise UserError(f"base checkpoint {step_dir} has no tokenizer at {tok_dir}; point "
                        "sft.base_checkpoint at a run directory written by nanochat.train")
    base_tok = (meta.get("recipe") or {}).get("tokenizer", {})
    ours = dataclasses.asdict(recipe.tokenizer)
    diff = {k: (base_tok.get(k), v) for k, v in ours.items() if k in base_tok and base_tok[k] != v}
    if diff:
        k, (theirs, mine) = next(iter(diff.items()))
        raise UserError(f"base checkpoint {step_dir} was trained with another vocabulary "
                        f"(tokenizer.{k} {theirs}, this recipe has {mine}); point "
                        f"sft.base_checkpoint at a base run of this recipe or set tokenizer.{k}={theirs}")
    tokenizer = Tokenizer.load(tok_dir)
    try:
        config = GPTConfig(**meta["model_config"])
    except (KeyError, TypeError) as e:
        raise UserError(f"{step_dir}/meta.json has no usable model_config ({type(e).__name__})")
    wanted = GPTConfig.from_args(recipe.model, tokenizer.vocab_size)
    if wanted != config:
        k = next(f.name for f in dataclasses.fields(GPTConfig)
                 if getattr(wanted, f.name) != getattr(config, f.name))
        raise UserError(f"base checkpoint {step_dir} holds another model than this recipe "
                        f"({k} {getattr(config, k)} vs {getattr(wanted, k)}); point "
                        "sft.base_checkpoint at a base run of this recipe")
    if tokenizer.vocab_size > config.vocab_size:
        raise UserError(f"the tokenizer in {tok_dir} has {tokenizer.vocab_size} tokens, more than "
                        f"the base model's vocabulary {config.vocab_size}")
    return step_dir, meta, tokenizer, config


def sft_optim_args(recipe: Recipe):
    """The base recipe's optim section at lr_frac of its LRs. Pretraining's batch and horizon
    rules and Muon's weight decay stay off, as in upstream's chat_sft.py (raw LRs × init_lr_frac,
    weight_decay 0); variance reduction and the other Muon switches carry over."""
    f = recipe.sft.lr_frac
    o = recipe.optim
    return dataclasses.replace(o, matrix_lr=o.matrix_lr * f, embedding_lr=o.embedding_lr * f,
                               unembedding_lr=o.unembedding_lr * f, scalar_lr=o.scalar_lr * f,
                               smear_lr=o.smear_lr * f,
                               muon_weight_decay=0.0, lr_batch_scaling=False, wd_scaling=False)


def sft_train_args(recipe: Recipe, device_batch: int, steps: int):
    """The train section as SFT runs it: its device, dtype, compile, logging and checkpoint
    cadence; the SFT batch, steps, schedule and eval cadence."""
    s = recipe.sft
    return dataclasses.replace(recipe.train, total_batch_size=s.total_batch_size,
                               device_batch_size=device_batch, num_iterations=steps,
                               warmup_ratio=0.0, warmdown_ratio=s.warmdown_ratio,
                               final_lr_frac=0.0, eval_every=s.eval_every)


def sft_data(recipe: Recipe, tokenizer: Tokenizer, seq: int) -> tuple:
    """The SFT conversations rendered into token rows of seq + 1 (train, val), the packing of
    one epoch, and the data's statistics (run.json), with one line saying what they hold."""
    train_set = load_sft_conversations(recipe, "train")
    val_set = load_sft_conversations(recipe, "val")
    train = render_conversations(tokenizer, train_set.conversations, seq + 1)
    val = render_conversations(tokenizer, val_set.conversations, seq + 1)
    if not train.items:
        raise UserError("no SFT conversation has an assistant token to learn from; check "
                        "sft.source and sft.conversation_files")
    packing = packing_stats(train.items, seq, seed=recipe.train.seed)
    print0(f"sft data: {len(train.items):,} train / {len(val.items):,} val conversations "
           f"({', '.join(f'{k} {v:,}' for k, v in train_set.sources.items())}); "
           f"skipped {train_set.skipped + val_set.skipped:,} malformed, truncated "
           f"{train.truncated + val.truncated:,} longer than {seq + 1} tokens, dropped "
           f"{train.no_target + val.no_target:,} without an assistant reply; one epoch = "
           f"{packing['rows']:,} rows of {seq + 1}, {100 * packing['real_token_fraction']:.1f}% real tokens")
    stats = {"train_conversations": len(train.items), "val_conversations": len(val.items),
             "skipped": train_set.skipped + val_set.skipped, "sources": train_set.sources,
             "truncated": train.truncated + val.truncated,
             "no_target": train.no_target + val.no_target,
             "rows_per_epoch": packing["rows"],
             "real_token_fraction": round(packing["real_token_fraction"], 4)}
    return train, val, packing, stats


def train_sft(recipe: Recipe, refuse_existing: bool = False, stop_requested=lambda: False) -> dict:
    imports_done()
    with runtime(recipe.train, recipe.cluster.collective_timeout_min, recipe.cluster.init_timeout_min) as rt:
        return _train_sft(recipe, rt, refuse_existing, stop_requested)


def _train_sft(recipe: Recipe, rt: Runtime, refuse_existing: bool, stop_requested) -> dict:
    out = sft_dir(recipe)
    latest = ckpt.latest_checkpoint(out)
    if latest is not None and refuse_existing:
        raise UserError(f"{out} already holds checkpoints ({latest.name}); drop --refuse-existing to resume, "
                        "or delete that directory")
    with setup_phase("data_s"):  # the base checkpoint, its tokenizer, the conversations
        base_step, base_meta, tokenizer, config = load_base(recipe)
    model = build_model(config, rt.device)
    with setup_phase("data_s"):
        model.load_state_dict(ckpt.load_model_state(base_step))
    seq = config.sequence_len

    with setup_phase("data_s"):
        train, val, packing, data_stats = sft_data(recipe, tokenizer, seq)

    optimizers = build_optimizers(model.param_groups(), sft_optim_args(recipe), config.n_embd,
                                  all_params=model.parameters())
    device_batch, found = resolve_device_batch_size(recipe, "sft", rt.dist.world_size, model=model,
                                                    vocab_size=config.vocab_size)
    accum = grad_accum_steps(recipe.sft.total_batch_size, device_batch, seq, rt.dist.world_size,
                             section="sft")
    rows_per_step = device_batch * accum * rt.dist.world_size
    if recipe.sft.num_iterations > 0:
        steps = recipe.sft.num_iterations
    else:
        steps = max(1, recipe.sft.num_epochs * packing["rows"] // rows_per_step)
    meta, start_step, loader_state = start_run(
        rt, out, latest, model, optimizers, recipe, config, tokenizer,
        {"tokenizer_key": base_meta.get("tokenizer_key"), "base_checkpoint": str(base_step)},
        {"device_batch_size": device_batch, "grad_accum": accum, "num_iterations": steps,
         "world_size": rt.dist.world_size, "base_checkpoint": str(base_step)},
        {"stage": "sft", "tokens_per_step": recipe.sft.total_batch_size, "data": data_stats,
         "discovery": discovery_summary(found)})
    if start_step >= steps:
        print0(f"{out} is already fine-tuned to step {start_step}; nothing to do")
        return {"step": start_step}

    loaders: list[SFTLoader] = []

    def loader_at(batch: int, state: dict | None) -> SFTLoader:
        loaders.append(SFTLoader(train.items, batch, seq, tokenizer.bos_token_id, rt.dist.rank,
                                 rt.dist.world_size, rt.device, seed=recipe.train.seed, state=state))
        return loaders[-1]

    if not val.items:
        print0("sft data: no validation conversations (raise sft.val_fraction or add data); "
               "val_loss is measured on the first 256 training conversations")
    check = batch_check(recipe, "sft", found, rt, seq, rebuild=loader_at,
                        run_json=out / "run.json")
    evaluate = at_device_batch(check, device_batch, lambda b: make_loss_evaluator(
        val.items or train.items[:256], tokenizer, rt, b, seq, recipe.train.eval_tokens))

    train_args = sft_train_args(recipe, device_batch, steps)
    step_model = training_model(model, rt, train_args)  # DDP when distributed, compiled
    spec = LoopSpec(num_steps=steps, grad_accum=accum, tokens_per_step=recipe.sft.total_batch_size,
                    flops_per_token=model.flops_per_token(), train=train_args,
                    optim=sft_optim_args(recipe), stage="sft", meta=meta, batch_check=check,
                    stop_lead_s=recipe.cluster.signal_lead_s)
    graphs0 = compile_count()
    result = train_loop(rt, out, model, step_model, optimizers, loader_at(device_batch, loader_state),
                        evaluate, spec, start_step=start_step, stop_requested=stop_requested)
    result["compilations"] = compile_count() - graphs0
    result["real_token_fraction"] = round(sum(ld.real_tokens for ld in loaders)
                                          / max(1, sum(ld.total_tokens for ld in loaders)), 4)
    if recipe.train.compile:
        print0(f"[sft] torch.compile compiled {result['compilations']} graph(s) in this run")
    return result


def main(argv: list[str]) -> int:
    ap = recipe_argparser("python -m nanochat.sft", "Supervised fine-tuning of a base checkpoint.")
    ckpt.add_refuse_existing_flag(ap, "RUN_DIR/sft")
    args = ap.parse_intermixed_args(argv)
    recipe = load_recipe(args.recipe, args.overrides)
    for where in (recipe.out_dir, sft_dir(recipe)):  # the run_dir it takes, the one it writes
        ckpt.refuse_launcher_dir(where, "python -m nanochat.sft", hint="; sft.base_checkpoint=DIR "
                                 "starts from one of that run's base models")
    result = train_sft(recipe, refuse_existing=args.refuse_existing)
    print0(json.dumps({k: v for k, v in result.items()
                       if k in ("step", "loss", "val_loss", "compilations", "real_token_fraction")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
