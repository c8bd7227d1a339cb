"""The third-party example in examples/thumbnails installs with pip and passes its own tests."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_the_thumbnails_example_package(farm_env):
    site = farm_env["tmp"] / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                                str(ROOT / "examples" / "thumbnails")], capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr
    env = {**os.environ, "PYTHONPATH": str(site)}
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            str(ROOT / "examples" / "thumbnails" / "tests")],
                           capture_output=True, text=True, env=env, timeout=600, cwd=farm_env["tmp"])
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert "2 passed" in tests.stdout
