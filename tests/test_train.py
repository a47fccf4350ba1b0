"""Base training end to end on the real offline corpus: exact resume, falling BPB, run records,
profiling, batch arithmetic, and two-process (gloo) data parallel training."""
import json
import socket

import pytest
import torch
import torch.multiprocessing as mp

from nanochat import checkpoint as ckpt
from nanochat.common import UserError
from nanochat.config import TrainArgs
from nanochat.recipe import load_recipe, recipe_from_dict
from nanochat.train import train_base
from nanochat.config import grad_accum_steps
from nanochat.optim import lr_multiplier
from nanochat.plots import read_jsonl


def stop_after(n_steps):
    """A stop_requested() that asks to stop once `n_steps` optimizer steps are done."""
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > n_steps
    return stop


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_jsonl(run_dir / "progress.jsonl") if r["event"] == "train"}


def bpbs(run_dir):
    return {r["step"]: r["val_bpb"] for r in read_jsonl(run_dir / "progress.jsonl") if r["event"] == "eval"}


def with_run_dir(recipe: dict, path) -> dict:
    return {**recipe, "run_dir": str(path)}


def test_resume_is_exact(tiny_recipe, tmp_path):
    """20 steps straight == 10 steps, stop, resume, 10 steps: same losses to the last bit."""
    straight = recipe_from_dict(with_run_dir(tiny_recipe, tmp_path / "straight"))
    train_base(straight)
    split = recipe_from_dict(with_run_dir(tiny_recipe, tmp_path / "split"))
    first = train_base(split, stop_requested=stop_after(10))
    assert first.get("stopped") and ckpt.latest_checkpoint(split.out_dir).name == "step_000010"
    assert max(losses(split.out_dir)) == 9
    train_base(split)  # a fresh process would do the same: finds the checkpoint and resumes
    a, b = losses(straight.out_dir), losses(split.out_dir)
    assert list(a) == list(range(20)) and list(b) == list(range(20))
    assert a == b, "losses after resume must equal the uninterrupted run bit for bit"
    assert bpbs(straight.out_dir) == bpbs(split.out_dir)
    wa = ckpt.load_model_state(ckpt.latest_checkpoint(straight.out_dir))
    wb = ckpt.load_model_state(ckpt.latest_checkpoint(split.out_dir))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_curves_are_drawn_after_the_last_evaluation_and_at_most_once_a_minute_before(tiny_recipe, monkeypatch):
    """A run of seconds evaluating every 5 steps draws curves.png once, after its last evaluation;
    with no minimum interval it would draw after every one (a draw costs ~1 s)."""
    import nanochat.trainer as trainer
    drawn = []
    real = trainer.plot_progress
    monkeypatch.setattr(trainer, "plot_progress", lambda *a, **k: (drawn.append(a), real(*a, **k))[1])
    train_base(recipe_from_dict(tiny_recipe))
    assert len(drawn) == 1 and drawn[0][1].name == "curves.png" and drawn[0][1].exists()
    monkeypatch.setattr(trainer, "PLOT_EVERY_S", 0.0)
    drawn.clear()
    train_base(recipe_from_dict({**tiny_recipe, "run_dir": tiny_recipe["run_dir"] + "-every"}))
    assert len(drawn) == 5, "steps 0, 5, 10, 15, 20"


def test_validation_bpb_falls_and_run_dir_is_a_record(tiny_recipe):
    recipe = recipe_from_dict({**tiny_recipe, "train": {**tiny_recipe["train"], "save_every": 5,
                                                        "keep_checkpoints": 2}})
    result = train_base(recipe)
    run = recipe.out_dir
    curve = bpbs(run)
    assert list(curve) == [0, 5, 10, 15, 20]
    assert curve[20] < curve[0] - 0.5, f"val BPB should fall clearly: {curve}"
    assert result["step"] == 20 and result["val_bpb"] == curve[20]
    # the resolved recipe, loadable, with the commit; the tokenizer; run facts
    header = (run / "recipe.yaml").read_text().splitlines()[:3]
    assert any(line.startswith("# git_commit:") for line in header)
    assert load_recipe(run / "recipe.yaml") == recipe
    assert (run / "tokenizer" / "tokenizer.json").exists()
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    info = json.loads((run / "run.json").read_text())
    assert info["grad_accum"] == 2 and info["num_iterations"] == 20
    assert set(info["code"]) >= {"commit", "dirty", "snapshot"}, "which code trained it"
    # only the newest checkpoints are kept, each complete
    names = [p.name for p in ckpt.list_checkpoints(run)]
    assert names == ["step_000015", "step_000020"]
    meta = ckpt.read_meta(run / "checkpoints" / "step_000020")
    assert meta["step"] == 20 and meta["model_config"]["n_embd"] == 64 and len(meta["loader"]) == 1
    assert meta["code"] == info["code"]
    assert not list((run / "checkpoints").glob("*.tmp"))


def test_finished_run_is_not_retrained(tiny_recipe):
    recipe = recipe_from_dict({**tiny_recipe, "train": {**tiny_recipe["train"], "num_iterations": 2}})
    train_base(recipe)
    before = (recipe.out_dir / "progress.jsonl").read_text()
    assert train_base(recipe) == {"step": 2}
    assert (recipe.out_dir / "progress.jsonl").read_text() == before
    with pytest.raises(UserError, match="already holds checkpoints"):
        train_base(recipe, refuse_existing=True)


def test_resume_refuses_a_different_model(tiny_recipe):
    train_base(recipe_from_dict({**tiny_recipe, "train": {**tiny_recipe["train"], "num_iterations": 1}}))
    other = recipe_from_dict({**tiny_recipe, "model": {**tiny_recipe["model"], "depth": 3}})
    with pytest.raises(UserError, match="different model_config"):
        train_base(other)


def test_profile_steps_write_a_trace(tiny_recipe):
    recipe = recipe_from_dict({**tiny_recipe, "train": {**tiny_recipe["train"], "num_iterations": 4,
                                                        "profile_steps": [1, 3]}})
    train_base(recipe)
    trace = recipe.out_dir / "profile" / "trace_rank0_steps1-3.json"
    assert trace.exists() and "traceEvents" in trace.read_text()[:1000]


def test_batch_arithmetic_error_lists_legal_device_batch_sizes():
    assert grad_accum_steps(524288, 32, 2048, 8) == 1
    assert grad_accum_steps(524288, 16, 2048, 2) == 8
    with pytest.raises(UserError) as e:
        grad_accum_steps(524288, 27, 2048, 8)
    assert "legal device batch sizes: 1, 2, 4, 8, 16, 32" in str(e.value)
    with pytest.raises(UserError, match="not a multiple of sequence_len"):
        grad_accum_steps(1000, 1, 64, 1)


def test_lr_schedule_warmup_constant_warmdown():
    args = TrainArgs(warmup_ratio=0.1, warmdown_ratio=0.5, final_lr_frac=0.1)
    m = [lr_multiplier(s, 100, args) for s in range(101)]
    assert m[0] == pytest.approx(0.1) and m[9] == 1.0 and m[50] == 1.0
    assert m[100] == pytest.approx(0.1) and m[75] == pytest.approx(0.55)
    assert all(a >= b for a, b in zip(m[10:], m[11:]))


# ---------------------------------------------------------------- data parallel (2 ranks, gloo)

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, recipe_dict, stop_at):
    import os
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # ranks agree on a stop one step after it is asked for (trainer.StopAgreement): asking
    # after stop_at - 1 steps stops at step stop_at
    train_base(recipe_from_dict(recipe_dict),
               stop_requested=stop_after(stop_at - 1) if stop_at else (lambda: False))


def _run_ddp(recipe_dict, stop_at=None):
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, recipe_dict, stop_at)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    assert [p.exitcode for p in procs] == [0, 0]


def test_two_ranks_with_a_discovered_batch_train_as_a_fixed_batch_does(tiny_recipe, tmp_path):
    """device_batch_size auto on 2 ranks: rank 0 discovers (the other waits in the store), the
    first steps are watched (no overlap: the ranks agree on memory before any all-reduce), the
    rest overlap the all-reduce with backward — and the weights equal a run at that fixed batch,
    overlapped from its first step (nanochat/grad_sync.py)."""
    base = {**tiny_recipe, "train": {**tiny_recipe["train"], "total_batch_size": 1024,
                                     "num_iterations": 5, "eval_every": -1, "save_every": -1}}
    auto = {**base, "train": {**base["train"], "device_batch_size": "auto"},
            "discovery": {"cache_dir": str(tmp_path / "bs"), "memory_budget_gb": 2.0}}
    _run_ddp(with_run_dir(auto, tmp_path / "auto"))
    found = json.loads((tmp_path / "auto" / "run.json").read_text())["device_batch_size"]
    _run_ddp(with_run_dir({**base, "train": {**base["train"], "device_batch_size": found}}, tmp_path / "fixed"))
    memory = [r for r in read_jsonl(tmp_path / "auto" / "progress.jsonl") if r["event"] == "memory"]
    assert memory, "the discovered batch's first steps were not watched"
    assert losses(tmp_path / "auto") == losses(tmp_path / "fixed")
    wa = ckpt.load_model_state(ckpt.latest_checkpoint(tmp_path / "auto"))
    wb = ckpt.load_model_state(ckpt.latest_checkpoint(tmp_path / "fixed"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_two_ranks_stop_one_step_after_the_request_whatever_the_log_cadence(tiny_recipe, tmp_path):
    """A stop request (SLURM's warning signal) is agreed at every step boundary, not only at
    logged steps: with train_log_every = 50 the ranks still stop one step after the request,
    both at the same step, with a checkpoint there and its save time in progress.jsonl."""
    base = {**tiny_recipe, "train": {**tiny_recipe["train"], "total_batch_size": 1024,
                                     "num_iterations": 40, "eval_every": -1, "save_every": -1,
                                     "train_log_every": 50}}
    _run_ddp(with_run_dir(base, tmp_path / "run"), stop_at=4)
    assert ckpt.latest_checkpoint(tmp_path / "run").name == "step_000004"
    saves = [r for r in read_jsonl(tmp_path / "run" / "progress.jsonl") if r["event"] == "checkpoint"]
    assert [r["step"] for r in saves] == [4] and saves[0]["checkpoint_s"] > 0


def test_two_rank_data_parallel_training_resumes_exactly(tiny_recipe, tmp_path):
    """Two gloo ranks, each reading its own slice; 6 steps straight == 3 + stop + resume + 3."""
    base = {**tiny_recipe, "train": {**tiny_recipe["train"], "total_batch_size": 1024,
                                     "num_iterations": 6, "eval_every": 3, "save_every": 3}}
    _run_ddp(with_run_dir(base, tmp_path / "straight"))
    _run_ddp(with_run_dir(base, tmp_path / "split"), stop_at=3)
    assert ckpt.latest_checkpoint(tmp_path / "split").name == "step_000003"
    _run_ddp(with_run_dir(base, tmp_path / "split"))
    meta = ckpt.read_meta(ckpt.latest_checkpoint(tmp_path / "split"))
    assert meta["world_size"] == 2 and len(meta["loader"]) == 2
    assert len(losses(tmp_path / "split")) == 6
    assert losses(tmp_path / "straight") == losses(tmp_path / "split")
    assert bpbs(tmp_path / "straight") == bpbs(tmp_path / "split")
    wa = ckpt.load_model_state(ckpt.latest_checkpoint(tmp_path / "straight"))
    wb = ckpt.load_model_state(ckpt.latest_checkpoint(tmp_path / "split"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
