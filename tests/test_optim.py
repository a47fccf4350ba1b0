"""Properties of nanochat/optim.py: the orthogonalizers, row equilibration, Muon+, Muon steps,
optimizer building, and distributed Muon — with and without variance reduction and cautious weight
decay — matching a single-process run (2 gloo processes). Upstream's other rules: test_optim_parity.py."""
from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanochat.common import UserError
from nanochat.recipe import recipe_from_dict
from nanochat.optim import (
    POLAR_EXPRESS_COEFFS, Muon, OptimArgs, allreduce_gradients, build_optimizers,
    load_optimizer_state_dicts, muon_momentum, muon_plus_normalize, optimizer_state_dicts,
    row_equilibrate, zeropower_newton_schulz, zeropower_polar_express,
)

SHAPES = [(64, 32), (32, 64), (48, 48)]  # tall, wide, square


# --- orthogonalizers, row equilibration, Muon+ --------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fn", [zeropower_polar_express, zeropower_newton_schulz])
def test_orthogonalizers_give_singular_values_near_one(fn, shape):
    torch.manual_seed(0)
    G = torch.randn(*shape) * 3.0
    X = fn(G, 5)
    assert X.shape == G.shape and X.dtype == torch.float32  # fp32 on CPU
    s = torch.linalg.svdvals(X)
    assert 0.5 < s.min() and s.max() < 1.5, f"{fn.__name__} {shape}: svals in [{s.min()}, {s.max()}]"
    # approximately orthogonal: X X^T ≈ I on the short side
    short = X if shape[0] <= shape[1] else X.T
    gram = short @ short.T
    assert (gram - torch.eye(gram.size(0))).abs().max() < 0.6


def test_polar_express_is_closer_to_polar_factor_than_newton_schulz():
    torch.manual_seed(1)
    G = torch.randn(64, 32)
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    polar = U @ Vh
    err_pe = (zeropower_polar_express(G, 5) - polar).norm()
    err_ns = (zeropower_newton_schulz(G, 5) - polar).norm()
    assert err_pe < err_ns, (err_pe, err_ns)
    assert POLAR_EXPRESS_COEFFS[0] == (8.156554524902461, -22.48329292557795, 15.878769915207462)


def test_orthogonalizers_are_batched_and_transpose_consistent():
    torch.manual_seed(2)
    G = torch.randn(3, 40, 24)
    for fn in (zeropower_polar_express, zeropower_newton_schulz):
        batched = fn(G, 5)
        single = torch.stack([fn(g, 5) for g in G])
        torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fn(G[0].T, 5).T, single[0], rtol=1e-5, atol=1e-5)


def test_row_equilibration_keeps_frobenius_norm_and_equalizes_rows():
    torch.manual_seed(3)
    G = torch.randn(16, 24) * torch.logspace(-3, 3, 16).unsqueeze(1)  # rows 6 decades apart
    R = row_equilibrate(G)
    torch.testing.assert_close(R.norm(), G.norm(), rtol=1e-5, atol=0)
    rows = R.norm(dim=1)
    torch.testing.assert_close(rows, torch.full_like(rows, G.norm().item() / 16 ** 0.5), rtol=1e-5, atol=0)
    # direction of each row is kept
    cos = torch.nn.functional.cosine_similarity(R, G, dim=1)
    torch.testing.assert_close(cos, torch.ones_like(cos))


def test_row_equilibration_of_zero_matrix_and_zero_rows_has_no_nan():
    Z = row_equilibrate(torch.zeros(8, 5))
    assert torch.equal(Z, torch.zeros(8, 5))
    G = torch.randn(4, 6)
    G[1] = 0
    R = row_equilibrate(G)
    assert torch.isfinite(R).all() and torch.equal(R[1], torch.zeros(6))


@pytest.mark.parametrize("shape", SHAPES)
def test_muon_plus_sets_rms_singular_value_to_one(shape):
    torch.manual_seed(4)
    for fn in (zeropower_polar_express, zeropower_newton_schulz):
        X = muon_plus_normalize(fn(torch.randn(*shape), 5))
        torch.testing.assert_close(X.norm(), torch.tensor(math.sqrt(min(shape))), rtol=1e-5, atol=0)
        s = torch.linalg.svdvals(X)
        torch.testing.assert_close(s.square().mean(), torch.tensor(1.0), rtol=1e-5, atol=0)
    assert torch.equal(muon_plus_normalize(torch.zeros(*shape)), torch.zeros(*shape))


# --- Muon steps -------------------------------------------------------------------------------

def _regression(seed=0):
    torch.manual_seed(seed)
    X = torch.randn(256, 32)
    W_true = torch.randn(16, 32) / 32 ** 0.5
    Y = X @ W_true.T
    W = torch.nn.Parameter(torch.zeros(16, 32))
    return X, Y, W


def test_muon_reduces_a_regression_loss():
    X, Y, W = _regression()
    opt = Muon([W], lr=0.05)
    loss0 = None
    for _ in range(30):
        loss = ((X @ W.T - Y) ** 2).mean()
        loss0 = loss.item() if loss0 is None else loss0
        opt.zero_grad()
        loss.backward()
        opt.step()
    final = ((X @ W.T - Y) ** 2).mean().item()
    assert final < 0.2 * loss0, (loss0, final)


@pytest.mark.parametrize("switch", ["row_equilibrate", "muon_plus", "nesterov", "orthogonalizer"])
def test_muon_switches_change_the_update(switch):
    torch.manual_seed(5)
    # a gradient with very unequal rows, so row equilibration has something to do
    row_scale = torch.logspace(-2, 1, 24).unsqueeze(1)
    grads = [torch.randn(24, 16) * row_scale for _ in range(2)]

    def one_step(**kw):
        p = torch.nn.Parameter(torch.zeros(24, 16))
        opt = Muon([p], lr=0.1, **kw)
        for g in grads:  # two different grads so the momentum buffer (and nesterov) matters
            p.grad = g.clone()
            opt.step()
        return p.detach().clone()

    other = {"row_equilibrate": True, "muon_plus": True, "nesterov": False,
             "orthogonalizer": "newton_schulz"}[switch]
    base, changed = one_step(), one_step(**{switch: other})
    assert not torch.allclose(base, changed, atol=1e-4), f"{switch} made no difference"


def test_muon_shape_scaling_and_rejects_non_matrices():
    # With Muon+ both orthogonalized updates have ‖X‖_F = sqrt(16); the tall one is then scaled by
    # sqrt(max(1, m/n)) = sqrt(64/16) = 2 and the wide one by 1.
    torch.manual_seed(6)
    g = torch.randn(64, 16)
    tall = torch.nn.Parameter(torch.zeros(64, 16))
    wide = torch.nn.Parameter(torch.zeros(16, 64))
    for p, gr in ((tall, g), (wide, g.T.contiguous())):
        p.grad = gr
        Muon([p], lr=1.0, muon_plus=True).step()
    rms_tall, rms_wide = tall.square().mean().sqrt(), wide.square().mean().sqrt()
    torch.testing.assert_close(rms_tall, rms_wide * 2.0)  # sqrt(64/16) = 2
    with pytest.raises(AssertionError):
        Muon([torch.nn.Parameter(torch.zeros(3))])


def test_muon_momentum_warmup_and_warmdown():
    """0.85 → 0.97 over 400 steps, then 0.97 → 0.90 over the LR warmdown (upstream's defaults,
    pinned to upstream's source in test_upstream_parity.py); no run length: no warmdown."""
    args = OptimArgs()
    assert muon_momentum(0, args) == pytest.approx(0.85)
    assert muon_momentum(200, args) == pytest.approx(0.91)
    assert muon_momentum(400, args) == pytest.approx(0.97)
    assert muon_momentum(10_000, args) == pytest.approx(0.97)
    assert muon_momentum(5, dataclasses.replace(args, muon_momentum_warmup_steps=0)) == 0.97
    # 2000 steps, warmdown 0.5: the last 1000 steps go 0.97 → 0.90
    assert muon_momentum(999, args, 2000, 0.5) == pytest.approx(0.97)
    assert muon_momentum(1500, args, 2000, 0.5) == pytest.approx(0.935)
    assert muon_momentum(2000, args, 2000, 0.5) == pytest.approx(0.90)
    # the warmup wins where the two overlap (upstream's order)
    assert muon_momentum(100, args, 200, 1.0) == pytest.approx(0.88)


# --- args and building ------------------------------------------------------------------------

def _recipe_error(**optim) -> str:
    with pytest.raises(UserError) as e:
        recipe_from_dict({"optim": optim})
    return str(e.value)


def test_bad_optim_values_are_one_line_errors_naming_the_key():
    recipe_from_dict({"optim": {}})
    assert "optim.matrix_lr must be > 0, got -1" in _recipe_error(matrix_lr=-1)
    assert "polar_express, newton_schulz" in _recipe_error(orthogonalizer="svd")
    assert "optim.ns_steps" in _recipe_error(ns_steps=6)
    recipe_from_dict({"optim": {"ns_steps": 6, "orthogonalizer": "newton_schulz"}})
    assert "optim.adamw_roles.embedding.betas must be" in _recipe_error(adamw_roles={"embedding": {"betas": [0.8, 1.0]}})
    assert "optim.muon_plus must be true or false" in _recipe_error(muon_plus="yes")


def _param(*shape):
    return torch.nn.Parameter(torch.randn(*shape))


def test_build_optimizers_lrs_width_scaling_and_coverage():
    """Each role its own LR (width-scaled for the tables and lm_head, not for scalars), betas,
    eps and weight decay, from the recipe's optim.adamw_roles (a partial mapping over the defaults)."""
    args = OptimArgs(adamw_roles={"embedding": {"weight_decay": 0.1}, "x0": {"betas": [0.9, 0.99]}})
    groups = {"matrix": [_param(8, 8), _param(16, 8)], "embedding": [_param(50, 8)],
              "bigram": [_param(40, 8)], "lm_head": [_param(50, 8)], "scalar": [_param(2)],
              "resid": [_param(2)], "x0": [_param(2)], "smear": [_param(1, 24), _param(1)]}
    model_dim = 3072  # (3072/768)^-0.5 = 0.5
    opts = build_optimizers(groups, args, model_dim,
                            all_params=[p for ps in groups.values() for p in ps])
    assert [type(o) for o in opts] == [torch.optim.AdamW, Muon]
    by_name = {g["name"]: g for o in opts for g in o.param_groups}
    assert by_name["embedding"]["lr"] == pytest.approx(0.3 * 0.5)
    assert by_name["bigram"]["lr"] == pytest.approx(0.3 * 0.5)
    assert by_name["lm_head"]["lr"] == pytest.approx(0.008 * 0.5)
    assert by_name["scalar"]["lr"] == pytest.approx(0.5)  # not width-scaled
    assert by_name["resid"]["lr"] == pytest.approx(0.005) and by_name["x0"]["lr"] == pytest.approx(0.5)
    assert by_name["smear"]["lr"] == pytest.approx(0.2)
    assert by_name["matrix"]["lr"] == pytest.approx(0.02)
    assert by_name["matrix"]["momentum"] == pytest.approx(0.85)  # warmup start
    assert by_name["embedding"]["weight_decay"] == 0.1 and by_name["scalar"]["weight_decay"] == 0.0
    assert by_name["x0"]["betas"] == (0.9, 0.99) and by_name["lm_head"]["betas"] == (0.8, 0.96)
    assert all(g["eps"] == 1e-10 for g in opts[0].param_groups)
    for o in opts:
        for g in o.param_groups:
            assert g["initial_lr"] == g["lr"]
    in_opts = [id(p) for o in opts for g in o.param_groups for p in g["params"]]
    expected = [id(p) for ps in groups.values() for p in ps]
    assert sorted(in_opts) == sorted(expected) and len(set(in_opts)) == len(in_opts)


def test_the_replaced_global_adamw_keys_say_what_replaced_them():
    msg = _recipe_error(adam_beta2=0.99)
    assert "\n" not in msg and "optim.adam_beta2" in msg and "optim.adamw_roles.<role>.betas" in msg and "embedding" in msg


def test_build_optimizers_skips_empty_groups_and_rejects_duplicates():
    w = _param(4, 4)
    opts = build_optimizers({"matrix": [w], "embedding": [], "lm_head": [], "scalar": []},
                            OptimArgs(), 768)
    assert [type(o) for o in opts] == [Muon]
    with pytest.raises(AssertionError):
        build_optimizers({"matrix": [w], "scalar": [w]}, OptimArgs(), 768)
    with pytest.raises(AssertionError):  # a model param left out
        build_optimizers({"matrix": [w]}, OptimArgs(), 768, all_params=[w, _param(3)])


def test_optimizer_state_dict_round_trip():
    def make():
        torch.manual_seed(7)
        groups = {"matrix": [_param(8, 4)], "scalar": [_param(3)]}
        return groups, build_optimizers(groups, OptimArgs(), 768)

    groups, opts = make()
    for p in (*groups["matrix"], *groups["scalar"]):
        p.grad = torch.ones_like(p)
    for o in opts:
        o.step()
    states = optimizer_state_dicts(opts)
    groups2, opts2 = make()
    load_optimizer_state_dicts(opts2, states)
    buf = opts[1].state[groups["matrix"][0]]["momentum_buffer"]
    torch.testing.assert_close(opts2[1].state[groups2["matrix"][0]]["momentum_buffer"], buf)
    with pytest.raises(UserError):
        load_optimizer_state_dicts(opts2, states[:1])


def test_resuming_keeps_the_recipes_learning_rates_and_says_which_changed():
    """The checkpoint's state (momentum, moments) is resumed, its hyperparameters are not: a
    recipe resumed with another learning rate trains with it (load_state_dict alone brought
    back the old initial_lr, silently), and the change is named."""
    import dataclasses
    torch.manual_seed(7)
    groups = {"matrix": [_param(8, 4)], "scalar": [_param(3)]}
    opts = build_optimizers(groups, OptimArgs(), 768)
    for p in (*groups["matrix"], *groups["scalar"]):
        p.grad = torch.ones_like(p)
    for o in opts:
        o.step()
    states = optimizer_state_dicts(opts)
    args = OptimArgs()
    faster = dataclasses.replace(args, matrix_lr=2 * args.matrix_lr)
    opts2 = build_optimizers(groups, faster, 768)
    changed = load_optimizer_state_dicts(opts2, states)
    muon = next(o for o in opts2 if o.param_groups[0].get("name") == "matrix")
    assert muon.param_groups[0]["initial_lr"] == pytest.approx(2 * args.matrix_lr)
    assert len(changed) == 1 and "initial_lr" in changed[0], changed
    assert load_optimizer_state_dicts(build_optimizers(groups, OptimArgs(), 768), states) == []


# --- distributed ------------------------------------------------------------------------------

STEPS = 4


def _mlp_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"w1": torch.nn.Parameter(torch.randn(32, 12, generator=g) / 12 ** 0.5),
            "w2": torch.nn.Parameter(torch.randn(6, 32, generator=g) / 32 ** 0.5),
            "w3": torch.nn.Parameter(torch.randn(6, 6, generator=g) / 6 ** 0.5),
            "b1": torch.nn.Parameter(torch.zeros(32)),
            "b2": torch.nn.Parameter(torch.zeros(6)),
            "gain": torch.nn.Parameter(torch.ones(1))}


def _batch():
    g = torch.Generator().manual_seed(123)
    return torch.randn(STEPS, 64, 12, generator=g), torch.randn(STEPS, 64, 6, generator=g)


OPTIONS = {  # Muon switches the distributed run must reproduce
    "muon+": dict(row_equilibrate=True, muon_plus=True),
    "normuon+cautious_wd": dict(row_equilibrate=True, muon_plus=True, variance_reduction=True,
                                muon_weight_decay=0.28),
}


def _train(rank: int, world: int, options: str = "muon+") -> dict[str, torch.Tensor]:
    """Tiny MLP; each rank gets its contiguous share of every batch. Returns the params and
    Muon's second moments ("sm.<name>")."""
    P = _mlp_params()
    groups = {"matrix": [P["w1"], P["w2"], P["w3"]], "scalar": [P["b1"], P["b2"], P["gain"]]}
    opts = build_optimizers(groups, OptimArgs(**OPTIONS[options]), 64)
    xs, ys = _batch()
    n = xs.size(1) // world
    for step in range(STEPS):
        x, y = xs[step, rank * n:(rank + 1) * n], ys[step, rank * n:(rank + 1) * n]
        h = torch.relu(x @ P["w1"].T + P["b1"])
        out = P["gain"] * ((h @ P["w2"].T + P["b2"]) @ P["w3"].T)
        loss = ((out - y) ** 2).mean()
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        allreduce_gradients(P.values())
        for o in opts:
            o.step()
    out = {k: v.detach().clone() for k, v in P.items()}
    muon = opts[-1]
    for k in ("w1", "w2", "w3"):
        if "second_moment" in muon.state[P[k]]:
            out[f"sm.{k}"] = muon.state[P[k]]["second_moment"].clone()
    return out


def _worker(rank: int, world: int, init_file: str, out_dir: str, options: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.save(_train(rank, world, options), f"{out_dir}/rank{rank}.pt")
    dist.barrier()  # both ranks' results are on disk
    # no gloo teardown: a rank destroying its group while the other's pairs close has aborted
    # the process ("terminate called without an active exception", once in CI); the results
    # are on disk and the OS closes the sockets
    os._exit(0)


@pytest.mark.parametrize("options", list(OPTIONS))
def test_distributed_muon_matches_single_process(tmp_path, options):
    """Owners step their share and broadcast; every rank ends with the same params and the same
    (complete) second moments, equal to one process's."""
    world = 2
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path), options), nprocs=world,
             join=True)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    single = _train(0, 1, options)
    init = _mlp_params()
    assert set(r0) == set(r1) == set(single)
    if OPTIONS[options].get("variance_reduction"):
        assert {"sm.w1", "sm.w2", "sm.w3"} <= set(single)
    for k in single:
        assert torch.equal(r0[k], r1[k]), f"{k} differs between ranks"
        torch.testing.assert_close(r0[k], single[k], rtol=0, atol=1e-5, msg=f"{k} vs single process")
        assert k.startswith("sm.") or not torch.equal(single[k], init[k]), f"{k} never moved"


def test_single_process_needs_no_distributed():
    assert not dist.is_initialized()
    p = _param(4, 4)
    p.grad = torch.ones(4, 4)
    allreduce_gradients([p])  # no-op
    assert torch.equal(p.grad, torch.ones(4, 4))
    Muon([p]).step()
