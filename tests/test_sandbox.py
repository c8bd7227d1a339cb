"""Issue 14: a segment's process is contained (real bubblewrap, real ffmpeg, the real CLI).

Each exploit below worked on main before the sandbox: a profile's LD_PRELOAD ran a
library as the node's user; an allowed ffmpeg wrote and read wherever it liked.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

from tests.conftest import FARM, running_with, write_config, write_profile

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap (./setup installs it)")

EVIL_C = r"""
#include <stdio.h>
__attribute__((constructor)) static void evil(void) {
    FILE *f = fopen("MARK", "w");
    if (f) { fputs("constructor ran\n", f); fclose(f); }
}
"""


def evil_library(folder: Path) -> Path:
    """A shared library whose constructor writes ``folder/mark`` (built when a C compiler
    is here; without one the refusal is still checked)."""
    library = folder / "evil.so"
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler:
        source = folder / "evil.c"
        source.write_text(EVIL_C.replace("MARK", str(folder / "mark")))
        subprocess.run([compiler, "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    return library


def ffmpeg_profile(folder: Path, name: str, argv: list[str], **extra) -> Path:
    return write_profile(folder, name, {"processor": "command", "frames": "1", "retries": 0,
                                        "settings": {"command": ["ffmpeg", "-hide_banner", "-nostdin", *argv],
                                                     **extra.pop("settings", {})}, **extra})


def run_json(farm, *args) -> dict:
    result = farm(*args, "--json")
    assert result.returncode in (0, 1), result.stderr
    return result.json()["jobs"][0]


def files_holding(folder: Path, secret: bytes) -> list[Path]:
    return [path for path in folder.rglob("*") if path.is_file() and secret in path.read_bytes()]


# -- what a profile may pass to a process ---------------------------------------------------


def test_ld_preload_in_a_profile_is_refused_when_it_is_loaded_naming_the_key(farm, farm_env):
    tmp = farm_env["tmp"]
    mark = tmp / "mark"
    profile = ffmpeg_profile(tmp, "preload", ["-version"],
                             settings={"env": {"LD_PRELOAD": str(evil_library(tmp))}})
    result = farm("run", profile, "-o", tmp / "out")
    assert result.returncode == 2
    assert "settings.env" in result.stderr and "LD_PRELOAD" in result.stderr
    assert "Traceback" not in result.stderr
    assert not mark.exists(), "the library's constructor ran"


def test_ld_preload_through_an_override_is_refused(farm, farm_env):
    """`--set` goes through the same loader as the API's overrides."""
    tmp = farm_env["tmp"]
    mark = tmp / "mark"
    profile = ffmpeg_profile(tmp, "plain", ["-version"])
    result = farm("run", profile, "-o", tmp / "out", "--set", f"settings.env.LD_PRELOAD={evil_library(tmp)}")
    assert result.returncode == 2
    assert "--set settings.env.LD_PRELOAD" in result.stderr and "LD_PRELOAD" in result.stderr
    assert not mark.exists()


@pytest.mark.parametrize("name", ["FFREPORT", "DYLD_INSERT_LIBRARIES", "PYTHONSTARTUP", "LD_LIBRARY_PATH"])
def test_names_that_load_code_or_write_files_are_refused_even_when_a_node_lists_them(farm, farm_env, name):
    tmp = farm_env["tmp"]
    profile = ffmpeg_profile(tmp, "report", ["-version"], settings={"env": {name: f"file={tmp}/elsewhere.log"}})
    result = farm("run", profile, "-o", tmp / "out")
    assert result.returncode == 2 and name in result.stderr and "settings.env" in result.stderr
    write_config(farm_env, allow_env=["TZ", name])
    result = farm("run", profile, "-o", tmp / "out")
    assert result.returncode == 2
    assert "node.allow_env" in result.stderr and f"{name} can never be allowed" in result.stderr
    assert not (tmp / "elsewhere.log").exists()


def test_an_unlisted_name_is_refused_and_a_listed_one_reaches_the_process(farm, farm_env):
    tmp = farm_env["tmp"]
    show = ["-c", "import os, pathlib; pathlib.Path('env.txt').write_text(os.environ.get('SHOT', '-') + ' ' + "
                  "os.environ.get('TZ', '-') + ' ' + os.environ['HOME'])", "{start}"]
    profile = write_profile(tmp, "shot", {"processor": "command", "frames": "1",
                                          "settings": {"command": [sys.executable, *show], "env": {"SHOT": "sh010"}}})
    refused = farm("run", profile, "-o", tmp / "out")
    assert refused.returncode == 2
    assert "settings.env: SHOT: not on the node's environment allow-list" in refused.stderr
    write_config(farm_env, allow_env=["SHOT", "TZ"])
    done = run_json(farm, "run", profile, "-o", tmp / "out", "--set", "settings.env.TZ=UTC")
    assert done["state"] == "done", done["error"]
    shot, tz, home = (tmp / "out" / "env.txt").read_text().split()
    assert (shot, tz) == ("sh010", "UTC")
    assert home != os.environ.get("HOME")  # the node's home is not the process's


@pytest.mark.parametrize("cwd", ["/tmp", "../..", "sub/../../.."])
def test_a_working_folder_outside_the_attempt_is_refused(farm, farm_env, cwd):
    tmp = farm_env["tmp"]
    name = f"frame-{uuid.uuid4().hex}.png"
    profile = ffmpeg_profile(tmp, "elsewhere", ["-f", "lavfi", "-i", "testsrc=d=0.04", "-frames:v", "1", "-y",
                                                name], settings={"cwd": cwd})
    result = farm("run", profile, "-o", tmp / "out")
    assert result.returncode == 2
    assert "settings.cwd" in result.stderr and "inside the attempt's folder" in result.stderr
    assert not Path(cwd, name).exists() and not (tmp / name).exists()


def test_a_relative_working_folder_lands_in_the_attempt(farm, farm_env):
    tmp = farm_env["tmp"]
    profile = ffmpeg_profile(tmp, "inside", ["-loglevel", "error", "-f", "lavfi", "-i", "testsrc=d=0.04",
                                             "-frames:v", "1", "-y", "frame.png"], settings={"cwd": "work"})
    job = run_json(farm, "run", profile, "-o", tmp / "out")
    assert job["state"] == "done", job["error"]
    assert (tmp / "out" / "work" / "frame.png").is_file()


def test_sensitive_keys_are_named_for_the_api_to_refuse():
    from farm.plugins import load_plugins
    from farm.profiles import is_sensitive, sensitive_keys

    plugins = load_plugins()
    command, transcode = plugins.processor("command"), plugins.processor("transcode")
    assert {"settings.command", "settings.env", "settings.cwd", "sandbox"} <= sensitive_keys(command)
    assert is_sensitive("settings.env.LD_PRELOAD", command) and is_sensitive("settings", command)
    assert is_sensitive("sandbox.network", transcode) and is_sensitive("settings.video.params.stats", transcode)
    assert not is_sensitive("frames", command) and not is_sensitive("settings.video.crf", transcode)


# -- an allowed ffmpeg writes nothing outside ------------------------------------------------


@pytest.mark.slow
def test_an_allowed_ffmpeg_writing_to_an_absolute_path_leaves_nothing_on_the_host(farm, farm_env):
    tmp = farm_env["tmp"]
    outside = tmp / "outside"
    outside.mkdir()
    in_tmp = Path(f"/tmp/farm-escape-{uuid.uuid4().hex}.png")
    for target in (outside / "x.png", in_tmp):
        profile = ffmpeg_profile(tmp, "escape", ["-f", "lavfi", "-i", "testsrc=d=0.04", "-frames:v", "1",
                                                 "-y", str(target)])
        run_json(farm, "run", profile, "-o", tmp / "out", "--overwrite")
        assert not target.exists(), f"ffmpeg wrote {target} outside its attempt"
    assert list(outside.iterdir()) == []


@pytest.mark.slow
def test_an_allowed_ffmpeg_cannot_write_a_passlog_or_a_tee_outside(farm, farm_env):
    tmp = farm_env["tmp"]
    outside = tmp / "outside"
    outside.mkdir()
    argv = ["-f", "lavfi", "-i", "testsrc=d=0.2", "-c:v", "libx264", "-f", "tee", "-map", "0:v",
            f"{{output_dir}}/in.mkv|{outside}/teed.mkv"]
    run_json(farm, "run", ffmpeg_profile(tmp, "tee", argv), "-o", tmp / "out")
    argv = ["-f", "lavfi", "-i", "testsrc=d=0.2", "-c:v", "libx264", "-b:v", "100k", "-pass", "1",
            "-passlogfile", f"{outside}/pass", "-f", "null", "-"]
    run_json(farm, "run", ffmpeg_profile(tmp, "pass", argv), "-o", tmp / "out2")
    assert list(outside.iterdir()) == []


# -- an allowed ffmpeg reads nothing it was not given --------------------------------------


@pytest.mark.slow
def test_an_allowed_ffmpeg_reads_nothing_it_was_not_given(farm, farm_env, tmp_path_factory):
    tmp = farm_env["tmp"]
    secret = tmp_path_factory.mktemp("elsewhere") / "secret.txt"
    secret.write_text("the-secret-token-4711\n")
    out = tmp / "out"
    for index, source in enumerate([secret, Path("/etc/shadow"), Path("/etc/passwd")]):
        profile = ffmpeg_profile(tmp, f"leak{index}", ["-f", "data", "-i", str(source), "-map", "0", "-c", "copy",
                                                       "-f", "data", "{output_dir}/leak.bin"])
        run_json(farm, "run", profile, "-o", out, "--overwrite")
    assert not files_holding(out, b"the-secret-token-4711") if out.exists() else True
    host_users = [line.split(":")[0].encode() + b":" for line in Path("/etc/passwd").read_text().splitlines()
                  if line and not line.startswith(("root:", "nobody:"))]
    if out.exists() and host_users:
        assert not any(files_holding(out, user) for user in host_users), "the host's user list was delivered"


@pytest.mark.slow
def test_the_store_stays_hidden_inside_a_folder_the_profile_may_read(farm, farm_env):
    """A profile may open a whole folder for reading; the state directory inside it
    (the store, every job's work folder) stays hidden."""
    tmp = farm_env["tmp"]
    argv = ["-f", "data", "-i", str(farm_env["state"] / "farm.db"), "-map", "0", "-c", "copy", "-f", "data",
            "{output_dir}/store.bin"]
    profile = ffmpeg_profile(tmp, "store", argv, sandbox={"read": [str(tmp)]})
    job = run_json(farm, "run", profile, "-o", tmp / "out")
    assert (farm_env["state"] / "farm.db").stat().st_size > 0
    assert job["state"] == "failed"
    assert not (tmp / "out").exists() or not files_holding(tmp / "out", b"SQLite format 3")


# -- the network ---------------------------------------------------------------------------


@pytest.fixture
def listener():
    """A TCP server on a free port of this machine's loopback; yields (port, accepted)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    accepted = threading.Event()

    def serve() -> None:
        try:
            connection, _ = server.accept()
            accepted.set()
            connection.close()
        except OSError:
            pass

    threading.Thread(target=serve, daemon=True).start()
    yield server.getsockname()[1], accepted
    server.close()


@pytest.mark.slow
def test_no_network_unless_the_profile_asks_for_it(farm, farm_env, listener):
    port, accepted = listener
    tmp = farm_env["tmp"]
    connect = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=5).close(); print('connected')"
    settings = {"command": [sys.executable, "-c", connect, "{start}"]}
    closed = write_profile(tmp, "closed", {"processor": "command", "frames": "1", "retries": 0, "settings": settings})
    job = run_json(farm, "run", closed, "-o", tmp / "out")
    assert job["state"] == "failed" and ("Connection refused" in job["error"] or "unreachable" in job["error"])
    assert not accepted.is_set()
    opened = write_profile(tmp, "opened", {"processor": "command", "frames": "1", "retries": 0, "settings": settings,
                                           "sandbox": {"network": True}})
    job = run_json(farm, "run", opened, "-o", tmp / "out2")
    assert job["state"] == "done", job["error"]
    assert accepted.wait(10)


# -- cancelling still ends everything ---------------------------------------------------------

ESCAPER = """
    import pathlib, subprocess, sys, time
    # a child that leaves the process group, as a daemonising renderer would
    subprocess.Popen(["setsid", "sleep", "60"])
    pathlib.Path(sys.argv[1]).write_text("started")
    time.sleep(60)
"""


@pytest.mark.slow
def test_cancel_ends_the_whole_tree_even_a_child_that_left_the_process_group(farm, farm_env):
    tmp = farm_env["tmp"]
    ready = tmp / "ready"
    ready.mkdir()
    script = tmp / "escaper.py"
    script.write_text(textwrap.dedent(ESCAPER))
    profile = write_profile(tmp, "escaper", {
        "processor": "command", "frames": "1",
        "settings": {"command": [sys.executable, str(script), str(ready / "started"), "{start}"]},
        "sandbox": {"write": [str(ready)]},
    })
    proc = subprocess.Popen([*FARM, "run", str(profile), "-o", str(tmp / "out"), "--json", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (ready / "started").exists():
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.05)
        before = running_with(str(script))
        sleepers = [pid for pid in before if b"sleep" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert sleepers, "the escaping child is not running"
        job_id = farm("status", "--json").json()[0]["id"]
        assert farm("cancel", job_id).returncode == 0
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert json.loads(out)["jobs"][0]["state"] == "cancelled", err
    deadline = time.monotonic() + 10
    while running_with(str(script)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert running_with(str(script)) == []
    assert not any(Path(f"/proc/{pid}").exists() for pid in sleepers)


# -- node.sandbox: off, and a node that cannot sandbox ---------------------------------------


@pytest.mark.slow
def test_sandbox_off_shows_in_doctor_and_segments_then_run_uncontained(farm, farm_env):
    tmp = farm_env["tmp"]
    doctor = farm("doctor")
    assert "ok    sandbox: bubblewrap" in doctor.stdout
    write_config(farm_env, sandbox=False)  # what `node.sandbox: off` reads as
    assert yaml.safe_load("sandbox: off") == {"sandbox": False}
    doctor = farm("doctor", "--json").json()
    check = next(c for c in doctor["checks"] if c["name"] == "sandbox")
    assert not check["ok"] and "off (node.sandbox: off)" in check["found"] and not check["required"]
    outside = tmp / "outside.png"
    profile = ffmpeg_profile(tmp, "escape", ["-f", "lavfi", "-i", "testsrc=d=0.04", "-frames:v", "1",
                                             "-y", str(outside)])
    assert run_json(farm, "run", profile, "-o", tmp / "out")["state"] == "done"
    assert outside.exists()  # what the sandbox prevents, shown to happen without it
    refused = farm("run", ffmpeg_profile(tmp, "preload", ["-version"], settings={"env": {"LD_PRELOAD": "x.so"}}),
                   "-o", tmp / "out")
    assert refused.returncode == 2 and "LD_PRELOAD" in refused.stderr  # the vocabulary holds either way


# A node process running one unsandboxed command, in a thread as a segment does: it prints
# the command's pid once the command runs, then waits to be killed.
UNSANDBOXED_NODE = """
import os, sys, threading, time
from farm.node import AttemptLog, CommandRunner
runner = CommandRunner(AttemptLog(), threading.Event(), "test", 5.0, policy=None)
threading.Thread(target=runner.run, args=([sys.argv[1], os.environ["SLEEP_FOR"]],), daemon=True).start()
while True:
    time.sleep(1)
"""


@pytest.mark.parametrize("executable", ["/bin/sleep", "sleep"])
def test_an_unsandboxed_command_dies_with_its_node_killed_by_sigkill(tmp_path, executable):
    # an absolute path is started through setpriv, a bare name by a forked child: both set
    # the parent-death signal, so a node killed -9 leaves no command running on
    marker = f"6{uuid.uuid4().int % 10**6:06d}"  # sleep's argument: tells this test's sleep from others
    # the marker goes by the environment: the node's own command line must not hold it
    node = subprocess.Popen([sys.executable, "-c", UNSANDBOXED_NODE, executable], env={**os.environ, "SLEEP_FOR": marker})
    try:
        deadline = time.monotonic() + 60
        while not (sleepers := running_with(marker)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sleepers, "the command never started"
    finally:
        node.kill()
        node.wait()
    deadline = time.monotonic() + 30
    while running_with(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert running_with(marker) == [], "the command outlived its node"


@pytest.mark.slow
def test_a_node_that_cannot_sandbox_says_so_and_runs_nothing(farm, farm_env):
    tmp = farm_env["tmp"]
    fake = tmp / "bin"
    fake.mkdir()
    (fake / "bwrap").write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    (fake / "bwrap").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}
    doctor = subprocess.run([*FARM, "doctor"], capture_output=True, text=True, env=env, cwd=tmp)
    assert doctor.returncode != 0
    assert "FAIL  sandbox:" in doctor.stdout and "No permissions to create new namespace" in doctor.stdout
    mark = tmp / "ran"
    profile = write_profile(tmp, "touch", {"processor": "command", "frames": "1", "settings": {
        "command": [sys.executable, "-c", f"open({str(mark)!r}, 'w')", "{start}"]}})
    run = subprocess.run([*FARM, "run", str(profile), "-o", str(tmp / "out")], capture_output=True, text=True,
                         env=env, cwd=tmp)
    assert run.returncode == 2
    assert run.stderr.startswith("farm: error: node.sandbox is on, but") and "node.sandbox: off" in run.stderr
    assert not mark.exists()


def test_a_node_tells_how_it_contains_its_segments_among_its_capabilities():
    """What `farm nodes` lists for a node (``sandbox off``, or the bubblewrap version)."""
    from farm.config import NodeConfig
    from farm.node import node_capabilities
    from farm.plugins import load_plugins

    plugins = load_plugins()
    assert node_capabilities(NodeConfig(sandbox=False), plugins)["sandbox"] == "off"
    assert node_capabilities(NodeConfig(), plugins)["sandbox"].startswith("bubblewrap-")


@pytest.mark.slow
def test_the_log_footer_still_counts_the_sandboxed_process(farm, farm_env):
    """Behind bwrap the node still sees its command's CPU time and memory (--as-pid-1)."""
    from farm.store import Store

    tmp = farm_env["tmp"]
    burn = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass"
    profile = write_profile(tmp, "burn", {"processor": "command", "frames": "1",
                                          "settings": {"command": [sys.executable, "-c", burn, "{start}"]}})
    job = run_json(farm, "run", profile, "-o", tmp / "out")
    assert job["state"] == "done", job["error"]
    store = Store(farm_env["state"] / "farm.db")
    log = store.attempts(job_id=job["id"])[0]["log"]
    store.close()
    footer = next(line for line in log.splitlines() if line.startswith("=== finished:"))
    user = float(footer.split("cpu user ")[1].split(" s")[0])
    system = float(footer.split(" sys ")[1].split(" s")[0])
    assert user + system >= 0.25, footer  # it burnt 0.3 s (user and system) of CPU
    assert "=== sandbox: bwrap" in log
