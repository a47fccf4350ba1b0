"""Where runs and caches go: one root ($NANOCHAT_HOME) for both, and the cache paths a recipe
leaves unset, derived from its cache_dir. Split from nanochat/config.py (which re-exports these
names) because it is the recipe's one dependency on the environment. Imports no torch.

Also the node-local compile cache, the one rule for it (the launcher's jobs call
`compile_cache_env`; slurm/env.sh and slurm/torchrun.sh run `python -m nanochat.paths
compile-cache`, which prints it as shell exports):  python -m nanochat.paths compile-cache
"""
from __future__ import annotations

import getpass
import os
import shlex
import sys
import time
from pathlib import Path

OUTPUT_ROOT = "runs"        # where run directories go unless `run_dir` says otherwise ($NANOCHAT_HOME/runs when set)
HOME_ENV = "NANOCHAT_HOME"  # one root for caches (<root>/cache) and runs (<root>/runs), e.g. /scratch/$USER/nanochat


def output_root() -> str:
    """Where run directories go by default: $NANOCHAT_HOME/runs, else ./runs."""
    home = os.environ.get(HOME_ENV)
    return str(Path(home).expanduser() / OUTPUT_ROOT) if home else OUTPUT_ROOT


def home_unset_hint() -> str:
    """A clause for messages about where runs are, when NANOCHAT_HOME is unset in this shell
    (a new login shell without it turns $NANOCHAT_HOME/runs/x into /runs/x, and a launch
    quietly writes under ./runs and ./cache); "" when it is set."""
    if os.environ.get(HOME_ENV):
        return ""
    return (f"{HOME_ENV} is not set in this shell, so runs go under ./runs and caches under ./cache; "
            f"export it in your shell profile (README, step 2)")


def derive_paths(r) -> None:
    """Fill the cache paths left unset from one root: cache_dir ($NANOCHAT_HOME/cache, else
    ./cache), then data.data_dir, data.offline_cache and discovery.cache_dir under it."""
    if r.cache_dir is None:
        home = os.environ.get(HOME_ENV)
        r.cache_dir = str(Path(home).expanduser() / "cache") if home else "cache"
    root = Path(r.cache_dir)
    if r.data.data_dir is None:
        name = "offline" if r.data.source == "offline" else r.data.hub_repo.rstrip("/").split("/")[-1]
        r.data.data_dir = str(root / "data" / name)
    if r.data.offline_cache is None:
        r.data.offline_cache = str(root / "pip")
    if r.discovery.cache_dir is None:
        r.discovery.cache_dir = str(root / "batch_size")


# Triton/Inductor compile caches on node-local disk (NFS gives stale handles), one per user and
# node, kept across jobs: a requeued or later job finds its kernels compiled (minutes saved under
# max-autotune; docs/cluster-check.md measures warm vs cold). Safe under concurrent jobs: both
# caches write each entry to a temporary file and rename it into place (torch/_inductor/codecache.py
# `write_atomic`; triton/runtime/cache.py `FileCacheManager.put` uses os.replace), so a reader sees
# a whole entry or none. 0700: compiled code is executed, so nobody else may write it.
COMPILE_CACHE_ROOT_ENV = "NANOCHAT_COMPILE_CACHE_ROOT"  # node-local disk that outlives a job (not a per-job $TMPDIR)
COMPILE_CACHE_KEEP_DAYS = 14    # entries neither used nor written this long go
COMPILE_CACHE_PRUNE_EVERY_S = 86400  # ... looked for at most once a day per node (a stamp file)
PRUNE_STAMP = ".pruned"


def compile_cache_env(env=None) -> dict[str, str]:
    """The compile-cache variables for a process on this node (made 0700 and pruned now and then):
    NANOCHAT_COMPILE_CACHE, TRITON_CACHE_DIR, TORCHINDUCTOR_CACHE_DIR. Computed afresh, never
    inherited: a path from the submitting job may not exist on this node."""
    env = os.environ if env is None else env
    try:
        user = env.get("USER") or getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        user = str(os.getuid())
    root = Path(env.get(COMPILE_CACHE_ROOT_ENV) or "/tmp") / f"nanochat-compile-{user}"
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    root.chmod(0o700)
    prune_compile_cache(root)
    return {"NANOCHAT_COMPILE_CACHE": str(root), "TRITON_CACHE_DIR": str(root / "triton"),
            "TORCHINDUCTOR_CACHE_DIR": str(root / "inductor")}


def prune_compile_cache(root: Path, keep_days: float = COMPILE_CACHE_KEEP_DAYS,
                        every_s: float = COMPILE_CACHE_PRUNE_EVERY_S) -> int | None:
    """Remove cache files neither used nor written for `keep_days` (kept across jobs, the cache
    would grow without end: every recipe, torch and triton version leaves its kernels; a kernel
    still in use is compiled again, once). The walk over the whole cache runs at most once per
    `every_s` on a node — the stamp file's mtime says when it last did; it is touched before the
    walk, so jobs starting together do not all walk it. Returns how many went (None: not due)."""
    root, now = Path(root), time.time()
    stamp = root / PRUNE_STAMP
    try:
        if now - stamp.stat().st_mtime < every_s:
            return None
    except OSError:
        pass  # never pruned here
    stamp.touch()
    cutoff, removed = now - keep_days * 86400, 0
    for path in root.rglob("*"):
        try:
            st = path.lstat()
            if path.is_file() and path != stamp and max(st.st_atime, st.st_mtime) < cutoff:
                path.unlink()
                removed += 1
        except OSError:
            pass  # another job's cache entry, replaced or removed meanwhile
    return removed


def main(argv: list[str]) -> int:
    if argv != ["compile-cache"]:
        print("usage: python -m nanochat.paths compile-cache   (prints the compile cache's shell exports)",
              file=sys.stderr)
        return 2
    for k, v in compile_cache_env().items():
        print(f"export {k}={shlex.quote(v)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
