"""What each partition's discover jobs ran on, so a login node can read the batch-size cache.

A login node usually has no GPU, yet the launcher must know whether the cache already answers
for the device the *partition* gives, or it queues a GPU job for an answer it has. So every
discover job records what it ran on — `discovery.cache_dir/devices/<partition>[+<constraint>].json`
(device name and memory, torch version, host, date) — and `partition_target(recipe)` turns that
record into the compute node's target on the login node (`nanochat.batchsize.devices.target_of`).
No record, a stale one (another torch, or older than RECORD_MAX_AGE_DAYS), a corrupt one, or a
partition that gave different devices without a `cluster.constraint` pinning one → no target,
with the reason (the dry run prints it and the discover job runs).

Partitions and constraints are SLURM's words, so the records live here, not in nanochat/.
nanochat.batchsize.devices (torch) is imported by the functions that need it: the launcher
only asks when a stage's batch size is `auto`.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import socket
import sys
from pathlib import Path

from nanochat.common import atomic_write_json, now_iso
from nanochat.config import Recipe

RECORD_MAX_AGE_DAYS = 30    # a partition's hardware changes rarely; re-check it monthly


def record_path(recipe: Recipe) -> Path:
    """Where the record of the recipe's partition lives ("default": the cluster's default
    partition, when the recipe names none)."""
    c = recipe.cluster
    name = (c.partition or "default") + (f"+{c.constraint}" if c.constraint else "")
    return Path(recipe.discovery.cache_dir) / "devices" / f"{name}.json"


def record_device(recipe: Recipe, stage: str = "base") -> Path | None:
    """Add this process's device to its partition's record (a discover job calls this). A
    record that cannot be written is a warning: discovery's answer does not depend on it."""
    from nanochat.batchsize.devices import local_facts
    path = record_path(recipe)
    facts = local_facts(recipe, stage)
    rec = _read_record(path, warn=False) or {}
    devices = rec.get("devices") if isinstance(rec.get("devices"), dict) else {}
    devices[facts.name] = {**dataclasses.asdict(facts), "host": socket.gethostname(), "date": now_iso()}
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


def partition_target(recipe: Recipe):
    """The target (nanochat.batchsize.devices.Target) of the device the recipe's partition
    gives, from its record, or (None, why)."""
    from nanochat.batchsize.devices import TORCH_VERSION, DeviceFacts, target_of
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
        facts = DeviceFacts(**{f.name: dev[f.name] for f in dataclasses.fields(DeviceFacts)})
        seen = datetime.datetime.fromisoformat(dev["date"])
    except (KeyError, TypeError, ValueError):
        print(f"warning: device record {path} is corrupt (bad entry); the discover job will run",
              file=sys.stderr, flush=True)
        return None, f"device record {path} is corrupt"
    if facts.torch_version != TORCH_VERSION:
        return None, (f"device record {path} is stale: written under torch {facts.torch_version}, "
                      f"this environment has {TORCH_VERSION}")
    age = datetime.datetime.now(seen.tzinfo) - seen
    if age > datetime.timedelta(days=RECORD_MAX_AGE_DAYS):
        return None, f"device record {path} is stale: {age.days} days old"
    return target_of(recipe, facts), f"partition {part} gives {facts.name} ({path})"
