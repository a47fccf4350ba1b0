"""Small shared pieces: user-facing errors, atomic writes, provenance (git commit, date), logging.

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
        return 2
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


def git_commit(cwd: str | os.PathLike | None = None) -> str | None:
    """The commit of the code that runs (with '-dirty' when the tree has local changes)."""
    cwd = cwd or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, timeout=5).stdout.strip()
        if not sha:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def now_iso() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def print0(*args, **kwargs) -> None:
    """print on rank 0 only."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs, flush=True)
