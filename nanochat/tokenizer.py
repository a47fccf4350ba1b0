"""BPE tokenizer: trained with rustbpe, run with tiktoken, stored as one portable JSON file.

rustbpe trains fast but tiktoken encodes faster (and pickles, which DataLoader workers need), and
both give identical ids for the same ranks, so we train with one and run with the other. We never
call `tiktoken.get_encoding`: it downloads its ranks, which fails offline.

Also here: nanochat's chat template (`render_conversation`), whose mask says which tokens the
model is trained to predict during SFT.
"""
from __future__ import annotations

import base64
import binascii
import copy
import json
import time
from pathlib import Path
from typing import Iterable, Iterator

import tiktoken

from nanochat.common import UserError, atomic_write_json, print0
from nanochat.config import TokenizerArgs  # the recipe's tokenizer section

SPECIAL_TOKENS = [
    "<|bos|>",  # every document starts with it (a document delimiter during pretraining)
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",  # the assistant calls the python tool...
    "<|python_end|>",
    "<|output_start|>",  # ...and the tool's output comes back here
    "<|output_end|>",
]

TOKENIZER_FILE = "tokenizer.json"
FORMAT = "nanochat-bpe-v1"  # bump when the file layout changes, so old files fail loudly


def validate_tokenizer_args(args: TokenizerArgs) -> None:
    # Checked here because rustbpe panics (a BaseException, not an Exception) on vocab < 256.
    min_vocab = 256 + len(SPECIAL_TOKENS)
    if not isinstance(args.vocab_size, int) or args.vocab_size < min_vocab:
        raise UserError(f"tokenizer.vocab_size={args.vocab_size!r} is too small: it must be an "
                        f"integer ≥ {min_vocab} (256 byte tokens + {len(SPECIAL_TOKENS)} special "
                        f"tokens); 32768 is a good default")
    if not isinstance(args.train_chars, int) or args.train_chars <= 0:
        raise UserError(f"tokenizer.train_chars={args.train_chars!r} must be a positive integer")
    if not isinstance(args.doc_cap, int) or args.doc_cap <= 0:
        raise UserError(f"tokenizer.doc_cap={args.doc_cap!r} must be a positive integer")


def capped_texts(texts: Iterable[str], max_chars: int, doc_cap: int) -> Iterator[str]:
    """Yield texts cut to `doc_cap` characters each, stopping once `max_chars` have been yielded.

    The cap per document keeps a few huge documents from dominating the merge statistics."""
    total = 0
    for text in texts:
        if total >= max_chars:
            return
        text = text[:min(doc_cap, max_chars - total)]
        total += len(text)
        yield text


def check_conversation(conversation) -> list[dict]:
    """The messages with a leading system message merged into the first user message (the
    template has no system role); UserError for anything out of shape. The one rule for what a
    conversation is: rendering uses it, and so does loading SFT data (nanochat/data/conversations.py)."""
    if not isinstance(conversation, dict) or not isinstance(conversation.get("messages"), list):
        raise UserError('a conversation must be {"messages": [{"role": ..., "content": ...}, '
                        f'...]}}; got {str(conversation)[:80]!r}')
    messages = conversation["messages"]
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise UserError(f"message {i} of conversation must have role system|user|assistant"
                            f" and string content; got {str(m)[:80]!r}")
    if messages and messages[0]["role"] == "system":
        if len(messages) < 2 or messages[1]["role"] != "user":
            raise UserError("a system message must be followed by a user message (message 1)")
        messages = copy.deepcopy(messages)
        messages[1]["content"] = messages[0]["content"] + "\n\n" + messages[1]["content"]
        messages = messages[1:]
    if not messages:
        raise UserError("conversation has no messages")
    for i, m in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise UserError(f"conversation roles must alternate user/assistant starting with "
                            f"user; message {i} (after merging any system message) is "
                            f"{m['role']!r}, expected {expected!r}")
    return messages


class Tokenizer:
    """A tiktoken Encoding with nanochat's special tokens and chat template."""

    def __init__(self, enc: tiktoken.Encoding):
        self.enc = enc
        self.special_ids = {name: enc.encode_single_token(name) for name in SPECIAL_TOKENS}
        self._byte_lengths: list[int] | None = None

    # ---------------------------------------------------------------------------------------
    # Building, saving, loading

    @classmethod
    def from_ranks(cls, pattern: str, mergeable_ranks: dict[bytes, int]) -> "Tokenizer":
        # Special tokens go right after the ordinary ones so that the vocabulary is contiguous.
        n = len(mergeable_ranks)
        special = {name: n + i for i, name in enumerate(SPECIAL_TOKENS)}
        enc = tiktoken.Encoding("nanochat", pat_str=pattern, mergeable_ranks=mergeable_ranks,
                                special_tokens=special)
        return cls(enc)

    @classmethod
    def train(cls, text_iterator: Iterable[str], vocab_size: int) -> "Tokenizer":
        """Train on the texts. rustbpe may stop early on little text (no pair left to merge), so
        the result's `vocab_size` can be smaller than asked."""
        import rustbpe
        validate_tokenizer_args(TokenizerArgs(vocab_size=vocab_size))
        trainer = rustbpe.Tokenizer()
        # pattern=None: rustbpe's default, the GPT-4 split pattern.
        trainer.train_from_iterator(iter(text_iterator), vocab_size - len(SPECIAL_TOKENS))
        ranks = {bytes(b): int(r) for b, r in trainer.get_mergeable_ranks()}
        return cls.from_ranks(trainer.get_pattern(), ranks)

    def save(self, directory: str | Path) -> Path:
        """Write `<directory>/tokenizer.json` atomically. The ranks are stored as tiktoken's
        `.tiktoken` lines ("base64(token bytes) rank") so that any tiktoken user can read them."""
        path = Path(directory) / TOKENIZER_FILE
        ranks = self.enc._mergeable_ranks  # tiktoken keeps no public accessor for these
        atomic_write_json(path, {
            "format": FORMAT,
            "pattern": self.enc._pat_str,
            "special_tokens": self.special_ids,
            "mergeable_ranks": [f"{base64.b64encode(tok).decode()} {rank}"
                                for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])],
        })
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "Tokenizer":
        path = Path(directory) / TOKENIZER_FILE
        if not path.is_file():
            raise UserError(f"no tokenizer at {path}: train the tokenizer first, or point at the "
                            f"directory that holds {TOKENIZER_FILE}")
        try:
            obj = json.loads(path.read_text())
            if obj.get("format") != FORMAT:
                raise ValueError(f"format is {obj.get('format')!r}, expected {FORMAT!r}")
            ranks = {}
            for line in obj["mergeable_ranks"]:
                tok, rank = line.split(" ")
                ranks[base64.b64decode(tok, validate=True)] = int(rank)
            if sorted(ranks.values()) != list(range(len(ranks))) or len(ranks) < 256:
                raise ValueError("ranks are not 0..n-1 over ≥ 256 distinct tokens")
            tok = cls.from_ranks(obj["pattern"], ranks)
        except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as e:
            raise UserError(f"corrupt tokenizer file {path} ({type(e).__name__}: {e}); "
                            f"delete it and train the tokenizer again") from None
        if obj.get("special_tokens") != tok.special_ids:
            raise UserError(f"tokenizer file {path} has special tokens {obj.get('special_tokens')} "
                            f"that differ from this code's; train the tokenizer again")
        return tok

    # ---------------------------------------------------------------------------------------
    # Encoding and decoding

    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab

    @property
    def bos_token_id(self) -> int:
        return self.special_ids["<|bos|>"]

    def encode_special(self, name: str) -> int:
        try:
            return self.special_ids[name]
        except KeyError:
            raise UserError(f"unknown special token {name!r}; valid: {', '.join(SPECIAL_TOKENS)}") \
                from None

    def _id(self, token: int | str) -> int:
        return self.encode_special(token) if isinstance(token, str) else int(token)

    def encode(self, text: str | list[str], prepend: int | str | None = None,
               append: int | str | None = None):
        """str → list[int]; list[str] → list[list[int]]. Special-token text inside `text` is
        encoded as ordinary text (a document can't inject control tokens)."""
        pre = [] if prepend is None else [self._id(prepend)]
        post = [] if append is None else [self._id(append)]
        if isinstance(text, str):
            return pre + self.enc.encode_ordinary(text) + post
        if isinstance(text, list):
            return [pre + ids + post for ids in self.enc.encode_ordinary_batch(text)]
        raise TypeError(f"encode expects str or list[str], got {type(text).__name__}")

    def decode(self, ids) -> str:
        return self.enc.decode(list(ids))

    def token_byte_lengths(self) -> list[int]:
        """UTF-8 bytes per token id, 0 for special tokens: bits-per-byte divides the loss by the
        bytes the tokens stand for, which makes losses comparable across vocabularies."""
        if self._byte_lengths is None:
            special = set(self.special_ids.values())
            self._byte_lengths = [0 if i in special else len(self.enc.decode_single_token_bytes(i))
                                  for i in range(self.vocab_size)]
        return self._byte_lengths

    # ---------------------------------------------------------------------------------------
    # Chat template

    def render_conversation(self, conversation, max_tokens: int | None = None):
        """→ (ids, mask): mask is 1 on the tokens the model learns to produce (assistant content
        and <|assistant_end|>), 0 on everything it is only shown."""
        ids, mask = [], []

        def add(tokens, m):
            ids.extend(tokens)
            mask.extend([m] * len(tokens))

        add([self.bos_token_id], 0)
        for m in check_conversation(conversation):
            if m["role"] == "user":
                add([self.special_ids["<|user_start|>"]], 0)
                add(self.enc.encode_ordinary(m["content"]), 0)
                add([self.special_ids["<|user_end|>"]], 0)
            else:
                add([self.special_ids["<|assistant_start|>"]], 0)
                add(self.enc.encode_ordinary(m["content"]), 1)
                add([self.special_ids["<|assistant_end|>"]], 1)
        if max_tokens is not None:
            ids, mask = ids[:max_tokens], mask[:max_tokens]
        return ids, mask

    def render_for_completion(self, conversation) -> list[int]:
        """Prompt ids for the engine: the conversation without a final assistant message, then
        <|assistant_start|> so that the model writes the reply."""
        messages = conversation.get("messages") if isinstance(conversation, dict) else None
        if isinstance(messages, list) and messages and isinstance(messages[-1], dict) \
                and messages[-1].get("role") == "assistant":
            conversation = {**conversation, "messages": messages[:-1]}
        ids, _ = self.render_conversation(conversation)
        return ids + [self.special_ids["<|assistant_start|>"]]


def train_tokenizer(args: TokenizerArgs, text_iterator: Iterable[str],
                    out_dir: str | Path) -> Tokenizer:
    """Train on at most `args.train_chars` characters (`args.doc_cap` per document), save to
    `out_dir`, and return the tokenizer."""
    validate_tokenizer_args(args)
    n_chars = 0

    def counted():
        nonlocal n_chars
        for text in capped_texts(text_iterator, args.train_chars, args.doc_cap):
            n_chars += len(text)
            yield text

    t0 = time.time()
    tok = Tokenizer.train(counted(), args.vocab_size)
    path = tok.save(out_dir)
    print0(f"tokenizer: trained on {n_chars:,} chars in {time.time() - t0:.1f}s; "
           f"vocab_size {tok.vocab_size:,}"
           + (f" (asked {args.vocab_size:,}: the text ran out of pairs to merge)"
              if tok.vocab_size < args.vocab_size else "") + f"; saved {path}")
    return tok
