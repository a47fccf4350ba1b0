"""Misbehaving scheduler commands, for the tests of jobs/scheduler.py: `scheduler_shims` puts
wrapper scripts for squeue, sacct, scancel and sbatch first on PATH. Each wraps the REAL command of the
running local SLURM (slurm/local-cluster.sh) and, as a test sets it, misbehaves as controllers
and accounting databases do on real sites:

- "fail": exits 1 with slurmctld's connection error, every call;
- "alternate": fails every other call (the first one fails), answers truly in between;
- "hang": never answers (past the kit's time-out, which the fixture sets to 2 s);
- "runaway": (sacct) every final record shows RUNNING, as when slurmdbd missed the jobs' ends;
- "late": (sbatch) submits, then never returns (a controller that took the job, whose answer was
  lost); the job is held, so that it is still queued when the launcher looks for it (on the idle
  local cluster it would otherwise start at once and fail without submitit's pickle).

Every call is recorded (`calls()`), misbehaving or not, so a test can count a refresh's calls."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ERROR = "slurm_load_jobs error: Unable to contact slurm controller (connect failure)"

SHIM = r"""#!/bin/bash
# {name}, misbehaving as {dir}/{name}.mode says (tests/scheduler_shims.py); wraps {real}
echo "{name} $*" >> "{dir}/calls.log"
mode=$(cat "{dir}/{name}.mode" 2>/dev/null)
case "$mode" in
  fail) echo "{error}" >&2; exit 1;;
  alternate)
    n=$(( $(cat "{dir}/{name}.count" 2>/dev/null || echo 0) + 1 )); echo $n > "{dir}/{name}.count"
    if (( n % 2 == 1 )); then echo "{error}" >&2; exit 1; fi;;
  hang) exec sleep 600;;
  late) "{real}" --hold "$@"; exec sleep 600;;
  runaway)
    "{real}" "$@" | sed -E 's/^([0-9_]+)\|(COMPLETED|FAILED|CANCELLED[^|]*|TIMEOUT|OUT_OF_MEMORY)(\||$)/\1|RUNNING\3/'
    exit ${{PIPESTATUS[0]}};;
esac
exec "{real}" "$@"
"""


class Shims:
    def __init__(self, root: Path):
        self.root = root

    def set(self, name: str, mode: str | None) -> None:
        """Make `name` misbehave (`mode`), or behave again (None)."""
        path = self.root / f"{name}.mode"
        path.unlink(missing_ok=True)
        (self.root / f"{name}.count").unlink(missing_ok=True)
        if mode:
            path.write_text(mode)

    def calls(self) -> list[list[str]]:
        log = self.root / "calls.log"
        return [line.split() for line in log.read_text().splitlines()] if log.exists() else []

    def forget_calls(self) -> None:
        (self.root / "calls.log").unlink(missing_ok=True)


@pytest.fixture
def scheduler_shims(slurm, tmp_path, monkeypatch):
    root = tmp_path / "shims"
    root.mkdir()
    for name in ("squeue", "sacct", "scancel", "sbatch"):
        real = shutil.which(name)
        assert real, f"{name} is not on PATH"
        (root / name).write_text(SHIM.format(name=name, dir=root, real=real, error=ERROR))
        (root / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{root}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("NANOCHAT_SCHEDULER_TIMEOUT_S", "2")
    return Shims(root)
