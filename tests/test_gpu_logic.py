"""The parts of the GPU paths that a CPU can check: grouped-query attention in a shape the fused
kernels take, out-of-memory seen through compiler wrappers, the datasheet peak table and MFU,
the recompile-limit name across torch versions, the graph cache's rounding, fp32 rotary tables
in bf16 inference models. The GPU itself is tests/test_cuda.py's."""
import types

import pytest
import torch
import torch.nn.functional as F

from nanochat.decode import CACHE_STEP, recompile_limit_name, recompile_limit_patch
from nanochat.engine import Engine, build_inference_model, graph_cache_len
from nanochat.gpt import attention
from nanochat.batchsize.probe import is_oom
from nanochat.runtime import datasheet_peak, mfu_percent
from test_gpt import make_model


# ---------------------------------------------------------------- attention

def reference_gqa(q, k, v, mask):
    G = q.size(1) // k.size(1)
    return F.scaled_dot_product_attention(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1),
                                          attn_mask=mask)


@pytest.mark.parametrize("T,mask_shape", [(1, "decode"), (5, "chunk")])
def test_folded_gqa_attention_equals_repeated_kv_heads(T, mask_shape):
    torch.manual_seed(0)
    B, H, Hkv, L, D = 3, 8, 2, 11, 16
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, Hkv, L, D), torch.randn(B, Hkv, L, D)
    if mask_shape == "decode":  # per-row lengths, one query position: (B, 1, 1, L)
        lengths = torch.tensor([3, 11, 7])
        mask = (torch.arange(L) < lengths.view(B, 1)).view(B, 1, 1, L)
    else:  # a chunk of T after a prefix: (T, L)
        mask = torch.ones(T, L, dtype=torch.bool).tril(diagonal=L - T)
    got = attention(q, k, v, mask)
    assert got.shape == (B, H, T, D)
    torch.testing.assert_close(got, reference_gqa(q, k, v, mask), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("T", [1, 5])
def test_folded_gqa_attention_takes_sdpa_output_in_any_layout(T, monkeypatch):
    """CUDA's memory-efficient SDPA kernel returns its output as a transposed layout of
    (B, Hkv, G·T, D) — (B, G·T, Hkv, D) in memory. Unfolding the groups from such a tensor
    cannot be a view (Hkv and G do not merge): the fold must reshape. Here the CPU's SDPA is
    made to hand back the same values in that layout."""
    sdpa = F.scaled_dot_product_attention

    def transposed_layout(*args, **kw):
        y = sdpa(*args, **kw)
        return y.transpose(1, 2).contiguous().transpose(1, 2)  # same values, CUDA's strides

    torch.manual_seed(0)
    B, H, Hkv, L, D = 2, 8, 2, 9, 16
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, Hkv, L, D), torch.randn(B, Hkv, L, D)
    mask = torch.ones(T, L, dtype=torch.bool).tril(diagonal=L - T)
    expected = attention(q, k, v, mask)
    monkeypatch.setattr(F, "scaled_dot_product_attention", transposed_layout)
    torch.testing.assert_close(attention(q, k, v, mask), expected, rtol=0, atol=0)


def test_unmasked_attention_keeps_sdpa_causal_path():
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    expected = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                              is_causal=True)
    torch.testing.assert_close(attention(q, k, v, is_causal=True), expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- out of memory, wrapped

class BackendCompilerFailed(Exception):
    """Stands in for torch._dynamo.exc.BackendCompilerFailed: how dynamo re-raises."""

    def __init__(self, inner):
        super().__init__(f"backend='inductor' raised: {inner}")
        self.inner_exception = inner


def raise_like_dynamo(inner: BaseException):
    try:
        raise inner
    except BaseException as e:
        raise BackendCompilerFailed(e) from None  # hides it from __cause__


@pytest.mark.parametrize("inner", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("Triton Error [CUDA]: out of memory"),
    RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"),
])
def test_oom_raised_while_compiling_is_still_an_oom(inner):
    assert is_oom(inner)
    with pytest.raises(BackendCompilerFailed) as caught:
        raise_like_dynamo(inner)
    assert caught.value.__cause__ is None
    assert is_oom(caught.value), "an OOM behind `from None` must still count"
    bare = BackendCompilerFailed(inner)  # only inner_exception links them
    assert is_oom(bare)


def test_errors_that_are_not_oom_stay_errors():
    for e in (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), ValueError("out of memory"),
              RuntimeError("CUDA error: an illegal memory access was encountered")):
        assert not is_oom(e)
    with pytest.raises(BackendCompilerFailed) as caught:
        raise_like_dynamo(RuntimeError("shape mismatch"))
    assert not is_oom(caught.value)


def test_a_cycle_of_exceptions_terminates():
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__context__, b.__context__ = b, a
    assert not is_oom(a)


# ---------------------------------------------------------------- peaks and MFU

@pytest.mark.parametrize("name,dtype,flops,part", [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989e12, "H100"),
    ("NVIDIA H100 PCIe", torch.bfloat16, 756e12, "H100 PCIe"),
    ("NVIDIA H100 NVL", torch.bfloat16, 835e12, "H100 NVL"),
    ("NVIDIA H200", torch.bfloat16, 989e12, "H200"),
    ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312e12, "A100"),
    ("NVIDIA A100-PCIE-40GB", torch.float32, 156e12, "A100 (TF32)"),
    ("NVIDIA H100 80GB HBM3", torch.float32, 494.5e12, "H100 (TF32)"),
    ("NVIDIA L40S", torch.bfloat16, 362e12, "L40S"),
])
def test_datasheet_peaks_match_the_specific_part_first(name, dtype, flops, part):
    assert datasheet_peak(name, dtype) == (flops, f"datasheet {part}")


def test_unknown_gpus_have_no_datasheet_peak():
    assert datasheet_peak("NVIDIA GeForce RTX 3090", torch.bfloat16) is None
    assert datasheet_peak("NVIDIA H100 80GB HBM3", torch.float16) is None


def test_mfu_is_model_flops_over_the_peak_of_all_ranks():
    # d12-like: 6 × 110M params ≈ 6.6e8 FLOPs/token at 400k tok/s on 8 H100s
    assert mfu_percent(6.6e8, 4.0e5 * 8, 989e12, 8) == pytest.approx(100 * 6.6e8 * 4.0e5 / 989e12)
    assert mfu_percent(1e9, 1e5, 1e15) == pytest.approx(10.0)


# ---------------------------------------------------------------- compile and capture bookkeeping

def test_recompile_limit_has_the_name_this_torch_knows():
    assert recompile_limit_name(types.SimpleNamespace(recompile_limit=8, cache_size_limit=8)) == "recompile_limit"
    assert recompile_limit_name(types.SimpleNamespace(cache_size_limit=8)) == "cache_size_limit"  # torch < 2.7
    import torch._dynamo
    name = recompile_limit_name(torch._dynamo.config)
    before = getattr(torch._dynamo.config, name)
    with recompile_limit_patch(99):
        assert getattr(torch._dynamo.config, name) == 99
    assert getattr(torch._dynamo.config, name) == before


def test_graph_cache_grows_in_steps_and_a_compiled_engine_reuses_it():
    assert graph_cache_len(1, 10_000) == CACHE_STEP
    assert graph_cache_len(CACHE_STEP + 1, 10_000) == 2 * CACHE_STEP
    assert graph_cache_len(300, 200) == 200, "never past the rotary table"
    engine = Engine(make_model(), compile=True)  # no compile happens before a step runs
    first = engine._ensure_cache(2, 37)
    assert first.max_len == CACHE_STEP
    assert engine._ensure_cache(2, 100) is first, "a longer request within the step reuses the cache"
    assert engine._ensure_cache(2, CACHE_STEP + 1).max_len == 2 * CACHE_STEP


def test_bf16_inference_model_keeps_fp32_rotary_tables():
    model = make_model()
    bf16 = build_inference_model(model.config, "cpu", torch.bfloat16, model.state_dict())
    assert bf16.lm_head.weight.dtype == torch.bfloat16
    assert bf16.cos.dtype == torch.float32 and bf16.sin.dtype == torch.float32
    torch.testing.assert_close(bf16.cos, model.cos)
    rows = Engine(bf16).generate_batch([[1, 2, 3]], max_new_tokens=4, temperature=0)
    assert len(rows[0]) == 4


# ---------------------------------------------------------------- train.dtype off CUDA

def test_a_bf16_recipe_computes_in_bf16_on_the_cpu_too():
    """train.dtype: bfloat16 on the CPU autocasts (it trained in fp32 while run.json said
    bfloat16); a device without autocast here refuses it in one line naming the key."""
    from nanochat.common import UserError
    from nanochat.runtime import DistInfo, Runtime, compute_dtype
    cpu = torch.device("cpu")
    rt = Runtime(DistInfo(), cpu, compute_dtype(cpu, "bfloat16"))
    with rt.autocast():
        y = torch.randn(4, 8) @ torch.randn(8, 4)
    assert rt.dtype == torch.bfloat16 and y.dtype == torch.bfloat16
    assert compute_dtype(cpu, "auto") == torch.float32
    with pytest.raises(UserError, match="train.dtype=bfloat16 is not supported on mps"):
        compute_dtype(torch.device("mps"), "bfloat16")


# ---------------------------------------------------------------- allocator, headroom, TF32

STAGES = ("nanochat.train", "nanochat.sft", "nanochat.eval", "nanochat.chat",
          "nanochat.batchsize.__main__", "bench.throughput", "bench.decode_modes")


def test_every_stage_sets_the_expandable_allocator_on_import():
    """Each stage's module, imported alone in a fresh process (as `python -m` runs it, before it
    touches CUDA), sets PYTORCH_ALLOC_CONF=expandable_segments:True — and keeps a user's own."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")}
    code = ("import importlib, os, sys; importlib.import_module(sys.argv[1]); "
            "print(os.environ.get('PYTORCH_ALLOC_CONF'))")
    procs = {m: subprocess.Popen([sys.executable, "-c", code, m], cwd=repo, env=env, text=True,
                                 stdout=subprocess.PIPE) for m in STAGES}
    got = {m: p.communicate(timeout=120)[0].strip() for m, p in procs.items()}
    assert got == {m: "expandable_segments:True" for m in STAGES}
    from nanochat.runtime import set_cuda_allocator
    mine = {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}
    set_cuda_allocator(mine)
    assert mine == {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}


def test_discovery_leaves_room_for_the_cuda_context_and_nccl():
    """On a GPU the probes' peak (the allocator's reserve) may fill the capacity less the
    headroom, the CUDA context, and with several ranks NCCL's buffers; a CPU budget is the
    capacity less the headroom."""
    from nanochat.batchsize.search import CUDA_CONTEXT_BYTES, NCCL_BUFFER_BYTES, usable_bytes
    from nanochat.batchsize.devices import Target
    gpu = Target(torch.device("cuda"), "NVIDIA H100 80GB HBM3", 80 * 2**30, "memory")
    assert usable_bytes(gpu, 0.1, 1) == 72 * 2**30 - CUDA_CONTEXT_BYTES
    assert usable_bytes(gpu, 0.1, 8) == 72 * 2**30 - CUDA_CONTEXT_BYTES - NCCL_BUFFER_BYTES
    cpu = Target(torch.device("cpu"), "cpu", 10 * 2**30, "budget")
    assert usable_bytes(cpu, 0.1, 2) == 9 * 2**30


def test_tf32_matmuls_are_set_with_the_precision_api_not_the_legacy_flag():
    """torch ≥ 2.9 refuses to mix `allow_tf32` with the `fp32_precision` settings: the runtime
    uses set_float32_matmul_precision("high"), as upstream, and no module sets the old flag."""
    from pathlib import Path
    from nanochat.runtime import cuda_matmul_precision
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        cuda_matmul_precision()
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)
    src = Path(__file__).resolve().parents[1] / "nanochat"
    assert not [p for p in src.rglob("*.py") if "allow_tf32 =" in p.read_text()]
