"""configs/d12.yaml and configs/d24.yaml train what upstream nanochat trains: each rule pinned to
upstream's published value, with the upstream file and the line it comes from.

Upstream = karpathy/nanochat master (92d63d4, Jul 2026), read with the project's code search. The
stored copies this was read from: nanochat/flash_attention.py at 030de3a (line numbers below),
scripts/base_train.py at 00255c1, nanochat/gpt.py (`GPT._compute_window_sizes`,
`GPT.init_weights`, `GPT.setup_optimizer`, `GPT.estimate_flops`). Where a line number was not
verifiable the upstream line is quoted verbatim (grep finds it). The oracles below restate
upstream's formulas from those lines, independently of the kit's code.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from nanochat import checkpoint as ckpt
from nanochat.attention import band_mask, causal_attention, layer_windows, short_window
from nanochat.common import UserError
from nanochat.decode import DecodeStep
from nanochat.gpt import GPT, GPTConfig, build_model, has_value_embed
from nanochat.kv_cache import KVCache
from nanochat.optim import Muon, build_optimizers, muon_momentum, muon_weight_decay_at
from nanochat.recipe import load_recipe
from nanochat.train import num_iterations, run_horizon
from nanochat.optim import lr_multiplier

REPO = Path(__file__).resolve().parents[1]

FA = "nanochat/flash_attention.py@030de3a"
GPT_PY = "nanochat/gpt.py"
BASE_TRAIN = "scripts/base_train.py@00255c1"


def recipe(name: str):
    return load_recipe(REPO / "configs" / f"{name}.yaml")


def meta_model(r) -> GPT:
    """The recipe's model at the tokenizer's vocabulary, shapes only (nothing allocated)."""
    with torch.device("meta"):
        return GPT(GPTConfig.from_args(r.model, r.tokenizer.vocab_size))


# ---------------------------------------------------------------- model shapes

@pytest.mark.parametrize("name,depth,width,heads", [("d12", 12, 768, 6), ("d24", 24, 1536, 12)])
def test_model_shapes_are_upstreams(name, depth, width, heads):
    """base_train.py `build_model_meta`: model_dim = depth · 64 rounded up to heads of 128,
    n_kv_head = n_head, vocab 32768 (a multiple of 64: upstream's padding changes nothing);
    gpt.py: value embeddings on `layer_idx % 2 == (n_layer - 1) % 2` (vocab × kv_dim), their gate
    `Linear(12, n_kv_head)`; `self.smear_gate = Linear(24, 1, bias=False)`."""
    model = meta_model(recipe(name))
    c = model.config
    assert (c.n_layer, c.n_embd, c.n_head, c.n_kv_head, c.head_dim) == (depth, width, heads, heads, 128)
    assert c.vocab_size == 32768 and c.vocab_size % 64 == 0
    assert (c.qk_gain, c.rotary_base, c.softcap) == (1.2, 100000.0, 15.0)
    ve_layers = [i for i in range(depth) if i % 2 == (depth - 1) % 2]
    assert sorted(map(int, model.value_embeds)) == ve_layers
    assert all(model.value_embeds[str(i)].weight.shape == (32768, width) for i in ve_layers)
    assert all(model.blocks[i].attn.ve_gate.weight.shape == (heads, 12) for i in ve_layers)
    assert model.smear_gate.weight.shape == (1, 24) and model.backout_layer == depth // 2
    assert model.resid_lambdas.shape == model.x0_lambdas.shape == (depth,)
    # base_train.py `get_scaling_params`: transformer_matrices + lm_head
    blocks = sum(p.numel() for b in model.blocks for p in b.parameters())
    assert model.num_params()["scaling"] == blocks + 32768 * width


# ---------------------------------------------------------------- windows

def upstream_short_window(seq: int) -> int:
    # gpt.py `_compute_window_sizes`: "short_window = -(-long_window // 4 // 128) * 128"
    return -(-seq // 4 // 128) * 128


def upstream_mask(T: int, window: int) -> torch.Tensor:
    """flash_attention.py `_sdpa_attention` (FA@030de3a lines 92–98): mask = col <= row, then
    `mask = mask & ((row_idx - col_idx) <= window)` — upstream passes window_size=(W, 0), so
    the query at i reads i - W ..= i, W + 1 keys (line 79 skips the mask when W ≥ T)."""
    row, col = torch.arange(T).view(-1, 1), torch.arange(T).view(1, -1)
    return (col <= row) & ((row - col) <= window)


@pytest.mark.parametrize("seq", [2048, 1000, 1001, 2050, 256])
def test_window_sizes_are_upstreams_at_lengths_that_are_and_are_not_multiples_of_128(seq):
    """gpt.py `_compute_window_sizes`: S = -(-seq // 4 // 128) · 128, L = (sequence_len, 0),
    the pattern tiled, `window_sizes[-1] = (long_window, 0)`."""
    assert short_window(seq) == upstream_short_window(seq)
    S = upstream_short_window(seq)
    assert layer_windows("SSSL", 12, seq) == [S, S, S, seq] * 3
    assert layer_windows("SSSS", 5, seq) == [S, S, S, S, seq]
    assert short_window(2048) == 512  # not 768, as upstream's own comment on that line says


@pytest.mark.parametrize("seq", [2048, 1000])
def test_each_query_reads_w_plus_one_keys_and_l_slides_past_sequence_len(seq):
    """Training/eval masks: the S window and the L window (= sequence_len) equal upstream's
    SDPA-fallback mask on a sequence longer than sequence_len."""
    T = seq + 60
    for W in (short_window(seq), seq):
        ours = band_mask(T, W, torch.device("cpu"))
        assert torch.equal(ours, upstream_mask(T, W))
        assert int(ours[T - 1].sum()) == W + 1 and int(ours[W].sum()) == W + 1
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, T, 8), torch.randn(1, 1, T, 8), torch.randn(1, 1, T, 8)
    kk, vv = k.expand(1, 2, T, 8), v.expand(1, 2, T, 8)
    for W in (short_window(seq), seq):
        s = (q @ kk.transpose(-1, -2)) / math.sqrt(8)
        ref = s.masked_fill(~upstream_mask(T, W), float("-inf")).softmax(-1) @ vv
        torch.testing.assert_close(causal_attention(q, k, v, W), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ring", [False, True])
def test_decode_reads_the_same_keys_as_upstreams_kv_cache_path(ring):
    """flash_attention.py line 85, single-token decode: `start = max(0, Tk - (window + 1))`:
    the new token at position p reads p - W ..= p, for S layers and, past sequence_len, L layers.
    The kit's ring holds exactly those W + 1 positions."""
    seq = 1000
    cfg = GPTConfig(sequence_len=seq, vocab_size=300, n_layer=4, n_head=2, n_kv_head=1, n_embd=32,
                    window_pattern="SSSL")
    cache = KVCache(1, 1200, cfg, "cpu", torch.float32, ring=ring)
    windows = layer_windows("SSSL", 4, seq)
    assert windows == [256, 256, 256, 1000]
    if ring:
        assert cache.ring_len == 257 and [cache.is_ring(i) for i in range(4)] == [True] * 3 + [False]
    for p in (10, 256, 257, 999, 1000, 1001, 1150):
        cache.row_pos.fill_(p)
        masks = DecodeStep.masks(cache, cache.key_pos)
        for layer, W in enumerate(windows):
            m = masks[layer].view(-1)
            if cache.is_ring(layer):  # slot s holds the largest position ≡ s (mod W + 1) ≤ p
                held = p - ((p - torch.arange(W + 1)) % (W + 1))
                read = sorted(held[m & (held >= 0)].tolist())
            else:
                read = torch.nonzero(m).view(-1).tolist()
            assert read == list(range(max(0, p - W), p + 1)), (layer, p)


# ---------------------------------------------------------------- initialisation

def kurtosis(x: torch.Tensor) -> float:
    x = x.double().flatten()
    x = x - x.mean()
    return float((x ** 4).mean() / (x ** 2).mean() ** 2)


def test_initialisation_is_upstreams_for_every_tensor():
    """gpt.py `init_weights`: "torch.nn.init.normal_(self.transformer.wte.weight, mean=0.0,
    std=0.8)", lm_head normal std 0.001; "s = 3**0.5 * n_embd**-0.5"; c_q, c_k, c_v
    "uniform_(…, -s, s)" (GQA: c_k/c_v at the same s, not scaled by their width); c_proj zeros;
    "uniform_(block.mlp.c_fc.weight, -s * 0.4, s * 0.4)"; value embeds "uniform_(ve.weight, -s,
    s)"; ve_gate and smear_gate "uniform_(…, 0.0, 0.02)"; smear_lambda zeros;
    "constant_(self.backout_lambda, 0.2)"; "1.15 - (0.10 * i / max(n_layer - 1, 1))" and
    "0.20 - (0.15 * i / max(n_layer - 1, 1))"."""
    torch.manual_seed(0)
    n_embd, n_layer = 256, 3
    cfg = GPTConfig(sequence_len=256, vocab_size=2048, n_layer=n_layer, n_head=4, n_kv_head=1,
                    n_embd=n_embd, value_embeds=True, window_pattern="SSSL", smear=True,
                    backout=True, residual_scalars=True, qk_gain=1.2, rotary_base=100000.0)
    m = build_model(cfg, "cpu")
    s = 3 ** 0.5 * n_embd ** -0.5

    def normal(t, std):
        assert abs(float(t.std()) / std - 1) < 0.02 and abs(float(t.mean())) < 0.02 * std
        assert abs(kurtosis(t) - 3.0) < 0.1

    def uniform(t, lo, hi):
        assert lo <= float(t.min()) and float(t.max()) <= hi
        assert float(t.min()) < lo + 0.01 * (hi - lo) and float(t.max()) > hi - 0.01 * (hi - lo)
        assert abs(float(t.std()) / ((hi - lo) / 12 ** 0.5) - 1) < 0.03
        assert abs(kurtosis(t) - 1.8) < 0.1  # a uniform draw's, not a normal's 3

    normal(m.wte.weight, 0.8)
    normal(m.lm_head.weight, 0.001)
    for b in m.blocks:
        assert b.attn.c_k.weight.shape == (64, 256)  # GQA: one kv head of 64
        for lin in (b.attn.c_q, b.attn.c_k, b.attn.c_v):
            uniform(lin.weight, -s, s)
        uniform(b.mlp.c_fc.weight, -0.4 * s, 0.4 * s)
        assert not b.attn.c_proj.weight.any() and not b.mlp.c_proj.weight.any()
    assert sorted(m.value_embeds) == ["0", "2"] and has_value_embed(1, 3) is False
    for table in m.value_embeds.values():
        uniform(table.weight, -s, s)
    for i in (0, 2):
        g = m.blocks[i].attn.ve_gate.weight
        assert g.shape == (1, 12) and 0 <= float(g.min()) and float(g.max()) <= 0.02
    assert 0 <= float(m.smear_gate.weight.min()) and float(m.smear_gate.weight.max()) <= 0.02
    assert float(m.smear_lambda) == 0.0 and float(m.backout_lambda) == pytest.approx(0.2)
    up = max(n_layer - 1, 1)
    assert m.resid_lambdas.tolist() == torch.tensor([1.15 - (0.10 * i / up) for i in range(n_layer)]).tolist()
    assert m.x0_lambdas.tolist() == torch.tensor([0.20 - (0.15 * i / up) for i in range(n_layer)]).tolist()


# ---------------------------------------------------------------- optimizer per role

B_REF = 2 ** 19  # base_train.py: "B_REF = 2**19"


def upstream_groups(n_embd: int, B: int) -> dict:
    """gpt.py `setup_optimizer` param_groups, with base_train.py's LRs ("--embedding-lr" 0.3,
    "--unembedding-lr" 0.008, "--scalar-lr" 0.5, "--matrix-lr" 0.02, each × batch_lr_scale =
    √(B / B_REF)) and "dmodel_lr_scale = (model_dim / 768) ** -0.5":
      lm_head     "lr=unembedding_lr * dmodel_lr_scale, betas=(0.8, 0.96), eps=1e-10, weight_decay=0.01"
      embedding   "lr=embedding_lr * dmodel_lr_scale, betas=(0.8, 0.995), eps=1e-10, weight_decay=0.001"
      value embed "lr=embedding_lr * dmodel_lr_scale * 0.5, betas=(0.8, 0.995), eps=1e-10, weight_decay=0.01"
      resid       "lr=scalar_lr * 0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.05"
      x0          "lr=scalar_lr, betas=(0.96, 0.95), eps=1e-10, weight_decay=0.0"
      smear       "lr=0.2, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0" (smear gate, smear λ, backout λ)
      muon        "momentum=0.95, ns_steps=5, beta2=0.9, weight_decay=weight_decay" (momentum set by the schedule)"""
    bls, dms = (B / B_REF) ** 0.5, (n_embd / 768) ** -0.5
    return {"lm_head": (0.008 * bls * dms, (0.8, 0.96), 0.01),
            "embedding": (0.3 * bls * dms, (0.8, 0.995), 0.001),
            "value_embed": (0.3 * bls * dms * 0.5, (0.8, 0.995), 0.01),
            "resid": (0.5 * bls * 0.01, (0.8, 0.95), 0.05),
            "x0": (0.5 * bls, (0.96, 0.95), 0.0),
            "smear": (0.2, (0.8, 0.95), 0.0),
            "matrix": (0.02 * bls, None, None)}


def test_the_adamw_role_defaults_are_upstreams_table():
    """optim.adamw_roles' defaults (nanochat/optim_config.py ADAMW_ROLE_DEFAULTS) are the betas,
    eps and weight decay of each role in upstream's param_groups (quoted in upstream_groups);
    bigram and scalar are the kit's own roles (upstream has no bigram)."""
    from nanochat.optim_config import ADAM_ROLES, default_adamw_roles
    roles = default_adamw_roles()
    for group, (_, betas, wd) in upstream_groups(768, B_REF).items():
        if betas is not None:
            assert roles[ADAM_ROLES[group][0]] == {"betas": list(betas), "weight_decay": wd, "eps": 1e-10}, group
    assert set(roles) == {role for role, _ in ADAM_ROLES.values()}


@pytest.mark.parametrize("name,B", [("d12", 2 ** 19), ("d24", 2 ** 20)])
def test_every_roles_optimizer_settings_are_upstreams(name, B):
    r = recipe(name)
    assert r.train.total_batch_size == B
    model = meta_model(r)
    c = model.config
    steps = num_iterations(r, model)
    horizon = run_horizon(r, steps, c.vocab_size, model.num_params()["scaling"])
    opts = build_optimizers(model.param_groups(), r.optim, c.n_embd, all_params=model.parameters(),
                            horizon=horizon)
    groups = {g["name"]: g for o in opts for g in o.param_groups}
    expected = upstream_groups(c.n_embd, B)
    assert set(groups) == set(expected)
    for role, (lr, betas, wd) in expected.items():
        g = groups[role]
        assert g["lr"] == pytest.approx(lr, rel=1e-12), role
        if betas is not None:
            assert (tuple(g["betas"]), g["eps"], g["weight_decay"]) == (betas, 1e-10, wd), role
    assert [id(p) for p in groups["smear"]["params"]] == \
        [id(model.smear_gate.weight), id(model.smear_lambda), id(model.backout_lambda)]
    muon = groups["matrix"]
    assert isinstance(opts[-1], Muon) and muon["beta2"] == 0.9 and muon["ns_steps"] == 5
    assert muon["row_equilibrate"] and muon["muon_plus"] and muon["variance_reduction"]
    # base_train.py: "target_tokens = int(args.target_param_data_ratio * num_scaling_params)",
    # "D_REF = args.target_param_data_ratio * get_scaling_params(d12_ref)", "num_iterations =
    # target_tokens // total_batch_size", "weight_decay_scaled = args.weight_decay *
    # math.sqrt(total_batch_size / B_REF) * (D_REF / target_tokens)" with --weight-decay 0.28
    ratio = {"d12": 12, "d24": 8}[name]
    assert r.train.target_param_data_ratio == ratio
    target = int(ratio * model.num_params()["scaling"])
    d12 = meta_model(recipe("d12")) if name != "d12" else model
    d_ref = ratio * d12.num_params()["scaling"]
    assert steps == target // B
    assert muon["initial_weight_decay"] == pytest.approx(0.28 * math.sqrt(B / B_REF) * d_ref / target, rel=1e-12)


# ---------------------------------------------------------------- schedules

def upstream_lr(it: int, N: int) -> float:
    # base_train.py `get_lr_multiplier`, with --warmup-steps 40, --warmdown-ratio 0.65, --final-lr-frac 0.05
    warmdown = round(0.65 * N)
    if it < 40:
        return (it + 1) / 40
    if it <= N - warmdown:
        return 1.0
    progress = (N - it) / warmdown
    return progress * 1.0 + (1 - progress) * 0.05


def upstream_momentum(it: int, N: int) -> float:
    # base_train.py `get_muon_momentum`: "if it < 400: frac = it / 400; return (1 - frac) * 0.85 +
    # frac * 0.97", "elif it >= warmdown_start: … return 0.97 * (1 - progress) + 0.90 * progress"
    warmdown = round(0.65 * N)
    start = N - warmdown
    if it < 400:
        return (1 - it / 400) * 0.85 + it / 400 * 0.97
    if it >= start:
        p = (it - start) / warmdown
        return 0.97 * (1 - p) + 0.90 * p
    return 0.97


@pytest.mark.parametrize("name", ["d12", "d24"])
def test_lr_momentum_and_weight_decay_schedules_are_upstreams(name):
    r = recipe(name)
    model = meta_model(r)
    N = num_iterations(r, model)
    assert N > 1000
    for it in (0, 1, 39, 40, 200, 399, 400, N // 3, N - round(0.65 * N), N - round(0.65 * N) + 1,
               N // 2, N - 1, N):
        assert lr_multiplier(it, N, r.train) == pytest.approx(upstream_lr(it, N), rel=1e-12), it
        assert muon_momentum(it, r.optim, N, r.train.warmdown_ratio) == \
            pytest.approx(upstream_momentum(it, N), rel=1e-12), it
        # base_train.py `get_weight_decay`: "weight_decay_scaled * 0.5 * (1 + math.cos(math.pi * it / num_iterations))"
        assert muon_weight_decay_at(it, N, 0.3) == pytest.approx(0.3 * 0.5 * (1 + math.cos(math.pi * it / N)))


def test_default_data_param_ratio_is_upstreams():
    """base_train.py: '"--target-param-data-ratio", type=float, default=12'."""
    from nanochat.config import TrainArgs
    assert TrainArgs().target_param_data_ratio == 12


def test_flops_per_token_count_attention_over_each_window_as_upstream():
    """gpt.py `estimate_flops`: "effective_seq = t if window < 0 else min(window, t)",
    "attn_flops += 12 * h * q * effective_seq", plus 6 × the non-embedding matmul params."""
    model = meta_model(recipe("d12"))
    c = model.config
    attn = sum(12 * c.n_head * c.head_dim * min(w, c.sequence_len) for w in [512, 512, 512, 2048] * 3)
    matmul = sum(p.numel() for b in model.blocks for p in b.parameters()) + model.lm_head.weight.numel() \
        + model.smear_gate.weight.numel()
    assert model.flops_per_token() == 6 * matmul + attn


# ---------------------------------------------------------------- old checkpoints

def test_checkpoints_record_the_rules_and_an_old_one_says_so_on_resume(tmp_path):
    model = build_model(GPTConfig(256, 300, 2, 2, 1, 32), "cpu")
    step = ckpt.save_checkpoint(tmp_path, 1, model, [], {"loader": [{}]})
    assert ckpt.read_meta(step)["rules"] == ckpt.RULES_VERSION == 2
    ckpt.check_rules(step, ckpt.read_meta(step))  # this code's own: resumes
    with pytest.raises(UserError) as e:
        ckpt.check_rules(step, {"step": 1})  # written before the rules were recorded
    msg = str(e.value)
    assert "\n" not in msg and "rules v1" in msg and "v2" in msg and "new run_dir" in msg
