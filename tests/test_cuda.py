"""The GPU paths on a real CUDA device: CUDA-graph and compiled decode against eager, bf16
training with fused AdamW, one compile under max-autotune, discovery by out-of-memory, GPU →
CPU checkpoints, the KV sweep, an NCCL process group. Marked `cuda` (`pytest -m cuda` runs only
these) and skipped without a CUDA device, so CI on CPU stays green;
`python -m bench.selftest` runs them first on a GPU node."""
import dataclasses
import socket

import pytest
import torch

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

from nanochat import checkpoint as ckpt  # noqa: E402
from nanochat.engine import Engine, build_inference_model  # noqa: E402
from nanochat.recipe import recipe_from_dict  # noqa: E402
from nanochat.runtime import compile_count  # noqa: E402
from nanochat.train import train_base  # noqa: E402
from nanochat.plots import read_jsonl  # noqa: E402
from test_train import stop_after  # noqa: E402
from test_gpt import make_model  # noqa: E402

RAGGED = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [42] * 12, [7]]


def cuda_recipe(tiny_recipe, tmp_path, **train):
    """The tiny test recipe on the GPU (bf16 autocast by the dtype rule)."""
    return recipe_from_dict({**tiny_recipe, "run_dir": str(tmp_path / "run"),
                             "train": {**tiny_recipe["train"], "device": "cuda", **train}})


def train_losses(run_dir):
    return [r["loss"] for r in read_jsonl(run_dir / "progress.jsonl") if r["event"] == "train"]


# ---------------------------------------------------------------- decode

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_decode_equals_eager_on_a_ragged_batch(dtype):
    model = build_inference_model(make_model().config, "cuda", dtype,
                                  {k: v.cuda() for k, v in make_model().state_dict().items()})
    eager = Engine(model).generate_batch(RAGGED, max_new_tokens=12, temperature=0)
    graph = Engine(model, cuda_graph=True)
    assert graph.generate_batch(RAGGED, max_new_tokens=12, temperature=0) == eager
    sampled = graph.generate_batch(RAGGED, max_new_tokens=12, temperature=1.0, seed=3)
    assert sampled == graph.generate_batch(RAGGED, max_new_tokens=12, temperature=1.0, seed=3)
    before = torch.cuda.memory_allocated()
    graph.generate_batch(RAGGED, max_new_tokens=12, temperature=0)
    assert torch.cuda.memory_allocated() == before, "a replayed step allocates nothing"


def test_cuda_graph_cache_is_rounded_so_a_growing_chat_captures_once():
    model = make_model().cuda()
    engine = Engine(model, cuda_graph=True)
    engine.generate_batch([[1, 2, 3]], max_new_tokens=5, temperature=0)
    graph, cache = engine._graph, engine.cache
    engine.generate_batch([[1, 2, 3, 4, 5, 6, 7, 8, 9]], max_new_tokens=20, temperature=0)
    assert engine.cache is cache and engine._graph is graph, "a longer turn must not recapture"


def test_compiled_decode_equals_eager():
    model = make_model().cuda()
    eager = Engine(model).generate_batch(RAGGED, max_new_tokens=12, temperature=0)
    assert Engine(model, compile=True).generate_batch(RAGGED, max_new_tokens=12, temperature=0) == eager


def test_inference_model_keeps_fp32_rotary_tables_in_bf16():
    model = build_inference_model(make_model().config, "cuda", torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.cos.dtype == torch.float32 and model.sin.dtype == torch.float32


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_cuda_graph_on_the_second_device_reads_fresh_tokens():
    model = make_model().to("cuda:1")
    eager = Engine(model).generate_batch(RAGGED, max_new_tokens=8, temperature=0)
    with torch.cuda.device(0):
        assert Engine(model, cuda_graph=True).generate_batch(RAGGED, max_new_tokens=8, temperature=0) == eager


# ---------------------------------------------------------------- training

def test_bf16_training_30_steps_falls_with_fused_adamw(tiny_recipe, tmp_path):
    from nanochat.optim import build_optimizers
    recipe = cuda_recipe(tiny_recipe, tmp_path, num_iterations=30, eval_every=-1)
    result = train_base(recipe)
    losses = train_losses(recipe.out_dir)
    assert len(losses) == 30 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, f"loss did not fall: {losses[:5]} → {losses[-5:]}"
    assert "bfloat16" in (recipe.out_dir / "run.json").read_text()
    model = make_model().cuda().train()
    adams = [o for o in build_optimizers(model.param_groups(), recipe.optim, 64,
                                         all_params=model.parameters(), local=True)
             if isinstance(o, torch.optim.AdamW)]
    assert adams and all(o.defaults.get("fused") for o in adams), "AdamW on CUDA must be fused"
    assert result["step"] == 30


def test_eval_val_bpb_on_cuda_is_the_training_curves(tiny_recipe, tmp_path):
    """eval.json's val_bpb of a bf16 CUDA run equals the training curve's last value: both from
    the fp32 weights under bf16 autocast (eval casts the model for generation only after)."""
    import json
    from nanochat.eval import evaluate_checkpoint
    recipe = cuda_recipe(tiny_recipe, tmp_path, num_iterations=6, eval_every=6)
    train_base(recipe)
    curve = [json.loads(line) for line in (recipe.out_dir / "progress.jsonl").read_text().splitlines()]
    last = [r["val_bpb"] for r in curve if r.get("event") == "eval" and "val_bpb" in r][-1]
    result = evaluate_checkpoint(recipe.out_dir, device="cuda", out=tmp_path / "e.json")
    assert result["val_bpb"] == pytest.approx(last, rel=1e-4)


@pytest.mark.slow
def test_max_autotune_no_cudagraphs_compiles_once_over_10_steps(tiny_recipe, tmp_path):
    recipe = cuda_recipe(tiny_recipe, tmp_path, num_iterations=10, eval_every=-1, compile=True,
                         compile_mode="max-autotune-no-cudagraphs")
    before = compile_count()
    train_base(recipe)
    assert compile_count() - before == 1


def test_checkpoint_saved_on_gpu_loads_on_cpu_and_resumes_exactly_on_gpu(tiny_recipe, tmp_path):
    from nanochat.engine import load_model
    straight = cuda_recipe(tiny_recipe, tmp_path / "a", num_iterations=20)
    train_base(straight)
    split = cuda_recipe(tiny_recipe, tmp_path / "b", num_iterations=20)
    train_base(split, stop_requested=stop_after(10))
    model, _, _ = load_model(split.out_dir, torch.device("cpu"))  # a GPU checkpoint on the CPU
    assert model.lm_head.weight.device.type == "cpu"
    train_base(split)
    assert train_losses(straight.out_dir) == train_losses(split.out_dir)
    a = ckpt.load_model_state(ckpt.latest_checkpoint(straight.out_dir))
    b = ckpt.load_model_state(ckpt.latest_checkpoint(split.out_dir))
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- discovery by out-of-memory

def test_discovery_under_a_memory_fraction_chooses_a_size_that_trains(tiny_recipe, tmp_path):
    from nanochat.batchsize.search import discover, legal_candidates, probe_spec, resolve_target
    from nanochat.batchsize.probe import run_probe
    _, total = torch.cuda.mem_get_info()
    fraction = min(0.9, 2 * 2**30 / total)  # ~2 GiB of the GPU: the bigger sizes must OOM
    torch.cuda.set_per_process_memory_fraction(fraction)
    try:
        recipe = recipe_from_dict({**tiny_recipe, "run_dir": str(tmp_path / "run"),
                                   "model": {"depth": 4, "n_embd": 256, "n_head": 2, "sequence_len": 1024},
                                   "tokenizer": {**tiny_recipe["tokenizer"]},
                                   "train": {**tiny_recipe["train"], "device": "cuda",
                                             "total_batch_size": 1024 * 1024, "device_batch_size": "auto"},
                                   "discovery": {"cache_dir": str(tmp_path / "bs"), "headroom": 0.0,
                                                 "max_batch_size": 1024}})
        d = discover(recipe, use_cache=False)
        spec = probe_spec(recipe, resolve_target(recipe))
        ok = run_probe(dataclasses.replace(spec, steps=5), d.batch_size)
        assert not ok["oom"], f"the chosen batch {d.batch_size} ran out of memory in 5 steps"
        bigger = [b for b in legal_candidates(1024 * 1024, 1024, 1, "pow2", 1, 1024) if b > d.batch_size]
        assert bigger, "the memory fraction should stop discovery below the largest candidate"
        assert run_probe(spec, bigger[0])["oom"], f"batch {bigger[0]} fits too: discovery stopped short"
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- sweep and process group

def test_kv_sweep_writes_its_files_on_cuda(tmp_path):
    from nanochat.kv_bench import sweep_for_recipe
    recipe = recipe_from_dict({"run_dir": str(tmp_path / "run"),
                               "model": {"depth": 2, "n_embd": 128, "n_head": 2, "sequence_len": 128,
                                         "vocab_size": 512},
                               "train": {"device": "cuda"},
                               "sweep": {"batch_sizes": [1, 4], "include_largest": False, "prompt_len": 8,
                                         "max_new_tokens": 16, "repeats": 1, "warmup": 1}})
    summary = sweep_for_recipe(recipe, out_dir=tmp_path / "sweep")
    for name in ("results.json", "results.csv", "results.md", "tokens_per_s.png"):
        assert (tmp_path / "sweep" / name).exists(), name
    assert summary["best_tok_per_s"] > 0


def test_one_rank_nccl_process_group_up_and_down(monkeypatch):
    import torch.distributed as dist
    from nanochat.config import TrainArgs
    from nanochat.runtime import runtime
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(k, v)
    t = torch.ones(4, device="cuda")
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda:0"))
    try:
        dist.all_reduce(t)
        assert dist.get_backend() == "nccl" and t.sum().item() == 4
    finally:
        dist.destroy_process_group()
    assert not dist.is_initialized()
    with runtime(TrainArgs(device="cuda")) as rt:  # the runtime's own set-up on one rank
        assert rt.device.type == "cuda" and rt.dtype == torch.bfloat16


def test_stop_agreement_never_synchronizes_with_the_device(monkeypatch):
    """trainer.StopAgreement at every step boundary, with a step's work queued between them,
    under `set_sync_debug_mode("error")`: no blocking copy, no `.item()` of a device tensor.
    A request at boundary 1 stops every rank at boundary 2 (one NCCL rank standing in for the
    group: the collective is the same call)."""
    import torch.distributed as dist
    from nanochat.runtime import DistInfo, Runtime
    from nanochat.trainer import StopAgreement
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda:0"))
    try:
        rt = Runtime(DistInfo(0, 0, 2), torch.device("cuda:0"), torch.bfloat16)
        asked = [False, True, False, False]
        agreement = StopAgreement(rt, lambda: asked[len(seen)])
        x = torch.randn(2048, 2048, device="cuda")
        seen = []
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                seen.append(agreement.stop_now())
                for _ in range(10):  # the step's work, queued
                    x = torch.tanh(x @ x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert seen == [False, False, True]
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- sliding windows (test_arch.py's CUDA half)

def test_compiled_flex_window_attention_equals_the_band_mask():
    """Under torch.compile on CUDA the window layers run flex_attention (unless flash_attn is
    installed); forward and gradients equal SDPA with the band mask."""
    from nanochat.attention import attention_backend, causal_attention, flash_attn_available
    if not flash_attn_available():
        assert attention_backend("cuda", True) == "flex"
    torch.manual_seed(0)
    shapes = [(2, 4, 512, 64), (2, 2, 512, 64), (2, 2, 512, 64)]
    q, k, v = (torch.randn(s, device="cuda", requires_grad=True) for s in shapes)
    flex = torch.compile(lambda q, k, v: causal_attention(q, k, v, 128, backend="flex"))
    got = flex(q, k, v)
    grads = torch.autograd.grad(got.square().sum(), (q, k, v))
    ref = causal_attention(q, k, v, 128, backend="sdpa")
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    torch.testing.assert_close(got, ref, rtol=2e-3, atol=2e-3)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)


def test_compiled_model_with_s_layers_breaks_the_graph_at_most_once():
    """The flex block masks are made once per forward, before the layers (their builder runs
    outside the graph): a model of three S layers compiles with at most one graph break, not
    one per S layer. With flash_attn installed (a supported release: a custom op) the same."""
    from nanochat.gpt import GPTConfig, build_model
    torch._dynamo.reset()
    cfg = GPTConfig(sequence_len=512, vocab_size=300, n_layer=4, n_head=4, n_kv_head=2, n_embd=64,
                    window_pattern="SSSL")
    model = build_model(cfg, "cuda")
    idx = torch.randint(0, 300, (2, 512), device="cuda")
    explained = torch._dynamo.explain(model)(idx, targets=idx.roll(-1, 1))
    assert explained.graph_break_count <= 1, explained.break_reasons


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_query_attention_with_a_mask_takes_the_kernels_layout(dtype):
    """GQA with a mask (decode steps, chunked and window prefill) folds the query groups into
    the length; CUDA's memory-efficient kernel returns a transposed layout, which the unfold
    must reshape (a view raised). Equals repeating the kv heads."""
    from nanochat.attention import attention
    torch.manual_seed(0)
    B, H, Hkv, T, L, D = 3, 8, 2, 5, 37, 64
    q = torch.randn(B, H, T, D, device="cuda", dtype=dtype)
    k, v = (torch.randn(B, Hkv, L, D, device="cuda", dtype=dtype) for _ in range(2))
    mask = torch.ones(T, L, dtype=torch.bool, device="cuda").tril(diagonal=L - T)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1), attn_mask=mask)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(attention(q, k, v, mask), ref, rtol=tol, atol=tol)


def test_compiled_training_with_every_switch_learns_on_cuda(tiny_recipe, tmp_path):
    """The tiny recipe with every switch on and windows shorter than its rows, compiled on the
    GPU (window layers through flex_attention): trains, the loss falls, run.json names it."""
    import json
    model = {**tiny_recipe["model"], "sequence_len": 256, "bigram_factor": 2, "value_embeds": True,
             "window_pattern": "SSL", "smear": True, "backout": True, "residual_scalars": True,
             "qk_gain": 1.2, "rotary_base": 100000.0}
    recipe = recipe_from_dict({**tiny_recipe, "run_dir": str(tmp_path / "run"), "model": model,
                               "train": {**tiny_recipe["train"], "device": "cuda", "compile": True,
                                         "total_batch_size": 2048, "num_iterations": 10}})
    train_base(recipe)
    losses = train_losses(recipe.out_dir)
    assert losses[-1] < losses[0]
    info = json.loads((recipe.out_dir / "run.json").read_text())
    assert info["attention"] in ("flex", "flash_attn")
    assert info["attention_ran"] == {"S": info["attention"], "L": "sdpa"}, "what ran is what was chosen"


def test_cuda_engine_with_every_switch_equals_naive_greedy():
    """Cache greedy == naive greedy on the GPU (fp32) with every switch, ring buffers, CUDA
    graph: ragged prompts past the window and past sequence_len."""
    from nanochat.gpt import GPTConfig, build_model
    torch.manual_seed(0)
    cfg = GPTConfig(sequence_len=256, vocab_size=300, n_layer=3, n_head=4, n_kv_head=2, n_embd=32,
                    bigram_factor=2, value_embeds=True, window_pattern="S", smear=True,
                    backout=True, residual_scalars=True, qk_gain=1.2, rotary_base=100000.0)
    model = build_model(cfg, "cuda")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    model.eval()
    prompts = [list(range(1, 211)), [7, 8, 9], [5] * 140]
    rows = Engine(model, cuda_graph=True).generate_batch(prompts, max_new_tokens=60, temperature=0.0)
    for i, p in enumerate(prompts):
        assert rows[i] == list(model.generate_naive(p, 60)), f"prompt {i}"
