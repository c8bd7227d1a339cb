"""Hostile and broken input: fuzzed profiles, shell syntax in names and values, paths
that try to leave their roots."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from farm.errors import FarmError
from farm.model import Job
from farm.outputs import output_path
from farm.plugins import load_plugins
from farm.profiles import Profile, load_profile
from tests.conftest import write_profile

PLUGINS = load_plugins()
KEYS = ["name", "processor", "frames", "segment", "settings", "output", "retries", "timeout", "stall_timeout",
        "priority", "requires", "then", "extends", "overwrite", "max_node_failures", "destination", "bogus"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=20), st.sampled_from(["command", "1-10", "1-10x0", "10-1", "30m", "high", "-"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=8)
profiles = st.dictionaries(st.sampled_from(KEYS), values, max_size=8)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=profiles)
def test_every_generated_profile_is_accepted_or_refused_clearly(tmp_path, data):
    path = tmp_path / "fuzz.yaml"
    try:
        path.write_text(yaml.safe_dump(data))
    except yaml.YAMLError:
        return
    try:
        loaded = load_profile(str(path), PLUGINS)
    except FarmError as exc:
        message = str(exc)
        assert message and "\n" not in message.strip() and "Traceback" not in message
        return
    assert isinstance(loaded.profile, Profile)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_as_a_profile_file_are_refused_clearly(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("bytes") / "raw.yaml"
    path.write_bytes(raw)
    try:
        load_profile(str(path), PLUGINS)
    except FarmError as exc:
        assert str(exc).strip()


SHOW_ARGV = "import json, sys, pathlib; pathlib.Path(sys.argv[1], 'argv.json').write_text(json.dumps(sys.argv[2:]))"


@pytest.mark.parametrize("name", [
    "a; rm -rf ~ ;.mov", "$(touch PWNED).mov", "`touch PWNED`.mov", "-f", "--output=passwd",
    "space and\nnewline.mov", "ünïcødé ✓.mov", "quote'\"s.mov",
])
def test_input_names_stay_one_argument_and_are_never_interpreted(farm, farm_env, name):
    source = farm_env["tmp"] / "inputs" / name
    source.parent.mkdir(exist_ok=True)
    source.write_text("x")
    profile = write_profile(farm_env["tmp"], "argv", {
        "processor": "command", "frames": "1",
        "settings": {"command": [sys.executable, "-c", SHOW_ARGV, "{output_dir}", "{input}", "--frame={start}"]},
    })
    # a name that starts with "-" is given as a path (./-f), as with any command-line tool
    result = farm("run", profile, f"./inputs/{name}", "-o", farm_env["tmp"] / "out", "--json")
    assert result.returncode == 0, result.stderr
    argv = json.loads((farm_env["tmp"] / "out" / "argv.json").read_text())
    assert argv == [str(source.resolve()), "--frame=1"]
    assert not list(farm_env["tmp"].rglob("PWNED")) and not Path("PWNED").exists()


def test_a_value_cannot_smuggle_options_into_a_command(farm, farm_env):
    profile = write_profile(farm_env["tmp"], "argv", {
        "processor": "command", "frames": "1",
        "settings": {"command": [sys.executable, "-c", SHOW_ARGV, "{output_dir}", "--frames={frames}", "x {start} -f"]},
    })
    result = farm("run", profile, "-o", farm_env["tmp"] / "out", "--set", "frames=1", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads((farm_env["tmp"] / "out" / "argv.json").read_text()) == ["--frames=1", "x 1 -f"]


@pytest.mark.parametrize("template", ["../escape.mov", "/etc/passwd", "a/../../b.mov", "{stem}/../../x", ""])
def test_output_templates_cannot_leave_the_destination(tmp_path, template):
    profile = Profile(name="p", processor="command", output=template or None)
    job = Job(id="j", batch_id="b", input=tmp_path / "in.mov", profile=profile, settings=None,
              destination=tmp_path / "dest", work_dir=tmp_path / "w")
    if not template:
        assert output_path(job, "{stem}.{ext}", "mp4") == (tmp_path / "dest" / "in.mp4").resolve()
        return
    with pytest.raises(FarmError, match="not inside"):
        output_path(job, "{stem}.{ext}", "mp4")


def test_an_executable_path_that_only_looks_allowed_is_refused(farm, farm_env):
    fake = farm_env["tmp"] / "bin" / "ffmpeg"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\ntouch PWNED\n")
    fake.chmod(0o755)
    profile = write_profile(farm_env["tmp"], "fake", {
        "processor": "command", "frames": "1", "retries": 0, "settings": {"command": [str(fake), "{start}"]},
    })
    result = farm("run", profile, "-o", farm_env["tmp"] / "out", "--json")
    # `ffmpeg` on the allow-list means the ffmpeg on PATH, not any file named ffmpeg
    assert result.returncode == 1
    assert "is not allowed on node" in result.json()["jobs"][0]["error"]
    assert not list(farm_env["tmp"].rglob("PWNED"))
