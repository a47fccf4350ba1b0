"""How far a task has got, read from its run directory, and the live display of running tasks.

The training loop (nanochat/trainer.py) appends JSON lines to `<task run_dir>/progress.jsonl`
({"event": "train", "step", "loss", "tok_per_s", "eta_s", "elapsed_s", ...} and
{"event": "eval", "step", "val_bpb" | "val_loss"}) and writes `<task run_dir>/run.json` with
the total ("num_iterations") when it starts. `read_progress` is the one reader of those files
for `jobs/status.py` and the local executor's `LiveDisplay`; only the training stages (base,
sft) write them.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from nanochat.config import TARGET_METRICS, TRAINING_SECTIONS

PROGRESS_STAGES = tuple(TRAINING_SECTIONS)  # the stages that write progress.jsonl
VAL_KEYS = ("val_bpb", "val_loss")          # base logs bits per byte, SFT loss per token
TAIL_BYTES = 64 * 1024                      # a few hundred records: the newest train and eval


@dataclass
class TaskProgress:
    step: int                   # steps done (the newest train record's step + 1)
    total: int | None           # run.json's num_iterations; None before it is written
    loss: float
    tok_per_s: float | None     # optional in the log's format, as is eta_s
    eta_s: float | None
    val: tuple[str, float, int] | None  # newest evaluation: (metric, value, step)
    core: tuple[float, int] | None = None  # newest CORE during training (train.core_every): (score, step)
    reached: dict[str, tuple[float, int]] = field(default_factory=dict)  # target → (train_s, step) first met


def _tail_records(path: Path, max_bytes: int | None = TAIL_BYTES) -> list[dict]:
    """The JSON records of the file's last `max_bytes` (all of them when max_bytes is None).
    Reading only the tail keeps a refresh cheap on a long run's log. The loop appends while we
    read: a line without its newline is still being written and is skipped."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            start = 0 if max_bytes is None else max(0, size - max_bytes)
            f.seek(start)
            data = f.read()
    except OSError:  # missing, or a path that is not a directory
        return []
    lines = data.split(b"\n")[:-1]   # the last piece has no newline: empty or half-written
    if start > 0:
        lines = lines[1:]            # the first piece starts mid-line
    records = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records


def _total_steps(task_dir: Path) -> int | None:
    try:
        total = json.loads((task_dir / "run.json").read_text()).get("num_iterations")
    except (OSError, ValueError):
        return None
    return total if isinstance(total, int) else None


def target_label(metric: str, target: float) -> str:
    """val_bpb ≤ 0.72, core ≥ 0.2565: a report.targets entry, with the direction it counts."""
    return f"{metric} {'≤' if TARGET_METRICS[metric] == 'lower' else '≥'} {target}"


def first_reached(metric: str, target: float, records: list[dict]) -> tuple[float, int] | None:
    """(training seconds, step) of the first evaluation in a progress log at which `metric`
    met `target` (val_bpb: at or below; core: at or above — TARGET_METRICS), or None. The
    time is the record's train_s: training only, as the speedrun leaderboard counts it."""
    lower = TARGET_METRICS[metric] == "lower"
    for e in records:
        v = e.get(metric)
        if e.get("event") == "eval" and isinstance(v, (int, float)) and "train_s" in e and \
                (v <= target if lower else v >= target):
            return e["train_s"], e["step"]
    return None


def read_progress(task_dir: str | Path, targets: dict[str, float] | None = None) -> TaskProgress | None:
    """The newest training record of a base or sft task directory; None before the first.
    With `targets` (report.targets), also when each was first reached — which needs the whole
    log, not its tail."""
    task_dir = Path(task_dir)
    path = task_dir / "progress.jsonl"
    records = _tail_records(path, None if targets else TAIL_BYTES)
    if not any(r.get("event") == "train" for r in records):
        records = _tail_records(path, None)  # a tail of evaluations only: read it all
    train = [r for r in records if r.get("event") == "train" and "step" in r and "loss" in r]
    if not train:
        return None
    r = train[-1]
    evals = [(k, e[k], e["step"]) for e in records if e.get("event") == "eval" and "step" in e
             for k in VAL_KEYS if isinstance(e.get(k), (int, float))]
    cores = [(e["core"], e["step"]) for e in records
             if e.get("event") == "eval" and "step" in e and isinstance(e.get("core"), (int, float))]
    reached = {target_label(m, t): hit for m, t in (targets or {}).items()
               if m in TARGET_METRICS and (hit := first_reached(m, t, records)) is not None}
    return TaskProgress(step=r["step"] + 1, total=_total_steps(task_dir), loss=r["loss"],
                        tok_per_s=r.get("tok_per_s"), eta_s=r.get("eta_s"),
                        val=evals[-1] if evals else None, core=cores[-1] if cores else None,
                        reached=reached)


def duration(seconds: float) -> str:
    """42s, 3m05s, 2h07m."""
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def hms_seconds(raw: str) -> float:
    """SLURM's [D-]HH:MM:SS (sacct) or M:SS (squeue) in seconds; 0 for what is none of them."""
    days, _, hms = str(raw or "").rpartition("-")
    try:
        parts = [float(p) for p in hms.split(":")]
    except ValueError:
        return 0.0
    while len(parts) < 3:
        parts.insert(0, 0.0)
    return (int(days) if days.isdigit() else 0) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]


def task_seconds(task: dict) -> float:
    """A task's run time: the local executor's elapsed_s, or SLURM's elapsed (hms_seconds), so
    that status and the report show every task's time in one format."""
    if task.get("elapsed_s") is not None:
        return float(task["elapsed_s"])
    return hms_seconds(task.get("elapsed") or "")


def describe(p: TaskProgress, eta: bool = True) -> str:
    """step 30/400  loss 4.1234  val_bpb 2.4100  8,123 tok/s  ETA 1m05s — the ETA as the loop
    estimated it at that step (counting it down between records would show 0s for a run
    slower than estimated); `eta=False` for a task that ended."""
    parts = [f"step {p.step}/{p.total}" if p.total else f"step {p.step}", f"loss {p.loss:.4f}"]
    if p.val:
        parts.append(f"{p.val[0]} {p.val[1]:.4f}")
    if p.core:
        parts.append(f"core {p.core[0]:.4f}")
    if p.tok_per_s is not None:
        parts.append(f"{p.tok_per_s:,.0f} tok/s")
    if eta and p.eta_s is not None:
        parts.append(f"ETA {duration(p.eta_s)}")
    parts += [f"{label} at {duration(s)} (step {step})" for label, (s, step) in p.reached.items()]
    return "  ".join(parts)


def _epoch(iso: str | None) -> float | None:
    from datetime import datetime
    try:
        return datetime.fromisoformat(iso).timestamp() if iso else None
    except ValueError:
        return None


def job_start(task: dict, now: float) -> float | None:
    """When a running task's job started: now − its elapsed time (squeue's); a local task,
    whose elapsed time is written when it ends, started when it was submitted."""
    if task.get("elapsed_s") is None and not task.get("elapsed"):
        return _epoch(task.get("submitted"))
    return now - task_seconds(task)


def time_so_far(task: dict, now: float | None = None) -> dict:
    """Where a training task's time has gone so far, in seconds: queue wait (the manifest's
    `submitted` to the job's start, now − its elapsed time; a local task starts when submitted),
    the job's set-up before Python (cluster.setup: the process's start − the job's), and from
    the task's progress log the `timing` record the loop writes after its first step (set-up:
    imports, data and tokenizer; warm-up with the compile and whether the compile cache hit)
    and the newest records (training steps, evaluations, checkpoints). {} before that record."""
    records = _tail_records(Path(task["run_dir"]) / "progress.jsonl", None)
    timing = [r for r in records if r.get("event") == "timing"]
    if not timing:
        return {}
    t = timing[-1]
    out: dict = {}
    submitted, now = _epoch(task.get("submitted")), time.time() if now is None else now
    start = job_start(task, now)
    if submitted is not None and start is not None:
        out["queue_s"] = max(0.0, start - submitted)
        if isinstance(t.get("process_start"), (int, float)):
            out["job_setup_s"] = max(0.0, t["process_start"] - start)
    out.update({k: t[k] for k in ("setup_s", "imports_s", "data_s", "warmup_s", "compile_cache") if k in t})
    train = [r for r in records if r.get("event") == "train" and "train_s" in r]
    out["train_time_sec"] = train[-1]["train_s"] if train else 0.0
    out["eval_total_s"] = sum(r.get("eval_s", 0) for r in records if r.get("event") == "eval")
    out["checkpoint_total_s"] = sum(r.get("checkpoint_s", 0) for r in records if r.get("event") == "checkpoint")
    return out


def describe_time(t: dict) -> str:
    """queue 3s · job set-up 2s · set-up 9s (imports 4s, data 1s) · warm-up 12s (compile cache
    hit) · steps 1m05s · eval 8s · checkpoints 1s"""
    if not t:
        return ""
    parts = [f"queue {duration(t['queue_s'])}"] if "queue_s" in t else []
    if "job_setup_s" in t:
        parts.append(f"job set-up {duration(t['job_setup_s'])}")
    inner = ", ".join(f"{name} {duration(t[k])}" for k, name in (("imports_s", "imports"), ("data_s", "data"))
                      if k in t)
    parts.append(f"set-up {duration(t.get('setup_s', 0))}" + (f" ({inner})" if inner else ""))
    parts.append(f"warm-up {duration(t.get('warmup_s', 0))}" +
                 (f" (compile cache {t['compile_cache']})" if t.get("compile_cache") else ""))
    parts += [f"steps {duration(t['train_time_sec'])}", f"eval {duration(t['eval_total_s'])}",
              f"checkpoints {duration(t['checkpoint_total_s'])}"]
    return " · ".join(parts)


def progress_text(stage: str, task_dir: str | Path, running: bool,
                  targets: dict[str, float] | None = None) -> str:
    """What a task's progress log says, for the stages that keep one; "" otherwise. The ETA
    only while it runs; the time to each of `targets` (base tasks) once reached."""
    if stage not in PROGRESS_STAGES:
        return ""
    p = read_progress(task_dir, targets if stage == "base" else None)
    return describe(p, eta=running) if p else ""


def last_log_line(path: str | Path, max_bytes: int = 4096) -> str:
    """The newest line a task printed (its stdout log), skipping the JSON result a task prints
    last; of a line redrawn with carriage returns, its newest state."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - max_bytes))
            data = f.read().decode(errors="replace")
    except OSError:  # missing, or a path that is not a directory
        return ""
    for line in reversed(data.splitlines()):
        line = line.rsplit("\r", 1)[-1].strip()
        if line and not line.startswith("{"):
            return line
    return ""


def eval_summary(task_dir: str | Path) -> str:
    """An eval task's scores from the eval.json it writes: val_bpb 2.5747 arithmetic 0.120 ..."""
    try:
        res = json.loads((Path(task_dir) / "eval.json").read_text())
    except (OSError, ValueError):
        return ""
    parts = [f"val_bpb {res['val_bpb']:.4f}"] if isinstance(res.get("val_bpb"), (int, float)) else []
    parts += [f"{k} {t['accuracy']:.3f}" for k, t in (res.get("tasks") or {}).items()
              if isinstance(t.get("accuracy"), (int, float))]
    return " ".join(parts)


def discover_summary(task_dir: str | Path) -> str:
    """A discover task's answers from its discovery.json: base device batch 32 (3 probes in 8.1 s,
    cache/batch_size/base-....json); sft device batch 32 (cache hit, ...)."""
    try:
        res = json.loads((Path(task_dir) / "discovery.json").read_text())
    except (OSError, ValueError):
        return ""
    parts = []
    for stage, d in res.items():
        if not isinstance(d, dict) or "batch_size" not in d:
            continue
        how = "cache hit" if d.get("from_cache") else f"{d.get('probes')} probes in {d.get('seconds', 0):.1f} s"
        parts.append(f"{stage} device batch {d['batch_size']} ({how}, {d.get('cache_path')})")
    return "; ".join(parts)


def check_summary(task_dir: str | Path) -> str:
    """A check task's verdict from its check.json: ok, 2 ranks on 2 hosts, busbw 0.435 GB/s
    inter-node, step MFU 5.5% (slowest rank), predicted scaling efficiency 0.999 — or the failure
    naming the rank and host."""
    try:
        res = json.loads((Path(task_dir) / "check.json").read_text())
    except (OSError, ValueError):
        return ""
    if res.get("status") != "ok":
        return f"check {res.get('status', '?')}: {res.get('error', '')}"[:200]
    ranks = res.get("ranks") or []
    parts = [f"ok, {len(ranks)} rank(s) on {len({r.get('host') for r in ranks})} host(s)"]
    pred = res.get("prediction") or {}
    if pred.get("busbw_scope"):
        parts.append(f"busbw {pred['busbw_gbps']:.3f} GB/s {pred['busbw_scope']}")
    mfus = [s["mfu_percent"] for s in (res.get("step") or {}).values() if "mfu_percent" in s]
    if mfus:
        parts.append(f"step MFU {min(mfus):.1f}% (slowest rank)")
    if "efficiency" in pred:
        parts.append(f"predicted scaling efficiency {pred['efficiency']:.3f}")
    return ", ".join(parts)


def result_summary(stage: str, task_dir: str | Path) -> str:
    """What a finished task without a training log produced: eval scores, discovery's answers,
    the cluster check's verdict."""
    summaries = {"eval": eval_summary, "discover": discover_summary, "check": check_summary}
    return summaries[stage](task_dir) if stage in summaries else ""


# --------------------------------------------------------------------------------------------
# The live display of the local executor.

@dataclass
class LiveTask:
    stage: str
    index: int
    task_dir: str
    started: float              # time.monotonic() when its process started
    log: str | None = None      # its stdout: what a task without a progress log is doing

    @property
    def label(self) -> str:
        return f"[{self.stage} {self.index}]"


class LiveDisplay:
    """One line per running task: stage, elapsed time, and for training stages step/total, loss,
    tok/s and ETA (before their first step, and for the other stages, the newest line of the
    task's log). On a terminal the lines are redrawn in place at every `update`; otherwise
    (CI logs, pipes) a task gets a new line when its progress changes — at most one per
    `min_interval_s` — and, when nothing was printed for `heartbeat_s`, every running task's
    line is printed again, so a log is never silent while work runs. `log` prints a permanent
    line (a task's end) above the live ones."""

    def __init__(self, out: TextIO | None = None, tty: bool | None = None,
                 heartbeat_s: float = 10.0, min_interval_s: float = 5.0):
        self.out = out or sys.stdout
        if tty is None:
            tty = self.out.isatty() and os.environ.get("TERM") != "dumb"
        self.tty, self.heartbeat_s, self.min_interval_s = tty, heartbeat_s, min_interval_s
        self.drawn: list[str] = []      # terminal: the live lines on screen now
        self.shown: dict[tuple[str, int], tuple[object, float]] = {}  # task → (what, when) last printed
        self.last_print = time.monotonic()

    def _line(self, task: LiveTask, now: float) -> tuple[str, object]:
        """The task's line and what it reports apart from the clock (a change prints a line)."""
        head = f"{task.label} {duration(now - task.started):>6}"
        p = read_progress(task.task_dir) if task.stage in PROGRESS_STAGES else None
        if p is not None:
            return f"{head}  {describe(p)}", ("training", p.step, p.val)
        said = last_log_line(task.log) if task.log else ""
        what = "starting" if task.stage in PROGRESS_STAGES else "running"
        return f"{head}  {what}" + (f" · {said[:100]}" if said else ""), (what, said)

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()
        self.last_print = time.monotonic()

    def _erase_codes(self) -> str:
        """Up to the first live line, then clear to the end of the screen."""
        codes = f"\x1b[{len(self.drawn)}F\x1b[J" if self.tty and self.drawn else ""
        self.drawn = []
        return codes

    def log(self, text: str) -> None:
        # the live lines are drawn again at the next update, without the task that just ended
        self._write(self._erase_codes() + text + "\n")

    def update(self, tasks: list[LiveTask]) -> None:
        now = time.monotonic()
        lines = [self._line(t, now) for t in tasks]
        if self.tty:  # one write: erasing and drawing apart would flicker
            size = shutil.get_terminal_size()
            texts = [text for text, _ in lines]
            if len(texts) > size.lines - 2:  # lines scrolled off the screen can't be redrawn
                texts = texts[:max(1, size.lines - 3)] + [f"… and {len(texts) - max(1, size.lines - 3)} more"]
            erase = self._erase_codes()
            self.drawn = [text[:size.columns - 1] for text in texts]  # a wrapped line breaks the redraw
            self._write(erase + "".join(ln + "\n" for ln in self.drawn))
            return
        quiet = now - self.last_print >= self.heartbeat_s
        for task, (text, what) in zip(tasks, lines):
            before = self.shown.get((task.stage, task.index))
            # a new kind of news (the first training step) at once, more of the same in a while
            changed = before is None or before[0][0] != what[0] or \
                (before[0] != what and now - before[1] >= self.min_interval_s)
            if changed or quiet:
                self._print(task, text, what, now)

    def _print(self, task: LiveTask, text: str, what: tuple, now: float) -> None:
        self._write(text + "\n")
        self.shown[(task.stage, task.index)] = (what, now)

    def finish(self, task: LiveTask, head: str, tail: str = "") -> None:
        """The task ended: a permanent line `head · what it achieved tail` — a training task's
        last step, loss, val and tok/s (its live line is gone on a terminal, and in a log may be
        some steps behind), an eval task's scores."""
        self.shown.pop((task.stage, task.index), None)
        if task.stage in ("eval", "discover", "check"):
            said = result_summary(task.stage, task.task_dir)
        else:
            p = read_progress(task.task_dir) if task.stage in PROGRESS_STAGES else None
            said = describe(p, eta=False) if p else ""
        self.log(head + (f" · {said}" if said else "") + tail)

    def close(self) -> None:
        self._write(self._erase_codes())
