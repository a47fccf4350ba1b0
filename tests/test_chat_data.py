"""SFT conversations and generated tasks: the real chatterbot-corpus wheel (one pip download per
session, into conftest's `pip_cache`), real JSONL files, the tokenizer's own conversation rule."""
import json
import re
import time
from pathlib import Path

import pytest

from nanochat.data import problems as generated
from nanochat.data.__main__ import main
from nanochat.data.conversations import (ConversationSet, conversation_key, load_sft_conversations,
                                         read_conversation_file)
from nanochat.common import UserError, cli_main
from nanochat.recipe import recipe_from_dict
from nanochat.tokenizer import check_conversation

TASK_EXAMPLES = 300


def sft_recipe(pip_cache, **sft):
    return recipe_from_dict({"data": {"offline_cache": str(pip_cache)},
                             "sft": {"task_examples": TASK_EXAMPLES, **sft}})


@pytest.fixture(scope="module")
def words(pip_cache):
    # dict_paths=(): the fallback every machine has, whether or not wamerican is installed
    return generated.load_words(dict_paths=(), offline_cache=str(pip_cache))


@pytest.fixture(scope="module")
def offline_sets(pip_cache):
    recipe = sft_recipe(pip_cache)
    return {split: load_sft_conversations(recipe, split) for split in ("train", "val")}


def good_line(i: int) -> str:
    return json.dumps({"messages": [{"role": "user", "content": f"question {i}?"},
                                    {"role": "assistant", "content": f"answer {i}"}]})


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg, f"a user error is one line: {msg!r}"
    return msg


# ---------------------------------------------------------------- word list

def test_word_list_falls_back_to_the_chatterbot_corpus(words):
    assert len(words) > 1000
    assert all(re.fullmatch(r"[a-z]{3,10}", w) for w in words)
    assert words == sorted(set(words))
    assert "computer" in words


def test_word_list_from_a_dictionary_file_keeps_short_lowercase_ascii_words(tmp_path, pip_cache):
    d = tmp_path / "words"
    d.write_text("apple\nApple\napple's\nab\nabcdefghijk\ncafé\nzebra\nabcdefghij\n")
    got = generated.load_words(dict_paths=(str(tmp_path / "missing"), str(d)),
                           offline_cache=str(pip_cache))
    assert got == ["abcdefghij", "apple", "zebra"]


@pytest.mark.skipif(not Path(generated.DICT_PATHS[0]).is_file(), reason="wamerican not installed")
def test_system_word_list_is_used_when_installed():
    assert len(generated.load_words()) > 30_000


# ---------------------------------------------------------------- generated problems

@pytest.mark.parametrize("kind", generated.KINDS)
def test_train_and_eval_problems_are_disjoint_and_deterministic(kind, words):
    train = generated.generate_problems(kind, 500, "train", 0, words)
    evals = generated.generate_problems(kind, 100, "eval", 0, words)
    assert len(train) == 500 and len(evals) == 100
    assert len({p.prompt for p in train}) == 500, "no duplicates"
    assert not {p.prompt for p in train} & {p.prompt for p in evals}
    assert generated.generate_problems(kind, 500, "train", 0, list(reversed(words))) == train, \
        "same seed, same problems (whatever the word order)"
    other = generated.generate_problems(kind, 500, "train", 1, words)
    assert other != train and all(generated.split_of(p.prompt) == "train" for p in other)
    assert not {p.prompt for p in other} & {p.prompt for p in evals}, "disjoint for any seed"


def recomputed_answer(p: generated.Problem) -> str:
    if p.kind == "arithmetic":
        a, op, b = re.fullmatch(r"What is (\d+) ([-+×]) (\d+)\?", p.prompt).groups()
        return str({"+": int(a) + int(b), "-": int(a) - int(b), "×": int(a) * int(b)}[op])
    if p.kind == "spelling":
        return "-".join(re.fullmatch(r"Spell the word '(\w+)' letter by letter\.", p.prompt)[1])
    if p.kind == "counting":
        c, w = re.fullmatch(r"How many times does the letter '(\w)' appear in '(\w+)'\?", p.prompt).groups()
        return str(w.count(c))
    if p.kind == "copying":
        return p.prompt.removeprefix("Repeat exactly: ")
    lines = p.prompt.split("\n")
    options = [ln[3:] for ln in lines[1:-1]]
    assert options == p.choices and lines[-1] == "Answer with the letter."
    if lines[0] == "Which word is the longest?":
        best = max(options, key=len)
        assert sum(len(o) == len(best) for o in options) == 1, "one longest word"
    else:
        a, b = re.fullmatch(r"Which of these is (\d+) \+ (\d+)\?", lines[0]).groups()
        best = str(int(a) + int(b))
        assert options.count(best) == 1 and len(set(options)) == 4
    return "ABCD"[options.index(best)]


@pytest.mark.parametrize("kind", generated.KINDS)
def test_answers_are_correct(kind, words):
    problems = generated.generate_problems(kind, 200, "train", 0, words)
    problems += generated.generate_problems(kind, 50, "eval", 0, words)
    for p in problems:
        assert p.answer == recomputed_answer(p), p
    if kind == "counting":
        assert {p.answer for p in problems} >= {"0", "1", "2"}, "zero counts occur too"


# ---------------------------------------------------------------- offline SFT conversations

def test_offline_conversations_load_valid_and_split_disjointly(offline_sets):
    train, val = offline_sets["train"], offline_sets["val"]
    assert isinstance(train, ConversationSet)
    total = len(train.conversations) + len(val.conversations)
    assert total >= 1500
    assert train.sources["chatterbot"] + val.sources["chatterbot"] > 800  # ~900 distinct dialogues
    for kind in generated.KINDS:
        assert train.sources[f"tasks/{kind}"] + val.sources.get(f"tasks/{kind}", 0) == TASK_EXAMPLES
    assert sum(train.sources.values()) == len(train.conversations)
    for conv in train.conversations + val.conversations:
        assert check_conversation(conv) == conv["messages"]
        assert conv["messages"][-1]["role"] == "assistant", "a final unanswered turn is dropped"
    train_keys = {conversation_key(c) for c in train.conversations}
    val_keys = {conversation_key(c) for c in val.conversations}
    assert len(train_keys) == len(train.conversations), "no duplicates"
    assert not train_keys & val_keys
    assert 0.02 < len(val.conversations) / total < 0.10, "about val_fraction = 0.05"


def test_offline_conversations_are_deterministic(pip_cache, offline_sets):
    again = load_sft_conversations(sft_recipe(pip_cache), "train")
    assert again.conversations == offline_sets["train"].conversations


def test_sft_data_never_contains_eval_problems(offline_sets, pip_cache):
    prompts = {c["messages"][0]["content"] for s in offline_sets.values() for c in s.conversations}
    words = generated.load_words(offline_cache=str(pip_cache))  # the list SFT used (eval uses it too)
    for kind in generated.KINDS:
        evals = generated.generate_problems(kind, 100, "eval", generated.TASK_SEED, words)
        assert not {p.prompt for p in evals} & prompts, kind


def test_task_conversations_render_with_the_answer_as_the_trained_part(corpus, words):
    tok = corpus["tokenizer"]
    p = generated.generate_problems("spelling", 1, "train", 0, words)[0]
    ids, mask = tok.render_conversation(generated.problem_conversation(p))
    trained = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(trained[:-1]) == p.answer
    assert trained[-1] == tok.encode_special("<|assistant_end|>")


# ---------------------------------------------------------------- conversation files

def test_file_of_good_lines_with_a_few_malformed_keeps_the_good_ones(tmp_path, pip_cache, capsys):
    path = tmp_path / "convs.jsonl"
    lines = [good_line(i) for i in range(1000)]
    lines[10] = '{"messages": [{"role": "user", "content": "hi"'  # truncated JSON
    lines.insert(500, json.dumps({"messages": [{"role": "assistant", "content": "a"},
                                               {"role": "user", "content": "q"}]}))
    lines.insert(700, json.dumps({"messages": [{"role": "user"}]}))  # no content
    lines.insert(800, "")  # blank lines are not conversations
    lines.append(good_line(10))  # puts back the one the truncated line replaced
    path.write_text("\n".join(lines) + "\n")
    convs, skipped = read_conversation_file(path)
    assert len(convs) == 1000 and skipped == 3
    out = capsys.readouterr().out
    assert f"{path}:11: not valid JSON" in out and f"{path}:501: conversation roles must alternate" in out

    recipe = sft_recipe(pip_cache, conversation_files=[str(path)], task_examples=0)
    sets = [load_sft_conversations(recipe, split) for split in ("train", "val")]
    assert sum(s.sources[f"file:{path}"] for s in sets) == 1000
    assert all(s.skipped >= 3 for s in sets)


def test_empty_or_missing_conversation_file_is_a_one_line_error(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(UserError) as e:
        read_conversation_file(empty)
    assert str(empty) in one_line(e) and "sft.conversation_files" in str(e.value)
    with pytest.raises(UserError) as e:
        read_conversation_file(tmp_path / "missing.jsonl")
    assert "missing.jsonl not found" in one_line(e) and "sft.conversation_files" in str(e.value)


def test_file_with_no_valid_conversation_names_the_first_bad_line(tmp_path):
    path = tmp_path / "swapped.jsonl"
    swapped = {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}
    path.write_text("\n" + "\n".join(json.dumps(swapped) for _ in range(5)) + "\n")
    with pytest.raises(UserError) as e:
        read_conversation_file(path)
    assert one_line(e).startswith(f"{path}:2: conversation roles must alternate")


def test_system_message_is_merged_and_extra_keys_dropped(tmp_path):
    path = tmp_path / "system.jsonl"
    path.write_text(json.dumps({"id": 7, "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi", "name": "x"},
        {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "unanswered"}]}))
    (conv,), skipped = read_conversation_file(path)
    assert skipped == 0 and conv == {"messages": [{"role": "user", "content": "Be brief.\n\nHi"},
                                                  {"role": "assistant", "content": "Hello"}]}


# ---------------------------------------------------------------- hub source and CLI

def test_smoltalk_offline_fails_fast_naming_the_offline_source(pip_cache):
    t0 = time.perf_counter()
    with pytest.raises(UserError) as e:
        load_sft_conversations(sft_recipe(pip_cache, source="smoltalk"), "train")
    assert "sft.source=offline" in one_line(e) and "HuggingFaceTB/smol-smoltalk" in str(e.value)
    assert time.perf_counter() - t0 < 20


def test_smoltalk_source_reads_the_messages_of_the_train_and_test_splits(tmp_path, monkeypatch):
    """The real `datasets.load_dataset` path, on a local directory named like a hub repo (datasets
    looks for a local directory before the hub)."""
    import datasets
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")  # not ~/.cache
    repo = tmp_path / "local" / "chat"
    repo.mkdir(parents=True)
    swapped = json.dumps({"messages": [{"role": "assistant", "content": "a"}]})
    (repo / "train.jsonl").write_text("\n".join([good_line(i) for i in range(5)] + [swapped]))
    (repo / "test.jsonl").write_text("\n".join(good_line(i) for i in range(100, 102)))
    recipe = recipe_from_dict({"sft": {"source": "smoltalk", "hub_dataset": "local/chat"}})
    train, val = (load_sft_conversations(recipe, split) for split in ("train", "val"))
    assert (len(train.conversations), train.skipped, train.sources) == (5, 1, {"smoltalk": 5})
    assert val.sources == {"smoltalk": 2}, "val is the dataset's own test split"
    assert {c["messages"][0]["content"] for c in val.conversations} == {"question 100?", "question 101?"}


def test_cli_prints_counts_per_source(pip_cache, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"data: {{offline_cache: {pip_cache}}}\nsft: {{task_examples: 20}}\n")
    assert cli_main(main, [str(recipe), "--samples", "1"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^train: [\d,]+ conversations \(\d+ malformed skipped\)", out, re.M)
    assert re.search(r"^\s+tasks/choice\s+\d+", out, re.M) and "assistant:" in out
    assert cli_main(main, [str(recipe), "sft.conversation_files=[nowhere.jsonl]"]) == 2
    assert "nowhere.jsonl not found" in capsys.readouterr().err
