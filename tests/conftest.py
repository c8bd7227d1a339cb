"""Shared fixtures: an isolated state dir and config for every test, the real `farm`
command, and test media made by ffmpeg's lavfi sources (never committed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
FARM = [sys.executable, "-m", "farm.cli"]


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    def json(self):
        return json.loads(self.stdout)


@pytest.fixture
def farm_env(tmp_path, monkeypatch):
    """A private state dir and farm.yaml for this test (in the environment of child processes too)."""
    state = tmp_path / "state"
    config = tmp_path / "farm.yaml"
    config.write_text(yaml.safe_dump({"node": {"allow_commands": ["ffmpeg", sys.executable], "kill_grace": 1.0}}))
    monkeypatch.setenv("FARM_STATE", str(state))
    monkeypatch.setenv("FARM_CONFIG", str(config))
    return {"state": state, "config": config, "tmp": tmp_path}


def write_config(farm_env, **node):
    data = yaml.safe_load(farm_env["config"].read_text())
    data["node"].update(node)
    farm_env["config"].write_text(yaml.safe_dump(data))


@pytest.fixture
def farm(farm_env):
    """Run the real `farm` command in a child process; returns a Result."""

    def run(*args: str, timeout: float = 300, cwd: Path | None = None) -> Result:
        proc = subprocess.run(
            [*FARM, *map(str, args)], capture_output=True, text=True, timeout=timeout,
            cwd=cwd or farm_env["tmp"], env=os.environ.copy(),
        )
        return Result(proc.returncode, proc.stdout, proc.stderr)

    return run


def write_profile(folder: Path, name: str, data: dict) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, **data}, sort_keys=False))
    return path


def lavfi(path: Path, *, seconds: float = 2.0, size: str = "320x240", rate: int = 25,
          audio: bool = False, extra: list[str] | None = None) -> Path:
    """Make a test movie with ffmpeg's lavfi sources."""
    cmd = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-y",
           "-f", "lavfi", "-i", f"testsrc2=size={size}:rate={rate}:duration={seconds}"]
    if audio:
        cmd += ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:duration={seconds}"]
    cmd += ["-pix_fmt", "yuv420p", *(extra or []), str(path)]
    subprocess.run(cmd, check=True)
    return path
