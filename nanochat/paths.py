"""Where runs and caches go: one root ($NANOCHAT_HOME) for both, and the cache paths a recipe
leaves unset, derived from its cache_dir. Split from nanochat/config.py (which re-exports these
names) because it is the recipe's one dependency on the environment. Imports no torch.
"""
from __future__ import annotations

import os
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
