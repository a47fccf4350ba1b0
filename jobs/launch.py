"""Launch a recipe as jobs:  python jobs/launch.py RECIPE [section.key=value ...] [flags]

    python jobs/launch.py configs/tiny.yaml                  a new run (runs/<name>)
    python jobs/launch.py --resume runs/NAME                 resubmit what is neither finished nor live
    python jobs/launch.py --resume runs/NAME --only eval,report   rerun those stages (and their dependents)
    python jobs/launch.py configs/tiny.yaml --force          cancel the old run's live jobs, move it aside, start over

The run directory (output root / recipe name, or `run_dir`) is the record of the run, written
before anything is submitted: the resolved recipe (its paths made absolute, so jobs need no
working directory), a snapshot of the code the jobs import (`code/`, jobs/snapshot.py: a later
edit or `git pull` changes nothing already submitted), `manifest.json` (every launch, job id,
array task → grid values, output paths, task states — kept current from the scheduler,
jobs/scheduler.py) and the jobs' logs.
"""
from __future__ import annotations

import argparse
import getpass
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python jobs/launch.py` from anywhere

from jobs.executors import (REPO, Selection, dependency_option, launch_tag, run_local,  # noqa: E402
                            select_tasks, slurm_executor_parameters, submit_slurm)
from jobs.manifest import (MANIFEST, NothingQueued, has_manifest, launch_lock, launcher_alive,  # noqa: E402
                           launcher_record, new_manifest, read_manifest, record_cancel, save_manifest)
from jobs.plan import Plan, Stage, build_plan, discovery_stages, grid_recipes, guarded_setup, resolve_run_dir  # noqa: E402
from jobs.preflight import preflight, sbatch_would_accept  # noqa: E402
from jobs.scheduler import cancel_and_wait, job_ids, live_tasks, refresh  # noqa: E402
from nanochat.common import NO_DOWNLOAD_ENV, UserError, cli_main, now_iso  # noqa: E402
from nanochat.config import HOME_ENV, home_unset_hint, output_root  # noqa: E402
from nanochat.recipe import absolute_paths, load_recipe, save_resolved_recipe  # noqa: E402
from jobs.preflight import check_submit_limit  # noqa: E402  (MaxSubmitJobs, before submitting)

__all__ = ["dependency_option", "main"]


def slurm_available() -> bool:
    """submitit's own auto choice picks SLURM whenever `srun` is on PATH, even with no
    controller: ask the controller instead."""
    if shutil.which("sinfo") is None:
        return False
    try:
        return subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def discovery_lookup(recipe, executor: str = "local") -> tuple[list[bool] | None, str]:
    """For each grid combination (jobs.plan.grid_recipes), whether the batch-size cache already
    answers for every stage of it that asks for `auto` (base and/or sft; True where none asks),
    on the device the jobs will get — this machine's for the local executor, else the one the
    partition's device record names (jobs/device_records.py: a login node has no GPU) — and a line
    saying which, or why the cache could not be asked. (None, "") when no combination asks."""
    points = grid_recipes(recipe)
    asks = [discovery_stages(p) for p in points]
    if not any(asks):
        return None, ""
    # imports torch: only when a stage asks
    from nanochat.batchsize.search import cached_result
    from jobs.device_records import partition_target
    targets: dict = {}  # (partition, constraint) → (target, where): asked once per device kind

    def target_of(point):
        if executor == "local":
            return None, "on this machine"
        kind = (point.cluster.partition, point.cluster.constraint)
        if kind not in targets:
            targets[kind] = partition_target(point)
        return targets[kind]

    hits, where, missing = [], "on this machine", set()
    for point, stages in zip(points, asks):
        target, where = target_of(point)
        if stages and target is None and executor != "local":
            return [False] * len(points), where
        hit = all(cached_result(point, stage=k, world_size=point.cluster.world_size, target=target)
                  is not None for k in stages)
        hits.append(hit)
        if not hit:
            missing.add(target.name if target else "this machine")
    return hits, where if all(hits) else f"not cached yet for {', '.join(sorted(missing))}"


def discovery_cached(recipe, executor: str = "local") -> bool | None:
    """Whether the cache answers for every grid combination (None when none asks)."""
    hits = discovery_lookup(recipe, executor)[0]
    return None if hits is None else all(hits)


# What `nanochat.prepare` reads: grid values in these change what must be prepared.
PREPARED_SECTIONS = ("data", "tokenizer", "sft", "eval", "cache_dir")


def prepare_commands(args_recipe: str, overrides: list[str], plan: Plan,
                     executor: str = "slurm") -> list[list[str]]:
    """One `nanochat.prepare` command per distinct set of grid values that changes the data.
    For SLURM with `--no-tokenizer`: a login node fetches what the jobs cannot (they have no
    network), and the first job trains the tokenizer on its own CPUs (nanochat/prepare.py says
    why); the local executor's machine is the one that runs the jobs, so it trains it here."""
    seen: list[tuple] = []
    for task_overrides in [t.overrides for s in plan.stages for t in s.tasks] or [[]]:
        key = tuple(o for o in task_overrides if o.split("=")[0].split(".")[0] in PREPARED_SECTIONS)
        if key not in seen:
            seen.append(key)
    flags = ["--no-tokenizer"] if executor == "slurm" else []
    return [["-m", "nanochat.prepare", args_recipe, *overrides, *key, *flags] for key in seen]


def prepare_data(args_recipe: str, overrides: list[str], plan: Plan, executor: str = "slurm") -> None:
    """Run `python -m nanochat.prepare` for every distinct task recipe of the plan, here on the
    login node (jobs never download); its output streams through. One line on failure."""
    env = {k: v for k, v in os.environ.items() if k != NO_DOWNLOAD_ENV}
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    for args in prepare_commands(args_recipe, overrides, plan, executor):
        print(f"preparing on this node: {shlex.join(['python', *args])}", flush=True)
        if subprocess.run([sys.executable, *args], env=env, cwd=os.getcwd()).returncode != 0:
            raise UserError("preparation failed (its error is above); nothing was submitted. Fix it, "
                            "or pass --no-prepare if the data is prepared elsewhere")


# --------------------------------------------------------------------------------------------
# Dry run: the sbatch text submitit would write, dependencies shown symbolically.

def render_sbatch(plan: Plan, stage: Stage, selection: Selection | None = None) -> str:
    from submitit.slurm.slurm import _make_sbatch_string  # private but stable; submitit's own text
    # the snapshot's directory is known once it is taken: shown by its place in the run directory
    params = slurm_executor_parameters(plan, stage, plan.run_dir / "code" / "SNAPSHOT",
                                       launch_tag(plan.run_dir, "LAUNCHID"))
    todo = (selection.tasks.get(stage.name, []) if selection else [t.index for t in stage.tasks])
    dependency = dependency_option(stage, {a: f"<{a} job id>" for a in stage.after
                                           if selection is None or selection.tasks.get(a)},
                                   waits=selection.waits.get(stage.name) if selection else None)
    if dependency:
        params["additional_parameters"] = {**params["additional_parameters"], "kill-on-invalid-dep": "yes",
                                           "dependency": dependency}
    if stage.is_array and len(todo) > 1:  # submitit submits a single task as a plain job
        params["map_count"] = len(todo)
    folder = str(plan.run_dir / "slurm" / "%j")
    # the command submitit's SlurmExecutor submits (its `_submitit_command_str`)
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(folder)])
    return _make_sbatch_string(command=command, folder=folder, **params)


def dry_run(plan: Plan, prepare: list[list[str]] | None = None, selection: Selection | None = None,
            ask_sbatch: bool = False) -> None:
    """Print what the launch would do; `ask_sbatch`: first have SLURM judge every script
    (`sbatch --test-only`), so that a script the launch would have refused fails here."""
    counts = {s.name: len(selection.tasks.get(s.name, []) if selection else s.tasks) for s in plan.stages}
    counts = {name: n for name, n in counts.items() if n}
    if ask_sbatch:
        check_submit_limit(plan.recipe, sum(counts.values()), len(selection.replace) if selection else 0)
        for stage in plan.stages:
            if not selection or selection.tasks.get(stage.name):
                sbatch_would_accept(stage.name, render_sbatch(plan, stage, selection))
    for args in prepare or []:
        print(f"# would prepare first, on this node: {shlex.join(['python', *args])}")
    for name, why in plan.skipped.items():
        print(f"# stage {name}: would not submit ({why})")
    for name, why in plan.reasons.items():
        print(f"# stage {name}: would submit ({why})")
    for line in selection.skipped if selection else []:
        print(f"# left alone: {line}")
    print(f"# would queue {queue_count(counts)}")
    for stage in plan.stages:
        todo = selection.tasks.get(stage.name, []) if selection else [t.index for t in stage.tasks]
        if not todo:
            continue
        tasks = ", ".join(f"[{t.index}] {' '.join(t.overrides) or '(recipe as is)'}"
                          for t in stage.tasks if t.index in todo)
        print(f"# ===== stage {stage.name}: {len(todo)} task(s): {tasks}")
        print(render_sbatch(plan, stage, selection))
    print(f"# dry run: nothing submitted; the run directory {'is' if selection else 'would be'} {plan.run_dir}")


# --------------------------------------------------------------------------------------------
# The run directory: which run a command means, and what may be done to an existing one.

def _shown(path: Path) -> str:
    """A path as the user should type it from here: relative when under the working directory."""
    rel = os.path.relpath(path)
    return rel if not rel.startswith("..") else str(path)


def resolve_target(args) -> tuple[Path, str, list[str], object]:
    """(run_dir, recipe path, overrides, recipe) of what the command names: a recipe (launch,
    or resume/force the run it made), or — with --resume/--only — a run directory, whose frozen
    recipe is the one that counts (no recipe retyped, no value changed mid-run)."""
    target = Path(args.target)
    mode_resume = args.resume or args.only
    if mode_resume and not target.exists() and target.suffix not in (".yaml", ".yml"):
        hint = home_unset_hint()
        raise UserError(f"run directory {args.target} not found; pass the run directory the launch "
                        f"printed{'; ' + hint if hint else ''}")
    if target.is_dir():
        if not mode_resume:
            raise UserError(f"{args.target} is a directory: pass a recipe (YAML) to launch, or "
                            f"--resume {args.target} to resume the run in it")
        if not has_manifest(target):
            raise UserError(f"{args.target} has no {MANIFEST}: not a run directory made by "
                            "jobs/launch.py; pass the run directory the launch printed, or a recipe")
        if args.overrides:
            raise UserError(f"--resume takes the run's own recipe ({target / 'recipe.yaml'}); "
                            f"overrides ({' '.join(args.overrides)}) would change a run mid-way: "
                            "launch a new run with them instead")
        run_dir = target.resolve()
        return run_dir, str(run_dir / "recipe.yaml"), [], load_recipe(run_dir / "recipe.yaml")
    notes: list[str] = []
    recipe = load_recipe(args.target, args.overrides, notes)
    for line in notes:  # a site file's value lost to a later file (nanochat/recipe.py)
        print(line, flush=True)
    recipe = absolute_paths(recipe, Path.cwd())  # the jobs' working directory is the snapshot
    run_dir = resolve_run_dir(recipe, Path(args.output_root))
    recipe.run_dir = str(run_dir)
    if mode_resume and has_manifest(run_dir):
        print(f"resuming {_shown(run_dir)} with its own recipe ({_shown(run_dir / 'recipe.yaml')})", flush=True)
        return run_dir, str(run_dir / "recipe.yaml"), [], load_recipe(run_dir / "recipe.yaml")
    if args.only:
        raise UserError(f"--only reruns stages of an existing run, and {run_dir} holds none; "
                        "launch the recipe without --only")
    return run_dir, args.target, list(args.overrides), recipe


def _confirm(question: str, refusal: str, yes: bool) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        raise UserError(refusal)
    if input(f"{question} [y/N] ").strip().lower() not in ("y", "yes"):
        raise UserError("not confirmed; nothing was changed")


def force_aside(run_dir: Path, yes: bool) -> Path:
    """--force: stop whatever of the old run still runs — its live SLURM jobs are cancelled and
    waited for until they have left the queue, a local launcher is stopped — then move the
    directory aside. A job still running would otherwise write, by absolute path, into the new run."""
    manifest = refresh(run_dir, strict=True) if has_manifest(run_dir) else None
    if manifest and manifest.get("executor") == "local" and launcher_alive(manifest.get("launcher")):
        pid = manifest["launcher"]["pid"]
        _confirm(f"{run_dir} still runs locally (launcher pid {pid}): stop it and move the run aside?",
                 f"--force: {run_dir} still runs locally (launcher pid {pid}); pass --yes to stop it "
                 "and move the run aside (nothing was changed)", yes)
        from jobs.monitor import cancel
        cancel(run_dir)
    elif manifest and (ids := job_ids(live_tasks(manifest))):
        print(f"--force: {run_dir} has live jobs: " + "; ".join(
            f"{name} task {t['index']} {t['state']} (job {t['job_id']})" for name, t in live_tasks(manifest)), flush=True)
        _confirm(f"cancel jobs {' '.join(ids)} and move the run aside?",
                 f"--force would cancel the live jobs {' '.join(ids)} of {run_dir}; pass --yes to "
                 "confirm (nothing was cancelled)", yes)
        record_cancel(run_dir, getpass.getuser(), ids)
        cancel_and_wait(ids)
        print(f"--force: cancelled jobs {' '.join(ids)}; none is in the queue any more", flush=True)
    aside = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir.rename(aside)
    print(f"--force: moved the previous run to {_shown(aside)}", flush=True)
    return aside


def check_run_dir(run_dir: Path, args, act: bool = True) -> str:
    """What this launch does with the run directory: "new" or "resume"/"only" an existing run
    (moving an old one aside first under --force, when `act`); refuses to reuse one silently."""
    from nanochat.checkpoint import standalone_run
    standalone = standalone_run(run_dir) if run_dir.is_dir() and not has_manifest(run_dir) else None
    if args.force and (has_manifest(run_dir) or standalone):
        if act:
            force_aside(run_dir, args.yes)
        return "new"
    if standalone:
        raise UserError(f"{_shown(run_dir)} holds a run of `python -m nanochat.train` ({standalone}), "
                        "not of jobs/launch.py; launch into another directory (run_dir=... or "
                        "--output-root), or pass --force to move it aside")
    if not has_manifest(run_dir):
        return "new"
    if args.only:
        return "only"
    if args.resume:
        return "resume"
    raise UserError(f"{_shown(run_dir)} already holds a run ({MANIFEST}); pass --resume to rerun its "
                    "unfinished tasks, --force to start over, or choose another run_dir")


def parse_only(value: str | None) -> list[str] | None:
    if value is None:
        return None
    stages = [s.strip() for s in value.split(",") if s.strip()]
    if not stages:
        raise UserError("--only needs stage names, e.g. --only eval,report")
    return stages


def add_missing_stages(manifest: dict, plan: Plan) -> None:
    """Stages the plan has and the run's manifest lacks (e.g. discovery, when the batch-size
    cache was emptied since), as new PLANNED entries, so the resume can run them."""
    fresh = new_manifest(plan, manifest.get("executor", "local"))["stages"]
    for name, info in fresh.items():
        manifest["stages"].setdefault(name, info)


# --------------------------------------------------------------------------------------------

def argparser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python jobs/launch.py",
                                 description="Launch a recipe as SLURM (or local) jobs; resume, rerun or "
                                             "replace a launched run.")
    ap.add_argument("target", metavar="RECIPE|RUN_DIR",
                    help="YAML recipe, e.g. configs/tiny.yaml; with --resume/--only also a run directory")
    ap.add_argument("overrides", nargs="*", metavar="section.key=value",
                    help="recipe overrides, e.g. train.num_iterations=100 (not with a run directory)")
    ap.add_argument("--executor", choices=["auto", "slurm", "local"], default="auto",
                    help="auto: SLURM when a controller answers (sinfo), else this machine")
    ap.add_argument("--dry-run", action="store_true",
                    help="print every sbatch script the launch would submit; submit nothing")
    ap.add_argument("--emit", nargs="?", const="", metavar="DIR",
                    help="write the plan as sbatch scripts and a submit.sh (plain sbatch, chained by the "
                         "plan's dependencies) into DIR [RUN_DIR/sbatch]; submit nothing (jobs/emit.py)")
    ap.add_argument("--watch", action="store_true", help="stay and follow the run until it ends")
    ap.add_argument("--resume", action="store_true",
                    help="resubmit the run's tasks that are neither COMPLETED nor still live")
    ap.add_argument("--only", metavar="STAGE[,STAGE]",
                    help="rerun these stages of an existing run, and the stages that depend on them")
    ap.add_argument("--force", action="store_true",
                    help="cancel an existing run's live jobs, move its directory aside, start over")
    ap.add_argument("--yes", "-y", action="store_true", help="don't ask before --force cancels jobs")
    ap.add_argument("--output-root", default=None,
                    help=f"where run directories go (runs/<name>); a run_dir must lie under it or "
                         f"under the cache root [${HOME_ENV}/runs when {HOME_ENV} is set, else ./runs]")
    ap.add_argument("--no-prepare", action="store_true",
                    help="don't run nanochat.prepare here first (the data is prepared elsewhere)")
    ap.add_argument("--new-code", action="store_true",
                    help="with --resume/--only: run this checkout's code (a new snapshot, recorded in the "
                         "manifest) instead of the run's own snapshot")
    ap.add_argument("--no-snapshot", action="store_true",
                    help="jobs import this checkout as it is when they start, not a copy made at launch")
    ap.add_argument("--setup", action="store_true",
                    help="print the recipe's cluster.setup lines as the shell text its jobs run (stopping at the "
                         "first failing line, naming it) and exit; slurm/env.sh runs it in the sbatch scripts")
    return ap


def main(argv: list[str]) -> int:
    args = argparser().parse_intermixed_args(argv)
    if args.setup:
        print("".join(line + "\n" for line in guarded_setup(load_recipe(args.target, args.overrides).cluster.setup)), end="")
        return 0
    args.output_root = args.output_root or output_root()
    if args.force and (args.resume or args.only):
        raise UserError("--force starts over; it excludes --resume and --only")
    if args.new_code and not (args.resume or args.only):
        raise UserError("--new-code changes the code of a run being resumed; pass it with --resume or --only")
    args.only_stages = parse_only(args.only)
    run_dir, recipe_path, overrides, recipe = resolve_target(args)
    plan = build_plan(recipe, run_dir)  # checks the recipe before anything runs
    for stage in plan.stages:  # every task's recipe must load (grid keys and values are checked)
        for task in stage.tasks:
            load_recipe(recipe_path, overrides + task.overrides)
    if args.emit is not None:
        return emit_plan(args, run_dir, recipe)
    executor = args.executor if args.executor != "auto" else ("slurm" if slurm_available() else "local")
    mode = check_run_dir(run_dir, args, act=False)  # refuses before anything is prepared
    if args.dry_run:  # what a SLURM submission would do, from here, checked as the launch checks it
        selection = None
        if mode != "new":
            selection = select_tasks(refresh(run_dir, strict=True), mode, args.only_stages)
        slurm = slurm_available()
        preflight(recipe, slurm)
        dry_run(build_plan(recipe, run_dir, *discovery_lookup(recipe, "slurm")),
                None if args.no_prepare else prepare_commands(recipe_path, overrides, plan), selection, slurm)
        return 0
    if args.force and has_manifest(run_dir) and (m := read_manifest(run_dir)).get("executor") == "local" \
            and launcher_alive(m.get("launcher")):
        force_aside(run_dir, args.yes)  # its launcher holds the launch lock until it is stopped
    with launch_lock(run_dir):  # one launch of a run directory at a time (jobs/manifest.py)
        if mode != "new":  # a run that can't be resumed as asked fails before anything is prepared
            _check_resumable(run_dir, mode, args.only_stages)
        if executor == "slurm" and not slurm_available():
            raise UserError("--executor slurm but no SLURM controller answers (sinfo failed); start one "
                            "(sudo slurm/local-cluster.sh start) or use --executor local")
        preflight(recipe, executor == "slurm")
        if executor == "slurm" and mode == "new" and home_unset_hint():
            print(f"note: {home_unset_hint()}", flush=True)
        if not args.no_prepare:
            prepare_data(recipe_path, overrides, plan, executor)
        # after preparing: the cache key holds the trained tokenizer's real vocabulary (under SLURM,
        # one trained before; a first run's discover job then finds it)
        plan = build_plan(recipe, run_dir, *discovery_lookup(recipe, executor))
        mode = check_run_dir(run_dir, args)
        rc = launch(args, argv, plan, mode, executor)
    return _follow(args, run_dir) if rc is None else rc  # (following holds no lock)


def emit_plan(args, run_dir: Path, recipe) -> int:
    """--emit: the plan as plain sbatch files (jobs/emit.py); writes files only."""
    from jobs.emit import emit
    if args.resume or args.only or args.force or args.dry_run or args.watch:
        raise UserError("--emit writes a new run's sbatch scripts; it takes none of --resume, --only, "
                        "--force, --dry-run, --watch")
    if has_manifest(run_dir):
        raise UserError(f"{_shown(run_dir)} holds a run of jobs/launch.py ({MANIFEST}); emit into a new "
                        "run (run_dir=... or another name), or resume that one with --resume")
    out_dir = Path(args.emit) if args.emit else run_dir / "sbatch"
    plan = build_plan(recipe, run_dir, *discovery_lookup(recipe, "slurm"))
    # the jobs read the resolved recipe beside the scripts; the wrappers' discover job trains no
    # tokenizer (the launcher's does), so preparing is complete, as for the local executor
    prepare = [] if args.no_prepare else prepare_commands(str(out_dir.resolve() / "recipe.yaml"), [], plan, "local")
    emit(plan, out_dir, prepare)
    return 0


def _check_resumable(run_dir: Path, mode: str, only: list[str] | None) -> dict:
    """The run's refreshed manifest, if this launch may resume it; one line why not otherwise."""
    manifest = refresh(run_dir, strict=True)  # acting on states the scheduler did not give: never
    if manifest.get("executor") == "local" and launcher_alive(manifest.get("launcher")):
        raise UserError(f"{_shown(run_dir)} still runs locally (launcher pid {manifest['launcher']['pid']}); "
                        f"wait for it, or stop it with python jobs/status.py {_shown(run_dir)} --cancel")
    select_tasks(manifest, mode, only)  # --only naming a stage the run never had, or a live one
    return manifest


def launch(args, argv: list[str], plan: Plan, mode: str, executor: str) -> int | None:
    """Run or submit the plan: the local run's exit code, or None for a submitted run (followed
    once the launch lock is released)."""
    run_dir, recipe = plan.run_dir, plan.recipe
    # asked again, not reused from main's early check: preparing may have taken minutes, in
    # which jobs of the run started or ended
    manifest = _check_resumable(run_dir, mode, args.only_stages) if mode != "new" else None
    if manifest:
        add_missing_stages(manifest, plan)
        selection = select_tasks(manifest, mode, args.only_stages)
        for line in selection.skipped:
            print(f"left alone: {line}", flush=True)
        if selection.empty:
            print(f"nothing to submit: every task of {_shown(run_dir)} is COMPLETED or still live", flush=True)
            return None
    if executor == "slurm":  # refused here, before the run directory is written
        counts = ({n: len(t) for n, t in selection.tasks.items() if t} if manifest else
                  {s.name: len(s.tasks) for s in plan.stages if s.tasks})
        check_submit_limit(recipe, sum(counts.values()), len(selection.replace) if manifest else 0)
        print(f"queueing {queue_count(counts)}", flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    code = None
    if not args.no_snapshot:  # a resume keeps the run's own snapshot unless --new-code
        from jobs.snapshot import run_snapshot
        code = run_snapshot(run_dir, manifest.get("code") if manifest else None, args.new_code)
    if manifest is None:
        save_resolved_recipe(recipe, run_dir / "recipe.yaml",
                             {"launched_with": " ".join([args.target] + list(args.overrides))})
        manifest = new_manifest(plan, executor)
        selection = select_tasks(manifest, "new")
    manifest["executor"] = executor
    manifest.pop("cancelled", None)  # a resumed run is no longer cancelled
    provenance = ({"snapshot": str(code.path), "commit": code.commit, "dirty": code.dirty,
                   "diff": str(code.diff) if code.diff else None} if code else
                  {"snapshot": None, "checkout": str(REPO)})
    manifest["code"] = provenance
    manifest.setdefault("launches", []).append({"at": now_iso(), "by": getpass.getuser(), "mode": mode,
                                                "argv": list(argv), "cwd": os.getcwd(), "code": provenance,
                                                **({"new_code": True} if args.new_code else {})})
    record_task_code(manifest, selection, code.path.name if code else "checkout")
    if executor == "local":  # so that `jobs/status.py --cancel` can stop it
        manifest["launcher"] = launcher_record()
    save_manifest(run_dir, manifest)
    print(f"run directory: {_shown(run_dir)}", flush=True)
    if code:
        print(f"code: {_shown(code.path)} ({code.commit or 'not a git checkout'}"
              f"{', with uncommitted changes' if code.dirty else ''}"
              f"{_code_note(mode, args.new_code)})", flush=True)
    for name, why in plan.skipped.items():
        print(f"stage {name}: skipped ({why})", flush=True)
    for name, why in plan.reasons.items():
        print(f"stage {name}: runs ({why})", flush=True)
    if executor == "local":
        ok = run_local(plan, manifest, selection, code.path if code else None)
        manifest.pop("launcher", None)  # ended: nothing left for --cancel to stop
        save_manifest(run_dir, manifest)
        if manifest.get("cancelled"):
            print(f"cancelled; to finish it: python {_shown(REPO / 'jobs' / 'launch.py')} --resume "
                  f"{shlex.quote(_shown(run_dir))}", flush=True)
        else:
            print(f"{'finished' if ok else 'finished with failures'}: {_shown(run_dir / 'report.md')}")
        return 0 if ok else 1
    try:
        submit_slurm(plan, manifest, selection, code.path if code else None)
    except NothingQueued:
        if mode == "new":
            # this launch made sure nothing of it is queued: no run here (a relaunch needs no
            # --force). Any other failure after a submission keeps the manifest: jobs may be queued.
            (run_dir / MANIFEST).unlink(missing_ok=True)
        raise
    return None


def queue_count(counts: dict[str, int]) -> str:
    """How many jobs a launch queues at once, as MaxSubmitJobs counts them (each array task)."""
    total = sum(counts.values())
    return (f"{total} job{'s' * (total != 1)} at once ({len(counts)} submission{'s' * (len(counts) != 1)}; "
            "array tasks count one each toward the site's MaxSubmitJobs)")


def record_task_code(manifest: dict, selection: Selection, code: str) -> None:
    """Which code each task (re)submitted now runs — the snapshot's name — for the report."""
    for name, todo in selection.tasks.items():
        for i in todo:
            manifest["stages"][name]["tasks"][i]["code"] = code


def _code_note(mode: str, new_code: bool) -> str:
    if mode == "new":
        return ""
    return ("; --new-code: this checkout's code, for the tasks submitted now" if new_code else
            "; the run's own snapshot: --new-code runs this checkout's code instead")


def _follow(args, run_dir: Path) -> int:
    print(f"follow it: python {_shown(REPO / 'jobs' / 'status.py')} {shlex.quote(_shown(run_dir))}", flush=True)
    if args.watch:
        from jobs.monitor import watch
        return watch(run_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
