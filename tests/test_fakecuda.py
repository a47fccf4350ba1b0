"""The CUDA path without a GPU: the real model, optimizer step, decode step and CORE's forward on
*fake* CUDA tensors (torch's FakeTensorMode: shapes, dtypes and devices, no data, no kernels)
under CUDA bf16 autocast, at upstream's d12 shape and sequence 2048.

Autocast's CUDA rules differ from the CPU's (F.rms_norm is on CUDA's fp32 list, not the CPU's),
so only here does a CPU-only machine see what a GPU's forward feeds its kernels. Needs the CUDA
build of torch (the CPU wheel refuses `cuda` devices): .ci/run runs this file in its second
environment (`pytest -m fakecuda`); under the CPU wheel it skips. `torch.autocast("cuda")` turns
itself off without a device, so the fixture switches CUDA autocast on directly.

The backward cannot run here: the autograd engine asks the CUDA driver for the device's primary
context ("hasPrimaryContext expects a valid device index"), and so does make_fx of the joint
graph. What a step needs of it is checked another way: every trainable parameter is reachable
from the loss's graph (so each gets a gradient of its own shape and dtype, which AccumulateGrad
guarantees), the tensors the forward saves for backward are counted (the activation memory a
micro-batch holds), and the optimizer steps on fake gradients of the parameters' shapes and
dtypes. Kernels, CUDA graphs, NCCL and timings stay with tests/test_cuda.py (a real GPU)."""
import contextlib
import importlib.machinery
import sys
import types

import pytest
import torch

pytestmark = [pytest.mark.fakecuda,
              pytest.mark.skipif(torch.version.cuda is None,
                                 reason="fake CUDA needs the CUDA build of torch (.ci/run's fakecuda lane)")]

from nanochat import attention  # noqa: E402
from nanochat.config import ModelArgs  # noqa: E402
from nanochat.gpt import GPT, GPTConfig  # noqa: E402

SEQ, VOCAB = 2048, 32768
D12 = ModelArgs(depth=12, sequence_len=SEQ, window_pattern="SSSL", value_embeds=True)


@contextlib.contextmanager
def fake_cuda(dtype=torch.bfloat16):
    """Fake tensors, CUDA autocast on in `dtype` (restored after)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    was = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    with FakeTensorMode(allow_non_fake_inputs=True):
        torch.set_autocast_enabled("cuda", True)
        torch.set_autocast_dtype("cuda", dtype)
        torch.autocast_increment_nesting()
        try:
            yield
        finally:
            torch.autocast_decrement_nesting()
            torch.clear_autocast_cache()
            torch.set_autocast_enabled("cuda", was[0])
            torch.set_autocast_dtype("cuda", was[1])


def fake_model(args: ModelArgs = D12) -> GPT:
    """The d12 GPT on fake CUDA (built directly there: to_empty from meta can't swap fakes)."""
    with torch.device("cuda"):
        model = GPT(GPTConfig.from_args(args, VOCAB))
    model.init_weights()
    return model


class KernelCalls(torch.overrides.TorchFunctionMode):
    """Every SDPA call: its name, the dtypes of q, k, v and its mask's shape."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "scaled_dot_product_attention":
            q, k, v = args[:3]
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            self.calls.append((name, q.dtype, k.dtype, v.dtype,
                               None if mask is None else tuple(mask.shape)))
        return func(*args, **kwargs)


@pytest.fixture
def flash_stub(monkeypatch):
    """A `flash_attn` package whose flash_attn_func records its inputs and returns an output of
    the right shape: which layers reach it, in which dtypes (no kernel runs on fake tensors)."""
    calls = []

    def flash_attn_func(q, k, v, causal=False, window_size=(-1, -1)):
        calls.append((q.dtype, k.dtype, v.dtype, tuple(q.shape), window_size))
        return torch.empty_like(q)
    mod = types.ModuleType("flash_attn")
    mod.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
    mod.__version__ = "2.7.4"  # a supported release (attention.FLASH_ATTN_MIN)
    mod.flash_attn_func = flash_attn_func
    monkeypatch.setitem(sys.modules, "flash_attn", mod)
    return calls


def n_short_layers(config: GPTConfig) -> int:
    return sum(w < config.sequence_len for w in config.windows())


def test_every_layer_feeds_attention_one_dtype_under_cuda_autocast():
    """Under CUDA bf16 autocast q and k leave QK-norm (F.rms_norm: autocast's fp32 list) in
    fp32 and v (with the value embedding added) too: each must reach attention in bf16."""
    attention.RAN.clear()
    with fake_cuda():
        model = fake_model()
        idx = torch.randint(0, VOCAB, (1, SEQ), device="cuda")
        with KernelCalls() as seen:
            loss = model(idx, idx)
    assert loss.dtype == torch.float32 and loss.device.type == "cuda"
    assert len(seen.calls) == model.config.n_layer
    for name, q, k, v, _ in seen.calls:
        assert (q, k, v) == (torch.bfloat16,) * 3, seen.calls
    assert attention.RAN == {"S": "sdpa", "L": "sdpa"}


def test_flash_attn_runs_every_window_layer_and_no_layer_makes_a_t_by_t_mask(flash_stub):
    """With flash_attn installed each "S" layer calls it once, in bf16, with its window; the
    full-context layers run SDPA's causal kernel; no (T, T) mask is made at T = 2048."""
    attention.RAN.clear()
    with fake_cuda():
        model = fake_model()
        idx = torch.randint(0, VOCAB, (2, SEQ), device="cuda")
        with KernelCalls() as seen:
            model(idx, idx)
    short = n_short_layers(model.config)
    assert short == 9 and len(flash_stub) == short, flash_stub
    assert {c[:3] for c in flash_stub} == {(torch.bfloat16,) * 3}
    assert {c[4] for c in flash_stub} == {(attention.short_window(SEQ), 0)}
    assert [c[4] for c in seen.calls] == [None] * (model.config.n_layer - short), seen.calls
    assert attention.RAN == {"S": "flash_attn", "L": "sdpa"}


def test_flex_window_layers_get_block_masks_not_a_t_by_t_mask(monkeypatch):
    """flex (CUDA under torch.compile; chosen here as compile would) gets bf16 q, k, v and the
    window's block mask, made once per forward; SDPA runs only the full-context layers,
    unmasked. (flex's own kernel is compiled Triton: recorded here, not run.)"""
    import torch.nn.attention.flex_attention as flex_mod
    flex = []

    def flex_attention(q, k, v, block_mask=None, enable_gqa=False):
        flex.append((q.dtype, k.dtype, v.dtype, block_mask.seq_lengths))
        return torch.empty_like(q)
    monkeypatch.setattr(flex_mod, "flex_attention", flex_attention)
    monkeypatch.setattr(attention, "attention_backend", lambda device, compiled: "flex")
    attention.RAN.clear()
    with fake_cuda():
        model = fake_model()
        idx = torch.randint(0, VOCAB, (1, SEQ), device="cuda")
        with KernelCalls() as seen:
            model(idx, idx)
    assert len(flex) == n_short_layers(model.config)
    assert set(flex) == {(torch.bfloat16, torch.bfloat16, torch.bfloat16, (SEQ, SEQ))}
    assert [c[4] for c in seen.calls] == [None] * (model.config.n_layer - len(flex))
    assert attention.RAN == {"S": "flex", "L": "sdpa"}


def _reached_parameters(loss: torch.Tensor) -> set[int]:
    """ids of the leaf tensors the loss's autograd graph accumulates into (AccumulateGrad)."""
    seen, found, todo = set(), set(), [loss.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):
            found.add(id(fn.variable))
        todo.extend(nxt for nxt, _ in fn.next_functions)
    return found


def _saved_bytes(model: GPT, batch: int) -> int:
    """Bytes of the distinct tensors one forward saves for its backward (parameters excluded:
    they are the fixed part): the activation memory a micro-batch of `batch` rows holds."""
    from torch.multiprocessing.reductions import StorageWeakRef
    params = {StorageWeakRef(p.untyped_storage()) for p in model.parameters()}
    storages: dict = {}

    def pack(t):
        ref = StorageWeakRef(t.untyped_storage())
        if ref not in params:
            storages[ref] = t.untyped_storage().nbytes()
        return t
    idx = torch.randint(0, VOCAB, (batch, SEQ), device="cuda")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(idx, idx)
    del loss
    return sum(storages.values())


def test_a_training_step_on_fake_cuda_keeps_every_dtype():
    """The loss's graph reaches every trainable parameter; after an optimizer step on
    gradients of the parameters' shapes and dtypes, parameters, gradients and optimizer state
    are fp32 (autocast computes in bf16, the master weights and Adam/Muon state stay fp32)."""
    from nanochat.optim import build_optimizers, optimizer_step
    from nanochat.optim_config import OptimArgs
    with fake_cuda():
        model = fake_model()
        idx = torch.randint(0, VOCAB, (1, SEQ), device="cuda")
        loss = model(idx, idx)
        params = [p for p in model.parameters() if p.requires_grad]
        assert _reached_parameters(loss) == {id(p) for p in params}
        optimizers = build_optimizers(model.param_groups(), OptimArgs(), model.config.n_embd,
                                      all_params=model.parameters())
        for p in params:
            p.grad = torch.zeros_like(p)
        grads = {p.grad.dtype for p in params}
        optimizer_step(params, optimizers, grad_clip=0.0, set_to_none=False)
    assert grads == {torch.float32}
    assert {p.dtype for p in params} == {torch.float32}
    assert {p.device.type for p in params} == {"cuda"}
    states = [v for opt in optimizers for st in opt.state.values() for v in st.values()
              if isinstance(v, torch.Tensor) and v.numel() > 1]
    assert states and {s.dtype for s in states} == {torch.float32}, {s.dtype for s in states}


def test_micro_batch_memory_is_the_line_discovery_extrapolates():
    """Discovery fits peak = fixed + batch × per_row through two probes and extrapolates
    (batch_size._line): on fake CUDA the memory a micro-batch holds — weights, gradients and
    optimizer state (fixed) plus what the forward saves for backward — is that line at d12,
    sequence 2048, under bf16 autocast (the real kernels' workspaces are a GPU's to measure)."""
    from nanochat.batchsize.search import _line
    with fake_cuda():
        model = fake_model()
        # weights, their gradients, one optimizer state of their size (the line's intercept)
        fixed = 3 * sum(p.numel() * p.element_size() for p in model.parameters())
        probes = [{"batch": b, "peak_bytes": fixed + _saved_bytes(model, b)} for b in (1, 2, 4)]
    line = _line(probes[0], probes[1])
    assert line is not None and line[1] > 0
    assert line[0] + 4 * line[1] == pytest.approx(probes[2]["peak_bytes"], rel=0.01), (line, probes)
    print(f"d12, sequence {SEQ}, bf16 autocast on fake CUDA: fixed {line[0] / 2**30:.3f} GiB, "
          f"{line[1] / 2**30:.3f} GiB per row saved for backward (SDPA's math kernel's choice here)")


def test_core_forward_at_a_width_past_the_context_runs_bf16_attention():
    """CORE scores rows wider than the training context (up to the rotary table) through
    hidden_states and logits at the scored positions: bf16 attention, fp32 logits."""
    attention.RAN.clear()
    with fake_cuda():
        model = fake_model().eval()
        with torch.inference_mode(), KernelCalls() as seen:
            idx = torch.randint(0, VOCAB, (2, SEQ + 512), device="cuda")
            h = model.hidden_states(idx)
            logits = model.logits(h[:, -7:])
    assert logits.dtype == torch.float32 and logits.shape == (2, 7, VOCAB)
    assert {c[1:4] for c in seen.calls} == {(torch.bfloat16,) * 3}
    assert len(attention._BAND_MASKS) <= attention.MASK_CACHE_ENTRIES


def test_the_decode_step_matches_its_capture_in_shapes_and_dtypes():
    """Generation casts the model to bf16 (no autocast); the decode step the CUDA graph
    captures (no attend length) and the eager one (the cache's key positions) give the same
    (B, V) fp32 logits and leave the bf16 cache in place."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    # built in bf16, as engine.cast_for_inference leaves it (whose model.to() swaps fakes in
    # place, which a weakref on them refuses): bf16 weights, fp32 rotary tables, eval mode
    default = torch.get_default_dtype()
    with FakeTensorMode(allow_non_fake_inputs=True), torch.inference_mode():
        torch.set_default_dtype(torch.bfloat16)
        try:
            model = fake_model()
        finally:
            torch.set_default_dtype(default)
        model.cos, model.sin = model.rotary_tables(device="cuda")
        _decode_step_shapes(model.eval())


def _decode_step_shapes(model) -> None:
    from nanochat.engine import Engine
    from nanochat.kv_cache import KVCache
    B = 4
    cache = KVCache(B, 1024, model.config, torch.device("cuda"), torch.bfloat16, ring=True)
    held = lambda: [(t.shape, t.dtype) for t in (cache.k, cache.v, cache.k_ring, cache.v_ring)]  # noqa: E731
    before = held()
    tok = torch.zeros(B, 1, dtype=torch.long, device="cuda")
    step = Engine(model)._step_call(B)
    captured = step(tok, cache, None)
    eager = step(tok, cache, cache.key_pos[:8])
    assert captured.shape == eager.shape and captured.dtype == eager.dtype == torch.float32
    assert captured.shape[0] == B and captured.shape[-1] == VOCAB
    assert held() == before and {d for _, d in before} == {torch.bfloat16}


def test_every_module_imports_under_the_cuda_build():
    """An API present only in the CPU wheel (or only in newer torch) fails here."""
    import importlib
    import pkgutil

    import nanochat
    names = [m.name for m in pkgutil.walk_packages(nanochat.__path__, "nanochat.")]
    for name in names:
        importlib.import_module(name)
    assert len(names) > 40
