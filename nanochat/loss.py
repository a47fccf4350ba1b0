"""The language-model loss without the whole (rows × vocab) fp32 logits.

`lm_head → float → softcap → cross-entropy` over B·T rows at once materialises several
rows × vocab fp32 tensors (logits, tanh, softmax, their gradients): at device batch 32,
sequence 2048 and vocab 65,536 each is 17 GB, and upstream users run out of memory on exactly
that (karpathy/nanochat#443). `chunked_loss` computes the same loss in chunks of rows, so at
most one chunk's logits exist at a time.

Training (mean or sum): each chunk's gradient is computed in the forward pass, as Liger-Kernel's
fused linear cross-entropy does (Hsu et al. 2024, arXiv 2410.10989): the gradient of a mean/sum
loss w.r.t. the logits does not depend on the upstream gradient except for one scalar factor,
so forward can finish dlogits, fold it into d(hidden) and d(lm_head weight) and drop it. That is
the same three matmuls per chunk as the unchunked step (logits, dhidden, dweight) — recomputing
the logits in backward instead would add a fourth, and at the d4 shape the lm_head is most of
the model's FLOPs. `reduction="none"` with gradients can't fold a per-row upstream gradient into
d(weight) in advance, so it keeps each row's logsumexp and recomputes the chunk in backward.

Without gradients (evaluation) the chunks compute the per-row loss only, in place.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = -1           # target value of rows that carry no loss
CHUNK_ELEMENTS = 2 ** 25    # fp32 logits per chunk: 128 MiB (a few such buffers live at once)
MAX_CHUNKS = 32             # torch.compile unrolls the chunk loop: bound the graph's size
REDUCTIONS = ("mean", "sum", "none")


def softcap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """cap · tanh(logits / cap): bounds the logits (Gemma 2; modded-nanogpt); cap ≤ 0 = off.
    Without autograd the same ops run in place: no new vocab-sized buffers."""
    if cap <= 0:
        return logits
    if torch.is_grad_enabled() and logits.requires_grad:
        return cap * torch.tanh(logits / cap)
    return logits.div_(cap).tanh_().mul_(cap)


def rows_per_chunk(rows: int, vocab: int, requested: int = -1) -> int:
    """Rows per chunk: `requested` if > 0; 0 = all rows in one piece (the unchunked loss); -1 =
    auto: chunks of at most CHUNK_ELEMENTS logits, and at most MAX_CHUNKS chunks."""
    if requested == 0:
        return max(rows, 1)
    if requested > 0:
        return min(requested, max(rows, 1))
    by_memory = max(1, CHUNK_ELEMENTS // vocab)
    return max(1, min(rows, max(by_memory, math.ceil(rows / MAX_CHUNKS))))


def dense_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, cap: float,
               reduction: str = "mean") -> torch.Tensor:
    """The unchunked loss (GPT.forward before chunking): the correctness oracle of
    `chunked_loss` and the "before" of docs/benchmarks.md's loss figures. h (N, C), targets (N,)."""
    logits = softcap(F.linear(h, weight).float(), cap)
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction=reduction)


def _compute_dtype(h: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    # what F.linear would compute in: autocast's dtype where autocast is on (CPU too), else
    # the operands' own
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(h.dtype, weight.dtype)


def _chunk_loss(logits: torch.Tensor, tgt: torch.Tensor, cap: float, want_grad: bool):
    """Per-row loss of one chunk of fp32 `logits` (overwritten), and with `want_grad` the
    gradient of each row's loss w.r.t. the raw logits (softmax − onehot, times the softcap's
    derivative 1 − tanh², zero on ignored rows); also the rows' logsumexp."""
    if cap > 0:
        t = logits.div_(cap).tanh_()      # tanh(l / cap), in the logits' buffer
        z = t * cap
    else:
        t, z = None, logits
    lse = torch.logsumexp(z, dim=-1)
    valid = tgt != IGNORE_INDEX
    safe = torch.where(valid, tgt, 0).unsqueeze(1)
    loss = torch.where(valid, lse - z.gather(1, safe).squeeze(1), 0.0)
    if not want_grad:
        return loss, None, lse
    d = z.sub_(lse.unsqueeze(1)).exp_()  # softmax, in z's buffer (our own in both cases)
    d.scatter_add_(1, safe, torch.full_like(safe, -1, dtype=d.dtype))
    d.mul_(valid.unsqueeze(1).to(d.dtype))
    if t is not None:
        d.mul_(t.square_().neg_().add_(1.0))  # d(cap·tanh(l/cap))/dl = 1 − tanh²
    return loss, d, lse


class _FusedMeanSum(torch.autograd.Function):
    """mean/sum loss; forward computes d(h) and d(weight) chunk by chunk (see module doc)."""

    @staticmethod
    def forward(ctx, h, weight, targets, cap: float, reduction: str, rows: int, dtype):
        with torch.autocast(h.device.type, enabled=False):
            hc, wc = h.to(dtype), weight.to(dtype)
            count = (targets != IGNORE_INDEX).sum()
            scale = (1.0 / count.to(torch.float32)) if reduction == "mean" else None
            grad_h = torch.empty(h.shape, dtype=dtype, device=h.device)
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            for s in range(0, h.size(0), rows):
                hs = hc[s:s + rows]
                loss, d, _ = _chunk_loss(F.linear(hs, wc).float(), targets[s:s + rows], cap, True)
                total = total + loss.sum()
                if scale is not None:
                    d.mul_(scale)
                d = d.to(dtype)
                grad_h[s:s + rows] = d @ wc
                grad_w.add_((d.t() @ hs).float())
            out = total * scale if scale is not None else total
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (h.dtype, weight.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        return ((grad_h * grad_out).to(h_dtype), (grad_w * grad_out).to(w_dtype),
                None, None, None, None, None)


class _RecomputeNone(torch.autograd.Function):
    """reduction="none" with gradients: keeps each row's logsumexp, recomputes chunks in backward."""

    @staticmethod
    def forward(ctx, h, weight, targets, cap: float, rows: int, dtype):
        with torch.autocast(h.device.type, enabled=False):
            hc, wc = h.to(dtype), weight.to(dtype)
            losses = [_chunk_loss(F.linear(hc[s:s + rows], wc).float(), targets[s:s + rows],
                                  cap, False)[0] for s in range(0, h.size(0), rows)]
        ctx.save_for_backward(h, weight, targets)
        ctx.args = (cap, rows, dtype)
        return torch.cat(losses)

    @staticmethod
    def backward(ctx, grad_out):
        h, weight, targets = ctx.saved_tensors
        cap, rows, dtype = ctx.args
        with torch.autocast(h.device.type, enabled=False):
            hc, wc = h.to(dtype), weight.to(dtype)
            grad_h = torch.empty(h.shape, dtype=dtype, device=h.device)
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            for s in range(0, h.size(0), rows):
                hs = hc[s:s + rows]
                _, d, _ = _chunk_loss(F.linear(hs, wc).float(), targets[s:s + rows], cap, True)
                d = d.mul_(grad_out[s:s + rows].unsqueeze(1).float()).to(dtype)
                grad_h[s:s + rows] = d @ wc
                grad_w.add_((d.t() @ hs).float())
        return grad_h.to(h.dtype), grad_w.to(weight.dtype), None, None, None, None


def chunked_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, cap: float,
                 reduction: str = "mean", chunk_rows: int = -1) -> torch.Tensor:
    """cross_entropy(softcap(h @ weightᵀ in fp32), targets) — `dense_loss`'s value and gradients
    (w.r.t. h and weight) — in chunks of `rows_per_chunk(chunk_rows)` rows. h (N, C) or
    (B, T, C); targets of the same leading shape, IGNORE_INDEX rows ignored; reduction mean
    (over the rows not ignored), sum, or none (one loss per row, flattened)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    h = h.reshape(-1, h.size(-1))
    targets = targets.reshape(-1)
    rows = rows_per_chunk(h.size(0), weight.size(0), chunk_rows)
    if chunk_rows == 0:
        return dense_loss(h, weight, targets, cap, reduction)
    dtype = _compute_dtype(h, weight)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        if reduction == "none":
            return _RecomputeNone.apply(h, weight, targets, cap, rows, dtype)
        return _FusedMeanSum.apply(h, weight, targets, cap, reduction, rows, dtype)
    with torch.autocast(h.device.type, enabled=False):
        hc, wc = h.to(dtype), weight.to(dtype)
        loss = torch.cat([_chunk_loss(F.linear(hc[s:s + rows], wc).float(), targets[s:s + rows],
                                      cap, False)[0] for s in range(0, h.size(0), rows)])
    if reduction == "none":
        return loss
    total = loss.sum()
    return total / (targets != IGNORE_INDEX).sum() if reduction == "mean" else total
