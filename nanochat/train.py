"""Base (pretraining) entry point:  python -m nanochat.train RECIPE [section.key=value ...]

Single process:        python -m nanochat.train configs/tiny.yaml
One node, 8 GPUs:      torchrun --standalone --nproc_per_node=8 -m nanochat.train configs/d20.yaml
SLURM (srun/torchrun): see slurm/train.sbatch; ranks come from RANK/WORLD_SIZE (torchrun) or
                       SLURM_PROCID/SLURM_NTASKS with MASTER_ADDR/MASTER_PORT exported.

A run directory that already holds checkpoints is resumed from the newest one (that is how a
requeued or preempted job continues); `--refuse-existing` refuses to start if checkpoints exist.
"""
from __future__ import annotations

import dataclasses
import json

import torch

from nanochat import checkpoint as ckpt
from nanochat.batchsize.verify import at_device_batch, batch_check, discovery_summary
from nanochat.batchsize.search import resolve_device_batch_size
from nanochat.common import UserError, cli_main, print0
from nanochat.config import Recipe, grad_accum_steps
from nanochat.core_eval import make_core_evaluator
from nanochat.data.loaders import DataLoader
from nanochat.data.shards import prepare_shards, prepare_tokenizer, tokenizer_key
from nanochat.attention import attention_backend
from nanochat.gpt import GPT, GPTConfig, build_model
from nanochat.grad_sync import training_model
from nanochat.loss_eval import make_bpb_evaluator
from nanochat.optim import Horizon, build_optimizers, optim_scaling
from nanochat.recipe import load_recipe, recipe_argparser
from nanochat.runtime import Runtime, runtime
from nanochat.timing import imports_done, setup_phase
from nanochat.trainer import LoopSpec, start_run, train_loop


def num_iterations(recipe: Recipe, model: GPT) -> int:
    tr = recipe.train
    if tr.num_iterations > 0:
        return tr.num_iterations
    target_tokens = tr.target_param_data_ratio * model.num_params()["scaling"]
    return max(1, int(target_tokens // tr.total_batch_size))


def wd_reference_tokens(recipe: Recipe, vocab_size: int) -> float:
    """D_ref of the T_epoch weight-decay rule: optim.wd_ref_tokens, or upstream's (base_train.py
    D_REF): the param:data ratio × the scaling params of this recipe's model at depth 12, the
    depth upstream tuned its hyperparameters at (width from the aspect ratio, as upstream's d12)."""
    if recipe.optim.wd_ref_tokens > 0:
        return float(recipe.optim.wd_ref_tokens)
    d12 = dataclasses.replace(recipe.model, depth=12, n_embd=None, n_head=None, n_kv_head=None)
    with torch.device("meta"):  # shapes only: nothing allocated
        ref = GPT(GPTConfig.from_args(d12, vocab_size))
    return recipe.train.target_param_data_ratio * ref.num_params()["scaling"]


def run_horizon(recipe: Recipe, steps: int, vocab_size: int, scaling_params: int = 0) -> Horizon:
    """B, D and D_ref of the batch and weight-decay rules. D is upstream's target tokens,
    int(ratio × scaling params) (base_train.py `target_tokens`), when the ratio sets the run's
    length; the run's own steps × B when train.num_iterations does (upstream: the ratio's D even
    then; ours: the tokens the run trains on, because that is the horizon the rule is about)."""
    o, tr = recipe.optim, recipe.train
    ref = wd_reference_tokens(recipe, vocab_size) if o.wd_scaling and o.muon_weight_decay > 0 else 0.0
    tokens = (int(tr.target_param_data_ratio * scaling_params)
              if tr.num_iterations <= 0 and scaling_params > 0 else steps * tr.total_batch_size)
    return Horizon(batch_tokens=tr.total_batch_size, train_tokens=tokens, ref_tokens=ref)


def train_base(recipe: Recipe, refuse_existing: bool = False, stop_requested=lambda: False) -> dict:
    imports_done()
    with runtime(recipe.train, recipe.cluster.collective_timeout_min, recipe.cluster.init_timeout_min) as rt:
        return _train_base(recipe, rt, refuse_existing, stop_requested)


def _train_base(recipe: Recipe, rt: Runtime, refuse_existing: bool, stop_requested) -> dict:
    run_dir = recipe.out_dir
    latest = ckpt.latest_checkpoint(run_dir)
    if latest is not None and refuse_existing:
        raise UserError(f"{run_dir} already holds checkpoints ({latest.name}); drop --refuse-existing to "
                        "resume, or choose another run_dir (run_dir=...) / delete that directory")
    with setup_phase("data_s"):
        train_paths, val_paths = prepare_shards(recipe, rt)
        tokenizer = prepare_tokenizer(recipe, train_paths, rt)
    config = GPTConfig.from_args(recipe.model, tokenizer.vocab_size)
    model = build_model(config, rt.device)
    nparams = model.num_params()
    flops = model.flops_per_token()
    print0(f"model: {config.n_layer} layers, width {config.n_embd}, {config.n_head} heads "
           f"({config.n_kv_head} kv), vocab {config.vocab_size}, bigram factor {config.bigram_factor}; "
           f"params {nparams['total']:,} (scaling {nparams['scaling']:,}, bigram {nparams['bigram']:,}); "
           f"{flops:.3e} FLOPs/token")
    steps = num_iterations(recipe, model)
    horizon = run_horizon(recipe, steps, config.vocab_size, nparams["scaling"])
    scaling = optim_scaling(recipe.optim, horizon)
    if recipe.optim.lr_batch_scaling or recipe.optim.wd_scaling:
        print0(f"optim: LRs × {scaling['lr_scale']:.4f} (batch {horizon.batch_tokens:,} vs "
               f"{recipe.optim.batch_ref:,}); Muon weight decay {recipe.optim.muon_weight_decay:g} → "
               f"{scaling['muon_weight_decay']:.6f} ({horizon.train_tokens:,} training tokens vs "
               f"D_ref {horizon.ref_tokens:,.0f})")
    optimizers = build_optimizers(model.param_groups(), recipe.optim, config.n_embd,
                                  all_params=model.parameters(), horizon=horizon)

    device_batch, found = resolve_device_batch_size(recipe, "base", rt.dist.world_size, model=model,
                                                    vocab_size=config.vocab_size)
    seq = config.sequence_len
    accum = grad_accum_steps(recipe.train.total_batch_size, device_batch, seq, rt.dist.world_size)
    meta, start_step, loader_state = start_run(
        rt, run_dir, latest, model, optimizers, recipe, config, tokenizer,
        {"tokenizer_key": tokenizer_key(recipe)},
        {"device_batch_size": device_batch, "grad_accum": accum, "num_iterations": steps,
         "world_size": rt.dist.world_size},
        {"stage": "base", "params": nparams, "flops_per_token": flops,
         "tokens_per_step": recipe.train.total_batch_size, "optim_scaling": scaling,
         "discovery": discovery_summary(found),
         "attention": attention_backend(rt.device, recipe.train.compile)})
    if start_step >= steps:
        print0(f"{run_dir} is already trained to step {start_step}; nothing to do")
        return {"step": start_step}

    def loader_at(batch: int, state: dict | None) -> DataLoader:
        return DataLoader(train_paths, tokenizer, batch, seq, rt.dist.rank, rt.dist.world_size,
                          rt.device, state=state)

    check = batch_check(recipe, "base", found, rt, seq, rebuild=loader_at,
                        run_json=run_dir / "run.json")
    evaluate = at_device_batch(check, device_batch, lambda b: make_bpb_evaluator(
        val_paths, tokenizer, rt, b, seq, recipe.train.eval_tokens))

    core = (make_core_evaluator(recipe.eval, recipe.cache_dir, tokenizer, rt, recipe.train.core_max_per_task)
            if recipe.train.core_every > 0 else None)
    step_model = training_model(model, rt, recipe.train)  # DDP when distributed, compiled
    spec = LoopSpec(num_steps=steps, grad_accum=accum, tokens_per_step=recipe.train.total_batch_size,
                    flops_per_token=flops, train=recipe.train, optim=recipe.optim, stage="base",
                    meta=meta, batch_check=check, core=core,
                    stop_lead_s=recipe.cluster.signal_lead_s,
                    summary={"num_params": nparams["total"], "num_scaling_params": nparams["scaling"]})
    loader = loader_at(device_batch, loader_state)
    return train_loop(rt, run_dir, model, step_model, optimizers, loader, evaluate, spec,
                      start_step=start_step, stop_requested=stop_requested)


def main(argv: list[str]) -> int:
    ap = recipe_argparser("python -m nanochat.train", "Base (pretraining) training.")
    ckpt.add_refuse_existing_flag(ap, "the run directory")
    args = ap.parse_intermixed_args(argv)
    recipe = load_recipe(args.recipe, args.overrides)
    ckpt.refuse_launcher_dir(recipe.out_dir, "python -m nanochat.train")
    result = train_base(recipe, refuse_existing=args.refuse_existing)
    print0(json.dumps({k: v for k, v in result.items() if k in ("step", "loss", "val_bpb")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
