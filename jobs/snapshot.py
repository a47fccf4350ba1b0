"""Code snapshots: the code a run's jobs import, copied into the run directory at launch.

A job waits in the queue for hours; it must run the code that was launched, not whatever the
checkout holds when it starts (a `git pull`, an edit), and it must find that code wherever it was
launched from. So `jobs/launch.py` copies the code into

    RUN_DIR/code/<id>/            the snapshot: cwd and first on sys.path of every job
        PROVENANCE.json           {"commit", "dirty", "created", "source", "files", "untracked"}
        uncommitted.diff          `git diff HEAD --binary` of the copied paths, when dirty
        nanochat/ jobs/ slurm/ configs/ pyproject.toml

and the jobs import from there. `<id>` is a content address — the short commit (or "nogit") and
a hash of the copied files' paths and bytes — so launching the same code twice reuses one
snapshot. A resume reuses the run's snapshot (`run_snapshot`); only `--new-code` takes a new
one, and the queued jobs of the old launch keep reading theirs. `nanochat.common.code_provenance()` reads PROVENANCE.json back inside the jobs
(it defines the file name: nanochat never imports jobs/).

It runs on every launch, so it is cheap: the files are read once (hashed and kept in memory —
the code is a few hundred KB) and written only when no snapshot with that id exists yet.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from nanochat.common import SNAPSHOT_PROVENANCE, UserError, now_iso

REPO = Path(__file__).resolve().parent.parent
# What the jobs run: the two packages, the batch scripts and recipes they may name, and the
# project file (so the snapshot is a complete, pip-installable copy of the code).
SNAPSHOT_PATHS = ("nanochat", "jobs", "bench", "slurm", "configs", "pyproject.toml")
DIFF_FILE = "uncommitted.diff"
_ID_HASH_CHARS = 12
_COMMIT_CHARS = 10


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it; once, at import, before any thread could race
    os.umask(mask)
    return mask


_UMASK = _read_umask()


@dataclasses.dataclass
class Snapshot:
    path: Path            # the snapshot's root: the jobs' working directory, first on sys.path
    commit: str | None    # HEAD of the checkout it was copied from; None without git
    dirty: bool           # the copied files differ from `commit` (changed or untracked)
    diff: Path | None     # uncommitted.diff inside the snapshot, when dirty with a commit


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, timeout=60)


def _git_toplevel(repo: Path) -> bool:
    """Whether `repo` is the top of a git checkout (not merely inside some other repository,
    as an unpacked sdist in a project's own tree would be)."""
    try:
        res = _git(repo, "rev-parse", "--show-toplevel")
    except (OSError, subprocess.SubprocessError):
        return False  # no git installed
    return res.returncode == 0 and Path(res.stdout.decode().strip()).resolve() == repo.resolve()


def _git_files(repo: Path) -> tuple[list[str], set[str]]:
    """(every file to copy, the untracked ones among them): tracked and untracked-but-not-ignored
    files under SNAPSHOT_PATHS, as git lists them (relative, '/'-separated). One call: `-t` tags
    each name, "?" for untracked."""
    res = _git(repo, "ls-files", "-z", "-t", "--cached", "--others", "--exclude-standard", "--",
               *SNAPSHOT_PATHS)
    if res.returncode != 0:
        raise UserError(f"`git ls-files` failed in {repo}: {res.stderr.decode().strip()}; fix the "
                        "checkout, or pass --no-snapshot")
    entries = [e for e in res.stdout.decode().split("\0") if e]
    names = sorted({e[2:] for e in entries})
    return names, {e[2:] for e in entries if e.startswith("? ")}


def _walk_files(repo: Path) -> list[str]:
    """Without git (an sdist or tarball): every regular file under SNAPSHOT_PATHS but bytecode."""
    names = []
    for top in SNAPSHOT_PATHS:
        if (repo / top).is_file():
            names.append(top)
        for dirpath, dirnames, filenames in os.walk(repo / top):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            rel = Path(dirpath).relative_to(repo).as_posix()
            names += [f"{rel}/{f}" for f in filenames if not f.endswith((".pyc", ".pyo"))]
    return sorted(names)


def _read(repo: Path, names: list[str]) -> tuple[dict[str, tuple[bytes, int]], str]:
    """{name: (bytes, mode)} of the regular files among `names` (a tracked file deleted in the
    working tree, a submodule or a dangling link is skipped), and the content hash of them all."""
    files, h = {}, hashlib.sha256()
    for name in names:
        src = repo / name
        try:
            if not src.is_file():
                continue
            data, mode = src.read_bytes(), src.stat().st_mode & 0o777
        except OSError as e:
            raise UserError(f"cannot read {src} for the code snapshot: {e.strerror or e}; fix it, "
                            "or pass --no-snapshot") from None
        files[name] = (data, mode)
        # length-prefixed so that no two file sets hash alike; the executable bit counts too
        h.update(b"%d:%s\0%d\0%o\0" % (len(name.encode()), name.encode(), len(data), mode & 0o111))
        h.update(data)
    return files, h.hexdigest()[:_ID_HASH_CHARS]


def _provenance(repo: Path, untracked: set[str]) -> tuple[str | None, bool, bytes]:
    """(HEAD, dirty, the diff of the snapshot paths against HEAD) of a git checkout."""
    head = _git(repo, "rev-parse", "--verify", "-q", "HEAD")
    commit = (head.stdout.decode().strip() or None) if head.returncode == 0 else None
    if commit is None:  # a repository without commits: everything is uncommitted
        return None, True, b""
    # a plain patch whatever the user's git config says (colour, external diff tools, no a/ b/)
    diff = _git(repo, "diff", "HEAD", "--binary", "--no-color", "--no-ext-diff", "--no-textconv",
                "--src-prefix=a/", "--dst-prefix=b/", "--", *SNAPSHOT_PATHS)
    if diff.returncode != 0:
        raise UserError(f"`git diff HEAD` failed in {repo}: {diff.stderr.decode().strip()}; fix the "
                        "checkout, or pass --no-snapshot")
    return commit, bool(diff.stdout) or bool(untracked), diff.stdout


def _write_tree(tmp: Path, files: dict[str, tuple[bytes, int]], provenance: dict, diff: bytes) -> None:
    for name, (data, mode) in files.items():
        dest = tmp / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        if mode & 0o111:  # the batch scripts stay executable
            dest.chmod(dest.stat().st_mode | (mode & 0o111))
    if diff:
        (tmp / DIFF_FILE).write_bytes(diff)
    (tmp / SNAPSHOT_PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")


def _snapshot(path: Path, commit: str | None, dirty: bool) -> Snapshot:
    diff = path / DIFF_FILE
    return Snapshot(path=path, commit=commit, dirty=dirty, diff=diff if diff.is_file() else None)


def take_snapshot(run_dir: Path, repo: Path = REPO) -> Snapshot:
    """Copy the code the jobs run (SNAPSHOT_PATHS of `repo`; with git its tracked and untracked,
    not ignored files, else every file but bytecode) into `run_dir/code/<id>/`, or reuse the
    snapshot of identical code already there. Built in a temporary directory beside it and renamed
    into place, so a snapshot directory is always whole. A snapshot that cannot be written
    (read-only, disk full, a file in the way) is one UserError, with nothing left behind."""
    repo, code_dir = Path(repo).absolute(), Path(run_dir).absolute() / "code"
    if _git_toplevel(repo):
        names, untracked = _git_files(repo)
        files, digest = _read(repo, names)
        commit, dirty, diff = _provenance(repo, untracked & files.keys())
    else:
        files, digest = _read(repo, _walk_files(repo))
        commit, dirty, diff, untracked = None, False, b"", set()
    if not files:
        raise UserError(f"no code to snapshot in {repo} (none of {', '.join(SNAPSHOT_PATHS)}); "
                        "pass --no-snapshot, or launch from a full checkout")
    target = code_dir / f"{commit[:_COMMIT_CHARS] if commit else 'nogit'}-{digest}"
    if target.is_dir():  # the same code launched before (a resume, a rerun): reuse it
        return _snapshot(target, commit, dirty)

    provenance = {"commit": commit, "dirty": dirty, "created": now_iso(), "source": str(repo),
                  "files": len(files), "untracked": sorted(untracked & files.keys())}
    made_code_dir, tmp = not code_dir.exists(), None
    try:
        code_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=code_dir))
        tmp.chmod(0o777 & ~_UMASK)  # mkdtemp's 0700 would hide the code from the rest of a group
        _write_tree(tmp, files, provenance, diff)
        try:
            tmp.rename(target)
        except OSError:
            if not target.is_dir():
                raise
            # another launch of the same code renamed its copy first: use that one
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if made_code_dir:
            with contextlib.suppress(OSError):
                code_dir.rmdir()
        what = e.strerror or type(e).__name__
        if e.filename and str(e.filename) != str(code_dir):
            what += f" ({e.filename})"
        if code_dir.exists() and not code_dir.is_dir():
            what = "a file is in the way"
        raise UserError(f"cannot write the code snapshot in {code_dir}: {what}; free space or fix the "
                        "permissions there, or pass --no-snapshot to run the checkout's code") from None
    return _snapshot(target, commit, dirty)


def run_snapshot(run_dir: Path, recorded: dict | None, new_code: bool = False, repo: Path = REPO) -> Snapshot:
    """The code a launch's jobs run. A resume (`recorded`: the manifest's `code`) keeps the run's
    own snapshot, so one run's steps never come from two versions of the code unasked; with
    `new_code` (`--new-code`), or for a run that has none, a snapshot of `repo` as it is now."""
    path = (recorded or {}).get("snapshot")
    if new_code or not path:
        return take_snapshot(run_dir, repo)
    if not Path(path).is_dir():
        raise UserError(f"the run's code snapshot {path} is gone; pass --new-code to resume with this "
                        "checkout's code (recorded in the manifest)")
    return _snapshot(Path(path), recorded.get("commit"), bool(recorded.get("dirty")))
