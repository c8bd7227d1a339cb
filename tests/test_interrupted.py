"""Nothing half-done: a `farm run` killed with SIGKILL leaves `interrupted` jobs that the
same command (or `farm resume`) finishes, keeping the segments already done; `farm cancel`
ends them at once; a controller on the same state directory leaves a living `farm run`'s
jobs alone and takes over a killed one's. Real processes, real kills."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster_helpers import Cluster
from tests.conftest import FARM, write_config, write_profile

pytestmark = pytest.mark.slow

# One segment per frame. Every start is logged (frame and pid); frames above FIRST wait
# for the marker file, so a kill lands while they run and the first ones are done.
WORK = """
import os, pathlib, sys, time
out, frame, log, gate, first = pathlib.Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], pathlib.Path(sys.argv[4]), int(sys.argv[5])
with open(log, "a") as handle:
    handle.write(f"{frame} {os.getpid()}\\n")
while frame > first and not gate.exists():
    time.sleep(0.05)
(out / f"frame_{frame:04d}.txt").write_text(str(frame))
"""


def work_profile(tmp: Path, frames: str, first: int, processor: str = "command") -> Path:
    script = tmp / "work.py"
    script.write_text(WORK)
    return write_profile(tmp, "work", {
        "processor": processor, "frames": frames, "segment": {"frames": 1},
        "settings": {"command": [sys.executable, str(script), "{output_dir}", "{start}", str(tmp / "runs.log"),
                                 str(tmp / "gate"), str(first)],
                     "expect": ["frame_{frame:04d}.txt"]},
        # the run log and the gate are how the test and the segments see each other
        "sandbox": {"write": [str(tmp)]},
    })


def runs(tmp: Path) -> list[int]:
    path = tmp / "runs.log"
    return sorted(int(line.split()[0]) for line in path.read_text().splitlines()) if path.exists() else []


STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def no_run_left_behind():
    """A test that fails before its kill would leave its `farm run` waiting on the gate for
    ever, with its segments, taking CPU from every test after it: killed here."""
    yield
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def start_run(*args: str, env: dict | None = None) -> subprocess.Popen:
    proc = subprocess.Popen([*FARM, "run", *map(str, args), "--json", "--quiet"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
                            start_new_session=True)  # its group: the segments too, if a test ends early
    STARTED.append(proc)
    return proc


def wait_until(check, timeout: float, what: str, every: float = 0.05):
    return Cluster.wait_until(check, timeout, what, every=every)


def store_rows(state: Path, sql: str, params: tuple = ()) -> list[tuple]:
    """Read the store the way an onlooker does (no farm code, no writes)."""
    path = state / "farm.db"
    if not path.exists():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        return db.execute(sql, params).fetchall()
    except sqlite3.OperationalError:  # not created yet
        return []
    finally:
        db.close()


def segment_states(state: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for (value,) in store_rows(state, "SELECT state FROM segments"):
        counts[value] = counts.get(value, 0) + 1
    return counts


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def exact_outputs(folder: Path, count: int) -> None:
    assert sorted(p.name for p in folder.iterdir()) == [f"frame_{i:04d}.txt" for i in range(1, count + 1)]
    for i in range(1, count + 1):
        assert (folder / f"frame_{i:04d}.txt").read_text() == str(i)


def test_a_killed_farm_run_is_interrupted_and_the_same_command_resumes_it(farm_env, farm):
    write_config(farm_env, slots=2)
    tmp, state = farm_env["tmp"], farm_env["state"]
    profile = work_profile(tmp, "1-10", first=4)
    out = tmp / "out"
    proc = start_run(profile, "-o", out)
    # two slots: two segments wait on the gate, and with pipelining up to two more wait on the node
    wait_until(lambda: segment_states(state).get("done", 0) == 4 and segment_states(state).get("running", 0) >= 2,
               120, "4 segments done and 2 waiting on the gate")
    kill(proc)
    (tmp / "gate").touch()  # from now on every frame finishes

    job = farm("status", "--json").json()[0]
    assert job["state"] == "interrupted", job
    assert "its owner (farm run, pid" in job["error"] and "stopped before it ended" in job["error"]
    text = farm("status").stdout
    assert "interrupted" in text and f"farm resume {job['id']}" in text
    detail = farm("status", job["id"], "--json").json()
    done_before = {s["label"] for s in detail["segment_list"] if s["state"] == "done"}
    assert done_before == {f"frames {i}" for i in range(1, 5)}
    assert not any(s["state"] == "running" for s in detail["segment_list"])  # those attempts are lost
    handed = {s["label"]: s["attempts"] for s in detail["segment_list"]}
    assert handed["frames 5"] == handed["frames 6"] == 1, handed  # the two on the gate

    again = farm("run", profile, "-o", out, "--json", "--quiet")
    assert again.returncode == 0, again.stderr
    assert "resuming interrupted batch" in again.stderr
    report = again.json()
    assert report["batch"] == job["batch"] and report["jobs"][0]["id"] == job["id"]
    assert report["jobs"][0]["state"] == "done"
    exact_outputs(out, 10)
    detail = farm("status", job["id"], "--json").json()
    assert detail["state"] == "done"
    attempts = {s["label"]: s["attempts"] for s in detail["segment_list"]}
    # done before the kill: not run again; handed out at the kill: once more; never handed out: once
    assert all(attempts[f"frames {i}"] == 1 for i in range(1, 5)), attempts
    assert all(attempts[f"frames {i}"] == handed[f"frames {i}"] + 1 for i in range(5, 11)), (handed, attempts)
    started = runs(tmp)
    assert [started.count(i) for i in range(1, 5)] == [1, 1, 1, 1], started
    # a third run of the same command is a new run (the last one ended): refused before it
    # runs, because its outputs exist; with --overwrite it runs anew, resuming nothing
    third = farm("run", profile, "-o", out, "--json", "--quiet")
    assert third.returncode == 2 and "already exist" in third.stderr, third.stderr
    fourth = farm("run", profile, "-o", out, "--json", "--quiet", "--overwrite")
    assert fourth.returncode == 0 and "resuming" not in fourth.stderr, fourth.stderr
    assert fourth.json()["batch"] != job["batch"]


def test_a_resume_reruns_a_done_segment_whose_output_folder_is_gone(farm_env, farm):
    write_config(farm_env, slots=2)
    tmp, state = farm_env["tmp"], farm_env["state"]
    profile = work_profile(tmp, "1-6", first=2)
    proc = start_run(profile, "-o", tmp / "out")
    wait_until(lambda: segment_states(state).get("done", 0) == 2, 120, "2 segments done")
    kill(proc)
    (tmp / "gate").touch()
    job_id = store_rows(state, "SELECT id FROM jobs")[0][0]
    first_attempt = store_rows(state, "SELECT id FROM attempts WHERE state = 'done' ORDER BY id")[0][0]
    import shutil
    shutil.rmtree(state / "work" / job_id / first_attempt)  # e.g. cleaned by hand

    resumed = farm("resume", job_id, "--json", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.json()["jobs"][0]["state"] == "done"
    exact_outputs(tmp / "out", 6)
    attempts = {s["label"]: s["attempts"] for s in farm("status", job_id, "--json").json()["segment_list"]}
    assert attempts["frames 1"] == 2 and attempts["frames 2"] == 1, attempts


def test_cancel_ends_an_interrupted_job_at_once_and_fresh_starts_over(farm_env, farm):
    write_config(farm_env, slots=2)
    tmp, state = farm_env["tmp"], farm_env["state"]
    profile = work_profile(tmp, "1-4", first=1)
    proc = start_run(profile, "-o", tmp / "out")
    wait_until(lambda: segment_states(state).get("done", 0) == 1 and segment_states(state).get("running", 0) >= 1,
               120, "1 segment done, others waiting")
    kill(proc)
    job_id = store_rows(state, "SELECT id FROM jobs")[0][0]

    cancelled = farm("cancel", job_id)
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stdout.strip() == f"job {job_id} was interrupted (its process stopped); it is cancelled"
    assert farm("status", job_id, "--json").json()["state"] == "cancelled"
    assert farm("resume", job_id).returncode == 2  # nothing left to resume

    # a cancelled run is not resumed: the same command starts a new batch
    (tmp / "gate").touch()
    again = farm("run", profile, "-o", tmp / "out", "--json", "--quiet")
    assert again.returncode == 0, again.stderr
    assert "resuming" not in again.stderr and again.json()["jobs"][0]["id"] != job_id
    exact_outputs(tmp / "out", 4)


def test_fresh_cancels_the_interrupted_run_and_starts_over(farm_env, farm):
    write_config(farm_env, slots=2)
    tmp, state = farm_env["tmp"], farm_env["state"]
    profile = work_profile(tmp, "1-4", first=2)
    proc = start_run(profile, "-o", tmp / "out")
    wait_until(lambda: segment_states(state).get("done", 0) == 2, 120, "2 segments done")
    kill(proc)
    (tmp / "gate").touch()
    old = store_rows(state, "SELECT id FROM jobs")[0][0]
    fresh = farm("run", profile, "-o", tmp / "out", "--json", "--quiet", "--fresh")
    assert fresh.returncode == 0, fresh.stderr
    new = fresh.json()["jobs"][0]["id"]
    assert new != old
    assert farm("status", old, "--json").json()["state"] == "cancelled"
    assert all(s["attempts"] == 1 for s in farm("status", new, "--json").json()["segment_list"])
    exact_outputs(tmp / "out", 4)


# A processor registered through the real entry-point group, only for this test: the
# command processor, whose assembly waits for a gate, so that a kill lands inside it.
SLOW_ASSEMBLY = """
import pathlib, time
from farm_command import CommandProcessor
from farm import hookimpl

class SlowAssembly(CommandProcessor):
    name = "slow-assembly"

    def assemble(self, job, results, context):
        folder = job.destination.parent
        with open(folder / "assemblies.log", "a") as handle:
            handle.write("assembling\\n")
        while not (folder / "assembly-gate").exists():
            time.sleep(0.05)
        return super().assemble(job, results, context)

@hookimpl
def farm_processors():
    return [SlowAssembly()]
"""


def test_a_farm_run_killed_during_assembly_resumes_with_assembly(farm_env, farm):
    write_config(farm_env, slots=2)
    tmp, state = farm_env["tmp"], farm_env["state"]
    site = tmp / "site"
    (site / "slow_assembly-0.dist-info").mkdir(parents=True)
    (site / "slow_assembly-0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: slow-assembly\nVersion: 0\n")
    (site / "slow_assembly-0.dist-info" / "entry_points.txt").write_text("[farm]\nslow-assembly = slow_assembly\n")
    (site / "slow_assembly.py").write_text(SLOW_ASSEMBLY)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    (tmp / "gate").touch()
    profile = work_profile(tmp, "1-6", first=6, processor="slow-assembly")
    proc = start_run(profile, "-o", tmp / "out", env=env)
    # the line, not the file: open() makes the file before the line is written, and a kill
    # between the two would leave the first assembly unrecorded
    log = tmp / "assemblies.log"
    wait_until(lambda: log.exists() and log.read_text() == "assembling\n", 120, "the assembly to start")
    assert store_rows(state, "SELECT state FROM jobs") == [("assembling",)]
    kill(proc)
    (tmp / "assembly-gate").touch()

    again = subprocess.run([*FARM, "run", str(profile), "-o", str(tmp / "out"), "--json", "--quiet"],
                           capture_output=True, text=True, env={**os.environ, **env}, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "6 of 6 segment(s) already done" in again.stderr
    assert json.loads(again.stdout)["jobs"][0]["state"] == "done"
    exact_outputs(tmp / "out", 6)
    assert runs(tmp) == [1, 2, 3, 4, 5, 6]  # no segment ran again: only the assembly
    assert (tmp / "assemblies.log").read_text() == "assembling\nassembling\n"


def test_a_controller_leaves_a_living_farm_runs_job_alone_and_takes_over_a_killed_ones(tmp_path):
    c = Cluster(tmp_path / "cluster")
    try:
        state = c.root / "state"
        profile = work_profile(c.root, "1-8", first=2)
        env = {k: v for k, v in c.env.items() if k not in ("FARM_CONTROLLER",)}
        proc = subprocess.Popen([*FARM, "run", str(profile), "-o", str(c.root / "out"), "--json", "--quiet"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        wait_until(lambda: segment_states(state).get("done", 0) == 2, 120, "2 segments done by farm run")
        c.start_controller()
        c.start_node("helper", "--slots", "2")
        c.wait_for_nodes("helper")
        job_id = store_rows(state, "SELECT id FROM jobs")[0][0]
        # the controller looked at start (and looks every few seconds) and leaves it to its owner
        (c.root / "gate").touch()
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        assert json.loads(out)["jobs"][0]["state"] == "done"
        attempts = store_rows(state, "SELECT node FROM attempts WHERE job_id = ?", (job_id,))
        assert len(attempts) == 8 and "helper" not in {node for (node,) in attempts}
        assert not store_rows(state, "SELECT id FROM events WHERE kind = 'job_taken_over'")
        exact_outputs(c.root / "out", 8)

        # a second farm run, killed: the running controller takes its job over and ends it
        (c.root / "gate").unlink()
        second = subprocess.Popen([*FARM, "run", str(profile), "-o", str(c.root / "out2"), "--json", "--quiet"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        wait_until(lambda: len(store_rows(state, "SELECT id FROM attempts WHERE state = 'done'")) == 10, 120,
                   "2 segments of the second run done")
        kill(second)
        (c.root / "gate").touch()
        job2 = store_rows(state, "SELECT id FROM jobs ORDER BY created DESC")[0][0]
        detail = c.wait_until(lambda: (d := c.job(job2))["state"] == "done" and d, 120, "the controller to finish it",
                              every=0.5)
        assert detail["state"] == "done"
        assert store_rows(state, "SELECT job_id FROM events WHERE kind = 'job_taken_over'") == [(job2,)]
        exact_outputs(c.root / "out2", 8)
    finally:
        c.stop()


def test_a_farm_run_that_lost_its_lease_stops_with_a_message_and_its_json(farm_env, farm):
    write_config(farm_env, slots=2)
    tmp, state = farm_env["tmp"], farm_env["state"]
    profile = work_profile(tmp, "1-6", first=2)
    # short beats, so that a stopped process's lease lapses in about 1.5 s
    proc = start_run(profile, "-o", tmp / "out", env={"FARM_LEASE_HEARTBEAT": "0.3"})
    wait_until(lambda: segment_states(state).get("done", 0) == 2, 120, "2 segments done")
    proc.send_signal(signal.SIGSTOP)  # alive, but beating no more
    try:
        job = wait_until(lambda: (j := farm("status", "--json").json()[0])["state"] == "interrupted" and j, 60,
                         "the stopped run's lease to lapse", every=0.5)
    finally:
        proc.send_signal(signal.SIGCONT)
    (tmp / "gate").touch()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert "lost its lease" in err and "farm: error:" in err and "Traceback" not in err
    report = json.loads(out)
    assert "lost its lease" in report["error"]
    assert [j["state"] for j in report["jobs"]] == ["interrupted"] and report["jobs"][0]["id"] == job["id"]
    # the store is as the sweep left it: the stopped run wrote nothing after it lost its lease
    assert farm("status", job["id"], "--json").json()["state"] == "interrupted"
    resumed = farm("resume", job["batch"], "--json", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    exact_outputs(tmp / "out", 6)


def kill_midway(proc: subprocess.Popen, state: Path, at_least: int) -> set[str]:
    """SIGKILL ``proc`` once ``at_least`` segments are done and some are not; returns the
    ids of the segments done at the kill."""
    def midway():
        counts = segment_states(state)
        return counts.get("done", 0) >= at_least and sum(counts.values()) > counts.get("done", 0)
    wait_until(midway, 300, f"{at_least} segments done and more to do")
    kill(proc)
    return {seg_id for (seg_id,) in store_rows(state, "SELECT id FROM segments WHERE state = 'done'")}


def assert_resumed(farm, job_id: str, done_at_kill: set[str]) -> None:
    detail = farm("status", job_id, "--json").json()
    assert detail["state"] == "done", detail
    kept = [s for s in detail["segment_list"] if s["id"] in done_at_kill]
    assert kept and all(s["attempts"] == 1 for s in kept), kept  # not rendered again


def test_povray_render_killed_midway_resumes_with_the_frames_already_rendered(farm_env, farm):
    from tests.test_imageseq import EXAMPLE, SCENE, png_size

    write_config(farm_env, slots=2)
    tmp, state = farm_env["tmp"], farm_env["state"]
    out = tmp / "out"
    args = [EXAMPLE, SCENE, "-o", out, "--set", "settings.width=320", "--set", "settings.height=240"]
    done_at_kill = kill_midway(start_run(*args), state, 3)
    job_id = store_rows(state, "SELECT id FROM jobs")[0][0]
    assert farm("status", job_id, "--json").json()["state"] == "interrupted"

    again = farm("run", *args, "--json", "--quiet")
    assert again.returncode == 0, again.stderr
    assert again.json()["jobs"][0]["id"] == job_id
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"bouncing_{i:04d}.png" for i in range(1, 49)]
    assert all(png_size(out / n) == (320, 240) for n in names)
    frames = [(out / n).read_bytes() for n in names]
    assert all(a != b for a, b in zip(frames, frames[1:])), "a frame is missing or doubled"
    assert_resumed(farm, job_id, done_at_kill)


def test_transcode_killed_midway_resumes_into_a_whole_frame_exact_movie(farm_env, farm):
    from tests.test_transcode import duration, movie, profile, streams

    write_config(farm_env, slots=2)
    tmp, state = farm_env["tmp"], farm_env["state"]
    source = movie(tmp / "src.mp4", seconds=12, size="640x360", audio=1)
    path = profile(tmp, video={"codec": "libx264", "crf": 20, "preset": "medium", "pix_fmt": "yuv420p", "gop": 25},
                   seconds=1)
    args = [path, source, "-o", tmp / "out"]
    done_at_kill = kill_midway(start_run(*args), state, 3)
    job_id = store_rows(state, "SELECT id FROM jobs")[0][0]
    assert farm("status", job_id, "--json").json()["state"] == "interrupted"

    again = farm("run", *args, "--json", "--quiet")
    assert again.returncode == 0, again.stderr
    report = again.json()["jobs"][0]
    assert report["id"] == job_id and report["state"] == "done"
    assert sorted(p.name for p in (tmp / "out").iterdir()) == ["src-t.mp4"]
    v, = streams(tmp / "out" / "src-t.mp4", "video")
    a, = streams(tmp / "out" / "src-t.mp4", "audio")
    assert int(v["nb_read_packets"]) == 300 and abs(duration(v) - 12.0) < 0.04 and abs(duration(a) - 12.0) < 0.05
    assert_resumed(farm, job_id, done_at_kill)


def test_a_lease_is_dead_once_its_process_is_a_zombie_or_its_pid_was_reused():
    from farm.lease import pid_alive, process_start

    child = subprocess.Popen(["sleep", "60"])
    start = process_start(child.pid)
    assert start is not None and pid_alive(child.pid, start)
    assert not pid_alive(child.pid, str(int(start) + 1))  # the same pid, another process
    child.send_signal(signal.SIGKILL)
    wait_until(lambda: Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z", 60,
               "the child to be a zombie")
    assert not pid_alive(child.pid, start)  # killed, not yet reaped: gone all the same
    child.wait()
    assert not pid_alive(child.pid, start)


def test_a_store_made_before_leases_gets_them_and_its_unfinished_jobs_are_interrupted(tmp_path):
    from farm.lease import sweep
    from farm.store import Store

    path = tmp_path / "farm.db"
    old = sqlite3.connect(path)  # the batches table as it was, with a job left running
    old.executescript("""
        CREATE TABLE batches (id TEXT PRIMARY KEY, created REAL NOT NULL, origin TEXT NOT NULL);
        INSERT INTO batches VALUES ('b1', 0, 'cli');
    """)
    old.close()
    store = Store(path)
    store._write("INSERT INTO jobs(id, batch_id, seq, profile_name, profile, processor, destination, work_dir,"
                 " priority, state, created, updated) VALUES ('j1', 'b1', 0, 'p', '{}', 'command', '/d', '/w', 0,"
                 " 'running', 0, 0)")
    assert {"owner", "fingerprint"} <= {row[1] for row in store._rows("PRAGMA table_info(batches)")}
    assert sweep(store) == ["j1"]
    job = store.job("j1")
    assert job["state"] == "interrupted" and "it has no owner" in job["error"]
    store.close()
    Store(path).close()  # opening it again changes nothing
