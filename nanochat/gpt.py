"""The GPT: decoder-only transformer in the modded-nanogpt / nanochat style.

- rotary position embeddings (no learned positions), QK-norm, parameter-free RMSNorm
- ReLU² MLP, grouped-query attention (n_kv_head), untied embedding and lm_head
- logits soft-capped: softcap · tanh(logits / softcap)
- optional hashed bigram residual embedding (nanochat PR #747): one table of factor × vocab rows
  shared by all layers; before every block x += λ_i · table[hash(prev, cur)]
- forward accepts a KV cache for incremental decoding (the cache also carries the previous token,
  so the bigram rows and smear in decode equal those in training)
- switches from upstream nanochat (2026), each off by default (config.py documents them):
  value embeddings (ResFormer, arXiv 2410.17897), sliding-window layers (attention.py), smear,
  backout, per-layer residual scalars, the q/k gain after QK-norm and the rotary base
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.common import UserError
from nanochat.config import ModelArgs, model_dims
from nanochat.attention import (attention, attention_dtype, causal_attention, covers,
                                forward_block_masks, layer_windows, window_mask)
from nanochat.kv_cache import KVCache
from nanochat.loss import chunked_loss, softcap


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
    value_embeds: bool = ModelArgs.value_embeds
    window_pattern: str = ModelArgs.window_pattern
    smear: bool = ModelArgs.smear
    backout: bool = ModelArgs.backout
    residual_scalars: bool = ModelArgs.residual_scalars
    qk_gain: float = ModelArgs.qk_gain
    rotary_base: float = ModelArgs.rotary_base
    loss_chunk_rows: int = ModelArgs.loss_chunk_rows

    @classmethod
    def from_args(cls, m: ModelArgs, vocab_size: int) -> "GPTConfig":
        """The model a recipe describes, for a tokenizer of `vocab_size` tokens."""
        if m.vocab_size is not None and m.vocab_size < vocab_size:
            raise UserError(f"model.vocab_size {m.vocab_size} is smaller than the tokenizer's "
                            f"{vocab_size}; set model.vocab_size: null to use the tokenizer's")
        dims = model_dims(m)
        return cls(sequence_len=m.sequence_len, vocab_size=m.vocab_size or vocab_size,
                   softcap=m.softcap, bigram_factor=m.bigram_factor,
                   bigram_lambda_init=m.bigram_lambda_init,
                   **{f: getattr(m, f) for f in ARCH_SWITCHES},
                   loss_chunk_rows=m.loss_chunk_rows, **dims)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def windows(self) -> list[int]:
        """Attention window W of each layer: the query at i reads i - W ..= i (attention.py)."""
        return layer_windows(self.window_pattern, self.n_layer, self.sequence_len)


# the architecture switches a recipe's model section hands to GPTConfig as they are
ARCH_SWITCHES = ("value_embeds", "window_pattern", "smear", "backout", "residual_scalars",
                 "qk_gain", "rotary_base")
# Fields that change how the model computes, not what it is: a resume may change them.
COMPUTE_ONLY = ("loss_chunk_rows",)
VE_GATE_CHANNELS = 12     # value-embedding gate input: the first 12 channels (upstream)
SMEAR_GATE_CHANNELS = 24  # smear gate input: the first 24 channels (upstream)


def has_value_embed(layer: int, n_layer: int) -> bool:
    """Layers with a value embedding: alternating, the last always (upstream nanochat)."""
    return layer % 2 == (n_layer - 1) % 2


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


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.window = config.windows()[layer_idx]
        self.qk_gain = config.qk_gain
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.ve_gate = None
        if config.value_embeds and has_value_embed(layer_idx, config.n_layer):
            self.ve_gate = nn.Linear(VE_GATE_CHANNELS, self.n_kv_head, bias=False)

    def value(self, x: torch.Tensor, ve: torch.Tensor | None) -> torch.Tensor:
        """v (B, T, n_kv_head, D), plus the gated value embedding: ResFormer's value residual,
        a gate in (0, 3) per kv head read from the first 12 channels (upstream nanochat)."""
        B, T, _ = x.shape
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is None:
            return v
        gate = 3 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))  # (B, T, n_kv_head)
        return v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)

    def forward(self, x, cos_sin, kv_cache: KVCache | None, ve: torch.Tensor | None = None,
                masks: dict | None = None):
        B, T, C = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.value(x, ve)
        cos, sin = cos_sin
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q), norm(k)  # QK-norm keeps attention logits bounded
        if self.qk_gain != 1.0:  # upstream 1.2: sharper attention than unit-norm q·k allows
            q, k = q * self.qk_gain, k * self.qk_gain
        dt = attention_dtype(v)  # one dtype for all three: attention.attention_dtype says why
        q, k, v = [t.transpose(1, 2).to(dt) for t in (q, k, v)]  # (B, H, T, D)
        if kv_cache is None:
            y = causal_attention(q, k, v, self.window, masks=masks)
        else:
            t0 = kv_cache.pos
            k, v, key_pos = kv_cache.insert(self.layer_idx, k, v)
            Tk = k.size(2)
            if key_pos is None and Tk == T:  # a prefill from position 0: as in training
                y = causal_attention(q, k, v, self.window)
            elif key_pos is None and T == 1 and covers(self.window, Tk):  # the whole cache
                y = attention(q, k, v)
            else:  # a chunk after a prefix, or a window: causal, inside the window
                key_pos = torch.arange(Tk, device=q.device) if key_pos is None else key_pos
                q_pos = torch.arange(t0, t0 + T, device=q.device)
                y = attention(q, k, v, window_mask(q_pos, key_pos, self.window))
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

    def forward(self, x, cos_sin, kv_cache, ve=None, masks=None):
        x = x + self.attn(norm(x), cos_sin, kv_cache, ve, masks)
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
        self._init_switches(config)
        # Rotary tables cover 10× the training context so generation can run past it.
        self.rotary_len = config.sequence_len * 10
        cos, sin = self.rotary_tables()
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _init_switches(self, config: GPTConfig) -> None:
        """Parameters of the architecture switches (values set in init_weights)."""
        kv_dim = config.n_kv_head * config.head_dim
        self.value_embeds = nn.ModuleDict({
            str(i): nn.Embedding(config.vocab_size, kv_dim) for i in range(config.n_layer)
            if config.value_embeds and has_value_embed(i, config.n_layer)})
        self.smear_gate = self.smear_lambda = None
        if config.smear:
            self.smear_gate = nn.Linear(SMEAR_GATE_CHANNELS, 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.backout_lambda = nn.Parameter(torch.zeros(1)) if config.backout else None
        self.backout_layer = config.n_layer // 2  # x_mid: the residual after this block
        self.resid_lambdas = self.x0_lambdas = None
        if config.residual_scalars:
            self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
            self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))

    def rotary_tables(self, device=None):
        """cos, sin (1, rotary_len, 1, head_dim/2) in fp32 for the config's rotary base."""
        return rotary(self.rotary_len, self.config.head_dim, self.config.rotary_base, device)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter (call after `to_empty` when the model was built on 'meta').

        Upstream nanochat's current initialisation (`GPT.init_weights`, pinned with its file and
        line by tests/test_upstream_parity.py): token embedding N(0, 0.8²), lm_head N(0, 0.001²);
        with s = √3 / √n_embd (a uniform draw of standard deviation 1/√n_embd — uniform to
        avoid outliers), c_q, c_k and c_v U(−s, s) whatever their width (GQA included),
        mlp.c_fc U(−0.4·s, 0.4·s), both output projections zero (residual branches start as
        identity), value-embedding tables U(−s, s) like c_v."""
        c = self.config
        s = 3 ** 0.5 * c.n_embd ** -0.5
        nn.init.normal_(self.wte.weight, mean=0.0, std=0.8)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.blocks:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
                nn.init.uniform_(lin.weight, -s, s)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.uniform_(block.mlp.c_fc.weight, -0.4 * s, 0.4 * s)
            nn.init.zeros_(block.mlp.c_proj.weight)
        if self.bigram is not None:
            nn.init.zeros_(self.bigram.weight)  # zero table: starts as the dense model
            self.bigram_lambdas.fill_(self.config.bigram_lambda_init)  # non-zero, or λ gets no gradient
        self._init_switch_weights(s)
        cos, sin = self.rotary_tables(device=self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def _init_switch_weights(self, s: float) -> None:
        """Upstream nanochat's initialisations of the switches' parameters."""
        c = self.config
        for table in self.value_embeds.values():  # as c_v
            nn.init.uniform_(table.weight, -s, s)
        for block in self.blocks:
            if block.attn.ve_gate is not None:  # small positive: gates start near 3·σ(0) = 1.5
                nn.init.uniform_(block.attn.ve_gate.weight, 0.0, 0.02)
        if self.smear_gate is not None:
            nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
            self.smear_lambda.zero_()  # starts as no smear; λ's gradient is gate · x[t-1] ≠ 0
        if self.backout_lambda is not None:
            self.backout_lambda.fill_(0.2)
        if self.resid_lambdas is not None:  # linear over depth: 1.15 → 1.05 and 0.20 → 0.05
            n = max(c.n_layer - 1, 1)  # in Python floats, rounded once, as upstream
            self.resid_lambdas.copy_(torch.tensor([1.15 - (0.10 * i / n) for i in range(c.n_layer)]))
            self.x0_lambdas.copy_(torch.tensor([0.20 - (0.15 * i / n) for i in range(c.n_layer)]))

    # ---------------------------------------------------------------- bookkeeping
    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by optimizer role (upstream's `setup_optimizer` groups, each with its
        own AdamW settings: nanochat/optim_config.py): Muon for the blocks' matrices (the
        value-embedding gates with them, as upstream); AdamW for the token embedding, the
        value-embedding tables, the lm_head, resid_lambdas, x0_lambdas, and one group for the
        smear gate, smear λ and backout λ; the kit's hashed bigram table and its λs their own."""
        groups = {"matrix": [p for b in self.blocks for p in b.parameters()],
                  "embedding": [self.wte.weight], "lm_head": [self.lm_head.weight]}
        if self.bigram is not None:
            groups["bigram"] = [self.bigram.weight]
            groups["scalar"] = [self.bigram_lambdas]
        if len(self.value_embeds):
            groups["value_embed"] = list(self.value_embeds.parameters())
        if self.resid_lambdas is not None:
            groups["resid"], groups["x0"] = [self.resid_lambdas], [self.x0_lambdas]
        smear = [p for p in (self.smear_gate.weight if self.smear_gate is not None else None,
                             self.smear_lambda, self.backout_lambda) if p is not None]
        if smear:
            groups["smear"] = smear
        return groups

    def num_params(self) -> dict[str, int]:
        total = sum(p.numel() for p in self.parameters())
        embed = self.wte.weight.numel()
        bigram = self.bigram.weight.numel() if self.bigram is not None else 0
        ve = sum(p.numel() for p in self.value_embeds.parameters())
        # "Scaling" params (what the param:data ratio counts): the blocks' matrices and the
        # lm_head, as upstream's base_train `get_scaling_params` (its dev/LOG.md, Jan 27 2026:
        # the cleanest scaling laws); lookup tables and the per-layer scalars are left out.
        scaling = sum(p.numel() for b in self.blocks for p in b.parameters()) + self.lm_head.weight.numel()
        return {"total": total, "embedding": embed, "bigram": bigram, "value_embeds": ve,
                "scaling": scaling}

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward): 6 × matmul params + attention, each
        layer's attention over its window (upstream nanochat). Lookup tables (token, bigram and
        value embeddings) and the per-layer scalars do no matmuls."""
        c = self.config
        matmul = sum(p.numel() for b in self.blocks for p in b.parameters()) + self.lm_head.weight.numel()
        if self.smear_gate is not None:
            matmul += self.smear_gate.weight.numel()
        attn = sum(12 * c.n_head * c.head_dim * min(w, c.sequence_len) for w in c.windows())
        return 6 * matmul + attn

    def smear(self, x: torch.Tensor, prev_token: torch.Tensor | None) -> torch.Tensor:
        """x[t] += λ · sigmoid(W · x[t, :24]) · x[t-1] on the normed embeddings (upstream
        nanochat's smear: a cheap previous-token feature). `prev_token` (B,): the token before
        x[:, 0] (a cache continuing); None: x[:, 0] is position 0, which has no previous."""
        B, T, C = x.shape
        if prev_token is None:
            first = torch.zeros_like(x[:, :1])
        else:
            first = norm(self.wte(prev_token.view(B, 1)))
        prev = torch.cat([first, x[:, :-1]], dim=1)
        gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[..., :SMEAR_GATE_CHANNELS]))
        return x + gate * prev

    # ---------------------------------------------------------------- forward
    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, loss_reduction: str = "mean",
                logits_at: torch.Tensor | None = None):
        """idx (B, T) → logits (B, T, V) float32, or the loss when `targets` is given
        (targets == -1 are ignored). With a KV cache, idx continues the cached positions.
        `logits_at` (B,): compute logits only at that position of each row → (B, 1, V); a
        prefill needs just the last prompt token's, and (B, T, V) floats can be gigabytes."""
        B, T = idx.size()
        x = self.hidden_states(idx, kv_cache)
        if logits_at is not None:
            x = x.gather(1, logits_at.view(B, 1, 1).expand(B, 1, x.size(-1)))
        if targets is None:
            return self.logits(x)
        # never the whole (B·T × vocab) fp32 logits: nanochat/loss.py (upstream #443)
        return chunked_loss(norm(x), self.lm_head.weight, targets, self.config.softcap,
                            loss_reduction, self.config.loss_chunk_rows)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The head on final hidden states (..., C) → float32 logits (..., V)."""
        return self.softcap(self.lm_head(norm(x)).float())

    def hidden_states(self, idx: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        """idx (B, T) → the last layer's output (B, T, C), before the head: what `logits` turns
        into logits — at only the positions a caller needs (CORE scores a few per row)."""
        B, T = idx.size()
        t0 = 0 if kv_cache is None else kv_cache.pos
        if t0 + T > self.rotary_len:
            raise ValueError(f"sequence of {t0 + T} tokens exceeds the rotary table ({self.rotary_len})")
        cos_sin = self.cos[:, t0:t0 + T], self.sin[:, t0:t0 + T]
        prev = None if t0 == 0 else kv_cache.prev_token
        x = norm(self.wte(idx))
        if self.smear_gate is not None:
            x = self.smear(x, prev)
        x0, x_mid = x, None
        if self.bigram is not None:
            big = self.bigram(bigram_rows(idx, self.bigram_rows, prev))
        # flex's block masks, once before the layers (one graph break, not one per "S" layer)
        masks = forward_block_masks(self.config.windows(), T, idx.device) if kv_cache is None else None
        for i, block in enumerate(self.blocks):
            if self.resid_lambdas is not None:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            if self.bigram is not None:
                x = x + self.bigram_lambdas[i] * big
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, cos_sin, kv_cache, ve, masks)
            if i == self.backout_layer:
                x_mid = x
        if kv_cache is not None:
            kv_cache.pos += T
            kv_cache.prev_token = idx[:, -1]
        if self.backout_lambda is not None:  # upstream: drop low-level features before the head
            x = x - self.backout_lambda * x_mid
        return x

    def softcap(self, logits: torch.Tensor) -> torch.Tensor:
        """softcap · tanh(logits / softcap): bounds the logits (Gemma 2; modded-nanogpt); in
        place without autograd (−0.4 ms/step at d4, batch 8, CPU)."""
        return softcap(logits, self.config.softcap)

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


def rotary(seq_len: int, head_dim: int, base: float, device=None):
    """Rotary tables cos, sin (1, seq_len, 1, head_dim/2), fp32 (RoFormer, Su et al. 2021)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    return freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]


def empty_model(config: GPTConfig, device) -> GPT:
    """GPT(config) on `device`, its values still to be set (init_weights, or a checkpoint's): on
    the meta device then allocated (fast for big models), but built in place on a CPU — random
    init of a meta tensor imports torch._dynamo (~3 s a process) — from a forked RNG, so
    init_weights draws what the meta path gives."""
    if torch.device(device).type == "cpu":
        with torch.random.fork_rng(devices=[]):
            return GPT(config)
    with torch.device("meta"):
        model = GPT(config)
    return model.to_empty(device=device)


def build_model(config: GPTConfig, device) -> GPT:
    """GPT(config) on `device`, initialised (init_weights)."""
    model = empty_model(config, device)
    model.init_weights()
    return model
