"""The recipe's `optim:` section, and the AdamW settings of each parameter role it defines.

Its own module because upstream nanochat gives every parameter role its own AdamW settings
(karpathy/nanochat nanochat/gpt.py `GPT.setup_optimizer`). Here a role's betas, weight decay and
eps are one entry of the `adamw_roles` mapping (defaults: ADAMW_ROLE_DEFAULTS, upstream's values,
pinned to upstream's file and line by tests/test_upstream_parity.py); a recipe gives only what it
changes. Each role's LR stays a field of its own (`embedding_lr`, `x0_lr_frac`, ...): LRs are
what grids sweep. Where the kit keeps another default on purpose the comment says "upstream: X;
ours: Y because ...".

LRs per role (upstream's rules): the token embedding, value embeddings and lm_head are tuned at
width 768 and scaled by (width / 768)^-0.5; every LR but the smear group's is × sqrt(B / B_ref)
with `lr_batch_scaling` (upstream passes its literal 0.2 to the smear group unscaled). This
module imports no torch: the launcher reads recipes on a login node.
"""
from __future__ import annotations

from dataclasses import dataclass, field


# AdamW settings of each role of `optim.adamw_roles` (the recipe names its LR fields after the
# role too): betas, weight decay (decoupled), eps, and what the role trains (docs/recipes.md).
# eps is tiny everywhere, so rarely-hit embedding rows still get full-size steps.
ADAMW_ROLE_DEFAULTS = {
    "embedding": ([0.8, 0.995], 0.001, 1e-10, "the token embedding"),
    "value_embed": ([0.8, 0.995], 0.01, 1e-10, "the value embeddings"),
    "unembedding": ([0.8, 0.96], 0.01, 1e-10, "the lm_head"),
    "scalar": ([0.8, 0.95], 0.0, 1e-10, "the bigram λs (upstream has no bigram; the kit's first settings)"),
    "resid": ([0.8, 0.95], 0.05, 1e-10, "resid_lambdas"),
    "x0": ([0.96, 0.95], 0.0, 1e-10, "x0_lambdas (a long first-moment memory)"),
    "smear": ([0.8, 0.95], 0.0, 1e-10, "the smear gate, smear λ and backout λ"),
    "bigram": ([0.8, 0.95], 0.0, 1e-10, "the hashed bigram table (upstream has no bigram; the kit's first settings)"),
}
ADAMW_KEYS = ("betas", "weight_decay", "eps")  # the settings of one role


def default_adamw_roles() -> dict:
    return {role: dict(zip(ADAMW_KEYS, (list(b), wd, eps))) for role, (b, wd, eps, _) in ADAMW_ROLE_DEFAULTS.items()}


def merged_adamw_roles(given: dict) -> dict:
    """`given` (a role → {key: value} mapping, partial or whole) over the defaults. Names that are
    not roles or keys are kept, for validation to name them (nanochat/config.py)."""
    out = default_adamw_roles()
    for role, settings in given.items():
        out[role] = {**out.get(role, {}), **settings} if isinstance(settings, dict) else settings
    return out


@dataclass
class OptimArgs:
    matrix_lr: float = 0.02                  # Muon LR for the 2-D hidden matrices (not width-scaled: Muon's update is shape-normalized)
    embedding_lr: float = 0.3                # AdamW LR of the token embedding (and base of the value-embedding and bigram LRs), tuned at width 768 (upstream base_train --embedding-lr)
    value_embed_lr_frac: float = 0.5         # AdamW LR of the value embeddings as a fraction of the (width- and batch-scaled) embedding LR
    unembedding_lr: float = 0.008            # AdamW LR of the lm_head, tuned at width 768 (upstream base_train --unembedding-lr)
    scalar_lr: float = 0.5                   # AdamW LR of per-layer scalars, never width-scaled: base of resid_lr_frac and x0_lr_frac, and the LR of the bigram λs
    resid_lr_frac: float = 0.01              # AdamW LR of resid_lambdas as a fraction of scalar_lr (they scale the whole residual stream: small steps)
    x0_lr_frac: float = 1.0                  # AdamW LR of x0_lambdas as a fraction of scalar_lr
    smear_lr: float = 0.2                    # AdamW LR of the smear gate, smear λ and backout λ (upstream's one group): a plain LR, neither width- nor batch-scaled, as upstream's literal 0.2
    bigram_lr_frac: float = 1.0              # AdamW LR of the hashed bigram table as a fraction of the (width- and batch-scaled) embedding LR (upstream has no bigram; the kit's first setting: the embedding's)
    adamw_roles: dict[str, dict[str, list[float] | float]] = field(default_factory=default_adamw_roles)  # AdamW {betas: [beta1, beta2], weight_decay (decoupled), eps} per parameter role (roles below); a recipe gives only what it changes, e.g. {x0: {betas: [0.9, 0.99]}}, or optim.adamw_roles.x0.betas=[0.9,0.99]
    muon_momentum: float = 0.97              # Muon momentum after warmup and before the LR warmdown
    muon_momentum_warmup_start: float = 0.85 # Muon momentum at step 0 (less momentum while gradients change fast)
    muon_momentum_warmup_steps: int = 400    # steps of linear momentum warmup from muon_momentum_warmup_start to muon_momentum
    muon_momentum_final: float = 0.90        # Muon momentum at the end of the LR warmdown, linear from muon_momentum over train.warmdown_ratio (= muon_momentum: none)
    muon_nesterov: bool = True               # Nesterov momentum for Muon
    ns_steps: int = 5                        # orthogonalization iterations (polar_express has coefficients for at most 5)
    orthogonalizer: str = "polar_express"    # "polar_express" (Amsel et al. 2025) or "newton_schulz" (Keller Jordan's quintic)
    row_equilibrate: bool = False            # MuonEq: equalize row norms of the update before orthogonalization (upstream: on; ours: off by default, a switch, as every addition)
    muon_plus: bool = False                  # Muon+: snap the orthogonalized update to RMS singular value 1 (upstream: on; ours: off by default, a switch)
    variance_reduction: bool = False         # NorMuon: after Muon+, normalize the update per row (tall/square) or column (wide) by a running second moment (upstream: on; ours: off by default, a switch)
    variance_reduction_beta2: float = 0.9    # EMA coefficient of variance_reduction's second moment
    muon_weight_decay: float = 0.0           # cautious decoupled decay on the Muon matrices (only where update and weight agree in sign), cosine-decayed to 0 over the run (upstream: 0.28; ours: 0, a switch)
    lr_batch_scaling: bool = False           # multiply every LR by sqrt(total batch / batch_ref) (upstream base_train: on; ours: off, a switch)
    wd_scaling: bool = False                 # T_epoch rule (arXiv 2405.13698): muon_weight_decay × sqrt(total batch / batch_ref) × (wd_ref_tokens / training tokens) (upstream: on; ours: off, a switch)
    batch_ref: int = 524_288                 # B_ref: tokens per step the LRs and muon_weight_decay were tuned at (2^19, upstream's d12)
    wd_ref_tokens: int = 0                   # D_ref: training tokens muon_weight_decay was tuned for; 0 = upstream's, train.target_param_data_ratio × scaling params of this model at depth 12


    def __post_init__(self):
        # a partial mapping (a recipe's, or OptimArgs(adamw_roles={...}) in code) over the defaults
        self.adamw_roles = merged_adamw_roles(self.adamw_roles)


# AdamW roles: group name (GPT.param_groups) → its role in adamw_roles (the prefix of its LR field), and its LR as
# (base LR field, fraction field or None, width-scaled, batch-scaled).
ADAM_ROLES = {
    "embedding": ("embedding", ("embedding_lr", None, True, True)),
    "value_embed": ("value_embed", ("embedding_lr", "value_embed_lr_frac", True, True)),
    "bigram": ("bigram", ("embedding_lr", "bigram_lr_frac", True, True)),
    "lm_head": ("unembedding", ("unembedding_lr", None, True, True)),
    "resid": ("resid", ("scalar_lr", "resid_lr_frac", False, True)),
    "x0": ("x0", ("scalar_lr", "x0_lr_frac", False, True)),
    "smear": ("smear", ("smear_lr", None, False, False)),
    "scalar": ("scalar", ("scalar_lr", None, False, True)),
}
# Recipe keys the per-role settings replaced (one AdamW setting for every role before them): an error.
REPLACED_KEYS = ("weight_decay", "adam_beta1", "adam_beta2", "adam_eps")
# The rename table: the flat per-role keys before adamw_roles (optim.<role>_betas, _weight_decay,
# _eps; resolved recipes of earlier runs hold all 24) → (role, key) in adamw_roles. Still read,
# with one note line naming the new keys (nanochat/recipe.py).
RENAMED_KEYS = {f"{role}_{key}": (role, key) for role in ADAMW_ROLE_DEFAULTS for key in ADAMW_KEYS}


def adam_role(args: OptimArgs, group: str, model_dim: int, batch_scale: float) -> dict:
    """One AdamW param group's settings: lr, betas, eps, weight_decay (see ADAM_ROLES)."""
    prefix, (base, frac, width, batch) = ADAM_ROLES[group]
    lr = getattr(args, base) * (getattr(args, frac) if frac else 1.0)
    lr *= ((model_dim / 768) ** -0.5 if width else 1.0) * (batch_scale if batch else 1.0)
    role = args.adamw_roles[prefix]
    return dict(lr=lr, betas=tuple(role["betas"]), eps=role["eps"], weight_decay=role["weight_decay"])
