"""Benchmarks: commands that print their method, device, versions, median and min/max."""
from __future__ import annotations

import platform

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
