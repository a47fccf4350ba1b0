"""Inference engine: a static KV cache, one prefill, then one token per step.

    engine = Engine(model)                       # model in its inference dtype, eval mode
    for step in engine.generate([ids_a, ids_b], max_new_tokens=64, temperature=0.8, top_k=50,
                                stop_tokens=[tok.encode_special("<|assistant_end|>")], seed=0):
        ...                                      # step[r]: row r's new token, None once it stopped
    rows = engine.generate_batch(ids, num_samples=16, temperature=1.0, seed=0)

Design (gpt-fast's pattern, see /work/shared/notes/style.md §7):
- The cache is allocated once for batch × (longest prompt + max_new_tokens) and reused while the
  shapes fit. Prompts of different lengths share one batch: they are right-padded and prefilled
  together (causal attention keeps the padding from touching real positions), then every row
  decodes at its own position (`KVCache.start_rows`, `decode.DecodeStep`); padding left in the
  cache is overwritten or masked before any row can see it.
- Several samples of one prompt: the prompt is prefilled once, its cache rows copied to every
  sample, and each sample draws its own first token from the shared logits. (The seeds copied the
  first sampled token to all samples — nanochat's "token broadcasting" bug, fixed upstream in
  Dec 2025 — so at temperature > 0 every sample began with the same token.)
- Sampling never waits for the host: the draw is the exponential race (argmax of p / Exp(1) noise,
  gpt-fast's `multinomial_sample_one_no_sync`), on a seeded torch.Generator. The one host sync
  per step is copying the sampled tokens out (streaming and stop tokens need them); on CUDA it is
  a non-blocking copy read one step late, after the next step is queued, so the GPU never idles
  while Python looks at tokens.
- The decode step writes only preallocated memory and reads no host value, so on CUDA it can be
  captured once in a CUDA graph (`cuda_graph=True`) and replayed: one launch per token instead of
  ~100 kernel launches, which is what bounds small-batch decode (the seeds' 99 tok/s at batch 1).
  `compile=True` also compiles it (static shapes but for the attended length; decode.py).
- CPU: the lm_head dominates a decode step's matmuls (33.5 of 46 MB of weights at the d4
  shape), and MKL's plain sgemm at decode's small batches runs far below the memory bandwidth.
  `head="auto"` picks MKL's packed sgemm where available (decode.py, HEAD_LAYOUTS); `compile=True`
  on CPU compiles with inductor's freezing, which packs every linear, the lm_head included.
- Greedy and sampled decoding take their argmax in two passes (`argmax_first`): torch's argmax
  over a row of 32k logits is a scalar loop on CPU (~250 µs at batch 8, d4), its max is
  vectorised (~20 µs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch


from nanochat import checkpoint as ckpt
from nanochat.common import UserError
from nanochat.config import Recipe
from nanochat.decode import CACHE_STEP, HEAD_LAYOUTS, DecodeStep, compile_step, \
    mkl_packed_available
from nanochat.gpt import GPT, GPTConfig, empty_model
from nanochat.kv_cache import KVCache
from nanochat.runtime import Runtime, compute_dtype

HEAD_T_MAX_BATCH = 32  # without MKL: above this nn.Linear's layout is as fast (d4 shape, 2 cores)


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0        # 0 = greedy (argmax)
    top_k: int | None = None        # keep the k most likely tokens; None = all
    top_p: float | None = None      # keep the smallest set whose probability reaches p; None = 1

    def check(self) -> "Sampling":
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise UserError(f"temperature must be a number ≥ 0 (0 = greedy), got {self.temperature!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise UserError(f"top_k must be an integer ≥ 1 (or unset), got {self.top_k!r}")
        if self.top_p is not None and not (isinstance(self.top_p, (int, float))
                                           and 0 < self.top_p <= 1):
            raise UserError(f"top_p must be in (0, 1], got {self.top_p!r}")
        return self


ARGMAX_BLOCK = 128


def argmax_first(x: torch.Tensor) -> torch.Tensor:
    """x (B, V) → (B, 1): the index of each row's first maximum, exactly `x.argmax(-1)`, in two
    passes: the max of each block of 128 (a vectorised reduction), the first block holding the
    row's max, then the first maximum inside that block. NaN counts as the maximum, as in
    torch.argmax (amax propagates it). Only on CPU, where torch's argmax over a vocabulary is a
    scalar loop; a GPU's argmax is already one parallel reduction, so there it is plain argmax."""
    B, V = x.shape
    if x.device.type != "cpu" or V % ARGMAX_BLOCK or V < 4 * ARGMAX_BLOCK:
        return x.argmax(dim=-1, keepdim=True)
    blocks = x.view(B, V // ARGMAX_BLOCK, ARGMAX_BLOCK)
    first = blocks.amax(dim=-1).argmax(dim=-1, keepdim=True)  # (B, 1)
    inside = blocks.gather(1, first.unsqueeze(-1).expand(B, 1, ARGMAX_BLOCK))[:, 0]
    return first * ARGMAX_BLOCK + inside.argmax(dim=-1, keepdim=True)


def sample_next(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) → next tokens (B, 1), each row drawn independently, with no host sync."""
    if s.temperature == 0:
        return argmax_first(logits)
    logits = logits.float() / s.temperature
    if s.top_k is not None and s.top_k < logits.size(-1):
        kth = torch.topk(logits, s.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p is not None and s.top_p < 1:
        # nucleus (Holtzman et al. 2019): drop a token when the tokens ranked above it already
        # hold p of the mass; the most likely token is always kept.
        srt, order = torch.sort(logits, dim=-1, descending=True)
        p = srt.softmax(dim=-1)
        srt = srt.masked_fill(p.cumsum(dim=-1) - p >= s.top_p, float("-inf"))
        logits = logits.scatter(-1, order, srt)
    probs = logits.softmax(dim=-1)
    # Exponential race: argmax_i p_i / E_i with E_i ~ Exp(1) picks i with probability p_i, like
    # torch.multinomial but without its host round trip. Clamped so that a draw of exactly 0
    # never divides a zero probability into NaN (argmax would pick NaN).
    e = torch.empty_like(probs).exponential_(1.0, generator=generator).clamp_min_(1e-30)
    return argmax_first(probs / e)


def graph_cache_len(needed: int, limit: int) -> int:
    """The cache length a compiled or captured step gets: each cache size is a graph (a compile,
    or a capture — which synchronises, collects garbage and empties the allocator's cache), so
    round up to CACHE_STEP positions and a chat that grows turn by turn reuses one cache."""
    return min(-(-needed // CACHE_STEP) * CACHE_STEP, limit)


WARM_UP_STEPS = 2  # before a CUDA-graph capture (PyTorch docs warm up on a side stream)


def warm_up(cache: KVCache, run_step: Callable, steps: int = WARM_UP_STEPS) -> None:
    """Run the decode step `steps` times and leave the cache exactly as it was. The steps write
    K/V at each row's next positions; in a sliding-window layer's ring the slot of position
    p + 1 still holds p + 1 - W, a key the real step at p reads, so restoring only the row
    state (as before) corrupted the first real step whenever a prompt had filled the ring."""
    saved = cache.save_decode_writes(steps)
    for _ in range(steps):
        run_step()
    cache.restore_decode_writes(saved, steps)


class Engine:
    """Batched generation with a static KV cache for one model (see the module docstring).

    The model must already be on its device, in its inference dtype (e.g. bf16 on CUDA), in eval
    mode; the KV cache takes the dtype of the model's parameters. `cuda_graph` captures the
    decode step once per cache shape (CUDA only); `compile` compiles it (see decode.compile_step).
    `head`: the lm_head layout of the decode step, "auto" or one of decode.HEAD_LAYOUTS (see the
    module docstring). `ring`: sliding-window layers keep only their window in the cache (a ring
    buffer, kv_cache.py; docs/benchmarks.md has the bytes saved). The decode step's weight layouts (fused q/k/v, the lm_head's) are
    snapshots, so build a new Engine after changing the weights.
    """

    def __init__(self, model: GPT, *, cuda_graph: bool = False, compile: bool = False,
                 head: str = "auto", ring: bool = True):
        self.model = model.eval()
        self.ring = ring  # sliding-window layers keep only their window (kv_cache.py)
        p = model.lm_head.weight
        self.device, self.dtype, self.config = p.device, p.dtype, model.config
        if cuda_graph and self.device.type != "cuda":
            raise UserError(f"CUDA-graph capture needs a CUDA device; the model is on {self.device}")
        self.cuda_graph, self.compiled = cuda_graph, compile
        if head != "auto" and head not in HEAD_LAYOUTS:
            raise UserError(f"head must be auto or one of {', '.join(HEAD_LAYOUTS)}, got {head!r}")
        if head == "packed" and compile:
            raise UserError("the packed lm_head can't be compiled (inductor doesn't lower MKL's "
                            "packed op); use head='linear': on CPU compile's freezing packs it")
        self._head_mode = head
        self._step: tuple[tuple[str, int], DecodeStep, Callable] | None = None  # the latest only
        self.cache: KVCache | None = None
        self._graph = self._static_logits = None

    # ------------------------------------------------------------------ set-up
    def head_layout(self, batch: int) -> str:
        if self._head_mode != "auto":
            return self._head_mode
        if self.device.type != "cpu":
            return "linear"
        if self.compiled:  # inductor can't lower the packed op; its freezing packs nn.Linear's
            return "linear"
        if mkl_packed_available() and self.dtype == torch.float32:
            return "packed"
        return "transposed" if batch <= HEAD_T_MAX_BATCH else "linear"

    def _ensure_cache(self, batch: int, max_len: int) -> KVCache:
        """The preallocated cache: reused while it has the same rows and room for max_len."""
        c = self.cache
        if self.compiled or self.cuda_graph:
            max_len = graph_cache_len(max_len, self.model.rotary_len)
        if c is None or c.batch_size != batch or c.max_len < max_len:
            self.cache = self._graph = self._static_logits = None  # free the old one first
            self.cache = KVCache(batch, max_len, self.config, self.device, self.dtype, self.ring)
        self.step(batch)
        return self.cache

    def _check(self, prompts, num_samples: int, max_new_tokens: int) -> list[list[int]]:
        if prompts and all(isinstance(t, int) for t in prompts):
            prompts = [prompts]  # one prompt given as a list of ids
        if not prompts or any(not isinstance(p, (list, tuple)) or not p for p in prompts):
            raise UserError("give at least one prompt, each a non-empty list of token ids")
        ctx, vocab = self.config.sequence_len, self.config.vocab_size
        for i, p in enumerate(prompts):
            if len(p) > ctx:
                raise UserError(f"prompt {i} has {len(p)} tokens, longer than the model's context "
                                f"of {ctx}; shorten it")
            if not all(isinstance(t, int) and 0 <= t < vocab for t in p):
                raise UserError(f"prompt {i} holds token ids outside [0, {vocab})")
        if not isinstance(num_samples, int) or num_samples < 1:
            raise UserError(f"num_samples (the batch per prompt) must be ≥ 1, got {num_samples!r}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise UserError(f"max_new_tokens must be ≥ 0, got {max_new_tokens!r}")
        longest = max(map(len, prompts)) + max_new_tokens
        if longest > self.model.rotary_len:
            raise UserError(f"prompt + max_new_tokens = {longest} tokens exceeds what the model "
                            f"can position ({self.model.rotary_len}); lower max_new_tokens")
        return [list(p) for p in prompts]

    # ------------------------------------------------------------------ the steps
    def _prefill(self, prompts: list[list[int]], n: int, cache: KVCache) -> torch.Tensor:
        """Run the prompts once, fill the cache rows (prompt i → rows i·n .. i·n+n-1) and return
        the logits after each row's last prompt token, (B, V)."""
        P, T = len(prompts), max(map(len, prompts))
        idx = torch.zeros(P, T, dtype=torch.long)
        for i, p in enumerate(prompts):
            idx[i, :len(p)] = torch.tensor(p)
        lens = torch.tensor([len(p) for p in prompts])
        last = idx[torch.arange(P), lens - 1]
        idx, lens, last = (t.to(self.device, non_blocking=True) for t in (idx, lens, last))
        cache.reset()
        if n == 1:  # the prompts fill the cache's rows directly
            cache.prefill_lens = lens  # ring layers keep each row's own last positions
            logits = self.model(idx, kv_cache=cache, logits_at=lens - 1)[:, 0]
        else:  # prefill each prompt once, then copy its rows to all its samples
            tmp = KVCache(P, cache.max_len, self.config, self.device, self.dtype, cache.ring)
            tmp.prefill_lens = lens
            logits = self.model(idx, kv_cache=tmp, logits_at=lens - 1)[:, 0]
            rows = torch.arange(P * n, device=self.device) // n
            cache.copy_rows(tmp, rows, T)
            logits, lens, last = logits[rows], lens[rows], last[rows]
            del tmp
        cache.start_rows(lens, last)
        return logits

    def _capture(self, cache: KVCache) -> None:
        """Record the decode step in a CUDA graph (PyTorch docs, "CUDA Graphs": warm up on a side
        stream, then capture). The warm-up steps really run and write into the cache, so
        `warm_up` puts back everything they overwrite (rings included), and the capture itself
        records without running."""
        B = cache.batch_size
        self._static_tok = torch.zeros(B, 1, dtype=torch.long, device=self.device)
        # torch.cuda.graph() captures on the *current* device's stream: the model's device
        # must be current (a model on cuda:1 captured from cuda:0 reads stale tokens)
        with torch.cuda.device(self.device):
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                warm_up(cache, lambda: self._step_call(B)(self._static_tok, cache, None))
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._static_logits = self._step_call(B)(self._static_tok, cache, None)
        self._graph = graph

    def step(self, batch: int) -> DecodeStep:
        """The decode step (its weight layouts) for this batch size, built once: a snapshot of
        the weights; only the latest is kept (a packed lm_head is as large as the lm_head)."""
        return self._build_step(batch)[1]

    def _step_call(self, batch: int) -> Callable:
        """What runs a step: the DecodeStep, or it compiled."""
        return self._build_step(batch)[2]

    def _build_step(self, batch: int):
        layout = self.head_layout(batch)
        key = (layout, batch if layout == "packed" else 0)
        if self._step is None or self._step[0] != key:
            self._step = None
            step = DecodeStep(self.model, head=layout, batch=batch)
            self._step = (key, step, compile_step(step) if self.compiled else step)
        return self._step

    def _decode(self, tok: torch.Tensor, cache: KVCache, attend_len: int) -> torch.Tensor:
        if self.cuda_graph:
            if self._graph is None:
                self._capture(cache)
            self._static_tok.copy_(tok)
            self._graph.replay()
            return self._static_logits
        return self._step_call(cache.batch_size)(tok, cache, cache.key_pos[:attend_len])

    def _host(self, tok: torch.Tensor, slot: int):
        """Start copying tokens to the host; on CUDA a non-blocking copy into pinned memory and an
        event to wait on, so that the next step can be queued before the host reads them."""
        if self.device.type != "cuda":
            return tok.view(-1), None
        buf = self._pinned[slot]
        stream = torch.cuda.current_stream(self.device)  # the model's device, not the current one
        with torch.cuda.stream(stream):
            buf.copy_(tok.view(-1), non_blocking=True)
        event = torch.cuda.Event()
        event.record(stream)
        return buf, event

    # ------------------------------------------------------------------ public API
    @torch.inference_mode()
    def generate(self, prompts: Sequence[int] | Sequence[Sequence[int]], num_samples: int = 1,
                 max_new_tokens: int = 64, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, stop_tokens: Sequence[int] = (),
                 seed: int | None = None, generator: torch.Generator | None = None
                 ) -> Iterator[list[int | None]]:
        """Stream tokens: yield once per step a list with one entry per row — prompt i's samples
        are rows i·num_samples .. — holding the row's new token, or None once the row has ended
        (a stop token ends a row and is not yielded). Ends after max_new_tokens steps or when
        every row has stopped. `seed` makes sampling reproducible (or pass a `generator`)."""
        prompts = self._check(prompts, num_samples, max_new_tokens)
        sampling = Sampling(temperature, top_k, top_p).check()
        if generator is None and sampling.temperature > 0:
            generator = torch.Generator(self.device)
            if seed is not None:
                generator.manual_seed(seed)
            else:
                generator.seed()
        if max_new_tokens == 0:
            return
        B, T = len(prompts) * num_samples, max(map(len, prompts))
        cache = self._ensure_cache(B, T + max_new_tokens)
        if self.device.type == "cuda" and getattr(self, "_pinned_rows", None) != B:
            self._pinned = torch.empty(2, B, dtype=torch.long, pin_memory=True)
            self._pinned_rows = B
        stop = set(int(t) for t in stop_tokens)
        live = [True] * B
        logits = self._prefill(prompts, num_samples, cache)
        tok = sample_next(logits, sampling, generator)  # every row draws its own first token
        host, event = self._host(tok, 0)
        for step in range(max_new_tokens):
            nxt = None
            if step + 1 < max_new_tokens:  # queue the next step before reading this one
                nxt = sample_next(self._decode(tok, cache, T + step + 1), sampling, generator)
            if event is not None:
                event.synchronize()
            out: list[int | None] = []
            for r, t in enumerate(host.tolist()):
                if live[r] and t in stop:
                    live[r] = False
                out.append(t if live[r] else None)
            yield out
            if nxt is None or not any(live):
                return
            tok = nxt
            host, event = self._host(tok, (step + 1) % 2)

    def generate_batch(self, prompts, num_samples: int = 1, **kwargs) -> list[list[int]]:
        """All of generate's tokens, one list per row (stop tokens left out)."""
        rows: list[list[int]] | None = None
        for step in self.generate(prompts, num_samples=num_samples, **kwargs):
            rows = rows or [[] for _ in step]
            for r, t in enumerate(step):
                if t is not None:
                    rows[r].append(t)
        if rows is None:  # max_new_tokens == 0
            n = 1 if prompts and all(isinstance(t, int) for t in prompts) else len(prompts)
            rows = [[] for _ in range(n * num_samples)]
        return rows


# --------------------------------------------------------------------------------------------
# Models for inference

def build_inference_model(config: GPTConfig, device, dtype: torch.dtype,
                          state: dict | None = None, seed: int = 0) -> GPT:
    """The GPT on `device` in `dtype` (all weights cast: decode reads every weight each step, so
    bf16 halves its bytes), eval mode; `state` from a checkpoint, else random-initialised."""
    model = empty_model(config, device)
    if state is None:
        torch.manual_seed(seed)
        model.init_weights()
    else:
        with torch.no_grad():  # the rotary tables are buffers that checkpoints don't store
            cos, sin = model.rotary_tables(device=device)
            model.cos.copy_(cos)
            model.sin.copy_(sin)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            first = str(e).splitlines()[1].strip() if "\n" in str(e) else str(e)
            raise UserError(f"checkpoint weights don't match the model its meta.json describes: "
                            f"{first[:200]}") from None
    return cast_for_inference(model, dtype)


def cast_for_inference(model: GPT, dtype: torch.dtype) -> GPT:
    """`model` with every weight in `dtype`, eval mode. The rotary tables stay fp32, as in
    training (where only autocast's matmuls are bf16): cast to bf16 they would move
    generation's and eval's logits away from training's."""
    device = model.lm_head.weight.device
    model = model.to(dtype).eval()
    cos, sin = model.rotary_tables(device=device)
    model.cos, model.sin = cos, sin
    return model


def load_model(path, device, dtype: torch.dtype | None = None) -> tuple[GPT, dict, Path]:
    """A run directory (its latest checkpoint) or a checkpoint directory → (model, meta, the
    checkpoint directory). One-line UserError for anything that is not a checkpoint. `dtype`
    None: the checkpoint's own `train.dtype` rule on this device (bf16 on CUDA by default)."""
    step_dir = ckpt.resolve_checkpoint(path)
    meta = ckpt.read_meta(step_dir)
    if dtype is None:
        train = (meta.get("recipe") or {}).get("train") or {}
        dtype = compute_dtype(torch.device(device), train.get("dtype", "auto"))
    try:
        config = GPTConfig(**meta["model_config"])
    except (KeyError, TypeError) as e:
        raise UserError(f"{step_dir}/meta.json has no usable model_config ({type(e).__name__}: {e})")
    model = build_inference_model(config, device, dtype, ckpt.load_model_state(step_dir))
    return model, meta, step_dir


def resolve_model(recipe: Recipe, rt: Runtime) -> tuple[GPT, str]:
    """(model, where it came from) for a stage that decodes: kv_bench.checkpoint, else the run's latest checkpoint, else a
    random-initialised model of the recipe's shape."""
    path = recipe.kv_bench.checkpoint or ckpt.latest_checkpoint(recipe.out_dir)
    if path is not None:
        model, _, step_dir = load_model(path, rt.device, rt.dtype)
        return model, str(step_dir)
    vocab = recipe.model.vocab_size or recipe.tokenizer.vocab_size
    config = GPTConfig.from_args(recipe.model, vocab)
    return build_inference_model(config, rt.device, rt.dtype, seed=0), "random init (seed 0)"
