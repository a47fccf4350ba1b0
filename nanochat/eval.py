"""Evaluate a checkpoint:  python -m nanochat.eval CHECKPOINT [--recipe RECIPE] [key=value ...]
                                                  [--core] [--out FILE] [--device auto|cpu|cuda]

CHECKPOINT is a run directory (its newest checkpoint) or a `checkpoints/step_NNNNNN` directory;
the tokenizer is the run's own (`RUN_DIR/tokenizer`) and the settings are the checkpoint's recipe
(meta.json), or `--recipe`, with `key=value` overrides on top (e.g. eval.problems_per_task=20).

- every checkpoint: `val_bpb` on the pretraining validation shard, when data.data_dir holds it;
- chat (stage "sft") checkpoints also get the task suite: `eval.problems_per_task` held-out
  generated problems per kind (nanochat/data/problems.py; never in the SFT data), and the hub tasks of
  `eval.hub_tasks` when the hub answers (otherwise listed under "skipped", never fatal).
  Exact-match tasks are answered by greedy generation; multiple choice by the letter whose token
  has the highest logit at the first assistant position (no generation). Their ChatCORE-style
  aggregate goes to "chatcore": the mean over the tasks that ran of (accuracy − chance) /
  (1 − chance), chance = 1/options for multiple choice, 0 for exact match;
- with `--core` (= eval.core=true) any checkpoint also gets CORE (nanochat/core_eval.py): DCLM's
  in-context tasks from the bundle `nanochat.prepare` fetched (or eval.core_bundle),
  eval.core_max_per_task examples per task.

The result is printed and written atomically to RUN_DIR/eval.json (or --out):
    {"checkpoint", "stage", "step", "device", "elapsed_s", "val_bpb",
     "tasks": {task: {"metric", "accuracy", "correct", "total", "source", ["chance"]}},
     "skipped": {task: reason},          (also "val_bpb": reason when the shards are missing)
     ["chatcore": {"score", "tasks": {task: {"accuracy", "chance", "centered"}}}],   (sft)
     ["core": {"score", "tasks": {label: {"accuracy", "centered", "kind", "n", ...}},
               "skipped": {label: reason}, "elapsed_s", "examples_per_s", "bundle", ...]}
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Sequence

import torch

from nanochat import checkpoint as ckpt
from nanochat.data import problems as generated
from nanochat.logfmt import write_stage_records
from nanochat.common import UserError, atomic_write_json, cli_main, downloads_allowed, print0
from nanochat.config import EvalArgs, Recipe
from nanochat.core_eval import chatcore, ensure_bundle, evaluate_core
from nanochat.data.shards import list_shards, split_shards
from nanochat.engine import Engine, cast_for_inference, load_model
from nanochat.loss_eval import make_bpb_evaluator
from nanochat.recipe import load_recipe, override_recipe
from nanochat.runtime import DistInfo, Runtime, compute_dtype, pick_device
from nanochat.tokenizer import Tokenizer
from nanochat.data.problems import Problem, final_number, hub_unreachable, load_hub_problems

EVAL_FILE = "eval.json"


# --------------------------------------------------------------------------------------------
# Scoring: pure functions of problems and answers.

def normalize_whitespace(text: str | None) -> str | None:
    return None if text is None else " ".join(text.split())




def _score(correct: int, total: int, metric: str) -> dict:
    return {"metric": metric, "accuracy": correct / total if total else 0.0,
            "correct": correct, "total": total}


def score_exact(problems: Sequence[Problem], completions: Sequence[str | None],
                extract=normalize_whitespace, metric: str = "exact_match") -> dict:
    """A completion is right when extract(completion) == extract(answer); None (no completion,
    e.g. a prompt too long for the model) is wrong."""
    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
    correct = sum(c is not None and extract(c) is not None and extract(c) == extract(p.answer)
                  for p, c in zip(problems, completions))
    return _score(correct, len(problems), metric)


def score_choice(problems: Sequence[Problem], picked: Sequence[str | None]) -> dict:
    """Multiple choice: picked letters against the answers; `chance` is the expected accuracy of
    uniform guessing (1 / number of options, averaged)."""
    if len(problems) != len(picked):
        raise ValueError(f"{len(problems)} problems but {len(picked)} picks")
    correct = sum(l == p.answer for p, l in zip(problems, picked))
    out = _score(correct, len(problems), "multiple_choice")
    out["chance"] = sum(1 / len(p.choices) for p in problems) / len(problems) if problems else 0.0
    return out


# --------------------------------------------------------------------------------------------
# Answering: generation for exact match, the letter logits for multiple choice.

def _prompts(tokenizer, problems: Sequence[Problem]) -> list[list[int]]:
    return [tokenizer.render_for_completion(generated.problem_conversation(p)) for p in problems]


def generate_answers(engine, tokenizer, problems: Sequence[Problem], batch_size: int,
                     max_new_tokens: int) -> list[str | None]:
    """Greedy replies, `batch_size` prompts at a time, each ending at <|assistant_end|> (or
    <|bos|>). A prompt longer than the model's context gets None (scored wrong)."""
    ctx = engine.config.sequence_len
    stop = [tokenizer.encode_special("<|assistant_end|>"), tokenizer.bos_token_id]
    prompts = _prompts(tokenizer, problems)
    out: list[str | None] = [None] * len(prompts)
    fits = [i for i, p in enumerate(prompts) if len(p) <= ctx]
    for start in range(0, len(fits), batch_size):
        rows = fits[start:start + batch_size]
        batch = [prompts[i] for i in rows]
        new = min(max_new_tokens, engine.model.rotary_len - max(map(len, batch)))
        for i, ids in zip(rows, engine.generate_batch(batch, max_new_tokens=new, temperature=0,
                                                      stop_tokens=stop)):
            out[i] = tokenizer.decode(ids)
    _warn_long(problems, len(prompts) - len(fits), ctx)
    return out


@torch.inference_mode()
def pick_letters(model, tokenizer, problems: Sequence[Problem], batch_size: int) -> list[str | None]:
    """For each multiple-choice problem, the option letter whose token the model rates highest
    right after <|assistant_start|> (one forward pass per batch; nanochat's categorical eval)."""
    letter_ids = []
    for letter in generated.LETTERS:
        ids = tokenizer.encode(letter)
        assert len(ids) == 1, f"letter {letter} is {len(ids)} tokens"  # byte-level BPE: 1 byte = 1 token
        letter_ids.append(ids[0])
    ctx = model.config.sequence_len
    device = model.lm_head.weight.device
    prompts = _prompts(tokenizer, problems)
    out: list[str | None] = [None] * len(prompts)
    fits = [i for i, p in enumerate(prompts) if len(p) <= ctx]
    for start in range(0, len(fits), batch_size):
        rows = fits[start:start + batch_size]
        lens = torch.tensor([len(prompts[i]) for i in rows])
        idx = torch.zeros(len(rows), int(lens.max()), dtype=torch.long)
        for r, i in enumerate(rows):  # right-padded: causal attention keeps padding unseen
            idx[r, :len(prompts[i])] = torch.tensor(prompts[i])
        logits = model(idx.to(device), logits_at=(lens - 1).to(device))[:, 0].float().cpu()
        for r, i in enumerate(rows):
            k = len(problems[i].choices)
            out[i] = generated.LETTERS[int(logits[r, letter_ids[:k]].argmax())]
    _warn_long(problems, len(prompts) - len(fits), ctx)
    return out


def _warn_long(problems, n_long: int, ctx: int) -> None:
    if n_long:
        print0(f"eval: {n_long} {problems[0].kind} prompts are longer than the model's context "
               f"({ctx} tokens) and count as wrong")


# --------------------------------------------------------------------------------------------
# Hub tasks

def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


# --------------------------------------------------------------------------------------------

def _bpb(model, tokenizer, recipe: Recipe, run_dir: Path, device, dtype) -> tuple[float | None, str | None]:
    """(val_bpb, None), or (None, why not) when the validation shard isn't there."""
    try:
        _, val = split_shards(list_shards(recipe.data.data_dir))
    except UserError as e:
        return None, str(e)
    # The training batch fits in memory with gradients, so it fits here; "auto" was resolved
    # at training time and recorded in run.json.
    batch = recipe.train.device_batch_size
    if not isinstance(batch, int):
        try:
            batch = int(json.loads((run_dir / "run.json").read_text())["device_batch_size"])
        except (OSError, ValueError, KeyError, TypeError):
            batch = 1
    rt = Runtime(DistInfo(), device, dtype)
    evaluate = make_bpb_evaluator(val, tokenizer, rt, batch, model.config.sequence_len,
                                  recipe.train.eval_tokens)
    with torch.inference_mode(), rt.autocast():  # as the training loop evaluates (trainer._evaluate)
        return evaluate(model)["val_bpb"], None


def _checkpoint_recipe(meta: dict, step_dir: Path, recipe: Recipe | None,
                       overrides: Sequence[str] = ()) -> Recipe:
    if recipe is not None and not overrides:
        return recipe
    if recipe is not None:
        base = dataclasses.asdict(recipe)
    elif isinstance(meta.get("recipe"), dict):
        base = meta["recipe"]
    else:
        raise UserError(f"{step_dir}/meta.json holds no recipe; pass --recipe RECIPE")
    try:
        return override_recipe(base, list(overrides))
    except UserError as e:
        if recipe is not None or overrides:
            raise
        raise UserError(f"the recipe in {step_dir}/meta.json no longer loads ({e}); pass "
                        f"--recipe RECIPE") from None


def run_task(name: str, problems: Sequence[Problem], engine, tokenizer, ev: EvalArgs) -> dict:
    """Answer and score one task: multiple choice by letter logits, the rest by generation."""
    if problems and problems[0].choices is not None:
        return score_choice(problems, pick_letters(engine.model, tokenizer, problems, ev.batch_size))
    answers = generate_answers(engine, tokenizer, problems, ev.batch_size, ev.max_new_tokens)
    if name == "gsm8k":
        return score_exact(problems, answers, final_number, "final_number")
    return score_exact(problems, answers)


def evaluate_checkpoint(path: str | Path, recipe: Recipe | None = None, device: str = "auto",
                        out: str | Path | None = None, overrides: Sequence[str] = ()) -> dict:
    """Evaluate the checkpoint at `path` (see the module docstring); write and return the result."""
    t0 = time.perf_counter()
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is visible; use --device auto")
    dev = torch.device(pick_device(device))
    step_dir = ckpt.resolve_checkpoint(path)
    # the recipe first: a bad override fails before the weights are read
    meta = ckpt.read_meta(step_dir)
    recipe = _checkpoint_recipe(meta, step_dir, recipe, overrides)
    # then the CORE bundle: a job without it fails before the weights are read
    bundle = ensure_bundle(recipe.eval, recipe.cache_dir)[0] if recipe.eval.core else None
    dtype = compute_dtype(dev, recipe.train.dtype)
    # fp32 weights under training's autocast for val_bpb — the number the training curve shows
    # for the same checkpoint; then cast for generation (bf16 on CUDA halves decode's bytes)
    model, meta, step_dir = load_model(step_dir, dev, torch.float32)
    run_dir = ckpt.run_dir_of(step_dir)
    tokenizer = Tokenizer.load(run_dir / "tokenizer")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(f"the tokenizer in {run_dir}/tokenizer has {tokenizer.vocab_size} tokens, "
                        f"more than the model's {model.config.vocab_size}: not from the same run")
    ev, stage = recipe.eval, meta.get("stage", "base")
    skipped: dict[str, str] = {}
    results: dict[str, dict] = {}

    val_bpb, why = _bpb(model, tokenizer, recipe, run_dir, dev, dtype)
    if why is not None:
        skipped["val_bpb"] = why
    core = None
    if bundle is not None:  # before the cast too: fp32 weights under autocast, as training's CORE curve
        core = {**evaluate_core(
            model, tokenizer, bundle, ev.core_max_per_task, dev, ev.core_batch_size,
            max_tokens=ev.core_batch_size * model.config.sequence_len,
            autocast=Runtime(DistInfo(), dev, dtype).autocast), "bundle": str(bundle)}
    if dtype != torch.float32:  # loaded in fp32 above
        model = cast_for_inference(model, dtype)
    if stage == "sft":
        engine = Engine(model)
        words = generated.load_words(offline_cache=recipe.data.offline_cache,
                                 package=recipe.sft.offline_package)
        for kind in generated.KINDS:
            problems = generated.generate_problems(kind, ev.problems_per_task, "eval",
                                               generated.TASK_SEED, words)
            results[kind] = {**run_task(kind, problems, engine, tokenizer, ev), "source": "generated"}
        # a job reads the hub tasks from the datasets cache nanochat.prepare filled (offline)
        offline = hub_unreachable() if ev.hub_tasks and downloads_allowed() else None
        for name in ev.hub_tasks:
            if offline is not None:
                skipped[name] = f"could not load from the hub ({offline})"
                continue
            try:
                problems = load_hub_problems(name, ev.hub_problems)
            except Exception as e:  # offline, no such dataset, HTTP errors: recorded, never fatal
                hint = "" if downloads_allowed() else \
                    "; not prepared: run `python -m nanochat.prepare RECIPE` where the hub answers"
                skipped[name] = f"could not load from the hub ({_first_line(e)}){hint}"
                continue
            results[name] = {**run_task(name, problems, engine, tokenizer, ev), "source": "hub"}
    else:
        print0(f"eval: {step_dir} is a {stage} checkpoint; the task suite runs on chat (sft) "
               f"checkpoints only")

    result = {"checkpoint": str(step_dir), "stage": stage, "step": meta.get("step"),
              "device": str(dev), "elapsed_s": None, "val_bpb": val_bpb, "tasks": results,
              "skipped": skipped}
    if stage == "sft":
        result["chatcore"] = chatcore(results)
    if core is not None:
        result["core"] = core
    result["elapsed_s"] = round(time.perf_counter() - t0, 2)
    dest = Path(out) if out is not None else run_dir / EVAL_FILE
    atomic_write_json(dest, result)
    if out is None:  # the task directory's record, in upstream's grammar too (nanochat/logfmt.py)
        write_stage_records(run_dir, "eval", [stage_summary(result)])
    print0(format_table(result) + f"\nwritten to {dest}")
    return result


def stage_summary(result: dict) -> dict:
    """eval.json as upstream's chat_eval `summary` (scripts/chat_eval.py: source, step, one
    accuracy per task, chatcore) plus the base metrics it also holds (val_bpb, core)."""
    rec = {"event": "summary", "source": result["stage"], "step": result["step"]}
    if result.get("val_bpb") is not None:
        rec["val_bpb"] = round(result["val_bpb"], 6)
    if isinstance(result.get("core"), dict) and result["core"].get("score") is not None:
        rec["core"] = round(result["core"]["score"], 6)
    rec.update({name: round(t["accuracy"], 6) for name, t in result["tasks"].items()})
    if isinstance(result.get("chatcore"), dict) and result["chatcore"].get("score") is not None:
        rec["chatcore"] = round(result["chatcore"]["score"], 6)
    return rec


def format_table(result: dict) -> str:
    lines = [f"eval of {result['checkpoint']} (stage {result['stage']}, step {result['step']}) "
             f"on {result['device']} in {result['elapsed_s']:.1f} s",
             f"val_bpb: {'-' if result['val_bpb'] is None else format(result['val_bpb'], '.4f')}"]
    if result["tasks"]:
        lines.append(f"{'task':<14} {'source':<10} {'metric':<16} {'correct':>9} "
                     f"{'accuracy':>8} {'chance':>6}")
        for name, t in result["tasks"].items():
            chance = f"{t['chance']:.2f}" if "chance" in t else ""
            right = f"{t['correct']}/{t['total']}"
            lines.append(f"{name:<14} {t['source']:<10} {t['metric']:<16} {right:>9} "
                         f"{t['accuracy']:>8.3f} {chance:>6}".rstrip())
    for name, why in result["skipped"].items():
        lines.append(f"skipped {name}: {why}")
    if result.get("chatcore"):
        lines.append(f"ChatCORE: {result['chatcore']['score']:.4f} (mean centered accuracy of "
                     f"{len(result['chatcore']['tasks'])} tasks)")
    core = result.get("core")
    if core:
        lines.append(f"{'CORE task':<32} {'kind':<18} {'n':>6} {'accuracy':>8} {'centered':>8}")
        for label, t in core["tasks"].items():
            lines.append(f"{label:<32} {t['kind']:<18} {t['n']:>6} {t['accuracy']:>8.4f} "
                         f"{t['centered']:>8.4f}")
        for label, why in core["skipped"].items():
            lines.append(f"skipped CORE task {label}: {why}")
        score = "-" if core["score"] is None else f"{core['score']:.4f}"
        lines.append(f"CORE: {score} ({len(core['tasks'])} tasks, {core['elapsed_s']:.1f} s, "
                     f"{core['examples_per_s'] or 0:.1f} examples/s)")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m nanochat.eval", description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="run directory or RUN_DIR/checkpoints/step_NNNNNN")
    ap.add_argument("overrides", nargs="*", metavar="section.key=value",
                    help="recipe overrides, e.g. eval.problems_per_task=20")
    ap.add_argument("--recipe", help="YAML recipe to use instead of the checkpoint's own")
    ap.add_argument("--out", help=f"where to write the JSON result (default RUN_DIR/{EVAL_FILE})")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    ap.add_argument("--core", action="store_true",
                    help="also score CORE (the same as eval.core=true)")
    args = ap.parse_intermixed_args(argv)
    if args.core:
        args.overrides = [*args.overrides, "eval.core=true"]
    recipe = None
    if args.recipe is not None:
        recipe = load_recipe(args.recipe, args.overrides)
    result = evaluate_checkpoint(args.checkpoint, recipe, args.device, args.out,
                                 overrides=() if recipe is not None else args.overrides)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(cli_main(main))
