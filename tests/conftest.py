"""Shared fixtures: an isolated state dir and config for every test, the real `farm`
command, and test media made by ffmpeg's lavfi sources (never committed)."""

from __future__ import annotations

import compileall
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


def pytest_sessionstart(session):
    """Farm's bytecode brought up to date before the workers start, as ./setup made it
    (see there why): files edited since are compiled once, not in every farm process."""
    if not hasattr(session.config, "workerinput"):
        for package in ("farm", "plugins"):
            compileall.compile_dir(ROOT / package, quiet=1, workers=0)


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (pyproject's addopts): two workers per core. A test spends most of its
    time waiting on its child processes (controllers, nodes, Dask start-up, segment
    scripts that hold until told), so one per core leaves the cores idle half the time.
    ``PYTEST_XDIST_AUTO_NUM_WORKERS`` overrides it."""
    return 2 * (len(os.sched_getaffinity(0)) or 1)


@pytest.fixture(autouse=True)
def private_user_dirs(tmp_path_factory, monkeypatch):
    """Every test gets its own platform config and state folders (XDG_*), so that no test
    reads or writes the real user's store, farm.yaml or quickcluster client file, and
    tests running side by side (pytest-xdist workers) never share one by default."""
    home = tmp_path_factory.mktemp("xdg")
    # caches stay shared: fontconfig, Mesa and Blender would rebuild theirs in every test
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / "config"))
    monkeypatch.setenv("XDG_STATE_HOME", str(home / "state"))
    # Farm's answers of programs (their versions) are shared by the tests of one worker, and
    # never reach the user's own cache: the tests' fake programs would be kept there.
    monkeypatch.setenv("FARM_CACHE", str(tmp_path_factory.getbasetemp() / "farm-cache"))


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
    """Run the real `farm` command in a child process (forked ready-started: tests/farmfork.py);
    returns a Result."""
    import farmfork

    def run(*args: str, timeout: float = 300, cwd: Path | None = None) -> Result:
        return Result(*farmfork.run([str(arg) for arg in args], env=os.environ.copy(), cwd=cwd or farm_env["tmp"],
                                    timeout=timeout))

    return run


def running_with(marker: str, under: int | None = None) -> list[int]:
    """Host pids of the live processes whose command line holds ``marker`` (a script's
    path), and of their descendants; with ``under``, only those descended from that pid.
    A sandboxed process sees only its own pid namespace, so it cannot report its host pid
    itself."""
    parents: dict[int, int] = {}
    marked: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if stat[0] == "Z":
            continue
        parents[int(entry.name)] = int(stat[1])
        if marker in cmdline and int(entry.name) != os.getpid():
            marked.add(int(entry.name))
    if under is not None:
        marked = {pid for pid in marked if under in ancestors(pid, parents)}
    found, grew = set(marked), True
    while grew:
        children = {pid for pid, parent in parents.items() if parent in found} - found
        found |= children
        grew = bool(children)
    return sorted(found)


def ancestors(pid: int, parents: dict[int, int]) -> set[int]:
    seen: set[int] = set()
    while pid in parents and pid not in seen:
        seen.add(pid)
        pid = parents[pid]
    return seen | {pid}


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (not gone, not a zombie)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


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


@pytest.fixture
def tmpfs():
    """``mount(folder, size)``: a small tmpfs at ``folder`` (root only, else the test is
    skipped), unmounted at teardown. A fixture that starts processes using the mount
    should be set up after this one, so that it is torn down before the unmount."""
    mounted: list[Path] = []

    def mount(folder: Path, size: str) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs (a disk that fills up) needs root")
        folder.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in reversed(mounted):
        # lazy: a process that still holds a file there must not keep the mount behind
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill_disk(folder: Path, leave: int = 0) -> Path:
    """Fill the file system holding ``folder`` with one file, leaving about ``leave``
    bytes free; returns the file (delete it to free the space)."""
    filler = folder / "filler"
    descriptor = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        block = b"\0" * 65536
        while True:
            try:
                os.write(descriptor, block)
            except OSError:  # ENOSPC; smaller writes take the last partial block
                if len(block) == 512:
                    break
                block = block[: len(block) // 2]
    finally:
        os.close(descriptor)
    if leave:
        os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler
