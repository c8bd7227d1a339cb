"""The first hour of a new user (issue 20): a quickcluster that clients on its machine
reach with no options, that takes its node with it however it ends; `farm logs`;
`farm purge`; error messages that blame the right thing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml

from tests.cluster_helpers import Cluster, free_port
from tests.conftest import FARM, ROOT, Result

EXAMPLE = ROOT / "examples" / "testsrc-frames.yaml"
SMALL = ["--set", "frames=1-4", "--set", "segment.frames=2"]


def clean_env(home: Path) -> dict[str, str]:
    """A new user's environment: no FARM_* variables, nothing in the config dir but what
    Farm itself writes (a private HOME keeps the test off the real one)."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("FARM_", "XDG_", "DASK_"))}
    env["HOME"] = str(home)
    return env


def run(env: dict[str, str], *args: str, cwd: Path, timeout: float = 120) -> Result:
    proc = subprocess.run([*FARM, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    return Result(proc.returncode, proc.stdout, proc.stderr)


class QuickCluster:
    def __init__(self, home: Path):
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        self.env = clean_env(home)
        self.log = home / "quickcluster.log"
        self.proc = subprocess.Popen(
            [*FARM, "quickcluster", "--slots", "2", "--api-port", str(free_port()), "--port", str(free_port())],
            env=self.env, cwd=home, stdout=open(self.log, "w"), stderr=subprocess.STDOUT)

    def farm(self, *args: str, timeout: float = 120) -> Result:
        return run(self.env, *args, cwd=self.home, timeout=timeout)

    def nodes(self) -> list[dict]:
        result = self.farm("nodes", "--json", timeout=60)
        return json.loads(result.stdout) if result.returncode == 0 else []

    def wait_until_ready(self) -> list[dict]:
        def ready():
            assert self.proc.poll() is None, self.log.read_text()
            return [node for node in self.nodes() if node["state"] == "idle"]
        return Cluster.wait_until(ready, 120, "the quickcluster's node, through `farm nodes` with no options")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def quick(tmp_path):
    cluster = QuickCluster(tmp_path / "home")
    yield cluster
    cluster.stop()


def test_a_quickcluster_is_reached_with_no_options_and_its_file_goes_with_it(quick, tmp_path):
    nodes = quick.wait_until_ready()
    assert len(nodes) == 1 and nodes[0]["slots"] == 2
    banner = quick.log.read_text()
    name = banner.split()[1].rstrip(":")
    assert name.startswith("quickcluster-") and len(name.rsplit("-", 1)[1]) == 6, banner  # host and a short id
    assert "farm node --bundle node.yaml --controller https://" in banner  # the line for another machine

    out = tmp_path / "out"
    submitted = quick.farm("submit", EXAMPLE, *SMALL, "-o", out, "--wait", "--json")
    assert submitted.returncode == 0, submitted.stderr
    assert sorted(p.name for p in out.iterdir()) == [f"testsrc_{n:04d}.png" for n in range(1, 5)]
    job = submitted.json()["jobs"][0]["id"]
    status = quick.farm("status", job, "--json")
    assert status.returncode == 0, status.stderr
    assert status.json()["state"] == "done"

    script = ("import sys, farm\n"
              "batch = farm.submit(sys.argv[1], destination=sys.argv[2], overrides=sys.argv[3:]).wait(120)\n"
              "print(' '.join(job.state for job in batch.jobs))\n")
    api_out = tmp_path / "api-out"
    api = subprocess.run([sys.executable, "-c", script, str(EXAMPLE), str(api_out), "frames=1-2", "segment.frames=2"],
                         capture_output=True, text=True, env=quick.env, cwd=quick.home, timeout=180)
    assert api.returncode == 0, api.stderr
    assert api.stdout.split() == ["done"]
    assert sorted(p.name for p in api_out.iterdir()) == ["testsrc_0001.png", "testsrc_0002.png"]

    client_file = quick.home / ".config" / "farm" / "quickcluster.yaml"
    assert client_file.exists()
    https = yaml.safe_load(client_file.read_text())["urls"][0]
    plain = quick.farm("nodes", "--controller", https.replace("https://", "http://"))
    assert plain.returncode == 2 and f"use {https}" in plain.stderr, plain.stderr
    quick.stop()
    assert quick.proc.returncode == 0, quick.log.read_text()
    assert not client_file.exists()
    gone = quick.farm("nodes")
    assert gone.returncode == 2 and "no client file" in gone.stderr and "quickcluster" in gone.stderr


def test_a_quickcluster_killed_outright_takes_its_node_with_it(quick):
    quick.wait_until_ready()
    family = psutil.Process(quick.proc.pid).children(recursive=True)
    assert any("node" in proc.cmdline() for proc in family)
    quick.proc.kill()
    quick.proc.wait()

    def all_gone() -> bool:
        return not [proc for proc in family if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE]
    Cluster.wait_until(all_gone, 5, "the node and its worker to stop after the quickcluster was SIGKILLed", every=0.1)
    # the client file it left is not taken for a running quickcluster
    left = quick.farm("nodes")
    assert left.returncode == 2 and "no client file" in left.stderr


def test_a_node_without_its_controller_stops_on_sigterm(tmp_path):
    cluster = Cluster(tmp_path / "c")  # never started: the node finds nobody
    node = cluster.start_node("lonely")
    try:
        Cluster.wait_until(lambda: "no controller for cluster" in (cluster.root / "node-lonely.log").read_text(), 60,
                           "the node to look for its controller")
        node.send_signal(signal.SIGTERM)
        node.wait(timeout=5)
    finally:
        cluster.stop()


def test_a_wrong_set_is_blamed_not_the_profile(farm):
    wrong = farm("plan", "h264-web-720p", "--set", "video.crf=18")
    assert wrong.returncode == 2
    assert wrong.stderr.startswith("farm: error: --set video.crf=18: video: unknown key 'video'"), wrong.stderr
    assert "settings.video.crf=18" in wrong.stderr and ".yaml" not in wrong.stderr
