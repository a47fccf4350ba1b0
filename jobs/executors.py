"""Executing a plan: which tasks a launch (re)submits, and the two executors that run them —
SLURM through submitit, and the local executor (one process per task, on this machine).

What a launch submits (`select_tasks`): a new run, every task. `--resume`, every task that is
neither COMPLETED nor live (pending, running, requeued: the scheduler's answer, jobs/scheduler.py)
— and the tasks downstream of one that reruns — with the new jobs waiting on the live ones.
`--only STAGES`, every task of those stages and of the stages that depend on them. A task that
is live is never submitted again: the kit never runs one task twice at once.
"""
from __future__ import annotations

import contextlib
import getpass
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from jobs.manifest import (CANCELLED, DONE, FAILED, NothingQueued, cancel_reason, save_manifest, save_submitted,
                           upstream_tasks)
from jobs.plan import Plan, Stage, guarded_setup, slurm_parameters
from jobs.progress import LiveDisplay, LiveTask, duration
from jobs.scheduler import LIVE, cancel_and_wait, tagged_jobs, timeout_s
from nanochat.common import UserError, now_iso

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Selection:
    """What one launch submits: stage → task indices, stage → live job ids (array tasks as
    123_4) its new tasks must also wait for, and a line per task left alone saying why."""
    tasks: dict[str, list[int]] = field(default_factory=dict)
    waits: dict[str, list[str]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    replace: list[str] = field(default_factory=list)  # pending jobs cancelled and resubmitted (upstream reruns)

    @property
    def empty(self) -> bool:
        return not any(self.tasks.values())


def _downstream(manifest: dict, stages: set[str]) -> set[str]:
    """The stages, and every stage that waits (directly or not) on one of them."""
    out, grew = set(stages), True
    while grew:
        grew = False
        for name, info in manifest["stages"].items():
            if name not in out and out & set(info["after"]):
                out.add(name)
                grew = True
    return out


def _where(task: dict) -> str:
    return f"job {task['job_id']}" if task.get("job_id") else "the local launcher"


def select_tasks(manifest: dict, mode: str, only: list[str] | None = None) -> Selection:
    """mode: "new" (every task), "resume" or "only" (see the module docstring). The manifest's
    states must be fresh (jobs/scheduler.py refresh)."""
    sel = Selection()
    stages = manifest["stages"]
    if mode == "only":
        unknown = [s for s in only or [] if s not in stages]
        if unknown:
            raise UserError(f"--only {','.join(unknown)}: this run has no such stage (it has: "
                            f"{', '.join(stages)}); nothing was submitted")
        rerun = _downstream(manifest, set(only or []))
        live = [f"{name} task {t['index']} ({t['state']} as {_where(t)})" for name in stages
                if name in rerun for t in stages[name]["tasks"] if t["state"] in LIVE]
        if live:
            raise UserError(f"--only would rerun tasks that are still live: {'; '.join(live)}; wait "
                            "for them or cancel them (python jobs/status.py RUN --cancel); nothing was submitted")
    for name, info in stages.items():
        todo = []
        for t in info["tasks"]:
            i, state = t["index"], t["state"]
            if mode == "new":
                todo.append(i)
            elif mode == "only":
                if name in rerun:
                    todo.append(i)
                else:
                    sel.skipped.append(f"{name} task {i}: {state}, not rerun (--only {','.join(only)})")
            elif state == "PENDING" and t.get("job_id") and _upstream_reruns(manifest, sel, name, i):
                # its dependency names only the old jobs: it would run before the reruns end (the
                # report, on stale results) and never again. Not started yet: replaced.
                todo.append(i)
                sel.replace.append(t["job_id"])
                sel.skipped.append(f"{name} task {i}: PENDING as {_where(t)}, which waits for jobs "
                                   "that are rerun: cancelled and submitted again after them")
            elif state in LIVE:
                sel.skipped.append(f"{name} task {i}: still {state} as {_where(t)}; not submitted again")
            elif state == DONE and not _upstream_reruns(manifest, sel, name, i):
                sel.skipped.append(f"{name} task {i}: COMPLETED{' (' + _where(t) + ')' if t.get('job_id') else ''}")
            else:
                todo.append(i)
        if todo:
            sel.tasks[name] = todo
            waits = [t["job_id"] for t in _needed(manifest, name, todo)
                     if t["state"] in LIVE and t.get("job_id") and mode != "new" and t["job_id"] not in sel.replace]
            if waits:
                sel.waits[name] = sorted(set(waits))
    return sel


def _needed(manifest: dict, stage: str, todo: list[int]) -> list[dict]:
    """The upstream tasks the given tasks of `stage` wait for (the report: all of them)."""
    info = manifest["stages"][stage]
    if info["dependency"] == "afterany":
        return [t for up in info["after"] for t in manifest["stages"][up]["tasks"]]
    pairs = {p for i in todo for p in upstream_tasks(manifest, stage, i)}
    return [t for up in info["after"] for t in manifest["stages"][up]["tasks"] if (up, t["index"]) in pairs]


def _upstream_reruns(manifest: dict, sel: Selection, stage: str, index: int) -> bool:
    """Whether a finished task must rerun because a task it reported on or built on reruns
    (stages come in dependency order, so the upstream ones are already decided)."""
    info = manifest["stages"][stage]
    if info["dependency"] == "afterany":  # the report: of everything, so after anything reran
        return any(sel.tasks.get(up) for up in info["after"])
    return any(j in sel.tasks.get(up, []) for up, j in upstream_tasks(manifest, stage, index))


def dependency_option(stage: Stage, job_ids: dict[str, str],
                      submitted: dict[str, list[int]] | None = None,
                      todo: list[int] | None = None, waits: list[str] | None = None) -> str | None:
    """`--dependency` for a stage: `type:ID1:ID2...` over the stages it waits for that were
    submitted (SLURM requires all of them), and `afterok` (afterany for the report) on `waits`,
    the live jobs of an earlier launch it also needs. None when it waits for none.

    aftercorr pairs array task k with upstream array task k. On --resume only unfinished tasks
    are submitted, renumbered 0..k-1 per array; where this stage's tasks and an upstream's differ,
    the pairing would be wrong, so the stage waits for the whole upstream array (afterok)."""
    ids = [job_ids[a] for a in stage.after if a in job_ids]
    kind = stage.dependency
    if kind == "aftercorr" and submitted is not None and \
            any(submitted[a] != todo for a in stage.after if a in submitted):
        kind = "afterok"
    terms = [f"{kind}:{':'.join(ids)}"] if ids else []
    if waits:
        terms.append(f"{'afterany' if stage.dependency == 'afterany' else 'afterok'}:{':'.join(waits)}")
    return ",".join(terms) or None


def code_environment(code: Path | None) -> dict[str, str]:
    """PYTHONPATH for a task's process: the run's code snapshot (or, without one, this checkout)
    first, so the task imports the code that was launched."""
    root = str(code or REPO)
    return {"PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}


# --------------------------------------------------------------------------------------------
# The local executor

class Cancelled(Exception):
    """SIGTERM (`jobs/status.py --cancel` on a local run) or Ctrl-C reached the local executor."""


class _StopRequest:
    """Signal handler that only notes the request: the polling loop acts on it between polls
    (an exception raised at any point could leave a task's process started but unrecorded)."""

    def __init__(self):
        self.how: str | None = None

    def __call__(self, signum, _frame):
        self.how = self.how or ("SIGTERM" if signum == signal.SIGTERM else "interrupted (Ctrl-C)")

    def check(self) -> None:
        if self.how:
            raise Cancelled(self.how)


def run_local(plan: Plan, manifest: dict, selection: Selection, code: Path | None = None) -> bool:
    """Stages in dependency order; array tasks up to the throttle at once, each in its own
    process (`python -m jobs.tasks`, importing the run's code snapshot), logs under run_dir/logs,
    the running tasks' progress on stdout (jobs/progress.py). Returns whether all succeeded. A
    SIGTERM or Ctrl-C stops the running tasks and marks every unfinished one CANCELLED, the
    cancel recorded in the manifest."""
    (plan.run_dir / "logs").mkdir(parents=True, exist_ok=True)
    cwd = str(code or REPO)
    env = {**os.environ, **code_environment(code)}
    for key in [k for k in env if k.startswith("SLURM_")]:
        env.pop(key)  # a local run inside a SLURM allocation must not look like a SLURM job
    display = LiveDisplay()
    running: dict[tuple[str, int], tuple[subprocess.Popen, LiveTask]] = {}
    stop = _StopRequest()
    # signal handlers can only be set from the main thread (launch.main called from elsewhere: none)
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)} \
        if threading.current_thread() is threading.main_thread() else {}
    ok = True
    try:
        for stage in plan.stages:
            ok &= _run_stage_local(plan, manifest, stage, selection, running, display, stop,
                                   lambda i, name=stage.name: _start_task(plan, name, i, env, cwd))
    except Cancelled as e:
        _cancel_local(plan, manifest, running, display, str(e))
        return False
    finally:
        display.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return ok


def _start_task(plan: Plan, stage: str, i: int, env: dict, cwd: str) -> subprocess.Popen:
    logs = plan.run_dir / "logs"
    with open(logs / f"{stage}_{i}.out", "w") as out, open(logs / f"{stage}_{i}.err", "w") as err:
        return subprocess.Popen([sys.executable, "-m", "jobs.tasks", str(plan.run_dir), stage, str(i)],
                                stdout=out, stderr=err, env=env, cwd=cwd)


def _run_stage_local(plan: Plan, manifest: dict, stage: Stage, selection: Selection, running: dict,
                     display: LiveDisplay, stop: _StopRequest, start) -> bool:
    """One stage's selected tasks, `array_parallelism` at once, polled twice a second: the
    display refreshes between polls, so it is never silent for long while work runs."""
    entries = manifest["stages"][stage.name]["tasks"]
    state_of = lambda st, j: manifest["stages"][st]["tasks"][j]["state"]  # noqa: E731
    todo = list(selection.tasks.get(stage.name, []))
    workers = max(1, min(plan.recipe.cluster.array_parallelism, len(entries)))
    if stage.name == "discover":  # probes measure this machine's memory: one key at a time
        workers = 1
    ok = True
    while todo or running:
        stop.check()  # before reaping: a Ctrl-C also kills the tasks, which must not count as failed
        while todo and len(running) < workers:
            i = todo.pop(0)
            entry = entries[i]
            # stages run in order, so the tasks this one waits for have ended; afterany never blocks
            if any(state_of(st, j) != DONE for st, j in upstream_tasks(manifest, stage.name, i)):
                entry["state"] = CANCELLED
                display.log(f"[{stage.name} {i}] {CANCELLED}: "
                            + cancel_reason(manifest, stage.name, i, state_of).removeprefix("cancelled: "))
                ok = False
                continue
            entry.update(state="RUNNING", job_id=None, submitted=now_iso())
            entry.pop("note", None)
            save_manifest(plan.run_dir, manifest)
            log = str(plan.run_dir / "logs" / f"{stage.name}_{i}.out")
            running[(stage.name, i)] = (start(i), LiveTask(stage.name, i, entry["run_dir"], time.monotonic(), log))
        for (name, i), (proc, live) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[(name, i)]
            entry = entries[i]
            entry["elapsed_s"] = round(time.monotonic() - live.started, 1)
            entry["state"] = DONE if proc.returncode == 0 else FAILED
            save_manifest(plan.run_dir, manifest)
            err = plan.run_dir / "logs" / f"{name}_{i}.err"
            display.finish(live, f"[{name} {i}] {entry['state']} in {duration(entry['elapsed_s'])}",
                           f" — see {err}" if entry["state"] == FAILED else "")
            ok &= entry["state"] == DONE
        if running:
            display.update([live for _, live in running.values()])
            time.sleep(0.5)
            stop.check()
    save_manifest(plan.run_dir, manifest)
    return ok


def _cancel_local(plan: Plan, manifest: dict, running: dict, display: LiveDisplay, how: str) -> None:
    """Stop the running tasks (SIGTERM, then SIGKILL after 10 s) and mark every unfinished task
    CANCELLED, recording who cancelled and when, as `jobs/status.py --cancel` does on SLURM.
    (A second Ctrl-C meanwhile only notes a request again: the clean-up runs to its end.)"""
    for proc, _ in running.values():
        proc.terminate()
    for proc, _ in running.values():
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for (name, i), (_, live) in running.items():
        manifest["stages"][name]["tasks"][i]["elapsed_s"] = round(time.monotonic() - live.started, 1)
    for name, info in manifest["stages"].items():
        for task in info["tasks"]:
            if task["state"] not in (DONE, FAILED, CANCELLED):
                task["state"] = CANCELLED
                display.log(f"[{name} {task['index']}] {CANCELLED} by the user")
    manifest["cancelled"] = {"by": getpass.getuser(), "at": now_iso(), "how": how}
    save_manifest(plan.run_dir, manifest)


# --------------------------------------------------------------------------------------------
# SLURM

def launch_tag(run_dir: Path, launch_id: str | None = None) -> str:
    """The comment every job of one launch carries (`sbatch --comment`): after an sbatch that
    timed out or failed, the job it may have queued all the same is found by it (scheduler.py
    `tagged_jobs`). Unique per launch; the run's name, for a person reading squeue."""
    return f"nanochat:{re.sub(r'[^A-Za-z0-9._-]', '_', run_dir.name)}:{launch_id or uuid.uuid4().hex[:8]}"


def sbatch_timeout_s() -> float:
    """How long one sbatch may take: twice the scheduler commands' time-out (sbatch retries a
    busy controller itself before it gives up)."""
    return 2 * timeout_s()


@contextlib.contextmanager
def _timed_sbatch():
    """submitit runs `sbatch FILE` with no time-out (core.py `_submit_command`, also for arrays,
    through an executor it makes itself): a controller that does not answer would hang the
    launch. While submitit submits, `sbatch` on PATH is a wrapper that gives the real one a
    time-out (coreutils `timeout`, which kills its whole process group) and says so."""
    real = shutil.which("sbatch")
    if real is None or shutil.which("timeout") is None:  # (no coreutils timeout: sbatch as it is)
        yield
        return
    limit = f"{sbatch_timeout_s():g}"
    script = (f"#!/bin/sh\n# sbatch with a time-out (jobs/executors.py _timed_sbatch)\n"
              f"timeout -k 5 {limit} {shlex.quote(real)} \"$@\"\nrc=$?\n"
              f"if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then\n"
              f"  echo \"sbatch: error: no answer within {limit} s (the job may exist all the same)\" >&2\nfi\n"
              f"exit $rc\n")
    saved = os.environ.get("PATH", "")
    with tempfile.TemporaryDirectory(prefix="nanochat-sbatch-") as tmp:
        wrapper = Path(tmp) / "sbatch"
        wrapper.write_text(script)
        wrapper.chmod(0o755)
        os.environ["PATH"] = f"{tmp}{os.pathsep}{saved}"
        try:
            yield
        finally:
            os.environ["PATH"] = saved


def slurm_executor_parameters(plan: Plan, stage: Stage, code: Path | None, tag: str | None = None) -> dict:
    """submitit parameters of a stage's jobs: the plan's resources, and the run's code — the job
    starts in the snapshot (`python -m` puts its working directory first on sys.path, so the job
    unpickles `jobs.tasks.run_task` from it) with the snapshot on PYTHONPATH for the ranks' own
    processes. Without a snapshot the jobs import this checkout the same way, so launching from
    another directory works either way."""
    params = slurm_parameters(plan.recipe, stage)
    root = str(code or REPO)
    params["additional_parameters"] = {**params["additional_parameters"], "chdir": root,
                                       **({"comment": tag} if tag else {})}
    quoted = "'" + root.replace("'", "'\"'\"'") + "'"
    # the site's lines first (module loads, venv activation may reset PYTHONPATH), then the run's code
    params["setup"] = [*guarded_setup(plan.recipe.cluster.setup), f"export PYTHONPATH={quoted}${{PYTHONPATH:+:$PYTHONPATH}}",
                       *params.get("setup", [])]
    return params


def submit_slurm(plan: Plan, manifest: dict, selection: Selection, code: Path | None = None) -> None:
    """Submit the selected tasks of every stage through submitit, each stage depending on the
    stages it waits for (and on the live jobs `selection.waits` names), then return. Every job
    carries the launch's comment (`launch_tag`, recorded in the manifest's launch entry) and
    every sbatch a time-out. When sbatch refuses a stage, fails or does not answer, the job it
    may have queued all the same is looked up by that comment, and what this launch had
    submitted is cancelled (or, if that fails, recorded in the manifest as `orphans`); the
    error says which."""
    import submitit
    if selection.replace:  # (select_tasks: pending jobs whose upstream reruns)
        cancel_and_wait(selection.replace)
        print(f"cancelled pending jobs {' '.join(selection.replace)}: they are submitted again after "
              "the tasks they wait for", flush=True)
    tag = launch_tag(plan.run_dir)
    if manifest.get("launches"):
        manifest["launches"][-1]["comment"] = tag
    job_ids: dict[str, str] = {}
    submitted: dict[str, list[int]] = {}  # stage → task indices submitted now, in array order
    conf = os.environ.get("SLURM_CONF")
    with submitit.helpers.clean_env(), _timed_sbatch():  # a job that launches jobs must not pass its SLURM_* on
        if conf:  # ... but which cluster to submit to is the user's choice, not a job's attribute
            os.environ["SLURM_CONF"] = conf
        for stage in plan.stages:
            todo = selection.tasks.get(stage.name, [])
            if not todo:
                continue
            entries = manifest["stages"][stage.name]["tasks"]
            executor = submitit.SlurmExecutor(folder=str(plan.run_dir / "slurm" / "%j"), max_num_timeout=3)
            params = slurm_executor_parameters(plan, stage, code, tag)
            additional = dict(params.pop("additional_parameters"))
            dependency = dependency_option(stage, job_ids, submitted, todo, selection.waits.get(stage.name))
            if dependency:
                additional["dependency"] = dependency
                additional["kill-on-invalid-dep"] = "yes"
            executor.update_parameters(additional_parameters=additional, **params)
            from jobs.tasks import run_task  # the callable every job runs (pickled by reference)
            try:
                with _stderr_held(), executor.batch():
                    jobs = [executor.submit(run_task, str(plan.run_dir), stage.name, i) for i in todo]
            except submitit.core.utils.FailedJobError as e:
                reason = str(e).strip().splitlines()[-1] if str(e).strip() else "sbatch failed"
                # a time-out, or an error after the controller took the job, may leave it queued
                stray = tagged_jobs(tag)
                stray = None if stray is None else [j for j in stray if j not in job_ids.values()]
                _undo_partial(plan, manifest, job_ids, f"sbatch refused stage {stage.name}: {reason}",
                              tag, stage.name, stray)
            for i, job in zip(todo, jobs):
                entries[i].update(job_id=job.job_id, state="PENDING", submitted=now_iso())
                for key in ("elapsed", "reason", "cancelled_by", "note", "elapsed_s"):
                    entries[i].pop(key, None)
            job_ids[stage.name] = jobs[0].job_id.split("_")[0]
            submitted[stage.name] = todo
            manifest["stages"][stage.name]["job_id"] = job_ids[stage.name]
            save_submitted(plan.run_dir, manifest, [job.job_id for job in jobs])
            print(f"submitted {stage.name}: job {job_ids[stage.name]} ({len(jobs)} task(s))", flush=True)


@contextlib.contextmanager
def _stderr_held():
    """sbatch writes its refusal to the stderr it inherits, and submitit's error repeats it: hold
    what the child writes (at the file-descriptor level), pass it on only when the submission
    succeeded (a warning), so that a refusal is the launcher's one line."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        ok = False
        try:
            yield
            ok = True
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if ok:
                held.seek(0)
                sys.stderr.write(held.read().decode(errors="replace"))


def _undo_partial(plan: Plan, manifest: dict, job_ids: dict[str, str], error: str, tag: str, stage: str,
                  stray: list[str] | None) -> None:
    """A stage was refused (or its sbatch failed or timed out): cancel what this launch already
    submitted — the earlier stages, which would run a plan that can't finish, and `stray`, the
    jobs of the failed stage the queue lists under the launch's comment all the same — mark
    their tasks, and raise one line saying all of it. `stray` None: squeue could not be asked,
    so a job of the stage may be queued: the manifest records the comment to find it by."""
    parts = [(s, j, "") for s, j in job_ids.items()] + \
        [(stage, j, ", queued although sbatch failed: found by the launch's comment") for j in stray or []]
    ids = sorted({j for _, j, _ in parts}, key=int)
    unknown = "" if stray is not None else (
        f"; squeue could not say whether sbatch queued stage {stage} all the same: look for jobs with the "
        f"comment {tag} (`squeue -u {getpass.getuser()} -o '%i %k'`) and scancel them")
    if not ids and stray is not None:
        raise NothingQueued(f"{error}; nothing was submitted")
    what = ", ".join(f"{s} (job {j}{why})" for s, j, why in parts)
    try:
        cancel_and_wait(ids, timeout_s=60)
    except (UserError, OSError, subprocess.SubprocessError) as e:
        manifest["orphans"] = {"jobs": ids, "comment": tag, "at": now_iso(), "why": error}
        save_manifest(plan.run_dir, manifest)
        raise UserError(f"{error}; this launch had already submitted {what}, and cancelling them "
                        f"failed ({e}): cancel them yourself with `scancel {' '.join(ids)}`{unknown}") from None
    for name, info in manifest["stages"].items():
        for t in info["tasks"]:
            if t.get("job_id") and t["job_id"].split("_")[0] in ids:
                t.update(state=CANCELLED, note=f"cancelled by the launcher: {error}")
    manifest["cancelled"] = {"by": getpass.getuser(), "at": now_iso(), "how": error, "jobs": ids}
    if stray is None:  # jobs may be queued: the manifest stays, saying how to find them
        manifest["orphans"] = {"jobs": [], "comment": tag, "at": now_iso(), "why": error}
        save_manifest(plan.run_dir, manifest)
        raise UserError(f"{error}; cancelled what this launch had submitted ({what or 'nothing'}){unknown}")
    save_manifest(plan.run_dir, manifest)
    raise NothingQueued(f"{error}; cancelled what this launch had submitted ({what}): nothing of it is queued")
