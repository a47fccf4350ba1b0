"""Optimizers: Muon for the hidden matrices, AdamW for everything else.

Muon (Keller Jordan, https://kellerjordan.github.io/posts/muon/) runs SGD with (Nesterov) momentum
and replaces each 2-D update by an approximation of its polar factor U V^T (G = U S V^T), computed
with a few odd-polynomial matrix iterations that run well in bf16. Embeddings, the lm_head and
per-layer scalars are not "hidden matrices" (their inputs are one-hot or they have no fan-in), so
they stay on AdamW, as in modded-nanogpt and nanochat.

Two optional tweaks around the orthogonalization (nanochat PR #747; later merged upstream):
- row equilibration (MuonEq, https://arxiv.org/abs/2603.28254) BEFORE it: every row of the
  momentum update is rescaled to the RMS row norm, so one large row does not dominate the spectrum;
- Muon+ (https://arxiv.org/abs/2602.21545) AFTER it: the result is rescaled to Frobenius norm
  sqrt(min(m, n)) — that of an exact semi-orthogonal matrix — correcting the iteration's
  under/over-convergence so the RMS singular value is exactly 1.

Upstream nanochat's other optimizer rules (karpathy/nanochat nanochat/optim.py, scripts/base_train.py),
each an `optim.` switch, off by default:
- variance reduction AFTER Muon+ (NorMuon, https://arxiv.org/abs/2510.05491): each row
  (tall/square matrices) or column (wide) of the orthogonalized update is divided by the running
  RMS of its past updates (an EMA second moment, one float per row/column), then the update is
  rescaled to its Frobenius norm before — per-neuron adaptive step sizes on top of Muon;
- cautious weight decay (Chen et al., "Cautious Weight Decay", https://arxiv.org/abs/2510.12402):
  the decoupled decay lr·λ·p is applied only where the update and the weight agree in sign (where
  the step already pulls the weight toward 0), with λ cosine-decayed to 0 over the run;
- every LR × sqrt(B / 2^19) (the usual sqrt rule for Adam; upstream applies it to Muon too,
  "not studied carefully");
- λ × sqrt(B / B_ref) · (D_ref / D): the T_epoch rule of https://arxiv.org/abs/2405.13698
  (keep B / (η·λ·D) constant when η itself grows with sqrt(B)); D = training tokens;
- value embeddings (ResFormer tables) on AdamW at half the embedding LR (value_embed_lr_frac).

Distributed training: the caller averages the gradients — DDP during backward, or
`allreduce_gradients` after it (nanochat/grad_sync.py) — so every rank holds the same ones,
then each rank orthogonalizes only its share of the Muon params and broadcasts them (see
`Muon.step`). With one process no collective is ever called.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from nanochat.common import UserError
from nanochat.optim_config import ADAM_ROLES, OptimArgs, adam_role  # the recipe's optim section

if TYPE_CHECKING:
    from nanochat.config import TrainArgs  # the LR schedule's settings (train.warmup_steps, ...)


ORTHOGONALIZERS = ("polar_express", "newton_schulz")


# --------------------------------------------------------------------------------------------
# Orthogonalization: X ≈ U V^T for G = U S V^T, batched over leading dims.

def _ortho_dtype(device: torch.device) -> torch.dtype:
    # bf16 on CUDA: the iterations are matmul-bound and stable in bf16 (Keller Jordan's Muon).
    # Elsewhere fp32: CPU bf16 matmuls are much slower than fp32 ones.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def zeropower_newton_schulz(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Quintic Newton-Schulz (Keller Jordan's Muon, https://kellerjordan.github.io/posts/muon/).

    The coefficients maximize the slope at zero rather than converge, so singular values end up
    roughly in [0.5, 1.5] (~0.7–1.2 in practice) — which Jordan found does not hurt training.
    """
    assert G.ndim >= 2, f"need a (..., m, n) tensor, got shape {tuple(G.shape)}"
    a, b, c = (3.4445, -4.7750, 2.0315)
    X = G.to(_ortho_dtype(G.device))
    tall = G.size(-2) > G.size(-1)
    if tall:  # iterate on the wide side so X @ X^T is the smaller Gram matrix
        X = X.mT
    # Frobenius norm >= spectral norm, so after this all singular values are <= 1 (the
    # iteration's domain of convergence).
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.mT if tall else X


# Polar Express (Amsel, Persson, Musco, Gower 2025, https://arxiv.org/abs/2505.16932): a
# different optimal odd quintic per iteration (computed for 5 iterations, l0 = 1e-3, safety
# factor 2e-2, cushion 2), which converges much closer to U V^T than the fixed Newton-Schulz
# quintic in the same number of matmuls. Values as used in KellerJordan/modded-nanogpt
# (train_gpt.py) and karpathy/nanochat (nanochat/optim.py `polar_express_coeffs`).
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def zeropower_polar_express(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Polar Express orthogonalization (see POLAR_EXPRESS_COEFFS); steps <= 5."""
    assert G.ndim >= 2, f"need a (..., m, n) tensor, got shape {tuple(G.shape)}"
    assert 1 <= steps <= len(POLAR_EXPRESS_COEFFS), f"polar express supports 1..5 steps, got {steps}"
    X = G.to(_ortho_dtype(G.device))
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    # The 1.01 margin keeps the top singular value safely below 1 despite bf16 rounding (the
    # paper's reference code and nanochat use the same).
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-6)
    for a, b, c in POLAR_EXPRESS_COEFFS[:steps]:
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.mT if tall else X


ZEROPOWER = {"polar_express": zeropower_polar_express, "newton_schulz": zeropower_newton_schulz}


def row_equilibrate(G: torch.Tensor) -> torch.Tensor:
    """Rescale every row of (..., m, n) G to the RMS of its row norms, ‖G‖_F / sqrt(m).

    The Frobenius norm is unchanged and all (non-zero) rows get equal norm (MuonEq,
    https://arxiv.org/abs/2603.28254): a few large rows no longer dominate the spectrum that the
    orthogonalization sees. A zero row has no direction and stays zero (no NaN).
    """
    G32 = G.float()
    row_norm = G32.norm(dim=-1, keepdim=True)                                  # (..., m, 1)
    target = G32.norm(dim=(-2, -1), keepdim=True) / G.size(-2) ** 0.5           # (..., 1, 1)
    scale = torch.where(row_norm > 0, target / row_norm.clamp_min(torch.finfo(torch.float32).tiny),
                        torch.zeros_like(row_norm))
    return (G32 * scale).to(G.dtype)


def muon_plus_normalize(X: torch.Tensor) -> torch.Tensor:
    """Rescale (..., m, n) X so ‖X‖_F = sqrt(min(m, n)): RMS singular value exactly 1 (Muon+,
    https://arxiv.org/abs/2602.21545), whatever the iteration's residual error. Zero stays zero."""
    X32 = X.float()
    target = min(X.size(-2), X.size(-1)) ** 0.5
    norm = X32.norm(dim=(-2, -1), keepdim=True)
    scale = torch.where(norm > 0, target / norm.clamp_min(torch.finfo(torch.float32).tiny),
                        torch.zeros_like(norm))
    return (X32 * scale).to(X.dtype)


# --------------------------------------------------------------------------------------------
# Muon

def _world() -> tuple[int, int]:
    """(rank, world_size), (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def second_moment_shape(shape: torch.Size) -> tuple[int, int]:
    """Variance reduction's state for an (m, n) matrix: per row (m, 1) when m ≥ n, else per
    column (1, n) — the longer side, as upstream (its statistic averages over the shorter one)."""
    m, n = shape
    return (m, 1) if m >= n else (1, n)


def variance_reduce(X: torch.Tensor, second_moment: torch.Tensor, beta2: float) -> torch.Tensor:
    """NorMuon step (https://arxiv.org/abs/2510.05491) on an orthogonalized update X (m, n).

    v = mean of X² over each row (second_moment (m, 1)) or column ((1, n)); second_moment ←
    lerp(second_moment, v, 1 - beta2) (in place, fp32, no bias correction, as upstream); the
    result is X / sqrt(second_moment) rescaled to ‖X‖_F, so only the split of the step between
    rows (columns) changes: rows whose updates were persistently large get smaller steps."""
    red = -1 if second_moment.size(-1) == 1 else -2
    X32 = X.float()
    second_moment.lerp_(X32.square().mean(dim=red, keepdim=True), 1 - beta2)
    Y = X32 * second_moment.clamp_min(1e-10).rsqrt()
    return Y * (X32.norm() / Y.norm().clamp_min(1e-10))


def cautious_update(p: torch.Tensor, X: torch.Tensor, lr: float, weight_decay: float) -> None:
    """p ← p − lr·X − lr·λ·p·[X·p ≥ 0], in place: the decoupled decay only where the update
    direction −X points toward zero, i.e. agrees with the decay (Cautious Weight Decay,
    https://arxiv.org/abs/2510.12402; upstream's mask is the same `g * p >= 0`). Elsewhere the
    weight moves by the update alone."""
    X = X.to(p.dtype)
    if weight_decay > 0:
        keep = 1 - (lr * weight_decay) * ((X * p) >= 0).to(p.dtype)  # mask from p before the step
        p.mul_(keep)
    p.add_(X, alpha=-lr)


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz, for 2-D hidden matrices only.

    Per param: buf ← lerp(buf, g, 1-μ); u = lerp(g, buf, μ) (Nesterov) or buf;
    [row-equilibrate u]; X = orthogonalize(u); [Muon+ X]; [variance-reduce X];
    p ← p − lr' · X [− lr' · λ · p where X·p ≥ 0], lr' = lr · sqrt(max(1, m/n)).
    The sqrt(max(1, m/n)) factor (Keller Jordan) gives tall matrices, whose orthogonal factor has
    smaller entries, the same per-entry RMS update as wide ones.

    Distributed (world_size > 1): gradients must already be averaged across ranks. Every rank
    keeps the momentum buffers of all params (an elementwise update, cheap; it also makes rank 0's
    state dict complete for checkpoints), but only rank i % world_size orthogonalizes and applies
    param i's update; then each param — and its variance-reduction second moment, (m, 1) or
    (1, n) floats, so every rank's state stays complete too — is broadcast from its owner, so all
    ranks end bit-identical.
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, orthogonalizer: str = "polar_express",
                 row_equilibrate: bool = False, muon_plus: bool = False,
                 variance_reduction: bool = False, beta2: float = 0.95, weight_decay: float = 0.0,
                 local: bool = False):
        # local=True: step as one process even when torch.distributed is initialised (the
        # batch-size probe runs on rank 0 alone; a broadcast there would wait for the others).
        self.local = local
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        orthogonalizer=orthogonalizer, row_equilibrate=row_equilibrate,
                        muon_plus=muon_plus, variance_reduction=variance_reduction, beta2=beta2,
                        weight_decay=weight_decay)
        super().__init__(params, defaults)
        for group in self.param_groups:
            assert group["orthogonalizer"] in ZEROPOWER, group["orthogonalizer"]
            group.setdefault("initial_weight_decay", group["weight_decay"])  # the schedule's peak
            for p in group["params"]:
                assert p.ndim == 2, f"Muon takes 2-D matrices only, got shape {tuple(p.shape)}"

    def __setstate__(self, state: dict) -> None:
        # load_state_dict replaces the param groups with the checkpoint's: one saved before
        # these options existed ran without them.
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("variance_reduction", False)
            group.setdefault("beta2", 0.95)
            group.setdefault("weight_decay", 0.0)
            group.setdefault("initial_weight_decay", group["weight_decay"])

    @torch.no_grad()
    def _apply(self, p: torch.Tensor, u: torch.Tensor, group: dict) -> None:
        """Orthogonalize the momentum update u and apply it to p."""
        if group["row_equilibrate"]:
            u = row_equilibrate(u)
        X = ZEROPOWER[group["orthogonalizer"]](u, group["ns_steps"])
        if group["muon_plus"]:
            X = muon_plus_normalize(X)
        if group["variance_reduction"]:
            X = variance_reduce(X, self.state[p]["second_moment"], group["beta2"])
        m, n = p.shape
        cautious_update(p, X, group["lr"] * max(1.0, m / n) ** 0.5, group["weight_decay"])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rank, world = (0, 1) if self.local else _world()
        # Momentum for every param on every rank (see class docstring).
        work = []  # (p, group, momentum update or None when p has no grad)
        for group in self.param_groups:
            mu = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    work.append((p, group, None))
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                g = p.grad
                buf.lerp_(g, 1 - mu)
                if group["variance_reduction"] and "second_moment" not in state:
                    state["second_moment"] = torch.zeros(second_moment_shape(p.shape),
                                                         dtype=torch.float32, device=p.device)
                work.append((p, group, g.lerp(buf, mu) if group["nesterov"] else buf))
        handles = []
        for i, (p, group, u) in enumerate(work):
            owner = i % world
            if u is not None and owner == rank:
                self._apply(p, u, group)
            if world > 1:
                # Every rank issues the same broadcasts in the same order (grads are identical
                # after allreduce, so "has a grad" agrees too); async so that communication of
                # param i overlaps orthogonalization of param i+1.
                handles.append(dist.broadcast(p.data, src=owner, async_op=True))
                if u is not None and group["variance_reduction"]:
                    handles.append(dist.broadcast(self.state[p]["second_moment"], src=owner,
                                                  async_op=True))
        for h in handles:
            h.wait()
        return loss


def lr_multiplier(step: int, num_steps: int, args: TrainArgs) -> float:
    """Linear warmup, constant, linear warmdown to final_lr_frac (upstream base_train.py
    `get_lr_multiplier`; warmup in steps, train.warmup_steps, or a fraction of the run)."""
    warmup = args.warmup_steps if args.warmup_steps >= 0 else round(args.warmup_ratio * num_steps)
    warmdown = round(args.warmdown_ratio * num_steps)
    if step < warmup:
        return (step + 1) / warmup
    if step <= num_steps - warmdown:
        return 1.0
    progress = (num_steps - step) / warmdown
    return progress + (1 - progress) * args.final_lr_frac


def muon_momentum(step: int, args: OptimArgs, num_steps: int = 0, warmdown_ratio: float = 0.0) -> float:
    """Muon momentum at `step` (upstream base_train.py `get_muon_momentum`): linear from
    muon_momentum_warmup_start to muon_momentum over muon_momentum_warmup_steps, then from
    muon_momentum to muon_momentum_final over the LR warmdown (the last round(warmdown_ratio ·
    num_steps) steps); the warmup wins where they overlap, as upstream's."""
    if step < args.muon_momentum_warmup_steps:
        frac = max(step, 0) / args.muon_momentum_warmup_steps
        return (1 - frac) * args.muon_momentum_warmup_start + frac * args.muon_momentum
    warmdown = round(warmdown_ratio * num_steps)
    if warmdown > 0 and step >= num_steps - warmdown:
        progress = min((step - (num_steps - warmdown)) / warmdown, 1.0)
        return args.muon_momentum * (1 - progress) + args.muon_momentum_final * progress
    return args.muon_momentum


def muon_weight_decay_at(step: int, num_steps: int, peak: float) -> float:
    """Muon's weight decay at `step`: peak · ½(1 + cos(π · step / num_steps)), from peak at step 0
    to 0 at the end (upstream base_train.py `get_weight_decay`)."""
    if num_steps <= 0:
        return peak
    return peak * 0.5 * (1 + math.cos(math.pi * min(max(step, 0), num_steps) / num_steps))


@dataclass(frozen=True)
class Horizon:
    """What the batch and horizon rules need: tokens per optimizer step (B), training tokens of
    the run (D = steps × B) and D_ref, the horizon muon_weight_decay was tuned at."""
    batch_tokens: int
    train_tokens: int
    ref_tokens: float


def batch_lr_scale(args: OptimArgs, horizon: Horizon | None) -> float:
    """sqrt(B / batch_ref) with lr_batch_scaling on, else 1 (upstream: B = 2^20 → sqrt 2).
    No horizon (optimizers built outside a run, to measure memory or time): 1."""
    if not args.lr_batch_scaling or horizon is None:
        return 1.0
    return (horizon.batch_tokens / args.batch_ref) ** 0.5


def scaled_muon_weight_decay(args: OptimArgs, horizon: Horizon | None) -> float:
    """muon_weight_decay, × sqrt(B / B_ref) · (D_ref / D) with wd_scaling on: the T_epoch rule
    (arXiv 2405.13698) keeps B / (η·λ·D) fixed while η grows as sqrt(B) (upstream base_train)."""
    if not (args.wd_scaling and args.muon_weight_decay > 0) or horizon is None:
        return args.muon_weight_decay
    return (args.muon_weight_decay * (horizon.batch_tokens / args.batch_ref) ** 0.5
            * horizon.ref_tokens / horizon.train_tokens)


def optim_scaling(args: OptimArgs, horizon: Horizon | None) -> dict:
    """The values the rules derive, for the run's log and run.json."""
    return {"lr_scale": batch_lr_scale(args, horizon),
            "muon_weight_decay": scaled_muon_weight_decay(args, horizon),
            **({"batch_tokens": horizon.batch_tokens, "train_tokens": horizon.train_tokens,
                "ref_tokens": horizon.ref_tokens} if horizon is not None else {})}


# --------------------------------------------------------------------------------------------
# Building the optimizers

GROUP_NAMES = ("matrix", *ADAM_ROLES)  # Muon's, then AdamW's roles (optim_config.py)


def build_optimizers(groups: dict[str, list[torch.nn.Parameter]], args: OptimArgs,
                     model_dim: int, all_params=None, local: bool = False,
                     horizon: Horizon | None = None) -> list[torch.optim.Optimizer]:
    """Muon for groups["matrix"]; one AdamW with a param group per role (ADAM_ROLES: embedding,
    value_embed, bigram, lm_head, resid, x0, smear, scalar), each with its own LR, betas, eps
    and weight decay from the recipe (nanochat/optim_config.py; upstream's per-role settings).
    Empty groups are skipped. Every param group gets "initial_lr" (the schedule sets lr =
    initial_lr * multiplier) and "name"; Muon's also "initial_weight_decay" (the schedule
    cosine-decays it). Returns [AdamW, Muon] (whichever exist).

    The embedding/lm_head AdamW LRs were tuned at width 768 and are scaled by
    (model_dim / 768) ** -0.5 as in nanochat (AdamW's step per entry doesn't shrink with width,
    but each output sums ~model_dim of them); per-layer scalars are not: they have no fan-in.
    With lr_batch_scaling every LR but the smear group's is × sqrt(B / batch_ref); Muon's weight decay is
    muon_weight_decay, T_epoch-scaled with wd_scaling — both from the run's `horizon`; without
    one (memory probes, benchmarks: the rules change values, not the work) neither applies.

    `all_params` (optional, e.g. model.parameters()) asserts that the groups cover them exactly.
    `local=True` makes Muon step without collectives (a probe on one rank of a distributed job).
    """
    unknown = set(groups) - set(GROUP_NAMES)
    assert not unknown, f"unknown param groups {sorted(unknown)}; valid: {GROUP_NAMES}"
    seen: dict[int, str] = {}
    for name, params in groups.items():
        for p in params:
            assert id(p) not in seen, f"a parameter is in group {seen[id(p)]!r} and {name!r}"
            seen[id(p)] = name
    if all_params is not None:
        all_ids = {id(p) for p in all_params}
        assert all_ids == set(seen), (f"{len(all_ids - set(seen))} model params in no group, "
                                      f"{len(set(seen) - all_ids)} group params not in the model")

    batch_scale = batch_lr_scale(args, horizon)
    adam_groups = [dict(params=list(groups[name]), name=name,
                        **adam_role(args, name, model_dim, batch_scale))
                   for name in ADAM_ROLES if groups.get(name)]
    opts: list[torch.optim.Optimizer] = []
    if adam_groups:
        adam_params = [p for g in adam_groups for p in g["params"]]
        # fused AdamW is one kernel per step on CUDA; it requires every param on the GPU.
        fused = all(p.is_cuda for p in adam_params) or None
        opts.append(torch.optim.AdamW(adam_groups, fused=fused))
    if groups.get("matrix"):
        muon_wd = scaled_muon_weight_decay(args, horizon)
        _check_decay_below_one(groups["matrix"], args.matrix_lr * batch_scale, muon_wd, args)
        opts.append(Muon([dict(params=list(groups["matrix"]), name="matrix",
                               initial_weight_decay=muon_wd)],
                         lr=args.matrix_lr * batch_scale,
                         momentum=muon_momentum(0, args), nesterov=args.muon_nesterov,
                         ns_steps=args.ns_steps, orthogonalizer=args.orthogonalizer,
                         row_equilibrate=args.row_equilibrate, muon_plus=args.muon_plus,
                         variance_reduction=args.variance_reduction,
                         beta2=args.variance_reduction_beta2, weight_decay=muon_wd, local=local))
    for opt in opts:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    in_opts = [id(p) for opt in opts for g in opt.param_groups for p in g["params"]]
    assert len(in_opts) == len(set(in_opts)) == len(seen), "a parameter was lost or duplicated"
    return opts


def _check_decay_below_one(params, lr: float, weight_decay: float, args: OptimArgs) -> None:
    """The decay multiplies weights by 1 − lr'·λ at the peak LR; at ≥ 1 it would flip their
    signs instead of shrinking them (e.g. the T_epoch rule on a run far shorter than D_ref)."""
    aspect = max(max(1.0, p.size(0) / p.size(1)) ** 0.5 for p in params)
    if lr * aspect * weight_decay >= 1:
        how = (f"optim.wd_scaling made it {weight_decay:.4g} from {args.muon_weight_decay:g} "
               "(this run's tokens are far fewer than optim.wd_ref_tokens' D_ref): set "
               "optim.wd_ref_tokens near this run's training tokens or optim.wd_scaling=false"
               if args.wd_scaling else "lower optim.muon_weight_decay")
        raise UserError(f"optim.muon_weight_decay: Muon's decay step lr·λ = {lr * aspect:.4g} × "
                        f"{weight_decay:.4g} ≥ 1 would flip weights' signs; {how}")


# --------------------------------------------------------------------------------------------
# Gradient averaging and checkpoint helpers

def allreduce_gradients(params, bucket_bytes: int = 256 * 2**20) -> None:
    """Average `.grad` of `params` over all ranks (no-op in one process).

    Grads are flattened into buckets of one (device, dtype) and at most ~bucket_bytes (fewer,
    larger collectives are much faster than one per tensor), summed, then divided by the world
    size (ReduceOp.AVG exists on NCCL only, not gloo). A param whose grad is None gets zeros, so
    that every rank issues the same collectives with the same sizes.
    """
    _, world = _world()
    if world == 1:
        return
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    buckets: list[list[torch.Tensor]] = []
    current: dict[tuple, list[torch.Tensor]] = {}
    current_bytes: dict[tuple, int] = {}
    for p in params:  # same order on every rank, so buckets match
        key = (p.grad.device, p.grad.dtype)
        nbytes = p.grad.numel() * p.grad.element_size()
        if key in current and current_bytes[key] + nbytes > bucket_bytes:
            buckets.append(current.pop(key))
            current_bytes[key] = 0
        current.setdefault(key, []).append(p.grad)
        current_bytes[key] = current_bytes.get(key, 0) + nbytes
    buckets.extend(current.values())
    pending = []
    for grads in buckets:
        flat = torch._utils._flatten_dense_tensors(grads)
        pending.append((grads, flat, dist.all_reduce(flat, op=dist.ReduceOp.SUM, async_op=True)))
    for grads, flat, handle in pending:
        handle.wait()
        flat.div_(world)
        for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            g.copy_(synced)


def optimizer_state_dicts(opts: list[torch.optim.Optimizer]) -> list[dict]:
    """State dicts of the optimizers from build_optimizers, in order (for a checkpoint)."""
    return [opt.state_dict() for opt in opts]


def load_optimizer_state_dicts(opts: list[torch.optim.Optimizer], states: list[dict]) -> list[str]:
    """Inverse of optimizer_state_dicts; the optimizers must be built the same way. Keeps the
    recipe's hyperparameters (learning rates, betas, decay, ...) over the checkpoint's; returns
    the ones that changed, for the caller to say."""
    if len(opts) != len(states):
        raise UserError(f"checkpoint has {len(states)} optimizer states but the model has "
                        f"{len(opts)} optimizers; was it saved with a different parameter grouping?")
    changed = []
    for n, (opt, state) in enumerate(zip(opts, states)):
        if isinstance(opt, Muon):
            _check_same_switches(opt, state)
        recipe_groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        opt.load_state_dict(state)
        # load_state_dict takes the checkpoint's hyperparameters too; the recipe's win (the
        # schedules recompute lr and momentum from them every step), and a change is said
        for i, (group, wanted) in enumerate(zip(opt.param_groups, recipe_groups)):
            for key, value in wanted.items():
                old = group.get(key)
                scheduled = key in SCHEDULED or (key == "weight_decay" and "initial_weight_decay" in wanted)
                if not scheduled and old != value:
                    changed.append(f"{type(opt).__name__} {n} group {i} {key}: {old} → {value}")
                group[key] = value
    return changed


# set from initial_lr (Muon's decay: initial_weight_decay) and the step by the training loop's
# schedules (trainer.apply_schedule): their saved values are of the saved step, not settings
SCHEDULED = ("lr", "momentum")


def _check_same_switches(opt: "Muon", state: dict) -> None:
    """Variance reduction carries state: a run started without it has no second moments to
    resume (and one started with it must not silently drop them)."""
    for group, saved in zip(opt.param_groups, state["param_groups"]):
        now, then = group["variance_reduction"], saved.get("variance_reduction", False)
        if now != then:
            raise UserError(f"the checkpoint's optimizer ran with optim.variance_reduction="
                            f"{str(then).lower()}, this recipe has {str(now).lower()}: the run was "
                            f"started {'without' if now else 'with'} it; resume with "
                            f"optim.variance_reduction={str(then).lower()} or use another run_dir")


def optimizer_step(params, optimizers: list, grad_clip: float, set_to_none: bool = True) -> None:
    """Clip, step every optimizer, clear the gradients: the training step's update, shared with
    batch-size discovery's probes so they measure exactly what training runs.

    `set_to_none=False` under DDP with `gradient_as_bucket_view`: each `.grad` is then a view
    into DDP's bucket, zeroed in place, and the next accumulation micro-steps (under no_sync)
    add into it. Dropped gradients (None) would make those micro-steps allocate fresh ones
    beside the buckets — a second fp32 copy of every gradient that the single-process
    discovery probe (no DDP, no buckets: one copy) never measures."""
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    for opt in optimizers:
        opt.step()
    for opt in optimizers:
        opt.zero_grad(set_to_none=set_to_none)
