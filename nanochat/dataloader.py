"""Distributed, resumable, BOS-aligned pretraining loader over parquet shards.

The corpus is cut into *blocks*: up to `block_docs` consecutive documents of one parquet row
group. Blocks are listed from parquet metadata alone and dealt round-robin to ranks (rank r takes
blocks r, r + W, ...). Each block is tokenized (every document led by BOS) and packed into rows of
T + 1 tokens, best-fit: a row starts with a whole document and its free space is filled with the
largest remaining piece that fits; when none fits, the next piece is cut to fill the row and its
remainder goes back with a fresh BOS. Documents longer than a row are cut the same way, so every
row starts with BOS and no text is discarded. The block's last, incomplete row is dropped (at most
one row per block).

Packing is a pure function of the block, so the loader's state is just (epoch, block, row) of the
next row to produce: a resumed run re-packs that block and continues at the exact next batch.
"""
from __future__ import annotations

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
