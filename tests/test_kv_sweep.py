"""The KV-cache sweep: its files, its roofline arithmetic, and its command line (bad input
included) — on shapes small enough to sweep in seconds."""
import csv
import json

import pytest
import torch

from nanochat import checkpoint as ckpt
from nanochat.kv_bench import decode_bytes_per_step, sweep_for_recipe
from nanochat.gpt import GPT, GPTConfig
from nanochat.recipe import recipe_from_dict
from test_cli import error_line, run_cli

TINY_SHAPE = {"model": {"depth": 1, "n_embd": 32, "n_head": 1, "sequence_len": 32, "vocab_size": 300},
              "train": {"device": "cpu"}}
FAST = ["kv_bench.batch_sizes=[1,2]", "kv_bench.prompt_len=6", "kv_bench.max_new_tokens=5",
        "kv_bench.warmup=1", "kv_bench.repeats=2", "kv_bench.max_batch_size=4", "model.depth=1",
        "model.n_embd=32", "model.n_head=1", "model.sequence_len=32", "model.vocab_size=300",
        "train.device=cpu"]


def test_sweep_writes_results_json_csv_markdown_and_plot(tmp_path):
    recipe = recipe_from_dict({**TINY_SHAPE, "run_dir": str(tmp_path / "run"),
                               "kv_bench": {"batch_sizes": [1, 2], "prompt_len": 6, "max_new_tokens": 5,
                                         "warmup": 1, "repeats": 2, "max_batch_size": 4}})
    summary = sweep_for_recipe(recipe)
    out = tmp_path / "run" / "kv_sweep"  # the default: under the run directory
    assert summary["out_dir"] == str(out)
    report = json.loads((out / "results.json").read_text())
    assert report["model"]["source"] == "random init (seed 0)", "no checkpoint: random init"
    points = {(r["mode"], r["batch"]) for r in report["results"]}
    assert points == {(m, b) for m in ("cache", "nocache") for b in (1, 2, 4)}, "4 = largest that fits (capped)"
    for r in report["results"]:
        assert r["tok_per_s_min"] <= r["tok_per_s_median"] <= r["tok_per_s_max"]
        assert 0 < r["latency_ms_p50"] <= r["latency_ms_p90"] and r["ttft_ms_median"] > 0
        assert r["peak_mem_gb"] > 0 and 0 < r["roofline_fraction"]
    assert all("speedup_vs_nocache" in r for r in report["results"] if r["mode"] == "cache")
    assert all(r["matmul_floor_tok_per_s"] > 0 and r["matmul_floor_fraction"] > 0
               for r in report["results"] if r["mode"] == "cache"), "every cache point has its floor"
    assert report["memory_bandwidth_gb_s"] > 0 and report["versions"]["torch"] == torch.__version__
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 6 and {"mode", "batch", "tok_per_s_median", "roofline_fraction"} <= set(rows[0])
    table = (out / "results.md").read_text().splitlines()
    assert sum(ln.startswith("| cache |") for ln in table) == 3
    assert (out / "tokens_per_s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*tmp")), "no temporary files left behind"


def test_decode_roofline_bytes_for_the_d4_shape():
    """The issue's figure: a d4 decode step reads ~46 MB of fp32 weights (lm_head + blocks; the
    token embedding only gathers one row per sequence)."""
    with torch.device("meta"):
        model = GPT(GPTConfig(sequence_len=256, vocab_size=32768, n_layer=4, n_head=2, n_kv_head=2,
                              n_embd=256))
    weights = (4 * 12 * 256 * 256 + 32768 * 256) * 4
    assert decode_bytes_per_step(model, 1, 0) == weights + 256 * 4
    assert 45e6 < weights < 47e6
    kv_one_position = 2 * 4 * 2 * 128 * 4  # k and v, 4 layers, 2 heads of 128, fp32
    assert decode_bytes_per_step(model, 8, 100) - decode_bytes_per_step(model, 8, 0) == 8 * 100 * kv_one_position


def test_sweep_cli_with_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=32, vocab_size=300, n_layer=1, n_head=1, n_kv_head=1, n_embd=32)
    model = GPT(config)
    model.init_weights()
    ckpt.save_checkpoint(tmp_path / "trained", 3, model, [], {"model_config": vars(config)})
    res = run_cli("nanochat.kv_bench", "configs/tiny.yaml", *FAST, "kv_bench.include_largest=false",
                  f"run_dir={tmp_path / 'run'}",
                  f"checkpoint={tmp_path / 'trained'}", "--out", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    assert "| cache | 2 |" in res.stdout, "the table is printed"
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert report["model"]["source"].endswith("step_000003")


@pytest.mark.parametrize("override, message", [
    ("kv_bench.batch_sizes=[0,4]", "kv_bench.batch_sizes must be a non-empty list of sizes ≥ 1"),
    ("kv_bench.batch_sizes=[-1]", "kv_bench.batch_sizes must be a non-empty list of sizes ≥ 1"),
    ("kv_bench.prompt_len=40", "longer than the model's context (32 tokens)"),
    ("checkpoint=/nonexistent/run", "no checkpoint found at /nonexistent/run"),
])
def test_sweep_bad_input_is_one_line(override, message, tmp_path):
    res = run_cli("nanochat.kv_bench", "configs/tiny.yaml", *FAST, f"run_dir={tmp_path / 'run'}",
                  override, "--out", tmp_path)
    assert message in error_line(res)
    assert not (tmp_path / "results.json").exists()


def test_every_lm_head_layout_computes_the_same_logits():
    """The decode step's lm_head layouts (decode.py HEAD_LAYOUTS) sum the same products in other
    orders: at batch 1 and 3 each must give the linear layout's logits (fp32: 1e-4)."""
    from nanochat.decode import HEAD_LAYOUTS, DecodeStep, mkl_packed_available
    from nanochat.engine import build_inference_model
    from nanochat.gpt import GPTConfig
    from nanochat.recipe import load_recipe

    recipe = load_recipe("configs/tiny.yaml", [])
    config = GPTConfig.from_args(recipe.model, recipe.model.vocab_size or recipe.tokenizer.vocab_size)
    model = build_inference_model(config, torch.device("cpu"), torch.float32)
    layouts = [h for h in HEAD_LAYOUTS if h != "packed" or mkl_packed_available()]
    assert {"linear", "transposed"} <= set(layouts)
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for batch in (1, 3):
            x = torch.randn(batch, 1, config.n_embd, generator=gen)
            reference = DecodeStep(model, head="linear", batch=batch).head_matmul(x)
            for layout in layouts:
                out = DecodeStep(model, head=layout, batch=batch).head_matmul(x)
                assert out.shape == reference.shape
                torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4, msg=layout)


def test_decode_modes_bench_times_eager_and_compiled_side_by_side(tmp_path):
    res = run_cli("bench.decode_modes", "configs/tiny.yaml", *FAST, f"run_dir={tmp_path / 'run'}",
                  "--rounds", "2")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout[res.stdout.index("{"):])
    rows = {(r["batch"], r["mode"]): r for r in report["results"]}
    assert set(rows) == {(b, m) for b in (1, 2) for m in ("eager", "compiled")}
    for (batch, mode), r in rows.items():
        assert r["tok_per_s_min"] <= r["tok_per_s_median"] <= r["tok_per_s_max"]
        if mode == "eager":
            assert r["vs_eager"] == 1.0 and r["tokens_equal_to_eager"] == 1.0
    for batch in (1, 2):  # compilation happens in the warmup, not in the timed rounds
        assert rows[(batch, "compiled")]["warmup_s"] > rows[(batch, "eager")]["warmup_s"]
    assert report["method"]["rounds"] == 2 and report["versions"]["torch"] == torch.__version__
