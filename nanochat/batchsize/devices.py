"""What batch-size discovery measures on: a device's identity and the memory it may use.

`resolve_target(recipe)` is this process's own device: the GPU (name, total memory) or, on a
CPU, its model name and a budget (`discovery.memory_budget_gb`, else `ram_fraction` of the RAM
shared by the local ranks). The identity goes into the discovery cache key.

`local_facts` is a device as this process sees it, and `target_of` rebuilds the target from
such facts anywhere: on a login node without a GPU, from the facts a job recorded on the
compute node (the launcher keeps those records).

`NANOCHAT_DEVICE_NAME` overrides the name this process reports for its own device: what the
tests use to make the launching process another machine than its jobs. Jobs drop it
(`jobs/tasks.py`): a job reports the device it really has.
"""
from __future__ import annotations

import contextlib
import os
import platform
from dataclasses import dataclass

import torch

from nanochat.common import UserError
from nanochat.config import DEVICE_NAME_ENV, TRAINING_SECTIONS, Recipe
from nanochat.batchsize.probe import host_ram_bytes
from nanochat.runtime import pick_device

GB = 1e9
TORCH_VERSION = torch.__version__  # of the process that will train: part of the cache key


@dataclass
class Target:
    device: torch.device
    name: str                       # GPU name, or the CPU model
    capacity_bytes: int             # GPU total memory, or the CPU budget
    source: str                     # where the capacity comes from (for messages)
    torch_version: str = TORCH_VERSION


@dataclass
class DeviceFacts:
    """A device as a discover job saw it: enough to rebuild its Target anywhere."""
    kind: str                       # "cuda" | "cpu"
    name: str
    memory_bytes: int               # GPU total memory, or the host's RAM
    local_ranks: int                # ranks sharing the host's RAM (CPU budgets split it)
    torch_version: str


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_name(recipe: Recipe) -> str:
    """What this process trains the recipe on, by name, for a run's records (meta.json's "gpu"):
    the GPU's name, else the device type ("cpu", "mps"); NANOCHAT_DEVICE_NAME overrides it as it
    does local_facts'. Never raises: a cuda recipe on a node without one is the stage's error."""
    kind = pick_device(recipe.train.device)
    if kind == "cuda" and torch.cuda.is_available():
        return os.environ.get(DEVICE_NAME_ENV) or torch.cuda.get_device_name(torch.cuda.current_device())
    return os.environ.get(DEVICE_NAME_ENV) or kind


def local_facts(recipe: Recipe, stage: str = "base") -> DeviceFacts:
    """This process's device (the one discovery probes)."""
    kind = pick_device(recipe.train.device)
    override = os.environ.get(DEVICE_NAME_ENV)
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise UserError("train.device is cuda but no CUDA device is visible; set train.device=auto")
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return DeviceFacts("cuda", override or props.name, props.total_memory, 1, torch.__version__)
    if kind != "cpu":
        key = f"{TRAINING_SECTIONS.get(stage, 'train')}.device_batch_size"
        raise UserError(f"{key} is 'auto', but batch-size discovery measures cuda and cpu devices, "
                        f"not {kind}; set {key} to an integer")
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return DeviceFacts("cpu", override or cpu_name(), host_ram_bytes(), local, torch.__version__)


def target_of(recipe: Recipe, facts: DeviceFacts) -> Target:
    """The device and the memory discovery may fill on it, under the recipe's budget rules."""
    if facts.kind == "cuda":
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cuda")
        return Target(device, facts.name, facts.memory_bytes, f"{facts.name} memory", facts.torch_version)
    dc = recipe.discovery
    cpu = torch.device("cpu")
    if dc.memory_budget_gb is not None:
        return Target(cpu, facts.name, int(dc.memory_budget_gb * GB), "discovery.memory_budget_gb",
                      facts.torch_version)
    ram, local = facts.memory_bytes, facts.local_ranks
    return Target(cpu, facts.name, int(ram * dc.ram_fraction / local),
                  f"discovery.ram_fraction {dc.ram_fraction} of {ram / GB:.1f} GB RAM"
                  + (f" / {local} local ranks" if local > 1 else ""), facts.torch_version)


def resolve_target(recipe: Recipe, stage: str = "base") -> Target:
    """This process's own target."""
    return target_of(recipe, local_facts(recipe, stage))
