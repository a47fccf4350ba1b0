"""The GPT: decoder-only transformer in the modded-nanogpt / nanochat style.

- rotary position embeddings (no learned positions), QK-norm, parameter-free RMSNorm
- ReLU² MLP, grouped-query attention (n_kv_head), untied embedding and lm_head
- logits soft-capped: softcap · tanh(logits / softcap)
- optional hashed bigram residual embedding (nanochat PR #747): one table of factor × vocab rows
  shared by all layers; before every block x += λ_i · table[hash(prev, cur)]
- forward accepts a KV cache for incremental decoding (the cache also carries the previous token,
  so the bigram rows in decode equal those in training)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.common import UserError
from nanochat.config import ModelArgs, model_dims


@dataclass
class GPTConfig:
    """Concrete shape of a model (what a checkpoint stores), derived from the recipe's
    ModelArgs by `from_args`. The shape has no defaults (a checkpoint names all of it); a
    feature's field defaults to the recipe's default, off, so older checkpoints still load."""
    sequence_len: int
    vocab_size: int
    n_layer: int
    n_head: int
    n_kv_head: int
    n_embd: int
    softcap: float = ModelArgs.softcap
    bigram_factor: int = ModelArgs.bigram_factor
    bigram_lambda_init: float = ModelArgs.bigram_lambda_init

    @classmethod
    def from_args(cls, m: ModelArgs, vocab_size: int) -> "GPTConfig":
        """The model a recipe describes, for a tokenizer of `vocab_size` tokens."""
        if m.vocab_size is not None and m.vocab_size < vocab_size:
            raise UserError(f"model.vocab_size {m.vocab_size} is smaller than the tokenizer's "
                            f"{vocab_size}; set model.vocab_size: null to use the tokenizer's")
        dims = model_dims(m)
        return cls(sequence_len=m.sequence_len, vocab_size=m.vocab_size or vocab_size,
                   softcap=m.softcap, bigram_factor=m.bigram_factor,
                   bigram_lambda_init=m.bigram_lambda_init, **dims)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def norm(x: torch.Tensor) -> torch.Tensor:
    # parameter-free RMSNorm: no gain, no bias
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    y1 = x1 * cos + x2 * sin
    y2 = x1 * (-sin) + x2 * cos
    return torch.cat([y1, y2], -1).to(x.dtype)


# Hash constants from nanochat PR #747; int32 arithmetic wraps identically on every device.
BIGRAM_MUL_CUR = 36313
BIGRAM_MUL_PREV = 27191


def bigram_rows(idx: torch.Tensor, n_rows: int, prev: torch.Tensor | None = None) -> torch.Tensor:
    """Table row for each position of `idx` (B, T): a hash of (previous token, current token).

    `prev` (B,) is the token before idx[:, 0] (decode with a KV cache); None means idx[:, 0] is
    position 0 of the sequence, which has no previous token and gets the reserved row n_rows - 1.
    """
    cur = idx.to(torch.int32)
    if prev is None:
        prev_tok = torch.cat([cur[:, :1], cur[:, :-1]], dim=1)  # column 0 is overwritten below
    else:
        prev_tok = torch.cat([prev.to(torch.int32).view(-1, 1), cur[:, :-1]], dim=1)
    h = torch.bitwise_xor(cur * BIGRAM_MUL_CUR, prev_tok * BIGRAM_MUL_PREV) % (n_rows - 1)
    if prev is None:
        h[:, 0] = n_rows - 1
    return h


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
    return y.view(B, H, T, D)


class KVCache:
    """Preallocated keys/values for every layer: (n_layer, B, n_kv_head, max_len, head_dim).

    Filled in one of two ways:
    - together (`pos`, a host int): every row holds the same number of positions and
      `forward` with T tokens writes positions pos..pos+T-1 (prefill, chunked prefill).
      `prev_token` is the last token fed, which the bigram hash of the next step needs.
    - per row (`start_rows`, then `decode.DecodeStep`): each row has its own length (prompts of
      different lengths in one batch). The lengths (`row_pos`) and last tokens (`row_prev`) are
      device tensors updated in place, so a decode step reads no host value and always touches
      the same memory: it can be compiled with static shapes or captured in a CUDA graph
      (gpt-fast passes `input_pos` as a tensor for the same reason).
    """

    def __init__(self, batch_size: int, max_len: int, config: GPTConfig, device, dtype):
        shape = (config.n_layer, batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.batch_size, self.max_len = batch_size, max_len
        self.pos = 0
        self.prev_token: torch.Tensor | None = None
        self.row_pos = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.row_prev = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.key_pos = torch.arange(max_len, device=device)
        # index tensors of insert_rows (made here: a compiled step must not see them change)
        self._rows = (torch.arange(batch_size, device=device).view(-1, 1),
                      torch.arange(config.n_kv_head, device=device).view(1, -1),
                      [torch.tensor(i, device=device) for i in range(config.n_layer)])

    def insert(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        t0, t1 = self.pos, self.pos + k.size(2)
        if t1 > self.max_len:
            raise ValueError(f"KV cache full: {t1} positions > max_len {self.max_len}")
        self.k[layer, :, :, t0:t1] = k
        self.v[layer, :, :, t0:t1] = v
        return self.k[layer, :, :, :t1], self.v[layer, :, :, :t1]

    def insert_rows(self, layer: int, k: torch.Tensor, v: torch.Tensor, length: int):
        """One position per row (k, v: (B, n_kv_head, head_dim)) written at each row's own
        `row_pos`; returns the first `length` positions of the layer's keys and values. One
        index_put_ into the whole cache tensor (see nanochat/decode.py for why not a view)."""
        b, h, layers = self._rows
        idx = (layers[layer], b, h, self.row_pos.view(-1, 1))
        self.k.index_put_(idx, k)
        self.v.index_put_(idx, v)
        return self.k[layer, :, :, :length], self.v[layer, :, :, :length]

    def start_rows(self, lengths: torch.Tensor, last_tokens: torch.Tensor) -> None:
        """Switch to per-row decoding after a prefill: row b holds `lengths[b]` positions and its
        last token is `last_tokens[b]` (copied in place: buffers a CUDA graph holds stay valid)."""
        self.row_pos.copy_(lengths)
        self.row_prev.copy_(last_tokens)

    def reset(self) -> None:
        self.pos = 0
        self.prev_token = None
        self.row_pos.zero_()


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x, cos_sin, kv_cache: KVCache | None):
        B, T, C = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        cos, sin = cos_sin
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q), norm(k)  # QK-norm keeps attention logits bounded
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if kv_cache is not None:
            k, v = kv_cache.insert(self.layer_idx, k, v)
        Tq, Tk = q.size(2), k.size(2)
        if Tq == Tk:
            y = attention(q, k, v, is_causal=True)
        elif Tq == 1:  # one new token attends to everything in the cache
            y = attention(q, k, v)
        else:  # a chunk after a prefix: full view of the prefix, causal within the chunk
            mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
            y = attention(q, k, v, mask)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())  # ReLU² (Primer, So et al. 2021)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos_sin, kv_cache):
        x = x + self.attn(norm(x), cos_sin, kv_cache)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.bigram_factor > 0:
            self.bigram_rows = config.bigram_factor * config.vocab_size
            self.bigram = nn.Embedding(self.bigram_rows, config.n_embd)
            self.bigram_lambdas = nn.Parameter(torch.full((config.n_layer,), config.bigram_lambda_init))
        else:
            self.bigram = None
        # Rotary tables cover 10× the training context so generation can run past it.
        self.rotary_len = config.sequence_len * 10
        cos, sin = self._rotary(self.rotary_len, config.head_dim)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @staticmethod
    def _rotary(seq_len: int, head_dim: int, base: float = 10000.0, device=None):
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
        freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
        return freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]  # (1, T, 1, D/2)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter (call after `to_empty` when the model was built on 'meta')."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                fan_out, fan_in = module.weight.shape
                std = 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in))
                nn.init.normal_(module.weight, mean=0.0, std=std)
        nn.init.normal_(self.wte.weight, mean=0.0, std=1.0)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.blocks:  # residual branches start as identity (modded-nanogpt)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        if self.bigram is not None:
            nn.init.zeros_(self.bigram.weight)  # zero table: starts as the dense model
            self.bigram_lambdas.fill_(self.config.bigram_lambda_init)  # non-zero, or λ gets no gradient
        cos, sin = self._rotary(self.rotary_len, self.config.head_dim, device=self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    # ---------------------------------------------------------------- bookkeeping
    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by optimizer role: Muon for hidden matrices, AdamW for the rest."""
        groups = {"matrix": [p for b in self.blocks for p in b.parameters()],
                  "embedding": [self.wte.weight], "lm_head": [self.lm_head.weight], "scalar": []}
        if self.bigram is not None:
            groups["embedding"].append(self.bigram.weight)
            groups["scalar"].append(self.bigram_lambdas)
        return groups

    def num_params(self) -> dict[str, int]:
        total = sum(p.numel() for p in self.parameters())
        embed = self.wte.weight.numel()
        bigram = self.bigram.weight.numel() if self.bigram is not None else 0
        # "Scaling" params (what the param:data ratio counts): everything but the lookup tables.
        return {"total": total, "embedding": embed, "bigram": bigram, "scaling": total - embed - bigram}

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward): 6 × matmul params + attention.
        Lookup tables (token and bigram embeddings) and the per-layer scalars do no matmuls."""
        c = self.config
        matmul = sum(p.numel() for b in self.blocks for p in b.parameters()) + self.lm_head.weight.numel()
        attn = 12 * c.n_layer * c.n_head * c.head_dim * c.sequence_len
        return 6 * matmul + attn

    # ---------------------------------------------------------------- forward
    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, loss_reduction: str = "mean",
                logits_at: torch.Tensor | None = None):
        """idx (B, T) → logits (B, T, V) float32, or the loss when `targets` is given
        (targets == -1 are ignored). With a KV cache, idx continues the cached positions.
        `logits_at` (B,): compute logits only at that position of each row → (B, 1, V); a
        prefill needs just the last prompt token's, and (B, T, V) floats can be gigabytes."""
        B, T = idx.size()
        t0 = 0 if kv_cache is None else kv_cache.pos
        if t0 + T > self.rotary_len:
            raise ValueError(f"sequence of {t0 + T} tokens exceeds the rotary table ({self.rotary_len})")
        cos_sin = self.cos[:, t0:t0 + T], self.sin[:, t0:t0 + T]
        x = norm(self.wte(idx))
        if self.bigram is not None:
            prev = None if t0 == 0 else kv_cache.prev_token
            big = self.bigram(bigram_rows(idx, self.bigram_rows, prev))
        for i, block in enumerate(self.blocks):
            if self.bigram is not None:
                x = x + self.bigram_lambdas[i] * big
            x = block(x, cos_sin, kv_cache)
        if kv_cache is not None:
            kv_cache.pos += T
            kv_cache.prev_token = idx[:, -1]
        if logits_at is not None:
            x = x.gather(1, logits_at.view(B, 1, 1).expand(B, 1, x.size(-1)))
        logits = self.softcap(self.lm_head(norm(x)).float())
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-1, reduction=loss_reduction)

    def softcap(self, logits: torch.Tensor) -> torch.Tensor:
        """softcap · tanh(logits / softcap): bounds the logits (Gemma 2; modded-nanogpt)."""
        cap = self.config.softcap
        if cap <= 0:
            return logits
        if torch.is_grad_enabled():
            return cap * torch.tanh(logits / cap)
        # the same ops in place: no new vocab-sized buffers (−0.4 ms/step at d4, batch 8, CPU)
        return logits.div_(cap).tanh_().mul_(cap)

    @torch.no_grad()
    def generate_naive(self, ids: list[int], max_new_tokens: int, temperature: float = 0.0,
                       generator: torch.Generator | None = None):
        """Reference decoding: recompute the whole sequence for every new token (no cache).
        Deliberately simple; the inference engine is checked against it."""
        device = self.lm_head.weight.device
        seq = torch.tensor([ids], dtype=torch.long, device=device)
        for _ in range(max_new_tokens):
            logits = self(seq)[:, -1, :]
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                probs = F.softmax(logits / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)
            seq = torch.cat([seq, nxt], dim=1)
            yield int(nxt.item())


def build_model(config: GPTConfig, device) -> GPT:
    """Build on the meta device, then allocate on `device` and initialise (fast for big models)."""
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    return model
