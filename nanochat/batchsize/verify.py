"""Discovery's answer, checked by the first steps of the run it sized — a wrong answer heals.

Batch-size discovery measures a probe, not the run: fragmentation, another library's workspace
or a different kernel choice can make the real step larger than the probe said (upstream
nanochat users hit an OOM at device batch 32 on 80 GB, its issue #443). Without a check that is
a failed job and a cancelled fan-out hours later in the queue. `train_loop` instead watches the
first `steps` steps of a run whose device batch came from discovery:

- each watched step logs its peak memory next to discovery's prediction for that batch
  (`{"event": "memory", ...}` in progress.jsonl);
- an out-of-memory error in a forward/backward on any rank counts for all (the ranks agree with
  one all-reduce before the gradients are averaged): the gradients are dropped, the device batch
  steps down to the next smaller legal size, the loader restarts at the step's first row with
  the new batch (the rows of a step do not depend on the batch size, so the step trains on the
  same data), and the step is run again;
- on a CPU, which has no out-of-memory of its own, a step whose memory passes discovery's budget
  (the capacity, before headroom: the headroom absorbs measurement noise) counts the same way,
  after the step (which stands). The step is measured as the probe measures it, apart from the
  process around it (data, evaluator, tokenizer, what earlier steps left in the heap): the
  heap is trimmed before each watched step, and the step's peak is its growth above that point
  plus the probe's own fixed memory (model and inputs) at that batch;
- the discovery cache entry is rewritten with the smaller size, marked as corrected, so the
  next run (and a requeue of this one) starts there; run.json records the change.
An OOM in the optimizer step, or at the smallest legal size, still fails: it cannot be undone.
"""
from __future__ import annotations

import gc
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from nanochat.batchsize.search import Discovery, correct_cache, legal_candidates
from nanochat.common import UserError, atomic_write_json, now_iso, print0
from nanochat.config import TRAINING_SECTIONS, Recipe, grad_accum_steps
from nanochat.batchsize.probe import cpu_peak, is_oom, memory_baseline, release_freed_memory
from nanochat.runtime import Runtime

GB = 1e9
WATCHED_STEPS = 3   # the first step allocates optimizer state; the second is the steady state


@dataclass
class BatchCheck:
    batch: int                              # the device batch in use
    accum: int                              # its gradient accumulation steps
    smaller: list[int]                      # legal device batches below it, largest first
    accum_for: Callable[[int], int]         # device batch → accumulation steps
    rebuild: Callable[[int, dict], object]  # (device batch, loader state) → batches
    correct: Callable[[int, int, str], str | None]  # (old, new, why) → what was rewritten
    usable_bytes: float                     # the memory discovery allowed (capacity − headroom)
    capacity_bytes: float                   # discovery's capacity (CPU: the budget)
    predicted_bytes: dict = field(default_factory=dict)  # batch → the probe's peak
    fixed_bytes: dict = field(default_factory=dict)      # batch → the probe's memory before its step
    steps: int = WATCHED_STEPS
    stage: str = "base"
    first_step: int = -1
    corrections: list = field(default_factory=list)
    _pre: tuple[int, int] | None = None

    def watching(self, step: int) -> bool:
        if self.first_step < 0:
            self.first_step = step
        return step < self.first_step + self.steps

    # ---------------------------------------------------------------- memory
    def before_step(self, rt: Runtime) -> None:
        """Start measuring a watched step."""
        if rt.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(rt.device)
        else:
            release_freed_memory()
            self._pre = memory_baseline()

    def _fixed(self, batch: int) -> int:
        known = self.fixed_bytes or {0: 0}
        return known.get(batch, min(known.values()))

    def peak_bytes(self, rt: Runtime) -> int:
        """Comparable with the probe's peak: the caching allocator's reserved bytes on CUDA; on
        CPU the step's growth above its start plus the probe's fixed memory at this batch."""
        if rt.device.type == "cuda":
            return torch.cuda.max_memory_reserved(rt.device)
        return self._fixed(self.batch) + cpu_peak(*self._pre)

    def record(self, rt: Runtime, step: int) -> dict:
        peak = self.peak_bytes(rt)
        predicted = self.predicted_bytes.get(self.batch)
        return {"event": "memory", "step": step, "device_batch_size": self.batch,
                "peak_gb": round(peak / GB, 3),
                "predicted_peak_gb": None if predicted is None else round(predicted / GB, 3),
                "usable_gb": round(self.usable_bytes / GB, 3),
                "capacity_gb": round(self.capacity_bytes / GB, 3)}

    # ---------------------------------------------------------------- agreement and stepping down
    def agree(self, rt: Runtime, flag: bool) -> bool:
        """True when any rank raised the flag (one all-reduce; every rank must call it)."""
        if not rt.dist.is_distributed:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=rt.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return t.item() > 0

    def step_down(self, rt: Runtime, step: int, why: str) -> None:
        old = self.batch
        if not self.smaller:
            raise UserError(f"device batch {old} from batch-size discovery {why} at step {step}, "
                            "and it is the smallest legal size; raise discovery.headroom, shrink "
                            "the model or use a device with more memory")
        self.batch = self.smaller.pop(0)
        self.accum = self.accum_for(self.batch)
        where = self.correct(old, self.batch, f"{why} at training step {step}") if rt.dist.is_master else None
        self.corrections.append({"step": step, "from": old, "to": self.batch, "why": why})
        print0(f"[{self.stage}] step {step}: device batch {old} {why}; continuing with {self.batch} "
               f"(grad accum {self.accum})" + (f"; corrected {where}" if where else ""))
        if rt.device.type == "cuda":
            torch.cuda.empty_cache()


def checked_micro_steps(check: BatchCheck, rt: Runtime, step: int, run_micro: Callable,
                        batches, x, y, step_state: dict, optimizers: list):
    """`run_micro(batches, x, y, accum)` → (loss_sum, x, y, next_state), retried at the next
    smaller device batch while any rank runs out of memory. Returns (its result, batches)."""
    while True:
        oom = False
        try:
            out = run_micro(batches, x, y, check.accum)
        except Exception as e:  # noqa: BLE001 — only an out-of-memory is handled
            if not is_oom(e):
                raise
            oom, out = True, None
        if not check.agree(rt, oom):
            return out, batches
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        out = x = y = None
        gc.collect()
        check.step_down(rt, step, "ran out of memory")
        batches = check.rebuild(check.batch, step_state)
        x, y = next(batches)


def check_after_step(check: BatchCheck, rt: Runtime, step: int, batches, next_state: dict):
    """A CPU step whose peak passed the budget: step down for the next steps (this one stands).
    Returns (record, batches, x, y) — x, y refetched at the smaller batch when it stepped down."""
    rec = check.record(rt, step)
    over = rt.device.type == "cpu" and check.peak_bytes(rt) > check.capacity_bytes
    if not check.agree(rt, over):
        return rec, batches, None, None
    check.step_down(rt, step, f"peaked at {rec['peak_gb']:.3f} GB, over discovery's "
                              f"{check.capacity_bytes / GB:.3f} GB budget")
    batches = check.rebuild(check.batch, next_state)
    x, y = next(batches)
    return rec, batches, x, y


def run_json_updater(path: Path) -> Callable[[int, int], None]:
    """`on_correct` for a training run: run.json then says the device batch the run really uses."""
    def update(batch: int, accum: int) -> None:
        rec = json.loads(path.read_text()) if path.exists() else {}
        rec["batch_corrections"] = rec.get("batch_corrections", []) + [
            {"from": rec.get("device_batch_size"), "to": batch, "date": now_iso()}]
        rec["device_batch_size"], rec["grad_accum"] = batch, accum
        atomic_write_json(path, rec)
    return update


def at_device_batch(check: BatchCheck | None, batch: int, make: Callable[[int], Callable]) -> Callable:
    """An evaluation function that runs at the device batch in use — the corrected one after a
    heal (the evaluation forward at the old size could be what runs out next)."""
    made: dict[int, Callable] = {}

    def evaluate(model) -> dict:
        b = check.batch if check is not None else batch
        if b not in made:
            made[b] = make(b)
        return made[b](model)
    return evaluate


def discovery_summary(found: Discovery | None) -> dict | None:
    """What run.json says of where the device batch came from (None: the recipe fixed it)."""
    if found is None:
        return None
    return {"batch_size": found.batch_size, "from_cache": found.from_cache,
            "cache_path": str(found.cache_path) if found.cache_path else None,
            "probes": found.probes_run, "seconds": round(found.seconds, 3),
            "method": found.record.get("method", "probes")}


def batch_check(recipe: Recipe, stage: str, found: Discovery | None, rt: Runtime, seq_len: int,
                rebuild, run_json: Path | None = None) -> BatchCheck | None:
    """The watch over the first steps of a run sized by `found` (nanochat/batchsize/verify.py); None
    when the recipe fixed the batch. `rebuild(batch, loader_state)` makes the loader at another
    device batch; a correction is also written into `run_json` (by rank 0)."""
    if found is None:
        return None
    world_size = rt.dist.world_size
    on_correct = run_json_updater(run_json) if run_json is not None and rt.dist.is_master else None
    dc = recipe.discovery
    section, name = recipe.training_section(stage), TRAINING_SECTIONS[stage]
    candidates = legal_candidates(section.total_batch_size, seq_len, world_size, dc.candidates,
                                  dc.min_batch_size, dc.max_batch_size)

    probes = found.record.get("probes", [])

    def accum_for(b: int) -> int:
        return grad_accum_steps(section.total_batch_size, b, seq_len, world_size, section=name)

    def correct(old: int, new: int, why: str) -> str | None:
        path = correct_cache(found, new, why)
        if on_correct is not None:
            on_correct(new, accum_for(new))
        return str(path) if path else None

    return BatchCheck(batch=found.batch_size, accum=accum_for(found.batch_size),
                      smaller=sorted((b for b in candidates if b < found.batch_size), reverse=True),
                      accum_for=accum_for, rebuild=rebuild, correct=correct,
                      usable_bytes=found.record["memory"]["usable_bytes"],
                      capacity_bytes=found.record["memory"]["capacity_bytes"],
                      predicted_bytes={p["batch"]: p["peak_bytes"] for p in probes if p.get("peak_bytes")},
                      fixed_bytes={p["batch"]: p["fixed_bytes"] for p in probes if p.get("fixed_bytes")},
                      stage=stage)
