"""Faults with real processes: every accepted job ends done, failed with a reason, or
cancelled, and no destination holds a duplicated or half-written output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from farm.lease import pid_alive, process_start
from farm.store import Store
from tests.cluster_helpers import Cluster
from tests.conftest import alive, fill_disk, running_with, write_config, write_profile
from tests.test_cluster import frames_in, work_profile

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster(tmp_path):
    made: list[Cluster] = []

    def make(**kwargs) -> Cluster:
        made.append(Cluster(tmp_path / f"c{len(made)}", **kwargs))
        return made[-1]

    yield make
    for c in made:
        c.stop()


def finished(c: Cluster, job_id: str, timeout: float = 300) -> dict:
    return c.wait_until(lambda: (d := c.job(job_id))["state"] in ("done", "failed", "cancelled") and d, timeout,
                        f"job {job_id} to end", every=0.2)


def assert_exact_outputs(folder: Path, count: int) -> None:
    assert frames_in(folder) == [f"frame_{i:04d}.txt" for i in range(1, count + 1)], "missing, extra or temporary files"


def test_a_hung_node_times_out_its_segment_and_its_late_result_is_ignored(cluster):
    c = cluster()
    c.start_controller()
    c.start_node("healthy", "--slots", "1")
    hung = c.start_node("sleepy", "--slots", "1")
    c.wait_for_nodes("healthy", "sleepy")
    # the timeout leaves a healthy 0.2 s segment room on a loaded machine (a Python start-up
    # in a sandbox can take seconds), and ends the hung one before the controller finds
    # its node silent (farm.engine.NODE_SILENCE_SECONDS, 10 s) and takes it back as lost
    profile = work_profile(c, "1-6", 0.2, timeout="6s", retries=3)
    # the healthy node waits until the sleepy one holds a segment: on a busy machine it
    # could otherwise take the whole job before the sleepy one starts one
    assert c.farm("pause-node", "healthy").returncode == 0
    job_id = json.loads(c.farm("submit", profile, "-o", c.root / "out", "--json").stdout)["jobs"][0]["id"]

    def on_sleepy():
        detail = c.job(job_id)
        return any(a["node"] == "sleepy" and a["state"] == "running" for s in detail["segment_list"] for a in s["attempts"])

    c.wait_until(on_sleepy, 60, "a segment on the node about to hang", every=0.1)
    os.killpg(hung.pid, signal.SIGSTOP)  # the supervisor and its Dask worker hang
    assert c.farm("resume-node", "healthy").returncode == 0

    def timed_out_on_sleepy():
        detail = c.job(job_id)
        return any(a["node"] == "sleepy" and a["state"] == "timed_out" for s in detail["segment_list"]
                   for a in s["attempts"])

    c.wait_until(timed_out_on_sleepy, 60, "the hung node's segment to time out", every=0.2)
    os.killpg(hung.pid, signal.SIGCONT)  # ... and wake after the profile's timeout
    done = finished(c, job_id)
    assert done["state"] == "done", done["error"]
    assert_exact_outputs(c.root / "out", 6)
    timed_out = [a for s in done["segment_list"] for a in s["attempts"] if a["state"] == "timed_out"]
    assert timed_out and all(a["node"] == "sleepy" and "timeout of 6 s" in a["reason"] for a in timed_out)
    store = Store(c.root / "state" / "farm.db")
    late = [e["kind"] for e in store.events(job_id) if e["kind"] == "late_result_ignored"]
    store.close()
    assert late, "the hung node's late result was not recorded as ignored"


# Holds every segment until the gate file exists: only a kill can end it before that.
HELD = """
import sys, time, pathlib
out, frame, gate = pathlib.Path(sys.argv[1]), sys.argv[2], pathlib.Path(sys.argv[3])
while not gate.exists():
    time.sleep(0.05)
(out / f"frame_{int(frame):04d}.txt").write_text(frame)
"""


def test_repeated_node_kills_during_one_batch(cluster):
    c = cluster()
    c.start_controller()
    c.start_node("steady", "--slots", "1")
    c.wait_for_nodes("steady")
    # the steady node waits while the victims work, so that every kill lands mid-batch
    assert c.farm("pause-node", "steady").returncode == 0
    script, gate = c.root / "held.py", c.root / "gate" / "open"
    script.write_text(HELD)
    gate.parent.mkdir()
    profile = write_profile(c.root, "held", {
        "processor": "command", "frames": "1-10", "segment": {"frames": 1}, "retries": 25,
        "settings": {"command": [sys.executable, str(script), "{output_dir}", "{start}", str(gate)],
                     "expect": ["frame_{frame:04d}.txt"]},
        "sandbox": {"read": [str(gate.parent)]},
    })
    job_id = json.loads(c.farm("submit", profile, "-o", c.root / "out", "--json").stdout)["jobs"][0]["id"]
    victims = [f"victim{number}" for number in range(20)]
    ahead = 2  # victims starting up at once: the next one boots while this one works and dies
    for name in victims[:ahead]:
        c.start_node(name, "--slots", "1")
    for number, name in enumerate(victims):
        victim = c.nodes[name]
        # killed while its segment runs: the segment is held, so it is mid-work for sure
        held = c.wait_until(lambda: running_with(str(script), under=victim.pid), 120,
                            f"a segment to start on {name}", every=0.1)
        assert c.job(job_id)["state"] == "running"
        c.kill_node(name)
        # by pid and start time: with pid_max at 32768 and a suite side by side, a pid can be
        # another process's within the minute
        started = {pid: process_start(pid) for pid in held}
        try:
            c.wait_until(lambda: not any(pid_alive(pid, start) for pid, start in started.items() if start), 60,
                         f"the segment processes of {name} to end with it", every=0.1)
        except AssertionError as exc:
            survivors = [pid for pid, start in started.items() if start and pid_alive(pid, start)]
            raise AssertionError(f"{exc}; still there: {describe_processes(survivors)}") from None
        if number + ahead < len(victims):
            c.start_node(victims[number + ahead], "--slots", "1")
    gate.touch()
    assert c.farm("resume-node", "steady").returncode == 0
    done = finished(c, job_id)
    assert done["state"] == "done", done["error"]
    assert_exact_outputs(c.root / "out", 10)
    lost = {a["node"] for s in done["segment_list"] for a in s["attempts"] if a["state"] == "lost"}
    assert lost == set(victims), "every killed node's segment was lost and run again"
    assert {a["node"] for s in done["segment_list"] for a in s["attempts"] if a["state"] == "done"} == {"steady"}
    assert running_with(str(script)) == [], "segment processes of killed nodes survived"


def describe_processes(pids: list[int]) -> str:
    described = []
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        described.append(f"pid {pid} state {stat[0]} parent {stat[1]} group {stat[2]}: {command[:160]}")
    return "; ".join(described) or "none"


NOT_RECORDED = """
import subprocess, sys, time
from farm.node import kill_segments
# a segment started and not recorded yet: in a session of its own, as segments are
held = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
print(held.pid, flush=True)
kill_segments()
print(held.wait(timeout=30), flush=True)
"""


def test_a_worker_leaving_without_its_node_kills_a_segment_it_has_not_recorded_yet():
    """What a worker does when its node is gone: a segment just started (its Popen returned,
    its group not yet recorded; on a loaded machine that can last) goes with it."""
    done = subprocess.run([sys.executable, "-c", NOT_RECORDED], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    pid, status = done.stdout.split()
    assert int(status) == -signal.SIGKILL, f"segment {pid} ended with {status}, not killed"


EXITED = """
import os, subprocess, sys
from farm.node import leave_no_segments_on_exit
leave_no_segments_on_exit()  # what a node's worker does at its start
held = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
print(held.pid, flush=True)
os._exit(1)  # how Dask ends a worker whose nanny died
"""


def test_a_worker_ended_by_dask_at_once_takes_its_segments_with_it():
    """Dask ends a worker whose node died with os._exit, before any watcher of Farm's runs:
    the segments it started end with it all the same."""
    done = subprocess.run([sys.executable, "-c", EXITED], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    pid = int(done.stdout)
    # SIGKILL is sent before the worker exits, but a loaded machine may run the segment once
    # more before it takes effect; a segment left alone sleeps 120 s, far past this wait
    Cluster.wait_until(lambda: not alive(pid), 30, f"segment {pid} to end with its worker", every=0.05)


def test_the_controller_killed_five_times_during_one_batch(cluster):
    c = cluster()
    c.start_controller()
    c.start_node("n1", "--slots", "2")
    c.wait_for_nodes("n1")
    profile = work_profile(c, "1-60", 0.2)
    job_id = json.loads(c.farm("submit", profile, "-o", c.root / "out", "--json").stdout)["jobs"][0]["id"]
    for _ in range(5):
        # each controller gets the batch further before it is killed, and none finishes it
        progress = c.job(job_id)["segments_done"]
        now = c.wait_until(lambda: (d := c.job(job_id))["segments_done"] > progress and d, 120,
                           "the batch to move on", every=0.1)
        assert now["state"] == "running" and now["segments_done"] < 60
        c.controller.send_signal(signal.SIGKILL)
        c.controller.wait()
        c.start_controller()
    done = finished(c, job_id)
    assert done["state"] == "done", done["error"]
    assert_exact_outputs(c.root / "out", 60)
    store = Store(c.root / "state" / "farm.db")
    recovered = [e for e in store.events(job_id) if e["kind"] == "job_recovered"]
    store.close()
    assert len(recovered) >= 3


def a_blocked_store_refuses_new_work_and_loses_nothing_accepted(c: Cluster, block, *reason: str) -> None:
    """Mid-batch, ``block()`` stops the store from being written and returns how to undo
    it. While blocked, a submission is refused with ``reason`` in one line (no 500, no
    traceback); afterwards the accepted batch finishes with every output exactly once and
    the refused one left no job behind."""
    import httpx

    c.start_controller()
    c.start_node("n1", "--slots", "1")
    c.wait_for_nodes("n1")
    profile = work_profile(c, "1-15", 0.3)
    job_id = json.loads(c.farm("submit", profile, "-o", c.root / "out", "--json").stdout)["jobs"][0]["id"]
    c.wait_until(lambda: c.job(job_id)["segments_done"] >= 2, 60, "the batch to be under way")

    unblock = block()
    try:
        refused = c.farm("submit", profile, "-o", c.root / "out2", "--json", timeout=120)
        assert refused.returncode != 0
        assert refused.stderr.startswith("farm: error: ") and refused.stderr.count("\n") == 1, refused.stderr
        assert all(words in refused.stderr for words in reason), refused.stderr
        assert "Traceback" not in refused.stderr
        token = c.token
        answer = httpx.post(f"{c.url}/api/batches", verify=False, timeout=120,
                            headers={"Authorization": f"Bearer {token}"},
                            json={"profile": str(profile), "inputs": [], "destination": str(c.root / "out3")})
        assert answer.status_code == 503, answer.text  # the request was fine; the controller cannot take it now
        assert all(words in answer.json()["error"] for words in reason), answer.text
        # the controller has stopped taking work, so nothing of a refused batch can linger in it
        c.wait_until(lambda: "new work is refused" in (c.root / "controller.log").read_text(), 60,
                     "the controller to stop taking work")
    finally:
        unblock()
    done = finished(c, job_id)
    assert done["state"] == "done", done["error"]
    assert_exact_outputs(c.root / "out", 15)
    jobs = json.loads(c.farm("status", "--json").stdout)
    assert [j["id"] for j in jobs] == [job_id]  # the refused batches left nothing behind
    assert not any((c.root / name).exists() and list((c.root / name).iterdir()) for name in ("out2", "out3"))


def test_a_locked_store_refuses_new_work_and_loses_nothing_accepted(cluster):
    import sqlite3

    c = cluster()

    def lock():
        locker = sqlite3.connect(c.root / "state" / "farm.db", isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")  # another process holds the store

        def release():
            locker.execute("ROLLBACK")
            locker.close()
        return release

    a_blocked_store_refuses_new_work_and_loses_nothing_accepted(c, lock, "cannot be written", "locked")


def test_a_full_disk_under_the_store_refuses_new_work_and_loses_nothing_accepted(tmpfs, cluster):
    # tmpfs before cluster: the controller stops before its state directory is unmounted
    c = cluster()
    state = tmpfs(c.root / "state", "16m")

    def fill():
        filler = fill_disk(state)
        return filler.unlink

    a_blocked_store_refuses_new_work_and_loses_nothing_accepted(c, fill, "cannot be written", "database or disk is full")


FILL_SCRATCH = """
import pathlib, sys
scratch, out, frame = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]
(scratch / "render.tmp").write_bytes(b"x" * 2_000_000)  # a renderer's temporary files
(out / f"frame_{int(frame):04d}.txt").write_text(frame)
"""


def test_a_node_with_a_full_scratch_disk_fails_clearly_and_the_work_runs_elsewhere(tmpfs, cluster, tmp_path):
    # tmpfs before cluster: the nodes stop before their scratch disk is unmounted
    small = tmpfs(tmp_path / "small-scratch", "512k")
    c = cluster()
    c.start_controller()
    env_full = {"TMPDIR": str(small)}
    c.start_node("cramped", "--slots", "1", extra_env=env_full)
    c.start_node("roomy", "--slots", "1")
    c.wait_for_nodes("cramped", "roomy")
    script = c.root / "fill.py"
    script.write_text(FILL_SCRATCH)
    profile = write_profile(c.root, "fill", {
        "processor": "command", "frames": "1-4", "segment": {"frames": 1}, "retries": 3,
        "settings": {"command": [sys.executable, str(script), "{scratch}", "{output_dir}", "{start}"],
                     "expect": ["frame_{frame:04d}.txt"]},
    })
    job_id = json.loads(c.farm("submit", profile, "-o", c.root / "out", "--json").stdout)["jobs"][0]["id"]
    done = finished(c, job_id)
    assert done["state"] == "done", done["error"]
    assert_exact_outputs(c.root / "out", 4)
    failures = [a for s in done["segment_list"] for a in s["attempts"] if a["state"] == "failed"]
    assert failures and all(a["node"] == "cramped" and "No space left on device" in a["reason"] for a in failures)
    assert {a["node"] for s in done["segment_list"] for a in s["attempts"] if a["state"] == "done"} == {"roomy"}


SLOW_READ = """
import pathlib, sys, time
source, out, frame, marks = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3], pathlib.Path(sys.argv[4])
data = source.read_bytes()
(marks / f"started-{frame}").touch()
while not (marks / "source-touched").exists():  # the test deletes or changes the source meanwhile
    time.sleep(0.05)
(out / f"frame_{int(frame):04d}.txt").write_bytes(data[:10])
"""


@pytest.mark.parametrize("change", ["deleted", "changed"])
def test_a_source_deleted_or_changed_mid_job_fails_the_job_with_the_reason(farm_env, change):
    write_config(farm_env, slots=1)
    tmp = farm_env["tmp"]
    source = tmp / "source.mov"
    source.write_bytes(b"original content")
    script, marks = tmp / "read.py", tmp / "marks"
    script.write_text(SLOW_READ)
    marks.mkdir()
    profile = write_profile(tmp, "reader", {
        "processor": "command", "frames": "1-6", "segment": {"frames": 1},
        "settings": {"command": [sys.executable, str(script), "{input}", "{output_dir}", "{start}", str(marks)]},
        "sandbox": {"write": [str(marks)]},
    })
    proc = subprocess.Popen([sys.executable, "-m", "farm.cli", "run", str(profile), str(source), "-o", str(tmp / "out"),
                             "--json", "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    Cluster.wait_until(lambda: (marks / "started-1").exists() or proc.poll() is not None, 120,
                       "the job's first segment to start")
    if change == "deleted":
        source.unlink()
    else:
        source.write_bytes(b"something else entirely")
    (marks / "source-touched").touch()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    job = json.loads(out)["jobs"][0]
    assert job["state"] == "failed"
    assert f"the source {source} was {change}" in job["error"] if change == "deleted" else \
        f"the source {source} changed after the job was accepted" in job["error"]
    assert not (tmp / "out").exists() or not list((tmp / "out").iterdir())  # nothing half-done was delivered
