"""What a job leaves for `python jobs/status.py` to explain it with: the NCCL flight recorder's
dumps when a collective times out (the job sets the variables, status lists the files) and the
warning a job given GPUs prints when its torch sees none (the job prints it, status shows it).
Torch-free at module level: status runs on a login node.
"""
from __future__ import annotations

import os
import re
from pathlib import Path


# PyTorch's NCCL flight recorder: a ring buffer of each rank's last collectives, written to a
# file per rank when the watchdog finds a collective past the group's timeout (or another NCCL
# error) — which rank stopped where, instead of the same "Watchdog caught collective operation
# timeout" on every rank. The variables as torch reads them (torch/csrc/distributed/c10d/):
# - TORCH_NCCL_TRACE_BUFFER_SIZE: entries kept; > 0 turns the recorder on (ProcessGroupNCCL.hpp;
#   torch 2.13's FlightRecorder.hpp reads {"TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE"},
#   the first one set winning, default 2000);
# - TORCH_NCCL_DUMP_ON_TIMEOUT=1: dump on a watchdog timeout or NCCL error (ProcessGroupNCCL.cpp
#   `dumpOnTimeoutOrEx_`: default false in older releases, true in newer; the .hpp: it needs
#   TORCH_NCCL_ENABLE_MONITORING, on by default, and a buffer > 0);
# - TORCH_NCCL_DEBUG_INFO_TEMP_FILE: the dump's path prefix, the rank appended (FlightRecorder's
#   DebugInfoWriter: filename = prefix + rank; default /tmp/nccl_trace_rank_, the node's local
#   disk, gone with the node; newer releases also read TORCH_FR_DUMP_TEMP_FILE, first).
# Set explicitly, so the behaviour does not hang on the release's defaults; the prefix points into
# the task's directory (shared storage, beside its logs): <task dir>/nccl_trace_<stage>_rank_<rank>,
# read with `python -m torch.distributed.flight_recorder.fr_trace <task dir> --prefix
# nccl_trace_<stage>_rank_`. torchtitan (torchtitan/distributed/utils.py `init_distributed`)
# sets the same three, by their TORCH_FR_* names where they exist, before init_process_group.
FLIGHT_RECORDER_BUFFER = 2000   # entries per rank (torch's FlightRecorder default, when enabled)
_FLIGHT_RECORDER_NEWER = {"TORCH_NCCL_TRACE_BUFFER_SIZE": "TORCH_FR_BUFFER_SIZE",
                          "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": "TORCH_FR_DUMP_TEMP_FILE"}
_DUMP_NAME = re.compile(r"nccl_trace_([A-Za-z0-9]+)_rank_(\d+)")


def flight_recorder_prefix(task_dir: Path, stage: str) -> Path:
    """Where a task's ranks write their flight-recorder dumps: this path + the rank."""
    return Path(task_dir).absolute() / f"nccl_trace_{stage}_rank_"


def flight_recorder_env(task_dir: Path, stage: str, env=None) -> dict[str, str]:
    """The NCCL flight recorder's variables for a task (see above), each only where neither it nor
    its newer TORCH_FR_* name is set already (the user's choice stands). Set before any process
    group exists: torch reads them when a group (its watchdog) starts and when it dumps."""
    env = os.environ if env is None else env
    wanted = {"TORCH_NCCL_TRACE_BUFFER_SIZE": str(FLIGHT_RECORDER_BUFFER),
              "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
              "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": str(flight_recorder_prefix(task_dir, stage))}
    return {k: v for k, v in wanted.items() if k not in env and _FLIGHT_RECORDER_NEWER.get(k, k) not in env}


def flight_recorder_dumps(task_dir: Path) -> list[Path]:
    """The flight-recorder dumps in a task's directory (`nccl_trace_<stage>_rank_<rank>`, written by
    ranks whose collective timed out; a later attempt of the task overwrites its own rank's), in
    (stage, rank) order; [] when there are none or no such directory. Not recursive: an sft task's
    directory inside its base task's holds its own. Torch-free (jobs/monitor.py calls it)."""
    try:
        entries = list(Path(task_dir).iterdir())
    except OSError:
        return []
    found = [((m.group(1), int(m.group(2))), p) for p in entries
             if (m := _DUMP_NAME.fullmatch(p.name)) and p.is_file()]
    return [p for _, p in sorted(found)]


GPU_UNUSED = "warning: this job was given"  # the line status looks for in a job's stderr


def gpu_unused_warning(device: str, env=os.environ) -> str | None:
    """A SLURM job given GPUs whose torch sees none (a CPU build of torch in the job's venv, a
    driver it can't use) would train on the CPU, hours slower, and say so only in the report's
    hardware line. One line for the job's first lines of stderr (and status), or None. Only for
    train.device auto: a recipe that asks for the CPU gets it without a word."""
    gpus = env.get("SLURM_GPUS_ON_NODE") or env.get("SLURM_JOB_GPUS")
    if device != "auto" or not env.get("SLURM_JOB_ID") or not gpus or gpus == "0":
        return None
    from nanochat.runtime import cuda_unseen  # torch: a job imports it anyway, a login node never
    if (unseen := cuda_unseen()) is None:
        return None
    return (f"{GPU_UNUSED} GPUs ({gpus} on this node) but {unseen} sees "
            "none: it trains on the CPU; install torch built for the node's CUDA in the job's venv "
            "(cluster.setup activates it)")
