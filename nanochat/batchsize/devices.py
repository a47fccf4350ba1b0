"""What batch-size discovery measures on: a device's identity and the memory it may use.

`resolve_target(recipe)` is this process's own device: the GPU (name, total memory) or, on a
CPU, its model name and a budget (`discovery.memory_budget_gb`, else `ram_fraction` of the RAM
shared by the local ranks). The identity goes into the discovery cache key.

A login node usually has no GPU, yet the launcher must know whether the cache already answers
for the device the *partition* gives, or it queues a GPU job for an answer it has. So every
discover job records what it ran on — `discovery.cache_dir/devices/<partition>[+<constraint>].json`
(device name and memory, torch version, host, date) — and `partition_target(recipe)` turns that
record into the compute node's target on the login node. No record, a stale one (another torch,
or older than RECORD_MAX_AGE_DAYS), a corrupt one, or a partition that gave different devices
without a `cluster.constraint` pinning one → no target, with the reason (the dry run prints it
and the discover job runs).

`NANOCHAT_DEVICE_NAME` overrides the name this process reports for its own device: what the
tests use to make the launching process another machine than its jobs. Jobs drop it
(`jobs/tasks.py`): a job reports the device it really has.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import socket
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from nanochat.common import UserError, atomic_write_json, now_iso
from nanochat.config import DEVICE_NAME_ENV, TRAINING_SECTIONS, Recipe
from nanochat.batchsize.probe import host_ram_bytes
from nanochat.runtime import pick_device

GB = 1e9
RECORD_MAX_AGE_DAYS = 30    # a partition's hardware changes rarely; re-check it monthly


@dataclass
class Target:
    device: torch.device
    name: str                       # GPU name, or the CPU model
    capacity_bytes: int             # GPU total memory, or the CPU budget
    source: str                     # where the capacity comes from (for messages)
    torch_version: str = torch.__version__  # of the process that will train (part of the key)


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


# --------------------------------------------------------------------------------------------
# Partition records: what a partition's discover jobs ran on.

def record_path(recipe: Recipe) -> Path:
    """Where the record of the recipe's partition lives ("default": the cluster's default
    partition, when the recipe names none)."""
    c = recipe.cluster
    name = (c.partition or "default") + (f"+{c.constraint}" if c.constraint else "")
    return Path(recipe.discovery.cache_dir) / "devices" / f"{name}.json"


def record_device(recipe: Recipe, stage: str = "base") -> Path | None:
    """Add this process's device to its partition's record (a discover job calls this). A
    record that cannot be written is a warning: discovery's answer does not depend on it."""
    path = record_path(recipe)
    facts = local_facts(recipe, stage)
    rec = _read_record(path, warn=False) or {}
    devices = rec.get("devices") if isinstance(rec.get("devices"), dict) else {}
    devices[facts.name] = {**asdict(facts), "host": socket.gethostname(), "date": now_iso()}
    out = {"partition": recipe.cluster.partition, "constraint": recipe.cluster.constraint,
           "devices": devices, "updated": now_iso()}
    try:
        atomic_write_json(path, out)
    except OSError as e:
        print(f"warning: cannot write the device record {path} ({e}); a login node will not find "
              "this partition's cached batch sizes", file=sys.stderr, flush=True)
        return None
    return path


def _read_record(path: Path, warn: bool = True) -> dict | None:
    try:
        rec = json.loads(path.read_text())
        if not isinstance(rec, dict) or not isinstance(rec.get("devices"), dict):
            raise ValueError("no devices")
        return rec
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        if warn:
            print(f"warning: device record {path} is corrupt ({type(e).__name__}); the discover "
                  "job will run and rewrite it", file=sys.stderr, flush=True)
        return None


def partition_target(recipe: Recipe) -> tuple[Target | None, str]:
    """The target of the device the recipe's partition gives, from its record, or (None, why)."""
    path = record_path(recipe)
    part = recipe.cluster.partition or "default"
    rec = _read_record(path)
    if rec is None:
        return None, f"no device record for partition {part} yet ({path})"
    devices = list(rec["devices"].values())
    if len(devices) != 1:
        names = ", ".join(sorted(rec["devices"]))
        return None, (f"partition {part} gave different devices ({names}); "
                      "set cluster.constraint to pin one")
    dev = devices[0]
    try:
        facts = DeviceFacts(**{k: dev[k] for k in DeviceFacts.__dataclass_fields__})
        seen = datetime.datetime.fromisoformat(dev["date"])
    except (KeyError, TypeError, ValueError):
        print(f"warning: device record {path} is corrupt (bad entry); the discover job will run",
              file=sys.stderr, flush=True)
        return None, f"device record {path} is corrupt"
    if facts.torch_version != torch.__version__:
        return None, (f"device record {path} is stale: written under torch {facts.torch_version}, "
                      f"this environment has {torch.__version__}")
    age = datetime.datetime.now(seen.tzinfo) - seen
    if age > datetime.timedelta(days=RECORD_MAX_AGE_DAYS):
        return None, f"device record {path} is stale: {age.days} days old"
    return target_of(recipe, facts), f"partition {part} gives {facts.name} ({path})"
