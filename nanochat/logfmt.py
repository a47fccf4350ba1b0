"""Upstream nanochat's log grammar, so that its own tools read this kit's logs.

Upstream (branch experiment_refactor, nanochat/logfmt.py) makes a stage's log the experiment's
record: most lines are prose, but a line of the form

    <tag> key=value key=value ...

is data (values shlex-quoted; the parser infers int, then float, else string). Its stages print
`argv`/`config` at start-up, `step`/`eval` while training, `bench` rows, and one `summary`;
scripts/curve.py joins each depth's `summary` records into curve.log. The functions below keep
upstream's exact formatting and parsing semantics (format_record: shlex.quote(str(value));
parse_record: shlex.split, every token key=value, a lone word is prose — logfmt.py:24-84).

This kit keeps its own JSON records too (progress.jsonl: jobs/status.py, the report and the live
view read them). They must never disagree, so one object writes both: `StageLog.write` appends
the JSON record and the grammar line derived from it, and a resume truncates both alike.
The stage log files carry upstream's names (STAGE_LOGS), in the task directory that holds the
stage's output.
"""
from __future__ import annotations

import json
import math
import shlex
import sys
from pathlib import Path
from typing import Callable

from nanochat.common import atomic_write_text

# Our stage → upstream's log file name (runs/run.sh: base_train.log, infer_bench.log, sft.log,
# chat_eval.log) and the namespace scripts/curve.py gives its fields (STAGE_LOGS there).
STAGE_LOGS = {"base": "base_train.log", "kv_bench": "infer_bench.log", "sft": "sft.log", "eval": "chat_eval.log"}
CURVE_NAMESPACE = {"base": "base", "kv_bench": "infer", "sft": "sft", "eval": "chat"}

# A progress.jsonl record's `event` → its upstream tag, and the fields renamed on the way
# (upstream's step line: `step step=4990 loss=2.311 lrm=0.45 dt_ms=124.3 tok_s=4212000 mfu=40.2`).
TAGS = {"train": "step"}
RENAMES = {"step": {"lr_mult": "lrm", "tok_per_s": "tok_s"}}


def format_record(tag: str, **fields) -> str:
    """'summary loss=2.3': upstream's format_record (values shlex-quoted as str(value))."""
    return " ".join([tag] + [f"{k}={shlex.quote(str(v))}" for k, v in fields.items()])


def flatten(d: dict, prefix: str = "") -> dict:
    """{'model': {'depth': 4}} → {'model.depth': 4}: a nested recipe as one flat record. Lists
    and None are written as JSON (one token, quoted where needed)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, type(None))) else v
    return out


def format_invocation(script: str, argv: list[str], config: dict) -> str:
    """The `argv` + `config` pair a stage prints at start-up (upstream's format_invocation):
    the verbatim command line, then every resolved setting (the recipe, flattened)."""
    return format_record("argv", script=script, args=shlex.join(argv)) + "\n" + \
        format_record("config", **flatten(config))


def _parse_value(text: str):
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def parse_record(line: str, tag: str | None = None) -> dict | None:
    """A record line → {'tag': ..., fields}; None for prose (or another tag)."""
    try:
        tokens = shlex.split(line.strip())
    except ValueError:  # unbalanced quotes: prose
        return None
    if not tokens or (tag is not None and tokens[0] != tag):
        return None
    record = {"tag": tokens[0]}
    for token in tokens[1:]:
        if "=" not in token:
            return None
        key, value = token.split("=", 1)
        record[key] = _parse_value(value)
    return record if len(record) > 1 else None


def parse_records(path: str | Path, tag: str | None = None) -> list[dict]:
    """Every record of a log file (optionally one tag's); [] when there is no such file."""
    try:
        with open(path, encoding="utf-8", errors="ignore") as f:
            return [r for line in f if (r := parse_record(line, tag)) is not None]
    except (FileNotFoundError, NotADirectoryError):  # no such file (or a file where its directory would be)
        return []


def last_summary(path: str | Path) -> dict | None:
    """A stage log's last `summary` record without its tag (upstream's read_stage_summary)."""
    records = parse_records(path, "summary")
    if not records:
        return None
    summary = dict(records[-1])
    summary.pop("tag")
    return summary


def sig(x: float, digits: int = 4) -> float:
    """x to `digits` significant digits. Upstream rounds EFLOPs to 3 decimals, which makes a
    tiny ladder's 1e-6 EFLOPs zero (unusable on a log axis); significant digits keep them."""
    if not x or not math.isfinite(x):
        return x
    return float(f"{x:.{digits - 1}e}")


def to_record(event: dict) -> str | None:
    """A progress.jsonl record as its grammar line (the `event` key becomes the tag)."""
    event = dict(event)
    name = event.pop("event", None)
    if not isinstance(name, str) or not name:
        return None
    tag = TAGS.get(name, name)
    renames = RENAMES.get(tag, {})
    fields = {renames.get(k, k): v for k, v in event.items()
              if isinstance(v, (int, float, str, bool)) and v is not None}
    return format_record(tag, **fields) if fields else None


class StageLog:
    """One stage's two records: `json_path` (the kit's JSON lines; None for a stage that has
    none) and `log_path` (upstream's grammar). Every record goes through `write`, which appends
    to both and echoes the grammar line; only rank 0 writes (`enabled`)."""

    def __init__(self, log_path: Path, json_path: Path | None = None, enabled: bool = True,
                 echo: Callable[[str], None] | None = None):
        self.log_path = Path(log_path)
        self.json_path = Path(json_path) if json_path is not None else None
        self.enabled = enabled
        self.echo = echo if echo is not None else (lambda line: print(line, flush=True))

    def _append(self, path: Path, line: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(line + "\n")

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        if self.json_path is not None:
            self._append(self.json_path, json.dumps(record))
        line = to_record(record)
        if line is not None:
            self._append(self.log_path, line)
            self.echo(line)

    def invocation(self, script: str, argv: list[str], config: dict) -> None:
        """The start-up `argv`/`config` pair (grammar only: it is no progress record)."""
        if self.enabled:
            text = format_invocation(script, argv, config)
            self._append(self.log_path, text)
            for line in text.splitlines():
                self.echo(line)

    def truncate_from(self, step: int) -> list[dict]:
        """On resume from `step`: drop both files' records of steps ≥ step, so neither repeats
        what the rerun will write again; returns the JSON records kept."""
        if not self.enabled:
            return []
        kept: list[dict] = []
        if self.json_path is not None and self.json_path.exists():
            lines = [ln for ln in self.json_path.read_text().splitlines() if ln.strip()]
            kept = [r for r in map(json.loads, lines) if r.get("step", -1) < step]
            atomic_write_text(self.json_path, "".join(json.dumps(r) + "\n" for r in kept))
        if self.log_path.exists():
            def keep(line: str) -> bool:
                rec = parse_record(line)
                return rec is None or not isinstance(rec.get("step"), int) or rec["step"] < step
            lines = [ln for ln in self.log_path.read_text().splitlines() if keep(ln)]
            atomic_write_text(self.log_path, "".join(ln + "\n" for ln in lines))
        return kept


def write_stage_records(task_dir: Path, stage: str, records: list[dict]) -> Path:
    """A one-shot stage's log (kv_bench, eval): its records, written whole (temp file + rename),
    from the same dict its JSON result was written from. Returns the log's path."""
    path = Path(task_dir) / STAGE_LOGS[stage]
    lines = [line for r in records if (line := to_record(r)) is not None]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    for line in lines:
        print(line, flush=True)
    return path


def argv_script() -> str:
    """The running module's name (`nanochat.train`), as upstream's format_invocation reports it."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec.name if spec is not None else sys.argv[0]
