"""Automatic device batch size: the search and its cache (the command, `python -m
nanochat.batchsize RECIPE`, is nanochat/batchsize/__main__.py).

`train.device_batch_size: auto` (or `sft.device_batch_size: auto`) calls `discover_for_recipe`,
which finds the largest legal device batch whose real training step fits in memory with
`discovery.headroom` to spare, and remembers it in a JSON file per key in `discovery.cache_dir`.

Search (each probe is the real step, see `nanochat/batchsize/probe.py`):
1. Legal candidates only: divisors of the rows per step per rank (so gradient accumulation is
   exact), powers of two by default, within [min_batch_size, max_batch_size].
2. The two smallest candidates are probed; their peaks give a memory model
   peak(b) = fixed + b × per_sample, whose prediction is probed next.
3. From the largest size known to fit, galloping growth (next candidate, then 2, 4, ... further)
   until one does not fit; then binary refinement between the two.
Fits = no out-of-memory and peak ≤ (1 − headroom) × capacity, where capacity is the GPU's total
memory, or on CPU the budget (`memory_budget_gb`, else `ram_fraction` of RAM). Headroom is
memory, not a cut of the batch: the answer is always a legal size that was measured to fit.

Cache: the key holds everything that changes the answer and nothing else (nanochat/batchsize/key.py:
model shape, sequence length, dtype, compile and mode, the optimizer's memory-relevant settings —
not its learning rates or schedules —, world size, stage, total batch, device name and memory,
torch version, headroom, candidates, choose); the file holds the key in clear, the result, every
probe's peak memory and tokens/s, time taken, host and date. Written atomically under a file
lock, so concurrent discoverers of one key probe once; a corrupt file is reported in one line and
recomputed; an unwritable cache dir is a warning and discovery still returns.

Distributed: rank 0 discovers and broadcasts over a gloo side group whose timeout is long, so
the other ranks wait out any search (the NCCL group's 10-minute timeout never runs).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from filelock import FileLock

from nanochat.common import UserError, atomic_write_json, git_commit, now_iso
from nanochat.config import TRAINING_SECTIONS, Recipe, legal_device_batch_sizes
from nanochat.data.shards import tokenizer_key
from nanochat.gpt import GPTConfig
from nanochat.batchsize.key import memory_key, model_memory_fields
from nanochat.batchsize.probe import ProbeServer, ProbeSpec, run_probe
from nanochat.runtime import compute_dtype
from nanochat.batchsize.devices import Target, resolve_target
from nanochat.tokenizer import Tokenizer

VERSION = 2                 # bump when the search or the probe changes what they measure
GB = 1e9
LOCK_TIMEOUT_S = 3 * 3600   # a discoverer waiting on another's lock gives up (and probes) after this
WAIT_TIMEOUT_S = 3 * 3600   # how long ranks ≠ 0 wait for rank 0's answer


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def _log(msg: str) -> None:
    print(f"[batch_size] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Candidates and the search (pure: the probe is a function of the batch size).

def legal_candidates(total_batch_size: int, seq_len: int, world_size: int, mode: str = "pow2",
                     min_batch: int = 1, max_batch: int = 1024) -> list[int]:
    """Device batch sizes that keep total = batch × seq × world × accum exact, ascending."""
    legal = legal_device_batch_sizes(total_batch_size, seq_len, world_size)
    if mode == "pow2":
        legal = [b for b in legal if b & (b - 1) == 0]
    return [b for b in legal if min_batch <= b <= max_batch]


@dataclass
class SearchResult:
    largest: int | None             # None: the smallest candidate does not fit
    probes: list[dict]              # in the order run; each has "batch" and "fits"
    fixed_bytes: float | None       # memory model: peak ≈ fixed + batch × per_sample
    per_sample_bytes: float | None
    first_guess: int | None         # the candidate the memory model predicted


def _line(p1: dict, p2: dict) -> tuple[float, float] | None:
    if p1.get("peak_bytes") is None or p2.get("peak_bytes") is None or p1["batch"] == p2["batch"]:
        return None
    per = (p2["peak_bytes"] - p1["peak_bytes"]) / (p2["batch"] - p1["batch"])
    return p1["peak_bytes"] - p1["batch"] * per, per


def search(candidates: list[int], probe: Callable[[int], dict], usable: float) -> SearchResult:
    """Largest candidate whose probe fits (`probe(b)` returns a dict with "peak_bytes" and
    "oom"; it fits when it did not run out of memory and peaked at ≤ usable). Memory is assumed
    to grow with the batch size, so one that fits proves all smaller ones do."""
    done: dict[int, dict] = {}
    order: list[dict] = []

    def fits(i: int) -> bool:
        b = candidates[i]
        if b not in done:
            r = dict(probe(b))
            r["fits"] = (not r.get("oom")) and r.get("peak_bytes") is not None \
                and r["peak_bytes"] <= usable
            done[b] = r
            order.append(r)
        return done[b]["fits"]

    last = len(candidates) - 1

    def predict(lo: int) -> tuple[int | None, tuple | None]:
        """Index of the largest candidate the line through the two largest fitting probes
        says fits (the line is refitted as probes come in: small batches can mislead); None
        when memory did not grow measurably (then growth alone decides)."""
        fit = sorted((r for r in order if r["fits"]), key=lambda r: r["batch"])[-2:]
        line = _line(*fit) if len(fit) == 2 else None
        if line is None or line[1] <= 0:
            return None, line
        return max([lo] + [i for i, b in enumerate(candidates) if line[0] + b * line[1] <= usable]), line

    model = guess = None
    if not fits(0):
        return SearchResult(None, order, None, None, None)
    lo, hi = 0, None                        # indices: largest known fit, smallest known misfit
    if last >= 1:
        if fits(1):
            lo = 1
            gi, model = predict(lo)
            guess = candidates[gi] if gi is not None else None
            if gi is not None and gi > lo:
                if fits(gi):
                    lo = gi
                else:
                    hi = gi
        else:
            hi = 1
    step = 1
    while hi is None and lo < last:         # growth: the refitted model's guess, at most 2× further
        pred, _ = predict(lo)
        nxt = min(lo + step if pred is None else max(lo + 1, min(pred, lo + step)), last)
        if fits(nxt):
            lo, step = nxt, step * 2
        else:
            hi = nxt
    while hi is not None and hi - lo > 1:             # binary refinement
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    fixed, per = model if model else (None, None)
    return SearchResult(candidates[lo], order, fixed, per, guess)


# --------------------------------------------------------------------------------------------
# What is probed, on what, and the cache key.

def _vocab_size(recipe: Recipe) -> int:
    """The model's vocabulary: the recipe's, else the trained tokenizer's if it is on disk, else
    the tokenizer's target size (an upper bound: training can stop short of it)."""
    if recipe.model.vocab_size:
        return recipe.model.vocab_size
    tok = Path(recipe.cache_dir) / "tokenizer" / tokenizer_key(recipe)
    if (tok / "tokenizer.json").exists():
        with contextlib.suppress(Exception):
            return Tokenizer.load(tok).vocab_size
    return recipe.tokenizer.vocab_size


def probe_spec(recipe: Recipe, target: Target, vocab_size: int | None = None) -> ProbeSpec:
    tr = recipe.train
    cfg = GPTConfig.from_args(recipe.model, vocab_size or _vocab_size(recipe))
    dtype = str(compute_dtype(target.device, tr.dtype)).removeprefix("torch.")
    return ProbeSpec(model=dataclasses.asdict(cfg), optim=dataclasses.asdict(recipe.optim),
                     device=str(target.device), dtype=dtype, compile=tr.compile,
                     compile_mode=tr.compile_mode, grad_clip=tr.grad_clip,
                     steps=recipe.discovery.probe_steps, tune_allocator=True)


def cache_key(recipe: Recipe, stage: str, world_size: int, target: Target, spec: ProbeSpec) -> dict:
    """The recipe's memory key (nanochat/batchsize/key.py: no learning rates, betas or schedules)
    and what this device resolved: the concrete model, dtype, device name and memory, torch."""
    return {"version": VERSION, **memory_key(recipe, stage, world_size),
            "model": model_memory_fields(spec.model), "sequence_len": spec.model["sequence_len"],
            "dtype": spec.dtype, "device": target.name, "device_memory_bytes": target.capacity_bytes,
            "torch": target.torch_version,
            "cpu_allocator": "tuned" if target.device.type == "cpu" else None}


def cache_path(recipe: Recipe, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    m = key["model"]
    return Path(recipe.discovery.cache_dir) / (
        f"{key['stage']}-d{m['n_layer']}-w{m['n_embd']}-T{m['sequence_len']}-ws{key['world_size']}-{digest}.json")


def _read_cache(path: Path, key: dict, candidates: list[int]) -> dict | None:
    """The cached record, or None (missing, or corrupt/stale: one warning line)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        _warn(f"batch-size cache {path} cannot be read ({e.strerror}); discovering again")
        return None
    try:
        rec = json.loads(text)
        ok = rec["key"] == key and all(rec["result"][k] in candidates
                                       for k in ("largest", "fastest", "batch_size"))
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        _warn(f"batch-size cache {path} is corrupt or does not match its key; discovering again")
        return None
    return rec


@contextlib.contextmanager
def _cache_lock(path: Path):
    """Yields "locked" while holding the key's lock; "unlocked" (after a warning) where the
    file system refuses locks — then the first writer wins, each write being atomic; "unusable"
    (after a warning) when the cache dir cannot be created."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # PermissionError, NotADirectoryError, read-only FS
        _warn(f"batch-size cache dir {path.parent} is not usable ({e}); discovering without the cache")
        yield "unusable"
        return
    lock = FileLock(str(path) + ".lock", timeout=LOCK_TIMEOUT_S)
    try:
        lock.acquire()
    except OSError as e:  # no lock support on this file system, unwritable dir, filelock.Timeout
        _warn(f"cannot lock {path}.lock ({e}); discovering without the lock")
        yield "unlocked"
        return
    try:
        yield "locked"
    finally:
        lock.release()


# --------------------------------------------------------------------------------------------
# Discovery.

@dataclass
class Discovery:
    batch_size: int                 # the one to use (recipe's `choose`)
    largest: int
    fastest: int
    from_cache: bool
    cache_path: Path | None         # None when the cache dir was unusable
    record: dict                    # what the cache file holds
    seconds: float                  # wall time of this call
    probes_run: int                 # probes this call ran (0 on a cache hit)


def _train_tok_s(r: dict, rows_per_rank: int, seq_len: int) -> float | None:
    """Tokens/s of one rank over a whole optimizer step at this batch: accum × forward/backward
    plus one optimizer step (a per-micro-step rate would charge small batches the optimizer
    step many times over)."""
    if r.get("fwdbwd_s") is None or rows_per_rank % r["batch"]:
        return None
    accum = rows_per_rank // r["batch"]
    return rows_per_rank * seq_len / (accum * r["fwdbwd_s"] + r["opt_s"])


def _too_small_error(res: SearchResult, target: Target, usable: float, headroom: float,
                     extra: dict | None) -> UserError:
    first = res.probes[0]
    fixed = first.get("fixed_bytes")
    per = _line(first, extra) if extra else None
    cost = (f"the model and optimizer take {fixed / GB:.3f} GB before any batch" if fixed is not None
            else "the model alone does not fit")
    if per is not None:
        cost += f", and each sample adds {per[1] / GB:.3f} GB (fixed cost {per[0] / GB:.3f} GB)"
    got = ("ran out of memory" if first.get("oom")
           else f"peaked at {first['peak_bytes'] / GB:.3f} GB")
    return UserError(f"batch-size discovery: batch {first['batch']} does not fit: it {got}; {cost}; "
                     f"usable {usable / GB:.3f} GB = {target.capacity_bytes / GB:.3f} GB "
                     f"({target.source}) minus {headroom:.0%} headroom. Raise the budget, lower "
                     "discovery.headroom or shrink the model")


# Device memory training's process holds that a probe's peak (the caching allocator's reserved
# bytes) never sees: the CUDA context (kernels and cuBLAS/cuDNN workspaces; ~0.5 GiB with CUDA's
# lazy module loading) and, with several ranks, NCCL's communicator buffers (its channels' FIFOs,
# and with NVLS on NVSwitch machines multicast buffers of gigabytes). Left out of the usable
# memory on top of the headroom, so the headroom is the fragmentation margin it is meant to be.
# Allowances, not measurements: `python -m bench.selftest` prints a GPU's reserved peak
# against discovery's prediction.
CUDA_CONTEXT_BYTES = 1 << 30
NCCL_BUFFER_BYTES = 3 << 30


def usable_bytes(target: Target, headroom: float, world_size: int) -> float:
    """Bytes a probe's peak may reach on `target`: capacity less the headroom, and on CUDA less
    the context and (several ranks) NCCL's buffers."""
    usable = target.capacity_bytes * (1 - headroom)
    if target.device.type == "cuda":
        usable -= CUDA_CONTEXT_BYTES + (NCCL_BUFFER_BYTES if world_size > 1 else 0)
    return usable


def _run_search(recipe: Recipe, stage: str, world_size: int, target: Target, spec: ProbeSpec,
                key: dict, candidates: list[int], model, isolate: bool) -> tuple[dict, int]:
    dc = recipe.discovery
    section = recipe.training_section(stage)
    seq = spec.model["sequence_len"]
    rows = section.total_batch_size // (seq * world_size)
    usable = usable_bytes(target, dc.headroom, world_size)
    # CPU probes run under an address-space cap a margin above the budget: a backstop that
    # keeps a probe from taking the machine; the verdict comes from the measured peak.
    limit = int(target.capacity_bytes * 1.5) + 512 * 2**20
    t0 = time.perf_counter()
    _log(f"{stage}: {target.name}, usable {usable / GB:.3f} GB of {target.capacity_bytes / GB:.3f} GB "
         f"({target.source}); candidates {candidates}")
    server = ProbeServer() if isolate else None
    n = 0
    # A compiled step peaks no higher than the eager one but for compile's own fixed cost (CPU,
    # tiny: 0.26 vs 0.25 GB at batch 4, 0.52 vs 1.06 at 16, 0.88 vs 1.69 at 32), and compiling
    # at every probed size costs a compile each (max-autotune: minutes). So a compiled recipe
    # is probed eagerly, then the chosen size is confirmed with one compiled probe.
    eager = dataclasses.replace(spec, compile=False)

    def probe(b: int, sp: ProbeSpec = eager) -> dict:
        nonlocal n
        n += 1
        r = server.probe(sp, b, limit) if server else run_probe(sp, b, model=model)
        r["tok_per_s"] = _train_tok_s(r, rows, seq)
        r["fits"] = not r["oom"] and r["peak_bytes"] is not None and r["peak_bytes"] <= usable
        peak = "out of memory" if r["oom"] else f"peak {r['peak_bytes'] / GB:.3f} GB"
        rate = f", {r['tok_per_s']:,.0f} tok/s" if r["tok_per_s"] else ""
        how = ", compiled" if sp.compile else ""
        _log(f"batch {b}{how}: {peak} → {'fits' if r['fits'] else 'does not fit'}{rate} ({r['seconds']:.1f} s)")
        return r

    try:
        res = search(candidates, probe, usable)
        if res.largest is None:
            extra = None
            if not res.probes[0].get("oom"):   # one more measurement, for the error's per-sample cost
                extra = probe(2 * candidates[0])
            raise _too_small_error(res, target, usable, dc.headroom, extra)
        if dc.choose == "fastest":   # time every fitting candidate (known to fit: smaller ones)
            probed = {p["batch"] for p in res.probes}
            for b in candidates:
                if b < res.largest and b not in probed:
                    r = probe(b)
                    r["fits"] = True
                    res.probes.append(r)
        fitting = [p for p in res.probes if p["fits"] and p["batch"] in candidates]
        timed = [p for p in fitting if p.get("tok_per_s")]
        fastest = max(timed, key=lambda p: p["tok_per_s"])["batch"] if timed else res.largest
        chosen = fastest if dc.choose == "fastest" else res.largest
        confirmed = []
        while spec.compile:   # confirm compiled; step down (rare: compile's fixed cost) until it fits
            confirmed.append(probe(chosen, spec))
            smaller = [b for b in candidates if b < chosen]
            if confirmed[-1]["fits"] or not smaller:
                break
            chosen = smaller[-1]
        if confirmed and not confirmed[-1]["fits"]:
            raise _too_small_error(SearchResult(None, confirmed, None, None, None), target, usable,
                                   dc.headroom, None)
    finally:
        if server:
            server.close()
    largest = min(res.largest, chosen)
    method = f"eager probes, compiled confirmation at {chosen}" if spec.compile else "probes"
    record = {
        "key": key, "method": method,
        "result": {"batch_size": chosen, "largest": largest, "fastest": min(fastest, largest),
                   "choose": dc.choose},
        "memory": {"capacity_bytes": target.capacity_bytes, "source": target.source,
                   "usable_bytes": int(usable), "fixed_bytes": res.fixed_bytes,
                   "per_sample_bytes": res.per_sample_bytes, "first_guess": res.first_guess,
                   "cpu_address_space_cap_bytes": limit if isolate else None},
        "candidates": candidates,
        "probes": [{k: p.get(k) for k in ("batch", "fits", "oom", "peak_bytes", "fixed_bytes",
                                          "tok_per_s", "fwdbwd_s", "opt_s", "seconds")}
                   for p in res.probes],
        "compiled_confirmation": [{k: p.get(k) for k in ("batch", "fits", "oom", "peak_bytes", "seconds")}
                                  for p in confirmed] or None,
        "seconds": round(time.perf_counter() - t0, 3),
        "host": socket.gethostname(), "date": now_iso(), "git_commit": git_commit(),
    }
    return record, n


def discover(recipe: Recipe, stage: str = "base", world_size: int = 1, model=None,
             vocab_size: int | None = None, isolate: bool | None = None,
             use_cache: bool = True) -> Discovery:
    """Find (or read from the cache) the device batch size for `recipe` on this process's
    device. `model`: probe this model instead of a fresh one (in-process probes only; it is
    restored afterwards). `isolate`: probes in child processes (default: on CPU, where that is
    how the memory budget is enforced). `use_cache=False` probes even on a hit (and rewrites)."""
    assert stage in TRAINING_SECTIONS, stage
    t0 = time.perf_counter()
    dc = recipe.discovery
    section = recipe.training_section(stage)
    target = resolve_target(recipe, stage)
    spec = probe_spec(recipe, target, vocab_size)
    isolate = target.device.type == "cpu" if isolate is None else isolate
    seq = spec.model["sequence_len"]
    name = TRAINING_SECTIONS[stage]
    candidates = legal_candidates(section.total_batch_size, seq, world_size, dc.candidates,
                                  dc.min_batch_size, dc.max_batch_size)
    if not candidates:
        raise UserError(f"batch-size discovery: no legal device batch size: {name}.total_batch_size "
                        f"{section.total_batch_size} / (sequence_len {seq} × world size {world_size}) "
                        f"has no {'power-of-two ' if dc.candidates == 'pow2' else ''}divisor in "
                        f"[{dc.min_batch_size}, {dc.max_batch_size}] (discovery.min/max_batch_size)")
    key = cache_key(recipe, stage, world_size, target, spec)
    path = cache_path(recipe, key)

    def result(rec: dict, hit: bool, where: Path | None, n: int) -> Discovery:
        r = rec["result"]
        d = Discovery(r["batch_size"], r["largest"], r["fastest"], hit, where, rec,
                      time.perf_counter() - t0, n)
        _log(f"{stage}: device batch size {d.batch_size} ({'cache hit' if hit else f'{n} probes'}"
             f"{f', {where}' if where else ''})")
        return d

    def stamp():
        with contextlib.suppress(OSError):
            st = path.stat()
            return st.st_mtime_ns, st.st_size
        return None

    seen = stamp()
    if use_cache and (rec := _read_cache(path, key, candidates)):
        return result(rec, True, path, 0)
    with _cache_lock(path) as state:
        # Another process may have written this key while we waited for the lock (re-read only
        # a file that changed: a corrupt one was reported already).
        if state == "locked" and use_cache and stamp() not in (None, seen) \
                and (rec := _read_cache(path, key, candidates)):
            return result(rec, True, path, 0)
        rec, n = _run_search(recipe, stage, world_size, target, spec, key, candidates, model, isolate)
        written = False
        if state != "unusable":
            try:
                atomic_write_json(path, rec)
                written = True
            except OSError as e:
                _warn(f"cannot write batch-size cache {path} ({e}); the result is not cached")
    return result(rec, False, path if written else None, n)


def cached_result(recipe: Recipe, stage: str = "base", world_size: int = 1,
                  vocab_size: int | None = None, target: Target | None = None) -> dict | None:
    """The cached record for this recipe without probing (None on a miss), on `target` — the
    device the jobs will get, which the launcher reads from a partition's device record — or
    this process's own device. The launcher asks this to skip the discovery job."""
    dc = recipe.discovery
    section = recipe.training_section(stage)
    target = target or resolve_target(recipe, stage)
    spec = probe_spec(recipe, target, vocab_size)
    candidates = legal_candidates(section.total_batch_size, spec.model["sequence_len"], world_size,
                                  dc.candidates, dc.min_batch_size, dc.max_batch_size)
    key = cache_key(recipe, stage, world_size, target, spec)
    path = cache_path(recipe, key)
    return _read_cache(path, key, candidates) if path.exists() else None


def discover_for_recipe(recipe: Recipe, stage: str = "base", world_size: int = 1, model=None,
                        vocab_size: int | None = None, **kwargs) -> Discovery:
    """`discover`, agreed across ranks: rank 0 discovers, every rank returns its answer."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return discover(recipe, stage, world_size, model=model, vocab_size=vocab_size, **kwargs)
    # Rank 0's answer goes through the rendezvous store with a long timeout (nanochat/
    # rendezvous.py): the others wait for as long as rank 0 probes (compiling at every size can
    # take minutes; NCCL's collective timeout is 10), a dead rank 0 breaks the wait at once, and
    # no side group needs an address from the node's hostname (which may resolve to 127.0.x.x).
    from nanochat import rendezvous
    if not rendezvous.active():
        raise RuntimeError("distributed discovery needs the process group of nanochat.runtime "
                           "(rendezvous.join), whose store carries rank 0's answer")
    box: list = [None]
    failure = None
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", discover(recipe, stage, world_size, model=model,
                                     vocab_size=vocab_size, **kwargs))
        except UserError as e:
            box[0], failure = ("user", str(e)), e
        except BaseException as e:  # noqa: BLE001 — the others must hear of it, then re-raise
            box[0], failure = ("error", f"{type(e).__name__}: {e}"), e
    box[0] = rendezvous.share(box[0], "rank 0's batch-size discovery", timeout_s=WAIT_TIMEOUT_S)
    if failure is not None:
        raise failure
    status, payload = box[0]
    if status == "ok":
        return payload
    if status == "user":
        raise UserError(payload)
    raise RuntimeError(f"batch-size discovery failed on rank 0: {payload}")


def resolve_device_batch_size(recipe: Recipe, stage: str, world_size: int, model=None,
                              vocab_size: int | None = None) -> tuple[int, Discovery | None]:
    """The stage's device batch size: the recipe's integer (and None), or discovery's answer
    for "auto" (and the Discovery). A training stage passes its live `model`, probed in place
    (no second copy of the weights counted), and the tokenizer's real vocabulary."""
    section = recipe.training_section(stage)
    if section.device_batch_size != "auto":
        return section.device_batch_size, None
    found = discover_for_recipe(recipe, stage=stage, world_size=world_size, model=model,
                                vocab_size=vocab_size)
    return found.batch_size, found


def correct_cache(found: Discovery, batch: int, why: str) -> Path | None:
    """Rewrite discovery's cache entry with a smaller answer the run itself measured (marked
    as corrected, with why and when). None when the entry is not on disk or can't be written."""
    if found.cache_path is None:
        return None
    rec = dict(found.record)
    res = rec["result"]
    rec["result"] = {**res, "batch_size": batch, "largest": min(res["largest"], batch),
                     "fastest": min(res["fastest"], batch)}
    rec["corrected"] = list(rec.get("corrected", [])) + [
        {"from": res["batch_size"], "to": batch, "why": why, "date": now_iso(),
         "host": socket.gethostname()}]
    with _cache_lock(found.cache_path) as state:
        if state == "unusable":
            return None
        try:
            atomic_write_json(found.cache_path, rec)
        except OSError as e:
            _warn(f"cannot correct batch-size cache {found.cache_path} ({e})")
            return None
    found.record = rec
    return found.cache_path


# --------------------------------------------------------------------------------------------
