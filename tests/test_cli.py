"""Bad input through the real command line: `python -m nanochat.train|prepare|bench.train` exits
with code 2 and one `error: ...` line naming the key or file, prints no traceback, and leaves no
checkpoint or half-written file behind.

Runs that need data use the session's shards and tokenizer (conftest `corpus`, built in-process
with the same `nanochat.prepare` functions the commands call), so the subprocesses find them
ready and never touch the network."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nanochat import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"

# A model and batch so small that a run which (wrongly) got past its error would still be quick.
SMALL = ["model.depth=1", "model.n_embd=64", "model.n_head=1", "model.sequence_len=32",
         "tokenizer.vocab_size=300", "tokenizer.train_chars=200000",
         "train.total_batch_size=64", "train.device_batch_size=2", "train.num_iterations=1",
         "train.eval_tokens=64", "train.eval_every=-1", "train.device=cpu",
         "train.progress_bar=false", "data.offline_num_shards=4"]


@pytest.fixture(scope="session")
def prepared(corpus):
    """Overrides that point a run at the session's shards and tokenizer (conftest `corpus`), so
    the commands find both ready and never build or download anything."""
    from nanochat.recipe import load_recipe
    from nanochat.data.shards import tokenizer_key

    overrides = SMALL + [f"{section}.{key}={value}"
                         for section, values in corpus["sections"].items()
                         for key, value in values.items()] + [f"cache_dir={corpus['cache_dir']}"]
    recipe = load_recipe(TINY, overrides)
    tok_file = Path(corpus["cache_dir"]) / "tokenizer" / tokenizer_key(recipe) / "tokenizer.json"
    assert tok_file.is_file(), "overrides must select the session tokenizer (same data/tokenizer)"
    return {"overrides": overrides, "recipe": recipe, "tokenizer": corpus["tokenizer"]}


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


# Every kind of recipe error goes through one command-line path (load_recipe inside cli_main).
# `nanochat.train` and `bench.throughput` import torch first (~2 s a run), `nanochat.prepare`
# does not (~0.3 s): the requested cases run through train, the rest through prepare, a sample
# through the benchmark, to keep the file under a minute.
TRAIN, PREPARE, BENCH = "nanochat.train", "nanochat.prepare", "bench.throughput"
CASES = [
    (TRAIN, "model.dept=4", ["model.dept", "did you mean 'model.depth'"]),
    (TRAIN, "train.compile=3", ["train.compile", "true or false"]),
    (TRAIN, "model.depth=0", ["model.depth", "≥ 1"]),
    (TRAIN, "tokenizer.vocab_size=100", ["tokenizer.vocab_size", "265"]),
    (TRAIN, "model.sequence_len=0", ["model.sequence_len", "≥ 1"]),
    (PREPARE, "model.sequence_len=-5", ["model.sequence_len", "-5"]),
    (PREPARE, "modle.depth=4", ["modle", "did you mean 'model'"]),
    (PREPARE, "model.depth=four", ["model.depth", "integer", "four"]),
    (PREPARE, "model.depth=true", ["model.depth", "integer"]),
    (PREPARE, "tokenizer.vocab_size=260", ["tokenizer.vocab_size", "265"]),
    (PREPARE, "model.n_kv_head=3", ["model.n_kv_head"]),
    (PREPARE, "train.device_batch_size=0", ["train.device_batch_size"]),
    (PREPARE, "bogus", ["bogus", "section.key=value"]),
    (PREPARE, "a..b=1", ["a..b=1", "section.key=value"]),
    (BENCH, "model.dept=4", ["model.dept", "did you mean 'model.depth'"]),
]


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
    res = run_cli(TRAIN, recipe, *SMALL, f"run_dir={run_dir}")
    msg = error_line(res)
    assert f"{recipe}:5:" in msg
    assert "did you mean 'train.seed'" in msg
    assert not run_dir.exists()


def test_wrong_type_in_file_names_file_line_key(tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("name: mine\nmodel:\n  depth: four\n")
    res = run_cli(PREPARE, recipe, f"run_dir={tmp_path / 'run'}")
    msg = error_line(res)
    assert f"{recipe}:3:" in msg and "model.depth" in msg
    assert not (tmp_path / "run").exists()


def test_invalid_yaml_names_file(tmp_path):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("name: x\nmodel: {depth: 4\n")
    msg = error_line(run_cli(PREPARE, recipe))
    assert str(recipe) in msg and "YAML" in msg


@pytest.mark.parametrize("module", [TRAIN, PREPARE])
def test_missing_recipe_file(tmp_path, module):
    missing = tmp_path / "no_such_recipe.yaml"
    msg = error_line(run_cli(module, missing, f"run_dir={tmp_path / 'run'}"))
    assert str(missing) in msg and "not found" in msg
    assert files_under(tmp_path) == set()


def test_missing_recipe_argument_exits_2_without_traceback():
    res = run_cli(PREPARE)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert "recipe" in res.stderr.splitlines()[-1]


# --------------------------------------------------------------------------------------------
# Errors found at run time: data, checkpoints, batch arithmetic


def test_fineweb_empty_dir_hub_offline(tmp_path):
    """HF_HUB_OFFLINE=1 with nothing on disk: say what is missing and what to do."""
    data_dir, run_dir = tmp_path / "fw", tmp_path / "run"
    res = run_cli(TRAIN, TINY, *SMALL, "data.source=fineweb", f"data.data_dir={data_dir}",
                  "data.hub_endpoint=http://127.0.0.1:9", f"cache_dir={tmp_path / 'cache'}",
                  f"run_dir={run_dir}")
    msg = error_line(res)
    assert "HF_HUB_OFFLINE" in msg and str(data_dir) in msg
    assert "http://127.0.0.1:9/" in msg            # the endpoint it would have used
    assert "data.source=offline" in msg            # what to do instead
    assert not run_dir.exists()
    assert files_under(data_dir) == set()


def test_fineweb_unreachable_hub(tmp_path):
    """Online, but the endpoint refuses connections: fail fast with the fix in the message."""
    data_dir, run_dir = tmp_path / "fw", tmp_path / "run"
    res = run_cli(PREPARE, TINY, *SMALL, "data.source=fineweb", f"data.data_dir={data_dir}",
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
    from nanochat.recipe import load_recipe
    from nanochat.gpt import GPTConfig

    recipe = load_recipe(TINY, prepared["overrides"] + [f"run_dir={run_dir}"])
    config = GPTConfig.from_args(recipe.model, prepared["tokenizer"].vocab_size)
    ck = run_dir / "checkpoints" / f"step_{step:06d}"
    ck.mkdir(parents=True)
    meta = {"model_config": dataclasses.asdict(config), "step": step, "world_size": 1,
            "loader": [{"epoch": 0, "block": 0, "row": 0}], "stage": "base", "num_steps": 10,
            "rules": ckpt.RULES_VERSION}
    (ck / "meta.json").write_text(json.dumps(meta))
    return ck


def _real_model_state(prepared, path: Path):
    import torch
    from nanochat.gpt import GPT, GPTConfig

    config = GPTConfig.from_args(prepared["recipe"].model, prepared["tokenizer"].vocab_size)
    model = GPT(config)
    model.init_weights()
    torch.save(model.state_dict(), path)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_model_checkpoint(tmp_path, prepared, damage):
    run_dir = tmp_path / "run"
    ck = _fake_checkpoint(prepared, run_dir)
    model_pt = ck / "model.pt"
    if damage == "garbage":
        model_pt.write_bytes(b"this is not a torch checkpoint\x00\x01\x02" * 10)
    else:
        _real_model_state(prepared, model_pt)
        data = model_pt.read_bytes()
        model_pt.write_bytes(data[: len(data) // 2])
    before = files_under(run_dir)
    res = run_cli(TRAIN, TINY, *prepared["overrides"], f"run_dir={run_dir}")
    msg = error_line(res)
    assert str(model_pt) in msg and "corrupt" in msg
    assert str(ck) in msg                          # what to delete
    assert_nothing_written(run_dir, before)


def test_checkpoint_missing_optimizer_state(tmp_path, prepared):
    run_dir = tmp_path / "run"
    ck = _fake_checkpoint(prepared, run_dir)
    _real_model_state(prepared, ck / "model.pt")
    before = files_under(run_dir)
    msg = error_line(run_cli(TRAIN, TINY, *prepared["overrides"], f"run_dir={run_dir}"))
    assert "optim.pt" in msg and str(ck) in msg and "incomplete" in msg
    assert_nothing_written(run_dir, before)


def test_corrupt_checkpoint_meta(tmp_path, prepared):
    run_dir = tmp_path / "run"
    ck = _fake_checkpoint(prepared, run_dir)
    (ck / "meta.json").write_text('{"step": 5, "model_con')
    before = files_under(run_dir)
    msg = error_line(run_cli(TRAIN, TINY, *prepared["overrides"], f"run_dir={run_dir}"))
    assert "meta.json" in msg and str(ck) in msg and "corrupt" in msg
    assert_nothing_written(run_dir, before)


def test_stray_checkpoint_dir_is_ignored(tmp_path, prepared):
    """A directory under checkpoints/ that isn't step_<digits> (e.g. a user's step_final copy) is
    neither resumed from nor a crash."""
    run_dir = tmp_path / "run"
    stray = run_dir / "checkpoints" / "step_final"
    stray.mkdir(parents=True)
    (stray / "meta.json").write_text("{}")
    res = run_cli(TRAIN, TINY, *prepared["overrides"], f"run_dir={run_dir}", "--refuse-existing")
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert (stray / "meta.json").read_text() == "{}"
    assert (run_dir / "checkpoints" / "step_000001" / "model.pt").is_file()


@pytest.mark.parametrize("flag", ["--refuse-existing", "--fresh"])
def test_refuse_existing_refuses_existing_checkpoints(tmp_path, prepared, flag):
    """--refuse-existing (old name --fresh, which still works and says so) refuses a run
    directory that holds checkpoints instead of resuming from them."""
    run_dir = tmp_path / "run"
    ck = _fake_checkpoint(prepared, run_dir)
    before = files_under(run_dir)
    res = run_cli(TRAIN, TINY, *prepared["overrides"], f"run_dir={run_dir}", flag)
    msg = error_line(res)
    assert str(run_dir) in msg and ck.name in msg and "drop --refuse-existing to resume" in msg
    assert ("note: --fresh is now called --refuse-existing" in res.stderr) == (flag == "--fresh")
    assert_nothing_written(run_dir, before)


@pytest.mark.parametrize("script", ["launch", "status", "report", "compare", "ladder", "estimate"])
def test_every_jobs_command_prints_its_help(script):
    res = subprocess.run([sys.executable, f"jobs/{script}.py", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.startswith("usage:") and "Traceback" not in res.stderr


def test_device_batch_does_not_divide_total(tmp_path, prepared):
    run_dir = tmp_path / "run"
    # 256 tokens = 8 rows of 32: legal device batches are the divisors of 8
    res = run_cli(TRAIN, TINY, *prepared["overrides"], "train.total_batch_size=256",
                  "train.device_batch_size=3", f"run_dir={run_dir}")
    msg = error_line(res)
    assert "train.device_batch_size 3" in msg and "train.total_batch_size 256" in msg
    assert "legal device batch sizes: 1, 2, 4, 8" in msg
    assert not run_dir.exists()


def test_bench_needs_fixed_device_batch(tmp_path):
    res = run_cli(BENCH, TINY, *SMALL, "train.device_batch_size=auto",
                  "--compile", "off", "--warmup", "0", "--steps", "1", "--repeats", "1")
    msg = error_line(res)
    assert "train.device_batch_size" in msg


def test_commands_start_without_importing_the_compiler_on_cpu():
    """Every command's imports leave torch._dynamo out on a CPU machine (~1.2 s of each start:
    every CLI call, job, memory probe and rank); it loads when something compiles."""
    import torch
    if torch.cuda.is_available():
        pytest.skip("on CUDA the flex block mask is wrapped in torch.compiler.disable at import")
    mods = ["nanochat.train", "nanochat.sft", "nanochat.eval", "nanochat.chat", "nanochat.check",
            "nanochat.batchsize.probe", "bench.throughput", "nanochat.kv_bench"]
    code = (f"import sys\nfor m in {mods!r}:\n    __import__(m)\n"
            "print(sorted(k for k in sys.modules if k.startswith('torch._dynamo')))")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]", res.stdout
