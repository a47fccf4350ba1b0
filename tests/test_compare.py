"""The compute multiplier on the tiny ladder (two of its depths, trained for real): a variant that is
really better gets CM > 1 at every depth, read off the baseline's curve without extrapolation;
another seed of the same recipe lands within the seed spread, and the output says so."""
from pathlib import Path

import pytest

from jobs import compare
from jobs.plan import grid_recipes
from nanochat.common import UserError
from nanochat.recipe import load_recipe
from nanochat.train import train_base
from tests.test_logfmt import upstream_parse_record

REPO = Path(__file__).resolve().parent.parent
LOW_LR = ["optim.matrix_lr=0.004", "optim.embedding_lr=0.06", "optim.unembedding_lr=0.0016"]  # a fifth of the recipe's


def train_ladder(root: Path, corpus: dict, overrides: list[str]) -> Path:
    """configs/tiny_ladder.yaml at depths 2 and 3, each rung trained in this process into
    ROOT/base/NNN, as the launcher lays a run out."""
    data = corpus["sections"]["data"]
    recipe = load_recipe(REPO / "configs" / "tiny_ladder.yaml",
                         [f"cache_dir={corpus['cache_dir']}", f"data.data_dir={data['data_dir']}",
                          f"data.offline_cache={data['offline_cache']}", "grid={model.depth: [2, 3]}"] + overrides)
    for i, r in enumerate(grid_recipes(recipe)):
        r.run_dir = str(root / "base" / f"{i:03d}")
        train_base(r)
    return root


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("cm")
    # the baseline with a fifth of the learning rates, trained 3× longer so that its curve
    # reaches the variant's final val_bpb (the CM is then read off it, not extrapolated)
    return {"low_lr": train_ladder(root / "low_lr", corpus, LOW_LR + ["train.target_param_data_ratio=0.3"]),
            **{f"seed{s}": train_ladder(root / f"seed{s}", corpus, [f"train.seed={s}"]) for s in (42, 1, 2, 3)}}


def test_a_really_better_variant_has_cm_above_one_at_every_depth(runs, capsys):
    assert compare.main([str(runs["low_lr"]), str(runs["seed42"])]) == 0
    out = capsys.readouterr().out
    records = [r for line in out.splitlines() if (r := upstream_parse_record(line, "cm"))]
    assert [r["depth"] for r in records] == [2, 3]
    for r in records:
        assert isinstance(r["cm"], float), f"extrapolated: {r}"  # upstream marks those "1.23?" (a string)
        assert r["cm"] > 1.2 and r["baseline_eflops"] > r["variant_eflops"]
    assert "no seed runs given" in out
    png = runs["seed42"] / f"compare_vs_{runs['low_lr'].name}.png"
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert (runs["seed42"] / f"compare_vs_{runs['low_lr'].name}.log").read_text().count("cm model_tag=") == 2


def test_another_seed_is_within_the_seed_spread_and_the_output_says_so(runs, capsys):
    assert compare.main([str(runs["seed42"]), str(runs["seed1"]), "--seed-run", str(runs["seed2"]),
                         "--seed-run", str(runs["seed3"]), "--plot", "none"]) == 0
    out = capsys.readouterr().out
    records = [r for line in out.splitlines() if (r := upstream_parse_record(line, "cm"))]
    assert [r["within_seed_spread"] for r in records] == [1, 1]
    assert all(r["seed_runs"] == 2 and r["seed_cm_lo"] < 1 < r["seed_cm_hi"] for r in records)
    assert out.count("within the seed spread") == 2 and "no effect beyond chance" in out
    # and the better variant's CM lies above that spread at each depth
    better = {r["depth"]: r for r in compare.compare(runs["low_lr"], runs["seed42"])[0]}
    assert all(better[r["depth"]]["cm"] > r["seed_cm_hi"] for r in records)


def test_upstreams_interpolation_and_extrapolation_marks():
    curve = [(1.0, 4.0), (2.0, 3.0), (4.0, 2.5)]
    f, extrapolated = compare.flops_at_bpb(curve, 3.0)
    assert f == pytest.approx(2.0) and not extrapolated
    f, extrapolated = compare.flops_at_bpb(curve, 2.0)   # better than the curve ever got
    assert extrapolated and f > 4.0
    row = {"model_tag": "d2", "depth": 2, "anchor_bpb": 2.0, "baseline_eflops": 8.0,
           "variant_eflops": 4.0, "cm": 2.0, "extrapolated": True}
    assert upstream_parse_record(compare.cm_record(row))["cm"] == "2.0000?"


def test_runs_without_a_finished_rung_are_one_clear_error(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(UserError, match="no rung finished pretraining"):
        compare.compare(tmp_path / "a", tmp_path / "a")
    with pytest.raises(UserError, match="no such run directory"):
        compare.compare(tmp_path / "missing", tmp_path / "a")
