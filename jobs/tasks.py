"""What runs inside each job: one function per stage, reading the run directory's resolved recipe
(never the repository's, which may have changed since the launch).

Used by both executors: submitit pickles `run_task` for SLURM; the local executor runs
`python -m jobs.tasks RUN_DIR STAGE INDEX` in a subprocess.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from jobs.diagnostics import flight_recorder_env, gpu_unused_warning
from jobs.lease import Lease, TaskBusy, acquire as acquire_lease, this_job
from jobs.manifest import read_manifest
from jobs.miniseries import write_meta
from jobs.nodes import node_address
from jobs.plan import discovery_stages
from nanochat.common import NO_DOWNLOAD_ENV, UserError, atomic_write_json, cli_main
from nanochat.config import DEVICE_NAME_ENV
from nanochat.paths import compile_cache_env as node_compile_cache_env
from nanochat.plots import TASK_LABEL_ENV
from nanochat.recipe import load_recipe

GPU_STAGES = ("discover", "base", "sft", "check")  # the stages that warn when given GPUs torch cannot see


def task_recipe(run_dir: Path, stage: str, index: int):
    """The task's recipe: the run's resolved recipe + the task's grid values + the run_dir the
    plan gave it (base task i's directory for base, sft, eval and kv_bench task i)."""
    manifest = read_manifest(run_dir)
    task = manifest["stages"][stage]["tasks"][index]
    overrides = list(task["overrides"]) + [f"run_dir={task['recipe_run_dir']}"]
    recipe = load_recipe(Path(run_dir) / "recipe.yaml", overrides)
    if stage in GPU_STAGES and (warning := gpu_unused_warning(recipe.train.device)):
        print(warning, file=sys.stderr, flush=True)  # among the job's first lines, where status looks
    from nanochat.batchsize.devices import device_name  # torch: this is the job's process
    # upstream's meta.json (jobs/miniseries.py)
    write_meta(Path(task["run_dir"]), recipe, stage, index, Path(run_dir), device_name(recipe))
    os.environ[TASK_LABEL_ENV] = f"{recipe.name} task {index}" + (f" ({', '.join(task['overrides'])})"
                                                                   if task["overrides"] else "")
    if recipe.train.wandb_project and not recipe.train.wandb_name:
        # a grid's runs are told apart by their values (set here, not parsed as an override)
        recipe.train.wandb_name = " ".join([recipe.name] + list(task["overrides"]))
    return recipe, task


def _export_distributed() -> None:
    """Under SLURM with several tasks, set torchrun's variables from SLURM's (MASTER_ADDR is the
    job's first node). CUDA_VISIBLE_DEVICES is left alone: each rank picks cuda:LOCAL_RANK."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "RANK" not in os.environ:
        import submitit
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        # submitit puts the first node's *name* in MASTER_ADDR; a name need not resolve on every
        # node (or may resolve to 127.0.0.1 locally), so use the address SLURM reaches it at.
        # (the batch shell looked it up once for the job: jobs/plan.py MASTER_ADDR_LINE; one rule, jobs/nodes.py)
        os.environ["MASTER_ADDR"] = os.environ.get("NANOCHAT_MASTER_ADDR") or node_address(os.environ["MASTER_ADDR"])


def _requeue_self() -> None:
    """Put this SLURM job back in the queue (rank 0 only); the rerun resumes from the checkpoint.
    A refusal is one line, not a failure: SLURM may be requeueing the job already (a preemption),
    and otherwise the checkpoint is saved for `--resume`."""
    job = this_job()
    if job and int(os.environ.get("RANK", "0")) == 0:
        try:
            res = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
            why = res.stderr.strip() if res.returncode != 0 else ""
        except (OSError, subprocess.TimeoutExpired) as e:
            why = str(e)
        if why:
            print(f"scontrol requeue {job} failed ({why}); the checkpoint is saved: SLURM requeues the "
                  "job itself if it is preempting it, else `python jobs/launch.py --resume RUN_DIR` "
                  "continues", file=sys.stderr, flush=True)


_lease: Lease | None = None  # the running task's lease (run_task takes it; its thread beats it)


def _train_checkpointable(train, recipe, task_dir: Path, stage: str) -> dict:
    """Run a training function (`train(recipe, stop_requested=...)` → dict) so that a stop
    signal ends in a checkpoint. SLURM sends USR2 `cluster.signal_lead_s` before the time limit
    (and on preemption where the site sets preempt_send_user_signal); preemption without it
    (PreemptMode=REQUEUE or CANCEL), `scancel` and a node's shutdown send SIGTERM, then SIGKILL
    after GraceTime/KillWait. submitit's own handlers would requeue at once, mid-step (USR2), or
    ignore the signal (TERM); ours only raise a flag that the loop checks at a step boundary, so
    it saves a checkpoint first and returns {"stopped": True, ...}. Then: after USR2 the job
    requeues itself (the kit counts its requeues, `refuse_another_requeue`); after SIGTERM a
    preempted job requeues itself (SLURM does not requeue one that ended within its GraceTime)
    and a cancelled one exits and stays cancelled."""
    _export_distributed()
    stop = threading.Event()
    got: list[str] = []
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGUSR2, signal.SIGTERM):
            signal.signal(sig, lambda signum, _frame: (got.append(signal.Signals(signum).name), stop.set()))

    result = train(recipe, stop_requested=stop.is_set)
    if result.get("stopped"):
        if "SIGTERM" in got:
            # A job that ends within its preemption's GraceTime is not requeued by SLURM: a
            # preempted one (PreemptTime set, still RUNNING) requeues itself — not counted against
            # cluster.max_requeues; a cancelled one (COMPLETING) stays cancelled.
            requeue = int(os.environ.get("RANK", "0")) == 0 and preempted()
            print(f"stopped at step {result.get('step')} on SIGTERM "
                  f"({'preempted: requeueing' if requeue else 'scancel, or the node shutting down'}) with its "
                  "checkpoint saved; `python jobs/launch.py --resume RUN_DIR` continues from it if nothing "
                  "requeues the job", file=sys.stderr, flush=True)
            if requeue:
                _requeue_self()
        elif int(os.environ.get("RANK", "0")) == 0:  # rank 0 decides; the others just exit
            refuse_another_requeue(recipe, result, count_requeue(task_dir, stage))
            _requeue_self()
        sys.exit(-1)  # no result file: submitit sees the job as requeued, not finished
    return result


def preempted() -> bool:
    """Whether SLURM is preempting this job (one `scontrol show job`): PreemptTime set while it
    still runs. False when it cannot say: nothing requeues then, and --resume continues."""
    job = this_job()
    if not job:
        return False
    try:
        out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
    return fields.get("PreemptTime", "None") not in ("None", "Unknown") and fields.get("JobState") == "RUNNING"


def count_requeue(task_dir: Path, stage: str) -> int:
    """How many times this job already requeued itself for this task, counted by the kit in the
    task's directory (`requeues-<stage>.json`), this one added. SLURM_RESTART_COUNT would count
    preemptions and NODE_FAIL requeues too: a task merely preempted three times is no task that
    cannot finish. A new job (a --resume) starts from 0."""
    path = Path(task_dir) / f"requeues-{stage}.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        record = {}
    done = record.get("count", 0) if record.get("job") == this_job() else 0
    atomic_write_json(path, {"job": this_job(), "count": done + 1})
    return done


def refuse_another_requeue(recipe, result: dict, done: int) -> None:
    """A task stopped on SLURM's warning signal requeues itself at most cluster.max_requeues
    times (`done`: the requeues so far, count_requeue): a task that can never finish — a time
    limit shorter than what the steps between checkpoints need — fails with one line instead of
    cycling through the queue forever."""
    cap = recipe.cluster.max_requeues
    if done >= cap:
        raise UserError(f"stopped at step {result.get('step')} by SLURM's warning signal after "
                        f"{done} requeue{'s' if done != 1 else ''} (cluster.max_requeues={cap}); "
                        "its checkpoint is saved: raise cluster.time_min or cluster.max_requeues and "
                        "continue with `python jobs/launch.py --resume RUN_DIR`")


def run_base(run_dir: Path, index: int) -> dict:
    from nanochat.train import train_base
    recipe, task = task_recipe(run_dir, "base", index)
    return _train_checkpointable(train_base, recipe, Path(task["run_dir"]), "base")


def run_sft(run_dir: Path, index: int) -> dict:
    """Fine-tune base task i's checkpoint (or sft.base_checkpoint); writes <run_dir>/sft."""
    from nanochat.sft import train_sft
    recipe, task = task_recipe(run_dir, "sft", index)
    return _train_checkpointable(train_sft, recipe, Path(task["run_dir"]), "sft")


def run_eval(run_dir: Path, index: int) -> dict:
    """Evaluate the task's directory (sft task i's output, or base task i's); writes eval.json there."""
    from nanochat.eval import evaluate_checkpoint
    recipe, task = task_recipe(run_dir, "eval", index)
    return evaluate_checkpoint(task["run_dir"], recipe)


def run_discover(run_dir: Path, index: int) -> dict:
    """Device batch sizes for every stage that asks for `auto`, into the cache and discovery.json
    ({stage: {batch_size, from_cache, cache_path}}) — for one memory key of the grid: the task's
    overrides are those of the first grid combination with that key (jobs/plan.py). On a first
    SLURM run it is also the job that trains the tokenizer (the login node leaves it)."""
    from nanochat.batchsize.search import discover_for_recipe
    from nanochat.data.shards import prepare_shards, prepare_tokenizer
    from jobs.device_records import record_device
    recipe, task = task_recipe(run_dir, "discover", index)
    # Data and tokenizer first (training needs them anyway): the cache key then holds the real
    # vocabulary, exactly as the training job will compute it.
    train_paths, _ = prepare_shards(recipe)
    tokenizer = prepare_tokenizer(recipe, train_paths)
    out = {}
    for stage in discovery_stages(recipe):
        result = discover_for_recipe(recipe, stage=stage, world_size=recipe.cluster.world_size,
                                     vocab_size=tokenizer.vocab_size)
        out[stage] = {"batch_size": result.batch_size, "from_cache": result.from_cache,
                      "cache_path": str(result.cache_path), "probes": result.probes_run,
                      "seconds": round(result.seconds, 2)}
    # what this partition gave: a relaunch from a login node finds the answer without the GPU
    record_device(recipe)
    atomic_write_json(Path(task["run_dir"]) / "discovery.json", out)
    return out


def run_check(run_dir: Path, index: int = 0) -> dict:
    """The cluster check on this task's allocation (nanochat/check.py) into check.json; the
    step compiled as the recipe's training compiles it. Raises naming the failed ranks' hosts."""
    from nanochat.check import parse_options, run_check as check
    recipe, task = task_recipe(run_dir, "check", index)
    _export_distributed()
    opts = parse_options([str(Path(run_dir) / "recipe.yaml")] + ([] if recipe.train.compile else ["--no-compile"]))
    report = check(recipe, opts, Path(task["run_dir"]) / "check.json")
    return {"check": str(Path(task["run_dir"]) / "check.json"), "hosts": sorted({r["host"] for r in report["ranks"]}),
            "efficiency": report["prediction"]["efficiency"]}


def run_kv_bench(run_dir: Path, index: int, stage: str = "kv_bench") -> dict:
    from nanochat.kv_bench import sweep_for_recipe
    recipe, task = task_recipe(run_dir, stage, index)
    return sweep_for_recipe(recipe, out_dir=Path(task["run_dir"]))


def run_report(run_dir: Path, index: int = 0) -> dict:
    from jobs.report import write_report
    return {"report": str(write_report(Path(run_dir)))}


RUNNERS = {"check": run_check, "discover": run_discover, "base": run_base, "sft": run_sft, "eval": run_eval,
           "kv_bench": run_kv_bench, "report": run_report,
           "sweep": lambda run_dir, index: run_kv_bench(run_dir, index, "sweep")}  # runs launched before the rename


def compile_cache_env(env=None) -> dict[str, str]:
    """A launcher task's compile caches (nanochat/paths.py: the one rule, which slurm/env.sh asks
    for too), and OMP_NUM_THREADS = the task's CPUs (a launcher task is one rank) when unset."""
    env = os.environ if env is None else env
    out = node_compile_cache_env(env)
    if "OMP_NUM_THREADS" not in env and env.get("SLURM_CPUS_PER_TASK"):
        out["OMP_NUM_THREADS"] = env["SLURM_CPUS_PER_TASK"]
    return out


def task_run_dir(run_dir: Path, stage: str, index: int) -> Path:
    """The directory a task writes (its manifest entry's run_dir; the run directory if none)."""
    task = read_manifest(run_dir)["stages"][stage]["tasks"][index]
    return Path(task.get("run_dir") or run_dir)


def run_task(run_dir: str, stage: str, index: int) -> dict:
    """The one callable every job runs (picklable, for submitit)."""
    # A job reports the device it has, never the launching process's (see nanochat.batchsize.devices).
    os.environ.pop(DEVICE_NAME_ENV, None)
    # ... and never downloads: what it needs was prepared on the login node (nanochat.common)
    os.environ.update({NO_DOWNLOAD_ENV: "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    # ... and compiles into this node's persistent cache (a requeue finds its kernels)
    os.environ.update(compile_cache_env())
    # ... and a collective that times out leaves each rank's last collectives in the task's directory
    task_dir = task_run_dir(Path(run_dir), stage, index)
    os.environ.update(flight_recorder_env(task_dir, stage))
    # ... and never runs a task another live job is running (jobs/lease.py)
    global _lease
    try:
        _lease = acquire_lease(task_dir, stage, index)
    except TaskBusy as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None  # one line, no traceback, no result: this job did nothing
    _lease.start_beating()
    try:
        return RUNNERS[stage](Path(run_dir), index)
    finally:
        _lease.release()
        _lease = None


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] not in RUNNERS:
        raise UserError(f"usage: python -m jobs.tasks RUN_DIR {{{'|'.join(RUNNERS)}}} INDEX")
    print(json.dumps(run_task(argv[0], argv[1], int(argv[2])), default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
