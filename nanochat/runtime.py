"""The runtime a stage runs in: which device, which compute dtype, which process group.

Training, SFT, batch-size discovery, evaluation, chat and the benchmarks all ask here, so the
rules are decided once:
- ranks come from torchrun (RANK, LOCAL_RANK, WORLD_SIZE) or from SLURM under srun;
- the device is `train.device` ("auto": CUDA, else MPS, else CPU), cuda:LOCAL_RANK per rank;
- the compute dtype is `train.dtype` ("auto": bf16 autocast on CUDA, fp32 elsewhere; parameters
  stay fp32 in training); TF32 matmuls on CUDA (`cuda_matmul_precision`);
- the process group is NCCL on CUDA, gloo on CPU, created once (after a roll call of the ranks,
  nanochat/rendezvous.py) under the recipe's cluster.init_timeout_min, then kept with its
  cluster.collective_timeout_min for the collectives, and always destroyed;
- CUDA's caching allocator grows expandable segments (`PYTORCH_ALLOC_CONF`, set on import,
  before any stage starts CUDA), as upstream's base_train and chat_sft set it;
- CPU training keeps freed memory in the heap (`tune_cpu_allocator`);
- MFU is measured against a datasheet peak on known GPUs, else a measured matmul.
"""
from __future__ import annotations

import contextlib
import gc
import os
import time
from dataclasses import dataclass

import torch

from nanochat import rendezvous
from nanochat.common import UserError
from nanochat.config import ClusterArgs, Recipe, TrainArgs


ALLOC_CONF = "expandable_segments:True"


def set_cuda_allocator(env=None) -> None:
    """PYTORCH_ALLOC_CONF=expandable_segments:True unless the user configured the allocator
    (PYTORCH_ALLOC_CONF, or its older name PYTORCH_CUDA_ALLOC_CONF). The allocator reads it at
    its first CUDA allocation, so this must run before any: every stage imports this module
    before it touches the device (and the probe processes inherit it). Segments that grow in
    place keep eval's and CORE's changing widths from fragmenting the cache that discovery
    filled to its headroom."""
    env = os.environ if env is None else env
    if not env.get("PYTORCH_ALLOC_CONF") and not env.get("PYTORCH_CUDA_ALLOC_CONF"):
        env["PYTORCH_ALLOC_CONF"] = ALLOC_CONF


set_cuda_allocator()


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_master(self) -> bool:
        return self.rank == 0


def dist_info_from_env(env=None) -> DistInfo:
    """Rank/world size from torchrun (RANK, LOCAL_RANK, WORLD_SIZE) or, failing that, from SLURM
    (SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS) when the job runs one task per GPU under srun."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistInfo(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_ID" in env:
        return DistInfo(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)),
                        int(env["SLURM_NTASKS"]))
    return DistInfo()


def pick_device(requested: str = "auto") -> str:
    """'auto' → cuda if available, else mps, else cpu."""
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def cuda_unseen() -> str | None:
    """None when torch sees a CUDA device; else which torch this is, for the line that says so:
    "torch 2.x (a CPU-only build)" or "torch 2.x (CUDA 12.x)" (a driver it cannot use)."""
    if torch.cuda.is_available():
        return None
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    return f"torch {torch.__version__} ({build})"


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def tune_cpu_allocator(tuned: bool = True) -> bool:
    """Keep freed tensor memory in the process on glibc (CPU training).

    By default glibc serves blocks ≥ 128 KiB–32 MiB with mmap and unmaps them on free, so every
    training step's activations and logits (hundreds of MB) are mapped again and page-faulted
    in: ~1M faults/s and ~15% of CPU time in the kernel. Serving blocks up to 1 GiB from the heap
    and never trimming it took the d4 training step from ~1,000 to ~1,700 tokens/s on 2 cores,
    at the cost of a higher resident peak (`python -m bench.throughput configs/d4.yaml`
    measures both side by side). `tuned=False` restores glibc's defaults. Returns whether
    mallopt was applied (False off glibc)."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mmap_max, trim = (2**30, 2**31 - 1) if tuned else (128 * 1024, 128 * 1024)
    ok = mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(mmap_max))
    ok &= mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(trim))
    ok &= mallopt(_M_TOP_PAD, ctypes.c_int(64 * 2**20 if tuned else 0))
    return bool(ok)


def compute_dtype(device: torch.device, requested: str = "auto") -> torch.dtype:
    """The dtype a stage computes in: `requested` (train.dtype), where "auto" is bf16 on CUDA
    (autocast in training; inference models are cast) and fp32 elsewhere (CPU bf16 matmuls
    are slower than fp32 ones)."""
    kind = torch.device(device).type
    if requested == "auto":
        return torch.bfloat16 if kind == "cuda" else torch.float32
    if requested != "float32" and kind not in AUTOCAST_DEVICES:
        raise UserError(f"train.dtype={requested} is not supported on {kind} (autocast runs on "
                        f"{' and '.join(AUTOCAST_DEVICES)} here); use train.dtype=auto or float32")
    return getattr(torch, requested)


# where Runtime.autocast honours a bf16 train.dtype (on the CPU: slower than fp32, but what the
# recipe asked for — run.json records it — rather than silently fp32)
AUTOCAST_DEVICES = ("cuda", "cpu")


# --------------------------------------------------------------------------------------------


@dataclass
class Runtime:
    dist: DistInfo
    device: torch.device
    dtype: torch.dtype          # compute dtype (autocast on CUDA); parameters stay fp32

    def autocast(self):
        if self.device.type in AUTOCAST_DEVICES and self.dtype != torch.float32:
            return torch.autocast(self.device.type, dtype=self.dtype)
        return contextlib.nullcontext()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def setup_runtime(args: TrainArgs, tune_allocator: bool = True, timeout_min: float | None = None,
                  init_timeout_min: float | None = None) -> Runtime:
    """`timeout_min`: the process group's collective timeout (the recipe's
    cluster.collective_timeout_min); `init_timeout_min`: the timeout of its creation, up to a
    first barrier (cluster.init_timeout_min). None = that field's default."""
    info = dist_info_from_env()
    device_type = pick_device(args.device)
    if device_type == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device is cuda but no CUDA device is visible; set train.device=auto")
    device = torch.device(f"cuda:{info.local_rank}" if device_type == "cuda" else device_type)
    if device.type == "cpu" and tune_allocator:
        tune_cpu_allocator()
    if device.type == "cuda":
        torch.cuda.set_device(device)
        cuda_matmul_precision()
    if info.is_distributed and not torch.distributed.is_initialized():
        # The store the group is made from also carries the long waits (nanochat/rendezvous.py).
        backend = "nccl" if device.type == "cuda" else "gloo"
        collective, init = group_timeouts_min(timeout_min, init_timeout_min)
        rendezvous.join(info.rank, info.world_size, backend, collective,
                        device_id=device if device.type == "cuda" else None, init_timeout_min=init)
    torch.manual_seed(args.seed)
    return Runtime(info, device, compute_dtype(device, args.dtype))


def cuda_matmul_precision() -> None:
    """fp32 matmuls on TF32 tensor cores, as upstream: `set_float32_matmul_precision("high")`.
    Not the legacy `torch.backends.cuda.matmul.allow_tf32` flag: torch ≥ 2.9 refuses to mix it
    with the newer `fp32_precision` settings a user or library may set."""
    torch.set_float32_matmul_precision("high")


def group_timeouts_min(timeout_min: float | None = None,
                       init_timeout_min: float | None = None) -> tuple[float, float]:
    """(collective, init) timeouts of the process group in minutes: the values given, each None
    replaced by its ClusterArgs default."""
    defaults = ClusterArgs()
    return (defaults.collective_timeout_min if timeout_min is None else timeout_min,
            defaults.init_timeout_min if init_timeout_min is None else init_timeout_min)


def recipe_runtime(recipe: Recipe, tune_allocator: bool = True) -> Runtime:
    """setup_runtime for a recipe's stage or benchmark: its train section and its cluster's
    collective and init timeouts (under torchrun/srun a bench is distributed like training)."""
    return setup_runtime(recipe.train, tune_allocator, recipe.cluster.collective_timeout_min,
                         recipe.cluster.init_timeout_min)


def teardown_runtime(rt: Runtime) -> None:
    if rt.dist.is_distributed and torch.distributed.is_initialized():
        # A compiled DDP wrapper sits in reference cycles: collect it now, while its process
        # group lives — a reducer that outlives its group can block in its destructor at exit.
        gc.collect()
        torch.distributed.destroy_process_group()
    rendezvous.leave()


@contextlib.contextmanager
def runtime(args: TrainArgs, timeout_min: float | None = None, init_timeout_min: float | None = None):
    """setup_runtime … teardown_runtime around a stage (the process group always destroyed)."""
    rt = setup_runtime(args, timeout_min=timeout_min, init_timeout_min=init_timeout_min)
    try:
        yield rt
    finally:
        teardown_runtime(rt)


def barrier(world_size: int, what: str = "the other ranks") -> None:
    """Wait for every rank (a no-op in a single process) on the rendezvous store, under its long
    wait (rendezvous.LONG_WAIT_S), not in an NCCL barrier under the collective timeout: rank 0
    writing and fsyncing a d24 checkpoint (~13 GB) to slow shared storage can take longer than
    cluster.collective_timeout_min, and the watchdog would abort the waiting ranks. A group
    made without the rendezvous (a test's own) falls back to the collective barrier."""
    if world_size <= 1:
        return
    if rendezvous.active():
        rendezvous.barrier(what)
    else:
        torch.distributed.barrier()


def maybe_compile(model: torch.nn.Module, args: TrainArgs) -> torch.nn.Module:
    if not args.compile:
        return model
    mode = None if args.compile_mode == "default" else args.compile_mode
    return torch.compile(model, mode=mode, dynamic=False)


def compile_count() -> int:
    """Graphs torch.compile (dynamo) has compiled in this process so far: a recompile (a new
    shape under dynamic=False) or a graph break adds one. SFT logs it; tests assert on it."""
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def compile_cache_counts() -> tuple[int, int]:
    """(hits, misses) of torch.compile's on-disk caches in this process so far: AOTAutograd's
    and Inductor's FX graph cache, the ones TORCHINDUCTOR_CACHE_DIR holds (nanochat/paths.py
    compile_cache_env puts it on the node's disk, kept across jobs). A bypass (a graph the cache
    cannot key) compiles like a miss."""
    from torch._dynamo.utils import counters
    ind, aot = counters["inductor"], counters["aot_autograd"]
    return (int(ind["fxgraph_cache_hit"] + aot["autograd_cache_hit"]),
            int(ind["fxgraph_cache_miss"] + ind["fxgraph_cache_bypass"] +
                aot["autograd_cache_miss"] + aot["autograd_cache_bypass"]))


def compile_cache_state(before: tuple[int, int], after: tuple[int, int]) -> str | None:
    """Whether the compile between two compile_cache_counts found its kernels: 'hit' (all of
    them), 'miss' (none), 'partial'; None when nothing was compiled (train.compile off)."""
    hits, misses = after[0] - before[0], after[1] - before[1]
    if not hits and not misses:
        return None
    return "partial" if hits and misses else "hit" if hits else "miss"


# Datasheet dense (no sparsity) tensor-core peaks, FLOP/s, by GPU name as torch reports it
# ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA A100-SXM4-80GB", ...). Checked in this
# order: the PCIe and NVL parts of a family are slower than its SXM part, and their names also
# contain the family's. fp32 means TF32: setup_runtime turns TF32 matmuls on, so an fp32 run is
# measured against the TF32 peak (the non-tensor-core fp32 peak would read ~7-8x too high).
GPU_PEAK_FLOPS = (
    ("H100 NVL", {torch.bfloat16: 835e12, torch.float32: 417.5e12}),
    ("H100 PCIe", {torch.bfloat16: 756e12, torch.float32: 378e12}),
    ("H200 NVL", {torch.bfloat16: 835e12, torch.float32: 417.5e12}),
    ("H100", {torch.bfloat16: 989e12, torch.float32: 494.5e12}),     # SXM
    ("H200", {torch.bfloat16: 989e12, torch.float32: 494.5e12}),     # SXM
    ("A100", {torch.bfloat16: 312e12, torch.float32: 156e12}),
    ("L40S", {torch.bfloat16: 362e12, torch.float32: 183e12}),
)


def datasheet_peak(name: str, dtype: torch.dtype) -> tuple[float, str] | None:
    """(FLOP/s, "datasheet <part>") for a GPU of this name computing in `dtype`, or None."""
    for key, peaks in GPU_PEAK_FLOPS:
        if key in name and dtype in peaks:
            part = key + (" (TF32)" if dtype == torch.float32 else "")
            return peaks[dtype], f"datasheet {part}"
    return None


def mfu_percent(flops_per_token: float, tokens_per_s: float, peak: float, world_size: int = 1) -> float:
    """Model FLOPs utilisation: the model's FLOPs per second over the peak of all ranks."""
    return 100 * flops_per_token * tokens_per_s / (peak * world_size)


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, n: int | None = None,
                         seconds: float | None = None) -> float:
    """Sustained FLOP/s of an n×n matmul on this device (the measured peak for MFU). Defaults:
    8192 for 0.5 s on a GPU; 1024 for 0.25 s on a CPU, which every CPU training process pays at
    its start: 2048 for 0.5 s took 1.3 s for the same figure (57.9 vs 56.6 GFLOP/s, 1 thread)."""
    gpu = device.type == "cuda"
    n, seconds = n or (8192 if gpu else 1024), seconds or (0.5 if gpu else 0.25)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    reps, t0 = 0, time.perf_counter()
    while True:
        a @ b
        reps += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if time.perf_counter() - t0 > seconds:
            break
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """The peak MFU is measured against: a known GPU's datasheet, else a measured matmul."""
    if device.type == "cuda":
        known = datasheet_peak(torch.cuda.get_device_name(device), dtype)
        if known is not None:
            return known
    return measure_matmul_flops(device, dtype), "measured matmul"
