"""Small shared pieces: user-facing errors, atomic writes, provenance (git commit or code snapshot,
date), logging.

Everything here is free of torch so that any module (and the `jobs/` launcher, through the
recipe) can import it cheaply; the device, dtype and process group live in `nanochat/runtime.py`.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


class UserError(Exception):
    """Bad input from the user (recipe, flag, file). Printed as one line, exit code 2, no traceback.

    The message should say what was wrong, where (file, key, line) and what to do.
    """


def cli_main(fn, argv=None) -> int:
    """Run `fn(argv)` as a command-line entry point: a UserError becomes one line on stderr and
    exit code 2; anything else is a bug and keeps its traceback."""
    try:
        rc = fn(sys.argv[1:] if argv is None else argv)
        return 0 if rc is None else int(rc)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


# --------------------------------------------------------------------------------------------
# Atomic files: never leave a half-written file behind (a crash mid-write leaves only a temp file
# that is removed, and readers see either the old file or the new one).

def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ""):
    """Yield a temporary path next to `path`; on success rename it over `path`, on error delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    # mkstemp makes 0600 files; give the final file the usual umask-based mode so others on a
    # shared cluster can read data, caches and checkpoints.
    os.fchmod(fd, 0o666 & ~_UMASK)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


# --------------------------------------------------------------------------------------------
# Jobs don't download. Compute nodes often have no internet, and finding that out after hours
# in the queue is the worst time: the launcher prepares everything on the login node
# (`python -m nanochat.prepare`), and a job that finds something missing fails at once, saying so.

NO_DOWNLOAD_ENV = "NANOCHAT_NO_DOWNLOAD"  # set in every job (jobs/tasks.py)


def downloads_allowed() -> bool:
    return os.environ.get(NO_DOWNLOAD_ENV, "") not in ("1", "true", "yes")


def not_prepared(what: str) -> UserError:
    return UserError(f"{what} is not prepared, and a job does not download; run `python -m "
                     "nanochat.prepare RECIPE` on a node with internet (jobs/launch.py does before "
                     "submitting, unless --no-prepare)")


# Code provenance. `jobs/launch.py` copies the code into the run directory (jobs/snapshot.py) and
# the jobs import that copy, which has no .git: the snapshot carries what git would have said in
# this file at its root, beside the `nanochat/` package. The file format is the contract between
# the two; it is defined here because nanochat/ never imports jobs/.

SNAPSHOT_PROVENANCE = "PROVENANCE.json"  # {"commit", "dirty", "created", "source", "files", ...}


def _git_state(cwd: str | os.PathLike) -> tuple[str | None, bool]:
    """(HEAD's commit, whether tracked files differ from it) of the checkout holding `cwd`."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, timeout=5).stdout.strip()
        if not sha:
            return None, False
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha, bool(dirty)
    except (OSError, subprocess.SubprocessError):
        return None, False


def code_provenance() -> dict:
    """{"commit", "dirty", "snapshot"} of the code that runs: read from the snapshot's
    PROVENANCE.json when the imported `nanochat` package lies in a code snapshot (its parent holds
    that file; "snapshot" is that directory), else asked of git ("snapshot": None). The snapshot
    is checked first because it usually sits inside a checkout (runs/NAME/code/ID), where git
    would answer for the checkout, not for the copy."""
    root = Path(__file__).absolute().parent.parent  # absolute, not resolved: the path as imported
    try:
        info = json.loads((root / SNAPSHOT_PROVENANCE).read_text())
        return {"commit": info.get("commit"), "dirty": bool(info.get("dirty")), "snapshot": str(root)}
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as e:  # a damaged snapshot: say so rather than ask git
        return {"commit": None, "dirty": True, "snapshot": str(root),
                "error": f"{SNAPSHOT_PROVENANCE} unreadable: {e}"}
    commit, dirty = _git_state(root / "nanochat")
    return {"commit": commit, "dirty": dirty, "snapshot": None}


def git_commit(cwd: str | os.PathLike | None = None) -> str | None:
    """The commit of the code that runs (with '-dirty' when the tree has local changes): from
    code_provenance(), or from the git checkout holding `cwd` when one is given."""
    if cwd is not None:
        commit, dirty = _git_state(cwd)
    else:
        info = code_provenance()
        commit, dirty = info["commit"], info["dirty"]
    return commit + ("-dirty" if dirty else "") if commit else None


def now_iso() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def print0(*args, **kwargs) -> None:
    """print on rank 0 only."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs, flush=True)
