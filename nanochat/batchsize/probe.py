"""One memory probe: the real training step of a recipe at one device batch size.

A probe builds the recipe's GPT (or reuses the caller's), its optimizers (Muon + AdamW, as
`build_optimizers` makes them), compiles it the way training does, and runs `steps` full steps —
forward, backward, optimizer step, zero_grad: the loop's own step, nanochat/timing.py
`TrainingStep` — then one evaluation forward, because the second
step is the first one with optimizer state and gradients both resident, and the training loop
evaluates with the plain (uncompiled) model at the same batch size. It reports the peak memory,
the memory before the first step ("fixed": weights and, for a fresh model, nothing else yet) and
the time of the last step's forward/backward and optimizer step.

Devices:
- CUDA (in-process): `torch.cuda.OutOfMemoryError` means "does not fit"; the peak is
  `max_memory_reserved` (what the caching allocator holds, which is what runs out).
- CPU (a child process per probe, `probe_in_child`): a CPU has no out-of-memory of its own, so
  the child runs under `RLIMIT_AS` (address space) a margin above the budget — an allocation past it
  raises torch's "DefaultCPUAllocator: can't allocate memory" — and reports its peak resident
  memory above its own baseline (`cpu_peak`). The child applies `tune_cpu_allocator()` first,
  as every CPU training process does, because keeping freed memory in the heap raises the
  resident peak the training run will really have.

Any exception other than an out-of-memory is a bug and propagates (from a child: `ProbeError`
with the child's traceback).
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import pickle
import resource
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from nanochat.config import OptimArgs, TrainArgs
from nanochat.gpt import GPT, GPTConfig
from nanochat.runtime import DistInfo, Runtime, tune_cpu_allocator
from nanochat.timing import timed, training_step

CPU_OOM_MESSAGE = "DefaultCPUAllocator: can't allocate memory"


@dataclass(frozen=True)
class ProbeSpec:
    """Everything a probe needs; plain data so it pickles into a child process."""
    model: dict                     # GPTConfig fields
    optim: dict                     # OptimArgs fields
    device: str                     # "cpu" | "cuda" | "cuda:N"
    dtype: str                      # compute dtype: "float32" | "bfloat16"
    compile: bool = False
    compile_mode: str = "default"
    grad_clip: float = 0.0
    steps: int = 2
    tune_allocator: bool = True     # CPU: probe with the allocator training uses


class ProbeError(RuntimeError):
    """A probe failed with something other than out-of-memory (the child's traceback inside)."""


def _is_oom_itself(exc: BaseException) -> bool:
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    text = str(exc)
    # torch's CPU allocator under RLIMIT_AS; Triton loading a kernel on a full GPU raises a
    # plain RuntimeError ("Triton Error [CUDA]: out of memory")
    return CPU_OOM_MESSAGE in text or ("out of memory" in text.lower() and
                                       ("triton" in text.lower() or "cuda" in text.lower()))


def is_oom(exc: BaseException | None) -> bool:
    """True for a real out-of-memory: CUDA's OutOfMemoryError, torch's CPU allocator failing
    (under RLIMIT_AS), Triton's kernel load on a full GPU, or Python's MemoryError — also when
    wrapped by another exception. Dynamo wraps an OOM raised while compiling (max-autotune
    benchmarks real kernels on real tensors) as `BackendCompilerFailed(...) from None`, which
    hides it from `__cause__`: the chain is followed through `__cause__`, `__context__` and
    `inner_exception` alike. Everything else is not an OOM (a bug: the search stops)."""
    todo, seen = [exc], set()
    while todo and len(seen) < 32:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if _is_oom_itself(e):
            return True
        todo += [e.__cause__, e.__context__, getattr(e, "inner_exception", None)]
    return False


# --------------------------------------------------------------------------------------------
# Process memory, in bytes: psutil (Linux, macOS). Only the resettable peak (VmHWM) is Linux's own.

def proc_status(field: str) -> int:
    """This process's VmRSS (resident), RssAnon (resident, not backed by a file), VmSize (address
    space) or VmHWM (the resident peak since `reset_peak_rss`), as Linux's /proc/self/status
    names them. Where the
    kernel keeps no anonymous count or resettable peak (macOS), both read as the resident size:
    the probe's peak is then what stays resident after its steps (the tuned allocator keeps
    what it used), and discovery.headroom covers what it misses."""
    mem = psutil.Process().memory_info()
    if field == "VmRSS":
        return mem.rss
    if field == "RssAnon":  # Linux: shared = file-backed + shmem pages of the resident set
        return mem.rss - getattr(mem, "shared", 0)
    if field == "VmSize":
        return mem.vms
    if field == "VmHWM":
        with contextlib.suppress(OSError):
            with open("/proc/self/status") as f:  # psutil has no resettable peak
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        return mem.rss
    raise ValueError(f"unknown memory field {field!r}")  # programmer error


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_peak(base_rss: int, base_anon: int) -> int:
    """Peak resident bytes above a baseline taken at (`base_rss`, `base_anon`).

    Two readings, the larger wins:
    - anonymous memory now (RssAnon): the tuned allocator (`tune_cpu_allocator`) never gives
      heap memory back, so what is resident now is the peak. File pages (libtorch's code, ~10²
      MB mapped from the parent) are left out: the kernel may evict them while the probe runs
      on a busy host, which would lower a total-RSS difference by as much.
    - the kernel's high-water mark of all resident memory (VmHWM) since `reset_peak_rss`: the
      peak under an allocator that unmaps freed blocks (glibc's defaults)."""
    return max(proc_status("RssAnon") - base_anon, proc_status("VmHWM") - base_rss)


def memory_baseline() -> tuple[int, int]:
    """(VmRSS, RssAnon) now, with the kernel's peak reset to now: `cpu_peak(*baseline)` later
    is the process's peak above this point, measured as a probe measures it."""
    reset_peak_rss()
    return proc_status("VmRSS"), proc_status("RssAnon")


def release_freed_memory() -> bool:
    """Give the heap's free memory back to the kernel (glibc malloc_trim), so that the next
    peak reading sees what the next step uses, not what an earlier, larger one left in a heap
    the tuned allocator never trims. False off glibc."""
    import ctypes
    import ctypes.util
    try:
        return bool(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def host_ram_bytes() -> int:
    """RAM this process may use: the machine's total (psutil), lowered by a cgroup (v2 or v1)
    limit (SLURM --mem). Not the available memory: that changes from run to run and would
    change the cache key."""
    total = psutil.virtual_memory().total
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        with contextlib.suppress(OSError, ValueError):
            with open(path) as f:
                total = min(total, int(f.read().strip()))
    return total


# --------------------------------------------------------------------------------------------
# The probe itself (in-process; on CPU normally inside the child below).

def _param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def run_probe(spec: ProbeSpec, batch: int, model: torch.nn.Module | None = None) -> dict:
    """Run the training step at `batch`; returns {"batch", "oom", "peak_bytes", "fixed_bytes",
    "fwdbwd_s", "opt_s", "seconds"}. With `model`, probes that model and leaves it as it was
    (weights restored bit for bit, no gradients); otherwise builds one from `spec.model`.
    Memory: on CUDA the process's reserved bytes; on CPU bytes above the RSS at entry (plus the
    caller's weights, which that baseline already holds)."""
    device = torch.device(spec.device)
    cuda = device.type == "cuda"
    cfg = GPTConfig(**spec.model)
    t_start = time.perf_counter()
    rt = Runtime(DistInfo(), device, getattr(torch, spec.dtype))
    if cuda:
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        base, base_anon = proc_status("VmRSS"), proc_status("RssAnon")
        reset_peak_rss()
    out = {"batch": batch, "oom": False, "peak_bytes": None, "fixed_bytes": None,
           "fwdbwd_s": None, "opt_s": None}
    snapshot = step = None
    extra = 0
    # The probe's random init and inputs must not move the caller's RNG streams (a run with
    # `auto` must train exactly like one given the same batch by hand).
    with torch.random.fork_rng(devices=[device] if cuda else []):
        try:
            if model is not None:
                snapshot = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                was_training = model.training
                extra = 0 if cuda else _param_bytes(model)
            # the loop's own step (nanochat/timing.py), on one rank with no collective
            step = training_step(cfg, OptimArgs(**spec.optim), TrainArgs(
                compile=spec.compile, compile_mode=spec.compile_mode, grad_clip=spec.grad_clip),
                rt, batch, seed=batch, model=model)
            model = step.model
            out["fixed_bytes"] = (torch.cuda.memory_reserved(device) if cuda
                                  else proc_status("VmRSS") - base) + extra
            model.train()
            for _ in range(spec.steps):
                out["fwdbwd_s"] = timed(step.micro_steps, rt.sync)
                out["opt_s"] = timed(step.update, rt.sync)
            model.eval()  # the loop evaluates with the plain model at this batch size
            with torch.no_grad(), rt.autocast():
                model(*step.batches[0], loss_reduction="none")
            model.train()
            rt.sync()
            out["peak_bytes"] = (torch.cuda.max_memory_reserved(device) if cuda
                                 else cpu_peak(base, base_anon)) + extra
        except Exception as e:  # noqa: BLE001 — only OOM is swallowed, below
            if not is_oom(e):
                raise
            out["oom"] = True
            # fall through: the exception (and the frames holding tensors) is dropped on exit
        finally:
            step = None  # release before restoring and emptying caches
            if snapshot is not None:
                with torch.no_grad():
                    for k, v in model.state_dict().items():
                        v.copy_(snapshot[k])
                for p in model.parameters():
                    p.grad = None
                model.train(was_training)
    model = snapshot = None
    if spec.compile:
        torch._dynamo.reset()  # drop compiled graphs (and CUDA-graph pools) of this batch size
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    out["seconds"] = time.perf_counter() - t_start
    return out


# --------------------------------------------------------------------------------------------
# CPU: each probe in a fresh child process, under an address-space limit.

def _child_run(spec: ProbeSpec, batch: int, limit_bytes: int | None) -> tuple[str, object]:
    """In the forked child: set up like a training process, then probe under the limit."""
    try:
        if spec.tune_allocator:
            tune_cpu_allocator()
        # Start the OpenMP pool (thread stacks, arenas) before the baseline is taken.
        a = torch.randn(256, 256)
        (a @ a).relu_().sum()
        del a
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        if limit_bytes is not None:
            cap = proc_status("VmSize") + limit_bytes
            if hard != resource.RLIM_INFINITY:
                cap = min(cap, hard)
            resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
        try:
            return "ok", run_probe(spec, batch)
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))  # room to report back
    except BaseException as e:  # noqa: BLE001 — reported to the parent, which decides
        return ("oom" if is_oom(e) else "error"), traceback.format_exc()


def _serve(req_fd: int, resp_fd: int) -> None:
    """The probe server: imports torch and the model once, then forks one child per request.

    Forking a process that has imported torch but never run an op is safe, and takes
    milliseconds where a fresh interpreter takes seconds. (multiprocessing's forkserver would do
    the same but re-runs the caller's __main__ in every child, which breaks unguarded scripts.)"""
    # Pay the lazy imports once here, not in every child (torch._dynamo alone takes ~1 s; the
    # model's init functions import it). Only meta-device work: no thread pool may start before
    # a fork.
    import torch._dynamo  # noqa: F401
    with torch.device("meta"):
        GPT(GPTConfig(sequence_len=8, vocab_size=256, n_layer=1, n_head=1, n_kv_head=1,
                      n_embd=8)).init_weights()
    with os.fdopen(req_fd, "rb") as req, os.fdopen(resp_fd, "wb") as resp:
        while True:
            try:
                spec, batch, limit = pickle.load(req)
            except EOFError:
                return
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # child: never returns into the server loop
                os.close(r)
                code = 1
                try:
                    with os.fdopen(w, "wb") as out:
                        pickle.dump(_child_run(ProbeSpec(**spec), batch, limit), out)
                    code = 0
                finally:
                    os._exit(code)
            os.close(w)
            with os.fdopen(r, "rb") as f:
                data = f.read()
            _, status = os.waitpid(pid, 0)
            pickle.dump((data, os.waitstatus_to_exitcode(status)), resp)
            resp.flush()


PROBES_STARTED = 0  # child probes started by this process (tests check that a cache hit runs none)


class ProbeServer:
    """Runs `run_probe` in fresh child processes (CPU), each under an address-space limit.

        with ProbeServer() as server:
            result = server.probe(spec, batch=8, limit_bytes=2 * 2**30)
    """

    def __init__(self):
        req_r, req_w = os.pipe()
        resp_r, resp_w = os.pipe()
        code = f"from nanochat.batchsize.probe import _serve; _serve({req_r}, {resp_w})"
        # The server must import this very package, wherever the caller found it.
        root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
        self.proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=(req_r, resp_w), env=env)
        os.close(req_r)
        os.close(resp_w)
        self.req, self.resp = os.fdopen(req_w, "wb"), os.fdopen(resp_r, "rb")

    def probe(self, spec: ProbeSpec, batch: int, limit_bytes: int | None) -> dict:
        """`run_probe` in a child whose address space may grow by at most `limit_bytes` above
        its baseline (None: no limit). A child killed by SIGKILL (the kernel's OOM killer) also
        counts as out of memory; any other failure raises ProbeError."""
        global PROBES_STARTED
        PROBES_STARTED += 1
        t0 = time.perf_counter()
        try:
            pickle.dump((dataclasses.asdict(spec), batch, limit_bytes), self.req)
            self.req.flush()
            data, exitcode = pickle.load(self.resp)
        except (EOFError, BrokenPipeError) as e:
            raise ProbeError(f"the batch-size probe server died (exit code {self.proc.poll()})") from e
        status, payload = pickle.loads(data) if data else (None, None)
        if status == "ok":
            return payload
        if status == "oom" or (status is None and exitcode == -signal.SIGKILL):
            return {"batch": batch, "oom": True, "peak_bytes": None, "fixed_bytes": None,
                    "fwdbwd_s": None, "opt_s": None, "seconds": time.perf_counter() - t0}
        raise ProbeError(f"batch-size probe at batch {batch} failed (not out of memory; exit code "
                         f"{exitcode}):\n{payload or ''}")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.req.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.resp.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
