"""Profiles: found by name or path, extended, overridden, validated before anything runs."""

from __future__ import annotations

import sys

import pytest
import yaml

from farm.errors import ProfileError
from farm.plugins import load_plugins
from farm.profiles import load_profile, parse_duration, parse_priority
from tests.conftest import ROOT, write_profile

CMD = {"command": [sys.executable, "-c", "pass", "{start}"]}


@pytest.fixture(scope="module")
def plugins():
    return load_plugins()


def test_shipped_and_local_profiles_are_listed_and_local_wins(farm, farm_env):
    local = farm_env["tmp"] / "profiles"
    local.mkdir()
    write_profile(local, "frames-png", {"description": "my own", "processor": "command", "frames": "1", "settings": CMD})
    result = farm("profiles", "list")
    assert result.returncode == 0
    line = next(l for l in result.stdout.splitlines() if l.startswith("frames-png"))
    assert "my own" in line and str(local) in line
    shipped = {p.stem for p in (ROOT / "profiles").glob("*.yaml")}
    listed = {l.split()[0] for l in result.stdout.splitlines()}
    assert shipped <= listed


def test_extends_merges_settings_and_child_wins(tmp_path, plugins):
    write_profile(tmp_path, "base", {"processor": "command", "frames": "1-100", "segment": {"frames": 10},
                                     "retries": 5, "settings": {**CMD, "env": {"A": "1", "B": "2"}}})
    child = write_profile(tmp_path, "child", {"extends": "base", "segment": {"frames": 25},
                                              "settings": {"env": {"B": "3"}}})
    loaded = load_profile(str(child), plugins, allow_env=["A", "B"])
    assert loaded.profile.name == "child"
    assert loaded.profile.segment.frames == 25 and loaded.profile.retries == 5
    assert loaded.settings.env == {"A": "1", "B": "3"} and loaded.settings.command == CMD["command"]


def test_extends_cycle_is_refused(tmp_path, plugins):
    write_profile(tmp_path, "a", {"extends": "b", "processor": "command"})
    write_profile(tmp_path, "b", {"extends": "a"})
    with pytest.raises(ProfileError, match="extends itself in a cycle"):
        load_profile(str(tmp_path / "a.yaml"), plugins)


def test_overrides_by_dotted_path(tmp_path, plugins):
    path = write_profile(tmp_path, "p", {"processor": "command", "frames": "1-100", "settings": CMD})
    loaded = load_profile(str(path), plugins, ["segment.frames=5", "frames=1-48", "priority=high", "timeout=90s"])
    assert loaded.profile.segment.frames == 5 and loaded.profile.frame_list == list(range(1, 49))
    assert loaded.profile.priority == 10 and loaded.profile.timeout == 90


def test_errors_in_an_extended_file_name_that_file(tmp_path, plugins):
    base = write_profile(tmp_path, "base", {"processor": "command", "frames": "1", "settings": CMD, "retries": -1})
    child = write_profile(tmp_path, "child", {"extends": "base"})
    with pytest.raises(ProfileError, match=f"{base}:\\d+: retries: .*greater than or equal to 0"):
        load_profile(str(child), plugins)


def test_show_prints_the_merged_profile(farm, farm_env):
    result = farm("profiles", "show", ROOT / "examples" / "testsrc-frames.yaml", "--set", "retries=4")
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert shown["retries"] == 4 and shown["segment"]["frames"] == 10 and shown["settings"]["command"][0] == "ffmpeg"


def test_every_shipped_and_example_profile_validates(farm):
    files = sorted([*(ROOT / "profiles").glob("*.yaml"), *(ROOT / "examples").glob("*.yaml")])
    files = [f for f in files if "processor:" in f.read_text()]
    result = farm("profiles", "validate", *files)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("ok: ") == len(files)


@pytest.mark.parametrize("text, seconds", [("90", 90), ("90s", 90), ("30m", 1800), ("1h30m", 5400), (2.5, 2.5)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["soon", "0s", -3, True, ""])
def test_bad_durations_say_what_is_expected(bad):
    with pytest.raises(ValueError, match="duration"):
        parse_duration(bad)


@pytest.mark.parametrize("value, number", [("high", 10), ("normal", 0), ("low", -10), (7, 7), ("-3", -3)])
def test_priorities(value, number):
    assert parse_priority(value) == number
