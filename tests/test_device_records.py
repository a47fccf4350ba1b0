"""Discovery's targets: a login node finds the answer cached for the device its partition gives
(recorded by discover jobs), and refuses a record it cannot trust, saying why."""
import json

import pytest

from nanochat.batchsize.search import cached_result, discover
from nanochat.common import UserError
from nanochat.config import DEVICE_NAME_ENV
from nanochat.recipe import recipe_from_dict
from jobs.device_records import partition_target, record_device, record_path
from nanochat.batchsize.devices import resolve_target


def recipe_for(tmp_path, **cluster):
    return recipe_from_dict({
        "cache_dir": str(tmp_path / "cache"),
        "model": {"depth": 1, "n_embd": 32, "n_head": 1, "sequence_len": 32, "vocab_size": 256},
        "train": {"device": "cpu", "total_batch_size": 32 * 8, "device_batch_size": "auto"},
        "discovery": {"cache_dir": str(tmp_path / "bs"), "memory_budget_gb": 4.0, "max_batch_size": 8},
        "cluster": {"partition": "a100", **cluster}})


def test_a_login_node_finds_the_answer_cached_for_its_partitions_device(tmp_path, monkeypatch):
    recipe = recipe_for(tmp_path)
    d = discover(recipe)                                    # the discover job, on the compute node
    assert record_device(recipe) == record_path(recipe)
    monkeypatch.setenv(DEVICE_NAME_ENV, "login-node-cpu")   # the launcher: another machine
    assert resolve_target(recipe).name == "login-node-cpu"
    assert cached_result(recipe) is None, "the login node's own device has no answer"
    target, why = partition_target(recipe)
    assert target is not None, why
    assert target.name != "login-node-cpu" and "gives" in why
    hit = cached_result(recipe, target=target)
    assert hit is not None and hit["result"]["batch_size"] == d.batch_size


def test_no_record_says_why_and_no_partition_means_the_default_one(tmp_path):
    assert partition_target(recipe_for(tmp_path))[1].startswith("no device record for partition a100")
    no_partition = recipe_for(tmp_path, partition=None)
    assert partition_target(no_partition)[1].startswith("no device record for partition default")
    assert record_device(no_partition).name == "default.json"
    assert partition_target(no_partition)[0] is not None


def test_a_partition_with_mixed_devices_needs_a_constraint(tmp_path, monkeypatch):
    recipe = recipe_for(tmp_path)
    record_device(recipe)
    monkeypatch.setenv(DEVICE_NAME_ENV, "another-cpu")
    record_device(recipe)
    target, why = partition_target(recipe)
    assert target is None and "different devices" in why and "cluster.constraint" in why
    pinned = recipe_for(tmp_path, constraint="a100_80g")  # its own record
    record_device(pinned)
    assert partition_target(pinned)[0].name == "another-cpu"


def test_stale_and_corrupt_records_are_not_trusted(tmp_path, capfd):
    recipe = recipe_for(tmp_path)
    path = record_device(recipe)
    rec = json.loads(path.read_text())
    (dev,) = rec["devices"].values()
    dev["torch_version"] = "2.0.0"
    path.write_text(json.dumps(rec))
    assert "stale: written under torch 2.0.0" in partition_target(recipe)[1]
    dev["torch_version"] = resolve_target(recipe).torch_version
    dev["date"] = "2020-01-01T00:00:00+00:00"
    path.write_text(json.dumps(rec))
    assert "stale" in partition_target(recipe)[1] and "days old" in partition_target(recipe)[1]
    path.write_text("{not json")
    target, why = partition_target(recipe)
    assert target is None and "no device record" in why
    assert "is corrupt" in capfd.readouterr().err
    assert record_device(recipe) == path, "a corrupt record is rewritten by the next discover job"
    assert partition_target(recipe)[0] is not None


def test_auto_on_a_device_discovery_cannot_measure_is_one_line(tmp_path, monkeypatch):
    import nanochat.batchsize.devices as targets
    monkeypatch.setattr(targets, "pick_device", lambda requested: "mps")  # no MPS machine here
    with pytest.raises(UserError, match=r"sft.device_batch_size is 'auto'.*not mps; set sft.device_batch_size to an integer"):
        resolve_target(recipe_for(tmp_path), stage="sft")


# --------------------------------------------------------------------------------------------
# Laptops: memory through psutil (Linux and macOS), Apple's mps refused in one line

def test_memory_readings_through_psutil_equal_the_kernels_own(tmp_path):
    """On Linux psutil's figures are /proc's to the byte (the probe's readings did not change)."""
    import re
    import psutil
    from nanochat.batchsize.probe import host_ram_bytes, proc_status
    status = open("/proc/self/status").read()
    kernel = {f: int(re.search(rf"{f}:\s+(\d+)", status).group(1)) * 1024 for f in ("VmRSS", "RssAnon", "VmSize")}
    ours = {f: proc_status(f) for f in ("VmRSS", "RssAnon", "VmSize")}
    assert all(abs(ours[f] - kernel[f]) <= 4 << 20 for f in kernel), (ours, kernel)  # the reads are µs apart
    assert proc_status("VmHWM") >= proc_status("VmRSS") - (4 << 20)
    assert host_ram_bytes() <= psutil.virtual_memory().total
    mem_total = int(re.search(r"MemTotal:\s+(\d+)", open("/proc/meminfo").read()).group(1)) * 1024
    assert psutil.virtual_memory().total == mem_total


@pytest.mark.parametrize("stage,key", [("base", "train.device_batch_size"), ("sft", "sft.device_batch_size")])
def test_discovery_on_mps_is_refused_in_one_line_naming_the_key(tmp_path, stage, key):
    recipe = recipe_from_dict({**{k: v for k, v in dataclass_dict(recipe_for(tmp_path)).items()},
                               "train": {"device": "mps", "total_batch_size": 256, "device_batch_size": "auto"}})
    with pytest.raises(UserError) as e:
        resolve_target(recipe, stage)
    assert str(e.value) == (f"{key} is 'auto', but batch-size discovery measures cuda and cpu devices, "
                            f"not mps; set {key} to an integer")


def dataclass_dict(recipe):
    import dataclasses
    return {k: v for k, v in dataclasses.asdict(recipe).items() if k in ("cache_dir", "model", "discovery")}
