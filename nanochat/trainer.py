"""The one training loop, shared by base training and SFT, and the runtime it runs in.

nanochat copies its loop, schedule and logging between scripts and the copies drift; here each
stage builds a model, optimizers, a batch iterator and an evaluation function, and calls
`train_loop`. The loop owns: gradient accumulation, the LR/momentum schedules, gradient
averaging across ranks (overlapped with backward, after a warm-up: nanochat/grad_sync.py), logging (JSON lines + a progress bar on a terminal), periodic evaluation,
atomic checkpoints and exact resume, torch.profiler traces, and stopping on request (preemption).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from nanochat import attention
from nanochat import checkpoint as ckpt
from nanochat.batchsize.verify import BatchCheck, check_after_step, checked_micro_steps
from nanochat.common import UserError, atomic_write_json, code_provenance, git_commit, now_iso, print0
from nanochat.config import OptimArgs, Recipe, TrainArgs
from nanochat.logfmt import STAGE_LOGS, StageLog, argv_script, sig
from nanochat.grad_sync import clear_to_none, finish_step_sync, micro_step_context, warm_up
from nanochat.optim import load_optimizer_state_dicts, lr_multiplier, muon_momentum, muon_weight_decay_at, optimizer_step
from nanochat.plots import plot_progress, plot_title, read_jsonl
from nanochat.recipe import recipe_to_dict, save_resolved_recipe
from nanochat.runtime import Runtime, compile_cache_counts, compile_cache_state, mfu_percent, peak_flops
from nanochat.timing import SETUP_PHASES, process_age_s, process_start
from nanochat.tracking import start_tracking


# --------------------------------------------------------------------------------------------
# Progress log: JSON lines in the run directory (rank 0).

class ProgressLog(StageLog):
    """progress.jsonl and, from the same records, the stage's log in upstream's grammar
    (base_train.log, sft.log: nanochat/logfmt.py) — one writer, so the two never disagree."""

    def __init__(self, path: Path, enabled: bool, stage: str = "base", echo=None):
        super().__init__(Path(path).parent / STAGE_LOGS.get(stage, f"{stage}.log"), path, enabled, echo)


# --------------------------------------------------------------------------------------------
# The loop.

@dataclass
class LoopSpec:
    num_steps: int
    grad_accum: int
    tokens_per_step: int            # all ranks, all micro-steps
    flops_per_token: float
    train: TrainArgs                # schedule, logging, eval/save cadence, profiling
    optim: OptimArgs
    stage: str = "base"
    meta: dict = field(default_factory=dict)  # stored in every checkpoint (recipe, model config)
    batch_check: BatchCheck | None = None  # a discovered device batch, watched (nanochat/batchsize/verify.py)
    core: Callable[[torch.nn.Module], float | None] | None = None  # CORE every train.core_every steps (core.make_core_evaluator)
    stop_lead_s: float | None = None  # how long before a hard stop the stop request comes (cluster.signal_lead_s): checkpoint times are checked against it
    eval_s: float = 0.0               # the last scheduled evaluation's seconds (set by the loop): a stop request waits for it
    summary: dict = field(default_factory=dict)  # identity fields of the final `summary` record (model_tag, num_params, ...)


def _want_bar(args: TrainArgs, rt: Runtime) -> bool:
    if not rt.dist.is_master or args.progress_bar is False:
        return False
    return args.progress_bar is True or sys.stderr.isatty()


# curves.png is redrawn after an evaluation at most once a minute, and after the last one: a draw
# (~1 s: pyplot's import, savefig) never recurs every few seconds of a short run.
PLOT_EVERY_S = 60.0


class StepLogger:
    """What the loop reports, on rank 0: progress.jsonl (the record status, the report and the
    launcher's live view read), the terminal (a tqdm bar, else a line per logged step),
    curves.png after evaluations (PLOT_EVERY_S), and the experiment tracker (wandb) when the recipe names a
    project. Tokens/s and MFU are measured over the training time between logged steps."""

    def __init__(self, rt: Runtime, run_dir: Path, spec: "LoopSpec", start_step: int):
        self.rt, self.spec, self.run_dir = rt, spec, run_dir
        self.log = ProgressLog(run_dir / "progress.jsonl", rt.dist.is_master, spec.stage, echo=print0)
        kept = [r for r in self.log.truncate_from(start_step) if r.get("event") == "train"]
        self.log.invocation(argv_script(), sys.argv[1:], spec.meta.get("recipe", {}))
        self.peak, self.peak_src = peak_flops(rt.device, rt.dtype)
        self.bar = None
        if _want_bar(spec.train, rt):
            from tqdm import tqdm
            self.bar = tqdm(total=spec.num_steps, initial=start_step, desc=spec.stage, unit="step",
                            dynamic_ncols=True)
        self.say = self.bar.write if self.bar else print0
        self.log.echo = self.say
        self.tracker = (start_tracking(spec.train, run_dir, spec.stage, spec.meta)
                        if rt.dist.is_master else None)
        self.plotted_at, self.unplotted = time.monotonic(), False
        self.train_t0 = time.perf_counter()
        self.window_t0, self.window_steps, self.window_tok_s = self.train_t0, 0, []
        # training time alone — no evaluation, no checkpointing — as the speedrun leaderboard
        # counts it; a resumed run continues the count of the records it kept
        self.train_s = float(kept[-1].get("train_s", 0.0)) if kept else 0.0
        # where this process's time went before the loop: imports, data, tokenizer, model, optimizer
        self.setup_s = process_age_s()
        self.setup_phases = {k: round(v, 1) for k, v in SETUP_PHASES.items() if v <= self.setup_s}
        SETUP_PHASES.clear()  # this run's: a later loop in the process (a test's) times its own
        self.warmup_s = 0.0  # the warm-up forward/backward and the first step (the compile, when compiled)
        self.compile_cache: str | None = None  # hit / miss / partial, when compiled
        self.cache_counts0 = compile_cache_counts()

    def timing(self, step: int) -> None:
        """After the first step: where the time to it went, so that a running task's status
        can say it (the summary repeats it at the end)."""
        self.compile_cache = compile_cache_state(self.cache_counts0, compile_cache_counts())
        rec = {"event": "timing", "step": step, "setup_s": round(self.setup_s, 1), **self.setup_phases,
               "warmup_s": round(self.warmup_s, 3), "compile_cache": self.compile_cache,
               "process_start": round(process_start(), 1)}  # status: the job's set-up before it
        self.write({k: v for k, v in rec.items() if v is not None})

    def write(self, record: dict) -> None:
        self.log.write(record)
        if self.tracker is not None:
            self.tracker.log(record)

    def evaluation(self, step: int, metrics: dict, seconds: float) -> None:
        self.write({"event": "eval", "step": step, **metrics, "eval_s": round(seconds, 3),
                    "train_s": round(self.train_s, 3),
                    "eflops": sig(step * self.spec.tokens_per_step * self.spec.flops_per_token / 1e18)})
        shown = (f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
        self.say(f"[{self.spec.stage}] step {step}: " + ", ".join(shown))
        self.unplotted = True
        if step >= self.spec.num_steps or time.monotonic() - self.plotted_at >= PLOT_EVERY_S:
            self.plot()
        self.window_t0, self.window_steps = time.perf_counter(), 0  # evaluation isn't training time

    def step_done(self) -> None:
        self.window_steps += 1

    def train_record(self, step: int, loss: float, lr_mult: float) -> dict:
        """The logged step's record: loss, LR multiplier, tokens/s, MFU, ETA, peak memory."""
        spec, now = self.spec, time.perf_counter()
        rec = {"event": "train", "step": step, "loss": loss, "lr_mult": lr_mult}
        if self.window_steps > 0:
            tok_s = spec.tokens_per_step * self.window_steps / (now - self.window_t0)
            self.window_tok_s.append(tok_s)
            rate = sum(self.window_tok_s[-10:]) / len(self.window_tok_s[-10:])
            rec.update(tok_per_s=round(tok_s, 1),
                       mfu=round(mfu_percent(spec.flops_per_token, tok_s, self.peak, self.rt.dist.world_size), 3),
                       eta_s=round((spec.num_steps - step - 1) * spec.tokens_per_step / rate, 1))
        rec["elapsed_s"] = round(now - self.train_t0, 2)
        rec["train_s"] = round(self.train_s, 3)
        if self.rt.device.type == "cuda":
            rec["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(self.rt.device) / 2**30, 3)
            # what discovery's probes measure and fill to its headroom: the cache's reserve
            rec["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved(self.rt.device) / 2**30, 3)
        self.write(rec)
        if self.bar is not None:
            self.bar.set_postfix({k: rec[k] for k in ("loss", "tok_per_s", "mfu") if k in rec})
        else:
            print0(f"[{spec.stage}] step {step + 1}/{spec.num_steps} loss {loss:.4f}"
                   + (f" tok/s {rec['tok_per_s']:,.0f} mfu {rec['mfu']:.1f}% eta {rec['eta_s']:.0f}s"
                      if "tok_per_s" in rec else ""))
        self.window_t0, self.window_steps = now, 0
        return rec

    def summary(self) -> dict:
        """The stage's final record, upstream's `summary` fields (scripts/base_train.py, chat_sft.py):
        identity (spec.summary), horizon, compute, training time, peak memory, final and best
        validation metric, CORE when it ran."""
        spec = self.spec
        mc = spec.meta.get("model_config") or {}
        tokens = spec.num_steps * spec.tokens_per_step
        rec = {"event": "summary", "step": spec.num_steps, "model_tag": f"d{mc.get('n_layer')}",
               "depth": mc.get("n_layer"),
               "model_dim": mc.get("n_embd"), **spec.summary, "num_iterations": spec.num_steps,
               "total_batch_size": spec.tokens_per_step, "tokens_trained": tokens,
               "eflops": sig(spec.flops_per_token * tokens / 1e18)}
        if spec.summary.get("num_scaling_params"):
            rec["param_data_ratio"] = round(tokens / spec.summary["num_scaling_params"], 2)
        rec["train_time_sec"] = round(self.train_s, 1)
        # the time breakdown of this process (a resumed run: of its last attempt)
        records = read_jsonl(self.log.json_path)
        rec.update(setup_s=round(self.setup_s, 1), **self.setup_phases, warmup_s=round(self.warmup_s, 3),
                   compile_cache=self.compile_cache,
                   eval_total_s=round(sum(r.get("eval_s", 0) for r in records if r.get("event") == "eval"), 1),
                   checkpoint_total_s=round(sum(r.get("checkpoint_s", 0) for r in records
                                                if r.get("event") == "checkpoint"), 1))
        rec["peak_vram_mib"] = (round(torch.cuda.max_memory_allocated(self.rt.device) / 2**20)
                                if self.rt.device.type == "cuda" else 0)
        evals = [r for r in records if r.get("event") == "eval"]
        for key in ("val_bpb", "val_loss"):
            vals = [r[key] for r in evals if isinstance(r.get(key), (int, float))]
            if vals:
                rec[key], rec[f"min_{key}"] = round(vals[-1], 6), round(min(vals), 6)
        cores = [r["core"] for r in evals if isinstance(r.get("core"), (int, float))]
        if cores:
            rec["core"] = round(cores[-1], 6)
        self.write({k: v for k, v in rec.items() if v is not None})
        return rec

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def plot(self) -> None:
        """curves.png from progress.jsonl (rank 0)."""
        if self.rt.dist.is_master:
            plot_progress(self.log.json_path, self.run_dir / "curves.png", plot_title(self.spec.stage, self.spec.meta, self.run_dir))
        self.plotted_at, self.unplotted = time.monotonic(), False

    def close(self, ok: bool) -> None:
        if ok and self.unplotted:  # a run stopped early: its last evaluations too
            self.plot()
        if self.bar is not None:
            self.bar.close()
        if self.tracker is not None:
            self.tracker.finish(ok)


def apply_schedule(optimizers: list, step: int, spec: "LoopSpec") -> float:
    """Set every group's LR (× the schedule's multiplier), Muon's momentum and Muon's weight
    decay (cosine to 0) for `step`."""
    lrm = lr_multiplier(step, spec.num_steps, spec.train)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group.get("name") == "matrix":
                group["momentum"] = muon_momentum(step, spec.optim, spec.num_steps,
                                                  spec.train.warmdown_ratio)
                group["weight_decay"] = muon_weight_decay_at(step, spec.num_steps, group["initial_weight_decay"])
    return lrm


def _evaluate(model: torch.nn.Module, evaluate: Callable, rt: Runtime) -> tuple[dict, float]:
    model.eval()
    t0 = time.perf_counter()
    with torch.no_grad(), rt.autocast():
        metrics = evaluate(model)
    model.train()
    return metrics, time.perf_counter() - t0


def _due(step: int, every: int, final: bool) -> bool:
    return final or (every > 0 and step % every == 0)


def _scheduled_evaluations(model: torch.nn.Module, evaluate: Callable, spec: "LoopSpec", step: int,
                           final: bool, rt: Runtime, logger: StepLogger) -> dict:
    """The evaluations due at `step` — validation every train.eval_every steps, CORE every
    train.core_every (both at the end) — as one progress record; {} when none is due. Their
    time is the record's eval_s and never counts as training time."""
    metrics, seconds = {}, 0.0
    spec.eval_s = 0.0
    if _due(step, spec.train.eval_every, final):
        metrics, seconds = _evaluate(model, evaluate, rt)
    if spec.core is not None and _due(step, spec.train.core_every, final):
        core, s = _evaluate(model, lambda m: {"core": spec.core(m)}, rt)
        metrics, seconds = {**metrics, **core}, seconds + s
    if metrics:
        logger.evaluation(step, metrics, seconds)
    spec.eval_s = seconds
    return metrics


def _micro_steps(step_model: torch.nn.Module, batches, x, y, accum: int, rt: Runtime,
                 overlap: bool = True):
    """Forward and backward over one step's micro-batches, fetching the next batch while the
    device works; with `overlap`, the last backward launches the gradient all-reduce
    (nanochat/grad_sync.py). Returns (loss sum, the next x, y, the loader state before that batch)."""
    loss_sum = torch.zeros((), device=rt.device)
    for i in range(accum):
        with micro_step_context(step_model, communicate=overlap and i == accum - 1):
            with rt.autocast():
                loss = step_model(x, y)
            (loss / accum).backward()
        loss_sum += loss.detach()
        next_state = batches.state_dict()
        x, y = next(batches)
    return loss_sum, x, y, next_state


def _mean_loss(loss_sum: torch.Tensor, grad_accum: int, rt: Runtime) -> float:
    """The step's loss averaged over micro-steps and ranks: the one host sync of a logged step."""
    loss_avg = loss_sum / grad_accum
    if rt.dist.is_distributed:
        torch.distributed.all_reduce(loss_avg)
        loss_avg /= rt.dist.world_size
    return loss_avg.item()


def train_loop(rt: Runtime, run_dir: Path, model: torch.nn.Module, step_model: torch.nn.Module,
               optimizers: list, batches, evaluate: Callable[[torch.nn.Module], dict],
               spec: LoopSpec, start_step: int = 0,
               stop_requested: Callable[[], bool] = lambda: False) -> dict:
    """Train from `start_step` to `spec.num_steps`. `batches` yields (inputs, targets) and has
    state_dict(); `evaluate(model)` returns metrics (e.g. {"val_bpb": ...}). Returns the final
    record. `model` is the plain module (saved, evaluated), `step_model` maybe compiled."""
    args, run_dir = spec.train, Path(run_dir)
    logger = StepLogger(rt, run_dir, spec, start_step)
    print0(f"[{spec.stage}] steps {start_step}→{spec.num_steps}, {spec.tokens_per_step:,} tokens/step, "
           f"grad accum {spec.grad_accum}, {spec.flops_per_token:.3e} FLOPs/token, "
           f"peak {logger.peak:.3e} FLOP/s ({logger.peak_src}, {rt.dtype})")
    params = list(model.parameters())

    def save(step: int, extra: dict):
        meta = {**spec.meta, "stage": spec.stage, "loader": _gather_loader_states(rt, next_state),
                "num_steps": spec.num_steps, **extra}
        t0 = time.perf_counter()
        path = ckpt.save_checkpoint(run_dir, step, model, optimizers, meta, rt.dist.rank,
                                    rt.dist.world_size, keep=args.keep_checkpoints)
        seconds = time.perf_counter() - t0
        logger.say(f"[{spec.stage}] step {step}: checkpoint {path} ({seconds:.1f} s)")
        logger.write({"event": "checkpoint", "step": step, "checkpoint_s": round(seconds, 3)})
        warning = lead_warning(spec, seconds, (logger.train_s - train_s0) / max(1, step - start_step),
                               longest_eval_s)
        if warning:
            logger.say(warning)

    next_state = batches.state_dict()  # loader state of the batch about to be fetched
    x, y = next(batches)
    attention.RAN.clear()  # what this run's first step runs (record_attention_ran)
    t_warm = time.perf_counter()
    warm_up(step_model, x, y, rt)  # compile on every rank before the first collective
    logger.warmup_s = time.perf_counter() - t_warm
    accum, check = spec.grad_accum, spec.batch_check
    agreement = StopAgreement(rt, stop_requested)
    longest_eval_s = 0.0
    # train.save_every_min: rank 0's clock asks for a checkpoint, and the ranks agree on the step
    # through the stop agreement's all-reduce (their clocks differ)
    period_s = args.save_every_min * 60 if args.save_every_min > 0 else None
    timer = time.monotonic()
    train_s0 = logger.train_s  # this process's steps only (a resumed run's count starts higher)
    delay = step_delay()
    profiler = None
    last: dict = {}
    ok = False
    try:
        for step in range(start_step, spec.num_steps + 1):
            final = step == spec.num_steps
            metrics = _scheduled_evaluations(model, evaluate, spec, step, final, rt, logger)
            longest_eval_s = max(longest_eval_s, spec.eval_s)  # a stop request arriving before one waits for it
            last.update(metrics)
            due = period_s is not None and rt.dist.is_master and time.monotonic() - timer >= period_s
            if due:
                timer = time.monotonic()
            stop, timed = (False, False) if final else agreement.poll(due)
            if stop or (step > start_step and (final or timed or (args.save_every > 0 and step % args.save_every == 0))):
                save(step, metrics)
            if stop:
                logger.say(f"[{spec.stage}] stopped at step {step} on request; a rerun resumes from here")
                last["stopped"] = True
            if final or stop:
                break

            if args.profile_steps and step == args.profile_steps[0]:
                profiler = _start_profiler(rt)
            lrm = apply_schedule(optimizers, step, spec)
            t_step = time.perf_counter()
            watched = check is not None and check.watching(step)
            if watched:  # no overlap: the ranks agree on an out-of-memory before any all-reduce
                check.before_step(rt)
                (loss_sum, x, y, next_state), batches = checked_micro_steps(
                    check, rt, step, lambda b, x_, y_, a: _micro_steps(step_model, b, x_, y_, a, rt,
                                                                       overlap=False),
                    batches, x, y, next_state, optimizers)
                accum = check.accum
            else:
                loss_sum, x, y, next_state = _micro_steps(step_model, batches, x, y, accum, rt)
            finish_step_sync(step_model, params, rt, overlapped=not watched)
            optimizer_step(params, optimizers, args.grad_clip,
                           set_to_none=clear_to_none(step_model))
            if watched:
                rec, batches, nx, ny = check_after_step(check, rt, step, batches, next_state)
                logger.write(rec)
                if nx is not None:
                    x, y, accum = nx, ny, check.accum
            if profiler is not None:
                profiler.step()
                if step + 1 == args.profile_steps[1]:
                    _stop_profiler(profiler, run_dir, rt, args.profile_steps)
                    profiler = None

            if delay:
                time.sleep(delay)
            logger.train_s += time.perf_counter() - t_step
            if step == start_step:  # the first step: compile, allocator warm-up (also in train_s)
                logger.warmup_s += time.perf_counter() - t_step
            logger.step_done()
            if step == start_step:
                logger.timing(step)
                if rt.dist.is_master:
                    record_attention_ran(run_dir / "run.json")
            if (step + 1) % args.train_log_every == 0 or step + 1 == spec.num_steps:
                last.update(logger.train_record(step, _mean_loss(loss_sum, accum, rt), lrm))
            logger.advance()
        if not last.get("stopped"):
            logger.summary()
        ok = True
    finally:
        logger.close(ok)
    if profiler is not None:
        _stop_profiler(profiler, run_dir, rt, args.profile_steps)
    last["step"] = step
    if check is not None and check.corrections:
        last["batch_corrections"] = check.corrections
        last["device_batch_size"] = check.batch
    return last


STEP_DELAY_ENV = "NANOCHAT_STEP_DELAY_S"


def step_delay(env=None) -> float:
    """Seconds every rank sleeps after each step, from NANOCHAT_STEP_DELAY_S (0 when unset): a
    slow run on demand, to try a cluster's time limits, preemption and requeues with a small
    model (and to test them) without burning the CPUs."""
    raw = (os.environ if env is None else env).get(STEP_DELAY_ENV, "").strip()
    if not raw:
        return 0.0
    try:
        seconds = float(raw)
        assert seconds >= 0
    except (ValueError, AssertionError):
        raise UserError(f"{STEP_DELAY_ENV}={raw!r}: expected seconds ≥ 0, e.g. 0.5; unset it "
                        "to train at full speed") from None
    return seconds


def record_attention_ran(run_json: Path) -> None:
    """run.json's "attention_ran": the kernel each layer kind ("S" windows, "L" full context)
    ran with in the first step — what ran (attention.RAN), beside "attention", what was chosen."""
    if run_json.exists() and attention.RAN:
        atomic_write_json(run_json, {**json.loads(run_json.read_text()),
                                     "attention_ran": dict(attention.RAN)})


class StopAgreement:
    """Whether every rank stops at this step boundary. A stop request (SLURM's warning signal:
    preemption, the time limit) reaches the ranks at slightly different times, so they agree
    through a two-float all-reduce (MAX; the second float: a checkpoint is due) at every step boundary — not only at logged steps,
    which with train_log_every = 50 could wait past the time limit's lead.

    One step of lag keeps the all-reduce off the critical path: the flag reduced at boundary s
    is read at boundary s + 1, after step s's work has been queued. On CUDA the flag is a
    preallocated device tensor filled in place (no blocking host-to-device copy), copied after
    the all-reduce into pinned host memory without blocking, and an event recorded behind that
    copy; boundary s + 1 waits on that event — on the reduction and the work queued before it,
    never on step s queued since — and reads the host copy. So it never waits for the device to
    drain (tests/test_cuda.py runs it under `torch.cuda.set_sync_debug_mode("error")`). A
    request therefore takes effect one or two steps after it arrives, on every rank at the
    same step."""

    def __init__(self, rt: Runtime, stop_requested: Callable[[], bool]):
        self.rt, self.requested = rt, stop_requested
        self.pending = False  # a flag was reduced at the previous boundary
        if rt.dist.is_distributed:
            cuda = rt.device.type == "cuda"
            self.flag = torch.zeros(2, device=rt.device)  # [stop requested, checkpoint due]
            self.host = torch.zeros(2, pin_memory=True) if cuda else self.flag
            self.event = torch.cuda.Event() if cuda else None

    def stop_now(self) -> bool:
        return self.poll()[0]

    def poll(self, save_due: bool = False) -> tuple[bool, bool]:
        """(stop, save): whether every rank stops, and whether every rank checkpoints, at this
        boundary. `save_due`: this rank asks for a checkpoint (train.save_every_min, rank 0's
        clock); it rides the same all-reduce and takes effect with the same lag."""
        if not self.rt.dist.is_distributed:
            return bool(self.requested()), save_due
        stop = save = False
        if self.pending:
            if self.event is not None:
                self.event.synchronize()
            stop, save = (v > 0 for v in self.host.tolist())  # a host tensor: no device sync
        if not stop:
            self.flag[0].fill_(1.0 if self.requested() else 0.0)  # in place: no blocking copy
            self.flag[1].fill_(1.0 if save_due else 0.0)
            torch.distributed.all_reduce(self.flag, op=torch.distributed.ReduceOp.MAX)
            if self.event is not None:
                self.host.copy_(self.flag, non_blocking=True)
                self.event.record()
            self.pending = True
        return stop, save


def lead_warning(spec: LoopSpec, checkpoint_s: float, step_s: float, eval_s: float = 0.0) -> str | None:
    """One line when a checkpoint plus two steps (the agreement's lag) plus the longest
    evaluation (one due at the stop's boundary runs before the save) would not fit in half the
    stop request's lead: at the time limit the save would be killed half-written."""
    if spec.stop_lead_s is None:
        return None
    needed = checkpoint_s + 2 * step_s + eval_s
    if needed <= spec.stop_lead_s / 2:
        return None
    evaluation = f", an evaluation {eval_s:.0f} s" if eval_s >= 1 else ""
    return (f"[{spec.stage}] warning: this checkpoint took {checkpoint_s:.0f} s and a step "
            f"{step_s:.1f} s{evaluation}, but the stop signal comes only cluster.signal_lead_s="
            f"{spec.stop_lead_s:g} s before the time limit; set cluster.signal_lead_s to at "
            f"least {2 * needed:.0f} so that the checkpoint at a stop completes")


def _gather_loader_states(rt: Runtime, state: dict) -> list[dict]:
    """Every rank's loader position (all ranks need theirs on resume)."""
    if not rt.dist.is_distributed:
        return [state]
    states: list = [None] * rt.dist.world_size
    torch.distributed.all_gather_object(states, state)
    return states


def _start_profiler(rt: Runtime):
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if rt.device.type == "cuda" else [])
    prof = profile(activities=acts, record_shapes=True)
    prof.__enter__()
    return prof


def _stop_profiler(prof, run_dir: Path, rt: Runtime, steps: list[int]) -> None:
    prof.__exit__(None, None, None)
    out = Path(run_dir) / "profile" / f"trace_rank{rt.dist.rank}_steps{steps[0]}-{steps[1]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(out))
    print0(f"profiler trace: {out} (open in https://ui.perfetto.dev or chrome://tracing)")


def restore_training_state(ckpt_path: Path, rt: Runtime, model: torch.nn.Module,
                           optimizers: list, meta_check: dict) -> tuple[int, dict]:
    """Load model, optimizer and RNG state of this rank; returns (step, this rank's loader state).
    `meta_check` holds values (e.g. the model config) that must match the checkpoint's."""
    meta = ckpt.read_meta(ckpt_path)
    ckpt.check_rules(ckpt_path, meta)
    for k, v in meta_check.items():
        saved = ckpt.saved_model_config(ckpt_path, meta.get(k), v) if k == "model_config" else meta.get(k)
        if saved != v:
            raise UserError(f"checkpoint {ckpt_path} has a different {k} than this recipe "
                            f"({meta.get(k)} vs {v}); use another run_dir or delete the checkpoints")
    if meta.get("world_size") != rt.dist.world_size:
        raise UserError(f"checkpoint {ckpt_path} was written by {meta.get('world_size')} ranks, this "
                        f"run has {rt.dist.world_size}; resume with the same number of GPUs")
    model.load_state_dict(ckpt.load_model_state(ckpt_path))
    opt_states, rng = ckpt.load_training_state(ckpt_path, rt.dist.rank)
    changed = load_optimizer_state_dicts(optimizers, opt_states)
    if changed:
        print0(f"resuming with this recipe's optimizer settings, not the checkpoint's: "
               f"{'; '.join(changed[:6])}" + (f"; and {len(changed) - 6} more" if len(changed) > 6 else ""))
    ckpt.set_rng_state(rng)
    return int(meta["step"]), meta["loader"][rt.dist.rank]


def start_run(rt: Runtime, out: Path, latest: Path | None, model: torch.nn.Module, optimizers: list,
              recipe: Recipe, config, tokenizer, meta: dict, resolved: dict, run_json: dict
              ) -> tuple[dict, int, dict | None]:
    """Before base training's and SFT's loop: resume from `latest` (if any), and on rank 0 write
    recipe.yaml (`resolved` in its header), the tokenizer and run.json (`resolved`, `run_json` and
    what every stage records). Returns (checkpoint meta, start step, this rank's loader state or None)."""
    meta = {"model_config": dataclasses.asdict(config), "recipe": recipe_to_dict(recipe),
            "git_commit": git_commit(), "code": code_provenance(), **meta}  # code: commit, dirty, snapshot
    start_step, loader_state = 0, None
    if latest is not None:
        start_step, loader_state = restore_training_state(
            latest, rt, model, optimizers, {"model_config": meta["model_config"]})
        print0(f"resuming from {latest} (step {start_step})")
    if rt.dist.is_master:
        out.mkdir(parents=True, exist_ok=True)
        save_resolved_recipe(recipe, out / "recipe.yaml", resolved)
        if not (out / "tokenizer" / "tokenizer.json").exists():
            tokenizer.save(out / "tokenizer")
        atomic_write_json(out / "run.json", {
            "started": now_iso(), "git_commit": meta["git_commit"], "code": meta["code"],
            "device": str(rt.device), "dtype": str(rt.dtype), "torch": torch.__version__,
            **resolved, **run_json})
    return meta, start_step, loader_state
