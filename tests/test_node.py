"""Node-side pieces: path mapping between controller and node, part-time hours."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from farm.config import PartTime
from farm.node import Availability, _inside_hours, map_path, unmap_values

MAPPING = {"/Volumes/Media": "/mnt/media", "/Volumes/Media/Archive": "/srv/archive"}


@pytest.mark.parametrize("given, seen", [
    ("/Volumes/Media/shot01.mov", "/mnt/media/shot01.mov"),
    ("/Volumes/Media/Archive/old.mov", "/srv/archive/old.mov"),  # the longest prefix wins
    ("/Volumes/MediaX/file", "/Volumes/MediaX/file"),  # not a prefix at a folder boundary
    ("/elsewhere/file", "/elsewhere/file"),
])
def test_paths_are_mapped_by_prefix(given, seen):
    assert map_path(Path(given), MAPPING) == Path(seen)


def test_results_are_mapped_back_for_the_controller():
    result = {"dir": "/mnt/media/work/a1", "files": ["/mnt/media/work/a1/f.png", "f.png"], "frames": [1, 2]}
    assert unmap_values(result, MAPPING) == {
        "dir": "/Volumes/Media/work/a1", "files": ["/Volumes/Media/work/a1/f.png", "f.png"], "frames": [1, 2]}


@pytest.mark.parametrize("hours, hour, inside", [
    ("09:00-17:00", 12, True), ("09:00-17:00", 17, False), ("19:00-07:00", 23, True),
    ("19:00-07:00", 3, True), ("19:00-07:00", 12, False),
])
def test_hours_may_wrap_past_midnight(hours, hour, inside):
    moment = time.struct_time((2026, 11, 25, hour, 30, 0, 2, 329, 0))
    assert _inside_hours(hours, moment) is inside


def test_a_full_time_node_always_takes_work():
    assert Availability(None).state() == (True, False, "")


def test_outside_hours_a_part_time_node_says_why():
    now = time.localtime()
    start = (now.tm_hour + 2) % 24
    policy = PartTime(hours=f"{start:02d}:00-{(start + 1) % 24:02d}:00", hand_back=True)
    accepting, hand_back, reason = Availability(policy).state()
    assert not accepting and hand_back and "outside its hours" in reason


# -- a segment's process, followed in one thread --------------------------------------------


def _runner(tmp_path, sandboxed: bool, cancelled=None):
    import threading

    from farm import sandbox
    from farm.node import AttemptLog, CommandRunner

    policy = sandbox.Policy(write=[str(tmp_path)]) if sandboxed else None
    log = AttemptLog()
    return log, CommandRunner(log, cancelled or threading.Event(), "test", kill_grace=1.0, policy=policy,
                              home=tmp_path)


@pytest.mark.parametrize("sandboxed", [False, True], ids=["plain", "sandboxed"])
def test_every_line_of_output_arrives_in_order_even_the_last_one_without_a_newline(tmp_path, sandboxed):
    from farm import sandbox

    if sandboxed and not sandbox.availability().ok:
        pytest.skip("bubblewrap cannot run here")
    log, runner = _runner(tmp_path, sandboxed)
    seen: list[str] = []
    script = "for i in $(seq 1 3000); do echo line $i; done; printf 'no newline at the end'; exit 3"
    result = runner.run(["sh", "-c", script], cwd=tmp_path, on_line=seen.append, check=False)
    assert result.exit_status == 3
    assert seen == [f"line {i}" for i in range(1, 3001)] + ["no newline at the end"]
    assert result.output.splitlines()[-1] == "no newline at the end"
    assert "=== finished: exit status 3" in log.text()


def test_a_process_that_closed_its_output_is_still_ended_on_cancel(tmp_path):
    import threading

    from farm.node import Cancelled

    cancelled = threading.Event()
    log, runner = _runner(tmp_path, False, cancelled)
    marker = tmp_path / "closed"
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            runner.run(["sh", "-c", f"exec >/dev/null 2>&1; touch {marker}; sleep 600"], cwd=tmp_path)
        except Cancelled as exc:
            outcome["cancelled"] = str(exc)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the process never started"
    cancelled.set()
    thread.join(timeout=60)
    assert not thread.is_alive(), "the cancel did not end the process"
    assert "killed by SIGTERM" in str(outcome.get("cancelled")), outcome
