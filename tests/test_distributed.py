"""Two gloo ranks (spawned processes, real torch.distributed): gradients averaged during backward
(DDP) equal the plain all-reduce after backward bit for bit; a rank that compiles past the
collective timeout still trains and agrees; local rank 0's slow preparation and rank 0's
discovery answer wait in the store, not in a collective; a dead rank, an unresolvable
MASTER_ADDR and mismatched world sizes are one line naming rank and host, never a hang."""
import datetime
import faulthandler
import json
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

from nanochat import checkpoint as ckpt
from nanochat import rendezvous
from nanochat.common import UserError
from nanochat.config import Recipe
from nanochat.grad_sync import (clear_to_none, ddp_of, finish_step_sync, injected_delay,
                                no_forward_buffer_sync, training_model)
from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import OptimArgs, build_optimizers, optimizer_step
from nanochat.recipe import recipe_from_dict
from nanochat.runtime import DistInfo, Runtime, teardown_runtime
from nanochat.trainer import _micro_steps

SHORT_TIMEOUT_MIN = 3 / 60   # the collective timeout in these tests: 3 s


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(target, args_for_rank, world=2, timeout=240):
    """Run target(rank, *args) in `world` spawned processes; returns their exit codes."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=(r, *args_for_rank(r))) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
    return [p.exitcode for p in procs]


def _join(rank, port, world=2, timeout_min=SHORT_TIMEOUT_MIN):
    # a worker still alive near _spawn's timeout prints where it is (stderr, in the test's log)
    faulthandler.dump_traceback_later(200, exit=True)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    rendezvous.join(rank, world, "gloo", timeout_min)


def _leave():
    """The product's teardown (DDP wrappers collected first, then the group, then the store)."""
    teardown_runtime(Runtime(DistInfo(0, 0, 2), torch.device("cpu"), torch.float32))


def _write(out_dir, rank, rec):
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(rec, f)


def _read(out_dir, world=2):
    return [json.loads(open(os.path.join(out_dir, f"rank{r}.json")).read()) for r in range(world)]


# ---------------------------------------------------------------- overlap == sync after backward

class _Batches:
    """Each rank's own deterministic token batches (a real iterator with state_dict)."""

    def __init__(self, rank, vocab, B=4, T=32):
        self.g = torch.Generator().manual_seed(1000 + rank)
        self.vocab, self.B, self.T, self.n = vocab, B, T, 0

    def state_dict(self):
        return {"n": self.n}

    def __next__(self):
        self.n += 1
        t = torch.randint(0, self.vocab, (self.B, self.T + 1), generator=self.g)
        return t[:, :-1], t[:, 1:]


def _joined_model(rank, port, compile_=False, overlap=True):
    """Join the 2-rank group; the same small GPT and optimizers on both ranks, and the module
    the loop steps (DDP when overlap)."""
    from nanochat.config import TrainArgs
    _join(rank, port, timeout_min=2)
    rt = Runtime(DistInfo(rank, rank, 2), torch.device("cpu"), torch.float32)
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=32, vocab_size=256, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
    model.init_weights()
    opts = build_optimizers(model.param_groups(), OptimArgs(), 64, all_params=model.parameters())
    return rt, model, opts, training_model(model, rt, TrainArgs(compile=compile_), overlap=overlap)


def _grad_sync_worker(rank, port, out_dir, overlap, compile_):
    rt, model, opts, step_model = _joined_model(rank, port, compile_, overlap)
    batches = _Batches(rank, 256)
    x, y = next(batches)
    params = list(model.parameters())
    for _ in range(3):
        loss_sum, x, y, _ = _micro_steps(step_model, batches, x, y, 2, rt, overlap=overlap)
        finish_step_sync(step_model, params, rt, overlapped=overlap)
        optimizer_step(params, opts, 1.0, set_to_none=clear_to_none(step_model))
    torch.save({k: v.clone() for k, v in model.state_dict().items()},
               os.path.join(out_dir, f"w{rank}_{int(overlap)}.pt"))
    _write(out_dir, rank, {"ddp": type(getattr(step_model, "_orig_mod", step_model)).__name__})
    del step_model  # the DDP wrapper ends before its process group (it hung at exit in CI)
    _leave()
    os._exit(0)  # results are on disk; don't wait on the compile workers' or reducer's teardown


def _bucket_view_worker(rank, port, out_dir):
    """Two accumulation steps under DDP as the training loop runs them; records, per step,
    whether every gradient after the first (no_sync) micro-step lies in DDP's buckets."""
    rt, model, opts, step_model = _joined_model(rank, port)
    batches = _Batches(rank, 256)
    x, y = next(batches)
    params = list(model.parameters())
    in_buckets = []
    for _ in range(3):
        loss_sum, x, y, _ = _micro_steps(step_model, batches, x, y, 2, rt)
        finish_step_sync(step_model, params, rt, overlapped=True)
        # after the synced backward every .grad is a view into a bucket (gradient_as_bucket_view)
        buckets = {p.grad.untyped_storage().data_ptr() for p in params}
        optimizer_step(params, opts, 1.0, set_to_none=clear_to_none(step_model))
        with ddp_of(step_model).no_sync():  # the next step's first micro-step
            step_model(x, y).backward()
        in_buckets.append(all(p.grad is not None and p.grad.untyped_storage().data_ptr() in buckets
                              for p in params))
        for p in params:  # this probe's gradient must not leak into the next step
            p.grad.zero_()
    _write(out_dir, rank, {"in_buckets": in_buckets})
    del step_model
    _leave()
    os._exit(0)


def test_accumulation_under_ddp_adds_into_the_buckets_not_beside_them(tmp_path):
    """After the optimizer step, DDP's gradients are cleared in place, so the next step's
    no_sync micro-steps accumulate into the bucket views. Dropping them (set_to_none) made
    those micro-steps allocate a second fp32 copy of every gradient beside the buckets —
    memory the single-process discovery probe never saw."""
    port = _free_port()
    codes = _spawn(_bucket_view_worker, lambda r: (port, str(tmp_path)))
    assert codes == [0, 0], f"exit codes {codes}"
    for r, rec in enumerate(_read(tmp_path)):
        # the first synced step rebuilds the buckets (DDP's bucket order), so it is not counted
        assert rec["in_buckets"][1:] == [True] * 2, f"rank {r}: gradients outside DDP's buckets"


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_compile_modes_with_cuda_graphs_are_refused_for_several_ranks(mode):
    """Modes that record CUDA graphs are untested with DDP and accumulation: a multi-rank run
    is refused in one line naming the key and the modes that work, before any collective."""
    from nanochat.config import TrainArgs
    rt = Runtime(DistInfo(0, 0, 2), torch.device("cpu"), torch.float32)
    model = GPT(GPTConfig(sequence_len=32, vocab_size=256, n_layer=1, n_head=2, n_kv_head=2, n_embd=64))
    with pytest.raises(UserError, match=f"train.compile_mode={mode} .* max-autotune-no-cudagraphs"):
        training_model(model, rt, TrainArgs(compile=True, compile_mode=mode))


def test_ddp_buffer_switch_exists_in_every_allowed_torch():
    """DDP's `forward_sync_buffers` exists from torch 2.13 only (it deprecates
    `broadcast_buffers`): the floor torch gets the old name, newer ones the new name, and the
    installed torch accepts what it is given without a deprecation warning."""
    import inspect
    import warnings
    from torch.nn.parallel import DistributedDataParallel as DDP
    # DDP.__init__'s parameters in torch 2.5.1 (torch/nn/parallel/distributed.py, v2.5.1)
    floor = ["self", "module", "device_ids", "output_device", "dim", "broadcast_buffers",
             "init_sync", "process_group", "bucket_cap_mb", "find_unused_parameters",
             "check_reduction", "gradient_as_bucket_view", "static_graph",
             "delay_all_reduce_named_params", "param_to_hook_all_reduce", "mixed_precision",
             "device_mesh"]
    assert no_forward_buffer_sync(floor) == {"broadcast_buffers": False}
    assert no_forward_buffer_sync(floor + ["forward_sync_buffers"]) == {"forward_sync_buffers": False}
    kwargs = no_forward_buffer_sync()
    assert set(kwargs) <= set(inspect.signature(DDP.__init__).parameters)


@pytest.mark.parametrize("compile_", [False, True], ids=["eager", "compiled"])
def test_overlapped_gradient_sync_equals_allreduce_after_backward(tmp_path, compile_):
    """DDP (bucketed all-reduce during the last backward, no_sync before) trains to exactly the
    weights of the plain path (every micro-step, then allreduce_gradients), on both ranks."""
    for overlap in (False, True):
        port = _free_port()
        codes = _spawn(_grad_sync_worker, lambda r: (port, str(tmp_path), overlap, compile_))
        assert codes == [0, 0], f"overlap={overlap}: exit codes {codes}"
        kinds = [r["ddp"] for r in _read(tmp_path)]
        assert kinds == (["DistributedDataParallel"] * 2 if overlap else ["GPT"] * 2)
    w = {(r, o): torch.load(tmp_path / f"w{r}_{o}.pt") for r in range(2) for o in range(2)}
    for key in w[0, 0]:
        assert torch.equal(w[0, 0][key], w[1, 0][key]), f"plain path: ranks differ in {key}"
        assert torch.equal(w[0, 1][key], w[1, 1][key]), f"overlapped: ranks differ in {key}"
        assert torch.equal(w[0, 0][key], w[0, 1][key]), f"overlapped != plain in {key}"
    init = GPT(GPTConfig(sequence_len=32, vocab_size=256, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
    torch.manual_seed(0)
    init.init_weights()
    assert any(not torch.equal(init.state_dict()[k], w[0, 1][k]) for k in w[0, 1]), "nothing trained"


def _bucket_timing_worker(rank, port, out_dir):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from nanochat.config import TrainArgs
    from nanochat.grad_sync import ddp_of
    _join(rank, port, timeout_min=2)
    rt = Runtime(DistInfo(rank, rank, 2), torch.device("cpu"), torch.float32)
    torch.manual_seed(0)
    # lm_head (4 MB, registered last, its gradient computed first) fills DDP's first bucket alone
    model = GPT(GPTConfig(sequence_len=32, vocab_size=4096, n_layer=2, n_head=2, n_kv_head=2, n_embd=256))
    model.init_weights()
    step_model = training_model(model, rt, TrainArgs(), overlap=True)
    seen = {"embedding_grads": 0, "launches": []}

    def count_launch(state, bucket):  # a DDP comm hook: called when a bucket's all-reduce starts
        seen["launches"].append(seen["embedding_grads"])
        return allreduce_hook(None, bucket)
    ddp_of(step_model).register_comm_hook(None, count_launch)
    # the embedding's gradient is the last one a backward computes
    model.wte.weight.register_hook(lambda g: seen.update(embedding_grads=seen["embedding_grads"] + 1))
    batches = _Batches(rank, 4096)
    x, y = next(batches)
    # DDP's first synced backward records the order gradients become ready and rebuilds its
    # buckets in that order (the first one small, 1 MB); from the second step on they overlap
    for _ in range(2):
        seen.update(embedding_grads=0, launches=[])
        _, x, y, _ = _micro_steps(step_model, batches, x, y, 2, rt)
        for p in model.parameters():
            p.grad = None
    _write(out_dir, rank, seen)
    _leave()
    os._exit(0)  # a reducer holding a Python comm hook can block in its destructor at exit


def test_buckets_are_launched_during_the_last_backward_only(tmp_path):
    """Two accumulation micro-steps: no all-reduce in the first backward (no_sync); in the last
    one the first bucket starts before backward reaches the embedding — overlapped, not after
    (the second step's record: DDP rebuilds its buckets after the first)."""
    port = _free_port()
    assert _spawn(_bucket_timing_worker, lambda r: (port, str(tmp_path))) == [0, 0]
    for rec in _read(tmp_path):
        assert rec["embedding_grads"] == 2
        launches = rec["launches"]
        assert len(launches) >= 2, f"expected several buckets, got {launches}"
        assert all(n >= 1 for n in launches), f"an all-reduce during the no_sync micro-step: {launches}"
        assert launches[0] == 1, f"the first bucket waited for the whole backward: {launches}"


# ---------------------------------------------------------------- warm-up past the timeout

def _train_worker(rank, port, recipe_dict, out_dir, delay):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if delay:
        os.environ["NANOCHAT_WARMUP_DELAY_S"] = delay
    torch.set_num_threads(1)
    from nanochat.train import train_base
    t0 = time.perf_counter()
    result = train_base(recipe_from_dict(recipe_dict))
    _write(out_dir, rank, {"loss": result["loss"], "val_bpb": result["val_bpb"],
                           "seconds": time.perf_counter() - t0})


def _two_rank_recipe(tiny_recipe, run_dir):
    return {**tiny_recipe, "run_dir": str(run_dir),
            "cluster": {"collective_timeout_min": SHORT_TIMEOUT_MIN},
            "train": {**tiny_recipe["train"], "total_batch_size": 1024, "num_iterations": 3,
                      "eval_every": -1, "save_every": -1}}


def test_rank_warming_up_past_the_collective_timeout_trains_and_agrees(tiny_recipe, tmp_path):
    """Rank 1's warm-up takes 8 s, past the 3 s collective timeout; rank 0 waits in the store
    barrier, both train, and the weights equal those of a run with no delay."""
    runs = {}
    for name, delay in (("slow", "1:8"), ("plain", "")):
        port = _free_port()
        recipe = _two_rank_recipe(tiny_recipe, tmp_path / name)
        out = tmp_path / f"{name}_out"
        out.mkdir()
        assert _spawn(_train_worker, lambda r: (port, recipe, str(out), delay)) == [0, 0], name
        runs[name] = _read(out)
    slow, plain = runs["slow"], runs["plain"]
    assert slow[0]["loss"] == slow[1]["loss"] == plain[0]["loss"]
    assert slow[0]["val_bpb"] == slow[1]["val_bpb"] == plain[0]["val_bpb"]
    assert slow[0]["seconds"] > 8, "the delay was not injected"
    wa = ckpt.load_model_state(ckpt.latest_checkpoint(tmp_path / "slow"))
    wb = ckpt.load_model_state(ckpt.latest_checkpoint(tmp_path / "plain"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _collective_worker(rank, port, out_dir):
    _join(rank, port)
    if rank == 1:
        time.sleep(8)
    t0 = time.perf_counter()
    try:
        torch.distributed.all_reduce(torch.ones(1))
        what = "ok"
    except RuntimeError as e:
        what = type(e).__name__
    _write(out_dir, rank, {"what": what, "seconds": time.perf_counter() - t0})
    os._exit(0)  # the group is broken on rank 0: don't wait on its teardown


def test_the_short_collective_timeout_is_real(tmp_path):
    """The control for the test above: without the store barrier, rank 0's first collective
    gives up after the recipe's 3 s timeout while rank 1 is still busy."""
    port = _free_port()
    assert _spawn(_collective_worker, lambda r: (port, str(tmp_path))) == [0, 0]
    r0 = _read(tmp_path)[0]
    assert r0["what"] != "ok" and r0["seconds"] < 8, r0


# ---------------------------------------------------------------- preparation waits in the store

def _prepare_worker(rank, port, recipe_dict, out_dir):
    _join(rank, port)
    from nanochat.data import shards as dataset
    real = dataset.prepare_data
    if rank == 0:  # a cold cache on a slow link: longer than the 3 s collective timeout
        def slow(args, progress=True):
            time.sleep(6)
            return real(args, progress)
        dataset.prepare_data = slow
    rt = Runtime(DistInfo(rank, rank, 2), torch.device("cpu"), torch.float32)
    t0 = time.perf_counter()
    train, val = dataset.prepare_shards(recipe_from_dict(recipe_dict), rt)
    tok = dataset.prepare_tokenizer(recipe_from_dict(recipe_dict), train, rt)
    torch.distributed.all_reduce(torch.ones(1))  # the default group is still healthy
    _write(out_dir, rank, {"train": [str(p) for p in train], "val": [str(p) for p in val],
                           "vocab": tok.vocab_size, "seconds": time.perf_counter() - t0})
    _leave()


def test_ranks_wait_for_local_rank_0s_slow_preparation(corpus, tmp_path):
    """A cold data dir and tokenizer cache: rank 0 builds the shards (6 s late) and trains the
    tokenizer while rank 1 waits in the store; both end with the same shards and tokenizer."""
    sections = {**corpus["sections"], "data": {**corpus["sections"]["data"], "data_dir": str(tmp_path / "data")}}
    recipe = {**sections, "cache_dir": str(tmp_path / "cache")}
    port = _free_port()
    assert _spawn(_prepare_worker, lambda r: (port, recipe, str(tmp_path))) == [0, 0]
    r0, r1 = _read(tmp_path)
    assert r0["train"] == r1["train"] and r0["val"] == r1["val"] and len(r0["train"]) >= 1
    assert r0["vocab"] == r1["vocab"] == 512
    assert r1["seconds"] > 6


def _checkpoint_worker(rank, port, out_dir):
    _join(rank, port)
    real = ckpt._save_synced
    if rank == 0:  # a big model on slow shared storage: longer than the 3 s collective timeout
        def slow(obj, path):
            if path.name == "model.pt":
                time.sleep(6)
            return real(obj, path)
        ckpt._save_synced = slow
    model = GPT(GPTConfig(sequence_len=16, vocab_size=32, n_layer=1, n_head=2, n_kv_head=2, n_embd=16))
    t0 = time.perf_counter()
    path = ckpt.save_checkpoint(out_dir, 1, model, [], {"loader": [{}, {}]}, rank, 2)
    torch.distributed.all_reduce(torch.ones(1))  # the group survived the wait
    _write(out_dir, rank, {"path": str(path), "seconds": time.perf_counter() - t0})
    _leave()


def test_ranks_wait_for_rank_0s_slow_checkpoint_write_in_the_store(tmp_path):
    """Rank 0 writes the model for 6 s, past the 3 s collective timeout: rank 1 waits in the
    store barrier (not a collective one that the watchdog would abort) and both return the
    committed checkpoint."""
    port = _free_port()
    assert _spawn(_checkpoint_worker, lambda r: (port, tmp_path)) == [0, 0]
    r0, r1 = _read(tmp_path)
    assert r0["path"] == r1["path"] == str(ckpt.latest_checkpoint(tmp_path))
    assert (ckpt.latest_checkpoint(tmp_path) / "model.pt").exists()
    assert r1["seconds"] > 6


# ---------------------------------------------------------------- store waits: answers and deaths

def _share_worker(rank, port, out_dir, die):
    _join(rank, port, timeout_min=1)
    if rank == 0 and die:
        time.sleep(1)
        os._exit(3)   # rank 0 dies mid-discovery: no answer, no goodbye
    t0 = time.perf_counter()
    try:
        got = rendezvous.share({"batch_size": 7} if rank == 0 else None, "rank 0's answer")
        rec = {"got": got}
    except UserError as e:
        rec = {"error": str(e)}
    rec["seconds"] = time.perf_counter() - t0
    _write(out_dir, rank, rec)
    if not die:
        _leave()


def test_an_answer_published_in_the_store_reaches_every_rank(tmp_path):
    port = _free_port()
    assert _spawn(_share_worker, lambda r: (port, str(tmp_path), False)) == [0, 0]
    assert [r["got"] for r in _read(tmp_path)] == [{"batch_size": 7}] * 2


def test_a_dead_rank_0_is_one_line_not_a_hang(tmp_path):
    port = _free_port()
    codes = _spawn(_share_worker, lambda r: (port, str(tmp_path), True), timeout=60)
    assert codes == [3, 0]
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert "error" in r1 and "\n" not in r1["error"], r1
    assert r1["error"].startswith(f"rank 1 on {socket.gethostname()}: waiting for rank 0's answer")
    assert r1["seconds"] < 30, "waited for the timeout instead of noticing the death"


def _mismatch_worker(rank, port, out_dir):
    try:
        _join(rank, port, world=2 if rank == 0 else 3, timeout_min=0.5)
        rec = {"error": None}
    except UserError as e:
        rec = {"error": str(e)}
    _write(out_dir, rank, rec)
    os._exit(0)


def test_mismatched_world_sizes_name_the_rank_and_host(tmp_path):
    port = _free_port()
    assert _spawn(_mismatch_worker, lambda r: (port, str(tmp_path)), timeout=90) == [0, 0]
    host = socket.gethostname()
    for rec in _read(tmp_path):
        assert rec["error"] and "world size 3" in rec["error"] and "world size 2" in rec["error"] \
            or "with 2" in rec["error"] or "with 3" in rec["error"], rec
        assert host in rec["error"] and "\n" not in rec["error"]


def test_an_unresolvable_master_addr_is_one_line(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "no-such-host.invalid")
    monkeypatch.setenv("MASTER_PORT", "29500")
    with pytest.raises(UserError, match=r"^rank 1 on .*: MASTER_ADDR='no-such-host.invalid' does not resolve"):
        rendezvous.join(1, 2, "gloo", SHORT_TIMEOUT_MIN)
    monkeypatch.setenv("MASTER_PORT", "http")
    with pytest.raises(UserError, match="MASTER_PORT='http' is not a port number"):
        rendezvous.check_master_addr(0)


# ---------------------------------------------------------------- settings

def test_the_injected_warm_up_delay_is_parsed_per_rank():
    env = {"NANOCHAT_WARMUP_DELAY_S": "1:8, 3:0.5"}
    assert [injected_delay(r, env) for r in range(4)] == [0.0, 8.0, 0.0, 0.5]
    assert injected_delay(0, {}) == 0.0
    with pytest.raises(UserError, match="expected RANK:SECONDS"):
        injected_delay(0, {"NANOCHAT_WARMUP_DELAY_S": "8"})


@pytest.mark.parametrize("key", ["collective_timeout_min", "init_timeout_min"])
def test_the_timeouts_are_validated_recipe_fields(key):
    assert getattr(Recipe().cluster, key) == 10.0
    assert getattr(recipe_from_dict({"cluster": {key: 0.5}}).cluster, key) == 0.5
    for bad in (0, -1, "ten", True):
        with pytest.raises(UserError, match=f"cluster.{key}"):
            recipe_from_dict({"cluster": {key: bad}})


def _group_timeout() -> datetime.timedelta:
    """The default (gloo) group's collective timeout, as its backend holds it."""
    group = torch.distributed.distributed_c10d._get_default_group()
    return group._get_backend(torch.device("cpu")).options._timeout


def test_the_group_is_created_under_the_init_timeout_and_keeps_the_collective_one(monkeypatch):
    """One gloo rank: the group is created (and meets its first barrier) with
    cluster.init_timeout_min, then holds cluster.collective_timeout_min for its collectives."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    created = []
    real = torch.distributed.init_process_group

    def init_process_group(*args, **kwargs):
        created.append(kwargs["timeout"])
        return real(*args, **kwargs)
    monkeypatch.setattr(torch.distributed, "init_process_group", init_process_group)
    rendezvous.join(0, 1, "gloo", timeout_min=0.5, init_timeout_min=20)
    try:
        after = _group_timeout()
        torch.distributed.all_reduce(torch.ones(1))
    finally:
        torch.distributed.destroy_process_group()
        rendezvous.leave()
    assert created == [datetime.timedelta(minutes=20)]
    assert after == datetime.timedelta(seconds=30)


def test_a_rank_that_never_comes_fails_the_join_within_the_init_timeout(monkeypatch):
    """Rank 1 of 2 never starts: rank 0 gives up after the 3 s init timeout, not the 10 min
    collective one, in one line naming it."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    t0 = time.perf_counter()
    with pytest.raises(UserError, match=r"^rank 0 on .*: rendezvous at 127.0.0.1:\d+ failed within 0.05 min"):
        rendezvous.join(0, 2, "gloo", timeout_min=10, init_timeout_min=SHORT_TIMEOUT_MIN)
    assert time.perf_counter() - t0 < 30


def test_stages_pass_the_recipes_two_timeouts(monkeypatch):
    """recipe_runtime (benchmarks) hands the recipe's collective and init timeouts to the
    rendezvous; runtime() without them uses the ClusterArgs defaults."""
    from nanochat.runtime import group_timeouts_min, recipe_runtime
    calls = []
    monkeypatch.setattr(rendezvous, "join", lambda *a, **kw: calls.append((a, kw)))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    recipe = recipe_from_dict({"cluster": {"collective_timeout_min": 2, "init_timeout_min": 30},
                               "train": {"device": "cpu"}})
    recipe_runtime(recipe, tune_allocator=False)
    (args, kwargs), = calls
    assert args == (0, 2, "gloo", 2.0) and kwargs["init_timeout_min"] == 30.0
    assert group_timeouts_min() == (10.0, 10.0) and group_timeouts_min(1, None) == (1, 10.0)


def test_one_process_waits_are_no_ops():
    assert not rendezvous.active()
    rendezvous.barrier("nothing")
    assert rendezvous.share(5, "nothing") == 5
    assert rendezvous.rank_hosts() == [socket.gethostname()]


def test_the_comm_benchmark_needs_two_ranks(tiny_recipe, tmp_path):
    """bench.comm in one process: one line saying how to run it, not a single-rank figure."""
    import yaml
    from bench.comm import main
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    with pytest.raises(UserError, match="bench.comm needs 2\\+ ranks: run it under torchrun or srun"):
        main([str(path)])
