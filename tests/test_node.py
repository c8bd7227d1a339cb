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
