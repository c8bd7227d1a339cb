"""`farm run` end to end on the embedded default: real Dask workers, real subprocesses."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import FARM, ROOT, alive, running_with, write_profile




def script(folder: Path, name: str, body: str) -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(body))
    return path


def probe_png(path: Path) -> tuple[int, int]:
    out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries", "stream=width,height",
                          "-of", "csv=p=0", str(path)], capture_output=True, text=True, check=True).stdout
    width, height = out.strip().split(",")
    return int(width), int(height)


def test_example_batch_renders_100_frames_in_10_segments(farm, farm_env):
    dest = farm_env["tmp"] / "frames"
    result = farm("run", ROOT / "examples" / "testsrc-frames.yaml", "-o", dest, "--json")
    assert result.returncode == 0, result.stderr
    report = result.json()
    job = report["jobs"][0]
    assert (job["state"], job["segments"], job["error"]) == ("done", 10, None)
    names = sorted(p.name for p in dest.iterdir())
    assert names == [f"testsrc_{i:04d}.png" for i in range(1, 101)]
    assert sorted(job["outputs"]) == [str(dest / n) for n in names]
    assert probe_png(dest / "testsrc_0057.png") == (640, 360)
    # neighbouring frames differ: each segment rendered its own frames, not frame 1 again
    assert (dest / "testsrc_0010.png").read_bytes() != (dest / "testsrc_0011.png").read_bytes()

    status = farm("status", job["id"], "--json").json()
    assert status["state"] == "done" and status["segments_done"] == 10
    assert [s["label"] for s in status["segment_list"]][:2] == ["frames 1-10", "frames 11-20"]


def test_plan_shows_segments_and_runs_nothing(farm, farm_env):
    result = farm("plan", ROOT / "examples" / "testsrc-frames.yaml", "--set", "frames=1-25", "--set", "segment.frames=10",
                  "--json")
    assert result.returncode == 0, result.stderr
    segments = result.json()["jobs"][0]["segments"]
    assert [s["frames"][0] for s in segments] == [1, 11, 21] and segments[-1]["frames"] == [21, 22, 23, 24, 25]
    assert not farm_env["state"].exists()


@pytest.mark.slow
def test_existing_outputs_are_not_overwritten_unless_asked(farm, farm_env):
    dest = farm_env["tmp"] / "frames"
    args = ("run", ROOT / "examples" / "testsrc-frames.yaml", "-o", dest, "--set", "frames=1-4", "--json")
    assert farm(*args).returncode == 0
    second = farm(*args)  # refused before anything runs
    assert second.returncode == 2 and not second.stdout
    assert "testsrc_0001.png and 3 more already exist" in second.stderr and "--overwrite" in second.stderr
    assert farm(*args, "--overwrite").returncode == 0


def test_a_segment_that_fails_once_is_retried_and_both_attempts_are_recorded(farm, farm_env):
    markers = farm_env["tmp"] / "markers"
    markers.mkdir()
    flaky = script(farm_env["tmp"], "flaky.py", """
        import sys, pathlib
        out, start, markers = pathlib.Path(sys.argv[1]), sys.argv[2], pathlib.Path(sys.argv[3])
        marker = markers / f"tried-{start}"
        if start == "3" and not marker.exists():
            marker.touch()
            print("simulated renderer crash on frame", start)
            sys.exit(3)
        (out / f"f{start}.txt").write_text(start)
    """)
    profile = write_profile(farm_env["tmp"], "flaky", {
        "processor": "command", "frames": "1-4", "segment": {"frames": 1}, "retries": 2,
        "settings": {"command": [sys.executable, str(flaky), "{output_dir}", "{start}", str(markers)],
                     "expect": ["f{frame}.txt"]},
        "sandbox": {"write": [str(markers)]},  # the markers outlive an attempt
    })
    result = farm("run", profile, "-o", farm_env["tmp"] / "out", "--json")
    assert result.returncode == 0, result.stderr
    job_id = result.json()["jobs"][0]["id"]
    assert sorted(p.name for p in (farm_env["tmp"] / "out").iterdir()) == ["f1.txt", "f2.txt", "f3.txt", "f4.txt"]

    from farm.store import Store

    store = Store(farm_env["state"] / "farm.db")
    segment = next(s for s in store.segments(job_id) if s["label"] == "frames 3")
    attempts = store.attempts(segment_id=segment["id"])
    store.close()
    assert [a["state"] for a in attempts] == ["failed", "done"]
    assert "exit status 3" in attempts[0]["reason"] and "simulated renderer crash" in attempts[0]["reason"]
    assert "=== command:" in attempts[0]["log"] and "=== finished: exit status 3" in attempts[0]["log"]
    assert "peak memory" in attempts[1]["log"]


def test_a_segment_that_always_fails_fails_the_job_with_its_reason(farm, farm_env):
    profile = write_profile(farm_env["tmp"], "bad", {
        "processor": "command", "frames": "1-2", "retries": 1,
        "settings": {"command": [sys.executable, "-c", "import sys; print('no licence'); sys.exit(7)", "{start}"]},
    })
    result = farm("run", profile, "-o", farm_env["tmp"] / "out", "--json")
    assert result.returncode == 1
    job = result.json()["jobs"][0]
    assert job["state"] == "failed"
    assert "failed after 2 attempts" in job["error"] and "exit status 7" in job["error"] and "no licence" in job["error"]


@pytest.mark.slow
def test_missing_expected_output_fails_the_segment(farm, farm_env):
    profile = write_profile(farm_env["tmp"], "lazy", {
        "processor": "command", "frames": "1-2", "retries": 0,
        "settings": {"command": [sys.executable, "-c", "pass", "{start}"], "expect": ["frame_{frame:03d}.exr"]},
    })
    result = farm("run", profile, "-o", farm_env["tmp"] / "out", "--json")
    assert result.returncode == 1
    assert "did not write frame_001.exr, frame_002.exr" in result.json()["jobs"][0]["error"]


HANG = """
    import os, subprocess, sys, time, pathlib
    child = subprocess.Popen(["sleep", "60"])
    pathlib.Path(sys.argv[1]).write_text(f"{os.getpid()} {child.pid}")
    time.sleep(60)
"""


def hang_setup(farm_env) -> tuple[Path, Path, dict]:
    """The hanging script, the file it writes once started, and the profile keys that
    let it write that file from inside the sandbox."""
    ready = farm_env["tmp"] / "ready"
    ready.mkdir(exist_ok=True)
    return script(farm_env["tmp"], "hang.py", HANG), ready / "pids", {"sandbox": {"write": [str(ready)]}}


def start_farm_run(profile: Path, dest: Path) -> subprocess.Popen:
    return subprocess.Popen([*FARM, "run", str(profile), "-o", str(dest), "--json", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text()
        time.sleep(0.05)
    raise AssertionError(f"{path} never appeared")


@pytest.mark.slow
def test_cancelling_a_running_job_ends_its_process_group(farm, farm_env):
    hang, pids_file, writes = hang_setup(farm_env)
    profile = write_profile(farm_env["tmp"], "hang", {
        "processor": "command", "frames": "1",
        "settings": {"command": [sys.executable, str(hang), str(pids_file), "{start}"]},
        **writes,
    })
    proc = start_farm_run(profile, farm_env["tmp"] / "out")
    wait_for(pids_file)
    pids = running_with(str(hang))  # bwrap, the script and its child, as the host numbers them
    assert len(pids) >= 2 and all(alive(pid) for pid in pids)
    job_id = farm("status", "--json").json()[0]["id"]

    cancelled = farm("cancel", job_id)
    asked = time.monotonic()
    assert cancelled.returncode == 0 and f"cancel requested for job {job_id}" in cancelled.stdout
    # the hanging command never ends by itself: only the cancel can end its processes
    while any(alive(pid) for pid in pids) and time.monotonic() - asked < 60:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in pids), "the process group outlived the cancel"
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1, err
    assert json.loads(out)["jobs"][0]["state"] == "cancelled"
    assert farm("status", job_id, "--json").json()["state"] == "cancelled"


@pytest.mark.slow
def test_ctrl_c_cancels_the_batch(farm, farm_env):
    hang, pids_file, writes = hang_setup(farm_env)
    profile = write_profile(farm_env["tmp"], "hang", {
        "processor": "command", "frames": "1",
        "settings": {"command": [sys.executable, str(hang), str(pids_file), "{start}"]},
        **writes,
    })
    proc = start_farm_run(profile, farm_env["tmp"] / "out")
    wait_for(pids_file)
    pids = running_with(str(hang))
    assert len(pids) >= 2
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert json.loads(out)["jobs"][0]["state"] == "cancelled"
    assert not any(alive(pid) for pid in pids)


@pytest.mark.slow
def test_a_segment_over_its_timeout_is_killed_retried_then_failed(farm, farm_env):
    hang, pids_file, writes = hang_setup(farm_env)
    profile = write_profile(farm_env["tmp"], "slow", {
        "processor": "command", "frames": "1", "timeout": "1s", "retries": 1,
        "settings": {"command": [sys.executable, str(hang), str(pids_file), "{start}"]},
        **writes,
    })
    result = farm("run", profile, "-o", farm_env["tmp"] / "out", "--json")
    assert result.returncode == 1, result.stderr
    job = result.json()["jobs"][0]
    assert job["state"] == "failed"
    assert "failed after 2 attempts" in job["error"] and "timeout of 1 s" in job["error"]
    assert pids_file.read_text().strip()  # it did start
    assert running_with(str(hang)) == []

    from farm.store import Store

    store = Store(farm_env["state"] / "farm.db")
    attempts = store.attempts(job_id=job["id"])
    store.close()
    assert [a["state"] for a in attempts] == ["timed_out", "timed_out"]


@pytest.mark.slow
def test_a_stalled_segment_is_ended_by_the_stall_timeout(farm, farm_env):
    hang, pids_file, writes = hang_setup(farm_env)
    profile = write_profile(farm_env["tmp"], "stall", {
        "processor": "command", "frames": "1", "stall_timeout": "1s", "retries": 0,
        "settings": {"command": [sys.executable, str(hang), str(pids_file), "{start}"]},
        **writes,
    })
    result = farm("run", profile, "-o", farm_env["tmp"] / "out", "--json")
    assert result.returncode == 1
    assert "no progress for 1 s" in result.json()["jobs"][0]["error"]


def test_farm_run_in_process_gives_the_collector_back(farm_env):
    """`farm run` holds Python's collector off while it starts (what start-up makes stays
    alive); a program that runs it in-process has the collector on again afterwards,
    whether the run was refused or done."""
    import gc
    import io

    from farm.cli import run_cli

    out = farm_env["tmp"] / "out"
    threshold = gc.get_threshold()
    try:
        said = io.StringIO()
        assert run_cli(["run", "no-such-profile", "-o", str(out)], io.StringIO(), said) == 2
        assert "no-such-profile" in said.getvalue() and gc.isenabled()
        profile = write_profile(farm_env["tmp"], "touch", {
            "processor": "command", "frames": "1-2", "segment": {"frames": 1},
            "settings": {"command": [sys.executable, "-c", "import pathlib, sys; pathlib.Path(sys.argv[1]).touch()",
                                     "{output_dir}/f{start}.txt"], "expect": ["f{frame}.txt"]}})
        said = io.StringIO()
        assert run_cli(["run", str(profile), "-o", str(out), "--quiet"], io.StringIO(), said) == 0, said.getvalue()
        assert sorted(p.name for p in out.iterdir()) == ["f1.txt", "f2.txt"] and gc.isenabled()
    finally:  # this test process is left as it was found
        gc.unfreeze()
        gc.set_threshold(*threshold)
        gc.enable()
