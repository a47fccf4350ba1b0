"""A CORE eval bundle in the real layout, written by the tests (core.yaml, eval_data/, the meta CSV),
and a byte-level tokenizer to score it with. What the CORE throughput benchmark (removed from the
package; docs/benchmarks.md cites the commit that had it) shared with the tests."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from nanochat.tokenizer import Tokenizer

CATEGORY = {"multiple_choice": "language_understanding", "schema": "commonsense_reasoning",
            "language_modeling": "world_knowledge"}


def byte_tokenizer() -> Tokenizer:
    """A real nanochat Tokenizer with no merges: token i < 256 is byte i, then the specials."""
    return Tokenizer.from_ranks(r"\s+|\S+", {bytes([i]): i for i in range(256)})


def write_bundle(root: str | Path, tasks: list[dict]) -> Path:
    """Write `root`/eval_bundle in the real layout: core.yaml, eval_data/<category>/<label>.jsonl
    and eval_meta_data.csv. Each task: {"label", "kind", "rows" (the JSONL objects),
    "num_fewshot", "baseline" (percent), optional "delimiter" (default " ")}."""
    import yaml
    bundle = Path(root) / "eval_bundle"
    (bundle / "eval_data").mkdir(parents=True, exist_ok=True)
    entries = []
    for t in tasks:
        uri = f"{CATEGORY[t['kind']] if t['kind'] in CATEGORY else 'misc'}/{t['label']}.jsonl"
        (bundle / "eval_data" / uri).parent.mkdir(parents=True, exist_ok=True)
        (bundle / "eval_data" / uri).write_text("".join(json.dumps(r) + "\n" for r in t["rows"]))
        entries.append({"label": t["label"], "dataset_uri": uri, "num_fewshot": [t["num_fewshot"]],
                        "icl_task_type": t["kind"],
                        "continuation_delimiter": t.get("delimiter", " ")})
    (bundle / "core.yaml").write_text(yaml.safe_dump({"icl_tasks": entries}, sort_keys=False))
    with open(bundle / "eval_meta_data.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Eval Task", "Task Category", "Task Type", "#shots", "#datapoints",
                    "Random baseline", "Centered Metric?", "Description"])
        for t in tasks:
            w.writerow([t["label"], CATEGORY.get(t["kind"], "misc"), t["kind"], t["num_fewshot"],
                        len(t["rows"]), t["baseline"], "", "synthetic"])
    return bundle
