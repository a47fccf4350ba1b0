"""Upstream's log grammar: our stage logs read by a copy of upstream's own parser, with the fields
its scripts/curve.py and scripts/compare.py read; progress.jsonl and the log never disagree."""
import json
import shlex

from nanochat.logfmt import StageLog, format_record, parse_record, to_record
from nanochat.recipe import recipe_from_dict
from nanochat.train import train_base


# ---- a copy of upstream's parser, its semantics verbatim -------------------------------------
# karpathy/nanochat, branch experiment_refactor, nanochat/logfmt.py:49-94 (_parse_value,
# parse_record, parse_records): shlex.split; the first token is the tag; every other token must be
# key=value (else the line is prose); int, then float, else string; a lone word is prose.

def upstream_parse_value(value_str):
    try:
        return int(value_str)
    except ValueError:
        pass
    try:
        return float(value_str)
    except ValueError:
        pass
    return value_str


def upstream_parse_record(line, tag=None):
    line = line.strip()
    try:
        tokens = shlex.split(line)
    except ValueError:
        return None
    if not tokens:
        return None
    line_tag = tokens[0]
    if tag is not None and line_tag != tag:
        return None
    record = {"tag": line_tag}
    for token in tokens[1:]:
        if "=" not in token:
            return None
        key, value_str = token.split("=", 1)
        record[key] = upstream_parse_value(value_str)
    if len(record) == 1:
        return None
    return record


def upstream_parse_records(path, tag=None):
    records = []
    with open(path, "r", encoding="utf-8", errors="ignore") as f:
        for line in f:
            record = upstream_parse_record(line, tag=tag)
            if record is not None:
                records.append(record)
    return records


# Fields upstream's tools read from a base_train.log: scripts/curve.py:57-58 (its table columns),
# nanochat/experiment.py:119-158 (read_base_summary: val_bpb, eflops; read_training_curve: eval
# records' step, eflops, val_bpb; num_iterations), scripts/compare.py:92-95 (val_bpb, eflops).
BASE_SUMMARY_FIELDS = {"model_tag", "depth", "model_dim", "num_params", "num_scaling_params",
                       "num_iterations", "total_batch_size", "tokens_trained", "eflops",
                       "param_data_ratio", "train_time_sec", "peak_vram_mib", "val_bpb", "min_val_bpb"}


def test_a_base_run_logs_upstreams_records_and_they_agree_with_progress_jsonl(tiny_recipe, tmp_path, capsys):
    recipe = recipe_from_dict({**tiny_recipe, "run_dir": str(tmp_path / "run"),
                               "train": {**tiny_recipe["train"], "num_iterations": 8, "eval_every": 4,
                                         "train_log_every": 2, "save_every": -1}})
    train_base(recipe)
    printed = capsys.readouterr().out
    log = tmp_path / "run" / "base_train.log"
    records = upstream_parse_records(log)
    tags = [r["tag"] for r in records]
    # start-up pair first, then the run's records, the summary last
    assert tags[:2] == ["argv", "config"] and tags[-1] == "summary"
    assert records[1]["model.depth"] == 2 and records[1]["train.num_iterations"] == 8
    # the stage prints them too, beside its prose
    assert "\nsummary " in printed and "\nstep step=" in printed
    summary = upstream_parse_records(log, "summary")[-1]
    assert BASE_SUMMARY_FIELDS <= set(summary), BASE_SUMMARY_FIELDS - set(summary)
    assert summary["model_tag"] == "d2" and summary["depth"] == 2 and summary["num_iterations"] == 8
    assert summary["tokens_trained"] == 8 * 512 and isinstance(summary["eflops"], float)
    # where the time went: set-up before the loop, the first step, steps, evaluations, checkpoints
    assert summary["setup_s"] > 0 and summary["warmup_s"] > 0 and summary["train_time_sec"] > 0
    assert summary["eval_total_s"] > 0 and summary["checkpoint_total_s"] >= 0
    # upstream's read_training_curve: eval records past step 0 carry eflops > 0 and val_bpb,
    # growing with the step, the last at the summary's eflops
    evals = [r for r in upstream_parse_records(log, "eval") if r["step"] > 0]
    assert [r["step"] for r in evals] == [4, 8]
    assert 0 < evals[0]["eflops"] < evals[1]["eflops"] == summary["eflops"]
    assert abs(evals[-1]["val_bpb"] - summary["val_bpb"]) < 1e-6
    # one writer: every progress.jsonl record is a log record with the same values
    progress = [json.loads(ln) for ln in (tmp_path / "run" / "progress.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in upstream_parse_records(log, "step")}
    trains = [p for p in progress if p["event"] == "train"]
    assert len(trains) == len(steps) == 4
    for p in trains:
        assert steps[p["step"]]["loss"] == p["loss"] and steps[p["step"]]["lrm"] == p["lr_mult"]
    log_evals = {r["step"]: r for r in upstream_parse_records(log, "eval")}
    for p in (p for p in progress if p["event"] == "eval"):
        assert log_evals[p["step"]]["val_bpb"] == p["val_bpb"]
    assert [p for p in progress if p["event"] == "summary"][0]["eflops"] == summary["eflops"]
    assert summary["checkpoint_total_s"] == round(sum(p["checkpoint_s"] for p in progress if p["event"] == "checkpoint"), 1)


def test_values_round_trip_through_upstreams_parser():
    line = format_record("summary", params=286261730, val_bpb=0.8213, eflops=1.208e-09,
                         gpu="NVIDIA H100 80GB HBM3", dirty=True, note="it's")
    rec = upstream_parse_record(line)
    assert rec == {"tag": "summary", "params": 286261730, "val_bpb": 0.8213, "eflops": 1.208e-09,
                   "gpu": "NVIDIA H100 80GB HBM3", "dirty": "True", "note": "it's"}
    assert parse_record(line) == rec                      # ours reads it the same
    assert upstream_parse_record("step 12 of 40: loss 2.3") is None  # prose stays prose
    assert to_record({"event": "train", "step": 3, "loss": 2.5, "lr_mult": 1.0, "tok_per_s": 10.0}) == \
        "step step=3 loss=2.5 lrm=1.0 tok_s=10.0"


def test_a_resume_truncates_both_records_alike(tmp_path):
    log = StageLog(tmp_path / "base_train.log", tmp_path / "progress.jsonl", echo=lambda line: None)
    log.invocation("nanochat.train", ["r.yaml"], {"model": {"depth": 2}})
    for step in range(6):
        log.write({"event": "train", "step": step, "loss": 5.0 - step})
    kept = log.truncate_from(4)
    assert [r["step"] for r in kept] == [0, 1, 2, 3]
    records = upstream_parse_records(tmp_path / "base_train.log")
    assert [r["tag"] for r in records[:2]] == ["argv", "config"]  # no step: kept
    assert [r["step"] for r in records if r["tag"] == "step"] == [0, 1, 2, 3]
