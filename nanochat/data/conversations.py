"""Conversations for SFT (what they hold, per source: `python -m nanochat.data RECIPE`).

    sets = load_sft_conversations(recipe, "train")   # ConversationSet(conversations, skipped, sources)

Sources (`sft.source`):
- "offline": the English dialogues of the PyPI wheel `sft.offline_package` (chatterbot-corpus,
  ~2,000 short conversations, read from the wheel's zip with PyYAML, never installed) plus
  `sft.task_examples` generated problems per task kind (nanochat/data/problems.py, its train split only:
  the eval problems never become SFT data, in either SFT split);
- "smoltalk": the `messages` column of `sft.hub_dataset` on the Hugging Face hub.
`sft.conversation_files` (JSONL, one {"messages": [...]} per line) are added to either.

Every conversation passes the tokenizer's `check_conversation` (the same rule rendering uses);
malformed ones are skipped and counted, not fatal. The validation split is a `sft.val_fraction`
share chosen by a hash of each conversation (smoltalk: its own test split), so train and val
never overlap and a conversation keeps its split when files are added.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path


from nanochat.common import UserError, downloads_allowed, not_prepared, print0
from nanochat.data.offline import chatterbot_dialogues
from nanochat.config import Recipe
from nanochat.tokenizer import check_conversation
from nanochat.data import problems as generated

SHUFFLE_SEED = 0        # the conversations' order (the SFT loader may shuffle again per epoch)
SPLITS = ("train", "val")
WARN_FIRST = 5          # malformed lines reported one by one per file; the rest are counted


@dataclass
class ConversationSet:
    conversations: list[dict]       # {"messages": [{"role", "content"}, ...]}, valid, shuffled
    skipped: int = 0                # malformed conversations skipped while reading the sources
    sources: dict[str, int] = field(default_factory=dict)  # source → conversations kept here


# --------------------------------------------------------------------------------------------
# One conversation

def clean_conversation(conversation) -> dict:
    """The conversation as {"messages": [{role, content}, ...]}: checked by the tokenizer's rule
    (system message merged into the first user message), extra keys dropped, and a final user
    message without a reply dropped (nothing in it is trained). UserError (one line) if unusable."""
    messages = [{"role": m["role"], "content": m["content"]}
                for m in check_conversation(conversation)]
    if messages[-1]["role"] == "user":
        messages = messages[:-1]
    if not messages:
        raise UserError("conversation has no assistant reply to learn from")
    return {"messages": messages}


def conversation_key(conversation: dict) -> str:
    return json.dumps(conversation["messages"], ensure_ascii=False, sort_keys=True)


def is_val(conversation: dict, val_fraction: float) -> bool:
    """Stable split by content: the same conversation is in the same split on every machine."""
    h = hashlib.sha1(conversation_key(conversation).encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < val_fraction


def dialogue_conversation(turns) -> dict:
    """[user, assistant, user, ...] → a clean conversation (UserError if unusable)."""
    roles = ("user", "assistant")
    return clean_conversation({"messages": [{"role": roles[i % 2], "content": t}
                                            for i, t in enumerate(turns)]})


# --------------------------------------------------------------------------------------------
# Conversation files

def read_conversation_file(path: str | Path) -> tuple[list[dict], int]:
    """(clean conversations, malformed lines skipped) of a JSONL file. A missing or empty file,
    or one with no valid conversation, is a UserError naming the file; a malformed line is
    skipped with a warning (`file:line: reason`) for the first few."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"conversation file {path} not found; fix or remove it in "
                        f"sft.conversation_files") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"conversation file {path} cannot be read ({type(e).__name__}: {e}); "
                        f"fix or remove it in sft.conversation_files") from None
    conversations, problems, lines = [], [], 0
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        lines += 1
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})")
            continue
        try:
            conversations.append(clean_conversation(obj))
        except UserError as e:
            problems.append(f"{path}:{lineno}: {e}")
    if lines == 0:
        raise UserError(f"conversation file {path} is empty; it needs one "
                        '{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]} per '
                        "line (sft.conversation_files)")
    if not conversations:
        raise UserError(f"{problems[0]} (no conversation in the file is valid; fix it or remove "
                        f"it from sft.conversation_files)")
    for p in problems[:WARN_FIRST]:
        print0(f"sft data: skipped {p}")
    if len(problems) > WARN_FIRST:
        print0(f"sft data: skipped {len(problems) - WARN_FIRST} more malformed lines of {path}")
    return conversations, len(problems)


# --------------------------------------------------------------------------------------------
# Sources

def _offline(recipe: Recipe) -> tuple[list[tuple[str, dict]], int]:
    """(source name, conversation) pairs of the chatterbot dialogues and the generated problems."""
    out, skipped = [], 0
    for turns in chatterbot_dialogues(recipe.data.offline_cache, recipe.sft.offline_package):
        try:
            out.append(("chatterbot", dialogue_conversation(turns)))
        except UserError:
            skipped += 1
    if recipe.sft.task_examples > 0:
        words = generated.load_words(offline_cache=recipe.data.offline_cache,
                                 package=recipe.sft.offline_package)
        for kind in generated.KINDS:
            # "train" problems only, whichever SFT split this is: eval problems stay unseen
            for p in generated.generate_problems(kind, recipe.sft.task_examples, "train",
                                             generated.TASK_SEED, words):
                out.append((f"tasks/{kind}", generated.problem_conversation(p)))
    return out, skipped


def _smoltalk(recipe: Recipe, split: str) -> tuple[list[tuple[str, dict]], int]:
    import datasets
    name, hub_split = recipe.sft.hub_dataset, "train" if split == "train" else "test"
    try:
        ds = datasets.load_dataset(name, split=hub_split)
    except Exception as e:  # ConnectionError offline, DatasetNotFoundError, HTTP errors...
        if not downloads_allowed():  # a job: HF_DATASETS_OFFLINE, and it is not in the cache
            raise not_prepared(f"sft.hub_dataset {name} (split {hub_split})") from None
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
        raise UserError(f"could not load sft.hub_dataset {name} (split {hub_split}) from the hub "
                        f"({type(e).__name__}: {first[:200]}); check the network and HF_ENDPOINT "
                        f"(HF_HUB_OFFLINE unset), or set sft.source=offline") from None
    if "messages" not in ds.column_names:
        raise UserError(f"sft.hub_dataset {name} has no 'messages' column (columns: "
                        f"{ds.column_names}); use a chat dataset like HuggingFaceTB/smol-smoltalk")
    out, skipped = [], 0
    for batch in ds.iter(batch_size=1024):  # not ds["messages"]: one column copy, not two
        for messages in batch["messages"]:
            try:
                out.append(("smoltalk", clean_conversation({"messages": messages})))
            except UserError:
                skipped += 1
    return out, skipped


def load_sft_conversations(recipe: Recipe, split: str) -> ConversationSet:
    """The `split` ('train' or 'val') conversations of the recipe's sources and files, deduplicated,
    in a fixed shuffled order."""
    if split not in SPLITS:
        raise UserError(f"unknown SFT split {split!r}; valid: {', '.join(SPLITS)}")
    if recipe.sft.source == "offline":
        pairs, skipped = _offline(recipe)
        by_hash = True
    else:
        pairs, skipped = _smoltalk(recipe, split)
        by_hash = False  # the hub's own train/test split decides
    candidates = [(source, conv, by_hash) for source, conv in pairs]
    for path in recipe.sft.conversation_files:
        convs, bad = read_conversation_file(path)
        skipped += bad
        candidates += [(f"file:{path}", conv, True) for conv in convs]
    want_val = split == "val"
    seen, kept, sources, dups = set(), [], {}, 0
    for source, conv, hashed in candidates:
        if hashed and is_val(conv, recipe.sft.val_fraction) != want_val:
            continue
        key = conversation_key(conv)
        if key in seen:
            dups += 1
            continue
        seen.add(key)
        kept.append(conv)
        sources[source] = sources.get(source, 0) + 1
    random.Random(SHUFFLE_SEED).shuffle(kept)
    if dups:
        print0(f"sft data: {dups} duplicate conversations dropped from the {split} split")
    return ConversationSet(kept, skipped, sources)


# --------------------------------------------------------------------------------------------
