"""Launch a recipe as jobs:  python jobs/launch.py RECIPE [section.key=value ...] [flags]

    --executor auto|slurm|local   auto: SLURM when a controller answers (`sinfo`), else local
    --dry-run                     print every sbatch script the plan would submit; submit nothing
    --watch                       stay and follow the run until it ends (jobs/status.py)
    --resume                      on an existing run directory: skip finished tasks, rerun the rest
    --force                       on an existing run directory: move it aside and start over
    --output-root DIR             run directories must lie under it [runs]

The run directory (output root / recipe name, or `run_dir`) is the record of the run, written
before anything is submitted: the resolved recipe, `manifest.json` (git commit, every job id,
array task → grid values, output paths, stage states) and the jobs' logs.
"""
from __future__ import annotations

import getpass
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python jobs/launch.py` from anywhere

from jobs.plan import Plan, Stage, build_plan, discovery_stages, resolve_run_dir, slurm_parameters  # noqa: E402
from jobs.manifest import (CANCELLED, DONE, FAILED, MANIFEST, cancel_reason, has_manifest,  # noqa: E402
                           launcher_record, new_manifest, read_manifest, save_manifest, upstream_tasks)
from jobs.progress import LiveDisplay, LiveTask, duration  # noqa: E402
from jobs.tasks import run_task  # noqa: E402
from nanochat.common import NO_DOWNLOAD_ENV, UserError, cli_main, now_iso  # noqa: E402
from nanochat.config import OUTPUT_ROOT  # noqa: E402
from nanochat.recipe import load_recipe, recipe_argparser, save_resolved_recipe  # noqa: E402

def slurm_available() -> bool:
    """submitit's own auto choice picks SLURM whenever `srun` is on PATH, even with no
    controller: ask the controller instead."""
    if shutil.which("sinfo") is None:
        return False
    try:
        return subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def check_partition(partition: str | None) -> None:
    if partition is None:
        return
    out = subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True, timeout=10).stdout.split()
    if partition not in out:
        raise UserError(f"cluster.partition {partition!r} is not a partition of this cluster "
                        f"(sinfo lists: {', '.join(out) or 'none'}); nothing was submitted")


def discovery_lookup(recipe, executor: str = "local") -> tuple[bool | None, str]:
    """Whether the batch-size cache already answers for every stage that asks for `auto` (base
    and/or sft) on the device the jobs will get — this machine's for the local executor, else
    the one the partition's device record names (`nanochat.targets`: a login node has no GPU)
    — and a line saying which, or why the cache could not be asked. (None, "") when none asks."""
    keys = discovery_stages(recipe)
    if not keys:
        return None, ""
    # imports torch: only when a stage asks
    from nanochat.batch_size import cached_result
    from nanochat.targets import partition_target
    target, where = None, "on this machine"
    if executor != "local":
        target, where = partition_target(recipe)
        if target is None:
            return False, where
    hit = all(cached_result(recipe, stage=k, world_size=recipe.cluster.world_size, target=target)
              is not None for k in keys)
    return hit, where if hit else f"not cached yet for {target.name if target else 'this machine'}"


def discovery_cached(recipe, executor: str = "local") -> bool | None:
    return discovery_lookup(recipe, executor)[0]


# What `nanochat.prepare` reads: grid values in these change what must be prepared.
PREPARED_SECTIONS = ("data", "tokenizer", "sft", "eval", "cache_dir")


def prepare_commands(args_recipe: str, overrides: list[str], plan: Plan) -> list[list[str]]:
    """One `nanochat.prepare` command per distinct set of grid values that changes the data."""
    seen: list[tuple] = []
    for task_overrides in [t.overrides for s in plan.stages for t in s.tasks] or [[]]:
        key = tuple(o for o in task_overrides if o.split("=")[0].split(".")[0] in PREPARED_SECTIONS)
        if key not in seen:
            seen.append(key)
    return [["-m", "nanochat.prepare", args_recipe, *overrides, *key] for key in seen]


def prepare_data(args_recipe: str, overrides: list[str], plan: Plan) -> None:
    """Run `python -m nanochat.prepare` for every distinct task recipe of the plan, here on the
    login node (jobs never download); its output streams through. One line on failure."""
    env = {k: v for k, v in os.environ.items() if k != NO_DOWNLOAD_ENV}
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    for args in prepare_commands(args_recipe, overrides, plan):
        print(f"preparing on this node: {shlex.join(['python', *args])}", flush=True)
        if subprocess.run([sys.executable, *args], env=env, cwd=os.getcwd()).returncode != 0:
            raise UserError("preparation failed (its error is above); nothing was submitted. Fix it, "
                            "or pass --no-prepare if the data is prepared elsewhere")


# --------------------------------------------------------------------------------------------
# Dry run: the sbatch text submitit would write, dependencies shown symbolically.

def dependency_option(stage: Stage, job_ids: dict[str, str],
                      submitted: dict[str, list[int]] | None = None,
                      todo: list[int] | None = None) -> str | None:
    """`--dependency` for a stage: `type:ID1:ID2...` over the stages it waits for that were
    submitted (SLURM requires all of them). None when it waits for none.

    aftercorr pairs array task k with upstream array task k. On --resume only unfinished tasks
    are submitted, renumbered 0..k-1 per array; where this stage's tasks and an upstream's differ,
    the pairing would be wrong, so the stage waits for the whole upstream array (afterok)."""
    ids = [job_ids[a] for a in stage.after if a in job_ids]
    kind = stage.dependency
    if kind == "aftercorr" and submitted is not None and \
            any(submitted[a] != todo for a in stage.after if a in submitted):
        kind = "afterok"
    return f"{kind}:{':'.join(ids)}" if ids else None


def render_sbatch(plan: Plan, stage: Stage) -> str:
    from submitit.slurm.slurm import _make_sbatch_string  # private but stable; submitit's own text
    params = slurm_parameters(plan.recipe, stage)
    dependency = dependency_option(stage, {a: f"<{a} job id>" for a in stage.after})
    if dependency:
        params["additional_parameters"] = {**params["additional_parameters"], "kill-on-invalid-dep": "yes",
                                           "dependency": dependency}
    if stage.is_array:
        params["map_count"] = len(stage.tasks)
    folder = str(plan.run_dir / "slurm" / "%j")
    # the command submitit's SlurmExecutor submits (its `_submitit_command_str`)
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(folder)])
    return _make_sbatch_string(command=command, folder=folder, **params)


def dry_run(plan: Plan, prepare: list[list[str]] | None = None) -> None:
    for args in prepare or []:
        print(f"# would prepare first, on this node: {shlex.join(['python', *args])}")
    for name, why in plan.skipped.items():
        print(f"# stage {name}: not submitted ({why})")
    for name, why in plan.reasons.items():
        print(f"# stage {name}: submitted ({why})")
    for stage in plan.stages:
        tasks = ", ".join(f"[{t.index}] {' '.join(t.overrides) or '(recipe as is)'}" for t in stage.tasks)
        print(f"# ===== stage {stage.name}: {len(stage.tasks)} task(s): {tasks}")
        print(render_sbatch(plan, stage))
    print(f"# dry run: nothing submitted; the run directory would be {plan.run_dir}")


# --------------------------------------------------------------------------------------------
# Executors

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


def run_local(plan: Plan, manifest: dict, resume: bool) -> bool:
    """Stages in dependency order; array tasks up to the throttle at once, each in its own
    process (`python -m jobs.tasks`), logs under run_dir/logs, the running tasks' progress on
    stdout (jobs/progress.py). Returns whether all succeeded. A SIGTERM or Ctrl-C stops the
    running tasks and marks every unfinished one CANCELLED, the cancel recorded in the manifest."""
    (plan.run_dir / "logs").mkdir(parents=True, exist_ok=True)
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
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
            ok &= _run_stage_local(plan, manifest, stage, resume, running, display, stop,
                                   lambda i, name=stage.name: _start_task(plan, name, i, env, root))
    except Cancelled as e:
        _cancel_local(plan, manifest, running, display, str(e))
        return False
    finally:
        display.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return ok


def _start_task(plan: Plan, stage: str, i: int, env: dict, root: str) -> subprocess.Popen:
    logs = plan.run_dir / "logs"
    with open(logs / f"{stage}_{i}.out", "w") as out, open(logs / f"{stage}_{i}.err", "w") as err:
        return subprocess.Popen([sys.executable, "-m", "jobs.tasks", str(plan.run_dir), stage, str(i)],
                                stdout=out, stderr=err, env=env, cwd=root)


def _run_stage_local(plan: Plan, manifest: dict, stage: Stage, resume: bool, running: dict,
                     display: LiveDisplay, stop: _StopRequest, start) -> bool:
    """One stage's tasks, `array_parallelism` at once, polled twice a second: the display
    refreshes between polls, so it is never silent for long while work runs."""
    entries = manifest["stages"][stage.name]["tasks"]
    state_of = lambda st, j: manifest["stages"][st]["tasks"][j]["state"]  # noqa: E731
    todo = list(range(len(entries)))
    workers = max(1, min(plan.recipe.cluster.array_parallelism, len(entries)))
    ok = True
    while todo or running:
        stop.check()  # before reaping: a Ctrl-C also kills the tasks, which must not count as failed
        while todo and len(running) < workers:
            i = todo.pop(0)
            entry = entries[i]
            if resume and entry["state"] == DONE:
                display.log(f"[{stage.name} {i}] {DONE} (in an earlier launch)")
                continue
            # stages run in order, so the tasks this one waits for have ended; afterany never blocks
            if any(state_of(st, j) != DONE for st, j in upstream_tasks(manifest, stage.name, i)):
                entry["state"] = CANCELLED
                display.log(f"[{stage.name} {i}] {CANCELLED}: "
                            + cancel_reason(manifest, stage.name, i, state_of).removeprefix("cancelled: "))
                ok = False
                continue
            entry["state"] = "RUNNING"
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


def submit_slurm(plan: Plan, manifest: dict, resume: bool) -> None:
    """Submit every stage through submitit, each depending on the stages it waits for, then return."""
    import submitit
    job_ids: dict[str, str] = {}
    submitted: dict[str, list[int]] = {}  # stage → task indices submitted now, in array order
    with submitit.helpers.clean_env():  # a job that launches jobs must not pass its SLURM_* on
        for stage in plan.stages:
            entries = manifest["stages"][stage.name]["tasks"]
            todo = [i for i, e in enumerate(entries) if not (resume and e["state"] == DONE)]
            if not todo:
                continue
            executor = submitit.SlurmExecutor(folder=str(plan.run_dir / "slurm" / "%j"), max_num_timeout=3)
            params = slurm_parameters(plan.recipe, stage)
            additional = dict(params.pop("additional_parameters"))
            dependency = dependency_option(stage, job_ids, submitted, todo)
            if dependency:
                additional["dependency"] = dependency
                additional["kill-on-invalid-dep"] = "yes"
            executor.update_parameters(additional_parameters=additional, **params)
            try:
                with executor.batch():
                    jobs = [executor.submit(run_task, str(plan.run_dir), stage.name, i) for i in todo]
            except submitit.core.utils.FailedJobError as e:
                reason = str(e).strip().splitlines()[-1] if str(e).strip() else "sbatch failed"
                raise UserError(f"sbatch refused stage {stage.name}: {reason}") from None
            for i, job in zip(todo, jobs):
                entries[i]["job_id"] = job.job_id
                entries[i]["state"] = "PENDING"
            job_ids[stage.name] = jobs[0].job_id.split("_")[0]
            submitted[stage.name] = todo
            manifest["stages"][stage.name]["job_id"] = job_ids[stage.name]
            save_manifest(plan.run_dir, manifest)
            print(f"submitted {stage.name}: job {job_ids[stage.name]} ({len(jobs)} task(s))", flush=True)


# --------------------------------------------------------------------------------------------

def prepare_run_dir(run_dir: Path, resume: bool, force: bool) -> dict | None:
    """The previous manifest when resuming; refuses to reuse a run directory silently."""
    if not has_manifest(run_dir):
        return None
    if force:
        aside = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        run_dir.rename(aside)
        print(f"--force: moved the previous run to {aside}")
        return None
    if resume:
        return read_manifest(run_dir)
    raise UserError(f"{run_dir} already holds a run ({MANIFEST}); pass --resume to rerun its "
                    "unfinished tasks, --force to start over, or choose another run_dir")


def main(argv: list[str]) -> int:
    ap = recipe_argparser("python jobs/launch.py", "Launch a recipe as SLURM (or local) jobs.")
    ap.add_argument("--executor", choices=["auto", "slurm", "local"], default="auto")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--watch", action="store_true")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--output-root", default=OUTPUT_ROOT)
    ap.add_argument("--no-prepare", action="store_true",
                    help="don't run nanochat.prepare here first (the data is prepared elsewhere)")
    args = ap.parse_intermixed_args(argv)
    if args.resume and args.force:
        raise UserError("--resume and --force exclude each other")
    recipe = load_recipe(args.recipe, args.overrides)
    run_dir = resolve_run_dir(recipe, Path(args.output_root))
    recipe.run_dir = str(run_dir)
    plan = build_plan(recipe, run_dir)  # checks the recipe before anything runs
    for stage in plan.stages:  # every task's recipe must load (grid keys and values are checked)
        for task in stage.tasks:
            load_recipe(args.recipe, args.overrides + task.overrides)
    if args.dry_run:  # what a SLURM submission would do, from here
        dry_run(build_plan(recipe, run_dir, *discovery_lookup(recipe, "slurm")),
                None if args.no_prepare else prepare_commands(args.recipe, args.overrides, plan))
        return 0
    executor = args.executor if args.executor != "auto" else ("slurm" if slurm_available() else "local")
    if executor == "slurm" and not slurm_available():
        raise UserError("--executor slurm but no SLURM controller answers (sinfo failed); start one "
                        "(sudo slurm/local-cluster.sh start) or use --executor local")
    if executor == "slurm":
        check_partition(recipe.cluster.partition)
    if not args.no_prepare:
        prepare_data(args.recipe, args.overrides, plan)
    # after preparing: the cache key holds the trained tokenizer's real vocabulary
    plan = build_plan(recipe, run_dir, *discovery_lookup(recipe, executor))
    previous = prepare_run_dir(run_dir, args.resume, args.force)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_resolved_recipe(recipe, run_dir / "recipe.yaml", {"launched_with": " ".join([args.recipe] + args.overrides)})
    manifest = previous if previous is not None else new_manifest(plan, executor)
    manifest["executor"] = executor
    manifest.pop("cancelled", None)  # a resumed run is no longer cancelled
    if executor == "local":  # so that `jobs/status.py --cancel` can stop it
        manifest["launcher"] = launcher_record()
    save_manifest(run_dir, manifest)
    print(f"run directory: {run_dir}", flush=True)
    for name, why in plan.skipped.items():
        print(f"stage {name}: skipped ({why})", flush=True)
    for name, why in plan.reasons.items():
        print(f"stage {name}: runs ({why})", flush=True)
    if executor == "local":
        ok = run_local(plan, manifest, resume=previous is not None)
        if manifest.get("cancelled"):
            again = [a for a in argv if a not in ("--force", "--resume")] + ["--resume"]
            print(f"cancelled; to finish it: {shlex.join(['python', 'jobs/launch.py', *again])}", flush=True)
        else:
            print(f"{'finished' if ok else 'finished with failures'}: {run_dir / 'report.md'}")
        return 0 if ok else 1
    submit_slurm(plan, manifest, resume=previous is not None)
    print(f"follow it: python jobs/status.py {run_dir}")
    if args.watch:
        from jobs.status import watch
        return watch(run_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
