"""Evaluation: pure scoring on planted answers, then real checkpoints of a really trained tiny model
(its real tokenizer, the real `python -m nanochat.eval` command line, hub tasks offline)."""
import json
import shutil

import pytest
import torch

from nanochat import checkpoint as ckpt
from nanochat.data import problems as generated
from nanochat.common import cli_main
from nanochat.data.problems import final_number
from nanochat.eval import (EVAL_FILE, evaluate_checkpoint, main, score_choice,
                           score_exact)
from nanochat.data.problems import Problem
from test_cli import error_line, run_cli

KEYS = {"checkpoint", "stage", "step", "device", "elapsed_s", "val_bpb", "tasks", "skipped"}


# ---------------------------------------------------------------- scoring

def test_exact_match_counts_whitespace_variants_right_and_wrong_answers_wrong():
    problems = [Problem("arithmetic", f"What is {i} + 1?", str(i + 1)) for i in range(6)]
    problems += [Problem("spelling", "Spell the word 'apple' letter by letter.", "a-p-p-l-e"),
                 Problem("copying", "Repeat exactly: green river", "green river"),
                 Problem("copying", "Repeat exactly: red sun", "red sun"),
                 Problem("arithmetic", "What is 9 + 9?", "18")]
    completions = ["1", " 2", "3\n", "\t4 ", "5", "7",          # 5 right (whitespace), "7" wrong
                   "a-p-p-l-e-",                               # wrong
                   "green   river",                            # right: runs of spaces collapse
                   " red\nsun ",                               # right
                   None]                                       # no completion: wrong
    assert score_exact(problems, completions) == {"metric": "exact_match", "accuracy": 0.7,
                                                  "correct": 7, "total": 10}


def test_multiple_choice_scores_letters_and_reports_chance():
    problems = [Problem("choice", f"q{i}", "ABCD"[i % 4], ["w", "x", "y", "z"]) for i in range(10)]
    picked = [p.answer for p in problems[:7]] + ["A" if p.answer != "A" else "B" for p in problems[7:]]
    assert score_choice(problems, picked) == {"metric": "multiple_choice", "accuracy": 0.7,
                                              "correct": 7, "total": 10, "chance": 0.25}
    five = [Problem("arc_easy", "q", "E", list("vwxyz")), Problem("arc_easy", "q", "A", list("xyz"))]
    assert score_choice(five, ["E", None])["chance"] == pytest.approx((1 / 5 + 1 / 3) / 2)


def test_gsm8k_compares_the_final_number():
    assert final_number("She pays 3 * 4 = 12 dollars, so 1,234.") == "1234"
    assert final_number("#### 72") == "72" and final_number("no number") is None
    assert final_number("-5.0") == "-5"
    problems = [Problem("gsm8k", "q", "72"), Problem("gsm8k", "q", "1234"), Problem("gsm8k", "q", "5")]
    got = score_exact(problems, ["so 72", "1,234", "5 apples and 6 pears"], final_number, "final_number")
    assert (got["correct"], got["metric"]) == (2, "final_number")


# ---------------------------------------------------------------- real checkpoints

@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    """A tiny base model trained for a few steps, and a copy of its checkpoint saved as stage
    "sft" in a second run directory (with the run's tokenizer), as an SFT run would leave it."""
    from nanochat.engine import load_model
    from nanochat.recipe import recipe_from_dict
    from nanochat.train import train_base
    root = tmp_path_factory.mktemp("eval")
    recipe = recipe_from_dict({
        **corpus["sections"], "cache_dir": corpus["cache_dir"], "run_dir": str(root / "base"),
        "model": {"depth": 2, "n_embd": 64, "n_head": 2, "sequence_len": 128},
        "train": {"total_batch_size": 1024, "device_batch_size": 8, "num_iterations": 4,
                  "eval_every": -1, "eval_tokens": 2048, "progress_bar": False, "device": "cpu"}})
    result = train_base(recipe)
    model, meta, _ = load_model(root / "base", "cpu", torch.float32)
    ckpt.save_checkpoint(root / "sft", 2, model, [], {**meta, "stage": "sft"})
    shutil.copytree(root / "base" / "tokenizer", root / "sft" / "tokenizer")
    return {"base": root / "base", "sft": root / "sft", "train_val_bpb": result["val_bpb"]}


def test_cli_evaluates_a_chat_checkpoint_and_writes_eval_json(runs):
    res = run_cli("nanochat.eval", runs["sft"], "eval.problems_per_task=6", "eval.batch_size=4",
                  "eval.max_new_tokens=8", "eval.hub_tasks=[arc_easy,gsm8k]", "--device", "cpu")
    assert res.returncode == 0, res.stderr[-3000:]
    written = json.loads((runs["sft"] / EVAL_FILE).read_text())
    assert json.loads(res.stdout.strip().splitlines()[-1]) == written, "the JSON is printed too"
    assert set(written) == KEYS | {"chatcore"}, "chat checkpoints also get the ChatCORE aggregate"
    assert written["stage"] == "sft" and written["step"] == 2 and written["device"] == "cpu"
    assert written["val_bpb"] > 0
    assert list(written["tasks"]) == list(generated.KINDS)
    for kind, t in written["tasks"].items():
        assert t["source"] == "generated" and t["total"] == 6, kind
        assert 0 <= t["accuracy"] <= 1 and t["accuracy"] == t["correct"] / t["total"]
    assert written["tasks"]["choice"]["metric"] == "multiple_choice"
    assert written["tasks"]["choice"]["chance"] == 0.25
    assert written["tasks"]["arithmetic"]["metric"] == "exact_match"
    # hub tasks offline (HF_HUB_OFFLINE=1): skipped with a reason, not fatal
    assert set(written["skipped"]) == {"arc_easy", "gsm8k"}
    assert all("could not load from the hub" in why for why in written["skipped"].values())
    assert "arithmetic" in res.stdout and "skipped arc_easy" in res.stdout, "a human table"


def test_base_checkpoint_gets_the_training_val_bpb_and_no_tasks(runs, tmp_path):
    out = tmp_path / "e.json"
    result = evaluate_checkpoint(runs["base"], device="cpu", out=out)
    assert json.loads(out.read_text()) == result and set(result) == KEYS
    assert result["stage"] == "base" and result["tasks"] == {} and result["skipped"] == {}
    assert result["val_bpb"] == pytest.approx(runs["train_val_bpb"], rel=1e-4), \
        "the same evaluator, batches and weights as the end of training"
    assert not (runs["base"] / EVAL_FILE).exists(), "--out replaces the default path"


def test_missing_validation_data_is_recorded_not_fatal(runs, tmp_path):
    result = evaluate_checkpoint(runs["base"], device="cpu", out=tmp_path / "e.json",
                                 overrides=[f"data.data_dir={tmp_path / 'nowhere'}"])
    assert result["val_bpb"] is None and "no shards" in result["skipped"]["val_bpb"]


def test_bad_input_is_one_line(runs, tmp_path, capsys):
    cases = [([str(tmp_path / "missing")], "no checkpoint found"),
             ([str(runs["base"]), "eval.batch_size=0"], "eval.batch_size must be ≥ 1"),
             ([str(runs["base"]), "--recipe", str(tmp_path / "no.yaml")], "no.yaml not found")]
    for argv, message in cases:
        assert cli_main(main, argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert "no checkpoint found" in error_line(run_cli("nanochat.eval", tmp_path))


def test_core_scores_the_fp32_weights_under_autocast_as_training_does(runs, tmp_path, monkeypatch):
    """eval --core with a bf16 compute dtype scores CORE as training's CORE curve does: fp32
    weights under bf16 autocast, before the cast for generation (not bf16 weights, no autocast)."""
    import nanochat.eval as ev_mod
    from core_bundle import write_bundle
    from test_core import TASKS
    seen = []
    real = ev_mod.evaluate_core

    def recording(model, *args, autocast=None, **kwargs):
        with autocast():
            seen.append((next(model.parameters()).dtype, torch.is_autocast_enabled("cpu"),
                         torch.get_autocast_dtype("cpu")))
        return real(model, *args, autocast=autocast, **kwargs)
    monkeypatch.setattr(ev_mod, "evaluate_core", recording)
    bundle = write_bundle(tmp_path / "bundle", TASKS)
    result = evaluate_checkpoint(runs["base"], device="cpu", out=tmp_path / "e.json",
                                 overrides=["train.dtype=bfloat16", "eval.core=true",
                                            f"eval.core_bundle={bundle}", "eval.core_max_per_task=2"])
    assert seen == [(torch.float32, True, torch.bfloat16)]
    assert result["core"]["tasks"], result["core"]
