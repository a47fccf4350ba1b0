"""Batch-size discovery: the real training step probed in child processes under a CPU memory
budget, the search, the cache (hits, corruption, concurrent discoverers, unwritable dirs), ranks
agreeing, and the caller's model left untouched. Probes are real; only the search-order tests
use a linear memory function, to cover many shapes in no time."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml

from nanochat.batchsize import probe as memory_probe
from nanochat.batchsize.search import discover, discover_for_recipe, legal_candidates, probe_spec, \
    resolve_target, search
from nanochat.common import UserError
from nanochat.batchsize.probe import ProbeError, ProbeServer, ProbeSpec, is_oom
from nanochat.recipe import load_recipe, recipe_from_dict
from nanochat.config import legal_device_batch_sizes


def cheap(cache_dir, **discovery) -> dict:
    """A model whose probes take a fraction of a second; 2 rows per step: candidates [1, 2]."""
    return {"model": {"depth": 1, "n_embd": 32, "n_head": 1, "sequence_len": 32, "vocab_size": 512},
            "train": {"total_batch_size": 64, "device": "cpu"},
            "discovery": {"cache_dir": str(cache_dir), "memory_budget_gb": 2.0, **discovery}}


def json_files(d):
    return sorted(p for p in d.iterdir() if p.suffix == ".json")


# ---------------------------------------------------------------- candidates and search order

def test_candidates_are_legal_powers_of_two_within_bounds():
    assert legal_candidates(8192, 256, 1) == [1, 2, 4, 8, 16, 32]
    assert legal_candidates(3 * 8 * 256, 256, 1, "pow2") == [1, 2, 4, 8]
    assert legal_candidates(3 * 8 * 256, 256, 1, "divisors") == [1, 2, 3, 4, 6, 8, 12, 24]
    assert legal_candidates(3 * 8 * 256, 256, 2, "divisors", 2, 6) == [2, 3, 4, 6]
    assert legal_candidates(1000, 256, 1) == []  # total not a multiple of the sequence


@pytest.mark.parametrize("mode", ["pow2", "divisors"])
def test_search_finds_the_largest_fitting_legal_size_for_any_budget(mode):
    """Over many budgets and memory models: the answer is the largest legal candidate under
    the budget, every probe is a legal candidate, and the memory model keeps probes few."""
    cands = legal_candidates(2**20 * 3, 1024, 1, mode)
    for fixed, per in [(5e8, 3e7), (2e9, 1e6), (1e8, 4e8)]:
        for usable in [fixed + per * k + 1 for k in (1, 2, 3, 5, 7, 17, 100, 1000, 5000)]:
            peak = lambda b: fixed + per * b * (1 + 0.02 * ((b - 1) % 3))  # not exactly linear
            res = search(cands, lambda b: {"batch": b, "oom": False, "peak_bytes": peak(b)}, usable)
            want = max(b for b in cands if peak(b) <= usable)
            assert res.largest == want, (fixed, per, usable)
            assert all(p["batch"] in cands for p in res.probes)
            assert len(res.probes) <= 4 + (mode == "divisors") * 3, [p["batch"] for p in res.probes]


def test_search_with_flat_memory_gallops_to_the_largest_candidate():
    cands = legal_candidates(2**20, 1024, 1)  # 1 .. 1024
    res = search(cands, lambda b: {"batch": b, "oom": False, "peak_bytes": 1e9}, 2e9)
    assert res.largest == 1024 and len(res.probes) <= 8 and res.first_guess is None


def test_search_treats_out_of_memory_as_not_fitting_and_reports_too_small():
    cands = [1, 2, 4, 8, 16]
    oom_above = lambda b: {"batch": b, "oom": b > 4, "peak_bytes": None if b > 4 else 10.0 * b}
    assert search(cands, oom_above, usable=1e9).largest == 4
    assert search(cands, lambda b: {"batch": b, "oom": True, "peak_bytes": None}, 1e9).largest is None


# ---------------------------------------------------------------- the real search under a CPU budget

@pytest.fixture(scope="module")
def budget_run(tmp_path_factory):
    """Measure the real step at N = 4 and 2N = 8, set the budget halfway, discover."""
    cache = tmp_path_factory.mktemp("bs_cache")
    # Logits (batch × 256 × 4096 floats, several copies) dominate: ~50 MB per sample.
    recipe_dict = {"model": {"depth": 1, "n_embd": 32, "n_head": 1, "sequence_len": 256,
                             "vocab_size": 4096},
                   "train": {"total_batch_size": 16 * 256, "device": "cpu"},
                   "discovery": {"cache_dir": str(cache), "memory_budget_gb": 8.0, "headroom": 0.0}}
    recipe = recipe_from_dict(recipe_dict)
    spec = probe_spec(recipe, resolve_target(recipe))
    # Resident peaks vary by up to ~20% from probe to probe: where freed logits land in the heap
    # decides how many (one = 1/10 of the peak) are resident at once. Take the extremes of 3.
    with ProbeServer() as server:
        peaks = {b: [server.probe(spec, b, None)["peak_bytes"] for _ in range(3)] for b in (4, 8)}
    p4, p8 = max(peaks[4]), min(peaks[8])
    assert p8 > p4 * 1.15, peaks  # the per-sample cost dominates: the test has a margin
    recipe_dict["discovery"]["memory_budget_gb"] = (p4 + p8) / 2 / 1e9
    recipe = recipe_from_dict(recipe_dict)
    before = memory_probe.PROBES_STARTED
    first = discover(recipe)
    probes_first = memory_probe.PROBES_STARTED - before
    return {"recipe": recipe, "first": first, "probes_first": probes_first, "cache": cache,
            "p4": p4, "p8": p8}


def test_budget_that_fits_n_but_not_2n_gives_n(budget_run):
    d = budget_run["first"]
    assert d.batch_size == 4 and not d.from_cache
    probes = {p["batch"]: p for p in d.record["probes"]}
    assert probes[4]["fits"] and not probes[8]["fits"], probes
    assert d.probes_run == budget_run["probes_first"] >= 3
    assert d.record["memory"]["per_sample_bytes"] > 0


def test_only_legal_sizes_are_probed_and_returned(budget_run):
    legal = legal_device_batch_sizes(16 * 256, 256, 1)
    d = budget_run["first"]
    assert {d.batch_size, d.largest, d.fastest} <= set(legal)
    assert all(p["batch"] in legal and p["batch"] & (p["batch"] - 1) == 0 for p in d.record["probes"])


def test_second_call_is_a_cache_hit_that_runs_no_probe(budget_run):
    before = memory_probe.PROBES_STARTED
    d = discover(budget_run["recipe"])
    assert d.from_cache and d.probes_run == 0 and memory_probe.PROBES_STARTED == before
    assert d.batch_size == budget_run["first"].batch_size
    rec = json.loads(d.cache_path.read_text())  # the file says what was measured, in clear
    assert rec["key"]["world_size"] == 1 and rec["key"]["dtype"] == "float32"
    assert rec["key"]["torch"] == torch.__version__ and rec["key"]["stage"] == "base"
    assert all("peak_bytes" in p and "tok_per_s" in p for p in rec["probes"])
    assert rec["host"] and rec["date"] and rec["seconds"] > 0
    assert json_files(budget_run["cache"]) == [d.cache_path]


def test_cache_key_separates_stage_world_size_dtype_and_compile(budget_run):
    r = budget_run["recipe"]
    from nanochat.batchsize.search import cache_key, cache_path
    t = resolve_target(r)
    base = cache_path(r, cache_key(r, "base", 1, t, probe_spec(r, t)))
    other = [cache_path(r, cache_key(r, "sft", 1, t, probe_spec(r, t))),
             cache_path(r, cache_key(r, "base", 2, t, probe_spec(r, t)))]
    for override in ("train.dtype=bfloat16", "train.compile=true", "optim.muon_plus=true",
                     "discovery.headroom=0.2"):
        key, _, value = override.partition("=")
        section, field = key.split(".")
        d = {"model": vars(r.model), "train": {**vars(r.train)}, "optim": {**vars(r.optim)},
             "discovery": {**vars(r.discovery)}}
        d[section][field] = yaml.safe_load(value)
        r2 = recipe_from_dict(d)
        other.append(cache_path(r2, cache_key(r2, "base", 1, t, probe_spec(r2, t))))
    assert len({base, *other}) == len(other) + 1


def test_cache_key_holds_memory_not_learning_rates(tmp_path):
    """Learning rates, betas, momentum values, schedules and decay amounts change no memory: a
    recipe differing only in them is a cache hit (no probe). What changes the optimizer's
    state (NorMuon's second moment), turns decay on, or changes the model's shape is another key."""
    from nanochat.batchsize.search import cache_key, cache_path
    first = discover(recipe_from_dict(cheap(tmp_path)))
    assert not first.from_cache
    values = {"matrix_lr": 0.05, "embedding_lr": 0.3, "unembedding_lr": 0.001,
              "adamw_roles": {"embedding": {"betas": [0.9, 0.99], "weight_decay": 0.002},
                              "unembedding": {"eps": 1e-8}}, "resid_lr_frac": 0.02, "muon_momentum": 0.9,
              "muon_momentum_warmup_steps": 10, "muon_momentum_final": 0.95,
              "lr_batch_scaling": True, "batch_ref": 4096}
    before = memory_probe.PROBES_STARTED
    again = discover(recipe_from_dict({**cheap(tmp_path), "optim": values}))
    assert again.from_cache and memory_probe.PROBES_STARTED == before
    assert again.cache_path == first.cache_path and "matrix_lr" not in again.record["key"]["optim"]

    def path(**sections):
        r = recipe_from_dict({**cheap(tmp_path), **sections})
        t = resolve_target(r)
        return cache_path(r, cache_key(r, "base", 1, t, probe_spec(r, t)))

    assert path(optim={"muon_weight_decay": 0.1}) == path(optim={"muon_weight_decay": 0.28})
    others = [path(optim={"variance_reduction": True}), path(optim={"muon_weight_decay": 0.1}),
              path(model={**cheap(tmp_path)["model"], "depth": 2}),
              path(optim={"adamw_roles": {"x0": {"weight_decay": 0.1}}})]  # x0's decay turned on
    assert len({first.cache_path, *others}) == 5


def test_the_discovery_key_did_not_change_with_adamw_roles():
    """optim.adamw_roles replaced 24 flat fields (optim.<role>_betas, ...); discovery caches and
    plans hold keys made before it. The keys of tests/golden/plan_key_ba04c60.txt were printed by
    the code before the change (commit ba04c60); the same recipes give the same keys now, for the
    default roles (tiny) and for roles a recipe changes, decays turned off included (d20)."""
    from nanochat.batchsize.key import plan_key
    golden = Path(__file__).parent / "golden" / "plan_key_ba04c60.txt"
    keys = [ln for ln in golden.read_text().splitlines() if not ln.startswith("#")]
    for name, key in zip(["tiny.yaml", "d20.yaml"], keys, strict=True):
        r = load_recipe(Path(__file__).parents[1] / "configs" / name, ["model.vocab_size=4096"])
        assert plan_key(r, ["base", "sft"]) == key, name
    d20 = json.loads(keys[1])["stages"]["base"]["optim"]
    assert (d20["embedding_weight_decay"], d20["value_embed_weight_decay"]) == (False, True)


# ---------------------------------------------------------------- cache robustness

def test_corrupt_cache_file_is_reported_and_recomputed(tmp_path, capfd):
    from nanochat.batchsize.search import cache_key, cache_path
    recipe = recipe_from_dict(cheap(tmp_path))
    target = resolve_target(recipe)
    path = cache_path(recipe, cache_key(recipe, "base", 1, target, probe_spec(recipe, target)))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"key": {"truncated')  # what a torn write by another tool would leave
    d = discover(recipe)
    err = capfd.readouterr().err
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "corrupt" in warnings[0] and str(path) in warnings[0]
    assert not d.from_cache and d.probes_run > 0 and d.batch_size == 2 and d.cache_path == path
    assert json.loads(path.read_text())["result"]["batch_size"] == 2


def test_unwritable_cache_dir_is_a_warning_and_discovery_still_returns(tmp_path, capfd):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the cache dir should be")
    d = discover(recipe_from_dict(cheap(blocker / "batch_size")))
    assert d.batch_size == 2 and d.cache_path is None
    assert "warning: batch-size cache dir" in capfd.readouterr().err


def test_concurrent_discoverers_probe_once_and_agree(tmp_path):
    cfg = tmp_path / "r.yaml"
    cfg.write_text(yaml.safe_dump(cheap(tmp_path / "cache")))
    procs = [subprocess.Popen([sys.executable, "-m", "nanochat.batchsize", str(cfg)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [o[1][-2000:] for o in outs]
    parsed = [dict(ln.split(": ", 1) for ln in o[0].splitlines()) for o in outs]
    assert len({p["device_batch_size"] for p in parsed}) == 1
    assert len({p["cache_file"] for p in parsed}) == 1
    assert sorted(p["from_cache"] for p in parsed) == ["false", "true", "true"]
    files = json_files(tmp_path / "cache")
    assert len(files) == 1 and json.loads(files[0].read_text())["result"]["batch_size"] == 2
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------- bad input, errors, the caller's model

def test_budget_too_small_for_batch_1_names_fixed_and_per_sample_cost(tmp_path):
    with pytest.raises(UserError) as e:
        discover(recipe_from_dict(cheap(tmp_path, memory_budget_gb=0.001)))
    msg = str(e.value)
    assert "\n" not in msg and "batch 1 does not fit" in msg
    assert "before any batch" in msg and "each sample adds" in msg and "memory_budget_gb" in msg


@pytest.mark.parametrize("override,key", [("discovery.headroom=-0.1", "discovery.headroom"),
                                          ("discovery.max_batch_size=2", "discovery.max_batch_size"),
                                          ("discovery.probe_steps=1", "discovery.probe_steps"),
                                          ("discovery.choose=best", "discovery.choose")])
def test_nonsense_settings_are_one_line_naming_the_key(override, key):
    overrides = [override] + (["discovery.min_batch_size=4"] if "max_batch" in override else [])
    with pytest.raises(UserError) as e:
        load_recipe("configs/tiny.yaml", overrides)
    assert key in str(e.value) and "\n" not in str(e.value)


def test_cpu_out_of_memory_is_caught_and_other_errors_propagate():
    assert is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"))
    assert not is_oom(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    recipe = recipe_from_dict(cheap("unused"))
    spec = probe_spec(recipe, resolve_target(recipe))
    with ProbeServer() as server:
        # A real allocation failure: the step needs more address space than the cap allows.
        # Each logits tensor alone is 4×256×32768×4 B = 128 MiB (the step peaks at ~550 MiB):
        # more than any slack the child's heap already maps (the tuned allocator's 64 MiB top
        # pad, 64 MiB thread arenas), which let a ~90 MiB step pass under a 1-byte cap in CI.
        big = ProbeSpec(**{**vars(spec), "model": {**spec.model, "sequence_len": 256,
                                                   "vocab_size": 32768}})
        assert server.probe(big, 4, limit_bytes=1)["oom"] is True
        bad = ProbeSpec(**{**vars(spec), "model": {**spec.model, "n_head": 3}})  # 32 % 3 != 0
        with pytest.raises(ProbeError, match="not out of memory"):
            server.probe(bad, 1, limit_bytes=None)
        assert server.probe(spec, 1, limit_bytes=None)["oom"] is False  # the server survives


@pytest.mark.parametrize("tuned", [True, False])
def test_cpu_peak_sees_memory_that_was_freed_before_the_reading(tuned):
    """200 MB touched and freed: the tuned allocator keeps it in the heap (anonymous memory),
    glibc's defaults unmap it (only the high-water mark saw it); the peak counts it either way."""
    code = f"""
import torch
from nanochat.runtime import tune_cpu_allocator
from nanochat.batchsize.probe import cpu_peak, proc_status, reset_peak_rss
tune_cpu_allocator({tuned})
base = proc_status("VmRSS"), proc_status("RssAnon")
assert reset_peak_rss()
x = torch.ones(50_000_000)
del x
print(cpu_peak(*base), proc_status("RssAnon") - base[1])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    peak, anon_now = map(int, out.stdout.split())
    assert 195e6 < peak < 260e6, out.stdout
    assert (anon_now > 195e6) == tuned, out.stdout  # where the peak was read from differs


def test_probing_the_callers_model_leaves_it_untouched(tmp_path):
    from nanochat.gpt import GPT, GPTConfig
    recipe = recipe_from_dict(cheap(tmp_path))
    spec = probe_spec(recipe, resolve_target(recipe))
    torch.manual_seed(0)
    model = GPT(GPTConfig(**spec.model))
    model.init_weights()
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    d = discover(recipe, model=model, isolate=False, use_cache=False)
    assert d.probes_run >= 2
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters()) and not model.training
    assert torch.equal(rng, torch.get_rng_state())


# ---------------------------------------------------------------- ranks agree; training calls it

def _rank_worker(rank, port, recipe_dict, out_dir):
    torch.set_num_threads(1)
    # A default-group timeout far shorter than rank 0's discovery: rank 1 must not wait on it.
    from nanochat import rendezvous
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    rendezvous.join(rank, 2, "gloo", timeout_min=2 / 60)
    before = memory_probe.PROBES_STARTED
    d = discover_for_recipe(recipe_from_dict(recipe_dict), world_size=2)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"batch_size": d.batch_size, "probes": memory_probe.PROBES_STARTED - before}, f)


def test_two_ranks_agree_and_only_rank_0_probes(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank_worker, args=(r, port, cheap(tmp_path / "cache"), str(tmp_path)))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    assert [p.exitcode for p in procs] == [0, 0]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["batch_size"] == r1["batch_size"] == 1  # 2 rows per step over 2 ranks
    assert r0["probes"] >= 1 and r1["probes"] == 0


def test_a_compiled_recipe_probes_eagerly_and_compiles_once_to_confirm(tmp_path):
    """Compiling at every probed size costs a compile each; a compiled step peaks no higher
    than the eager one (bench.batch_size --peaks), so the search is eager and one compiled
    probe confirms the answer."""
    def recipe(compiled: bool, cache: str):
        return recipe_from_dict({
            "model": {"depth": 1, "n_embd": 32, "n_head": 1, "sequence_len": 32, "vocab_size": 256},
            "train": {"device": "cpu", "total_batch_size": 32 * 8, "device_batch_size": "auto",
                      "compile": compiled},
            "discovery": {"cache_dir": str(tmp_path / cache), "memory_budget_gb": 4.0, "max_batch_size": 8}})
    eager = discover(recipe(False, "eager"))
    compiled = discover(recipe(True, "compiled"))
    confirmations = compiled.record["compiled_confirmation"]
    assert [c["batch"] for c in confirmations] == [compiled.batch_size] and confirmations[0]["fits"]
    # one compiled probe on top of its eager search (how many eager probes a search needs depends
    # on measured peaks, which vary with the machine's load: compare with its own record)
    assert compiled.probes_run == len(compiled.record["probes"]) + 1, \
        "one compiled probe on top of the eager search"
    assert eager.probes_run == len(eager.record["probes"])
    assert compiled.record["method"] == f"eager probes, compiled confirmation at {compiled.batch_size}"
    assert eager.record["method"] == "probes" and eager.record["compiled_confirmation"] is None
    assert compiled.batch_size == eager.batch_size
    assert compiled.record["key"]["compile"] is True and compiled.cache_path != eager.cache_path
