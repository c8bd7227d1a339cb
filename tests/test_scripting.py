"""The Python API: run, start, job handles, errors; and the example script that uses it."""

from __future__ import annotations

import subprocess
import sys

import pytest

import farm
from farm.errors import FarmError
from tests.conftest import ROOT, write_profile


def test_run_returns_a_finished_batch(farm_env):
    batch = farm.run(ROOT / "examples" / "testsrc-frames.yaml", destination=farm_env["tmp"] / "out",
                     overrides=["frames=1-12"])
    (job,) = batch.jobs
    assert job.state == "done" and job.error is None
    assert len(job.outputs) == 12 and len(list((farm_env["tmp"] / "out").iterdir())) == 12


def test_start_then_cancel_a_running_job(farm_env):
    profile = write_profile(farm_env["tmp"], "slow", {
        "processor": "command", "frames": "1-4",
        "settings": {"command": [sys.executable, "-c", "import time; time.sleep(30)", "{start}"]},
    })
    with farm.start(profile, destination=farm_env["tmp"] / "out") as batch:
        (job,) = batch.jobs
        job.cancel()
        assert job.wait(timeout=30) == "cancelled"


def test_bad_input_is_a_farm_error_with_the_reason(farm_env):
    with pytest.raises(FarmError, match="unknown profile 'nope'"):
        farm.run("nope")
    with pytest.raises(FarmError, match="does not exist"):
        farm.run(ROOT / "profiles" / "frames-png.yaml", inputs=[farm_env["tmp"] / "missing.mov"])


@pytest.mark.slow
def test_the_example_script_runs_a_batch(farm_env):
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "submit_batch.py"), str(farm_env["tmp"] / "out")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "done: 20 files" in result.stdout
