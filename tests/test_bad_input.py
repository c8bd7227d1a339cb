"""Bad input: one line `farm: error: ...`, exit status 2, no traceback, nothing run."""

from __future__ import annotations

import os
import sys

import pytest

from tests.conftest import write_profile

FRAMES_CMD = [sys.executable, "-c", "pass", "{start}"]


def line_of(path, key):
    """The line where a top-level key is written, as a user would look it up."""
    lines = path.read_text().splitlines()
    return next(number for number, text in enumerate(lines, 1) if text.startswith(f"{key}:"))


def assert_refused(result, *fragments):
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("farm: error: ")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert result.stdout == ""
    return errors[0]


@pytest.fixture
def good(farm_env):
    return {"processor": "command", "frames": "1-10", "segment": {"frames": 5}, "settings": {"command": FRAMES_CMD}}


def test_unknown_profile_names_where_it_looked(farm, farm_env):
    line = assert_refused(farm("run", "no-such-profile", "-o", farm_env["tmp"] / "o"), "unknown profile 'no-such-profile'")
    assert "looked in" in line and "known profiles:" in line


def test_missing_profile_file(farm, farm_env):
    assert_refused(farm("run", "missing/profile.yaml"), "profile file 'missing/profile.yaml' does not exist")


def test_yaml_syntax_error_shows_the_line(farm, farm_env):
    path = farm_env["tmp"] / "broken.yaml"
    path.write_text("name: broken\nprocessor: command\nsettings:\n  command: [a, b\n  expect: x\n")
    assert_refused(farm("run", path), f"{path}:", "YAML syntax error")


def test_unknown_processor(farm, farm_env, good):
    path = write_profile(farm_env["tmp"], "p", {**good, "processor": "nuke"})
    line = assert_refused(farm("run", path), f"{path}:{line_of(path, 'processor')}: processor:", "unknown processor 'nuke'")
    assert "command" in line  # the registered ones are listed


def test_wrong_value_type_names_file_line_and_key(farm, farm_env, good):
    path = write_profile(farm_env["tmp"], "p", {**good, "retries": "many"})
    assert_refused(farm("run", path), f"{path}:{line_of(path, 'retries')}: retries:", "integer")


def test_wrong_type_inside_processor_settings(farm, farm_env, good):
    path = write_profile(farm_env["tmp"], "p", {**good, "settings": {"command": "ffmpeg -i x"}})
    assert_refused(farm("run", path), f"{path}:", "settings.command:", "list")


def test_unknown_top_level_key(farm, farm_env, good):
    path = write_profile(farm_env["tmp"], "p", {**good, "retires": 3})
    assert_refused(farm("run", path), f"{path}:{line_of(path, 'retires')}: retires: unknown key 'retires'", "retries")


def test_unknown_settings_key(farm, farm_env, good):
    path = write_profile(farm_env["tmp"], "p", {**good, "settings": {"command": FRAMES_CMD, "comand": ["x"]}})
    assert_refused(farm("run", path), "settings.comand: unknown key 'comand'", "command")


def test_missing_input_file(farm, farm_env, good):
    path = write_profile(farm_env["tmp"], "p", {**good, "settings": {"command": [*FRAMES_CMD, "{input}"]}})
    assert_refused(farm("run", path, farm_env["tmp"] / "nope.mov"), "input", "nope.mov' does not exist")


def test_input_needed_but_none_given(farm, farm_env, good):
    path = write_profile(farm_env["tmp"], "p", {**good, "settings": {"command": [*FRAMES_CMD, "{input}"]}})
    assert_refused(farm("run", path), "needs at least one input file")


def test_input_is_a_directory(farm, farm_env, good):
    path = write_profile(farm_env["tmp"], "p", {**good, "settings": {"command": [*FRAMES_CMD, "{input}"]}})
    assert_refused(farm("run", path, farm_env["tmp"]), "is a directory; expected a file")


def test_frame_range_end_before_start(farm, farm_env, good):
    path = write_profile(farm_env["tmp"], "p", {**good, "frames": "20-10"})
    assert_refused(farm("run", path), f"{path}:{line_of(path, 'frames')}: frames:", "end 10 is before start 20")


def test_frame_range_from_set_override(farm, farm_env, good):
    path = write_profile(farm_env["tmp"], "p", good)
    assert_refused(farm("run", path, "--set", "frames=9-3"), "--set frames=9-3: frames:", "end 3 is before start 9")


@pytest.mark.parametrize("size", [0, -5])
def test_zero_or_negative_chunk_size(farm, farm_env, good, size):
    path = write_profile(farm_env["tmp"], "p", good)
    assert_refused(farm("run", path, "--set", f"segment.frames={size}"), "segment.frames:", "greater than or equal to 1")


def test_command_not_on_the_allow_list(farm, farm_env, good):
    path = write_profile(farm_env["tmp"], "p", {**good, "settings": {"command": ["rm", "-rf", "{output_dir}"]}})
    assert_refused(farm("run", path, "-o", farm_env["tmp"] / "o"), "needs command:rm", "allow_commands")
    assert not (farm_env["tmp"] / "state" / "farm.db").exists()  # nothing was stored


def test_unknown_token_in_a_command(farm, farm_env, good):
    path = write_profile(farm_env["tmp"], "p", {**good, "settings": {"command": [*FRAMES_CMD, "{outptu}"]}})
    assert_refused(farm("run", path), "settings.command:", "unknown token {outptu}")


def test_destination_that_is_a_file(farm, farm_env, good):
    path = write_profile(farm_env["tmp"], "p", good)
    blocker = farm_env["tmp"] / "taken"
    blocker.write_text("x")
    assert_refused(farm("run", path, "-o", blocker), "destination", "is a file; expected a folder")


def test_unwritable_destination(farm, farm_env, good):
    path = write_profile(farm_env["tmp"], "p", good)
    if os.geteuid() == 0:
        target = "/proc/farm-out"  # not writable even for root
    else:
        locked = farm_env["tmp"] / "locked"
        locked.mkdir(mode=0o500)
        target = locked / "out"
    assert_refused(farm("run", path, "-o", target), "destination", "is not writable")


def test_bad_set_syntax(farm, farm_env, good):
    path = write_profile(farm_env["tmp"], "p", good)
    assert_refused(farm("run", path, "--set", "retries"), "--set 'retries': expected KEY=VALUE")


def test_debug_shows_the_traceback(farm, farm_env):
    result = farm("--debug", "run", "no-such-profile")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_validate_reports_each_bad_file(farm, farm_env, good):
    ok = write_profile(farm_env["tmp"], "ok", good)
    bad = write_profile(farm_env["tmp"], "bad", {**good, "priority": "urgent"})
    result = farm("profiles", "validate", ok, bad)
    assert result.returncode == 2
    assert f"ok: {ok}" in result.stdout
    assert f"farm: error: {bad}:" in result.stderr and "priority" in result.stderr and "Traceback" not in result.stderr
