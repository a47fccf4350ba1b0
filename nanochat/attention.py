"""Causal attention with per-layer sliding windows, and the kernel each device runs it with.

Windows (upstream nanochat's `window_pattern`): the pattern is tiled over the layers, "S" is a
window of S = ceil(sequence_len / 4 / 128) · 128 tokens (2048 → 512; 1000 → 256: a multiple of
128, FlashAttention's tile) and "L" a window of sequence_len; the last layer is always "L". A
window of W means the query at position i reads the keys at positions j with i - W <= j <= i:
W + 1 keys, itself included — upstream passes `window_size=(W, 0)` to FlashAttention and its SDPA
fallback masks `i - j <= W`. So an "L" layer is the full context up to sequence_len + 1 tokens and
a sliding window of sequence_len beyond it (generating past the training context), in training,
evaluation and decoding alike.

Kernels (`attention_backend`):
- full-context layers always run SDPA with `is_causal=True`: no mask, so windows elsewhere never
  slow them down;
- "sdpa" (CPU, and CUDA without the others): SDPA with a boolean band mask, built once per
  (length, window, device) and cached, not per layer per step;
- "flex" (CUDA under torch.compile): `torch.nn.attention.flex_attention` with a block mask made
  once per shape; compiled, it skips fully masked tiles instead of reading a (T × T) mask;
- "flash_attn" (CUDA with the flash_attn package ≥ 2.7, bf16/fp16 activations): its native
  `window_size=(W, 0)`, as upstream. q, k and v reach every kernel in one dtype
  (`attention_dtype`); `RAN` records the kernel that ran per layer kind.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import math
import re
import sys
from collections import OrderedDict

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "flex", "flash_attn")
WINDOW_TILE = 128  # S windows are a multiple of this (upstream: FlashAttention 3's tile)


def short_window(sequence_len: int) -> int:
    """The "S" window: a quarter of the context rounded up to a multiple of 128 (upstream)."""
    return math.ceil(sequence_len / 4 / WINDOW_TILE) * WINDOW_TILE


def layer_windows(pattern: str, n_layer: int, sequence_len: int) -> list[int]:
    """Window W of each layer (the query at i reads i - W ..= i): `pattern` tiled over the
    layers, S = short_window(sequence_len), L = sequence_len, the last layer always L."""
    s = short_window(sequence_len)
    windows = [s if pattern[i % len(pattern)] == "S" else sequence_len for i in range(n_layer)]
    windows[-1] = sequence_len
    return windows


def covers(window: int | None, length: int) -> bool:
    """A window this wide lets every query of a `length`-token sequence read all its earlier
    keys (W + 1 ≥ length): plain causal attention, no mask."""
    return window is None or window + 1 >= length


# flash_attn releases this code runs (pyproject's `flash` extra): from 2.7 flash_attn_func is a
# torch custom op, which torch.compile traces; before it, every "S" layer broke the graph.
FLASH_ATTN_MIN = (2, 7)
_FLASH_OK: dict[str, bool] = {}  # installed version string → supported (looked up once)


def flash_attn_version() -> str | None:
    """The installed flash_attn's version (its distribution's, else the module's), or None."""
    if importlib.util.find_spec("flash_attn") is None:
        return None
    try:
        return importlib.metadata.version("flash_attn")
    except importlib.metadata.PackageNotFoundError:
        return getattr(importlib.import_module("flash_attn"), "__version__", "0")


def flash_attn_available() -> bool:
    """flash_attn is installed in a supported version (≥ FLASH_ATTN_MIN); an older one is left
    unused, with one line saying so, and the window layers run flex or SDPA."""
    version = flash_attn_version()
    if version is None:
        return False
    if version not in _FLASH_OK:
        parts = tuple(int(x) for x in re.findall(r"\d+", version)[:2])
        _FLASH_OK[version] = parts >= FLASH_ATTN_MIN
        if not _FLASH_OK[version]:
            print(f"flash_attn {version} is older than {'.'.join(map(str, FLASH_ATTN_MIN))} (no "
                  f"custom op: torch.compile breaks the graph at every window layer); not used. "
                  f"pip install 'flash-attn>={'.'.join(map(str, FLASH_ATTN_MIN))}' to use it",
                  file=sys.stderr)
    return _FLASH_OK[version]


def flex_available() -> bool:
    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


def attention_backend(device, compiled: bool) -> str:
    """The kernel sliding-window layers run with on `device` (run.json logs it): flash_attn when
    installed on CUDA, flex_attention on CUDA under torch.compile (eager flex is a slow
    reference path), else SDPA with a cached band mask."""
    if torch.device(device).type == "cuda":
        if flash_attn_available():
            return "flash_attn"
        if compiled and flex_available():
            return "flex"
    return "sdpa"


def attention_dtype(v: torch.Tensor) -> torch.dtype:
    """The dtype q, k and v enter attention in: the autocast dtype where autocast is on for v's
    device, else v's own. Under CUDA bf16 autocast QK-norm's `F.rms_norm` is on autocast's fp32
    list, so q and k leave it fp32 while v (a bf16 matmul) does not: flash_attn then refused the
    mix and every window layer fell back to SDPA with a (T, T) mask. SDPA under autocast casts
    all three to bf16 itself, so this changes no result there (CPU autocast has no rms_norm
    entry, which is why no CPU run showed it; the fakecuda tests do)."""
    dev = v.device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return v.dtype


# Layer kind ("S": a window shorter than the sequence, "L": the full context) → the kernel its
# last whole-sequence attention ran with (run.json's "attention_ran", the self-test's table):
# what ran, not what `attention_backend` chose.
RAN: dict[str, str] = {}


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              is_causal: bool = False) -> torch.Tensor:
    """Scaled dot-product attention with grouped-query heads: q (B, H, T, D), k and v
    (B, Hkv, L, D), H a multiple of Hkv; `mask` (boolean, broadcastable to (B, 1, T, L)).

    SDPA's own `enable_gqa=True` runs with a mask only in its math kernel, which copies K and V
    up to H heads in every layer at every step. With a mask, each group of G = H / Hkv query
    heads is folded into the query length instead — q (B, Hkv, G·T, D), the mask repeated per
    group — which is the same attention (query head h reads kv head h // G, as enable_gqa
    does) in a shape the fused kernels take."""
    H, Hkv = q.size(1), k.size(1)
    if H == Hkv or mask is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                              enable_gqa=H != Hkv)
    assert not is_causal, "pass causality in the mask"
    B, _, T, D = q.shape
    G, L = H // Hkv, k.size(2)
    m = mask.view((1,) * (4 - mask.dim()) + tuple(mask.shape))
    m = m.expand(m.size(0), 1, T, L).unsqueeze(2).expand(m.size(0), 1, G, T, L)
    y = F.scaled_dot_product_attention(q.reshape(B, Hkv, G * T, D), k, v,
                                       attn_mask=m.reshape(m.size(0), 1, G * T, L))
    # reshape, not view: CUDA's memory-efficient kernel returns a transposed layout
    return y.reshape(B, H, T, D)


def window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """(Tq, Tk) boolean: query at absolute position q_pos[i] may read the key at k_pos[j]
    (causal, inside the window: qp - W <= kp <= qp; k_pos < 0 marks an empty cache slot)."""
    qp, kp = q_pos.view(-1, 1), k_pos.view(1, -1)
    ok = (kp <= qp) & (kp >= 0)
    return ok if window is None else ok & (kp >= qp - window)


# Masks are cached per shape, but bounded: CORE's rows and generation's prefills come in many
# lengths (up to 10× the context), and one (T, T) mask per distinct T kept forever on the device
# held hundreds of MB. Training and a bpb eval use one T and at most a few windows, so a few
# recent shapes hit every time; a mask too big to keep is rebuilt per call instead.
MASK_CACHE_ENTRIES = 4
MASK_CACHE_MAX_BYTES = 64 << 20   # a bool (T, T) mask up to T = 8192
_BAND_MASKS: OrderedDict[tuple, torch.Tensor] = OrderedDict()
_BLOCK_MASKS: OrderedDict[tuple, object] = OrderedDict()


def _cached(cache: OrderedDict, key: tuple, make, keep: bool = True):
    """cache[key], made by `make()` on a miss; the least recently used entries beyond
    MASK_CACHE_ENTRIES are dropped. `keep` False: made and returned, not stored."""
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    value = make()
    if keep:
        cache[key] = value
        while len(cache) > MASK_CACHE_ENTRIES:
            cache.popitem(last=False)
    return value


def band_mask(T: int, window: int, device) -> torch.Tensor:
    """The (T, T) sliding-window causal mask, made once per (T, window, device) while it stays
    among the few recent shapes (`_cached`)."""
    def make():
        pos = torch.arange(T, device=device)
        return window_mask(pos, pos, window)
    if torch.compiler.is_compiling():  # traced into the graph (inductor folds it), not cached
        return make()
    return _cached(_BAND_MASKS, (T, window, str(device)), make, keep=T * T <= MASK_CACHE_MAX_BYTES)


def _block_mask(T: int, window: int, device):
    """flex_attention's block mask for a (T, T) sliding window, made once per shape (outside the
    compiled graph: one cached object that every layer and step reuses)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def band(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (kv_idx >= q_idx - window)
    return _cached(_BLOCK_MASKS, (T, window, str(device)),
                   lambda: create_block_mask(band, None, None, T, T, device=device))


def _block_masks(T: int, windows: tuple[int, ...], device) -> dict[int, object]:
    """{window: block mask} for every distinct window of a forward, in one call."""
    return {w: _block_mask(T, w, device) for w in windows}


# Outside the compiled graph where flex runs (CUDA): one call per forward, before the layers
# (`forward_block_masks`) — a disabled call inside each window layer broke the graph once per
# "S" layer. `torch.compiler.disable` imports dynamo, ~1.2 s of every CPU process's start (each
# CLI call, job, probe, test worker) for a path CPU never takes: attention_backend picks flex
# only on CUDA.
block_masks = torch.compiler.disable(_block_masks) if torch.cuda.is_available() else _block_masks


def forward_block_masks(windows, T: int, device) -> dict[int, object] | None:
    """The flex block masks a whole-sequence forward of length T needs, made once before the
    layers; None where the windows' kernel is not flex (or every window covers T)."""
    short = tuple(sorted({w for w in windows if not covers(w, T)}))
    if not short or attention_backend(device, torch.compiler.is_compiling()) != "flex":
        return None
    return block_masks(T, short, device)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None,
                     backend: str | None = None, masks: dict | None = None) -> torch.Tensor:
    """Causal self-attention over one whole sequence (training, a prefill from position 0):
    q (B, H, T, D), k and v (B, Hkv, T, D) → (B, H, T, D). `window` None = full context.
    `backend` None: `attention_backend` of q's device under the current compile state.
    `masks`: `forward_block_masks`' answer for this forward (flex)."""
    T = q.size(2)
    if covers(window, T):
        RAN["L"] = "sdpa"
        return attention(q, k, v, is_causal=True)
    if backend is None:
        backend = attention_backend(q.device, torch.compiler.is_compiling())
    half = q.dtype in (torch.float16, torch.bfloat16) and q.dtype == k.dtype == v.dtype
    if backend == "flash_attn" and half:
        from flash_attn import flash_attn_func  # layout (B, T, H, D); GQA native
        RAN["S"] = "flash_attn"
        y = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                            causal=True, window_size=(window, 0))
        return y.transpose(1, 2)
    if backend == "flex":
        from torch.nn.attention.flex_attention import flex_attention
        RAN["S"] = "flex"
        mask = masks[window] if masks else block_masks(T, (window,), q.device)[window]
        return flex_attention(q, k, v, block_mask=mask, enable_gqa=q.size(1) != k.size(1))
    RAN["S"] = "sdpa"
    return attention(q, k, v, band_mask(T, window, q.device))
