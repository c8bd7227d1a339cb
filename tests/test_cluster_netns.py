"""Three hosts in network namespaces joined by a bridge: the nodes find the controller
by zeroconf alone, over real interfaces with their own addresses (root only)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid

import pytest
import yaml

from tests.conftest import FARM, write_profile

pytestmark = pytest.mark.slow


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


def _namespaces_possible() -> str | None:
    if os.geteuid() != 0:
        return "needs root to make network namespaces"
    if not shutil.which("ip"):
        return "needs iproute2 (`ip`)"
    probe = f"farmprobe{uuid.uuid4().hex[:6]}"
    try:
        _run("ip", "netns", "add", probe)
    except subprocess.CalledProcessError as exc:
        return f"cannot make a network namespace here: {exc.stderr.decode().strip()}"
    _run("ip", "netns", "del", probe)
    return None


@pytest.fixture
def hosts():
    why = _namespaces_possible()
    if why:
        pytest.skip(why)
    tag = uuid.uuid4().hex[:5]
    switch, names = f"fsw{tag}", {role: f"f{role}{tag}" for role in ("ctl", "n1", "n2")}
    addresses = {"ctl": "10.77.0.1", "n1": "10.77.0.2", "n2": "10.77.0.3"}
    _run("ip", "netns", "add", switch)
    _run("ip", "-n", switch, "link", "add", "br0", "type", "bridge")
    _run("ip", "-n", switch, "link", "set", "br0", "up")
    for role, ns in names.items():
        _run("ip", "netns", "add", ns)
        _run("ip", "-n", switch, "link", "add", f"p{role}", "type", "veth", "peer", "name", "eth0", "netns", ns)
        _run("ip", "-n", switch, "link", "set", f"p{role}", "master", "br0", "up")
        _run("ip", "-n", ns, "addr", "add", f"{addresses[role]}/24", "dev", "eth0")
        _run("ip", "-n", ns, "link", "set", "eth0", "up")
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        _run("ip", "-n", ns, "route", "add", "224.0.0.0/4", "dev", "eth0")  # mDNS multicast
    yield names, addresses
    for ns in [*names.values(), switch]:
        subprocess.run(["ip", "netns", "pids", ns], capture_output=True)
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
        for pid in pids:
            subprocess.run(["kill", "-9", pid], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_nodes_find_the_controller_by_zeroconf_alone_across_hosts(hosts, tmp_path):
    names, addresses = hosts
    bundles = tmp_path / "bundles"
    subprocess.run([*FARM, "cluster", "init", "nsfarm", "--dir", str(bundles)], check=True, capture_output=True)
    subprocess.run([*FARM, "cluster", "init", "strangers", "--dir", str(tmp_path / "other")], check=True,
                   capture_output=True)
    config = tmp_path / "farm.yaml"
    config.write_text(yaml.safe_dump({
        "node": {"allow_commands": [sys.executable]},
        "controller": {"host": addresses["ctl"], "api_port": 8780, "scheduler_port": 8786,
                       "storage": str(tmp_path / "storage")},
    }))
    env = {**os.environ, "FARM_CONFIG": str(config), "FARM_STATE": str(tmp_path / "state"),
           "DASK_LOGGING__DISTRIBUTED": "warning"}

    def in_ns(role: str, *args: str, log: str | None = None, extra_env: dict | None = None):
        command = ["ip", "netns", "exec", names[role], *FARM, *args]
        if log:
            return subprocess.Popen(command, env={**env, **(extra_env or {})}, stdout=open(tmp_path / log, "w"),
                                    stderr=subprocess.STDOUT, cwd=tmp_path)
        return subprocess.run(command, env={**env, **(extra_env or {})}, capture_output=True, text=True,
                              timeout=120, cwd=tmp_path)

    node_env = {"FARM_BUNDLE": str(bundles / "node.yaml")}
    in_ns("ctl", "controller", "--bundle", str(bundles / "controller.yaml"), log="controller.log")
    in_ns("n1", "node", "--cluster", "nsfarm", "--name", "n1", log="n1.log", extra_env=node_env)
    in_ns("n2", "node", "--cluster", "nsfarm", "--name", "intruder", log="n2.log",
          extra_env={"FARM_BUNDLE": str(tmp_path / "other" / "node.yaml")})

    # people use the admin's client file; node.yaml's token only finds the scheduler
    client_env = {"FARM_CLIENT": str(bundles / "admin.yaml"), "FARM_CONTROLLER": f"https://{addresses['ctl']}:8780"}
    deadline = time.monotonic() + 180
    nodes: list = []
    while time.monotonic() < deadline:
        result = in_ns("n1", "nodes", "--json", extra_env=client_env)
        nodes = json.loads(result.stdout) if result.returncode == 0 else []
        if nodes:
            break
        time.sleep(1)
    assert [n["name"] for n in nodes] == ["n1"], (tmp_path / "n1.log").read_text()[-2000:]
    assert nodes[0]["address"].startswith(f"tls://{addresses['n1']}:")  # a real interface, not loopback

    profile = write_profile(tmp_path, "ns", {
        "processor": "command", "frames": "1-4", "segment": {"frames": 1},
        "settings": {"command": [sys.executable, "-c",
                                 "import sys, pathlib; pathlib.Path(sys.argv[1], 'f' + sys.argv[2] + '.txt').write_text('x')",
                                 "{output_dir}", "{start}"]},
    })
    done = in_ns("n1", "submit", str(profile), "-o", str(tmp_path / "out"), "--wait", "--json", extra_env=client_env)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["f1.txt", "f2.txt", "f3.txt", "f4.txt"]

    # the stranger never joined, and the API refuses a request without the token
    assert [n["name"] for n in json.loads(in_ns("n1", "nodes", "--json", extra_env=client_env).stdout)] == ["n1"]
    probe = in_ns("n2", "--version")
    assert probe.returncode == 0
    curl = subprocess.run(["ip", "netns", "exec", names["n2"], sys.executable, "-c",
                           f"import httpx; print(httpx.get('https://{addresses['ctl']}:8780/api/jobs', verify=False).status_code)"],
                          capture_output=True, text=True, timeout=60)
    assert curl.stdout.strip() == "401", curl.stderr


def test_a_node_cut_off_from_the_network_loses_its_work_to_others_and_rejoins(hosts, tmp_path):
    names, addresses = hosts
    bundles = tmp_path / "bundles"
    subprocess.run([*FARM, "cluster", "init", "cutfarm", "--dir", str(bundles)], check=True, capture_output=True)
    config = tmp_path / "farm.yaml"
    config.write_text(yaml.safe_dump({
        "node": {"allow_commands": [sys.executable]},
        "controller": {"host": addresses["ctl"], "api_port": 8780, "scheduler_port": 8786, "advertise": False,
                       "storage": str(tmp_path / "storage")},
    }))
    env = {**os.environ, "FARM_CONFIG": str(config), "FARM_STATE": str(tmp_path / "state"),
           "FARM_BUNDLE": str(bundles / "node.yaml"), "FARM_CLIENT": str(bundles / "admin.yaml"),
           "FARM_CONTROLLER": f"https://{addresses['ctl']}:8780", "DASK_LOGGING__DISTRIBUTED": "warning"}

    def start(role: str, *args: str):
        return subprocess.Popen(["ip", "netns", "exec", names[role], *FARM, *args], env=env, cwd=tmp_path,
                                stdout=open(tmp_path / f"{role}.log", "w"), stderr=subprocess.STDOUT)

    def farm_in_ctl(*args: str):
        return subprocess.run(["ip", "netns", "exec", names["ctl"], *FARM, *args], env=env, capture_output=True,
                              text=True, timeout=120, cwd=tmp_path)

    def node_names():
        result = farm_in_ctl("nodes", "--json")
        return sorted(n["name"] for n in json.loads(result.stdout)) if result.returncode == 0 else []

    def wait(check, timeout, what):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if value := check():
                return value
            time.sleep(0.5)
        raise AssertionError(f"timed out waiting for {what}")

    start("ctl", "controller", "--bundle", str(bundles / "controller.yaml"))
    start("n1", "node", "--controller", f"https://{addresses['ctl']}:8780", "--name", "n1", "--slots", "1")
    start("n2", "node", "--controller", f"https://{addresses['ctl']}:8780", "--name", "n2", "--slots", "1")
    wait(lambda: node_names() == ["n1", "n2"], 180, "both nodes")
    script = tmp_path / "work.py"
    script.write_text("import sys, time, pathlib; time.sleep(0.5); "
                      "pathlib.Path(sys.argv[1], 'f%03d.txt' % int(sys.argv[2])).write_text('x')")
    profile = write_profile(tmp_path, "cut", {
        "processor": "command", "frames": "1-40", "segment": {"frames": 1}, "retries": 5,
        "settings": {"command": [sys.executable, str(script), "{output_dir}", "{start}"]},
    })
    job_id = json.loads(farm_in_ctl("submit", str(profile), "-o", str(tmp_path / "out"), "--json").stdout)["jobs"][0]["id"]

    def running_on_n2():
        detail = json.loads(farm_in_ctl("status", job_id, "--json").stdout)
        return any(a["node"] == "n2" and a["state"] == "running" for s in detail["segment_list"] for a in s["attempts"])

    wait(running_on_n2, 120, "a segment running on n2")
    _run("ip", "-n", names["n2"], "link", "set", "eth0", "down")  # n2 is cut off mid-batch
    wait(lambda: node_names() == ["n1"], 120, "the controller to give up on n2")
    time.sleep(3)
    _run("ip", "-n", names["n2"], "link", "set", "eth0", "up")
    wait(lambda: node_names() == ["n1", "n2"], 240, "n2 to rejoin by itself")
    done = wait(lambda: (d := json.loads(farm_in_ctl("status", job_id, "--json").stdout))["state"] in ("done", "failed")
                and d, 300, "the job")
    assert done["state"] == "done", done["error"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"f{i:03d}.txt" for i in range(1, 41)]
    lost = [a for s in done["segment_list"] for a in s["attempts"] if a["state"] == "lost"]
    assert lost and all(a["node"] == "n2" for a in lost)
