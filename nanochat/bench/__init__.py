"""Benchmarks: commands that print their method, device, versions, median and min/max."""
from __future__ import annotations

import json
import platform
import time
from typing import Callable

import torch

from nanochat.common import atomic_write_json


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


def timing_args(ap, warmup: int, repeats: int, json_file: bool = True) -> None:
    """The flags every benchmark's method shares: untimed warm-up runs, timed repeats (median,
    min and max over them) and, with `json_file`, `--json PATH` for `emit`."""
    ap.add_argument("--warmup", type=int, default=warmup,
                    help=f"untimed runs first: compilation, allocation, caches (default {warmup})")
    ap.add_argument("--repeats", type=int, default=repeats,
                    help=f"timed runs: median, min and max over them (default {repeats})")
    if json_file:
        ap.add_argument("--json", help="also write the report to this file (atomically)")


def emit(report: dict, json_path=None) -> None:
    """Print a benchmark's report (JSON); with `--json PATH` also write it there, atomically."""
    print(json.dumps(report, indent=2))
    if json_path:
        atomic_write_json(json_path, report)
