"""The chunked loss (nanochat/loss.py): the unchunked loss's value and gradients for every
reduction, with ignored rows, in fp32 and under bf16 autocast, in the GPT and compiled, and no
tensor of rows × vocab elements anywhere in forward or backward."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nanochat.gpt import GPTConfig
from nanochat.loss import CHUNK_ELEMENTS, MAX_CHUNKS, chunked_loss, dense_loss, rows_per_chunk
from test_gpt import make_model

N, C, V = 150, 48, 700  # 150 rows: chunks of 32 leave a short last chunk


def inputs(seed=0, ignored_every=5):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, C, generator=g)
    w = torch.randn(V, C, generator=g) * 0.3  # logits of a few units: the softcap bends them
    t = torch.randint(0, V, (N,), generator=g)
    t[::ignored_every] = -1
    return h, w, t


def loss_and_grads(fn, h, w, t, upstream, **kw):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fn(h, w, t, **kw)
    (loss * upstream).sum().backward()
    return loss.detach(), h.grad, w.grad


def close(a, b, rtol, what):
    err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
    assert err <= rtol, f"{what}: relative error {err:.2e} > {rtol:.0e}"


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("cap", [15.0, 0.0])
@pytest.mark.parametrize("chunk", [32, 1, -1])
def test_chunked_equals_unchunked_loss_and_gradients(reduction, cap, chunk):
    h, w, t = inputs()
    # a non-trivial upstream gradient (per row for "none"): the backward must scale by it
    up = torch.linspace(0.5, 2.0, N) if reduction == "none" else torch.tensor(1.7)
    ref = loss_and_grads(dense_loss, h, w, t, up, cap=cap, reduction=reduction)
    got = loss_and_grads(chunked_loss, h, w, t, up, cap=cap, reduction=reduction, chunk_rows=chunk)
    for name, a, b in zip(("loss", "d hidden", "d lm_head weight"), got, ref):
        close(a, b, 1e-5, name)
    if reduction == "none":
        assert torch.all(got[0][::5] == 0), "ignored rows must have zero loss"


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_chunked_equals_unchunked_without_gradients(reduction):
    h, w, t = inputs(seed=1)
    with torch.no_grad():
        close(chunked_loss(h, w, t, 15.0, reduction, chunk_rows=32),
              dense_loss(h, w, t, 15.0, reduction), 1e-5, "loss")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_bf16_autocast_on_cpu_matches_the_unchunked_loss(reduction):
    """Under autocast both compute the lm_head matmul in bf16; the fp32 softcap/CE agree to
    bf16's rounding of the products, and the chunked path really runs in bf16 (its loss is
    not the fp32 one)."""
    h, w, t = inputs(seed=2)
    up = torch.linspace(0.5, 2.0, N) if reduction == "none" else torch.tensor(1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = loss_and_grads(dense_loss, h, w, t, up, cap=15.0, reduction=reduction)
        got = loss_and_grads(chunked_loss, h, w, t, up, cap=15.0, reduction=reduction, chunk_rows=32)
    fp32 = chunked_loss(h, w, t, 15.0, reduction, chunk_rows=32)
    assert got[1].dtype == h.dtype and got[2].dtype == w.dtype, "gradients in the inputs' dtypes"
    assert got[0].dtype == torch.float32, "the loss is fp32 under autocast, as before"
    for name, a, b in zip(("loss", "d hidden", "d lm_head weight"), got, ref):
        close(a, b, 2e-2, name)
    assert not torch.equal(got[0], fp32), "autocast must reach the chunked matmuls"


class LargestTensor(TorchDispatchMode):
    """Records the most elements of any tensor an op returns (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(o, torch.Tensor):
                self.largest = max(self.largest, o.numel())
        return out


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_tensor_of_rows_times_vocab_in_forward_or_backward(reduction):
    model = make_model(loss_chunk_rows=16).train()  # vocab 300; rows 4 × 32 = 128
    idx = torch.randint(0, 300, (4, 32))
    for chunk, expect_full in ((16, False), (0, True)):
        model.config.loss_chunk_rows = chunk
        with LargestTensor() as probe:
            model(idx, idx, loss_reduction=reduction).sum().backward()
        model.zero_grad()
        full = probe.largest >= 128 * 300
        assert full == expect_full, (f"chunk_rows={chunk}: largest tensor {probe.largest} "
                                     f"elements vs rows × vocab = {128 * 300}")


def test_gpt_loss_and_gradients_are_the_unchunked_ones():
    idx = torch.randint(0, 300, (3, 32))
    targets = idx.roll(-1, 1)
    targets[:, -5:] = -1
    results = []
    for chunk in (0, 16):
        model = make_model(loss_chunk_rows=chunk).train()
        loss = model(idx, targets)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = results
    close(l1, l0, 1e-5, "loss")
    for name in g0:
        close(g1[name], g0[name], 1e-4, f"grad of {name}")
    assert make_model()(idx).shape == (3, 32, 300), "no targets: the logits, as before"


def test_one_compiled_step_gives_the_eager_loss_and_gradients():
    idx = torch.randint(0, 300, (2, 32))
    eager, compiled = make_model(loss_chunk_rows=16).train(), make_model(loss_chunk_rows=16).train()
    loss = eager(idx, idx)
    loss.backward()
    torch._dynamo.reset()
    closs = torch.compile(compiled, dynamic=False)(idx, idx)
    closs.backward()
    close(closs.detach(), loss.detach(), 1e-5, "compiled loss")
    close(compiled.lm_head.weight.grad, eager.lm_head.weight.grad, 1e-4, "compiled lm_head grad")


def test_rows_per_chunk_bounds_memory_and_chunk_count():
    assert rows_per_chunk(1000, 300, 0) == 1000, "0 = one piece"
    assert rows_per_chunk(1000, 300, 64) == 64
    assert rows_per_chunk(10, 300, 64) == 10
    r = rows_per_chunk(8 * 2048, 65536)  # device batch 8 × 2048, vocab 65,536: 4.3 GB of logits
    assert r == CHUNK_ELEMENTS // 65536 == 512, "chunks of 128 MiB of fp32 logits"
    r = rows_per_chunk(64 * 2048, 65536)  # more rows: the chunk grows, the count stays bounded
    assert r > 512 and -(-64 * 2048 // r) == MAX_CHUNKS


def test_bad_reduction_is_rejected():
    h, w, t = inputs()
    with pytest.raises(ValueError, match="reduction must be one of mean, sum, none"):
        chunked_loss(h, w, t, 15.0, "avg")


def test_old_model_configs_default_to_the_automatic_chunk():
    cfg = GPTConfig(sequence_len=8, vocab_size=300, n_layer=1, n_head=1, n_kv_head=1, n_embd=8)
    assert cfg.loss_chunk_rows == -1
