"""The training loaders: pretraining rows from parquet shards, and SFT batches of fixed shape.

Pretraining (`DataLoader`). The corpus is cut into *blocks*: up to `block_docs` consecutive
documents of one parquet row group. Blocks are listed from parquet metadata alone and dealt
round-robin to ranks (rank r takes blocks r, r + W, ...). Each block is tokenized (every document led by BOS) and packed into rows of
T + 1 tokens, best-fit: a row starts with a whole document and its free space is filled with the
largest remaining piece that fits; when none fits, the next piece is cut to fill the row and its
remainder goes back with a fresh BOS. Documents longer than a row are cut the same way, so every
row starts with BOS and no text is discarded. The block's last, incomplete row is dropped (at most
one row per block).

Packing is a pure function of the block, so the loader's state is just (epoch, block, row) of the
next row to produce: a resumed run re-packs that block and continues at the exact next batch.

SFT (`SFTLoader`): whole conversations packed best-fit into (B, T) rows.

Every conversation is rendered with the chat template into (ids, mask), mask = 1 on the tokens
the model learns to produce (assistant content and <|assistant_end|>). Rows hold T + 1 tokens:
the first T are the inputs, the last T the targets, and a target is -1 (ignored by the loss)
wherever the predicted token is not an assistant token or is padding.

Why packing, and why best-fit. Compiling with `dynamic=False` needs one shape for the whole run.
The seed reports got it by padding every row to 2047 tokens — paying for padding instead of
recompiles. Upstream nanochat packs whole conversations best-fit into fixed rows; so do we:
within a block of conversations, best-fit decreasing (open a row with the longest remaining
conversation, fill it with the longest that still fits, repeat; pad only what no conversation
fits). A conversation is never split across rows; one longer than T + 1 is truncated to a row of
its own and counted. Rows start with BOS because every conversation does. Attention is not
masked between conversations of a row (as in nanochat's packed training); each conversation
starts with BOS, which the model learns to treat as a boundary.

Like the pretraining loader, packing is a pure function of (epoch, block), so the state is
(epoch, block, row) and a resumed run continues at the exact next batch. Blocks are dealt
round-robin to ranks; the conversation order is reshuffled each epoch with a fixed seed.
What packing saves over padding each conversation to T + 1 (the seeds' way): docs/benchmarks.md.
"""
from __future__ import annotations

import bisect
import random
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import torch


@dataclass(frozen=True)
class Block:
    shard: int      # index into the loader's shard list
    row_group: int
    start: int      # first document (row) within the row group
    stop: int


def list_blocks(paths: list[Path], block_docs: int) -> list[Block]:
    blocks = []
    for si, path in enumerate(paths):
        meta = pq.ParquetFile(path).metadata
        for rg in range(meta.num_row_groups):
            n = meta.row_group(rg).num_rows
            for start in range(0, n, block_docs):
                blocks.append(Block(si, rg, start, min(n, start + block_docs)))
    return blocks


def read_block(path: Path, block: Block) -> list[str]:
    table = pq.ParquetFile(path).read_row_group(block.row_group, columns=["text"])
    return table.column("text").slice(block.start, block.stop - block.start).to_pylist()


def pack_rows(docs: list[list[int]], row_len: int, bos: int) -> list[list[int]]:
    """Best-fit pack BOS-led token lists into rows of exactly `row_len` tokens (see module doc).

    Linear scans are fine here: a block holds a few hundred pieces."""
    pieces: list[list[int]] = []
    for d in docs:  # cut documents longer than a row; each piece keeps a leading BOS
        d = d if d and d[0] == bos else [bos] + d
        while len(d) > row_len:
            pieces.append(d[:row_len])
            d = [bos] + d[row_len:]
        if len(d) > 1:  # a lone BOS carries no text
            pieces.append(d)
    rows = []
    while pieces:
        row = list(pieces.pop(0))  # a copy: pieces may be the caller's lists
        while len(row) < row_len and pieces:
            space = row_len - len(row)
            best = -1
            for i, p in enumerate(pieces):  # largest piece that fits; first one wins ties
                if len(p) <= space and (best < 0 or len(p) > len(pieces[best])):
                    best = i
                    if len(p) == space:
                        break
            if best >= 0:
                row += pieces.pop(best)
            else:  # nothing fits: cut the oldest piece, its remainder leads the next row
                p = pieces[0]
                row += p[:space]
                pieces[0] = [bos] + p[space:]
        if len(row) < row_len:
            break  # the block's last, incomplete row
        rows.append(row)
    return rows


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host batch → device (pinned and non-blocking on CUDA: the copy overlaps the step)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class BlockCursor:
    """The position (epoch, block, row) over this rank's blocks, shared by the pretraining and
    SFT loaders. Packing a block is a pure function of (epoch, block), so this triple is the whole
    loader state: a resumed run re-packs one block and continues at the exact next row.
    A loader calls `_start(n_blocks, loop, state)` and implements `rows_of(epoch, block_idx)`."""

    def _start(self, n_blocks: int, loop: bool, state: dict | None) -> None:
        self.n_blocks, self.loop = n_blocks, loop
        self.epoch, self.block_idx, self.row_idx = 0, 0, 0
        self._rows = None
        if state is not None:
            self.load_state_dict(state)

    def rows_of(self, epoch: int, block_idx: int) -> list:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "block": self.block_idx, "row": self.row_idx}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.block_idx, self.row_idx = state["epoch"], state["block"], state["row"]
        self._rows = None

    def _next_row(self):
        """The next row, wrapping to a new epoch when `loop`; None after a single pass."""
        while True:
            if self.block_idx >= self.n_blocks:  # a finished single pass (loop=False)
                return None
            if self._rows is None:
                self._rows = self.rows_of(self.epoch, self.block_idx)
            if self.row_idx < len(self._rows):
                self.row_idx += 1
                return self._rows[self.row_idx - 1]
            self.block_idx, self.row_idx, self._rows = self.block_idx + 1, 0, None
            if self.block_idx == self.n_blocks and self.loop:
                self.epoch, self.block_idx = self.epoch + 1, 0

    def _take_rows(self, n: int) -> list:
        rows = []
        while len(rows) < n and (row := self._next_row()) is not None:
            rows.append(row)
        return rows

    def __iter__(self):
        return self


class DataLoader(BlockCursor):
    """Yields (inputs, targets) of shape (B, T) for this rank, forever (epochs wrap around).

    `state_dict()` describes the next batch; `load_state_dict()` continues exactly there.
    """

    def __init__(self, paths: list[Path], tokenizer, batch_size: int, seq_len: int,
                 rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu",
                 block_docs: int = 256, state: dict | None = None, loop: bool = True):
        self.paths = [Path(p) for p in paths]
        self.tokenizer = tokenizer
        self.B, self.T = batch_size, seq_len
        self.device = torch.device(device)
        blocks = list_blocks(self.paths, block_docs)
        self.blocks = blocks[rank::world_size]
        if not self.blocks:
            raise ValueError(f"rank {rank} of {world_size} has no data: {len(blocks)} blocks in "
                             f"{len(self.paths)} shards; use fewer ranks or smaller blocks")
        self._start(len(self.blocks), loop, state)

    def rows_of(self, epoch: int, block_idx: int) -> list[list[int]]:
        block = self.blocks[block_idx]  # the same rows every epoch: blocks are fixed
        texts = read_block(self.paths[block.shard], block)
        docs = self.tokenizer.encode(texts, prepend=self.tokenizer.bos_token_id)
        return pack_rows(docs, self.T + 1, self.tokenizer.bos_token_id)

    def __next__(self):
        rows = self._take_rows(self.B)
        if not rows or (len(rows) < self.B and self.loop):
            raise StopIteration
        t = to_device(torch.tensor(rows, dtype=torch.long), self.device)
        return t[:, :-1], t[:, 1:]


# --- SFT: conversations packed into fixed rows -------------------------------------------

@dataclass
class Rendered:
    """Conversations as (ids, mask) pairs, each at most `row_len` tokens."""
    items: list[tuple[list[int], list[int]]]
    truncated: int          # conversations longer than a row, cut to one row
    no_target: int          # conversations without an assistant token (inside a row): dropped


def render_conversations(tokenizer, conversations: list[dict], row_len: int) -> Rendered:
    items, truncated, no_target = [], 0, 0
    for conv in conversations:
        ids, mask = tokenizer.render_conversation(conv)
        if len(ids) > row_len:
            ids, mask = ids[:row_len], mask[:row_len]
            truncated += 1
        if not any(mask[1:]):  # nothing to learn (the first token is never a target)
            no_target += 1
            continue
        items.append((ids, mask))
    return Rendered(items, truncated, no_target)


def pack_bestfit(lengths: list[int], row_len: int) -> list[list[int]]:
    """Indices of the items in each row, best-fit decreasing. Every item lands in exactly one
    row; a row's lengths sum to at most `row_len` (items are ≤ row_len)."""
    remaining = sorted((n, i) for i, n in enumerate(lengths))  # ascending by length, then index
    rows = []
    while remaining:
        n, i = remaining.pop()              # the longest remaining opens a row
        row, space = [i], row_len - n
        while space > 0 and remaining:
            k = bisect.bisect_right(remaining, (space, len(lengths))) - 1
            if k < 0:
                break                       # nothing fits: pad the rest
            n, i = remaining.pop(k)         # the longest that fits
            row.append(i)
            space -= n
        rows.append(row)
    return rows


def rows_to_tensors(rows, row_len: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, row_len) token ids and 0/1 target masks, padded with pad_id / 0."""
    ids = torch.full((len(rows), row_len), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), row_len), dtype=torch.bool)
    for r, row in enumerate(rows):
        pos = 0
        for tok, m in row:
            ids[r, pos:pos + len(tok)] = torch.tensor(tok)
            mask[r, pos:pos + len(m)] = torch.tensor(m, dtype=torch.bool)
            pos += len(tok)
    return ids, mask


def to_batch(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = ids[:, :-1]
    y = torch.where(mask[:, 1:], ids[:, 1:], torch.full_like(ids[:, 1:], -1))
    return x, y


class SFTLoader(BlockCursor):
    """Yields (inputs, targets) of shape (B, T) for this rank.

    `loop=True` wraps around epochs forever (training); `loop=False` stops after one pass and
    yields a short last batch (evaluation). `state_dict()` describes the next batch."""

    def __init__(self, items, batch_size: int, seq_len: int, pad_id: int, rank: int = 0,
                 world_size: int = 1, device: str | torch.device = "cpu", seed: int = 0,
                 block_size: int = 1024, loop: bool = True, state: dict | None = None):
        self.items = items
        self.B, self.T, self.pad_id = batch_size, seq_len, pad_id
        self.device = torch.device(device)
        # small sets (a validation split) get smaller blocks, so that every rank has one
        block_size = max(1, min(block_size, len(items) // world_size))
        self.seed, self.block_size = seed, block_size
        n_blocks = -(-len(items) // block_size)
        self.my_blocks = list(range(rank, n_blocks, world_size))
        if not self.my_blocks:
            raise ValueError(f"rank {rank} of {world_size} has no conversations ({len(items)} in "
                             f"{n_blocks} blocks of {block_size}); use fewer ranks")
        self.real_tokens = 0      # non-pad tokens yielded so far
        self.total_tokens = 0
        self._start(len(self.my_blocks), loop, state)

    def rows_of(self, epoch: int, block_idx: int):
        return self.block_rows(epoch, self.my_blocks[block_idx])

    def block_rows(self, epoch: int, block: int):
        """The rows of one block in one epoch: a pure function (resume re-derives it)."""
        order = list(range(len(self.items)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        chosen = [self.items[i] for i in order[block * self.block_size:(block + 1) * self.block_size]]
        rows = [[chosen[i] for i in row] for row in pack_bestfit([len(ids) for ids, _ in chosen], self.T + 1)]
        # best-fit decreasing leaves rows sorted by their longest conversation: shuffle them so
        # batches don't run from long to short conversations within a block
        random.Random(self.seed * 1_000_003 + epoch * 7919 + block).shuffle(rows)
        return rows

    def __next__(self):
        rows = self._take_rows(self.B)
        if not rows:
            raise StopIteration
        ids, mask = rows_to_tensors(rows, self.T + 1, self.pad_id)
        real = sum(len(t) for row in rows for t, _ in row)
        self.real_tokens += real          # counted over rows of T + 1, as packing_stats does
        self.total_tokens += ids.numel()
        x, y = to_batch(ids, mask)
        return to_device(x, self.device), to_device(y, self.device)


def packing_stats(items, seq_len: int, block_size: int = 1024, seed: int = 0) -> dict:
    """Rows and the fraction of real (non-pad) tokens in one epoch (epoch 0, one rank)."""
    loader = SFTLoader(items, 1, seq_len, pad_id=0, seed=seed, block_size=block_size, loop=False)
    rows = [row for b in range(-(-len(items) // block_size)) for row in loader.block_rows(0, b)]
    real, total = sum(len(t) for row in rows for t, _ in row), len(rows) * (seq_len + 1)
    return {"rows": len(rows), "tokens": total, "real_tokens": real, "real_token_fraction": real / max(1, total)}
