"""Validation losses, the evaluation function `train_loop` calls (and `nanochat.eval` reuses).

- base: bits per byte on the pretraining validation shard — summed cross-entropy (nats) over
  the UTF-8 bytes of the targets, so runs with different tokenizers compare (nanochat's BPB);
- SFT: mean cross-entropy per assistant token of held-out conversations, packed as training
  packs them.

Each `make_*` returns `evaluate(model) -> {metric: value}`, summed across ranks.
"""
from __future__ import annotations

import torch

from nanochat.data.loaders import DataLoader
from nanochat.runtime import Runtime
from nanochat.data.loaders import SFTLoader
from nanochat.tokenizer import Tokenizer


def make_bpb_evaluator(val_paths, tokenizer: Tokenizer, rt: Runtime, batch_size: int,
                       seq_len: int, eval_tokens: int):
    """Validation bits per byte: summed cross-entropy (nats) over the UTF-8 bytes of the target
    tokens; special tokens (0 bytes) are excluded. Tokenizer-independent, unlike loss."""
    token_bytes = torch.tensor(tokenizer.token_byte_lengths(), dtype=torch.float32, device=rt.device)
    steps = max(1, eval_tokens // (batch_size * seq_len * rt.dist.world_size))

    def evaluate(model) -> dict:
        loader = DataLoader(val_paths, tokenizer, batch_size, seq_len, rt.dist.rank,
                            rt.dist.world_size, rt.device, loop=True)
        nats = torch.zeros((), device=rt.device)
        nbytes = torch.zeros((), device=rt.device)
        for _ in range(steps):
            x, y = next(loader)
            loss = model(x, y, loss_reduction="none").view(-1)
            b = token_bytes[y.reshape(-1)]
            nats += (loss * (b > 0)).sum()
            nbytes += b.sum()
        if rt.dist.is_distributed:
            torch.distributed.all_reduce(nats)
            torch.distributed.all_reduce(nbytes)
        return {"val_bpb": (nats / (torch.log(torch.tensor(2.0)) * nbytes)).item()}
    return evaluate


def make_loss_evaluator(items, tokenizer: Tokenizer, rt: Runtime, batch_size: int, seq_len: int,
                        max_tokens: int):
    """Validation loss: mean cross-entropy (nats) per assistant token of held-out conversations,
    packed exactly as training packs them (up to `max_tokens` row tokens per rank)."""
    steps = max(1, max_tokens // (batch_size * seq_len))

    def evaluate(model) -> dict:
        loader = SFTLoader(items, batch_size, seq_len, tokenizer.bos_token_id, rt.dist.rank,
                           rt.dist.world_size, rt.device, loop=False)
        nats = torch.zeros((), device=rt.device)
        count = torch.zeros((), device=rt.device)
        for _, (x, y) in zip(range(steps), loader):
            loss = model(x, y, loss_reduction="none").view(-1)
            keep = (y.reshape(-1) >= 0)
            nats += (loss * keep).sum()
            count += keep.sum()
        if rt.dist.is_distributed:
            torch.distributed.all_reduce(nats)
            torch.distributed.all_reduce(count)
        return {"val_loss": (nats / count.clamp(min=1)).item()}
    return evaluate
