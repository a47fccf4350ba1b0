"""The inference engine against the naive oracle (GPT.generate_naive: full recompute per token),
sampling, stop tokens, the static cache, and the chat command line (a really trained tiny model,
its real tokenizer, real subprocesses)."""

import pytest
import torch

from nanochat.common import UserError
from nanochat.engine import Engine, Sampling, argmax_first, sample_next
from nanochat.decode import DecodeStep, mkl_packed_available
from nanochat.gpt import KVCache
from nanochat.runtime import compile_count
from test_cli import error_line, run_cli
from test_gpt import make_model


RAGGED = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [42] * 12, [7]]


# ---------------------------------------------------------------- cache == naive

@pytest.mark.parametrize("bigram_factor", [0, 5])
def test_greedy_batch_1_equals_naive(bigram_factor):
    model = make_model(bigram_factor=bigram_factor)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    expected = list(model.generate_naive(prompt, 20))
    assert Engine(model).generate_batch(prompt, max_new_tokens=20, temperature=0) == [expected]


@pytest.mark.parametrize("bigram_factor", [0, 5])
@pytest.mark.parametrize("head", ["linear", "transposed", "packed"])
def test_greedy_ragged_batch_equals_naive(bigram_factor, head):
    """Prompts of 1..12 tokens in one batch: each row decodes as if it were alone."""
    model = make_model(bigram_factor=bigram_factor)
    rows = Engine(model, head=head).generate_batch(RAGGED, max_new_tokens=16, temperature=0)
    for prompt, row in zip(RAGGED, rows):
        assert row == list(model.generate_naive(prompt, 16)), f"prompt of {len(prompt)} tokens"


def test_greedy_past_the_training_context_equals_naive():
    model = make_model()  # sequence_len 32; the rotary table covers 10× that
    prompt = list(range(10, 40))
    assert Engine(model).generate_batch(prompt, max_new_tokens=12, temperature=0) == \
        [list(model.generate_naive(prompt, 12))]


@pytest.mark.parametrize("bigram_factor", [0, 5])
def test_decode_step_logits_match_full_forward_for_ragged_rows(bigram_factor):
    """Prefill right-padded prompts together, then per-row decode steps: every row's logits
    equal a full forward of that row's own sequence."""
    model = make_model(bigram_factor=bigram_factor)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]
    cont = torch.randint(0, 300, (3, 5))
    lens = torch.tensor([len(p) for p in prompts])
    idx = torch.zeros(3, 6, dtype=torch.long)
    for i, p in enumerate(prompts):
        idx[i, :len(p)] = torch.tensor(p)
    cache = KVCache(3, 12, model.config, "cpu", torch.float32)
    with torch.no_grad():
        first = model(idx, kv_cache=cache, logits_at=lens - 1)[:, 0]
        cache.start_rows(lens, idx[torch.arange(3), lens - 1])
        step = DecodeStep(model)
        steps = [step(cont[:, t:t + 1], cache) for t in range(5)]
        for i, p in enumerate(prompts):
            full = model(torch.cat([torch.tensor([p]), cont[i:i + 1]], dim=1))[0]
            torch.testing.assert_close(first[i], full[len(p) - 1], atol=1e-5, rtol=1e-5)
            for t in range(5):
                torch.testing.assert_close(steps[t][i], full[len(p) + t], atol=1e-5, rtol=1e-5)
    assert cache.row_pos.tolist() == [8, 11, 6]


# ---------------------------------------------------------------- sampling

def test_samples_of_one_prompt_draw_their_own_first_token():
    """The seeds' bug: the first sampled token was copied to every sample."""
    model = make_model()
    engine = Engine(model)
    rows = engine.generate_batch([1, 2, 3], num_samples=16, max_new_tokens=3, temperature=1.0, seed=0)
    assert len(rows) == 16 and len({r[0] for r in rows}) >= 2
    greedy = engine.generate_batch([1, 2, 3], num_samples=4, max_new_tokens=3, temperature=0)
    assert all(r == greedy[0] for r in greedy), "at temperature 0 every sample is the same"


def test_same_seed_same_output_other_seed_differs():
    engine = Engine(make_model())
    kw = dict(num_samples=4, max_new_tokens=12, temperature=1.0, top_k=50)
    a = engine.generate_batch(RAGGED[:2], seed=123, **kw)
    assert a == engine.generate_batch(RAGGED[:2], seed=123, **kw)
    assert a != engine.generate_batch(RAGGED[:2], seed=124, **kw)


def test_top_k_1_and_tiny_top_p_are_greedy():
    model = make_model()
    engine = Engine(model)
    greedy = engine.generate_batch(RAGGED, max_new_tokens=8, temperature=0)
    assert engine.generate_batch(RAGGED, max_new_tokens=8, temperature=1.5, top_k=1, seed=0) == greedy
    assert engine.generate_batch(RAGGED, max_new_tokens=8, temperature=1.5, top_p=1e-6, seed=0) == greedy


def test_sampler_draws_from_the_softmax_and_respects_top_k_top_p():
    """20,000 independent rows over a 5-token vocabulary: frequencies match the softmax."""
    probs = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])
    logits = probs.log().expand(20_000, 5).contiguous()
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(sample_next(logits, Sampling(1.0), g).view(-1), minlength=5).float()
    expected = 20_000 * probs
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 20, f"chi² {chi2:.1f} with 4 d.o.f. (p ≈ 5e-4): counts {counts.tolist()}"
    top2 = sample_next(logits, Sampling(1.0, top_k=2), g).view(-1)
    assert set(top2.tolist()) == {0, 1}
    nucleus = sample_next(logits, Sampling(1.0, top_p=0.8), g).view(-1)  # 0.5 + 0.25 < 0.8
    assert set(nucleus.tolist()) == {0, 1, 2}
    assert 0.5 / 0.9 - 0.02 < (nucleus == 0).float().mean() < 0.5 / 0.9 + 0.02, "renormalised"


# ---------------------------------------------------------------- stopping and streaming

def test_stop_tokens_end_their_row_only():
    engine = Engine(make_model())
    free = engine.generate_batch(RAGGED, max_new_tokens=10, temperature=0)
    stop = free[1][4]  # row 1 would produce this token 5th
    steps = list(engine.generate(RAGGED, max_new_tokens=10, temperature=0, stop_tokens=[stop]))
    rows = engine.generate_batch(RAGGED, max_new_tokens=10, temperature=0, stop_tokens=[stop])
    for free_row, row in zip(free, rows):
        cut = free_row.index(stop) if stop in free_row else len(free_row)
        assert row == free_row[:cut], "a row ends at its first stop token, which is not returned"
    assert all(s[1] is None for s in steps[4:]), "a stopped row streams None"
    if all(stop in r for r in free):
        assert len(steps) == max(r.index(stop) for r in free) + 1


def test_generation_ends_when_every_row_stopped():
    engine = Engine(make_model())
    first = engine.generate_batch([1, 2, 3], max_new_tokens=5, temperature=0)[0]
    steps = list(engine.generate([1, 2, 3], max_new_tokens=50, temperature=0, stop_tokens=[first[1]]))
    assert [s[0] for s in steps] == [first[0], None]


def test_max_new_tokens_and_stream_shape():
    engine = Engine(make_model())
    steps = list(engine.generate(RAGGED, num_samples=2, max_new_tokens=7, temperature=0.8, seed=1))
    assert len(steps) == 7 and all(len(s) == 8 and None not in s for s in steps)
    assert engine.generate_batch(RAGGED, max_new_tokens=0) == [[] for _ in RAGGED]


def test_cache_is_preallocated_once_and_reused():
    engine = Engine(make_model())
    engine.generate_batch(RAGGED, max_new_tokens=10, temperature=0)
    cache = engine.cache
    ptrs = cache.k.data_ptr(), cache.v.data_ptr()
    assert cache.k.shape[1:4:2] == (4, 12 + 10), "batch × (longest prompt + max_new_tokens)"
    engine.generate_batch(RAGGED, max_new_tokens=5, temperature=0)
    assert engine.cache is cache and (cache.k.data_ptr(), cache.v.data_ptr()) == ptrs


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs, match", [
    ({"top_p": 0.0}, "top_p must be in"), ({"top_p": 1.5}, "top_p must be in"),
    ({"temperature": -1.0}, "temperature"), ({"top_k": 0}, "top_k"),
    ({"num_samples": 0}, "num_samples"), ({"prompts": [list(range(33))]}, "longer than the model's context"),
    ({"prompts": [[1, 300]]}, "outside"), ({"prompts": []}, "at least one prompt"),
])
def test_bad_generate_arguments_are_one_line_errors(kwargs, match):
    engine = Engine(make_model())
    kwargs = {"prompts": [[1, 2]], "max_new_tokens": 2, **kwargs}
    with pytest.raises(UserError, match=match):
        engine.generate_batch(**kwargs)


# ---------------------------------------------------------------- chat CLI (a trained model)

@pytest.fixture(scope="module")
def trained_run(corpus, tmp_path_factory):
    from nanochat.recipe import recipe_from_dict
    from nanochat.train import train_base
    run_dir = tmp_path_factory.mktemp("chat") / "run"
    recipe = recipe_from_dict({
        **corpus["sections"], "cache_dir": corpus["cache_dir"], "run_dir": str(run_dir),
        "model": {"depth": 2, "n_embd": 64, "n_head": 2, "sequence_len": 64},
        "train": {"total_batch_size": 512, "device_batch_size": 8, "num_iterations": 6,
                  "eval_every": -1, "eval_tokens": 512, "progress_bar": False, "device": "cpu"}})
    train_base(recipe)
    return run_dir


def test_chat_one_shot_and_interactive(trained_run):
    res = run_cli("nanochat.chat", trained_run, "-p", "Who art thou?", "--seed", "0",
                  "--max-new-tokens", "12")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip(), "a reply was printed"
    again = run_cli("nanochat.chat", trained_run / "checkpoints" / "step_000006", "-p",
                    "Who art thou?", "--seed", "0", "--max-new-tokens", "12")
    assert again.stdout == res.stdout, "same seed, same reply (step dir or run dir alike)"
    inter = subprocess_with_input(trained_run, "Good morrow\nclear\nFarewell\nquit\n")
    assert inter.returncode == 0, inter.stderr
    assert inter.stdout.count("Assistant:") == 2 and "(new conversation)" in inter.stdout


def subprocess_with_input(run_dir, text):
    import subprocess
    import sys
    from test_cli import REPO
    return subprocess.run([sys.executable, "-m", "nanochat.chat", str(run_dir), "--temperature", "0",
                           "--max-new-tokens", "6"], input=text, cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_chat_bad_input_is_one_line(trained_run, tmp_path):
    cases = [
        ([tmp_path / "missing", "-p", "hi"], "no checkpoint found"),
        ([tmp_path, "-p", "hi"], "no checkpoint found"),  # a directory, but not a run
        ([trained_run, "-p", "word " * 200], "context of 64 tokens"),
        ([trained_run, "-p", "hi", "--top-p", "1.5"], "top_p must be in (0, 1]"),
    ]
    for args, message in cases:
        assert message in error_line(run_cli("nanochat.chat", *args)), args


def test_a_compiled_engine_refuses_the_packed_lm_head_and_auto_avoids_it():
    model = make_model()
    with pytest.raises(UserError, match="packed lm_head can't be compiled"):
        Engine(model, compile=True, head="packed")
    assert Engine(model, compile=True).head_layout(8) != "packed"


def test_a_compiled_engine_decodes_like_the_naive_oracle_per_model():
    """Compiled (on CPU with inductor's freezing: weights become constants), two models in one
    process — each must decode with its own weights — and the bigram model: greedy rows equal
    the naive full recompute. The attended length grows every step, yet the step compiles once
    per model and batch size."""
    for model in (make_model(seed=1), make_model(seed=2), make_model(seed=3, bigram_factor=5)):
        before = compile_count()
        engine = Engine(model, compile=True)
        rows = engine.generate_batch(RAGGED, max_new_tokens=10, temperature=0)
        for prompt, row in zip(RAGGED, rows):
            assert row == list(model.generate_naive(prompt, 10)), f"prompt of {len(prompt)} tokens"
        engine.generate_batch([p[:2] for p in RAGGED], max_new_tokens=6, temperature=0)
        longer = engine.generate_batch([p * 2 for p in RAGGED], max_new_tokens=8, temperature=0)
        assert longer[2] == list(model.generate_naive(RAGGED[2] * 2, 8))
        assert compile_count() - before == 1


@pytest.mark.skipif(not mkl_packed_available(), reason="needs MKL's packed sgemm")
def test_compiled_cpu_step_runs_every_linear_through_mkl_packed_sgemm():
    """Freezing is on when dynamo traces (it is read there, not only by inductor): every matmul
    of the step — 4 per layer and the lm_head — runs as MKL's packed sgemm."""
    model = make_model(seed=4)
    engine = Engine(model, compile=True)
    engine.generate_batch([[1, 2, 3]], max_new_tokens=3, temperature=0)  # compiles
    with torch.profiler.profile() as prof:
        engine.generate_batch([[1, 2, 3]], max_new_tokens=3, temperature=0)
    calls = {e.key: e.count for e in prof.key_averages()}
    steps = 2  # the first token comes from the prefill, the last needs no further step
    assert calls.get("mkl::_mkl_linear", 0) == steps * (4 * model.config.n_layer + 1)


def test_argmax_first_is_torch_argmax_with_ties_infinities_and_nan():
    torch.manual_seed(0)
    x = torch.randn(6, 32768)
    x[1, 5000] = x[1, 30000] = 99.0           # a tie in different blocks: the first wins
    x[2, 130] = x[2, 129] = 99.0              # a tie inside one block
    x[3] = float("-inf")                      # all −inf: index 0, as torch.argmax
    x[4, 777] = float("inf")
    x[5, 12345] = float("nan")                # NaN counts as the maximum
    assert torch.equal(argmax_first(x), x.argmax(dim=-1, keepdim=True))
    odd = torch.randn(3, 300)                 # not a multiple of the block: plain argmax
    assert torch.equal(argmax_first(odd), odd.argmax(dim=-1, keepdim=True))
