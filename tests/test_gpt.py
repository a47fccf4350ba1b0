"""The model: shapes, causality, GQA, soft-capping, the hashed bigram embedding, the KV cache."""
import subprocess
import sys

import pytest
import torch

from nanochat.config import ModelArgs, model_dims
from nanochat.gpt import GPT, GPTConfig, KVCache, bigram_rows


def make_model(seed=0, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(**{"sequence_len": 32, "vocab_size": 300, "n_layer": 2, "n_head": 4,
                       "n_kv_head": 2, "n_embd": 64, **kw})
    model = GPT(cfg)
    model.init_weights()
    with torch.no_grad():  # zero-initialised parts (projections, bigram table) would hide bugs
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_logits_and_loss_shapes():
    model = make_model()
    idx = torch.randint(0, 300, (3, 16))
    assert model(idx).shape == (3, 16, 300)
    loss = model(idx, idx)
    assert loss.shape == () and torch.isfinite(loss)
    assert model(idx, idx, loss_reduction="none").shape == (48,)


def test_targets_minus_one_are_ignored():
    model = make_model()
    idx = torch.randint(0, 300, (2, 8))
    targets = idx.clone()
    targets[:, :4] = -1
    per_tok = model(idx, targets, loss_reduction="none").view(2, 8)
    assert torch.all(per_tok[:, :4] == 0)
    assert torch.allclose(model(idx, targets), per_tok[:, 4:].mean())


@pytest.mark.parametrize("bigram_factor", [0, 5])
def test_causal_future_tokens_never_change_earlier_logits(bigram_factor):
    model = make_model(bigram_factor=bigram_factor)
    idx = torch.randint(0, 300, (2, 20))
    base = model(idx)
    for t in (0, 7, 19):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % 300
        out = model(changed)
        assert torch.equal(out[:, :t], base[:, :t]), f"changing token {t} changed earlier logits"
        assert not torch.allclose(out[:, t:], base[:, t:]), "the changed token must matter"


def test_softcap_bounds_logits():
    model = make_model(softcap=2.0)
    with torch.no_grad():
        model.lm_head.weight.mul_(1000)
    logits = model(torch.randint(0, 300, (1, 8)))
    assert logits.abs().max() <= 2.0


def test_gqa_has_fewer_kv_parameters():
    mha, gqa = make_model(n_kv_head=4), make_model(n_kv_head=1)
    assert gqa.blocks[0].attn.c_k.weight.shape == (16, 64)
    assert mha.num_params()["total"] > gqa.num_params()["total"]


def test_depth_dial_derives_width_and_heads():
    assert model_dims(ModelArgs(depth=4)) == {"n_layer": 4, "n_embd": 256, "n_head": 2, "n_kv_head": 2}
    cfg = GPTConfig.from_args(ModelArgs(depth=16, bigram_factor=5), vocab_size=32768)
    assert (cfg.n_embd, cfg.n_head, cfg.head_dim, cfg.bigram_factor) == (1024, 8, 128, 5)


def test_param_count_and_flops_exclude_bigram_table():
    dense, bigram = make_model(), make_model(bigram_factor=5)
    nd, nb = dense.num_params(), bigram.num_params()
    assert nb["bigram"] == 5 * 300 * 64
    assert nb["total"] == nd["total"] + 5 * 300 * 64 + 2  # table + one λ per layer
    assert bigram.flops_per_token() == dense.flops_per_token()
    # 6 × (block matrices + lm_head) + attention term
    c = dense.config
    matmul = sum(p.numel() for b in dense.blocks for p in b.parameters()) + 300 * 64
    assert dense.flops_per_token() == 6 * matmul + 12 * c.n_layer * c.n_head * c.head_dim * c.sequence_len


def test_param_groups_cover_every_parameter_once():
    model = make_model(bigram_factor=2)
    groups = model.param_groups()
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert all(p.ndim == 2 for p in groups["matrix"])
    assert groups["bigram"] == [model.bigram.weight]  # its own AdamW role (optim.bigram_*)
    assert any(p is model.bigram_lambdas for p in groups["scalar"])


# ---------------------------------------------------------------- hashed bigram embedding

def test_bigram_hash_reserves_last_row_for_position_zero():
    idx = torch.randint(0, 300, (3, 10))
    rows = bigram_rows(idx, 1500)
    assert torch.all(rows[:, 0] == 1499)
    assert torch.all((rows[:, 1:] >= 0) & (rows[:, 1:] < 1499)), "ordinary rows never hit the reserved row"


def test_bigram_hash_matches_int32_formula_for_large_ids():
    idx = torch.tensor([[65000, 123]])
    rows = bigram_rows(idx, 5 * 65536)
    # ((36313·cur) XOR (27191·prev)) in wrapping int32, then a non-negative mod (R − 1).
    def wrap(v):
        return (v + 2**31) % 2**32 - 2**31
    h = wrap(wrap(36313 * 123) ^ wrap(27191 * 65000)) % (5 * 65536 - 1)
    assert rows[0, 1].item() == h


def test_bigram_rows_in_decode_equal_rows_in_training():
    idx = torch.randint(0, 300, (2, 12))
    full = bigram_rows(idx, 900)
    step_rows = [bigram_rows(idx[:, :1], 900)]
    for t in range(1, 12):
        step_rows.append(bigram_rows(idx[:, t:t + 1], 900, prev=idx[:, t - 1]))
    assert torch.equal(torch.cat(step_rows, dim=1), full)


def test_bigram_table_starts_at_zero_and_lambdas_nonzero():
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=16, vocab_size=300, n_layer=3, n_head=2, n_kv_head=2,
                          n_embd=32, bigram_factor=5))
    model.init_weights()
    assert model.bigram.weight.shape == (1500, 32)
    assert torch.all(model.bigram.weight == 0)
    assert torch.allclose(model.bigram_lambdas, torch.full((3,), 0.05))


# ---------------------------------------------------------------- KV cache

@pytest.mark.parametrize("bigram_factor", [0, 5])
def test_kv_cache_decode_matches_full_forward(bigram_factor):
    model = make_model(bigram_factor=bigram_factor)
    idx = torch.randint(0, 300, (2, 20))
    full = model(idx)
    cache = KVCache(2, 32, model.config, "cpu", torch.float32)
    parts = [model(idx[:, :9], kv_cache=cache)]       # prefill
    parts.append(model(idx[:, 9:13], kv_cache=cache))  # a chunk after a prefix
    for t in range(13, 20):                            # single-token decode
        parts.append(model(idx[:, t:t + 1], kv_cache=cache))
    assert cache.pos == 20
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_overflow_is_an_error():
    model = make_model()
    cache = KVCache(1, 8, model.config, "cpu", torch.float32)
    with pytest.raises(ValueError, match="KV cache full"):
        model(torch.randint(0, 300, (1, 9)), kv_cache=cache)


def test_naive_generate_is_greedy_argmax():
    model = make_model()
    prompt = [1, 2, 3]
    out = list(model.generate_naive(prompt, 5))
    seq = list(prompt)
    for _ in range(5):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert out == seq[3:]


def test_a_cpu_model_is_built_in_place_with_the_meta_paths_weights_and_without_dynamo():
    """empty_model on a CPU skips the meta device (whose random init imports torch._dynamo, ~3 s
    per process); init_weights then draws the same weights the meta path gives for the seed."""
    code = """
import sys, torch
from nanochat.gpt import GPT, GPTConfig, build_model
cfg = GPTConfig(sequence_len=32, vocab_size=256, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
torch.manual_seed(0)
fast = build_model(cfg, "cpu")
assert "torch._dynamo" not in sys.modules, "building on the CPU imported torch._dynamo"
with torch.device("meta"):
    ref = GPT(cfg)
ref.to_empty(device="cpu")
torch.manual_seed(0)
ref.init_weights()
a, b = fast.state_dict(), ref.state_dict()
assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "other weights than the meta path's"
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]
