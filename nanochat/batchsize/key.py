"""What decides a training step's memory: the key of batch-size discovery, torch-free.

Discovery (nanochat/batchsize/search.py) measures the largest device batch whose real training step
fits; it caches the answer under a key, and the launcher (jobs/plan.py) plans one discover task
per distinct key among a grid's combinations. Both build that key from this module, so that two
combinations the launcher groups together are exactly the ones that share a cache entry.

What counts: the model's shape and every switch that adds or removes a tensor (sequence length,
vocabulary, features), dtype, compile and its mode, the optimizer's kind and whatever changes
the state or temporaries it keeps per parameter, gradient clipping (on/off), the world size and
total batch (they decide which batch sizes are legal), the device, and discovery's own settings.
What does not: learning rates, betas, momentum values, schedules, weight-decay amounts, seeds —
numbers that enter the update without a tensor of their own. A grid over learning rates is one
discovery; a grid over depth is one per depth.

The lists below name the fields that do *not* count; any other field counts, including one added
later, until someone shows it changes no memory and lists it here (a needless discovery costs
minutes, a shared key for different memory costs an out-of-memory crash).
"""
from __future__ import annotations

import dataclasses
import json

from nanochat.config import OptimArgs, Recipe
from nanochat.data.shards import tokenizer_key

# OptimArgs fields that are values of the update (floats and schedules), never a buffer: each
# role's learning rate, LR fraction, betas and eps (nanochat/optim_config.py names them
# <role>_lr, <role>_lr_frac, adamw_roles.<role>.betas and .eps), and the fields listed. The
# per-role AdamW settings enter the key under their flat names of before adamw_roles
# (<role>_betas, ...: RENAMED_KEYS), so the rename kept every cached discovery's key.
OPTIM_VALUE_SUFFIXES = ("_lr", "_lr_frac", "_betas", "_eps")
OPTIM_VALUES = frozenset({
    "muon_momentum", "muon_momentum_warmup_start", "muon_momentum_warmup_steps",
    "muon_momentum_final", "ns_steps", "variance_reduction_beta2", "lr_batch_scaling",
    "wd_scaling", "batch_ref", "wd_ref_tokens"})
# weight decays (<role>_weight_decay, muon_weight_decay) count only as on/off: a non-zero decay
# adds the cautious mask's temporaries (nanochat/optim.py cautious_update), its amount nothing.
OPTIM_ON_OFF_SUFFIX = "weight_decay"
# Model fields (ModelArgs and GPTConfig alike) that are initial values or constants of the
# forward pass; softcap counts as on/off (0 skips the tanh and its activation).
MODEL_VALUES = frozenset({"bigram_lambda_init", "qk_gain", "rotary_base"})
MODEL_ON_OFF = frozenset({"softcap"})


def optim_memory_fields(optim: OptimArgs) -> dict:
    """The optimizer settings that change its memory (see OPTIM_VALUES)."""
    fields = dataclasses.asdict(optim)
    for role, settings in fields.pop("adamw_roles").items():
        fields.update({f"{role}_{k}": v for k, v in settings.items()})
    values = OPTIM_VALUES | {k for k in fields if k.endswith(OPTIM_VALUE_SUFFIXES)}
    on_off = frozenset(k for k in fields if k.endswith(OPTIM_ON_OFF_SUFFIX))
    return _filtered(fields, values, on_off)


def model_memory_fields(model: dict) -> dict:
    """A model's shape and switches (a ModelArgs or GPTConfig as a dict) without its values."""
    return _filtered(model, MODEL_VALUES, MODEL_ON_OFF)


def _filtered(fields: dict, values: frozenset, on_off: frozenset) -> dict:
    return {k: (bool(v) if k in on_off else v) for k, v in fields.items() if k not in values}


def memory_key(recipe: Recipe, stage: str, world_size: int) -> dict:
    """The recipe's own part of discovery's key for `stage` (batch_size.cache_key adds what is
    resolved on the device: the concrete model with the tokenizer's vocabulary, the dtype, the
    device's name and memory, the torch version)."""
    dc, tr = recipe.discovery, recipe.train
    return {"stage": stage, "optim": optim_memory_fields(recipe.optim),
            "compile": tr.compile, "compile_mode": tr.compile_mode if tr.compile else None,
            "grad_clip": tr.grad_clip > 0, "world_size": world_size,
            "total_batch_size": recipe.training_section(stage).total_batch_size,
            "headroom": dc.headroom, "candidates": dc.candidates, "min_batch_size": dc.min_batch_size,
            "max_batch_size": dc.max_batch_size, "choose": dc.choose, "probe_steps": dc.probe_steps}


def plan_key(recipe: Recipe, stages: list[str]) -> str:
    """What the launcher groups a grid's combinations by, before any device or tokenizer is at
    hand: `memory_key` of each stage plus the recipe-side causes of what the cache key resolves
    later — the model section (its vocabulary: model.vocab_size, else the tokenizer's key), the
    dtype and device asked for, the partition and constraint the jobs get and the CPU memory
    budget. Equal plan keys give equal cache keys; the converse need not hold."""
    c, tr, dc = recipe.cluster, recipe.train, recipe.discovery
    key = {"stages": {s: memory_key(recipe, s, c.world_size) for s in stages},
           "model": model_memory_fields(dataclasses.asdict(recipe.model)),
           "vocab": recipe.model.vocab_size or tokenizer_key(recipe),
           "dtype": tr.dtype, "device": tr.device, "partition": c.partition, "constraint": c.constraint,
           "memory_budget_gb": dc.memory_budget_gb, "ram_fraction": dc.ram_fraction,
           "cache_dir": dc.cache_dir}
    return json.dumps(key, sort_keys=True, default=str)
