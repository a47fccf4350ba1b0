"""How the kit times things: the facts every measurement states (device, dtype, versions) and the
timed windows between device syncs. Used by the KV-cache stage (nanochat/kv_bench.py), the cluster
check and the benchmarks in the checkout's bench/."""
from __future__ import annotations

import platform
import time
from typing import Callable

import torch


def environment(device: torch.device, dtype: torch.dtype, cpu_name: str | None = None) -> dict:
    """What every benchmark report states about where it ran: device, dtype and versions."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu ({cpu_name or platform.processor() or platform.machine()}, " \
               f"{torch.get_num_threads()} threads)"
    return {"device": name, "dtype": str(dtype).replace("torch.", ""),
            "versions": {"torch": torch.__version__, "python": platform.python_version()}}


def seconds_per_call(fn: Callable[[], object], sync: Callable[[], None], warmup: int, windows: int,
                     calls: int) -> list[float]:
    """`warmup` untimed calls of `fn`, then `windows` windows of `calls` back-to-back calls, each
    window between two device syncs: seconds per call, one figure per window."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(windows):
        sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        times.append((time.perf_counter() - t0) / calls)
    return times


def timed_run(make_stream, device: torch.device) -> dict:
    """One pass over a token stream (`make_stream()` yields once per decode step): its total and
    first-token seconds and the gaps between steps, from a device sync before it starts."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    arrivals = [time.perf_counter() for _ in make_stream()]
    return {"total_s": arrivals[-1] - t0, "ttft_s": arrivals[0] - t0,
            "gaps_s": [b - a for a, b in zip(arrivals, arrivals[1:])], "steps": len(arrivals)}
