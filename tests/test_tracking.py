"""Experiment tracking with wandb in its offline mode: the run logs what progress.jsonl logs, a
resumed run keeps logging into the same wandb run, the launcher names runs by grid values, the
report links them — and a recipe without a project never touches wandb."""
import json
import struct
import sys
from pathlib import Path

import pytest

from nanochat.recipe import recipe_from_dict
from nanochat.tracking import WANDB_FILE, run_info
from nanochat.train import train_base
from nanochat.plots import read_jsonl
from test_train import stop_after

wandb_pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")


def wandb_history(run_dir: Path) -> list[dict]:
    """Every history row of the run's offline `.wandb` files, read back from disk. The file is
    wandb's record log: a 7-byte header (':W&B', magic, version), then LevelDB-log records in
    32 KiB blocks (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) of protobuf Records."""
    rows = []
    for path in sorted(Path(run_dir).glob("wandb/*run-*/run-*.wandb")):
        data = path.read_bytes()
        assert data[:4] == b":W&B", f"{path} is not a wandb log"
        pos, block, buf = 7, 32768, b""
        while pos + 7 <= len(data):
            if block - pos % block < 7:  # a block's tail too short for a header is padding
                pos += block - pos % block
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
            if kind == 0:
                continue
            buf = chunk if kind in (1, 2) else buf + chunk
            if kind in (1, 4):
                record = wandb_pb.Record()
                record.ParseFromString(buf)
                if record.WhichOneof("record_type") == "history":
                    rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                 for i in record.history.item})
    return rows


@pytest.fixture
def offline_wandb(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))  # not ~/.config
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))


def tracked(tiny_recipe, project="nanochat-test"):
    return recipe_from_dict({**tiny_recipe, "name": "tiny-wb",
                             "train": {**tiny_recipe["train"], "wandb_project": project}})


def test_wandb_logs_what_progress_logs_and_resume_keeps_the_run(offline_wandb, tiny_recipe):
    recipe = tracked(tiny_recipe)
    first = train_base(recipe, stop_requested=stop_after(10))
    assert first.get("stopped")
    run_id = run_info(recipe.out_dir)["id"]
    train_base(recipe)  # resumes from step 10 into the same wandb run
    info = run_info(recipe.out_dir)
    assert info["id"] == run_id, "a resumed run must log into the same wandb run"
    assert info["mode"] == "offline" and info["url"] is None and info["name"] == "tiny-wb (base)"

    progress = read_jsonl(recipe.out_dir / "progress.jsonl")
    history = wandb_history(recipe.out_dir)
    logged_loss = {row["_step"] - 1: row["train/loss"] for row in history if "train/loss" in row}
    logged_bpb = {row["_step"]: row["eval/val_bpb"] for row in history if "eval/val_bpb" in row}
    assert logged_loss == {r["step"]: r["loss"] for r in progress if r["event"] == "train"}
    assert list(logged_loss) == list(range(20))
    assert logged_bpb == {r["step"]: r["val_bpb"] for r in progress if r["event"] == "eval"}
    tok_s = [row["train/tok_per_s"] for row in history if "train/tok_per_s" in row]
    assert tok_s and all(t > 0 for t in tok_s)


def test_no_project_means_no_wandb(tiny_recipe, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # importing wandb would now fail
    recipe = recipe_from_dict(tiny_recipe)
    train_base(recipe)
    assert not (recipe.out_dir / WANDB_FILE).exists() and not (recipe.out_dir / "wandb").exists()


def test_a_project_without_wandb_installed_is_one_line(tiny_recipe, monkeypatch):
    from nanochat.common import UserError
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(UserError, match=r"train.wandb_project is set but wandb is not installed.*pip install"):
        train_base(tracked(tiny_recipe))


def test_launcher_names_runs_by_grid_values_and_report_links_them(offline_wandb, tiny_recipe, tmp_path):
    import yaml
    from jobs.plan import build_plan
    from jobs.manifest import new_manifest, save_manifest
    from jobs.report import write_report
    from jobs.tasks import run_task
    from nanochat.recipe import load_recipe, save_resolved_recipe
    recipe_file = tmp_path / "r.yaml"
    train = {**tiny_recipe["train"], "num_iterations": 4, "eval_every": -1, "wandb_project": "p"}
    recipe_file.write_text(yaml.safe_dump({**tiny_recipe, "name": "g", "train": train,
                                           "stages": ["base", "report"],
                                           "grid": {"optim.matrix_lr": [0.01, 0.02]}}))
    run = tmp_path / "runs" / "g"
    recipe = load_recipe(recipe_file, [f"run_dir={run}"])
    plan = build_plan(recipe, run)
    run.mkdir(parents=True)
    save_resolved_recipe(recipe, run / "recipe.yaml")
    save_manifest(run, new_manifest(plan, "local"))
    for i in range(2):
        run_task(str(run), "base", i)
    names = [run_info(run / "base" / f"{i:03d}")["name"] for i in range(2)]
    assert names == ["g optim.matrix_lr=0.01 (base)", "g optim.matrix_lr=0.02 (base)"]
    report = write_report(run).read_text()
    assert "## Experiment tracking (wandb)" in report
    for i in range(2):
        d = run_info(run / "base" / f"{i:03d}")["dir"]
        assert f"offline run `{d}` (upload: `wandb sync {d}`)" in report
