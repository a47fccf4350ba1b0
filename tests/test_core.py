"""CORE: upstream's prompts, scoring by models whose answers are known (an oracle that puts all
its probability on the gold continuations, a real GPT with uniform logits, a partial oracle
against a hand computation), two gloo ranks = one, bad bundles, the bundle's resumable download
from a local HTTP server, nanochat.prepare's step, and `nanochat.eval --core` on a trained
checkpoint.

The fixture bundle is in the real layout (core.yaml, eval_data/<category>/<label>.jsonl,
eval_meta_data.csv) and its tokenizer is a real nanochat Tokenizer without merges (one token per
byte). It is designed so that uniform logits score exactly the random baseline: every multiple-
choice item has 4 choices of equal length (equal token counts: the mean losses tie exactly, and
ties go to choice 0), the gold positions cycle 0, 1, 2, 3 (8 items: choice 0 is right for 1/4 of
them = the 25% baseline); schema golds alternate over 2 options (baseline 50%); a language
model's argmax under uniform logits is token 0 (byte NUL), which no continuation holds
(baseline 0%)."""
import io
import json
import random
import socket
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from core_bundle import byte_tokenizer, write_bundle
from nanochat.common import NO_DOWNLOAD_ENV, UserError, cli_main
from nanochat.config import EvalArgs
from nanochat.core_eval import (chatcore, ensure_bundle, evaluate_core, example_sequences,
                           fewshot_examples, load_bundle, load_examples, render_prompts)
from test_gpt import make_model

TOK = byte_tokenizer()

MC_ITEMS = [("The sky on a clear day is", "azure", ["green", "sandy", "black"]),
            ("Snow is usually", "white", ["brown", "ochre", "pinky"]),
            ("A lemon tastes", "sour.", ["bland", "salty", "meaty"]),
            ("Fish live in", "water", ["trees", "sands", "ovens"]),
            ("Bees make", "honey", ["glass", "steel", "paper"]),
            ("We see with our", "eyes.", ["knees", "elbow", "heels"]),
            ("Ice is frozen", "water", ["bread", "sugar", "stone"]),
            ("Cows say", "mooo!", ["quack", "oink!", "tweet"])]
MC = [{"id": i, "query": f"Question: {q}?\nAnswer:",
       "choices": (wrong[:i % 4] + [gold] + wrong[i % 4:]), "gold": i % 4}
      for i, (q, gold, wrong) in enumerate(MC_ITEMS)]
SCHEMA = [{"id": i, "context_options": [f"{a} fed {b} since {a}", f"{a} fed {b} since {b}"],
           "continuation": "was hungry.", "gold": i % 2}
          for i, (a, b) in enumerate([("Ann", "Bob"), ("Cy", "Di"), ("Ed", "Flo"), ("Gus", "Hal"),
                                      ("Ida", "Jo"), ("Kim", "Lu")])]
LM = [{"id": i, "context": f"{c}  ", "continuation": a}
      for i, (c, a) in enumerate([("The capital of France is", "Paris"), ("Two plus two is", "four"),
                                  ("The opposite of hot is", "cold"), ("Water boils at 100", "degrees"),
                                  ("A week has seven", "days"), ("The sun rises in the", "east")])]
TASKS = [{"label": "mc_demo", "kind": "multiple_choice", "rows": MC, "num_fewshot": 2, "baseline": 25},
         {"label": "schema_demo", "kind": "schema", "rows": SCHEMA, "num_fewshot": 1, "baseline": 50},
         {"label": "lm_demo", "kind": "language_modeling", "rows": LM, "num_fewshot": 1, "baseline": 0}]


@pytest.fixture
def bundle(tmp_path):
    return write_bundle(tmp_path / "src", TASKS)


def gold_sequences(bundle_dir, known=None, max_per_task=-1) -> list[list[int]]:
    """The token sequences of the gold answers as the evaluator forms them (BOS, few-shot
    examples, the item, its gold choice / gold context / continuation), for the rows whose id
    is in `known` (None: all)."""
    out = []
    for task in load_bundle(bundle_dir)[0]:
        data = load_examples(task, max_per_task)
        for i, item in enumerate(data):
            if known is not None and item["id"] not in known.get(task.label, ()):
                continue
            prompts = render_prompts(task.kind, item, task.delimiter,
                                     fewshot_examples(data, i, task.num_fewshot))
            seqs = example_sequences(task.kind, prompts, TOK)
            out.append(seqs[item.get("gold", 0)][0])
    return out


class GoldOracle(torch.nn.Module):
    """A model with the GPT's forward signature that is told the gold sequences: at a position
    whose prefix (BOS … this token) is a prefix of a gold sequence it puts logit 30 on that
    sequence's next token (softmax ≈ 1, all its probability), everywhere else all logits are 0
    (uniform). So gold continuations cost ≈ 0 nats a token and anything else log(V)."""

    def __init__(self, gold: list[list[int]], vocab: int = 300):
        super().__init__()
        self.vocab = vocab
        self.next = {tuple(s[:t]): s[t] for s in gold for t in range(1, len(s))}
        self.shapes = []  # (B, T) of every forward

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean", logits_at=None):
        B, T = idx.shape
        self.shapes.append((B, T))
        logits = torch.zeros(B, T, self.vocab)
        for b, row in enumerate(idx.tolist()):
            for t in range(T):
                nxt = self.next.get(tuple(row[:t + 1]))
                if nxt is not None:
                    logits[b, t, nxt] = 30.0
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, self.vocab), targets.reshape(-1), ignore_index=-1,
                               reduction=loss_reduction)


def uniform_gpt():
    """A real GPT whose lm_head is zero: every logit is exactly 0."""
    model = make_model(sequence_len=64)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    return model


# ---------------------------------------------------------------- prompts

def test_prompts_follow_upstreams_templates():
    shots = [{"query": "Q1", "choices": ["a", "b"], "gold": 1}, {"query": "Q2", "choices": ["c", "d"], "gold": 0}]
    assert render_prompts("multiple_choice", {"query": "Q3", "choices": ["x", "y"], "gold": 0}, " => ", shots) == \
        ["Q1 => b\n\nQ2 => c\n\nQ3 => x", "Q1 => b\n\nQ2 => c\n\nQ3 => y"]
    shots = [{"context_options": ["A1", "A2"], "continuation": "ends", "gold": 1}]
    assert render_prompts("schema", {"context_options": ["B1", "B2"], "continuation": "fin", "gold": 0}, " ", shots) == \
        ["A2 ends\n\nB1 fin", "A2 ends\n\nB2 fin"]
    shots = [{"context": "  ctx one  ", "continuation": "one"}]
    assert render_prompts("language_modeling", {"context": "ctx two \n", "continuation": "two"}, " ", shots) == \
        ["ctx one one\n\nctx two", "ctx one one\n\nctx two two"], "contexts trimmed; the prompt without stripped"
    assert render_prompts("multiple_choice", {"query": "Q", "choices": ["x"], "gold": 0}, " ", []) == ["Q x"]


def test_fewshot_draw_is_upstreams():
    data = [{"n": i} for i in range(30)]
    for idx in (0, 7, 29):
        for k in (1, 5, 10):
            others = [i for i in range(30) if i != idx]
            expect = [data[i] for i in random.Random(1234 + idx).sample(others, k)]
            assert fewshot_examples(data, idx, k) == expect
    assert sorted(d["n"] for d in fewshot_examples(data[:3], 0, 10)) == [1, 2], "capped at the others"
    assert fewshot_examples(data, 4, 0) == []


def test_sequences_mark_each_kinds_continuation():
    seqs = example_sequences("multiple_choice", ["Q: sky? A: azure", "Q: sky? A: green"], TOK)
    assert [TOK.decode(t[s:e]) for t, s, e in seqs] == ["azure", "green"]
    assert all(t[0] == TOK.bos_token_id for t, _, _ in seqs), "BOS first"
    seqs = example_sequences("schema", ["Ann ate, so she left.", "Bob ate, so she left."], TOK)
    assert [TOK.decode(t[s:e]) for t, s, e in seqs] == [" ate, so she left."] * 2, \
        "the options' common suffix in tokens"
    assert [TOK.decode(t[1:s]) for t, s, e in seqs] == ["Ann", "Bob"]
    (t, s, e), = example_sequences("language_modeling", ["The capital is", "The capital is Paris"], TOK)
    assert TOK.decode(t[s:e]) == " Paris"
    (t, s, e), = example_sequences("language_modeling", ["x" * 50, "x" * 50 + " tail"], TOK, max_len=20)
    assert len(t) == 20 and TOK.decode(t[s:e]) == " tail", "too long: the last tokens kept"


# ---------------------------------------------------------------- scoring

@pytest.mark.parametrize("batch_size,max_tokens", [(1, None), (5, None), (64, None), (64, 300)])
def test_a_model_that_knows_the_gold_continuations_scores_1_on_each_kind(bundle, batch_size, max_tokens):
    oracle = GoldOracle(gold_sequences(bundle))
    res = evaluate_core(oracle, TOK, bundle, device="cpu", batch_size=batch_size, max_tokens=max_tokens)
    if max_tokens is None:
        assert oracle.shapes[0][0] == min(batch_size, 32), "mc_demo's 32 sequences fill the batch"
    assert all(b <= batch_size and (max_tokens is None or b == 1 or b * t <= max_tokens)
               for b, t in oracle.shapes)
    assert {k: (t["kind"], t["accuracy"], t["n"]) for k, t in res["tasks"].items()} == {
        "mc_demo": ("multiple_choice", 1.0, 8), "schema_demo": ("schema", 1.0, 6),
        "lm_demo": ("language_modeling", 1.0, 6)}
    assert res["score"] == 1.0 and res["skipped"] == {}
    assert res["examples_per_s"] > 0 and res["elapsed_s"] > 0


def test_uniform_logits_score_the_random_baseline(bundle):
    res = evaluate_core(uniform_gpt(), TOK, bundle, device="cpu", batch_size=4)
    acc = {k: t["accuracy"] for k, t in res["tasks"].items()}
    assert acc == {"mc_demo": 0.25, "schema_demo": 0.5, "lm_demo": 0.0}, "exactly the baselines"
    assert all(t["centered"] == pytest.approx(0, abs=1e-12) for t in res["tasks"].values())
    assert res["score"] == pytest.approx(0, abs=1e-12)


def test_core_equals_a_hand_computation(bundle):
    """The oracle knows the gold of some rows; on the others its logits are uniform, which
    picks choice 0 (right when gold is 0) and never the LM continuation.
    mc: known {0, 1, 2} + unknown with gold 0 {4} → 4/8, centered (0.5 − 0.25)/0.75 = 1/3;
    schema: known {1} + unknown gold 0 {0, 2, 4} → 4/6, centered (2/3 − 1/2)/(1/2) = 1/3;
    lm: known {0, 3, 5} → 3/6, centered 0.5.  CORE = (1/3 + 1/3 + 1/2) / 3 = 7/18."""
    known = {"mc_demo": {0, 1, 2}, "schema_demo": {1}, "lm_demo": {0, 3, 5}}
    res = evaluate_core(GoldOracle(gold_sequences(bundle, known)), TOK, bundle, device="cpu", batch_size=7)
    t = res["tasks"]
    assert (t["mc_demo"]["accuracy"], t["schema_demo"]["accuracy"], t["lm_demo"]["accuracy"]) == (0.5, 4 / 6, 0.5)
    assert t["mc_demo"]["centered"] == pytest.approx(1 / 3) and t["schema_demo"]["centered"] == pytest.approx(1 / 3)
    assert t["lm_demo"]["centered"] == pytest.approx(0.5)
    assert res["score"] == pytest.approx(7 / 18)


def test_max_per_task_scores_the_first_n_after_a_seed_1337_shuffle(bundle):
    task = load_bundle(bundle)[0][0]
    rows = list(MC)
    random.Random(1337).shuffle(rows)
    assert load_examples(task, 3) == rows[:3] and load_examples(task) == rows
    res = evaluate_core(GoldOracle(gold_sequences(bundle, max_per_task=3)), TOK, bundle, 3, "cpu")
    assert {k: (t["n"], t["accuracy"]) for k, t in res["tasks"].items()} == \
        {"mc_demo": (3, 1.0), "schema_demo": (3, 1.0), "lm_demo": (3, 1.0)}, \
        "the oracle knows the first 3 of each shuffle (their few-shot drawn among those 3)"
    assert res["max_per_task"] == 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank, world, port, bundle, out):
    import os
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                                         rank=rank, world_size=world)
    try:
        from nanochat.runtime import DistInfo
        res = evaluate_core(make_model(seed=3, sequence_len=64), TOK, bundle, device="cpu",
                            batch_size=3, dist=DistInfo(rank, rank, world), verbose=False)
        Path(out, f"rank{rank}.json").write_text(json.dumps(res))
    finally:
        torch.distributed.destroy_process_group()


def test_a_gpt_is_scored_from_its_scored_positions_only_with_the_same_result(bundle):
    """CORE of a real GPT computes the head only at the positions it scores (never the
    batch's (B, T, V) logits: gigabytes during training at a discovered batch), and gets what
    scoring its full logits gets."""
    model = make_model(seed=3, sequence_len=64)
    head_rows = []
    model.lm_head.register_forward_hook(lambda m, i, o: head_rows.append(i[0].numel() // i[0].size(-1)))
    fast = evaluate_core(model, TOK, bundle, device="cpu", batch_size=8, verbose=False)
    scored_rows = sum(head_rows)

    def full_logits(idx):  # the plain callable path: model(idx) → (B, T, V)
        return model(idx)
    full_logits.parameters, full_logits.rotary_len = model.parameters, model.rotary_len
    head_rows.clear()
    slow = evaluate_core(full_logits, TOK, bundle, device="cpu", batch_size=8, verbose=False)
    assert fast["score"] == pytest.approx(slow["score"], abs=1e-9)
    assert {k: t["accuracy"] for k, t in fast["tasks"].items()} == \
        {k: t["accuracy"] for k, t in slow["tasks"].items()}
    assert 0 < scored_rows < sum(head_rows) / 4, (scored_rows, sum(head_rows))


def test_two_gloo_ranks_give_the_same_core_as_one(bundle, tmp_path):
    one = evaluate_core(make_model(seed=3, sequence_len=64), TOK, bundle, device="cpu", batch_size=8)
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_rank_worker, args=(r, 2, port, str(bundle), str(tmp_path)))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    assert [p.exitcode for p in procs] == [0, 0]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for res in ranks:
        assert res["score"] == pytest.approx(one["score"], abs=1e-12)
        assert {k: (t["accuracy"], t["n"]) for k, t in res["tasks"].items()} == \
            {k: (t["accuracy"], t["n"]) for k, t in one["tasks"].items()}
    assert 0 < sum(t["accuracy"] for t in one["tasks"].values()), "a random model gets some right"


def test_chatcore_is_the_mean_centered_accuracy_over_the_tasks_that_ran():
    tasks = {"arithmetic": {"accuracy": 0.5, "metric": "exact_match"},
             "choice": {"accuracy": 0.625, "metric": "multiple_choice", "chance": 0.25},
             "arc_easy": {"accuracy": 0.25, "metric": "multiple_choice", "chance": 0.25}}
    got = chatcore(tasks)
    assert got["tasks"]["choice"] == {"accuracy": 0.625, "chance": 0.25, "centered": pytest.approx(0.5)}
    assert got["score"] == pytest.approx((0.5 + 0.5 + 0.0) / 3)
    assert chatcore({}) is None


# ---------------------------------------------------------------- bad bundles

def test_bad_tasks_are_skipped_with_their_reason_and_the_rest_scores(bundle):
    import yaml
    oracle = GoldOracle(gold_sequences(bundle))
    cfg = yaml.safe_load((bundle / "core.yaml").read_text())
    cfg["icl_tasks"] += [{"label": "gone", "icl_task_type": "schema", "dataset_uri": "x/gone.jsonl", "num_fewshot": [0]},
                         {"label": "odd", "icl_task_type": "generation_task", "dataset_uri": "x/odd.jsonl"},
                         {"label": "broken", "icl_task_type": "language_modeling", "dataset_uri": "x/broken.jsonl"}]
    (bundle / "core.yaml").write_text(yaml.safe_dump(cfg))
    (bundle / "eval_data" / "x").mkdir()
    (bundle / "eval_data" / "x" / "broken.jsonl").write_text('{"context": "a", "continuation": "b"}\nnot json\n')
    with open(bundle / "eval_meta_data.csv", "a") as f:
        f.write("gone,x,schema,0,1,50,,\nodd,x,gen,0,1,0,,\nbroken,x,lm,0,1,0,,\n")
    res = evaluate_core(oracle, TOK, bundle, device="cpu")
    assert res["score"] == 1.0 and set(res["tasks"]) == {"mc_demo", "schema_demo", "lm_demo"}
    skipped = res["skipped"]
    assert set(skipped) == {"gone", "odd", "broken"}
    assert "data file" in skipped["gone"] and "x/gone.jsonl is missing" in skipped["gone"]
    assert "unknown icl_task_type 'generation_task'" in skipped["odd"] and "multiple_choice" in skipped["odd"]
    assert skipped["broken"].startswith("line 2 of ") and "broken.jsonl is not JSON" in skipped["broken"]
    assert all("\n" not in why for why in skipped.values())


@pytest.mark.parametrize("missing", ["core.yaml", "eval_meta_data.csv"])
def test_a_bundle_missing_a_file_is_one_line_naming_it(bundle, missing):
    (bundle / missing).unlink()
    with pytest.raises(UserError, match=rf"{missing} not found") as e:
        load_bundle(bundle)
    assert "\n" not in str(e.value) and str(bundle / missing) in str(e.value)


# ---------------------------------------------------------------- the bundle's download

def _zip_of(bundle: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for p in sorted(bundle.rglob("*")):
            z.write(p, Path("eval_bundle") / p.relative_to(bundle))  # one top folder, as upstream's
        z.writestr("eval_bundle/padding.bin", random.Random(0).randbytes(40_000))  # stored bulk
    return buf.getvalue()


class Server:
    """http.server in a thread serving one file with HTTP Range; `cut` bytes: the first
    response stops after that many bytes (the connection drops mid-file)."""

    def __init__(self, data: bytes, cut: int | None = None, status: int | None = None):
        self.data, self.cut, self.status, self.requests = data, cut, status, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                outer.requests.append(rng)
                if outer.status:
                    self.send_error(outer.status)
                    return
                start = int(rng.removeprefix("bytes=").rstrip("-")) if rng else 0
                body = outer.data[start:]
                if start >= len(outer.data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(outer.data)}")
                    self.end_headers()
                    return
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(outer.data) - 1}/{len(outer.data)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if outer.cut is not None and len(outer.requests) == 1:
                    self.wfile.write(body[:outer.cut])  # HTTP/1.0: the connection closes here
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/eval_bundle.zip"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def served(bundle):
    servers = []

    def serve(**kw):
        servers.append(Server(_zip_of(bundle), **kw))
        return servers[-1]
    yield serve
    for s in servers:
        s.close()


def _same_bundle(a: Path, b: Path) -> bool:
    """b holds a's files, byte for byte, plus the archive's padding.bin and .source.json."""
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    extra = sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file() and p.relative_to(b) not in files)
    return extra == [".source.json", "padding.bin"] and all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


def test_the_bundle_downloads_once_into_the_cache(bundle, served, tmp_path):
    srv = served()
    ev = EvalArgs(core=True, core_url=srv.url)
    path, how = ensure_bundle(ev, tmp_path / "cache", retries=2, backoff_s=0)
    assert path == tmp_path / "cache" / "eval_bundle" and how == f"downloaded from {srv.url}"
    assert _same_bundle(bundle, path) and (path / "padding.bin").is_file()
    assert json.loads((path / ".source.json").read_text())["source"] == srv.url
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["eval_bundle", "eval_bundle.lock"], \
        "no .part or temporary directory left"
    assert ensure_bundle(ev, tmp_path / "cache") == (path, "cached") and srv.requests == [None]
    assert evaluate_core(uniform_gpt(), TOK, path, device="cpu")["score"] == pytest.approx(0, abs=1e-12)


def test_an_interrupted_download_resumes_where_it_stopped(bundle, served, tmp_path):
    srv = served(cut=20_000)
    path, _ = ensure_bundle(EvalArgs(core=True, core_url=srv.url), tmp_path, retries=3, backoff_s=0)
    assert srv.requests == [None, "bytes=20000-"], "the second request continues at the cut"
    assert _same_bundle(bundle, path)


def test_a_partial_file_left_by_a_killed_process_is_resumed(bundle, served, tmp_path):
    srv = served()
    (tmp_path / "eval_bundle.zip.part").write_bytes(srv.data[:12_345])
    path, _ = ensure_bundle(EvalArgs(core=True, core_url=srv.url), tmp_path, retries=1)
    assert srv.requests == ["bytes=12345-"] and _same_bundle(bundle, path)


def test_a_corrupt_download_is_an_error_and_starts_over_next_time(bundle, served, tmp_path):
    srv = served()
    srv.data = b"<html>not a zip</html>"
    with pytest.raises(UserError, match="is not a zip archive"):
        ensure_bundle(EvalArgs(core=True, core_url=srv.url), tmp_path, retries=1)
    assert not (tmp_path / "eval_bundle.zip.part").exists() and not (tmp_path / "eval_bundle").exists()


def test_an_unreachable_url_is_one_line_naming_prepare_and_core_bundle(tmp_path, served):
    url = f"http://127.0.0.1:{_free_port()}/eval_bundle.zip"
    with pytest.raises(UserError) as e:
        ensure_bundle(EvalArgs(core=True, core_url=url), tmp_path, retries=2, backoff_s=0)
    msg = str(e.value)
    assert "\n" not in msg and url in msg and "2 attempt(s)" in msg
    assert "run `python -m nanochat.prepare RECIPE` on a node with internet" in msg and "eval.core_bundle" in msg
    srv = served(status=404)
    with pytest.raises(UserError, match=r"HTTP 404 .*check eval.core_url, or set eval.core_bundle"):
        ensure_bundle(EvalArgs(core=True, core_url=srv.url), tmp_path, retries=3, backoff_s=0)
    assert len(srv.requests) == 1, "a 404 is not retried"


def test_a_job_never_downloads_the_bundle(tmp_path, served, monkeypatch):
    srv = served()
    monkeypatch.setenv(NO_DOWNLOAD_ENV, "1")
    with pytest.raises(UserError, match=r"the CORE eval bundle .*eval_bundle; or set eval.core_bundle.* is "
                                        r"not prepared, and a job does not download"):
        ensure_bundle(EvalArgs(core=True, core_url=srv.url), tmp_path)
    assert srv.requests == []


def test_core_bundle_uses_a_local_directory_or_zip(bundle, tmp_path, monkeypatch):
    monkeypatch.setenv(NO_DOWNLOAD_ENV, "1")  # neither needs the network
    assert ensure_bundle(EvalArgs(core_bundle=str(bundle)), tmp_path / "c") == (bundle, "local copy")
    archive = tmp_path / "copy.zip"
    archive.write_bytes(_zip_of(bundle))
    path, how = ensure_bundle(EvalArgs(core_bundle=str(archive)), tmp_path / "c")
    assert path == tmp_path / "c" / "eval_bundle" and how.startswith("unpacked from") and _same_bundle(bundle, path)
    with pytest.raises(UserError, match="has no core.yaml"):
        ensure_bundle(EvalArgs(core_bundle=str(tmp_path)), tmp_path / "d")
    with pytest.raises(UserError, match="not found"):
        ensure_bundle(EvalArgs(core_bundle=str(tmp_path / "nope")), tmp_path / "d")


def test_prepare_fetches_the_bundle_when_eval_core_is_on(corpus, served, tmp_path, capsys):
    import shutil
    from nanochat.prepare import prepare
    from nanochat.recipe import recipe_from_dict
    srv = served()
    cache = tmp_path / "cache"
    shutil.copytree(Path(corpus["cache_dir"]) / "tokenizer", cache / "tokenizer")  # no retraining
    recipe = recipe_from_dict({**corpus["sections"], "cache_dir": str(cache), "stages": ["base"],
                               "eval": {"core": True, "core_url": srv.url}})
    prepare(recipe)
    out = capsys.readouterr().out
    assert f"prepare: CORE bundle: 3 tasks in {cache / 'eval_bundle'} (downloaded from {srv.url})" in out
    prepare(recipe)
    assert "(cached)" in capsys.readouterr().out and len(srv.requests) == 1


# ---------------------------------------------------------------- nanochat.eval --core

from test_eval import runs  # noqa: E402,F401  (the trained tiny base + sft checkpoints)
from test_cli import error_line, run_cli  # noqa: E402


def test_eval_core_writes_core_and_chatcore_into_eval_json(runs, bundle, tmp_path):
    from nanochat.eval import evaluate_checkpoint
    out = tmp_path / "e.json"
    res = evaluate_checkpoint(runs["sft"], device="cpu", out=out, overrides=[
        "eval.core=true", f"eval.core_bundle={bundle}", "eval.core_max_per_task=4",
        "eval.problems_per_task=4", "eval.hub_tasks=[]", "eval.max_new_tokens=4"])
    assert json.loads(out.read_text()) == res
    core = res["core"]
    assert set(core["tasks"]) == {"mc_demo", "schema_demo", "lm_demo"} and core["skipped"] == {}
    assert all(t["n"] == 4 and 0 <= t["accuracy"] <= 1 for t in core["tasks"].values())
    assert core["score"] == pytest.approx(sum(t["centered"] for t in core["tasks"].values()) / 3)
    assert core["bundle"] == str(bundle) and core["examples_per_s"] > 0
    cc = res["chatcore"]
    assert set(cc["tasks"]) == set(res["tasks"])
    expect = [(t["accuracy"] - t.get("chance", 0)) / (1 - t.get("chance", 0)) for t in res["tasks"].values()]
    assert cc["score"] == pytest.approx(sum(expect) / len(expect))


def test_eval_cli_core_flag_on_a_base_checkpoint(runs, bundle, tmp_path):
    out = tmp_path / "e.json"
    res = run_cli("nanochat.eval", runs["base"], "--core", f"eval.core_bundle={bundle}",
                  "--device", "cpu", "--out", out, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    written = json.loads(out.read_text())
    assert set(written["core"]["tasks"]) == {"mc_demo", "schema_demo", "lm_demo"}
    assert "chatcore" not in written, "ChatCORE is for chat checkpoints"
    assert "CORE: " in res.stdout and "mc_demo" in res.stdout


def test_an_eval_job_without_the_bundle_fails_at_once(runs, tmp_path, capsys, monkeypatch):
    from nanochat.eval import main
    monkeypatch.setenv(NO_DOWNLOAD_ENV, "1")
    assert cli_main(main, [str(runs["base"]), "--core", f"cache_dir={tmp_path}", "--device", "cpu",
                           "--out", str(tmp_path / "e.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the CORE eval bundle" in err[0] and "is not prepared" in err[0]
    assert not (tmp_path / "e.json").exists()
    assert "no checkpoint found" in error_line(run_cli("nanochat.eval", tmp_path, "--core"))


def test_core_during_training_is_logged_plotted_shown_by_status_and_timed_to_target(tiny_recipe, bundle, tmp_path):
    """train.core_every: CORE at steps 0, N, 2N… and the end, in progress.jsonl's eval records (the
    final one equals CORE of the final checkpoint scored afresh), a CORE panel in curves.png, and
    the time to a report.targets CORE in status (while it runs or after) and the report."""
    import yaml
    from matplotlib.image import imread

    from jobs.manifest import new_manifest, save_manifest
    from jobs.plan import build_plan
    from jobs.report import write_report
    from jobs.monitor import collect
    from jobs.tasks import run_task
    from nanochat.engine import load_model
    from nanochat.recipe import load_recipe, save_resolved_recipe
    from nanochat.tokenizer import Tokenizer
    from nanochat.plots import read_jsonl

    recipe_file = tmp_path / "c.yaml"
    train = {**tiny_recipe["train"], "num_iterations": 8, "eval_every": 4, "core_every": 3,
             "core_max_per_task": 4, "save_every": -1}
    recipe_file.write_text(yaml.safe_dump({
        **tiny_recipe, "name": "c", "train": train, "stages": ["base", "report"],
        "eval": {"core_bundle": str(bundle)}, "report": {"targets": {"core": -1.0}}}, sort_keys=False))
    run = tmp_path / "runs" / "c"
    recipe = load_recipe(recipe_file, [f"run_dir={run}"])
    run.mkdir(parents=True)
    save_resolved_recipe(recipe, run / "recipe.yaml")
    save_manifest(run, new_manifest(build_plan(recipe, run), "local"))
    run_task(str(run), "base", 0)

    task = run / "base" / "000"
    evals = [r for r in read_jsonl(task / "progress.jsonl") if r["event"] == "eval"]
    assert [r["step"] for r in evals if "core" in r] == [0, 3, 6, 8]
    assert [r["step"] for r in evals if "val_bpb" in r] == [0, 4, 8], "validation keeps its own cadence"
    final = evals[-1]
    assert "val_bpb" in final and isinstance(final["core"], float) and final["eval_s"] > 0
    model, _, _ = load_model(task, "cpu")
    again = evaluate_core(model, Tokenizer.load(task / "tokenizer"), bundle, 4, "cpu", verbose=False)
    assert final["core"] == pytest.approx(again["score"], abs=1e-6)
    assert imread(task / "curves.png").shape[1] > 1500, "curves.png has the CORE panel beside loss and BPB"

    # a target the first CORE (step 0) already meets, and one met later (or never)
    cores = [(r["step"], r["core"], r["train_s"]) for r in evals if "core" in r]
    later = max(c for _, c, _ in cores[1:])
    first_later = next(s for s, c, _ in cores if c >= later)
    for target, (step, train_s) in ((-1.0, (0, 0.0)),
                                    (later, next((s, t) for s, c, t in cores if s == first_later))):
        recipe_file.write_text(recipe_file.read_text().replace("core: -1.0", f"core: {target}"))
        save_resolved_recipe(load_recipe(recipe_file, [f"run_dir={run}"]), run / "recipe.yaml")
        row = next(r for r in collect(run) if r["stage"] == "base")
        assert f"core ≥ {target} at " in row["progress"] and f"(step {step})" in row["progress"], row
        report = write_report(run).read_text().split("## Time to target")[1]
        assert f"core ≥ {target}" in report and f"{train_s:.1f} s (step {step})" in report
        recipe_file.write_text(recipe_file.read_text().replace(f"core: {target}", "core: -1.0"))
