"""CORE (DCLM, arXiv 2406.11794): the in-context metric the nanochat speedrun is judged by.

The bundle (`eval_bundle/`, the layout upstream nanochat downloads as eval_bundle.zip):
- `core.yaml`: `icl_tasks`, each with `label`, `icl_task_type` (multiple_choice | schema |
  language_modeling), `dataset_uri`, `num_fewshot: [n]` and `continuation_delimiter`;
- `eval_data/<dataset_uri>`: JSONL, one example a line: multiple choice {query, choices, gold},
  schema {context_options, continuation, gold}, language modelling {context, continuation};
- `eval_meta_data.csv`: columns `Eval Task` (the label) and `Random baseline` (percent).

Scoring, as upstream's `nanochat/core_eval.py` does it: a task's examples are shuffled with seed
1337 and the first `max_per_task` kept; example i gets `num_fewshot` others drawn with
random.Random(1234 + i), rendered before it ("text<delimiter>answer" blocks separated by a blank
line); every prompt is tokenized with BOS in front. Multiple choice: one sequence per choice, the
continuation is what follows the choices' common token prefix, and the choice with the lowest
mean loss over its continuation wins (first on ties). Schema: one sequence per context option,
the continuation is the options' common token suffix, lowest mean loss wins. Language
modelling: right when the model's argmax at every continuation position is the continuation's
token. accuracy → centered = (acc − 0.01·baseline) / (1 − 0.01·baseline); CORE = the mean of
the centered accuracies. Where upstream would divide by zero tokens (a choice that is a prefix
of another) the last token of the sequence is scored; a sequence longer than the model's rotary
table keeps its last tokens.

Batched: every sequence of a task on this rank, sorted by length, `batch_size` rows per forward
(right-padded with BOS: causal attention never looks at the padding). Data-parallel: rank r
scores examples r, r + world, ...; one all-reduce of the per-example results at the end.

Also here: where the bundle lives and how it gets there (`ensure_bundle`: a local copy, the
cache, or a resumable download on a login node; jobs never download), and the ChatCORE
aggregate of a chat model's task results (`chatcore`).
"""
from __future__ import annotations

import contextlib
import csv
import http.client
import json
import os
import random
import shutil
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from nanochat.common import UserError, downloads_allowed, not_prepared, now_iso, print0

KINDS = ("multiple_choice", "schema", "language_modeling")
BUNDLE_DIR = "eval_bundle"          # under cache_dir
DATA_SEED = 1337                    # shuffle before max_per_task (upstream)
FEWSHOT_SEED = 1234                 # example i draws its shots with Random(FEWSHOT_SEED + i)
REQUIRED = {"multiple_choice": ("query", "choices", "gold"),
            "schema": ("context_options", "continuation", "gold"),
            "language_modeling": ("context", "continuation")}


@dataclass(frozen=True)
class CoreTask:
    label: str
    kind: str                       # one of KINDS
    data_path: Path
    num_fewshot: int
    delimiter: str
    baseline: float                 # random baseline, percent


# --------------------------------------------------------------------------------------------
# Reading the bundle

def load_bundle(bundle_dir: str | os.PathLike) -> tuple[list[CoreTask], dict[str, str]]:
    """The bundle's tasks, and {label: why} for those that can't be scored (unknown kind, data
    file missing, no baseline). A missing or unreadable core.yaml / eval_meta_data.csv is a
    UserError naming the file."""
    bundle = Path(bundle_dir)
    config, meta = bundle / "core.yaml", bundle / "eval_meta_data.csv"
    hint = ("run `python -m nanochat.prepare RECIPE` with eval.core: true, or point "
            "eval.core_bundle at a copy of eval_bundle")
    if not config.is_file():
        raise UserError(f"{config} not found: not a CORE eval bundle; {hint}")
    import yaml
    try:
        entries = (yaml.safe_load(config.read_text()) or {}).get("icl_tasks")
    except (yaml.YAMLError, AttributeError, UnicodeDecodeError) as e:
        raise UserError(f"{config}: not a mapping with icl_tasks ({type(e).__name__}); {hint}") from None
    if not isinstance(entries, list):
        raise UserError(f"{config} has no icl_tasks list; {hint}")
    if not meta.is_file():
        raise UserError(f"{meta} not found: the bundle lacks its random baselines; {hint}")
    with open(meta, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and not {"Eval Task", "Random baseline"} <= set(rows[0]):
        raise UserError(f"{meta} lacks the columns 'Eval Task' and 'Random baseline' "
                        f"(has {', '.join(rows[0])})")
    baselines: dict[str, float] = {}
    for row in rows:
        with contextlib.suppress(TypeError, ValueError):
            baselines[row["Eval Task"].strip()] = float(row["Random baseline"])
    tasks, skipped = [], {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            skipped[f"icl_tasks[{i}]"] = f"not a mapping in {config}"
            continue
        label = str(entry.get("label") or f"icl_tasks[{i}]")
        kind, uri = entry.get("icl_task_type"), entry.get("dataset_uri")
        shots = entry.get("num_fewshot", [0])
        shots = shots[0] if isinstance(shots, list) and shots else shots
        why = None
        if kind not in KINDS:
            why = f"unknown icl_task_type {kind!r} (valid: {', '.join(KINDS)})"
        elif not uri:
            why = f"no dataset_uri in {config}"
        elif not (bundle / "eval_data" / uri).is_file():
            why = f"data file {bundle / 'eval_data' / uri} is missing"
        elif label not in baselines:
            why = f"no random baseline for it in {meta}"
        elif not isinstance(shots, int) or isinstance(shots, bool) or shots < 0:
            why = f"num_fewshot must be [n] with n ≥ 0, got {entry.get('num_fewshot')!r}"
        if why is not None:
            skipped[label] = why
            continue
        tasks.append(CoreTask(label, kind, bundle / "eval_data" / uri, shots,
                              str(entry.get("continuation_delimiter", " ")), baselines[label]))
    return tasks, skipped


def load_examples(task: CoreTask, max_per_task: int = -1) -> list[dict]:
    """The task's examples, shuffled with seed 1337, the first `max_per_task` (-1: all). A line
    that isn't an example of the task's kind raises ValueError naming the file and line."""
    data = []
    with open(task.data_path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError:
                raise ValueError(f"line {n} of {task.data_path} is not JSON") from None
            missing = [k for k in REQUIRED[task.kind] if not isinstance(item, dict) or k not in item]
            options = item.get("choices" if task.kind == "multiple_choice" else "context_options") \
                if not missing else None
            if missing or (task.kind != "language_modeling" and not (
                    isinstance(options, list) and options and isinstance(item["gold"], int)
                    and 0 <= item["gold"] < len(options))):
                what = f"lacks {', '.join(missing)}" if missing else "has no valid gold option"
                raise ValueError(f"line {n} of {task.data_path} {what} ({task.kind})")
            data.append(item)
    random.Random(DATA_SEED).shuffle(data)
    return data if max_per_task < 0 else data[:max_per_task]


# --------------------------------------------------------------------------------------------
# Prompts and sequences

def fewshot_examples(data: Sequence[dict], idx: int, k: int) -> list[dict]:
    """k examples other than data[idx], drawn with Random(1234 + idx) — the same draw as
    upstream's rng.sample over the list of the other indices, without building that list."""
    k = min(k, len(data) - 1)
    if k <= 0:
        return []
    picks = random.Random(FEWSHOT_SEED + idx).sample(range(len(data) - 1), k)
    return [data[j if j < idx else j + 1] for j in picks]


def render_prompts(kind: str, item: dict, delimiter: str, fewshot: Sequence[dict]) -> list[str]:
    """The texts to score: multiple choice one per choice, schema one per context option,
    language modelling [prompt without the continuation (stripped), prompt with it]."""
    if kind == "multiple_choice":
        shots = "".join(f"{ex['query']}{delimiter}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
        return [f"{shots}{item['query']}{delimiter}{choice}" for choice in item["choices"]]
    if kind == "schema":
        shots = "".join(f"{ex['context_options'][ex['gold']]}{delimiter}{ex['continuation']}\n\n"
                        for ex in fewshot)
        return [f"{shots}{ctx}{delimiter}{item['continuation']}" for ctx in item["context_options"]]
    if kind == "language_modeling":
        shots = "".join(f"{str(ex['context']).strip()}{delimiter}{ex['continuation']}\n\n"
                        for ex in fewshot)
        stem = f"{shots}{str(item['context']).strip()}{delimiter}"
        return [stem.strip(), f"{stem}{item['continuation']}"]
    raise ValueError(f"unknown CORE task kind {kind!r}; valid: {', '.join(KINDS)}")


def _common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    n = min(map(len, seqs))
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs[1:]):
            return i
    return n


def _common_suffix(seqs: Sequence[Sequence[int]]) -> int:
    return _common_prefix([s[::-1] for s in seqs])


def example_sequences(kind: str, prompts: list[str], tokenizer,
                      max_len: int | None = None) -> list[tuple[list[int], int, int]]:
    """(tokens, start, end) per sequence to score: tokens[start:end] is the continuation, each
    token predicted from the position before it (start ≥ 1: BOS is never scored)."""
    toks = tokenizer.encode(prompts, prepend=tokenizer.bos_token_id)
    if kind == "multiple_choice":
        start = _common_prefix(toks)
        spans = [(t, start, len(t)) for t in toks]
    elif kind == "schema":
        suffix = _common_suffix(toks)
        spans = [(t, len(t) - suffix, len(t)) for t in toks]
    else:  # the prompt without the continuation is a prefix of the one with it (or nearly)
        spans = [(toks[1], _common_prefix(toks), len(toks[1]))]
    out = []
    for t, s, e in spans:
        if max_len is not None and len(t) > max_len:
            cut = len(t) - max_len
            t, s, e = t[cut:], s - cut, e - cut
        out.append((t, max(1, min(s, e - 1)), e))
    return out


# --------------------------------------------------------------------------------------------
# Scoring

def centered(accuracy: float, baseline_percent: float) -> float:
    b = 0.01 * baseline_percent
    return (accuracy - b) / (1 - b)


@torch.inference_mode()
def score_sequences(model, seqs: Sequence[tuple[list[int], int, int]], pad_id: int, device,
                    batch_size: int, max_tokens: int | None = None) -> tuple[list[float], list[bool]]:
    """Per sequence: the mean loss over tokens[start:end], and whether the argmax at every one
    of those positions is the token. Longest first, `batch_size` sequences per forward, fewer
    where that would pass `max_tokens` padded tokens.

    A model with `hidden_states` and `logits` (nanochat.gpt.GPT) gets logits only at the scored
    positions, SCORE_CHUNK_ROWS at a time: the full (B, T, V) logits of a batch — 8.6 GB fp32 at
    batch 32, T 2048, V 32k, during training on a GPU filled to its discovered batch — are
    never made. Any other callable idx → logits (B, T, V) is scored from its logits."""
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    mean_loss, exact = [0.0] * len(seqs), [False] * len(seqs)
    b0 = 0
    while b0 < len(order):
        width = len(seqs[order[b0]][0])
        n_rows = batch_size if max_tokens is None else max(1, min(batch_size, max_tokens // width))
        rows = order[b0:b0 + n_rows]
        b0 += len(rows)
        idx = torch.full((len(rows), width), pad_id, dtype=torch.long)
        scored = torch.zeros(len(rows), width, dtype=torch.bool)  # positions that predict a continuation token
        for r, i in enumerate(rows):
            tokens, s, e = seqs[i]
            idx[r, :len(tokens)] = torch.tensor(tokens)
            scored[r, s - 1:e - 1] = True
        idx, scored = idx.to(device), scored.to(device)
        targets = torch.roll(idx, -1, dims=1)[scored]
        losses, wrong = _scored_losses(model, idx, scored, targets)
        row_of = scored.nonzero()[:, 0]
        n = scored.sum(1).float()
        loss_sum = torch.zeros(len(rows), device=device).index_add_(0, row_of, losses)
        wrong_sum = torch.zeros(len(rows), device=device).index_add_(0, row_of, wrong)
        for r, (ls, c, w) in enumerate(zip(loss_sum.tolist(), n.tolist(), wrong_sum.tolist())):
            mean_loss[rows[r]] = ls / c if c else float("inf")  # c = 0 only for an empty prompt
            exact[rows[r]] = c > 0 and w == 0
    return mean_loss, exact


SCORE_CHUNK_ROWS = 1024  # scored positions per head call: 128 MiB of fp32 logits at V = 32k


def _scored_losses(model, idx: torch.Tensor, scored: torch.Tensor, targets: torch.Tensor):
    """Cross-entropy and argmax-miss (as floats) at the scored positions, (N,) each."""
    if hasattr(model, "hidden_states") and hasattr(model, "logits"):
        h = model.hidden_states(idx)[scored]                 # (N, C): the scored positions only
        parts = [_loss_and_miss(model.logits(h[i:i + SCORE_CHUNK_ROWS]), targets[i:i + SCORE_CHUNK_ROWS])
                 for i in range(0, h.size(0), SCORE_CHUNK_ROWS)]
        if not parts:
            return torch.zeros(0, device=idx.device), torch.zeros(0, device=idx.device)
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return _loss_and_miss(model(idx)[scored], targets)


def _loss_and_miss(logits: torch.Tensor, targets: torch.Tensor):
    logits = logits.float()
    return (F.cross_entropy(logits, targets, reduction="none"),
            (logits.argmax(-1) != targets).float())


def _world(dist) -> tuple[int, int]:
    if dist is not None:
        return dist.rank, dist.world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def evaluate_core(model, tokenizer, bundle_dir: str | os.PathLike, max_per_task: int = -1,
                  device=None, batch_size: int = 32, dist=None,
                  autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
                  verbose: bool = True, max_tokens: int | None = None) -> dict:
    """CORE of `model` (a callable idx (B, T) → logits (B, T, V), e.g. nanochat.gpt.GPT; pass
    the uncompiled module: every batch has another shape) on the bundle at `bundle_dir`.

    `dist` (a nanochat.runtime.DistInfo; None: torch.distributed's group if initialized, else
    one process): every rank calls this with the same arguments and gets the same result. Runs
    under inference mode, in `autocast()` when given (training's bf16 autocast on CUDA).
    `batch_size` sequences per forward, fewer where they would pass `max_tokens` padded tokens
    (None: no cap; nanochat.eval passes batch_size × the model's sequence_len).
    Returns {"score", "tasks": {label: {"accuracy", "centered", "kind", "n", "baseline",
    "elapsed_s"}}, "skipped": {label: why}, "elapsed_s", "examples_per_s", "max_per_task"};
    "score" is None when no task could be scored."""
    t0 = time.perf_counter()
    rank, world = _world(dist)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    max_len = getattr(model, "rotary_len", None)
    tasks, skipped = load_bundle(bundle_dir)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    scored: list[tuple[CoreTask, int, float]] = []
    correct_parts = []
    try:
        for task in tasks:
            t_task = time.perf_counter()
            try:
                data = load_examples(task, max_per_task)
            except (ValueError, OSError, UnicodeDecodeError) as e:
                skipped[task.label] = str(e)
                continue
            if not data:
                skipped[task.label] = f"no examples in {task.data_path}"
                continue
            seqs, owner, golds = [], [], {}
            mine = list(range(rank, len(data), world))
            for i in mine:
                prompts = render_prompts(task.kind, data[i], task.delimiter,
                                         fewshot_examples(data, i, task.num_fewshot))
                for sq in example_sequences(task.kind, prompts, tokenizer, max_len):
                    seqs.append(sq)
                    owner.append(i)
                golds[i] = data[i].get("gold")
            with autocast() if autocast is not None else contextlib.nullcontext():
                losses, exact = score_sequences(model, seqs, tokenizer.bos_token_id, device,
                                                batch_size, max_tokens)
            correct = torch.zeros(len(data), dtype=torch.float32)
            by_example: dict[int, list[int]] = {}
            for j, i in enumerate(owner):
                by_example.setdefault(i, []).append(j)
            for i, js in by_example.items():
                if task.kind == "language_modeling":
                    correct[i] = float(exact[js[0]])
                else:
                    opts = [losses[j] for j in js]
                    correct[i] = float(opts.index(min(opts)) == golds[i])
            correct_parts.append(correct)
            scored.append((task, len(data), time.perf_counter() - t_task))
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
        if device.type == "cuda":  # CORE's many widths fragment the caching allocator: hand
            torch.cuda.empty_cache()  # the blocks back before training's next step needs them
    flat = torch.cat(correct_parts) if correct_parts else torch.zeros(0)
    if world > 1:
        flat = flat.to(device)
        torch.distributed.all_reduce(flat)
        flat = flat.cpu()
    results, offset = {}, 0
    for task, n, secs in scored:
        acc = float(flat[offset:offset + n].sum()) / n
        offset += n
        results[task.label] = {"accuracy": acc, "centered": centered(acc, task.baseline),
                               "kind": task.kind, "n": n, "baseline": task.baseline,
                               "elapsed_s": round(secs, 3)}
        if verbose:
            print0(f"core: {task.label:<32} accuracy {acc:.4f}  centered "
                   f"{results[task.label]['centered']:+.4f}  ({n} examples, {secs:.1f} s)")
    for label, why in skipped.items():
        if verbose:
            print0(f"core: skipped {label}: {why}")
    elapsed = time.perf_counter() - t0
    examples = sum(n for _, n, _ in scored)
    score = sum(r["centered"] for r in results.values()) / len(results) if results else None
    return {"score": score, "tasks": results, "skipped": skipped, "elapsed_s": round(elapsed, 3),
            "examples_per_s": round(examples / elapsed, 3) if elapsed > 0 else None,
            "max_per_task": max_per_task}


def make_core_evaluator(ev, cache_dir, tokenizer, rt, max_per_task: int) -> Callable[[torch.nn.Module], float | None]:
    """CORE during training (train.core_every): model → CORE score, on every rank together
    (data-parallel, one all-reduce), under training's autocast. The bundle is resolved now, at
    the start of the run — a job never downloads, so a missing bundle fails before step 0 with
    the one-line prepare message, not hours in. `max_per_task` subsamples as the eval stage's
    eval.core_max_per_task does (upstream trains with 500 per task)."""
    bundle = ensure_bundle(ev, cache_dir)[0]

    def core(model) -> float | None:
        return evaluate_core(model, tokenizer, bundle, max_per_task, rt.device, ev.core_batch_size,
                             dist=rt.dist, autocast=rt.autocast, verbose=False,
                             max_tokens=ev.core_batch_size * model.config.sequence_len)["score"]
    return core


def chatcore(task_results: dict[str, dict]) -> dict | None:
    """ChatCORE-style aggregate of a chat model's task results (nanochat.eval's "tasks"): per
    task centered = (accuracy − chance) / (1 − chance), chance = the task's "chance" (multiple
    choice) or 0 (exact match); the score is their mean. None without tasks."""
    tasks = {}
    for name, t in task_results.items():
        chance = float(t.get("chance", 0.0))
        tasks[name] = {"accuracy": t["accuracy"], "chance": chance,
                       "centered": (t["accuracy"] - chance) / (1 - chance) if chance < 1 else 0.0}
    if not tasks:
        return None
    return {"score": sum(t["centered"] for t in tasks.values()) / len(tasks), "tasks": tasks}


# --------------------------------------------------------------------------------------------
# Getting the bundle: a local copy, the cache, or a download (login node only)

def bundle_ready(path: Path) -> bool:
    return (path / "core.yaml").is_file()


def ensure_bundle(ev, cache_dir: str | os.PathLike, retries: int = 5, backoff_s: float = 2.0,
                  timeout_s: float = 60.0) -> tuple[Path, str]:
    """(bundle directory, how it was found) for the recipe's eval section `ev`: eval.core_bundle
    (a directory used in place, or a .zip unpacked into cache_dir/eval_bundle), else
    cache_dir/eval_bundle, downloaded from eval.core_url when missing — unless downloads are
    off (every job), which raises the one-line not-prepared error."""
    dest = Path(cache_dir) / BUNDLE_DIR
    if ev.core_bundle:
        src = Path(ev.core_bundle).expanduser()
        if src.is_dir():
            if not bundle_ready(src):
                raise UserError(f"eval.core_bundle {src} has no core.yaml: point it at the "
                                f"eval_bundle directory (core.yaml, eval_meta_data.csv, eval_data/)")
            return src, "local copy"
        if not src.is_file():
            raise UserError(f"eval.core_bundle {src} not found: a directory or .zip of eval_bundle")
        with _lock(dest):
            if bundle_ready(dest):
                return dest, "cached"
            unpack_bundle(src, dest, str(src))
        return dest, f"unpacked from {src}"
    if bundle_ready(dest):
        return dest, "cached"
    if not downloads_allowed():
        raise not_prepared(f"the CORE eval bundle ({dest}; or set eval.core_bundle to a local copy)")
    with _lock(dest):
        if bundle_ready(dest):
            return dest, "cached"
        part = dest.parent / f"{BUNDLE_DIR}.zip.part"
        download(ev.core_url, part, retries, backoff_s, timeout_s)
        try:
            unpack_bundle(part, dest, ev.core_url)
        except UserError:
            part.unlink(missing_ok=True)  # a corrupt download starts over next time
            raise
        part.unlink(missing_ok=True)
    return dest, f"downloaded from {ev.core_url}"


def _lock(dest: Path):
    from filelock import FileLock
    dest.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(dest) + ".lock")


def _unreachable(url: str, why: str, tries: int) -> UserError:
    return UserError(f"could not download the CORE eval bundle from {url} ({why}; {tries} "
                     f"attempt(s)); run `python -m nanochat.prepare RECIPE` on a node with "
                     f"internet, or set eval.core_bundle to a local copy of eval_bundle")


def download(url: str, part: Path, retries: int = 5, backoff_s: float = 2.0,
             timeout_s: float = 60.0) -> Path:
    """Download `url` into `part`, resuming what is there (HTTP Range) after an interrupted
    attempt or process; up to `retries` attempts with exponential backoff. Returns `part`."""
    part.parent.mkdir(parents=True, exist_ok=True)
    why = "no attempt"
    for attempt in range(1, retries + 1):
        have = part.stat().st_size if part.exists() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                        timeout=timeout_s) as resp:
                total = _expected_size(resp, have)
                if resp.status != 206:
                    have = 0  # the server sent the whole file
                print0(f"core bundle: downloading {url}" + (f" from byte {have:,}" if have else "")
                       + (f" ({total:,} bytes)" if total else ""))
                with open(part, "ab" if have else "wb") as f:
                    while chunk := resp.read(1 << 20):
                        f.write(chunk)
            size = part.stat().st_size
            if total is None or size == total:
                return part
            why = f"got {size:,} of {total:,} bytes"
        except _RangeMismatch as e:
            part.unlink(missing_ok=True)
            why = f"{e}; starting over"
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:  # nothing after byte `have`: complete, or a stale part
                total = _content_range_total(e.headers.get("Content-Range"))
                if total == have:
                    return part
                part.unlink(missing_ok=True)
                why = "the partial file did not match the server's; starting over"
            elif 400 <= e.code < 500 and e.code not in (408, 429):
                raise UserError(f"could not download the CORE eval bundle from {url} (HTTP "
                                f"{e.code} {e.reason}); check eval.core_url, or set "
                                f"eval.core_bundle to a local copy of eval_bundle") from None
            else:
                why = f"HTTP {e.code} {e.reason}"
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            why = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        if attempt < retries:
            wait = backoff_s * 2 ** (attempt - 1)
            print0(f"core bundle: attempt {attempt}/{retries} failed ({why}); retrying in {wait:.0f} s")
            time.sleep(wait)
    raise _unreachable(url, why, retries)


class _RangeMismatch(Exception):
    """A 206 response that does not continue the partial file."""


def _content_range_total(value: str | None) -> int | None:
    """The total of 'bytes a-b/total' or 'bytes */total'."""
    try:
        return int(value.rsplit("/", 1)[1]) if value else None
    except (ValueError, IndexError):
        return None


def _expected_size(resp, have: int) -> int | None:
    """The complete file's size from the response headers, when they say."""
    if resp.status == 206:
        start = (resp.headers.get("Content-Range") or "").removeprefix("bytes ").split("-")[0]
        if start.strip() != str(have):
            raise _RangeMismatch(f"asked for bytes {have}- but got {resp.headers.get('Content-Range')}")
        return _content_range_total(resp.headers.get("Content-Range"))
    length = resp.headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None


def unpack_bundle(archive: Path, dest: Path, source: str) -> Path:
    """Extract the zip into a temporary directory next to `dest`, find its core.yaml (at the top
    or in one top-level folder, e.g. eval_bundle/) and rename that folder to `dest` (atomic)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        try:
            with zipfile.ZipFile(archive) as z:
                for name in z.namelist():
                    if name.startswith(("/", "\\")) or ".." in Path(name).parts:
                        raise UserError(f"{source}: archive member {name!r} points outside the bundle")
                z.extractall(tmp)
        except (zipfile.BadZipFile, EOFError) as e:
            raise UserError(f"{source} is not a zip archive ({e}); the download was corrupted "
                            f"or eval.core_url/eval.core_bundle is not the CORE bundle") from None
        tops = [p for p in tmp.iterdir() if p.name != "__MACOSX"]
        root = tmp if bundle_ready(tmp) else next((p for p in tops if p.is_dir() and bundle_ready(p)), None)
        if root is None:
            raise UserError(f"{source} holds no core.yaml (at its top or in one folder): not a "
                            f"CORE eval bundle")
        (root / ".source.json").write_text(json.dumps({"source": source, "unpacked": now_iso()}) + "\n")
        if dest.exists():  # a broken leftover (no core.yaml): replace it
            shutil.rmtree(dest)
        os.rename(root, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
