"""The pretraining loader: BOS-aligned best-fit packing, rank slices, exact resume."""
import itertools

import torch

from nanochat.data.loaders import DataLoader, list_blocks, pack_rows

BOS = 0


def test_pack_rows_every_row_full_and_bos_led():
    docs = [[BOS] + [1 + (i * 7 + j) % 50 for j in range(n)] for i, n in
            enumerate([3, 70, 5, 200, 12, 33, 1, 64, 90, 8] * 5)]
    rows = pack_rows(docs, 65, BOS)
    assert rows and all(len(r) == 65 and r[0] == BOS for r in rows)


def test_pack_rows_cuts_documents_only_to_fill_a_row_end():
    """Inside a row, every segment but the last is a whole document or the remainder of one that
    was cut at the end of an earlier row: documents are cut only where a row must be filled."""
    docs = [[BOS] + [i + 1] * n for i, n in enumerate([10, 20, 30, 5, 7, 25, 3, 12, 9, 14])]
    rows = pack_rows(docs, 33, BOS)
    assert len(rows) == 4
    for r in rows:
        starts = [i for i, t in enumerate(r) if t == BOS] + [len(r)]
        inner = [r[a + 1:b] for a, b in zip(starts, starts[1:])][:-1]
        for seg in inner:
            assert any(d[1:][-len(seg):] == seg for d in docs), f"{seg} is not a document tail"


def test_pack_rows_loses_only_the_last_partial_row():
    docs = [[BOS] + [5] * n for n in [40, 17, 99, 3, 61, 28, 150, 7]]
    rows = pack_rows(docs, 33, BOS)
    text_in = sum(len(d) - 1 for d in docs)
    text_out = sum(sum(1 for t in r if t != BOS) for r in rows)
    assert text_in - 32 <= text_out <= text_in


def test_blocks_are_dealt_to_ranks_without_overlap(corpus):
    paths = corpus["train"]
    blocks = list_blocks(paths, block_docs=64)
    per_rank = [DataLoader(paths, corpus["tokenizer"], 2, 32, r, 3, block_docs=64).blocks for r in range(3)]
    assert sorted(itertools.chain(*per_rank), key=blocks.index) == blocks
    assert not set(per_rank[0]) & set(per_rank[1])


def test_batches_are_shifted_inputs_and_targets(corpus):
    loader = DataLoader(corpus["train"], corpus["tokenizer"], 4, 48)
    x, y = next(loader)
    assert x.shape == y.shape == (4, 48) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.all(x[:, 0] == corpus["tokenizer"].bos_token_id)


def test_resume_continues_at_the_exact_next_batch(corpus):
    tok, paths = corpus["tokenizer"], corpus["train"]
    straight = DataLoader(paths, tok, 3, 40, block_docs=16)
    expected = [next(straight) for _ in range(40)]  # crosses several block boundaries
    first = DataLoader(paths, tok, 3, 40, block_docs=16)
    for _ in range(17):
        next(first)
    resumed = DataLoader(paths, tok, 3, 40, block_docs=16, state=first.state_dict())
    for i in range(17, 40):
        x, y = next(resumed)
        assert torch.equal(x, expected[i][0]) and torch.equal(y, expected[i][1]), f"batch {i}"


def test_loader_wraps_into_a_new_epoch(corpus):
    loader = DataLoader(corpus["val"], corpus["tokenizer"], 8, 64)
    first = next(loader)
    for _ in range(10_000):
        next(loader)
        if loader.epoch == 1:
            break
    assert loader.epoch == 1
    fresh = DataLoader(corpus["val"], corpus["tokenizer"], 8, 64)
    assert torch.equal(next(fresh)[0], first[0])
