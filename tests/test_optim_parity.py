"""Upstream nanochat's optimizer rules (nanochat/optim.py): NorMuon variance reduction, cautious
Muon weight decay and its cosine schedule, LR scaling by sqrt(batch), the T_epoch weight-decay
rule, value embeddings on AdamW at half the embedding LR — each rule's math, its recipe
validation, and exact resume of every new state (hand-made groups, then a real tiny GPT trained
end to end on the offline corpus)."""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from nanochat import checkpoint as ckpt
from nanochat.common import UserError
from nanochat.config import OptimArgs, Recipe, TrainArgs
from nanochat.optim import (
    Horizon, Muon, batch_lr_scale, build_optimizers, cautious_update, load_optimizer_state_dicts,
    muon_weight_decay_at, optimizer_state_dicts, scaled_muon_weight_decay, second_moment_shape,
    variance_reduce,
)
from nanochat.recipe import recipe_from_dict
from nanochat.train import train_base, wd_reference_tokens
from nanochat.trainer import LoopSpec, apply_schedule
from test_train import losses, stop_after  # the suite's one stop-after-N helper

B_1M = 1_048_576


# --- variance reduction -----------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(48, 16), (16, 48), (24, 24)])
def test_variance_reduction_first_step_equalizes_the_long_side_and_keeps_the_norm(shape):
    torch.manual_seed(0)
    m, n = shape
    # rows (and columns) of very different sizes
    X = torch.randn(m, n) * torch.logspace(-1, 1, m).unsqueeze(1) * torch.logspace(-1, 1, n)
    buf = torch.zeros(second_moment_shape(X.shape))
    assert buf.shape == ((m, 1) if m >= n else (1, n))
    Y = variance_reduce(X, buf, beta2=0.9)
    torch.testing.assert_close(Y.norm(), X.norm(), rtol=1e-5, atol=0)
    # from a zero buffer, buf = 0.1·mean(X²) per row/column, so each row/column ends with equal RMS
    line_norms = Y.norm(dim=1) if m >= n else Y.norm(dim=0)
    torch.testing.assert_close(line_norms, line_norms.mean().expand_as(line_norms), rtol=1e-4, atol=0)
    red = 1 if m >= n else 0
    torch.testing.assert_close(buf, 0.1 * X.square().mean(dim=red, keepdim=True))


def test_variance_reduction_second_step_matches_a_hand_computation():
    torch.manual_seed(1)
    X1, X2 = torch.randn(12, 8), torch.randn(12, 8) * torch.linspace(0.1, 3, 12).unsqueeze(1)
    beta2 = 0.95
    buf = torch.zeros(12, 1)
    variance_reduce(X1, buf, beta2)
    Y = variance_reduce(X2, buf, beta2)
    v = beta2 * (1 - beta2) * (X1 ** 2).sum(1, keepdim=True) / 8 + (1 - beta2) * (X2 ** 2).sum(1, keepdim=True) / 8
    expected = X2 / v.sqrt()
    expected = expected * (X2.norm() / expected.norm())
    torch.testing.assert_close(buf, v)
    torch.testing.assert_close(Y, expected)


def test_variance_reduction_is_muon_state_and_changes_the_update():
    torch.manual_seed(2)
    grads = [torch.randn(24, 16) * torch.logspace(-2, 1, 24).unsqueeze(1) for _ in range(3)]

    def run(**kw):
        p = torch.nn.Parameter(torch.zeros(24, 16))
        opt = Muon([p], lr=0.1, muon_plus=True, **kw)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        return p.detach().clone(), opt.state[p]

    plain, plain_state = run()
    reduced, state = run(variance_reduction=True, beta2=0.9)
    assert "second_moment" not in plain_state
    assert state["second_moment"].shape == (24, 1) and state["second_moment"].dtype == torch.float32
    assert (state["second_moment"] > 0).all()
    assert not torch.allclose(plain, reduced, atol=1e-4), "variance reduction made no difference"
    # the per-step Frobenius norm is the same: only its split between rows moves
    torch.testing.assert_close(reduced.norm(), plain.norm(), rtol=0.05, atol=0)


# --- cautious weight decay --------------------------------------------------------------------

def test_cautious_update_decays_only_where_update_and_weight_agree_in_sign():
    torch.manual_seed(3)
    p0 = torch.randn(20, 10)
    X = torch.randn(20, 10)
    lr, wd = 0.1, 0.5
    p = p0.clone()
    cautious_update(p, X, lr, wd)
    agree = (X * p0) >= 0
    assert agree.any() and (~agree).any()
    # disagreeing signs: the update alone, bit for bit
    assert torch.equal(p[~agree], p0.clone().add_(X, alpha=-lr)[~agree])
    # agreeing: decayed toward zero by lr·wd·p as well
    torch.testing.assert_close(p[agree], (p0 - lr * X - lr * wd * p0)[agree])
    assert (((p0 - lr * X) - p) * p0)[agree].gt(0).all()  # the decay pulls toward zero
    q = p0.clone()
    cautious_update(q, X, lr, 0.0)
    assert torch.equal(q, p0.clone().add_(X, alpha=-lr))


def test_muon_weight_decay_leaves_weights_whose_sign_disagrees_with_the_update_untouched():
    torch.manual_seed(4)
    p0, g = torch.randn(32, 8), torch.randn(32, 8)
    out = {}
    for wd in (0.0, 0.5):
        p = torch.nn.Parameter(p0.clone())
        p.grad = g.clone()
        Muon([p], lr=0.05, weight_decay=wd).step()
        out[wd] = p.detach()
    lr_eff = 0.05 * math.sqrt(32 / 8)  # tall matrix: lr · sqrt(m/n)
    X = (p0 - out[0.0]) / lr_eff        # the orthogonalized update that was applied
    agree = (X * p0) >= 0
    assert agree.any() and (~agree).any()
    assert torch.equal(out[0.5][~agree], out[0.0][~agree])
    torch.testing.assert_close(out[0.5][agree], (out[0.0] - lr_eff * 0.5 * p0)[agree])


def test_muon_weight_decay_cosine_schedule_endpoints_and_trainer_applies_it():
    assert muon_weight_decay_at(0, 100, 0.28) == pytest.approx(0.28)
    assert muon_weight_decay_at(50, 100, 0.28) == pytest.approx(0.14)
    assert muon_weight_decay_at(100, 100, 0.28) == pytest.approx(0.0, abs=1e-12)
    vals = [muon_weight_decay_at(s, 100, 0.28) for s in range(101)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))
    args = OptimArgs(muon_weight_decay=0.28)
    opts = build_optimizers({"matrix": [torch.nn.Parameter(torch.randn(8, 8))]}, args, 768)
    spec = LoopSpec(num_steps=100, grad_accum=1, tokens_per_step=1, flops_per_token=1.0,
                    train=TrainArgs(), optim=args)
    for step, expected in ((0, 0.28), (25, 0.28 * 0.5 * (1 + math.cos(math.pi / 4))), (99, vals[99])):
        apply_schedule(opts, step, spec)
        assert opts[0].param_groups[0]["weight_decay"] == pytest.approx(expected)


# --- batch and horizon scaling ----------------------------------------------------------------

def _groups():
    torch.manual_seed(5)
    p = lambda *s: torch.nn.Parameter(torch.randn(*s))  # noqa: E731
    return {"matrix": [p(16, 8), p(8, 16), p(8, 8)], "embedding": [p(40, 8)],
            "value_embed": [p(40, 4), p(40, 4)], "lm_head": [p(40, 8)], "scalar": [p(3), p(1)]}


def _lrs(opts) -> dict[str, float]:
    return {g["name"]: g["lr"] for o in opts for g in o.param_groups}


def test_lr_batch_scaling_is_sqrt_of_batch_over_reference_for_every_group():
    args = OptimArgs(lr_batch_scaling=True)
    assert batch_lr_scale(args, Horizon(B_1M, 10 * B_1M, 0)) == pytest.approx(math.sqrt(2))
    assert batch_lr_scale(args, Horizon(524_288, 10, 0)) == 1.0
    assert batch_lr_scale(args, Horizon(131_072, 10, 0)) == pytest.approx(0.5)
    assert batch_lr_scale(OptimArgs(), Horizon(B_1M, 10, 0)) == 1.0  # off by default
    base = _lrs(build_optimizers(_groups(), OptimArgs(), 768))
    scaled = _lrs(build_optimizers(_groups(), args, 768, horizon=Horizon(B_1M, 10 * B_1M, 0)))
    assert set(base) == {"matrix", "embedding", "value_embed", "lm_head", "scalar"}
    for name in base:
        assert scaled[name] == pytest.approx(base[name] * math.sqrt(2)), name
    # built outside a run (a memory probe, a benchmark) there is no batch to scale by
    assert _lrs(build_optimizers(_groups(), args, 768)) == base


def test_wd_scaling_follows_the_t_epoch_rule():
    args = OptimArgs(muon_weight_decay=0.28, wd_scaling=True, lr_batch_scaling=True)
    d_ref = 1e9
    h = Horizon(B_1M, int(2 * d_ref), d_ref)
    assert scaled_muon_weight_decay(args, h) == pytest.approx(0.28 * math.sqrt(2) / 2)
    assert scaled_muon_weight_decay(args, Horizon(524_288, int(d_ref), d_ref)) == pytest.approx(0.28)
    assert scaled_muon_weight_decay(dataclasses.replace(args, wd_scaling=False), h) == 0.28
    # T_epoch = B / (η·λ·D) is the same for any batch and horizon (η scaled by sqrt(B) as well)
    t_epochs = []
    for B, D in ((524_288, d_ref), (B_1M, 4 * d_ref), (4 * B_1M, 0.5 * d_ref)):
        hz = Horizon(B, int(D), d_ref)
        eta = 0.02 * batch_lr_scale(args, hz)
        t_epochs.append(B / (eta * scaled_muon_weight_decay(args, hz) * int(D)))
    assert t_epochs == pytest.approx([t_epochs[0]] * 3)
    opts = build_optimizers(_groups(), args, 768, horizon=h)
    muon = opts[-1].param_groups[0]
    assert muon["weight_decay"] == muon["initial_weight_decay"] == pytest.approx(0.28 * math.sqrt(2) / 2)


def test_a_decay_that_would_flip_weight_signs_is_a_one_line_error():
    """A run far shorter than D_ref: the T_epoch rule makes lr'·λ ≥ 1, decay would overshoot 0."""
    args = OptimArgs(muon_weight_decay=0.28, wd_scaling=True)
    with pytest.raises(UserError) as e:
        build_optimizers(_groups(), args, 768, horizon=Horizon(524_288, 524_288, 1e12))
    assert "optim.wd_ref_tokens" in str(e.value) and "flip" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match="lower optim.muon_weight_decay"):
        build_optimizers(_groups(), OptimArgs(muon_weight_decay=60.0), 768)
    build_optimizers(_groups(), OptimArgs(muon_weight_decay=30.0), 768)  # 0.02·sqrt(2)·30 < 1


def test_wd_reference_tokens_is_upstreams_d12_horizon():
    recipe = recipe_from_dict({"model": {"depth": 4, "n_embd": 64, "n_head": 2}})
    # upstream's d12: width 768, 12 × 12·768² block matrices + a 32768 × 768 lm_head
    d12_scaling = 12 * 12 * 768 ** 2 + 32768 * 768
    assert d12_scaling == 110_100_480
    assert wd_reference_tokens(recipe, 32768) == 12.0 * d12_scaling  # train.target_param_data_ratio (default 12)
    assert wd_reference_tokens(dataclasses.replace(
        recipe, optim=OptimArgs(wd_ref_tokens=123_456)), 32768) == 123_456


# --- value embeddings -------------------------------------------------------------------------

def test_value_embeddings_get_adamw_at_half_the_width_scaled_embedding_lr():
    opts = build_optimizers(_groups(), OptimArgs(adamw_roles={"value_embed": {"weight_decay": 0.1}}), 3072)  # width scale 0.5
    assert [type(o) for o in opts] == [torch.optim.AdamW, Muon]
    by_name = {g["name"]: g for g in opts[0].param_groups}
    assert by_name["embedding"]["lr"] == pytest.approx(0.3 * 0.5)
    assert by_name["value_embed"]["lr"] == pytest.approx(0.3 * 0.5 * 0.5)
    assert by_name["value_embed"]["weight_decay"] == 0.1
    assert by_name["value_embed"]["betas"] == (0.8, 0.995)
    assert len(by_name["value_embed"]["params"]) == 2
    other = build_optimizers(_groups(), OptimArgs(value_embed_lr_frac=1.0), 768)
    assert {g["name"]: g["lr"] for g in other[0].param_groups}["value_embed"] == pytest.approx(0.3)


def test_sft_runs_without_pretrainings_rules_and_muon_decay_as_upstream():
    from nanochat.sft import sft_optim_args
    recipe = recipe_from_dict({"optim": {"variance_reduction": True, "muon_weight_decay": 0.28,
                                         "lr_batch_scaling": True, "wd_scaling": True},
                               "sft": {"lr_frac": 0.5}})
    o = sft_optim_args(recipe)
    assert (o.muon_weight_decay, o.lr_batch_scaling, o.wd_scaling) == (0.0, False, False)
    assert o.variance_reduction and o.matrix_lr == pytest.approx(0.01)


# --- recipe validation ------------------------------------------------------------------------

@pytest.mark.parametrize("key,value,says", [
    ("variance_reduction_beta2", 1.0, "must be in [0, 1)"),
    ("muon_weight_decay", -0.1, "must be ≥ 0"),
    ("batch_ref", 0, "must be ≥ 1"),
    ("wd_ref_tokens", -1, "must be ≥ 0"),
    ("value_embed_lr_frac", 0.0, "must be > 0"),
    ("variance_reduction", "yes", "must be true or false"),
])
def test_bad_new_optim_values_are_one_line_errors_naming_the_key(key, value, says):
    with pytest.raises(UserError) as e:
        recipe_from_dict({"optim": {key: value}})
    msg = str(e.value)
    assert f"optim.{key}" in msg and says in msg and "\n" not in msg


def test_defaults_keep_the_old_optimizer():
    o = OptimArgs()
    assert (o.variance_reduction, o.muon_weight_decay, o.lr_batch_scaling, o.wd_scaling) == (False, 0.0, False, False)
    muon = build_optimizers(_groups(), o, 768)[-1].param_groups[0]
    assert muon["weight_decay"] == 0.0 and muon["variance_reduction"] is False and muon["lr"] == 0.02


# --- exact resume -----------------------------------------------------------------------------

ALL_ON = OptimArgs(variance_reduction=True, muon_weight_decay=0.28, lr_batch_scaling=True,
                   wd_scaling=True, row_equilibrate=True, muon_plus=True,
                   adamw_roles={"embedding": {"weight_decay": 0.01}})
HORIZON = Horizon(B_1M, 6 * B_1M, 3 * B_1M)


def _build(args=ALL_ON):
    groups = _groups()
    return groups, build_optimizers(groups, args, 64, horizon=HORIZON)


def _loss(groups, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    total = torch.zeros(())
    for ps in groups.values():
        for p in ps:
            total = total + ((p - torch.randn(p.shape, generator=g)) ** 2 * torch.rand(p.shape, generator=g)).sum()
    return total


def _steps(groups, opts, start: int, stop: int, args=ALL_ON) -> None:
    spec = LoopSpec(num_steps=6, grad_accum=1, tokens_per_step=B_1M, flops_per_token=1.0,
                    train=TrainArgs(warmdown_ratio=0.5), optim=args)
    for step in range(start, stop):
        apply_schedule(opts, step, spec)
        _loss(groups, step).backward()
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)


def _state_tensors(opts, groups) -> list[torch.Tensor]:
    params = [p for ps in groups.values() for p in ps]
    return [v for o in opts for p in params if p in o.state
            for v in o.state[p].values() if torch.is_tensor(v)]


def test_resume_from_saved_optimizer_states_is_bit_exact():
    """6 steps straight == 3 steps, save through bytes, fresh optimizers, load, 3 more."""
    groups_a, opts_a = _build()
    _steps(groups_a, opts_a, 0, 6)

    groups_b, opts_b = _build()
    _steps(groups_b, opts_b, 0, 3)
    blob = io.BytesIO()
    torch.save({"params": {k: [p.detach().clone() for p in ps] for k, ps in groups_b.items()},
                "optim": optimizer_state_dicts(opts_b)}, blob)
    blob.seek(0)
    saved = torch.load(blob, weights_only=False)
    groups_c, opts_c = _build()
    with torch.no_grad():
        for k, ps in groups_c.items():
            for p, s in zip(ps, saved["params"][k]):
                p.copy_(s)
    load_optimizer_state_dicts(opts_c, saved["optim"])
    muon_c = opts_c[-1]
    assert all("second_moment" in muon_c.state[p] for p in groups_c["matrix"])
    _steps(groups_c, opts_c, 3, 6)

    for k in groups_a:
        for pa, pc in zip(groups_a[k], groups_c[k]):
            assert torch.equal(pa, pc), f"{k} differs after resume"
    sa, sc = _state_tensors(opts_a, groups_a), _state_tensors(opts_c, groups_c)
    assert len(sa) == len(sc) > 0 and all(torch.equal(a, c) for a, c in zip(sa, sc))
    assert opts_c[-1].param_groups[0]["weight_decay"] == opts_a[-1].param_groups[0]["weight_decay"] > 0


def test_resume_refuses_a_variance_reduction_switch_the_checkpoint_lacks():
    groups, opts = _build(OptimArgs())
    _steps(groups, opts, 0, 1, OptimArgs())
    states = optimizer_state_dicts(opts)
    _, opts_on = _build()
    with pytest.raises(UserError, match="started without it"):
        load_optimizer_state_dicts(opts_on, states)


def test_a_checkpoint_from_before_the_new_options_loads_with_them_off():
    groups, opts = _build(OptimArgs())
    _steps(groups, opts, 0, 1, OptimArgs())
    states = optimizer_state_dicts(opts)
    for g in states[-1]["param_groups"]:  # what a Muon saved before these options holds
        for k in ("variance_reduction", "beta2", "weight_decay", "initial_weight_decay"):
            del g[k]
    groups2, opts2 = _build(OptimArgs())
    load_optimizer_state_dicts(opts2, states)
    g = opts2[-1].param_groups[0]
    assert (g["variance_reduction"], g["weight_decay"], g["initial_weight_decay"]) == (False, 0.0, 0.0)
    _steps(groups2, opts2, 1, 2, OptimArgs())  # and it steps


# --- end to end: a real GPT with every option, stopped and resumed ----------------------------

def _all_on(tiny_recipe, path) -> Recipe:
    # D_ref = twice this run's 6 × 512 tokens (upstream's d12 horizon would make the decay ≥ 1)
    optim = {"variance_reduction": True, "muon_weight_decay": 0.28, "lr_batch_scaling": True,
             "wd_scaling": True, "wd_ref_tokens": 6144, "row_equilibrate": True, "muon_plus": True}
    return recipe_from_dict({**tiny_recipe, "run_dir": str(path), "optim": optim,
                             "model": {**tiny_recipe["model"], "value_embeds": True},
                             "train": {**tiny_recipe["train"], "num_iterations": 6, "eval_every": 3,
                                       "save_every": 3}})


def test_training_with_every_new_option_resumes_bit_exactly(tiny_recipe, tmp_path):
    straight = _all_on(tiny_recipe, tmp_path / "straight")
    train_base(straight)
    split = _all_on(tiny_recipe, tmp_path / "split")
    assert train_base(split, stop_requested=stop_after(3)).get("stopped")
    train_base(split)
    a, b = losses(straight.out_dir), losses(split.out_dir)
    assert list(a) == list(range(6)) and a == b, "losses after resume must match bit for bit"
    wa = ckpt.load_model_state(ckpt.latest_checkpoint(straight.out_dir))
    wb = ckpt.load_model_state(ckpt.latest_checkpoint(split.out_dir))
    assert any(k.startswith("value_embeds") for k in wa)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    opt_states, _ = ckpt.load_training_state(ckpt.latest_checkpoint(split.out_dir), 0)
    muon_state = opt_states[-1]["state"]
    assert muon_state and all("second_moment" in s for s in muon_state.values())
    assert {g["name"] for g in opt_states[0]["param_groups"]} >= {"embedding", "value_embed"}
    by_name = {g["name"]: g for s in opt_states for g in s["param_groups"]}
    assert by_name["matrix"]["initial_lr"] == pytest.approx(0.02 / 32)  # the run's optimizers, scaled
    assert by_name["matrix"]["initial_weight_decay"] == pytest.approx(0.28 / 32 * 2)
    info = json.loads((split.out_dir / "run.json").read_text())["optim_scaling"]
    # tiny: 512 tokens per step over 2^19 → LRs × sqrt(1/1024); D_ref / D = 2
    assert info["lr_scale"] == pytest.approx(1 / 32)
    assert info["train_tokens"] == 6 * 512 and info["ref_tokens"] == 6144
    assert info["muon_weight_decay"] == pytest.approx(0.28 / 32 * 2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank: int, world: int, port: int, recipe: Recipe, stop_at: int | None) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # the ranks agree one step after the request (trainer.StopAgreement): stop at step stop_at
    train_base(recipe, stop_requested=stop_after(stop_at - 1) if stop_at else (lambda: False))


def _two_ranks(recipe: Recipe, stop_at: int | None = None) -> None:
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_rank_worker, args=(r, 2, port, recipe, stop_at)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]


def test_two_gloo_ranks_with_every_new_option_resume_exactly_and_save_complete_states(tiny_recipe, tmp_path):
    """Muon's owner-steps-and-broadcasts with the new state: 2 ranks, 6 steps straight == 3 +
    stop + resume + 3, and the checkpoint's one optimizer file (nanochat/checkpoint.py: the
    ranks' states are identical, test_arch checks it in memory) is complete: every parameter's
    momentum and second moment, whichever rank owns its orthogonalization."""
    def recipe(path):
        r = _all_on(tiny_recipe, path)
        return dataclasses.replace(r, train=dataclasses.replace(r.train, total_batch_size=1024))
    straight, split = recipe(tmp_path / "straight"), recipe(tmp_path / "split")
    _two_ranks(straight)
    _two_ranks(split, stop_at=3)
    assert ckpt.latest_checkpoint(split.out_dir).name == "step_000003"
    _two_ranks(split)
    a, b = losses(straight.out_dir), losses(split.out_dir)
    assert list(a) == list(range(6)) and a == b
    last = ckpt.latest_checkpoint(split.out_dir)
    wa = ckpt.load_model_state(ckpt.latest_checkpoint(straight.out_dir))
    wb = ckpt.load_model_state(last)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (last / ckpt.OPTIM_FILE).exists() and not list(last.glob("optim_rank*.pt"))
    (s0, _), (s1, _) = ckpt.load_training_state(last, 0), ckpt.load_training_state(last, 1)
    m0, m1 = s0[-1]["state"], s1[-1]["state"]
    n_params = len(s0[-1]["param_groups"][0]["params"]) + sum(
        len(g["params"]) for g in s0[-1]["param_groups"][1:])
    assert m0.keys() == m1.keys() and len(m0) == n_params > 1
    for k in m0:
        for name in ("momentum_buffer", "second_moment"):
            assert name in m0[k], f"param {k} has no {name}: the state is incomplete"


# --- CUDA: bf16 orthogonalization, fp32 second moments ----------------------------------------

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_new_muon_state_on_cuda_matches_cpu():
    """On CUDA the orthogonalization runs in bf16; variance reduction and the cautious update
    still keep fp32 state and land within bf16 error of the CPU (fp32) step."""
    torch.manual_seed(6)
    p0 = torch.randn(64, 32)
    grads = [torch.randn(64, 32) for _ in range(3)]
    out = {}
    for device in ("cpu", "cuda"):
        p = torch.nn.Parameter(p0.clone().to(device))
        opt = Muon([p], lr=0.02, muon_plus=True, variance_reduction=True, weight_decay=0.28)
        for g in grads:
            p.grad = g.to(device)
            opt.step()
        sm = opt.state[p]["second_moment"]
        assert sm.device.type == device and sm.dtype == torch.float32 and sm.shape == (64, 1)
        out[device] = (p.detach().cpu(), sm.cpu())
    torch.testing.assert_close(out["cuda"][0], out["cpu"][0], rtol=0, atol=2e-3)
    torch.testing.assert_close(out["cuda"][1], out["cpu"][1], rtol=0.05, atol=1e-6)
