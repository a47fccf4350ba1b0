"""Code snapshots (jobs/snapshot.py), the provenance the jobs read back from them
(nanochat.common.code_provenance) and recipe paths made absolute at launch (nanochat.recipe).

The git cases run on a small repository made here, so they don't depend on the state of this
checkout: its `nanochat/common.py` is the real one, so the provenance a job would record can be
asked of the snapshot itself."""
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.snapshot import DIFF_FILE, take_snapshot
from nanochat.common import SNAPSHOT_PROVENANCE, UserError
from nanochat.recipe import PATH_FIELDS, SECTIONS, absolute_paths, recipe_from_dict, recipe_to_dict

REPO = Path(__file__).resolve().parents[1]
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]


def git(repo: Path, *args: str) -> str:
    return subprocess.run(GIT + list(args), cwd=repo, capture_output=True, text=True, check=True).stdout


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def repo(tmp_path) -> Path:
    """A committed checkout: the two packages (the real nanochat/common.py), a batch script,
    a recipe, pyproject.toml, a README (not code) and a .gitignore; runs/ inside it, ignored,
    as in this project."""
    root = tmp_path / "repo"
    files = {"nanochat/__init__.py": "", "nanochat/common.py": (REPO / "nanochat" / "common.py").read_text(),
             "nanochat/train.py": "STEPS = 1\n", "jobs/__init__.py": "", "jobs/tasks.py": "TASK = 1\n",
             "slurm/run.sh": "#!/bin/sh\necho hi\n", "configs/tiny.yaml": "name: tiny\n",
             "configs/old.yaml": "name: old\n", "pyproject.toml": "[project]\nname = 'x'\n",
             "README.md": "# not code\n", ".gitignore": "__pycache__/\n*.log\n/runs/\n"}
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "slurm" / "run.sh").chmod(0o755)
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "one")
    return root


def head(repo: Path) -> str:
    return git(repo, "rev-parse", "HEAD").strip()


# --------------------------------------------------------------------------------------------
# What a snapshot holds

def test_the_snapshot_holds_tracked_and_untracked_code_but_no_ignored_files(repo, tmp_path):
    (repo / "nanochat" / "new_module.py").write_text("NEW = 1\n")       # untracked, not ignored
    (repo / "nanochat" / "debug.log").write_text("ignored\n")           # ignored by *.log
    (repo / "nanochat" / "__pycache__").mkdir()
    (repo / "nanochat" / "__pycache__" / "common.cpython-311.pyc").write_bytes(b"\0")
    (repo / "configs" / "old.yaml").unlink()                              # deleted, still tracked
    snap = take_snapshot(tmp_path / "run", repo=repo)
    assert snap.path.parent == tmp_path / "run" / "code"
    assert files_under(snap.path) == {
        "nanochat/__init__.py", "nanochat/common.py", "nanochat/train.py", "nanochat/new_module.py",
        "jobs/__init__.py", "jobs/tasks.py", "slurm/run.sh", "configs/tiny.yaml", "pyproject.toml",
        SNAPSHOT_PROVENANCE, DIFF_FILE}, "tracked + untracked code, no README, no ignored files"
    assert (snap.path / "nanochat" / "new_module.py").read_text() == "NEW = 1\n"
    assert os.access(snap.path / "slurm" / "run.sh", os.X_OK), "batch scripts stay executable"
    prov = json.loads((snap.path / SNAPSHOT_PROVENANCE).read_text())
    assert prov["files"] == 9 and prov["source"] == str(repo) and prov["commit"] == head(repo)
    assert prov["untracked"] == ["nanochat/new_module.py"]
    assert [p.name for p in (tmp_path / "run" / "code").iterdir()] == [snap.path.name], "no temp dir left"
    assert re.fullmatch(rf"{head(repo)[:10]}-[0-9a-f]{{12}}", snap.path.name), snap.path.name


def test_launching_the_same_code_twice_reuses_one_snapshot(repo, tmp_path):
    first = take_snapshot(tmp_path / "run", repo=repo)
    created = (first.path / SNAPSHOT_PROVENANCE).read_text()
    second = take_snapshot(tmp_path / "run", repo=repo)
    assert second == first
    assert (second.path / SNAPSHOT_PROVENANCE).read_text() == created, "reused, not rewritten"
    assert len(list((tmp_path / "run" / "code").iterdir())) == 1


def test_an_edit_after_the_snapshot_leaves_it_alone_and_gets_a_new_one(repo, tmp_path):
    """A queued job keeps reading the launched code; a resume with new code gets its own copy."""
    old = take_snapshot(tmp_path / "run", repo=repo)
    (repo / "nanochat" / "train.py").write_text("STEPS = 2\n")  # edited in place, as an editor does
    assert (old.path / "nanochat" / "train.py").read_text() == "STEPS = 1\n"
    new = take_snapshot(tmp_path / "run", repo=repo)
    assert new.path != old.path and new.path.parent == old.path.parent
    assert (new.path / "nanochat" / "train.py").read_text() == "STEPS = 2\n"
    assert (old.path / "nanochat" / "train.py").read_text() == "STEPS = 1\n"
    git(repo, "commit", "-qam", "two")  # the same bytes at another commit: another snapshot too
    committed = take_snapshot(tmp_path / "run", repo=repo)
    assert committed.path.name.startswith(head(repo)[:10]) and committed.path != new.path


def test_a_dirty_tree_saves_its_diff_and_says_dirty(repo, tmp_path):
    clean = take_snapshot(tmp_path / "run", repo=repo)
    assert (clean.dirty, clean.diff) == (False, None) and clean.commit == head(repo)
    assert not (clean.path / DIFF_FILE).exists()
    (repo / "nanochat" / "train.py").write_text("STEPS = 3\n")
    (repo / "README.md").write_text("# edited, but not code\n")
    dirty = take_snapshot(tmp_path / "run", repo=repo)
    assert dirty.dirty and dirty.diff == dirty.path / DIFF_FILE and dirty.commit == head(repo)
    assert json.loads((dirty.path / SNAPSHOT_PROVENANCE).read_text())["dirty"] is True
    assert "README" not in dirty.diff.read_text(), "the diff covers the copied code only"
    # the commit plus the diff is the snapshot: applied to a clean clone it gives the same files
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(repo), str(clone))
    git(clone, "apply", str(dirty.diff))
    assert (clone / "nanochat" / "train.py").read_text() == (dirty.path / "nanochat" / "train.py").read_text()
    # an untracked module alone makes the copy differ from the commit as well
    git(repo, "checkout", "-q", "--", ".")
    (repo / "jobs" / "extra.py").write_text("X = 1\n")
    untracked = take_snapshot(tmp_path / "run", repo=repo)
    assert untracked.dirty and json.loads((untracked.path / SNAPSHOT_PROVENANCE).read_text())["untracked"] == \
        ["jobs/extra.py"]


def test_without_git_every_file_but_bytecode_is_copied(repo, tmp_path):
    """An sdist or tarball: no .git, so no commit; the id says so and still addresses the bytes."""
    plain = tmp_path / "plain"
    shutil.copytree(repo, plain, ignore=shutil.ignore_patterns(".git"))
    (plain / "nanochat" / "__pycache__").mkdir()
    (plain / "nanochat" / "__pycache__" / "common.cpython-311.pyc").write_bytes(b"\0")
    snap = take_snapshot(tmp_path / "run", repo=plain)
    assert (snap.commit, snap.dirty, snap.diff) == (None, False, None)
    assert snap.path.name.startswith("nogit-")
    assert "nanochat/__pycache__/common.cpython-311.pyc" not in files_under(snap.path)
    assert {"nanochat/common.py", "jobs/tasks.py", "configs/old.yaml"} <= files_under(snap.path)
    assert take_snapshot(tmp_path / "run", repo=plain) == snap


# --------------------------------------------------------------------------------------------
# Provenance inside the jobs: the snapshot has no .git

def _provenance_of(code_root: Path) -> dict:
    """code_provenance() and git_commit() as a job sees them: cwd and PYTHONPATH = code_root."""
    env = {**os.environ, "PYTHONPATH": str(code_root)}
    out = subprocess.run([sys.executable, "-c", "import json; from nanochat.common import code_provenance, "
                          "git_commit; import nanochat; print(json.dumps({**code_provenance(), "
                          "'git_commit': git_commit(), 'package': nanochat.__file__}))"],
                         cwd=code_root, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_a_job_in_the_snapshot_reports_the_snapshot_and_the_launch_commit(repo):
    """The run directory sits inside the checkout (runs/, ignored), where git would answer for the
    checkout: after a later commit there, the snapshot still reports the commit it was taken at."""
    launched = head(repo)
    snap = take_snapshot(repo / "runs" / "r", repo=repo)
    assert not (snap.path / ".git").exists()
    (repo / "nanochat" / "train.py").write_text("STEPS = 9\n")
    git(repo, "commit", "-qam", "later")
    seen = _provenance_of(snap.path)
    assert seen["package"] == str(snap.path / "nanochat" / "__init__.py"), "imports the copy"
    assert (seen["commit"], seen["dirty"], seen["snapshot"]) == (launched, False, str(snap.path))
    assert seen["git_commit"] == launched
    # from the checkout itself: git's answer, and no snapshot
    (repo / "nanochat" / "train.py").write_text("STEPS = 10\n")
    here = _provenance_of(repo)
    assert (here["commit"], here["dirty"], here["snapshot"]) == (head(repo), True, None)
    assert here["git_commit"] == head(repo) + "-dirty"


def test_a_dirty_snapshot_says_so_to_its_jobs(repo, tmp_path):
    (repo / "nanochat" / "train.py").write_text("STEPS = 4\n")
    snap = take_snapshot(tmp_path / "run", repo=repo)
    seen = _provenance_of(snap.path)
    assert seen["dirty"] is True and seen["git_commit"] == head(repo) + "-dirty"


# --------------------------------------------------------------------------------------------
# A snapshot that cannot be written: one line, nothing left behind (these fail as root too)

def _one_line_error(run_dir: Path, repo: Path) -> str:
    with pytest.raises(UserError) as e:
        take_snapshot(run_dir, repo=repo)
    msg = str(e.value)
    assert "\n" not in msg and "--no-snapshot" in msg, msg
    return msg


def test_a_file_where_the_snapshots_go_is_one_line_and_leaves_nothing(repo, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "code").write_text("a file where the snapshots go")
    assert f"{run / 'code'}: a file is in the way" in _one_line_error(run, repo)
    assert [p.name for p in run.iterdir()] == ["code"] and (run / "code").is_file()


def test_a_run_directory_under_a_file_is_one_line_and_creates_nothing(repo, tmp_path):
    (tmp_path / "afile").write_text("")
    assert "Not a directory" in _one_line_error(tmp_path / "afile" / "run", repo)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "repo"]


def test_a_write_that_fails_halfway_leaves_no_temp_dir(repo, tmp_path):
    """The disk filling up mid-copy, made real and cheap: a file-size limit (RLIMIT_FSIZE, which
    binds root too) makes the write of the one large file fail after the small ones were written."""
    (repo / "configs" / "big.yaml").write_text("# padding\n" * 10_000)  # 100 kB
    code = ("import resource, signal, sys\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (32_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))\n"
            "from pathlib import Path\n"
            "from jobs.snapshot import take_snapshot\n"
            "from nanochat.common import UserError\n"
            "try:\n"
            "    take_snapshot(Path(sys.argv[1]), repo=Path(sys.argv[2]))\n"
            "except UserError as e:\n"
            "    print(e)\n")
    run = tmp_path / "run"
    out = subprocess.run([sys.executable, "-c", code, str(run), str(repo)], cwd=REPO, capture_output=True,
                         text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    msg = out.stdout.strip()
    assert msg.startswith(f"cannot write the code snapshot in {run / 'code'}: File too large") and \
        "--no-snapshot" in msg and "\n" not in msg, msg
    assert not (run / "code").exists(), "the half-written copy and the code/ it made are gone"
    assert [p.name for p in run.iterdir()] == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_run_directory_is_one_line(repo, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o555)
    try:
        assert "Permission denied" in _one_line_error(run, repo)
        assert list(run.iterdir()) == []
    finally:
        run.chmod(0o755)


# --------------------------------------------------------------------------------------------
# Recipe paths made absolute at launch: the jobs' working directory is the snapshot

def test_absolute_paths_resolves_relative_path_fields_against_the_base(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "shards").symlink_to(tmp_path / "real")
    recipe = recipe_from_dict({
        "cache_dir": "cache", "data": {"data_dir": "shards", "offline_cache": "/abs/pip"},
        "sft": {"base_checkpoint": "runs/base", "conversation_files": ["a.jsonl", "/b.jsonl", "~/c.jsonl"]},
        "eval": {"core_bundle": "./bundle.zip"}, "discovery": {"cache_dir": "../shared/bs"},
        "grid": {"sft.base_checkpoint": ["x", "/y"], "train.seed": [1, 2]}})
    before = recipe_to_dict(recipe)
    out = absolute_paths(recipe, tmp_path)
    assert recipe_to_dict(recipe) == before, "the recipe given is not changed"
    assert out.cache_dir == str(tmp_path / "cache")
    assert out.data.data_dir == str(tmp_path / "shards"), "joined, symlinks kept as written"
    assert out.data.offline_cache == "/abs/pip", "absolute paths stay"
    assert out.sft.base_checkpoint == str(tmp_path / "runs" / "base")
    assert out.sft.conversation_files == [str(tmp_path / "a.jsonl"), "/b.jsonl",
                                          str(Path.home() / "c.jsonl")]
    assert out.eval.core_bundle == str(tmp_path / "bundle.zip")
    assert out.discovery.cache_dir == str(tmp_path / ".." / "shared" / "bs")
    assert (out.run_dir, out.kv_bench.checkpoint) == (None, None), "None stays None (chosen later)"
    assert out.grid == {"sft.base_checkpoint": [str(tmp_path / "x"), "/y"], "train.seed": [1, 2]}
    assert recipe_from_dict(recipe_to_dict(out)) == out, "still a valid recipe"
    assert absolute_paths(out, "/elsewhere") == out, "idempotent"


PATH_LIKE = re.compile(r"(_dir|_dirs|_cache|_checkpoint|_bundle|_path|_paths|_file|_files)$|^(checkpoint|path)$")


def test_every_path_field_of_the_recipe_is_listed_in_PATH_FIELDS():
    """A new path-valued field (named like one) that is not listed would keep meaning "relative
    to the job's working directory" — the snapshot — instead of the launch directory."""
    found = set()
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if not dataclasses.is_dataclass(f.type) and f.name not in SECTIONS and PATH_LIKE.search(f.name):
                found.add(f"{section}.{f.name}" if section else f.name)
    missing = found - set(PATH_FIELDS)
    assert not missing, f"add to nanochat.recipe.PATH_FIELDS (or rename): {sorted(missing)}"
    real = {f"{s}.{f.name}" if s else f.name for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    assert set(PATH_FIELDS) <= real, f"PATH_FIELDS names no such field: {sorted(set(PATH_FIELDS) - real)}"
