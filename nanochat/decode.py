"""The decode step: one new token per row through the GPT, each row at its own position.

`DecodeStep(model, head, batch)` holds the model's weights in the layouts decoding wants — a
snapshot: build it again after the weights change — and its forward is the blocks' computation for
a single position, written out (checked against the full forward by tests/test_engine.py):

- Per layer, q, k and v are fused into one matmul, and rotary + QK-norm run on q and k together:
  each small op costs microseconds of dispatch on a CPU, which at the d4 shape is as much as its
  matmuls. Rotary is in rotate-half form, x·C + swap_halves(x)·S with C = [cos, cos] and
  S = [sin, −sin]: the same products and sums as `gpt.apply_rotary_emb`, bit for bit.
- The lm_head in one of HEAD_LAYOUTS (all compute the same products): nn.Linear's weight; the
  weight stored transposed (n_embd, vocab), which MKL's sgemm runs ~2× faster at decode's small
  batches; or MKL's packed sgemm, the weight pre-packed for the batch size (the op inductor's CPU
  freezing emits). docs/benchmarks.md times them side by side.
- Each row decodes at its own position (`KVCache.start_rows`). The step reads no host value and
  writes only preallocated memory, so it can be compiled with static shapes or captured in a CUDA
  graph. Its cache write is one `index_put_` into the whole cache tensor, not a scatter into one
  layer's view: compiled, a write into a view of a graph input made inductor copy the whole cache
  back every step (d4, batch 8, CPU: 16.3 ms a step against 5.7 ms).
- Every architecture switch decodes here as in the full forward: a layer reads at most its
  window, W + 1 keys (an "L" layer's W is sequence_len), through a band mask over the full cache
  or its ring buffer (all W + 1 slots: static shapes); smear's previous embedding is looked up
  from the row's previous token (`row_prev`, which the bigram hash reads too), the same lookup
  the full forward makes.
- `compile_step` compiles it with static shapes but for the attended length. On CPU it also
  turns on inductor's freezing: the weights become constants, so inductor pre-packs every linear
  for MKL (what the packed lm_head does by hand, for the layers' matmuls too) and fuses the
  elementwise glue into C++ loops.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.attention import attention
from nanochat.gpt import GPT, VE_GATE_CHANNELS, bigram_rows, norm
from nanochat.kv_cache import KVCache

HEAD_LAYOUTS = ("linear", "transposed", "packed")


def mkl_packed_available() -> bool:
    """MKL's packed sgemm (the op inductor's CPU freezing uses) is in this torch build."""
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear") \
        and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight")


class DecodeStep(nn.Module):
    """`step(token, cache, key_pos=None)`: token (B, 1), each row at its cache row's position →
    logits (B, V), float32, soft-capped like the full forward's. Advances the cache's per-row
    state in place. `key_pos`: the cache positions attention reads, a prefix of `cache.key_pos`
    that holds every row's length after this step (the engine passes the prefix filled so far:
    less work); None reads all max_len positions (static shapes, for CUDA graphs). Costs one copy
    of the q/k/v weights, and of the lm_head for the transposed and packed layouts."""

    def __init__(self, model: GPT, head: str = "linear", batch: int = 0):
        super().__init__()
        if head not in HEAD_LAYOUTS:
            raise ValueError(f"head must be one of {', '.join(HEAD_LAYOUTS)}, got {head!r}")
        wt = model.lm_head.weight
        if head == "packed" and not (mkl_packed_available() and batch >= 1
                                     and wt.device.type == "cpu" and wt.dtype == torch.float32):
            raise ValueError("the packed lm_head needs a CPU fp32 model, MKL and a batch size")
        self.model, self.head, self.batch = model, head, batch
        with torch.no_grad():
            # module parameters and buffers: compiled with freezing they become constants (the
            # fused q/k/v matrices are then packed for MKL like the model's own linears)
            self.qkv = nn.ParameterList(
                nn.Parameter(torch.cat([b.attn.c_q.weight, b.attn.c_k.weight, b.attn.c_v.weight]),
                             requires_grad=False) for b in model.blocks)
            cos, sin = model.cos[0], model.sin[0]  # (T, 1, D/2)
            self.register_buffer("cos", torch.cat([cos, cos], -1).contiguous(), persistent=False)
            self.register_buffer("sin", torch.cat([sin, -sin], -1).contiguous(), persistent=False)
            self.head_t = wt.t().contiguous() if head == "transposed" else None
            self.head_packed = (torch.ops.mkl._mkl_reorder_linear_weight(wt, batch)
                                if head == "packed" else None)

    def head_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., n_embd) → raw logits (..., vocab) through the lm_head in this step's layout."""
        wt = self.model.lm_head.weight
        if self.head_packed is not None and x.numel() == self.batch * x.size(-1):
            flat = torch.ops.mkl._mkl_linear(x.reshape(self.batch, -1), self.head_packed, wt,
                                             None, self.batch)
            return flat.view(*x.shape[:-1], -1)
        if self.head_t is not None:
            return x @ self.head_t
        return F.linear(x, wt)

    def forward(self, token: torch.Tensor, cache: KVCache, key_pos: torch.Tensor | None = None
                ) -> torch.Tensor:
        m, c = self.model, self.model.config
        B, H, Hkv, D = token.size(0), c.n_head, c.n_kv_head, c.head_dim
        key_pos = cache.key_pos if key_pos is None else key_pos
        length = key_pos.size(0)
        pos = cache.row_pos
        masks = self.masks(cache, key_pos)
        C = self.cos.index_select(0, pos).unsqueeze(1)  # (B, 1, 1, D)
        S = self.sin.index_select(0, pos).unsqueeze(1)
        x = norm(m.wte(token))
        if m.smear_gate is not None:
            x = m.smear(x, cache.row_prev)
        x0, x_mid = x, None
        if m.bigram is not None:
            big = m.bigram(bigram_rows(token, m.bigram_rows, cache.row_prev))
        for i, block in enumerate(m.blocks):
            if m.resid_lambdas is not None:
                x = m.resid_lambdas[i] * x + m.x0_lambdas[i] * x0
            if m.bigram is not None:
                x = x + m.bigram_lambdas[i] * big
            h = norm(x)
            qkv = F.linear(h, self.qkv[i]).view(B, 1, H + 2 * Hkv, D)
            qk = qkv[:, :, :H + Hkv]
            qk = norm((qk * C + torch.cat([qk[..., D // 2:], qk[..., :D // 2]], -1) * S).to(qk.dtype))
            if c.qk_gain != 1.0:
                qk = qk * c.qk_gain
            v = qkv[:, 0, H + Hkv:]
            if block.attn.ve_gate is not None:
                gate = 3 * torch.sigmoid(block.attn.ve_gate(h[:, 0, :VE_GATE_CHANNELS]))  # (B, Hkv)
                v = v + gate.unsqueeze(-1) * m.value_embeds[str(i)](token).view(B, Hkv, D)
            k, v = cache.insert_rows(i, qk[:, 0, H:], v, length)
            y = attention(qk[:, :, :H].transpose(1, 2), k, v, masks[i])
            x = x + block.attn.c_proj(y.transpose(1, 2).reshape(B, 1, -1))
            x = x + block.mlp(norm(x))
            if i == m.backout_layer:
                x_mid = x
        if m.backout_lambda is not None:
            x = x - m.backout_lambda * x_mid
        cache.row_pos.add_(1)
        cache.row_prev.copy_(token[:, 0])
        return m.softcap(self.head_matmul(norm(x)).float())[:, 0]

    @staticmethod
    def masks(cache: KVCache, key_pos: torch.Tensor) -> list[torch.Tensor]:
        """Each layer's (B, 1, 1, keys) mask for this step, one tensor per distinct kind: the
        positions up to each row's own inside the layer's window (pos - W ..= pos: an "L"
        layer's W is sequence_len, which slides only past it); a ring's filled slots (slot
        s ≤ pos until it wraps, then every slot holds one of the last W + 1 positions)."""
        pos = cache.row_pos.view(-1, 1)
        B, made = pos.size(0), {}
        out = []
        for layer, window in enumerate(cache.windows):
            kind = "ring" if cache.is_ring(layer) else window
            if kind not in made:
                if kind == "ring":
                    mk = cache.ring_slot.view(1, -1) <= pos
                else:
                    mk = (key_pos.view(1, -1) <= pos) & (key_pos.view(1, -1) >= pos - window)
                made[kind] = mk.view(B, 1, 1, -1)
            out.append(made[kind])
        return out


RECOMPILE_LIMIT = 64  # graphs of the step per process (torch's default, 8, is per function)
CACHE_STEP = 128      # a compiled or captured step's cache grows in steps of this many positions


def recompile_limit_patch(limit: int = RECOMPILE_LIMIT):
    """dynamo's per-function graph limit raised, under the name this torch has: it is
    `recompile_limit` from torch 2.7 and `cache_size_limit` before (patching a name that does
    not exist raises AttributeError, which crashed every compiled decode on torch 2.5/2.6)."""
    import torch._dynamo
    cfg = torch._dynamo.config
    return cfg.patch(**{recompile_limit_name(cfg): limit})


def recompile_limit_name(cfg) -> str:
    return "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"


def compile_step(step: DecodeStep):
    """The step compiled: static shapes but for the number of positions attention reads
    (`key_pos`), which is dynamic, so one graph serves every length instead of one graph per
    step or attention over all max_len positions (on CPU that costs ~16% at batch 64, d4). A new
    batch size or cache size is a new graph (the engine grows a compiled step's cache in steps of
    CACHE_STEP; a dynamic cache size measured 2.5–5% slower at d4 on CPU). The recompile limit
    is raised while the step runs: every engine's step is the same function to dynamo, and past
    the limit it silently runs eager. On CPU with inductor's freezing, which inductor reads when
    dynamo traces, so every call that may compile runs inside it."""
    fn = torch.compile(step, dynamic=False)
    freezing = step.model.lm_head.weight.device.type == "cpu"

    def call(token, cache, key_pos=None):
        if key_pos is not None:
            torch._dynamo.maybe_mark_dynamic(key_pos, 0)
        with recompile_limit_patch(), torch._inductor.config.patch(freezing=freezing):
            return fn(token, cache, key_pos)
    return call
