"""Generated task problems: SFT training data and the offline evaluation suite, from one source.

No package ships GSM8K-style or ARC-style data, so the offline suite is generated: tiny, exact
tasks a small chat model can learn from a few thousand examples and be scored on exactly.

    arithmetic   What is 37 + 48?                                          → 85
    spelling     Spell the word 'apple' letter by letter.                  → a-p-p-l-e
    counting     How many times does the letter 'p' appear in 'apple'?     → 2
    copying      Repeat exactly: green river stone                         → green river stone
    choice       Which word is the longest?\\nA. cat\\nB. house ... Answer with the letter.  → B

Train and eval problems never overlap: each prompt belongs to a split by a hash of its text
(`split_of`), whatever the seed, word list or number asked for, so SFT data built on one machine
and an evaluation run on another (with another word list) still never share a problem.
"""
from __future__ import annotations

import functools
import hashlib
import os
import random
import re
import string
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from nanochat.common import UserError, print0
from nanochat.data.offline import chatterbot_dialogues

KINDS = ("arithmetic", "spelling", "counting", "copying", "choice")
CHOICE_KINDS = ("choice",)          # scored by the letter with the highest logit, not generation
SPLITS = ("train", "eval")
EVAL_ONE_IN = 10                    # one prompt in 10 (by hash) is an eval problem
TASK_SEED = 0                       # the seed SFT data and the eval suite generate with
LETTERS = "ABCDEFGH"
# Debian's wamerican, then the older generic name for a system word list.
DICT_PATHS = ("/usr/share/dict/american-english", "/usr/share/dict/words")
WORD_RE = re.compile(r"[a-z]{3,10}")  # lowercase ascii words short enough to spell out


@dataclass(frozen=True)
class Problem:
    kind: str                       # a KINDS entry, or a hub task name (arc_easy, gsm8k...)
    prompt: str                     # the user message
    answer: str                     # the exact reply (a letter for multiple choice)
    choices: list[str] | None = None  # multiple choice: the options, lettered A, B, ... in order


def split_of(prompt: str) -> str:
    """'eval' or 'train', fixed by the prompt's text alone (stable across machines and seeds)."""
    h = int.from_bytes(hashlib.sha1(prompt.encode("utf-8")).digest()[:8], "big")
    return "eval" if h % EVAL_ONE_IN == 0 else "train"


def choice_prompt(question: str, choices: Sequence[str]) -> str:
    """The multiple-choice layout shared by the generated `choice` task and ARC."""
    lines = [question] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(choices)]
    return "\n".join(lines + ["Answer with the letter."])


def problem_conversation(p: Problem) -> dict:
    return {"messages": [{"role": "user", "content": p.prompt},
                         {"role": "assistant", "content": p.answer}]}


# --------------------------------------------------------------------------------------------
# One candidate of each kind. Numbers stay small and answers short: a tiny model must be able to
# learn them, and an exact-match score is only meaningful when the answer has one spelling.

def _arithmetic(rng: random.Random, words: Sequence[str]) -> Problem:
    op = rng.choice("+-×")
    if op == "+":
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        result = a + b
    elif op == "-":  # a ≥ b: no negative answers
        a = rng.randint(0, 99)
        b = rng.randint(0, a)
        result = a - b
    else:
        a, b = rng.randint(0, 12), rng.randint(0, 12)
        result = a * b
    return Problem("arithmetic", f"What is {a} {op} {b}?", str(result))


def _spelling(rng: random.Random, words: Sequence[str]) -> Problem:
    w = rng.choice(words)
    return Problem("spelling", f"Spell the word '{w}' letter by letter.", "-".join(w))


def _counting(rng: random.Random, words: Sequence[str]) -> Problem:
    w = rng.choice(words)
    # mostly a letter of the word; sometimes any letter, so that 0 is a possible answer
    c = rng.choice(w) if rng.random() < 0.75 else rng.choice(string.ascii_lowercase)
    return Problem("counting", f"How many times does the letter '{c}' appear in '{w}'?",
                   str(w.count(c)))


def _copying(rng: random.Random, words: Sequence[str]) -> Problem:
    text = " ".join(rng.choice(words) for _ in range(rng.randint(2, 5)))
    return Problem("copying", f"Repeat exactly: {text}", text)


def _choice(rng: random.Random, words: Sequence[str]) -> Problem:
    if rng.random() < 0.5:
        if len(words) < 4:
            raise UserError(f"the word list has {len(words)} words; the choice task needs ≥ 4")
        while True:  # four distinct words with exactly one longest
            options = rng.sample(words, 4)
            lengths = sorted(map(len, options))
            if lengths[-1] > lengths[-2]:
                break
        correct = max(options, key=len)
        question = "Which word is the longest?"
    else:
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        correct = a + b
        wrong = rng.sample([d for d in (-10, -2, -1, 1, 2, 10) if correct + d >= 0], 3)
        options = [correct] + [correct + d for d in wrong]
        rng.shuffle(options)
        options, correct = [str(o) for o in options], str(correct)
        question = f"Which of these is {a} + {b}?"
    letter = LETTERS[options.index(correct)]
    return Problem("choice", choice_prompt(question, options), letter, list(options))


GENERATORS = {"arithmetic": _arithmetic, "spelling": _spelling, "counting": _counting,
              "copying": _copying, "choice": _choice}


def generate_problems(kind: str, n: int, split: str, seed: int, words: Sequence[str]) -> list[Problem]:
    """`n` distinct problems of `kind` from `split` ('train' or 'eval'), the same ones for the
    same (kind, n, split, seed, words). Fewer (with a warning) when the kind runs out of distinct
    prompts, e.g. spelling with a very small word list."""
    if kind not in GENERATORS:
        raise UserError(f"unknown task kind {kind!r}; valid: {', '.join(KINDS)}")
    if split not in SPLITS:
        raise UserError(f"unknown task split {split!r}; valid: {', '.join(SPLITS)}")
    if kind != "arithmetic" and not words:
        raise UserError(f"task {kind} needs a word list; none was given")
    words = sorted(set(words))  # the order given must not change the problems
    rng = random.Random(f"{kind}/{seed}")  # str seeds hash with sha512: stable across runs
    gen = GENERATORS[kind]
    seen: set[str] = set()
    out: list[Problem] = []
    # An eval candidate turns up 1 time in EVAL_ONE_IN; past this many tries the kind has (nearly)
    # run out of distinct prompts and more tries would only find duplicates.
    for _ in range(EVAL_ONE_IN * 20 * n + 1000):
        if len(out) == n:
            break
        p = gen(rng, words)
        if p.prompt in seen:
            continue
        seen.add(p.prompt)
        if split_of(p.prompt) == split:
            out.append(p)
    if len(out) < n:
        print0(f"tasks: only {len(out)} distinct {split} problems of kind {kind} (asked {n}); "
               f"a larger word list (apt-get install wamerican) gives more")
    return out


# --------------------------------------------------------------------------------------------
# The word list

def words_from_text(texts) -> list[str]:
    """Sorted distinct lowercase ascii words of 3–10 letters (capitalised words are names or
    sentence starts; their lowercase form usually appears elsewhere)."""
    found = set()
    for text in texts:
        found.update(w for w in re.findall(r"[A-Za-z]+", text) if WORD_RE.fullmatch(w))
    return sorted(found)


@functools.lru_cache(maxsize=8)
def _load_words(dict_paths: tuple[str, ...], offline_cache: str, package: str) -> tuple[str, ...]:
    for path in dict_paths:
        p = Path(path)
        if p.is_file():
            words = sorted({w for w in p.read_text(errors="replace").split()
                            if WORD_RE.fullmatch(w)})
            print0(f"tasks: {len(words):,} words from {p}")
            if words:
                return tuple(words)
    texts = [s for dialogue in chatterbot_dialogues(offline_cache, package) for s in dialogue]
    words = words_from_text(texts)
    print0(f"tasks: {len(words):,} words from the {package} dialogues (no word list at "
           f"{' or '.join(dict_paths) or '(none given)'}; apt-get install wamerican for ~50k)")
    if not words:
        raise UserError(f"no words found in {package}; install wamerican (apt-get install wamerican)")
    return tuple(words)


def load_words(dict_paths: Sequence[str] = DICT_PATHS, offline_cache: str = "cache/pip",
               package: str = "chatterbot-corpus==1.3.3") -> list[str]:
    """Words for the generated tasks: the system word list (Debian `wamerican`) filtered to
    lowercase ascii words of 3–10 letters, or, where there is none, the words of the chatterbot
    corpus (always reachable through PyPI; downloaded into `offline_cache`)."""
    return list(_load_words(tuple(map(str, dict_paths)), str(offline_cache), package))

# --------------------------------------------------------------------------------------------
# Hub tasks: the test splits of ARC and GSM8K through `datasets` (eval.hub_tasks), when the hub
# answers; `nanochat.prepare` fetches them into the datasets cache, which jobs read offline.

# hub task → (dataset repo, config); first eval.hub_problems rows of the test split
HUB_DATASETS = {"arc_easy": ("allenai/ai2_arc", "ARC-Easy"),
                "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge"),
                "gsm8k": ("openai/gsm8k", "main")}

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str | None) -> str | None:
    """The last number in the text, without thousands separators or a trailing '.0' (GSM8K)."""
    found = _NUMBER.findall(text or "")
    if not found:
        return None
    n = found[-1].replace(",", "")
    return n[:-2] if n.endswith(".0") else n


def load_hub_problems(task: str, n: int) -> list[Problem]:
    """The first `n` test problems of a hub task (raises whatever `datasets` raises offline)."""
    import datasets
    repo, config = HUB_DATASETS[task]
    ds = datasets.load_dataset(repo, config, split="test")
    rows = ds.select(range(min(n, len(ds))))
    problems = []
    for row in rows:
        if task == "gsm8k":
            answer = final_number(row["answer"].rpartition("####")[2])
            problems.append(Problem(task, row["question"], answer))
        else:  # ARC: labels are A-E or 1-5; re-letter the options A, B, ... in their order
            texts, labels = row["choices"]["text"], row["choices"]["label"]
            answer = LETTERS[labels.index(row["answerKey"])]
            problems.append(Problem(task, choice_prompt(row["question"], texts), answer,
                                    list(texts)))
    return problems


def hub_unreachable(timeout: float = 10) -> str | None:
    """Why the hub can't be used (offline mode, no route to it), or None. `datasets` retries an
    unreachable host for ~25 s per dataset first: right for a blip, wrong for a node without
    internet, where every hub task would cost that before being skipped."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").upper() in ("1", "ON", "YES", "TRUE"):
            return f"{var} is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        pass  # the server answered; `datasets` says what is wrong, if anything
    except (urllib.error.URLError, OSError) as e:
        return f"cannot reach {endpoint}: {getattr(e, 'reason', e)}"
    return None
