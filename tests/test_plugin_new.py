"""`farm plugin new` writes a package that installs with pip and passes its own tests."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_a_scaffolded_plugin_installs_and_passes_its_tests(farm, farm_env):
    created = farm("plugin", "new", "contact-sheet", "--dir", farm_env["tmp"] / "gen")
    assert created.returncode == 0, created.stderr
    site = farm_env["tmp"] / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                                str(farm_env["tmp"] / "gen")], capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr
    env = {**os.environ, "PYTHONPATH": str(site)}
    listed = subprocess.run([sys.executable, "-m", "farm.cli", "plugins", "--json"], capture_output=True, text=True,
                            env=env)
    assert "contact-sheet" in listed.stdout
    # the generated references document what ships with Farm, whatever else is installed
    docs = subprocess.run([sys.executable, str(ROOT / "docs" / "generate.py"), "--check"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert docs.returncode == 0, docs.stderr
    # run from a folder holding a `farm/` checkout, as a plugin author next to Farm's clone would
    shadow = farm_env["tmp"] / "beside-a-checkout"
    (shadow / "farm").mkdir(parents=True)
    (shadow / "farm" / "__init__.py").write_text("raise ImportError('the checkout, not the installed farm')\n")
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            str(farm_env["tmp"] / "gen" / "tests")],
                           capture_output=True, text=True, env=env, timeout=300, cwd=shadow)
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert "1 passed" in tests.stdout


@pytest.mark.parametrize("name, message", [("Bad Name", "lowercase"), ("9lives", "starting with a letter")])
def test_bad_plugin_names_are_refused(farm, farm_env, name, message):
    result = farm("plugin", "new", name, "--dir", farm_env["tmp"] / "x")
    assert result.returncode == 2 and message in result.stderr


def test_an_existing_folder_is_not_overwritten(farm, farm_env):
    (farm_env["tmp"] / "taken").mkdir()
    (farm_env["tmp"] / "taken" / "keep.txt").write_text("mine")
    result = farm("plugin", "new", "thing", "--dir", farm_env["tmp"] / "taken")
    assert result.returncode == 2 and "is not empty" in result.stderr
    assert (farm_env["tmp"] / "taken" / "keep.txt").read_text() == "mine"
