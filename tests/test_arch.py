"""The architecture switches (value embeds, sliding windows, smear, backout, residual scalars,
q/k gain, rotary base): windows and causality, the attention kernels, the KV-cache engine
against the full forward and naive decoding with every switch on, parameters and FLOPs, old
checkpoints, resuming, and two gloo ranks."""
import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from nanochat import checkpoint as ckpt
from nanochat.attention import (attention_backend, band_mask, causal_attention,
                                flash_attn_available, layer_windows, short_window)
from nanochat.common import UserError
from nanochat.config import ModelArgs, OptimArgs
from nanochat.decode import DecodeStep
from nanochat.engine import Engine, load_model
from nanochat.gpt import ARCH_SWITCHES, GPTConfig, build_model
from nanochat.kv_cache import KVCache
from nanochat.optim import build_optimizers
from nanochat.recipe import recipe_from_dict
from nanochat.train import train_base

SEQ = 256   # the smallest context whose S window (128) is shorter than the context
W = 128
ALL_ON = dict(bigram_factor=2, value_embeds=True, window_pattern="S", smear=True, backout=True,
              residual_scalars=True, qk_gain=1.2, rotary_base=100000.0)


def model_with(seed=0, n_layer=3, **switches) -> torch.nn.Module:
    """A small model; weights moved off their initial values, so that every switch acts (smear's
    λ starts at 0, the value-embedding gates near 1.5, ...)."""
    torch.manual_seed(seed)
    cfg = GPTConfig(sequence_len=SEQ, vocab_size=300, n_layer=n_layer, n_head=4, n_kv_head=2,
                    n_embd=32, **switches)
    model = build_model(cfg, "cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


# ---------------------------------------------------------------- windows and causality

def test_windows_tile_the_pattern_and_the_last_layer_is_long():
    """S = ceil(seq / 4 / 128) · 128, L = sequence_len (a window too: it slides past the
    context), the last layer always L (upstream parity: tests/test_upstream_parity.py)."""
    assert short_window(2048) == 512 and short_window(256) == 128 and short_window(1000) == 256
    assert layer_windows("SSSL", 8, 2048) == [512, 512, 512, 2048, 512, 512, 512, 2048]
    assert layer_windows("SL", 3, 256) == [128, 256, 256]
    assert layer_windows("S", 1, 256) == [256]
    assert layer_windows("L", 4, 256) == [256] * 4
    assert GPTConfig.from_args(ModelArgs(window_pattern="SSL", depth=4), 300).windows() == \
        [512, 512, 2048, 2048]


@pytest.mark.parametrize("pattern", ["", "SXL", "ssl", "S L"])
def test_a_bad_window_pattern_is_one_line_naming_the_key(pattern):
    with pytest.raises(UserError) as e:
        recipe_from_dict({"model": {"window_pattern": pattern}})
    msg = str(e.value)
    assert "\n" not in msg and "model.window_pattern" in msg and "S (short window)" in msg \
        and "L (full context)" in msg


def changed_positions(out_a, out_b) -> list[int]:
    diff = (out_a - out_b).abs().amax(dim=-1)[0]
    assert diff.min() < 1e-6 or diff.max() > 1e-3, "every position moved a little: not a clean test"
    return [i for i, d in enumerate(diff.tolist()) if d > 1e-5]


@pytest.mark.parametrize("j", [0, 100, 250])
def test_a_window_layer_reads_exactly_its_window(j):
    """Perturbing the input at position j moves a window layer's output at i only for
    j <= i <= j + W (W + 1 keys, as upstream's window_size=(W, 0)), and an "L" layer's for
    j <= i <= j + sequence_len: past the context it slides too."""
    model = model_with(window_pattern="S", n_layer=2)
    x = torch.randn(1, 300, 32)
    y = x.clone()
    y[0, j] += torch.randn(32)
    cos_sin = model.cos[:, :300], model.sin[:, :300]
    win, full = model.blocks[0].attn, model.blocks[1].attn
    assert win.window == W and full.window == SEQ
    with torch.no_grad():
        assert changed_positions(win(x, cos_sin, None), win(y, cos_sin, None)) == \
            list(range(j, min(j + W + 1, 300)))
        assert changed_positions(full(x, cos_sin, None), full(y, cos_sin, None)) == \
            list(range(j, min(j + SEQ + 1, 300)))


def test_the_model_with_every_switch_never_reads_the_future():
    model = model_with(**ALL_ON)
    idx = torch.randint(0, 300, (1, 300))
    for j in (5, 150, 299):
        other = idx.clone()
        other[0, j] = (idx[0, j] + 1) % 300
        with torch.no_grad():
            moved = changed_positions(model(idx), model(other))
        assert moved and moved[0] == j, f"token {j} changed logits before it: {moved[:3]}"


def test_windows_change_the_model_only_past_the_window():
    """The same weights with windows on and off: equal logits where the window still covers
    every earlier position (i <= W), different after it."""
    on = model_with(window_pattern="SSL")
    off = model_with(window_pattern="L")
    off.load_state_dict(on.state_dict())
    idx = torch.randint(0, 300, (1, 300))
    with torch.no_grad():
        moved = changed_positions(on(idx), off(idx))
    assert moved[0] == W + 1 and moved[-1] == 299


# ---------------------------------------------------------------- kernels

def reference_attention(q, k, v, window):
    """Softmax attention written out, K/V repeated per query head, the band mask explicit."""
    G, T = q.size(1) // k.size(1), q.size(2)
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    i, j = torch.arange(T).view(-1, 1), torch.arange(T).view(1, -1)
    allowed = (j <= i) & (j >= i - window)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.size(-1))
    return s.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_window_kernels_equal_written_out_attention(backend):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 300, 16), torch.randn(2, 2, 300, 16), torch.randn(2, 2, 300, 16)
    got = causal_attention(q, k, v, W, backend=backend)
    torch.testing.assert_close(got, reference_attention(q, k, v, W), rtol=1e-5, atol=1e-5)


def test_full_context_layers_run_plain_causal_attention():
    """No mask for a full layer, or for a window that covers the sequence (W + 1 ≥ T):
    bit-identical to SDPA's is_causal."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 100, 16), torch.randn(1, 4, 100, 16), torch.randn(1, 4, 100, 16)
    plain = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.equal(causal_attention(q, k, v, None), plain)
    assert torch.equal(causal_attention(q, k, v, 100), plain)
    assert torch.equal(causal_attention(q, k, v, 99), plain)
    assert not torch.equal(causal_attention(q, k, v, 98), plain)


def test_compiled_training_forward_with_windows_equals_eager():
    """Under torch.compile the band mask is built inside the graph (not the eager cache): the
    loss and gradients of a compiled model with a window layer equal eager's."""
    model = model_with(window_pattern="S", n_layer=2).train()
    idx = torch.randint(0, 300, (2, 200))
    eager = model(idx, targets=idx.roll(-1, 1))
    g_eager = torch.autograd.grad(eager, list(model.parameters()))
    compiled = torch.compile(model)(idx, targets=idx.roll(-1, 1))
    g_compiled = torch.autograd.grad(compiled, list(model.parameters()))
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_compiled, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_flex_block_masks_are_made_once_per_forward_before_the_layers(monkeypatch):
    """Where the windows run flex_attention (CUDA under compile), the block masks of a forward
    are made in one call before the layers: that call stays outside the compiled graph, so a
    call inside each "S" layer broke the graph once per layer. Flex forced here on the CPU
    (eager flex is its reference path): one call for a model of three S layers, and the
    logits equal the SDPA band mask's."""
    import nanochat.attention as attn
    model = model_with(window_pattern="SSSL", n_layer=4)
    idx = torch.randint(0, 300, (2, 200))
    with torch.no_grad():
        expected = model(idx)
    calls = []
    build = attn.block_masks

    def counted(T, windows, device):
        calls.append(windows)
        return build(T, windows, device)
    monkeypatch.setattr(attn, "attention_backend", lambda device, compiled: "flex")
    monkeypatch.setattr(attn, "block_masks", counted)
    with torch.no_grad():
        got = model(idx)
    assert calls == [(W,)], calls
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_band_mask_is_made_once_per_shape():
    a = band_mask(300, W, torch.device("cpu"))
    assert band_mask(300, W, torch.device("cpu")) is a
    assert band_mask(300, 64, torch.device("cpu")) is not a
    assert a.shape == (300, 300) and a[200].sum() == W + 1 and a[10].sum() == 11


def test_band_mask_cache_is_bounded():
    """CORE and generation bring many lengths: the cache keeps a few recent shapes (the hot one
    stays), never one mask per length forever, and never a mask too big to keep."""
    import nanochat.attention as attn
    cpu = torch.device("cpu")
    hot = band_mask(256, W, cpu)
    for T in range(300, 340):
        band_mask(T, W, cpu)
        assert band_mask(256, W, cpu) is hot  # the training shape, used between them
    assert len(attn._BAND_MASKS) <= attn.MASK_CACHE_ENTRIES
    big = int(attn.MASK_CACHE_MAX_BYTES ** 0.5) + 1
    assert band_mask(big, W, cpu).shape == (big, big)
    assert all(key[0] != big for key in attn._BAND_MASKS)


@pytest.mark.parametrize("version,used", [("2.6.3", False), ("2.7.0.post2", True), ("2.8.3", True)])
def test_only_supported_flash_attn_releases_are_used(monkeypatch, capsys, version, used):
    """flash_attn before 2.7 has no custom op (torch.compile breaks the graph at every window
    layer): it is left unused with one line saying so, and compiled CUDA runs flex."""
    import importlib.machinery
    import sys
    import types
    mod = types.ModuleType("flash_attn")
    mod.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
    mod.__version__ = version
    monkeypatch.setitem(sys.modules, "flash_attn", mod)
    assert flash_attn_available() is used
    assert attention_backend("cuda", True) == ("flash_attn" if used else "flex")
    err = capsys.readouterr().err
    assert (err.count("older than 2.7") == 1) is not used, err


def test_attention_backend_per_device():
    assert attention_backend("cpu", False) == attention_backend("cpu", True) == "sdpa"
    if flash_attn_available():
        assert attention_backend("cuda", False) == "flash_attn"
    else:
        assert attention_backend("cuda", True) == "flex"
        assert attention_backend("cuda", False) == "sdpa"


# ---------------------------------------------------------------- the KV cache

@pytest.mark.parametrize("ring", [True, False])
def test_decode_steps_equal_the_full_forward_with_every_switch(ring):
    """Two rows of different prompt lengths (one past the window), prefilled together, then
    decoded one position per step past the window and past sequence_len: every step's logits
    equal the full forward's at that position."""
    model = model_with(**ALL_ON)
    seqs = torch.randint(0, 300, (2, 290))
    with torch.no_grad():
        full = model(seqs)
    lens = torch.tensor([140, 30])
    cache = KVCache(2, 300, model.config, "cpu", torch.float32, ring=ring)
    assert [cache.is_ring(i) for i in range(3)] == [ring, ring, False]
    prompt = seqs[:, :140].clone()
    prompt[1, 30:] = 0  # right padding, as the engine pads
    cache.prefill_lens = lens
    step = DecodeStep(model)
    with torch.no_grad():
        model(prompt, kv_cache=cache)
        cache.start_rows(lens, seqs[torch.arange(2), lens - 1])
        pos = lens.clone()
        for _ in range(150):
            logits = step(seqs[torch.arange(2), pos].view(2, 1), cache)
            for r in range(2):
                torch.testing.assert_close(logits[r], full[r, pos[r]], rtol=1e-4, atol=1e-4)
            pos += 1


@pytest.mark.parametrize("ring", [True, False])
def test_chunked_prefill_after_a_prefix_equals_the_full_forward(ring):
    model = model_with(**ALL_ON)
    idx = torch.randint(0, 300, (2, 280))
    cache = KVCache(2, 300, model.config, "cpu", torch.float32, ring=ring)
    with torch.no_grad():
        full = model(idx)
        for a, b in ((0, 100), (100, 180), (180, 181), (181, 280)):
            torch.testing.assert_close(model(idx[:, a:b], kv_cache=cache), full[:, a:b],
                                       rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("ring", [True, False])
def test_engine_greedy_equals_naive_greedy_with_every_switch(ring):
    """Ragged prompts (one longer than the window), two samples each, generation past the
    window and past sequence_len: token for token what recomputing everything gives."""
    model = model_with(**ALL_ON)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (210, 5, 140)]
    rows = Engine(model, ring=ring).generate_batch(prompts, num_samples=2, max_new_tokens=60,
                                                   temperature=0.0)
    for i, p in enumerate(prompts):
        naive = list(model.generate_naive(p, 60))
        assert len(set(naive)) > 5, "a degenerate model makes a weak oracle"
        assert rows[2 * i] == naive and rows[2 * i + 1] == naive, f"prompt {i}"


@pytest.mark.parametrize("ring", [True, False])
def test_cuda_graph_warm_up_leaves_the_cache_as_it_was(ring):
    """The warm-up before a CUDA-graph capture (engine.warm_up) really runs two decode steps.
    Ragged prompts, one that has filled its ring: after the warm-up every cache tensor and row
    state is as before, and the decode that follows equals one with no warm-up. Restoring only
    the row state left the second warm-up step's K/V in the ring slot that still holds the
    window's oldest key — read by the first real step."""
    from nanochat.engine import warm_up
    model = model_with(**ALL_ON)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (W + 40, W - 1, 7)]
    tok = torch.tensor([[5], [6], [7]])

    def prefilled():
        engine = Engine(model, ring=ring)
        cache = engine._ensure_cache(3, 300)
        with torch.no_grad():
            engine._prefill(prompts, 1, cache)
        return engine, cache

    engine, cache = prefilled()
    tensors = lambda c: [t.clone() for t in (c.k, c.v, c.k_ring, c.v_ring, c.row_pos, c.row_prev)
                         if t is not None]
    before = tensors(cache)
    with torch.no_grad():
        warm_up(cache, lambda: engine._step_call(3)(torch.zeros(3, 1, dtype=torch.long), cache, None))
        for a, b in zip(before, tensors(cache)):
            assert torch.equal(a, b), "the warm-up left a trace in the cache"
        after_warm_up = [engine._step_call(3)(tok, cache, None) for _ in range(3)]
        engine2, cache2 = prefilled()
        plain = [engine2._step_call(3)(tok, cache2, None) for _ in range(3)]
    for a, b in zip(after_warm_up, plain):
        assert torch.equal(a, b)


def test_ring_buffers_hold_only_the_window():  # W + 1 slots: the keys a query reads
    model = model_with(window_pattern="SSSL", n_layer=4)
    per_pos = 2 * 2 * 8 * 4  # k and v, 2 kv heads of 8, 4 bytes
    full = KVCache(3, 1000, model.config, "cpu", torch.float32)
    ring = KVCache(3, 1000, model.config, "cpu", torch.float32, ring=True)
    assert full.nbytes() == 3 * 4 * 1000 * per_pos
    assert ring.nbytes() == 3 * (1000 + 3 * (W + 1)) * per_pos and ring.ring_len == W + 1
    short = KVCache(3, 100, model.config, "cpu", torch.float32, ring=True)  # shorter than W
    assert short.nbytes() == 3 * 4 * 100 * per_pos and not short.is_ring(0)


# ---------------------------------------------------------------- parameters, FLOPs, inits

def test_switches_off_add_nothing_and_every_switch_adds_its_parameters():
    plain = build_model(GPTConfig(SEQ, 300, 3, 4, 2, 32), "cpu")
    defaults = GPTConfig.from_args(ModelArgs(), 300)
    assert all(getattr(defaults, f) == getattr(ModelArgs, f) for f in ARCH_SWITCHES)
    assert not any(getattr(defaults, f) for f in ("value_embeds", "smear", "backout", "residual_scalars"))
    on = model_with(**ALL_ON)
    new = set(on.state_dict()) - set(plain.state_dict())
    assert new == {"value_embeds.0.weight", "value_embeds.2.weight", "blocks.0.attn.ve_gate.weight",
                   "blocks.2.attn.ve_gate.weight", "smear_gate.weight", "smear_lambda",
                   "backout_lambda", "resid_lambdas", "x0_lambdas", "bigram.weight", "bigram_lambdas"}


def test_param_groups_cover_every_parameter_once_and_the_optimizers_take_them():
    model = model_with(**ALL_ON)
    groups = model.param_groups()
    assert [id(p) for p in groups["value_embed"]] == [id(t.weight) for t in model.value_embeds.values()]
    assert id(model.blocks[0].attn.ve_gate.weight) in {id(p) for p in groups["matrix"]}
    assert [id(p) for p in groups["smear"]] == \
        [id(model.smear_gate.weight), id(model.smear_lambda), id(model.backout_lambda)]
    assert groups["resid"] == [model.resid_lambdas] and groups["x0"] == [model.x0_lambdas]
    assert groups["scalar"] == [model.bigram_lambdas] and groups["bigram"] == [model.bigram.weight]
    opts = build_optimizers(groups, OptimArgs(), 32, all_params=model.parameters())
    names = {g["name"] for o in opts for g in o.param_groups}
    assert "value_embed" in names
    n = model.num_params()
    ve = 2 * 300 * 16
    scalars = sum(p.numel() for p in groups["resid"] + groups["x0"] + groups["smear"] + groups["scalar"])
    assert n["value_embeds"] == ve and \
        n["scaling"] == n["total"] - n["embedding"] - n["bigram"] - ve - scalars


def test_flops_count_each_layer_over_its_window():
    cfg = dict(window_pattern="SSSL")
    a = build_model(GPTConfig(1024, 300, 4, 4, 2, 32, **cfg), "cpu")
    b = build_model(GPTConfig(1024, 300, 4, 4, 2, 32), "cpu")
    assert short_window(1024) == 256
    assert b.flops_per_token() - a.flops_per_token() == 3 * 12 * 4 * 8 * (1024 - 256)


def test_switch_parameters_start_at_upstreams_values_and_all_learn():
    torch.manual_seed(0)
    model = build_model(GPTConfig(SEQ, 300, 5, 4, 2, 32, **ALL_ON), "cpu")
    torch.testing.assert_close(model.resid_lambdas, torch.tensor([1.15, 1.125, 1.10, 1.075, 1.05]))
    torch.testing.assert_close(model.x0_lambdas, torch.tensor([0.20, 0.1625, 0.125, 0.0875, 0.05]))
    assert model.backout_lambda.item() == pytest.approx(0.2) and model.smear_lambda.item() == 0
    gate = model.blocks[4].attn.ve_gate.weight
    assert 0 <= gate.min() and gate.max() <= 0.02 and gate.shape == (2, 12)
    assert sorted(model.value_embeds) == ["0", "2", "4"]
    idx = torch.randint(0, 300, (2, 64))
    trained = model_with(**ALL_ON).train()  # past init: zero branches and λ = 0 hide gradients
    trained(idx, targets=idx.roll(-1, 1)).backward()
    for name, p in trained.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} gets no gradient"


# ---------------------------------------------------------------- checkpoints

def strip_switches(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in ARCH_SWITCHES}


def test_a_checkpoint_older_than_the_switches_still_loads(tmp_path):
    model = build_model(GPTConfig(SEQ, 300, 2, 4, 2, 32), "cpu")
    meta = {"model_config": strip_switches(dataclasses.asdict(model.config)), "loader": [{}]}
    step = ckpt.save_checkpoint(tmp_path, 1, model, [], meta)
    loaded, _, _ = load_model(step, "cpu", torch.float32)
    assert all(getattr(loaded.config, f) == getattr(ModelArgs, f) for f in ARCH_SWITCHES)
    idx = torch.randint(0, 300, (1, 40))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model.eval()(idx))


def test_resuming_refuses_a_switch_the_checkpoint_lacks(tiny_recipe):
    """A checkpoint written before the switches existed resumes with them off; with one on,
    resuming fails in one line instead of initialising its weights anew."""
    from test_train import stop_after
    base = recipe_from_dict({**tiny_recipe, "train": {**tiny_recipe["train"], "num_iterations": 2}})
    train_base(base, stop_requested=stop_after(1))
    info = json.loads((base.out_dir / "run.json").read_text())
    assert info["attention"] == "sdpa" and info["attention_ran"] == {"L": "sdpa"}  # CPU, no window
    meta_path = ckpt.latest_checkpoint(base.out_dir) / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["model_config"] = strip_switches(meta["model_config"])
    meta_path.write_text(json.dumps(meta))
    smear = recipe_from_dict({**tiny_recipe, "model": {**tiny_recipe["model"], "smear": True}})
    with pytest.raises(UserError) as e:
        train_base(smear)
    assert "the run was started without model.smear" in str(e.value) and "\n" not in str(e.value)
    assert train_base(base)["step"] == 2  # switches off: it resumes
    chunked = recipe_from_dict({**tiny_recipe, "model": {**tiny_recipe["model"], "loss_chunk_rows": 5},
                                "train": {**tiny_recipe["train"], "num_iterations": 2}})
    assert train_base(chunked)["step"] == 2, "how the loss is chunked is no reason to refuse a resume"


# ---------------------------------------------------------------- training with every switch

def switches_recipe(tiny_recipe, run_dir) -> dict:
    return {**tiny_recipe, "run_dir": str(run_dir),
            "model": {**tiny_recipe["model"], "sequence_len": SEQ, "bigram_factor": 2,
                      **{k: v for k, v in ALL_ON.items() if k != "bigram_factor"}},
            "train": {**tiny_recipe["train"], "total_batch_size": 2048, "num_iterations": 4,
                      "eval_every": 2, "save_every": 2}}


def test_two_gloo_ranks_train_and_resume_exactly_with_every_switch(tiny_recipe, tmp_path):
    """test_train's two-rank run with every switch on and windows shorter than the rows: 4
    steps straight == 2 + stop + resume + 2, the same on both ranks."""
    from test_train import _run_ddp, bpbs, losses
    straight, split = tmp_path / "straight", tmp_path / "split"
    _run_ddp(switches_recipe(tiny_recipe, straight))
    _run_ddp(switches_recipe(tiny_recipe, split), stop_at=2)
    _run_ddp(switches_recipe(tiny_recipe, split))
    assert len(losses(split)) == 4 and losses(straight) == losses(split)
    assert bpbs(straight) == bpbs(split)
    wa = ckpt.load_model_state(ckpt.latest_checkpoint(straight))
    wb = ckpt.load_model_state(ckpt.latest_checkpoint(split))
    assert "smear_lambda" in wa and all(torch.equal(wa[k], wb[k]) for k in wa)


# ---------------------------------------------------------------- two ranks == one

EQ_STEPS, EQ_ROWS = 3, 4  # optimizer steps; rows per rank (one process: two micro-steps of these)
EQ_OPTIM = dict(variance_reduction=True, muon_weight_decay=0.1, muon_plus=True, row_equilibrate=True)


def _train_switched(rank: int, world: int) -> dict[str, torch.Tensor]:
    """Every switch on, the new optimizer options on; the global batch of 2·EQ_ROWS rows per step
    split over the ranks (world 2: DDP, overlapped, one micro-step each) or over two
    micro-steps (world 1). The weights after EQ_STEPS steps."""
    from nanochat.config import TrainArgs
    from nanochat.runtime import runtime
    with runtime(TrainArgs(device="cpu")) as rt:
        # the DDP wrapper dies with _steps_switched's frame, before the process group is
        # destroyed (a reducer outliving its group can block in its destructor)
        return _steps_switched(rt, rank, world)


def _steps_switched(rt, rank: int, world: int) -> dict[str, torch.Tensor]:
    from nanochat.config import TrainArgs
    from nanochat.grad_sync import finish_step_sync, micro_step_context, training_model
    from nanochat.optim import optimizer_step
    model = model_with(**ALL_ON).train()
    opts = build_optimizers(model.param_groups(), OptimArgs(**EQ_OPTIM), model.config.n_embd,
                            all_params=model.parameters())
    step_model = training_model(model, rt, TrainArgs(device="cpu"))
    gen = torch.Generator().manual_seed(7)
    data = torch.randint(0, 300, (EQ_STEPS, 2 * EQ_ROWS, SEQ + 1), generator=gen)
    accum = 2 // world
    for step in range(EQ_STEPS):
        rows = data[step].split(EQ_ROWS)
        mine = [rows[rank]] if world == 2 else list(rows)
        for i, x in enumerate(mine):
            with micro_step_context(step_model, communicate=i == accum - 1):
                (step_model(x[:, :-1], x[:, 1:]) / accum).backward()
        finish_step_sync(step_model, list(model.parameters()), rt, overlapped=True)
        optimizer_step(list(model.parameters()), opts, grad_clip=0.0)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    weights["__optimizer_states__"] = [o.state_dict() for o in opts]
    return weights


def assert_same_state(a, b, where="optimizer state") -> None:
    """Two nested state dicts hold the same values, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), f"{where} differs between the ranks"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys differ"
        for k in a:
            assert_same_state(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def _switched_worker(rank: int, port: int, out_dir: str) -> None:
    import os
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.save(_train_switched(rank, 2), f"{out_dir}/rank{rank}.pt")


def test_two_gloo_ranks_equal_one_rank_with_every_switch_and_optimizer_option(tmp_path):
    """The same global batch on two gloo ranks (DDP, gradients averaged during backward) and on
    one process (two accumulation micro-steps) ends at the same weights, every switch on."""
    import torch.multiprocessing as mp
    from test_train import _free_port
    ctx, port = mp.get_context("spawn"), _free_port()
    procs = [ctx.Process(target=_switched_worker, args=(r, port, str(tmp_path))) for r in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=240)  # a hang fails the test instead of stalling the suite
    codes = [proc.exitcode for proc in procs]
    for proc in procs:
        proc.kill()
    assert codes == [0, 0], codes
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    # checkpoints write the optimizer state once (nanochat/checkpoint.py): every rank's is the same
    o0, o1 = r0.pop("__optimizer_states__"), r1.pop("__optimizer_states__")
    assert_same_state(o0, o1)
    torch.set_num_threads(1)
    single = _train_switched(0, 1)
    single.pop("__optimizer_states__")
    start = model_with(**ALL_ON).state_dict()
    assert set(r0) == set(single) and {"smear_lambda", "backout_lambda"} <= set(single)
    for k in single:
        assert torch.equal(r0[k], r1[k]), f"{k} differs between the ranks"
        torch.testing.assert_close(r0[k], single[k], rtol=0, atol=2e-5, msg=f"{k}: two ranks vs one")
    moved = [k for k in single if not torch.equal(single[k], start[k])]
    assert len(moved) > len(single) // 2, "training moved the weights"
