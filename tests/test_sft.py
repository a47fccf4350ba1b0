"""SFT: the assistant-only loss mask, best-fit packing of whole conversations into fixed rows,
one compilation across a run, exact resume, and the bad inputs of issue 6."""
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanochat import checkpoint as ckpt
from nanochat.recipe import recipe_from_dict
from nanochat.data.loaders import SFTLoader, pack_bestfit, packing_stats, render_conversations

CONV = {"messages": [{"role": "user", "content": "What is 2 + 3?"},
                     {"role": "assistant", "content": "5"},
                     {"role": "user", "content": "And 4 + 4?"},
                     {"role": "assistant", "content": "It is 8."}]}


def test_targets_are_the_assistant_tokens_only(corpus):
    tok = corpus["tokenizer"]
    items = render_conversations(tok, [CONV], 200).items
    x, y = next(SFTLoader(items, 1, 199, tok.bos_token_id))
    learned = y[0][y[0] >= 0].tolist()
    end = tok.encode_special("<|assistant_end|>")
    expected = tok.encode("5") + [end] + tok.encode("It is 8.") + [end]
    assert learned == expected, tok.decode(learned)
    # each target is the next input token (the shift is right) and padding is never a target
    ids = x[0].tolist() + [y[0, -1].item()]
    for i in (y[0] >= 0).nonzero().flatten().tolist():
        assert y[0, i].item() == ids[i + 1]
    n = len(items[0][0])
    assert (y[0, n - 1:] == -1).all(), "padding after the conversation must be ignored"


def test_best_fit_puts_every_conversation_in_exactly_one_row_within_capacity():
    rng = random.Random(1)
    lengths = [rng.randint(2, 65) for _ in range(2000)]
    rows = pack_bestfit(lengths, 65)
    flat = sorted(i for row in rows for i in row)
    assert flat == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 65 for row in rows)
    # best-fit decreasing on this mix leaves little padding
    assert sum(lengths) / (65 * len(rows)) > 0.97


def test_rows_hold_whole_conversations_contiguously_then_padding():
    """Conversation k is [BOS, k, k, ...]: every row must read as whole conversations, each
    exactly once across the epoch, then padding — a conversation is never split."""
    bos, pad, T = 0, 0, 47
    rng = random.Random(2)
    items = []
    for k in range(1, 301):
        n = rng.randint(2, T + 1)
        items.append(([bos] + [k] * (n - 1), [0] + [1] * (n - 1)))
    loader = SFTLoader(items, 4, T, pad, loop=False, block_size=64)
    seen = []
    for x, y in loader:
        for r in range(x.shape[0]):
            row = x[r].tolist() + [max(y[r, -1].item(), 0)]
            pos = 0
            while pos < len(row) and row[pos] == bos and pos + 1 < len(row) and row[pos + 1] != pad:
                k = row[pos + 1]
                n = len(items[k - 1][0])
                assert row[pos:pos + n] == items[k - 1][0], f"conversation {k} split or altered"
                seen.append(k)
                pos += n
            assert all(t == pad for t in row[pos:]), "only padding may follow the last conversation"
    assert sorted(seen) == list(range(1, 301))


def test_a_conversation_longer_than_a_row_is_truncated_and_counted(corpus):
    tok = corpus["tokenizer"]
    long = {"messages": [{"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "word " * 300}]}
    r = render_conversations(tok, [CONV, long], 65)
    assert r.truncated == 1 and len(r.items) == 2
    assert max(len(ids) for ids, _ in r.items) == 65


def test_loader_resumes_at_the_exact_next_batch():
    rng = random.Random(3)
    items = [([0] + [rng.randint(1, 50) for _ in range(n)], [0] + [1] * n)
             for n in (rng.randint(1, 30) for _ in range(500))]
    a = SFTLoader(items, 3, 31, 0, block_size=50)
    for _ in range(17):  # crosses blocks and, with 500 items, an epoch
        next(a)
    state = a.state_dict()
    b = SFTLoader(items, 3, 31, 0, block_size=50, state=state)
    for _ in range(40):
        (xa, ya), (xb, yb) = next(a), next(b)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_best_fit_packs_what_padding_would_spread_over_rows():
    """Four conversations of 10-40 tokens: padded one per row of T + 1 = 100 (the seeds' fixed
    shape) they would take 400 tokens for 100 real ones; best-fit packs them into one full row."""
    items = [([0] + [1] * (n - 1), [0] + [1] * (n - 1)) for n in (10, 20, 30, 40)]
    best = packing_stats(items, 99)
    assert best == {"rows": 1, "tokens": 100, "real_tokens": 100, "real_token_fraction": 1.0}


# --------------------------------------------------------------------------------------------
# End to end: a tiny base model, then SFT on the offline chat data.

@pytest.fixture(scope="module")
def base_run(corpus, pip_cache, tmp_path_factory):
    from nanochat.train import train_base
    run = tmp_path_factory.mktemp("sft") / "run"
    d = sft_recipe_dict(corpus, pip_cache, run)
    train_base(recipe_from_dict(d))
    return d


def sft_recipe_dict(corpus, pip_cache, run):
    return {**corpus["sections"], "cache_dir": corpus["cache_dir"], "run_dir": str(run),
            "data": {**corpus["sections"]["data"], "offline_cache": str(pip_cache)},
            "model": {"depth": 2, "n_embd": 64, "n_head": 2, "sequence_len": 64},
            "train": {"total_batch_size": 512, "device_batch_size": 4, "num_iterations": 4,
                      "eval_every": -1, "eval_tokens": 1024, "progress_bar": False, "device": "cpu"},
            "sft": {"task_examples": 100, "total_batch_size": 512, "device_batch_size": 4,
                    "num_iterations": 20, "eval_every": 10}}


def with_sft(d, **kw):
    return {**d, "sft": {**d["sft"], **kw}}


def test_offline_chat_data_packs_at_least_90_percent_real(corpus, base_run):
    from nanochat.data.conversations import load_sft_conversations
    recipe = recipe_from_dict(with_sft(base_run, task_examples=2000))
    convs = load_sft_conversations(recipe, "train").conversations
    items = render_conversations(corpus["tokenizer"], convs, 257).items
    stats = packing_stats(items, 256)
    assert stats["real_token_fraction"] >= 0.90, stats


def test_compiled_sft_compiles_once_across_20_steps_and_chat_loads_it(base_run):
    from nanochat.sft import sft_dir, train_sft
    d = {**base_run, "train": {**base_run["train"], "compile": True}}
    recipe = recipe_from_dict(d)
    result = train_sft(recipe)
    assert result["step"] == 20
    assert result["compilations"] == 1, "fixed (B, T) rows must not recompile"
    out = sft_dir(recipe)
    meta = ckpt.read_meta(ckpt.latest_checkpoint(out))
    assert meta["stage"] == "sft" and meta["step"] == 20
    progress = [json.loads(ln) for ln in (out / "progress.jsonl").read_text().splitlines()]
    assert [r["step"] for r in progress if r["event"] == "eval"] == [0, 10, 20]
    assert all(r["val_loss"] > 0 for r in progress if r["event"] == "eval")
    # a compiled stage records whether its compile found torch's cache (the process's cache dir)
    timing = next(r for r in progress if r["event"] == "timing")
    summary = next(r for r in progress if r["event"] == "summary")
    assert timing["compile_cache"] in ("hit", "miss", "partial") and summary["compile_cache"] == timing["compile_cache"]
    assert 0 <= timing["data_s"] <= timing["setup_s"], "the base checkpoint and the conversations: part of set-up"
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["data"]["real_token_fraction"] > 0.5
    assert run_json["code"] == meta["code"] and set(meta["code"]) >= {"commit", "dirty", "snapshot"}
    # the chat CLI talks to the result (one shot)
    res = subprocess.run([sys.executable, "-m", "nanochat.chat", str(out), "-p", "What is 2 + 3?",
                          "--max-new-tokens", "8"], capture_output=True, text=True, timeout=300,
                         cwd=REPO)
    assert res.returncode == 0, res.stderr


def test_sft_resume_matches_an_uninterrupted_run(base_run, tmp_path):
    from nanochat.sft import sft_dir, train_sft
    def recipe(name):
        d = with_sft(base_run, num_iterations=12, eval_every=-1, base_checkpoint=base_run["run_dir"])
        return recipe_from_dict({**d, "run_dir": str(tmp_path / name)})
    straight, resumed = recipe("a"), recipe("b")
    a = train_sft(straight)
    calls = {"n": 0}

    def stop_after_6():
        calls["n"] += 1
        return calls["n"] > 6
    first = train_sft(resumed, stop_requested=stop_after_6)
    assert first.get("stopped") and ckpt.latest_checkpoint(sft_dir(resumed)).name == "step_000006"
    b = train_sft(resumed)
    assert a["loss"] == b["loss"] and a["val_loss"] == b["val_loss"]
    wa = ckpt.load_model_state(ckpt.latest_checkpoint(sft_dir(straight)))
    wb = ckpt.load_model_state(ckpt.latest_checkpoint(sft_dir(resumed)))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# --------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, no traceback.

REPO = Path(__file__).resolve().parent.parent


def run_cli(args, tmp_path):
    return subprocess.run([sys.executable, "-m", "nanochat.sft", *args], capture_output=True,
                          text=True, timeout=300, cwd=REPO)


def write_recipe(tmp_path, d):
    import yaml
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(d))
    return str(path)


def one_line_error(res):
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in res.stderr, res.stderr
    return lines[0]


def test_missing_base_checkpoint_is_one_line(base_run, tmp_path):
    path = write_recipe(tmp_path, with_sft(base_run, base_checkpoint=str(tmp_path / "nope")))
    line = one_line_error(run_cli([path], tmp_path))
    assert "sft.base_checkpoint" in line and "nope" in line


def test_base_checkpoint_with_another_vocabulary_is_one_line(base_run, tmp_path):
    d = {**with_sft(base_run, base_checkpoint=base_run["run_dir"]),
         "tokenizer": {**base_run["tokenizer"], "vocab_size": 1024}, "run_dir": str(tmp_path / "x")}
    line = one_line_error(run_cli([write_recipe(tmp_path, d)], tmp_path))
    assert "vocabulary" in line and "tokenizer.vocab_size" in line


def test_empty_conversation_file_is_one_line(base_run, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    d = {**with_sft(base_run, conversation_files=[str(empty)]), "run_dir": str(tmp_path / "x"),
         "sft": {**base_run["sft"], "conversation_files": [str(empty)],
                 "base_checkpoint": base_run["run_dir"]}}
    line = one_line_error(run_cli([write_recipe(tmp_path, d)], tmp_path))
    assert "empty.jsonl" in line


def test_conversation_file_with_roles_out_of_order_is_one_line(base_run, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "assistant", "content": "hi"},
                                            {"role": "user", "content": "hello"}]}) + "\n")
    d = {**base_run, "run_dir": str(tmp_path / "x"),
         "sft": {**base_run["sft"], "conversation_files": [str(bad)],
                 "base_checkpoint": base_run["run_dir"]}}
    line = one_line_error(run_cli([write_recipe(tmp_path, d)], tmp_path))
    assert "bad.jsonl:1" in line and "user" in line


def test_auto_device_batch_size_is_discovered_under_the_sft_key(base_run, tmp_path):
    from nanochat.sft import sft_dir, train_sft
    d = with_sft(base_run, device_batch_size="auto", num_iterations=2, eval_every=-1,
                 base_checkpoint=base_run["run_dir"])
    d = {**d, "run_dir": str(tmp_path / "auto"),
         "discovery": {"cache_dir": str(tmp_path / "bs"), "max_batch_size": 8, "memory_budget_gb": 4}}
    recipe = recipe_from_dict(d)
    assert train_sft(recipe)["step"] == 2
    chosen = json.loads((sft_dir(recipe) / "run.json").read_text())["device_batch_size"]
    assert chosen in (1, 2, 4, 8) and 512 % (chosen * 64) == 0
    entries = [json.loads(p.read_text()) for p in (tmp_path / "bs").glob("*.json")]
    assert [e["key"]["stage"] for e in entries] == ["sft"] and entries[0]["result"]["batch_size"] == chosen


def _sft_worker(rank, world, port, recipe_dict):
    import os
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from nanochat.sft import train_sft
    train_sft(recipe_from_dict(recipe_dict))


def test_two_rank_sft_splits_even_a_small_validation_set(base_run, tmp_path):
    """Two gloo ranks: each packs its own blocks of conversations — the ~30 held-out ones too
    (a block per rank, not one block that leaves a rank empty) — and checkpoints both loaders."""
    import socket
    import torch.multiprocessing as mp
    from nanochat.sft import sft_dir
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = {**with_sft(base_run, num_iterations=4, eval_every=2, base_checkpoint=base_run["run_dir"]),
         "run_dir": str(tmp_path / "ddp")}
    d["train"] = {**d["train"], "total_batch_size": 512}
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_sft_worker, args=(r, 2, port, d)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]
    out = sft_dir(recipe_from_dict(d))
    meta = ckpt.read_meta(ckpt.latest_checkpoint(out))
    assert meta["world_size"] == 2 and len(meta["loader"]) == 2 and meta["step"] == 4
    evals = [json.loads(ln) for ln in (out / "progress.jsonl").read_text().splitlines()
             if '"eval"' in ln]
    assert [r["step"] for r in evals] == [0, 2, 4] and all(r["val_loss"] > 0 for r in evals)
