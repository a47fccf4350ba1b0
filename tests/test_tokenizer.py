"""Tokenizer: trained with rustbpe on a little real text (the stdlib's own prose and code), run
with tiktoken; save/load, byte lengths and the chat template's mask."""
import argparse
import json
import textwrap

import pytest

from nanochat.common import UserError
from nanochat.config import TokenizerArgs
from nanochat.tokenizer import (SPECIAL_TOKENS, TOKENIZER_FILE, Tokenizer,
                                capped_texts, train_tokenizer, validate_tokenizer_args)

UNICODE = "Grüße, naïve café — 東京 🚀 señor Ωmega\tend\n"


def real_texts():
    # Real English prose and code that every Python install has: the source of a few modules.
    texts = []
    for mod in (argparse, json, textwrap):
        src = open(mod.__file__, encoding="utf-8").read()
        texts += [src[i:i + 2000] for i in range(0, len(src), 2000)]
    return texts + [UNICODE] * 3


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(real_texts(), 600)


def test_train_vocab_and_special_ids(tok):
    assert tok.vocab_size == 600, "enough text for every merge asked"
    ids = [tok.encode_special(s) for s in SPECIAL_TOKENS]
    assert ids == list(range(600 - len(SPECIAL_TOKENS), 600)), "specials are the last ids"
    assert tok.bos_token_id == ids[0]
    for s in SPECIAL_TOKENS:
        assert tok.enc.encode(s, allowed_special="all") == [tok.encode_special(s)], \
            f"{s} must be a single token"
    with pytest.raises(UserError, match="unknown special token"):
        tok.encode_special("<|nope|>")


@pytest.mark.parametrize("text", ["hello world", "def f(x):\n    return x  # ok", UNICODE, "",
                                  "\U0001f600" * 3 + "\x00\x7f"])
def test_roundtrip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_encode_batch_prepend_append(tok):
    texts = ["the parser", UNICODE]
    batch = tok.encode(texts, prepend="<|bos|>", append=tok.encode_special("<|assistant_end|>"))
    assert batch == [[tok.bos_token_id] + tok.encode(t) + [tok.encode_special("<|assistant_end|>")]
                     for t in texts]
    # Special-token text inside a document is ordinary text, not a control token.
    assert tok.bos_token_id not in tok.encode("<|bos|>")
    assert tok.decode(tok.encode("<|bos|>")) == "<|bos|>"


def test_save_load_identical(tok, tmp_path):
    path = tok.save(tmp_path)
    assert path == tmp_path / TOKENIZER_FILE and not list(tmp_path.glob(".*.tmp")), "atomic"
    tok2 = Tokenizer.load(tmp_path)
    texts = real_texts()[:20] + [UNICODE]
    assert tok2.encode(texts) == tok.encode(texts)
    assert tok2.vocab_size == tok.vocab_size and tok2.special_ids == tok.special_ids
    assert tok2.token_byte_lengths() == tok.token_byte_lengths()


def test_token_byte_lengths_sum_to_utf8_bytes(tok):
    lengths = tok.token_byte_lengths()
    assert len(lengths) == tok.vocab_size
    assert all(lengths[tok.encode_special(s)] == 0 for s in SPECIAL_TOKENS)
    assert all(n > 0 for i, n in enumerate(lengths) if i < tok.vocab_size - len(SPECIAL_TOKENS))
    text = "Quoth the parser: " + UNICODE
    ids = tok.encode(text, prepend="<|bos|>")
    assert sum(lengths[i] for i in ids) == len(text.encode("utf-8"))


def test_tiny_text_stops_early():
    tok = Tokenizer.train(["hello world"], 300)
    assert 256 + len(SPECIAL_TOKENS) <= tok.vocab_size < 300, "rustbpe ran out of pairs"
    assert tok.decode(tok.encode("hello world!")) == "hello world!"


CONV = {"messages": [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And 3+3? ñ"},
    {"role": "assistant", "content": "6, señor."},
]}


def test_render_conversation_mask(tok):
    ids, mask = tok.render_conversation(CONV)
    assert len(ids) == len(mask) and ids[0] == tok.bos_token_id and mask[0] == 0
    masked = tok.decode([i for i, m in zip(ids, mask) if m])
    assert masked == "It is 4.<|assistant_end|>6, señor.<|assistant_end|>"
    unmasked = tok.decode([i for i, m in zip(ids, mask) if not m])
    assert unmasked == ("<|bos|><|user_start|>What is 2+2?<|user_end|><|assistant_start|>"
                        "<|user_start|>And 3+3? ñ<|user_end|><|assistant_start|>")
    ids5, mask5 = tok.render_conversation(CONV, max_tokens=5)
    assert (ids5, mask5) == (ids[:5], mask[:5])


def test_system_message_merged(tok):
    conv = {"messages": [{"role": "system", "content": "Be brief."}] + CONV["messages"][:2]}
    ids, mask = tok.render_conversation(conv)
    assert tok.decode(ids).startswith("<|bos|><|user_start|>Be brief.\n\nWhat is 2+2?<|user_end|>")
    assert conv["messages"][1]["content"] == "What is 2+2?", "the input is not modified"
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "It is 4.<|assistant_end|>"


@pytest.mark.parametrize("messages", [
    [{"role": "assistant", "content": "hi"}],
    [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
    [{"role": "system", "content": "a"}, {"role": "assistant", "content": "b"}],
    [{"role": "user", "content": 3}],
    [],
])
def test_bad_conversations(tok, messages):
    with pytest.raises(UserError):
        tok.render_conversation({"messages": messages})


def test_render_for_completion(tok):
    ids = tok.render_for_completion(CONV)
    assert ids[-1] == tok.encode_special("<|assistant_start|>")
    assert tok.decode(ids).endswith("<|user_start|>And 3+3? ñ<|user_end|><|assistant_start|>")
    assert tok.render_for_completion({"messages": CONV["messages"][:3]}) == ids
    assert len(CONV["messages"]) == 4, "the input is not modified"


def test_vocab_too_small_is_user_error():
    for v in (100, 255, 256 + len(SPECIAL_TOKENS) - 1):
        with pytest.raises(UserError, match="vocab_size"):
            Tokenizer.train(["hello"], v)  # must not reach rustbpe's PanicException
    with pytest.raises(UserError, match="train_chars"):
        validate_tokenizer_args(TokenizerArgs(train_chars=0))


def test_load_missing_or_corrupt(tok, tmp_path):
    with pytest.raises(UserError, match=str(tmp_path / "nowhere")):
        Tokenizer.load(tmp_path / "nowhere")
    tok.save(tmp_path)
    path = tmp_path / TOKENIZER_FILE
    good = json.loads(path.read_text())
    bad_files = [
        path.read_text()[:1000],  # truncated JSON
        json.dumps({**good, "mergeable_ranks": good["mergeable_ranks"][:100]}),
        json.dumps({**good, "mergeable_ranks": ["!!notbase64 0"] + good["mergeable_ranks"][1:]}),
        json.dumps({**good, "format": "something-else"}),
        json.dumps({k: v for k, v in good.items() if k != "pattern"}),
        "[]",
    ]
    for text in bad_files:
        path.write_text(text)
        with pytest.raises(UserError, match="tokenizer file .*tokenizer.json"):
            Tokenizer.load(tmp_path)


def test_capped_texts():
    out = capped_texts(["abcdef", "gh", "ijkl"], max_chars=7, doc_cap=4)
    assert list(out) == ["abcd", "gh", "i"]


def test_train_tokenizer(tmp_path, capsys):
    args = TokenizerArgs(vocab_size=400, train_chars=50_000, doc_cap=1000)
    tok = train_tokenizer(args, iter(real_texts()), tmp_path / "tok")
    assert tok.vocab_size == 400
    assert Tokenizer.load(tmp_path / "tok").encode(UNICODE) == tok.encode(UNICODE)
    out = capsys.readouterr().out
    assert "vocab_size 400" in out and "50,000 chars" in out
    with pytest.raises(UserError):
        train_tokenizer(TokenizerArgs(vocab_size=10), iter(["x"]), tmp_path / "bad")
