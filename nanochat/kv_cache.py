"""The static KV cache of incremental decoding (engine.py, decode.py).

Layers keep every position: (n_full, B, n_kv_head, max_len, head_dim); attention masks what lies
outside a layer's window (an "L" layer's is sequence_len: past the training context it slides too,
as upstream's). A short "S" layer (window W < sequence_len, reading W + 1 keys: attention.py) may
instead keep only the keys it can read, in a ring buffer (`ring=True`): (n_ring, B, n_kv_head,
W + 1, head_dim), position p in slot p mod (W + 1). Keys are stored
after rotary, so a slot's place in the ring does not matter to attention (a softmax over keys
is order-free); what matters is which slots hold positions inside the window, which is the
mask. `nbytes()` with and without rings: docs/benchmarks.md.
"""
from __future__ import annotations

import torch

from nanochat.attention import layer_windows


class KVCache:
    """Preallocated keys/values for every layer.

    Filled in one of two ways:
    - together (`pos`, a host int): every row holds the same number of positions and
      `forward` with T tokens writes positions pos..pos+T-1 (prefill, chunked prefill).
      `prev_token` is the last token fed, which the bigram hash and smear of the next step need.
      A prefill of right-padded prompts sets `prefill_lens` (B,) first: ring layers then keep
      each row's own last W positions, not the padding's.
    - per row (`start_rows`, then `decode.DecodeStep`): each row has its own length (prompts of
      different lengths in one batch). The lengths (`row_pos`) and last tokens (`row_prev`) are
      device tensors updated in place, so a decode step reads no host value and always touches
      the same memory: it can be compiled with static shapes or captured in a CUDA graph
      (gpt-fast passes `input_pos` as a tensor for the same reason).
    """

    def __init__(self, batch_size: int, max_len: int, config, device, dtype, ring: bool = False):
        self.windows = layer_windows(config.window_pattern, config.n_layer, config.sequence_len)
        # (in a ring?, index in its tensor) per layer: the short windows, all the same W, whose
        # W + 1 keys are fewer than the cache's positions
        ringed = [ring and w < config.sequence_len and w + 1 < max_len for w in self.windows]
        self.slots = [(r, sum(ringed[:i]) if r else i - sum(ringed[:i])) for i, r in enumerate(ringed)]
        self.ring_len = min((w + 1 for w, r in zip(self.windows, ringed) if r), default=0)
        B, Hkv, D = batch_size, config.n_kv_head, config.head_dim
        n_ring = sum(ringed)
        self.k = torch.zeros((config.n_layer - n_ring, B, Hkv, max_len, D), device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.k_ring = self.v_ring = None
        if n_ring:
            self.k_ring = torch.zeros((n_ring, B, Hkv, self.ring_len, D), device=device, dtype=dtype)
            self.v_ring = torch.zeros_like(self.k_ring)
        self.batch_size, self.max_len, self.ring = batch_size, max_len, ring
        self.pos = 0
        self.prev_token: torch.Tensor | None = None
        self.prefill_lens: torch.Tensor | None = None
        self.row_pos = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.row_prev = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.key_pos = torch.arange(max_len, device=device)
        self.ring_slot = torch.arange(self.ring_len, device=device)
        # index tensors of insert_rows (made here: a compiled step must not see them change)
        self._rows = (torch.arange(batch_size, device=device).view(-1, 1),
                      torch.arange(Hkv, device=device).view(1, -1),
                      [torch.full((), j, dtype=torch.long, device=device) for _, j in self.slots])

    def is_ring(self, layer: int) -> bool:
        return self.slots[layer][0]

    def nbytes(self) -> int:
        """Bytes of keys and values held (all layers)."""
        ts = [self.k, self.v] + ([self.k_ring, self.v_ring] if self.k_ring is not None else [])
        return sum(t.numel() * t.element_size() for t in ts)

    def insert(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Together mode: write T positions at pos..pos+T-1. Returns (keys, values, key
        positions): the keys the new queries may read and their absolute positions, None when
        they are simply positions 0..pos+T-1 (a full-context layer)."""
        t0, T = self.pos, k.size(2)
        ring, j = self.slots[layer]
        if ring:
            return self._insert_ring(j, k, v)
        if t0 + T > self.max_len:
            raise ValueError(f"KV cache full: {t0 + T} positions > max_len {self.max_len}")
        self.k[j, :, :, t0:t0 + T] = k
        self.v[j, :, :, t0:t0 + T] = v
        return self.k[j, :, :, :t0 + T], self.v[j, :, :, :t0 + T], None

    def _insert_ring(self, j: int, k: torch.Tensor, v: torch.Tensor):
        t0, T, W = self.pos, k.size(2), self.ring_len
        B, Hkv, _, D = k.shape
        # before this chunk, slot s holds the largest position p ≡ s (mod W) below t0 (< 0: none)
        held = t0 - 1 - torch.remainder(t0 - 1 - self.ring_slot, W)
        keys = torch.cat([self.k_ring[j], k], dim=2)
        values = torch.cat([self.v_ring[j], v], dim=2)
        key_pos = torch.cat([held, t0 + torch.arange(T, device=k.device)])
        # after it, slot s holds the largest p ≡ s below the row's end: from the chunk when p ≥ t0
        end = (self.prefill_lens.view(B, 1) if self.prefill_lens is not None
               else torch.full((B, 1), t0 + T, device=k.device))
        p = end - 1 - torch.remainder(end - 1 - self.ring_slot.view(1, W), W)  # (B, W)
        src = (p - t0).clamp(0, T - 1).view(B, 1, W, 1).expand(B, Hkv, W, D)
        new = (p >= t0).view(B, 1, W, 1)
        self.k_ring[j].copy_(torch.where(new, k.gather(2, src), self.k_ring[j]))
        self.v_ring[j].copy_(torch.where(new, v.gather(2, src), self.v_ring[j]))
        return keys, values, key_pos

    def insert_rows(self, layer: int, k: torch.Tensor, v: torch.Tensor, length: int):
        """One position per row (k, v: (B, n_kv_head, head_dim)) written at each row's own
        `row_pos` (a ring layer: its slot row_pos mod W); returns the keys and values the step
        reads: the first `length` positions, or the whole ring. One index_put_ into the whole
        cache tensor (see nanochat/decode.py for why not a view)."""
        b, h, index = self._rows
        ring, j = self.slots[layer]
        if ring:
            idx = (index[layer], b, h, torch.remainder(self.row_pos, self.ring_len).view(-1, 1))
            self.k_ring.index_put_(idx, k)
            self.v_ring.index_put_(idx, v)
            return self.k_ring[j], self.v_ring[j]
        idx = (index[layer], b, h, self.row_pos.view(-1, 1))
        self.k.index_put_(idx, k)
        self.v.index_put_(idx, v)
        return self.k[j, :, :, :length], self.v[j, :, :, :length]

    def copy_rows(self, src: "KVCache", rows: torch.Tensor, length: int) -> None:
        """Row r of this cache := row rows[r] of `src` (same layout), the first `length`
        positions of full layers and the whole ring: a prompt prefilled once for its samples."""
        self.k[:, :, :, :length] = src.k[:, rows, :, :length]
        self.v[:, :, :, :length] = src.v[:, rows, :, :length]
        if self.k_ring is not None:
            self.k_ring.copy_(src.k_ring[:, rows])
            self.v_ring.copy_(src.v_ring[:, rows])

    def start_rows(self, lengths: torch.Tensor, last_tokens: torch.Tensor) -> None:
        """Switch to per-row decoding after a prefill: row b holds `lengths[b]` positions and its
        last token is `last_tokens[b]` (copied in place: buffers a CUDA graph holds stay valid)."""
        self.row_pos.copy_(lengths)
        self.row_prev.copy_(last_tokens)
        self.prefill_lens = None

    def save_decode_writes(self, steps: int) -> list[torch.Tensor]:
        """What the next `steps` per-row decode steps will overwrite: each row's state, every
        ring (a step at p writes slot p mod W, which still holds p - W: a key the steps before p
        read) and the full layers' positions row_pos .. row_pos + steps - 1. For warm-up steps
        that must leave no trace (engine.warm_up); `restore_decode_writes` puts it back."""
        B = self.batch_size
        rows = torch.arange(B, device=self.row_pos.device)
        saved = [self.row_pos.clone(), self.row_prev.clone()]
        for s in range(steps):
            pos = (self.row_pos + s).clamp(max=self.max_len - 1)
            saved += [self.k[:, rows, :, pos].clone(), self.v[:, rows, :, pos].clone()]
        if self.k_ring is not None:
            saved += [self.k_ring.clone(), self.v_ring.clone()]
        return saved

    def restore_decode_writes(self, saved: list[torch.Tensor], steps: int) -> None:
        """Undo the steps since `save_decode_writes(steps)`, in place (the buffers a CUDA graph
        holds stay the same tensors). Writes go back in reverse order, so a position the steps
        wrote twice (clamped at max_len - 1) gets its first saved value."""
        B = self.batch_size
        rows = torch.arange(B, device=self.row_pos.device)
        pos0 = saved[0]
        if self.k_ring is not None:
            self.k_ring.copy_(saved[-2])
            self.v_ring.copy_(saved[-1])
        for s in reversed(range(steps)):
            pos = (pos0 + s).clamp(max=self.max_len - 1)
            self.k[:, rows, :, pos] = saved[2 + 2 * s]
            self.v[:, rows, :, pos] = saved[3 + 2 * s]
        self.row_pos.copy_(saved[0])
        self.row_prev.copy_(saved[1])

    def reset(self) -> None:
        self.pos = 0
        self.prev_token = None
        self.prefill_lens = None
        self.row_pos.zero_()
