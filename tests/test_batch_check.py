"""A wrong discovery answer heals: the run's first steps find it too large, step down to the
next smaller legal size, rewrite the cache entry (marked corrected) and keep training."""
import json

import pytest

from nanochat.batchsize.search import discover
from nanochat.recipe import recipe_from_dict
from nanochat.train import train_base
from nanochat.plots import read_jsonl

SEQ = 512


@pytest.fixture
def heal_recipe(corpus, tmp_path):
    """A model whose activations dominate its memory (seq 512, width 128): ~12 MB per row with
    the chunked loss; batch 8 fits the budget, 16 does not."""
    return {**corpus["sections"], "cache_dir": corpus["cache_dir"], "run_dir": str(tmp_path / "run"),
            "model": {"depth": 2, "n_embd": 128, "n_head": 2, "sequence_len": SEQ},
            "train": {"total_batch_size": 16 * SEQ, "device_batch_size": "auto", "num_iterations": 6,
                      "eval_every": -1, "eval_tokens": 2 * SEQ, "progress_bar": False, "device": "cpu"},
            "discovery": {"cache_dir": str(tmp_path / "bs"), "memory_budget_gb": 0.25}}


def test_a_wrong_cached_answer_steps_down_rewrites_the_cache_and_trains_on(heal_recipe, corpus):
    recipe = recipe_from_dict(heal_recipe)
    right = discover(recipe, vocab_size=corpus["tokenizer"].vocab_size)
    assert right.batch_size < 16, f"the budget should not fit batch 16 (chose {right.batch_size})"
    # A wrong answer in the cache (as if the probe had been fooled): batch 16.
    rec = json.loads(right.cache_path.read_text())
    rec["result"].update(batch_size=16, largest=16, fastest=16)
    right.cache_path.write_text(json.dumps(rec))

    result = train_base(recipe)
    assert result["step"] == 6, "the job continues after stepping down"
    corrections = result["batch_corrections"]
    assert corrections[0]["from"] == 16 and corrections[-1]["to"] == result["device_batch_size"]
    final = result["device_batch_size"]
    assert final == right.batch_size, "it settles where a right answer would have been"

    run = json.loads((recipe.out_dir / "run.json").read_text())
    assert run["device_batch_size"] == final and run["discovery"]["from_cache"] is True
    assert [c["to"] for c in run["batch_corrections"]] == [c["to"] for c in corrections]
    cached = json.loads(right.cache_path.read_text())
    assert cached["result"]["batch_size"] == final, "the cache entry says what the run measured"
    assert cached["corrected"][0]["from"] == 16 and "training step" in cached["corrected"][0]["why"]

    progress = read_jsonl(recipe.out_dir / "progress.jsonl")
    memory = [r for r in progress if r["event"] == "memory"]
    assert memory and memory[0]["device_batch_size"] == 16
    assert memory[0]["peak_gb"] > memory[0]["capacity_gb"], "the first step was over the budget"
    assert memory[0]["peak_gb"] == pytest.approx(memory[0]["predicted_peak_gb"], rel=0.3), \
        "the run's step measures what the probe of that batch measured"
    assert memory[-1]["peak_gb"] <= memory[-1]["capacity_gb"], "the size it settled on fits"
    losses = [r["loss"] for r in progress if r["event"] == "train"]
    assert len(losses) == 6 and all(loss == loss for loss in losses)

    again = train_base(recipe_from_dict({**heal_recipe, "run_dir": str(recipe.out_dir.parent / "again")}))
    assert "batch_corrections" not in again and again["step"] == 6, \
        "the next run starts at the corrected size and needs no correction (no false alarm)"
    assert json.loads((recipe.out_dir.parent / "again" / "run.json").read_text())["device_batch_size"] == final


def test_a_fixed_batch_is_not_watched(tiny_recipe):
    recipe = recipe_from_dict(tiny_recipe)
    train_base(recipe)
    events = {r["event"] for r in read_jsonl(recipe.out_dir / "progress.jsonl")}
    assert "memory" not in events
    assert json.loads((recipe.out_dir / "run.json").read_text())["discovery"] is None
