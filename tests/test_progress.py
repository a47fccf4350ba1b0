"""The progress reader (jobs/progress.py) shared by jobs/status.py and the local executor, and
the live display the local executor prints while tasks run: in place on a terminal, a line per
update in a log, never silent for long."""
import io
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

from jobs.progress import (TAIL_BYTES, LiveDisplay, LiveTask, describe, describe_time, duration, progress_text,
                           read_progress, time_so_far)
from nanochat.trainer import ProgressLog

REPO = Path(__file__).resolve().parents[1]


def _training_dir(tmp_path: Path, steps: int = 30, total: int = 400) -> Path:
    """A task directory as the training loop leaves it: run.json with the total, and progress
    records written by its own ProgressLog."""
    d = tmp_path / "base" / "000"
    d.mkdir(parents=True)
    (d / "run.json").write_text(json.dumps({"stage": "base", "num_iterations": total}))
    log = ProgressLog(d / "progress.jsonl", enabled=True)
    log.write({"event": "eval", "step": 0, "val_bpb": 3.5, "eval_s": 0.1})
    for s in range(steps):
        log.write({"event": "train", "step": s, "loss": 6.0 - s / 10, "lr_mult": 1.0, "tok_per_s": 8123.4,
                   "mfu": 1.0, "eta_s": 65.0, "elapsed_s": s * 0.5})
        if s == 19:
            log.write({"event": "eval", "step": 20, "val_bpb": 2.41, "eval_s": 0.1})
    return d


def test_reader_reports_the_newest_step_of_the_total_loss_rate_eta_and_evaluation(tmp_path):
    p = read_progress(_training_dir(tmp_path))
    assert (p.step, p.total, p.loss, p.tok_per_s, p.eta_s) == (30, 400, 6.0 - 29 / 10, 8123.4, 65.0)
    assert p.val == ("val_bpb", 2.41, 20)
    assert describe(p) == "step 30/400  loss 3.1000  val_bpb 2.4100  8,123 tok/s  ETA 1m05s"
    assert read_progress(tmp_path / "nothing-here") is None, "no log yet: no progress"


def test_reader_skips_a_line_being_written_and_reads_far_back_when_the_tail_has_no_step(tmp_path):
    d = _training_dir(tmp_path)
    with open(d / "progress.jsonl", "a") as f:
        f.write('{"event": "train", "step": 30, "lo')  # the loop is appending this right now
    assert read_progress(d).step == 30
    log = ProgressLog(d / "progress.jsonl", enabled=True)
    with open(d / "progress.jsonl", "a") as f:
        f.write("ss\": 1.0}\n")
    for _ in range(TAIL_BYTES // 40):  # evaluations only, more than the tail holds
        log.write({"event": "eval", "step": 31, "val_bpb": 2.0})
    p = read_progress(d)
    assert (p.step, p.loss, p.val) == (31, 1.0, ("val_bpb", 2.0, 31))


def test_a_running_slurm_tasks_time_so_far_counts_queue_and_job_set_up_from_the_manifest(tmp_path):
    """Queue wait: the manifest's `submitted` to the job's start (now − squeue's elapsed); the
    job's set-up (cluster.setup) to the process's start, which the loop's `timing` record holds;
    then set-up, warm-up, the compile cache, steps, evaluations, checkpoints from the log."""
    from datetime import datetime, timezone
    d = _training_dir(tmp_path)
    now = 1_800_000_000.0
    log = ProgressLog(d / "progress.jsonl", enabled=True)
    assert time_so_far({"run_dir": str(d)}, now) == {}, "before the first step: nothing to say"
    log.write({"event": "timing", "step": 0, "setup_s": 9.0, "imports_s": 4.0, "data_s": 1.0, "warmup_s": 12.0,
               "compile_cache": "hit", "process_start": now - 100 + 2})
    log.write({"event": "checkpoint", "step": 10, "checkpoint_s": 1.5})
    submitted = datetime.fromtimestamp(now - 400, timezone.utc).isoformat(timespec="seconds")
    task = {"run_dir": str(d), "submitted": submitted, "elapsed": "1:40", "state": "RUNNING"}
    t = time_so_far(task, now)
    assert (t["queue_s"], t["job_setup_s"], t["compile_cache"], t["checkpoint_total_s"]) == (300, 2, "hit", 1.5)
    assert t["eval_total_s"] == 0.2 and t["train_time_sec"] == 0.0  # the fixture's records carry no train_s
    assert describe_time(t) == ("queue 5m00s · job set-up 2s · set-up 9s (imports 4s, data 1s) · "
                                "warm-up 12s (compile cache hit) · steps 0s · eval 0s · checkpoints 2s")


def test_a_task_that_ended_shows_no_eta_and_durations_read_as_a_person_says_them(tmp_path):
    d = _training_dir(tmp_path)
    assert progress_text("base", d, running=True).endswith("ETA 1m05s")
    assert progress_text("base", d, running=False) == "step 30/400  loss 3.1000  val_bpb 2.4100  8,123 tok/s"
    assert progress_text("eval", d, running=True) == "", "only training stages keep a progress log"
    assert [duration(s) for s in (0, 42, 185, 7620)] == ["0s", "42s", "3m05s", "2h07m"]


def test_in_a_log_a_task_gets_a_line_per_change_and_a_heartbeat_when_nothing_changes(tmp_path):
    out = io.StringIO()
    display = LiveDisplay(out, tty=False, heartbeat_s=0.4, min_interval_s=0.2)
    log = tmp_path / "sweep_0.out"
    log.write_text("kv_sweep: cache batch 1 ... 66.0 tok/s\n")
    sweep = LiveTask("sweep", 0, str(tmp_path / "sweep"), time.monotonic(), str(log))
    display.update([sweep])
    display.update([sweep])
    assert out.getvalue().splitlines() == ["[sweep 0]     0s  running · kv_sweep: cache batch 1 ... 66.0 tok/s"]
    time.sleep(0.45)
    display.update([sweep])
    assert len(out.getvalue().splitlines()) == 2, "nothing changed for heartbeat_s: the line again"
    with open(log, "a") as f:
        f.write("kv_sweep: cache batch 4 ... 191.6 tok/s\n")
    display.update([sweep])
    assert len(out.getvalue().splitlines()) == 2, "a change within min_interval_s of the last line waits"
    time.sleep(0.25)
    display.update([sweep])
    assert out.getvalue().splitlines()[-1].endswith("batch 4 ... 191.6 tok/s")
    # a training task: its first step is printed at once, its newest step with its end
    base = LiveTask("base", 0, str(tmp_path / "base" / "000"), time.monotonic())
    display.update([base])
    assert out.getvalue().splitlines()[-1].endswith("starting")
    _training_dir(tmp_path, steps=1)
    display.update([base])
    assert re.search(r"\[base 0\] +0s  step 1/400  loss 6.0000 .*8,123 tok/s  ETA 1m0\ds$", out.getvalue())
    ProgressLog(Path(base.task_dir) / "progress.jsonl", True).write({"event": "train", "step": 399, "loss": 2.5})
    display.update([base])  # within min_interval_s of the last line: not printed yet
    display.finish(base, "[base 0] COMPLETED in 1s")
    assert out.getvalue().splitlines()[-1] == "[base 0] COMPLETED in 1s · step 400/400  loss 2.5000  val_bpb 3.5000"
    assert "\x1b" not in out.getvalue(), "no terminal codes in a log"


def test_an_eval_tasks_end_line_has_its_scores_and_a_failure_points_at_its_log(tmp_path):
    out = io.StringIO()
    display = LiveDisplay(out, tty=False)
    (tmp_path / "eval.json").write_text(json.dumps({  # as nanochat.eval writes it
        "stage": "sft", "step": 2, "val_bpb": 2.25, "skipped": {"gsm8k": "the hub does not answer"},
        "tasks": {"arithmetic": {"metric": "exact", "accuracy": 0.5, "correct": 5, "total": 10}}}))
    display.finish(LiveTask("eval", 0, str(tmp_path), time.monotonic()), "[eval 0] COMPLETED in 9s")
    display.finish(LiveTask("sweep", 0, str(tmp_path / "sweep"), time.monotonic()), "[sweep 0] FAILED in 1s",
                   " — see logs/sweep_0.err")
    assert out.getvalue().splitlines() == ["[eval 0] COMPLETED in 9s · val_bpb 2.2500 arithmetic 0.500",
                                           "[sweep 0] FAILED in 1s — see logs/sweep_0.err"]


def test_on_a_terminal_the_lines_are_redrawn_in_place(tmp_path):
    out = io.StringIO()
    display = LiveDisplay(out, tty=True)
    tasks = [LiveTask("eval", i, str(tmp_path), time.monotonic()) for i in range(2)]
    display.update(tasks)
    assert out.getvalue() == "[eval 0]     0s  running\n[eval 1]     0s  running\n"
    display.update(tasks)
    assert out.getvalue().endswith("\x1b[2F\x1b[J[eval 0]     0s  running\n[eval 1]     0s  running\n"), \
        "up two lines, clear, draw again"
    display.log("[eval 0] COMPLETED in 0s")
    display.update(tasks[1:])
    display.close()
    assert out.getvalue().endswith("\x1b[2F\x1b[J[eval 0] COMPLETED in 0s\n[eval 1]     0s  running\n"
                                   "\x1b[1F\x1b[J"), "the end stays; the live line is cleared on close"


def test_a_local_run_shows_each_tasks_progress_and_is_never_silent_for_long(tiny_recipe, tmp_path):
    """The launcher's own output, as CI sees it (a pipe): base's step/total, loss, tok/s and ETA,
    the other stages running, the end of every task, and no gap of more than ~12 s."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        **{k: v for k, v in tiny_recipe.items() if k != "run_dir"}, "name": "p",
        "stages": ["base", "kv_bench", "report"],
        "train": {**tiny_recipe["train"], "num_iterations": 60, "train_log_every": 5, "eval_every": 30},
        "kv_bench": {"batch_sizes": [1, 2], "include_largest": False, "prompt_len": 4,
                  "max_new_tokens": 8, "warmup": 0, "repeats": 1}}))
    proc = subprocess.Popen([sys.executable, "jobs/launch.py", str(recipe), "--executor", "local",
                             "--output-root", str(tmp_path / "runs")], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = []  # (seconds since start, text), read as they come
    t0 = time.monotonic()
    for line in proc.stdout:
        lines.append((time.monotonic() - t0, line.rstrip("\n")))
    assert proc.wait(timeout=600) == 0, "\n".join(text for _, text in lines)
    text = "\n".join(t for _, t in lines)
    assert re.search(r"^\[base 0\] +\S+  step \d+/60  loss \d+\.\d{4} .*[\d,]+ tok/s  ETA \S+$", text, re.M), text
    assert re.search(r"^\[base 0\] COMPLETED in \S+ · step 60/60  loss \d+\.\d{4}  val_bpb ", text, re.M), text
    assert re.search(r"^\[kv_bench 0\] +\S+  running", text, re.M), text
    ends = [t for _, t in lines if re.match(r"\[\w+ 0\] COMPLETED in ", t)]
    assert [e.split()[0] for e in ends] == ["[base", "[kv_bench", "[report"], text
    start = next(i for i, (_, t) in enumerate(lines) if t.startswith("run directory:"))
    end = next(i for i, (_, t) in enumerate(lines) if t.startswith("finished:"))
    gaps = [b[0] - a[0] for a, b in zip(lines[start:end], lines[start + 1:end + 1])]
    assert max(gaps) <= 12, f"silent for {max(gaps):.1f}s:\n{text}"
