"""The compute multiplier on the tiny ladder (two of its depths, trained for real): a variant that is
really better gets CM > 1 at every depth, read off the baseline's curve without extrapolation;
another seed of the same recipe lands within the seed spread, and the output says so. One launch
of a grid with an idea's axis and `report.compare` gets the same records in its report."""
from pathlib import Path

import pytest

from jobs import compare, launch, multiplier
from jobs.plan import grid_recipes
from nanochat.common import UserError, cli_main
from nanochat.logfmt import last_summary
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
    better = {r["depth"]: r for r in multiplier.compare(runs["low_lr"], runs["seed42"])[0]}
    assert all(better[r["depth"]]["cm"] > r["seed_cm_hi"] for r in records)


def test_upstreams_interpolation_and_extrapolation_marks():
    curve = [(1.0, 4.0), (2.0, 3.0), (4.0, 2.5)]
    f, extrapolated = multiplier.flops_at_bpb(curve, 3.0)
    assert f == pytest.approx(2.0) and not extrapolated
    f, extrapolated = multiplier.flops_at_bpb(curve, 2.0)   # better than the curve ever got
    assert extrapolated and f > 4.0
    row = {"model_tag": "d2", "depth": 2, "anchor_bpb": 2.0, "baseline_eflops": 8.0,
           "variant_eflops": 4.0, "cm": 2.0, "extrapolated": True}
    assert upstream_parse_record(multiplier.cm_record(row))["cm"] == "2.0000?"


def test_runs_without_a_finished_rung_are_one_clear_error(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(UserError, match="no rung finished pretraining"):
        multiplier.compare(tmp_path / "a", tmp_path / "a")
    with pytest.raises(UserError, match="no such run directory"):
        multiplier.compare(tmp_path / "missing", tmp_path / "a")


# --------------------------------------------------------------------------------------------
# One launch: a grid with a depth axis and an idea's axis, `report.compare: {axis: baseline}`

IDEA = ["grid={model.depth: [2, 3], model.bigram_factor: [0, 5]}", "report.compare={model.bigram_factor: 0}"]


def test_a_grid_with_a_baseline_axis_gets_the_cm_per_depth_in_its_report(corpus, tmp_path, monkeypatch):
    """The hashed bigram against none, at two depths, in one launch (local executor, base and
    report only): the report holds one `cm` record per depth in upstream's grammar, each read off
    the baseline tasks' curves at the variant task's own final val_bpb and FLOPs."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    root, data = tmp_path / "runs", corpus["sections"]["data"]
    assert launch.main([str(REPO / "configs" / "tiny_ladder.yaml"), "--executor", "local", "--output-root", str(root),
                        f"cache_dir={corpus['cache_dir']}", f"data.data_dir={data['data_dir']}",
                        f"data.offline_cache={data['offline_cache']}", "stages=[base, report]"] + IDEA) == 0
    run = root / "tiny_ladder"
    report = (run / "report.md").read_text()
    assert "## The compute multiplier of model.bigram_factor (report.compare; baseline model.bigram_factor=0)" in report
    assert "### model.bigram_factor=5 against model.bigram_factor=0" in report
    records = [r for line in report.splitlines() if (r := upstream_parse_record(line, "cm"))]
    assert [r["depth"] for r in records] == [2, 3]
    # the grid's order: task 0 d2/0, 1 d2/5, 2 d3/0, 3 d3/5; the anchor is the variant task's own result
    for r, variant in zip(records, ("001", "003")):
        summary = last_summary(run / "base" / variant / "base_train.log")
        assert summary["depth"] == r["depth"] and summary["val_bpb"] == pytest.approx(r["anchor_bpb"], abs=1e-6)
        assert float(str(r["cm"]).rstrip("?")) > 0 and r["variant_eflops"] == pytest.approx(summary["eflops"], rel=1e-3)
    assert report.count("no seed runs in this launch") == 2
    assert (run / "compare_model.bigram_factor=5.log").read_text().count("cm model_tag=") == 2
    assert (run / "compare_model.bigram_factor=5.png").read_bytes()[:4] == b"\x89PNG"
    assert "![model.bigram_factor=5 against model.bigram_factor=0](compare_model.bigram_factor=5.png)" in report


@pytest.mark.parametrize("overrides, recipe_grid, message", [
    (["report.compare={model.bigram_factor: 0}"], None,
     "report.compare.model.bigram_factor must be a grid axis other than model.depth (the grid has model.depth)"),
    (IDEA[:1] + ["report.compare={model.bigram_factor: 1}"], None,
     "is the baseline value, 1, which is not among grid.model.bigram_factor's values [0, 5]; name one of them"),
    (IDEA[1:], {"model.bigram_factor": [0, 5]},
     "report.compare needs a grid of exactly two axes, model.depth (the ladder) and model.bigram_factor"),
    (IDEA + ["stages=[base]"], None, "stages must include base and report for report.compare"),
    (["stages=[base, compare]"], None, "stages lists 'compare': the CM of a grid axis is the report's work; set report.compare"),
], ids=["axis not in the grid", "baseline not among its values", "no depth axis", "no report stage", "a compare stage"])
def test_a_bad_report_compare_is_one_line_before_anything_is_submitted(overrides, recipe_grid, message, tmp_path, capsys):
    recipe = REPO / "configs" / "tiny_ladder.yaml"
    if recipe_grid is not None:  # a recipe of its own: an override merges into tiny_ladder's depth axis
        recipe = tmp_path / "no_depth.yaml"
        recipe.write_text(f"name: no_depth\nstages: [base, report]\ngrid: {recipe_grid}\n")
    root = tmp_path / "runs"
    assert cli_main(launch.main, [str(recipe), "--executor", "local", "--output-root", str(root)] + overrides) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not root.exists()
