"""The torch floor pyproject.toml declares is the release CI tests on: a floor below it admits
versions no test has run (torch 2.5–2.12 raised TypeError when DDP was built with 2.13's
`forward_sync_buffers`, which pyproject's old floor of 2.5.1 allowed)."""
import re
from pathlib import Path

import torch
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]


def declared_floor() -> Version:
    text = (REPO / "pyproject.toml").read_text()
    m = re.search(r'"torch>=([0-9.]+)"', text)
    assert m, "pyproject.toml declares torch>=X"
    return Version(m.group(1))


def tested_version() -> Version:
    m = re.search(r"torch==([0-9.]+)", (REPO / ".ci" / "run").read_text())
    assert m, ".ci/run pins the torch it tests with (torch==X)"
    return Version(m.group(1))


def test_the_declared_torch_floor_is_the_release_ci_tests():
    assert declared_floor() == tested_version(), \
        "raise pyproject's torch floor with .ci/run's pin (or test the lower one in CI)"


def test_the_installed_torch_is_at_least_the_floor():
    installed = Version(torch.__version__.split("+")[0])
    assert installed >= declared_floor(), f"torch {installed} is below the declared floor"
