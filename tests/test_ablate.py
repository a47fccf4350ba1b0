"""The ablation bench (bench/ablate.py) on a 2-layer model for a few steps: its table's
rows and columns, the same tokens and seed in every run, the switches really on, its files."""
import json

import pytest
import yaml

from bench import ablate
from nanochat.common import UserError


@pytest.fixture
def recipe_path(tiny_recipe, tmp_path):
    r = {k: v for k, v in tiny_recipe.items() if k != "run_dir"}
    path = tmp_path / "ablate.yaml"
    path.write_text(yaml.safe_dump(r))
    return str(path)


def test_ablation_table_rows_columns_and_shared_tokens_and_seed(recipe_path, tmp_path, capsys):
    out = tmp_path / "out"
    assert ablate.main([recipe_path, "--steps", "3", "--rows", "2", "--evals", "1",
                        "--eval-tokens", "1024", "--only", "smear,value_embeds",
                        "--speed-windows", "2", "--speed-steps", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "ablate.json").read_text())
    rows = {r["run"]: r for r in report["rows"]}
    assert list(rows) == ["dense", "smear", "value_embeds", "all"]
    for col in ablate.COLUMNS:
        assert all(col in r for r in rows.values()), f"column {col} missing"
    header = printed.splitlines()[[i for i, ln in enumerate(printed.splitlines())
                                   if ln.startswith("| run |")][0]]
    for title in ("val BPB", "tokens/s", "params", "FLOPs/token", "wall s"):
        assert title in header
    for name in rows:
        assert f"| {name} |" in printed, f"row {name} not printed"
    # the same tokens in the same order and the same seed in every run
    assert len({r["tokens"] for r in rows.values()}) == 1 and rows["dense"]["tokens"] == 3 * 2 * 64
    assert len({json.dumps(r["loader_end"]) for r in rows.values()}) == 1
    assert len({r["seed"] for r in rows.values()}) == 1
    # the switches are on where the table says: value embeddings add parameters, "all" has both
    assert rows["dense"]["params"] < rows["smear"]["params"] < rows["value_embeds"]["params"] \
        < rows["all"]["params"]
    assert rows["dense"]["d_bpb"] == 0 and rows["dense"]["d_tok_s_pct"] == 0
    assert all(r["val_bpb"] > 0 and r["tok_per_s"] > 0 for r in rows.values())
    assert (out / "ablate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    speed = report["speed_interleaved"]
    assert speed["dense"]["n"] == speed["all"]["n"] == 2 and speed["all"]["over_dense"] > 0
    assert "all / dense tokens/s" in printed


def test_unknown_switch_is_one_clear_error(recipe_path):
    with pytest.raises(UserError, match="--only: unknown switch smeer; the switches are value_embeds"):
        ablate.main([recipe_path, "--only", "smeer"])


def test_plan_has_dense_each_switch_and_all():
    runs = ablate.plan(None)
    assert list(runs) == ["dense", *ablate.SWITCHES, "all"]
    assert runs["dense"] == {}
    assert runs["all"] == {k: v for s in ablate.SWITCHES.values() for k, v in s.items()}


def test_the_kit_plans_baseline_is_the_d12_recipes_switches():
    """--plan kit's baseline is upstream's recipe: every model and optimizer switch of
    configs/d12.yaml (tests/test_upstream_parity.py pins that to upstream), on the small shape;
    its variants differ from it only in the kit's additions."""
    from pathlib import Path
    from nanochat.recipe import load_recipe
    repo = Path(__file__).resolve().parents[1]
    d12 = load_recipe(repo / "configs" / "d12.yaml")
    small = load_recipe(repo / "configs" / "tiny.yaml", [f"{k}={v}" for k, v in ablate.PARITY.items()])
    for f in ("value_embeds", "window_pattern", "smear", "backout", "residual_scalars", "qk_gain",
              "rotary_base", "bigram_factor"):
        assert getattr(small.model, f) == getattr(d12.model, f), f
    for f in ("row_equilibrate", "muon_plus", "variance_reduction", "muon_weight_decay",
              "variance_reduction_beta2", "muon_momentum", "muon_momentum_final",
              "resid_lr_frac", "adamw_roles", "smear_lr"):
        assert getattr(small.optim, f) == getattr(d12.optim, f), f
    assert set(ablate.KIT_RUNS["+bigram -roweq/muon+"]) == \
        set(ablate.KIT_RUNS["+bigram"]) | set(ablate.KIT_RUNS["-roweq/muon+"])
    with pytest.raises(UserError, match="--seeds must be ≥ 2"):
        ablate.main([str(repo / "configs" / "tiny.yaml"), "--plan", "kit", "--seeds", "1"])
