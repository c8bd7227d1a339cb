"""Hostile and broken input: fuzzed profiles, shell syntax in names and values, paths
that try to leave their roots."""

from __future__ import annotations

import json
import re
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


@pytest.mark.slow
def test_every_api_route_wants_the_token(tmp_path):
    import httpx

    from tests.cluster_helpers import Cluster

    c = Cluster(tmp_path / "c")
    try:
        c.start_controller()
        spec = httpx.get(f"{c.url}/openapi.json", verify=False)
        routes = [(method.upper(), path) for path, methods in spec.json()["paths"].items() for method in methods] \
            if spec.status_code == 200 else []
        assert routes, "the OpenAPI spec lists no routes"
        for method, path in routes:
            concrete = re.sub(r"\{[a-z_]+\}", "x-1", path)
            response = httpx.request(method, f"{c.url}{concrete}", verify=False, json={})
            assert response.status_code == 401, (method, path, response.status_code)
            assert "token" in response.json()["error"]
    finally:
        c.stop()


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(6))
def test_damaged_media_is_refused_or_fails_with_a_reason(farm, farm_env, seed):
    import random
    import subprocess

    source = farm_env["tmp"] / "clip.mp4"
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i",
                    "testsrc2=size=160x120:rate=25:duration=2", "-pix_fmt", "yuv420p", str(source)], check=True)
    data = bytearray(source.read_bytes())
    rng = random.Random(seed)
    if seed % 3 == 0:
        data = data[: rng.randrange(16, len(data) // 2)]  # truncated
    else:
        for _ in range(20 * seed):  # bytes flipped at random
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    source.write_bytes(bytes(data))
    result = farm("run", "h264-web-720p", source, "-o", farm_env["tmp"] / "out", "--json", timeout=300)
    assert "Traceback" not in result.stderr
    if result.returncode == 2:
        assert result.stderr.startswith("farm: error: ")
        return
    job = result.json()["jobs"][0]
    assert job["state"] in ("done", "failed")
    if job["state"] == "failed":
        assert job["error"] and not job["outputs"]
        assert not (farm_env["tmp"] / "out").exists() or not list((farm_env["tmp"] / "out").glob("*.mp4"))


def _edit(path: Path, old: bytes, new: bytes) -> None:
    data = path.read_bytes()
    assert old in data, f"{old!r} not in {path.name}"
    path.write_bytes(data.replace(old, new))


def _sof(path: Path, width: int, height: int) -> None:
    """Every JPEG frame header (SOF0) of an MJPEG movie claims this picture size."""
    import struct

    data = bytearray(path.read_bytes())
    at = data.find(b"\xff\xc0")
    while at >= 0:
        data[at + 5:at + 9] = struct.pack(">HH", height, width)
        at = data.find(b"\xff\xc0", at + 2)
    path.write_bytes(bytes(data))


def _absurd(folder: Path) -> dict[str, tuple[str, str]]:
    """Movies whose metadata is absurd, made with ffmpeg and edited bytes; for each, the
    outcome and the words of its reason."""
    from tests.conftest import lavfi

    def clip(name: str, *extra: str) -> Path:
        return lavfi(folder / name, seconds=1, size="96x64", extra=list(extra))

    y4m = clip("huge.y4m").read_bytes()
    header = y4m[: y4m.index(b"\n")]
    for name, old, new in [("huge.y4m", b"W96 H64", b"W16384 H16384"), ("rate0.y4m", b"F25:1", b"F0:1"),
                           ("fast.y4m", b"F25:1", b"F1000000:1"), ("slow.y4m", b"F25:1", b"F1:1000000")]:
        (folder / name).write_bytes(header.replace(old, new) + y4m[len(header):])
    _sof(clip("tall.mkv", "-pix_fmt", "yuvj420p", "-c:v", "mjpeg"), 8, 60000)
    _sof(clip("bigjpeg.avi", "-pix_fmt", "yuvj420p", "-c:v", "mjpeg"), 16000, 16000)
    # Matroska's DefaultDuration (0x23E383, 4 bytes) of 40 ms said to be 4295 s
    _edit(clip("duration.mkv", "-c:v", "libx264"), bytes.fromhex("23e3838402625a00"), bytes.fromhex("23e38384ffffffff"))
    negative = ["-c:v", "libx264", "-output_ts_offset", "-10"]
    clip("edit-list.mp4", *negative)  # an edit list that starts 10 s after the last frame
    clip("negative.ts", *negative, "-avoid_negative_ts", "disabled")  # timestamps from -10 s
    clip("untimed.mkv", *negative, "-avoid_negative_ts", "disabled")  # no timestamps left at all
    clip("wrapped.flv", *negative, "-avoid_negative_ts", "disabled")  # -10 s wraps to 24.8 days
    clip("good.mp4")
    return {
        "huge.y4m": ("failed", "Picture size 16384x16384 is invalid"),
        "tall.mkv": ("failed", "picture of 8x60000, which is not plausible"),
        "bigjpeg.avi": ("failed", "ffmpeg failed with exit status 1: Error while decoding stream"),
        "rate0.y4m": ("done", ""),  # ffmpeg reads a rate of 0 as 25 fps
        "fast.y4m": ("failed", "frame rate of 1e+06 fps (from its header and timestamps) is not plausible"),
        "slow.y4m": ("failed", "frame rate of 1e-06 fps (from its header and timestamps) is not plausible"),
        "duration.mkv": ("done", ""),  # the last frame lasts one frame, as at any constant rate
        "edit-list.mp4": ("failed", "its edit list cuts away all 25 of them"),
        "negative.ts": ("done", ""),
        "untimed.mkv": ("failed", "none of the 25 frames of its video stream has a timestamp"),
        "wrapped.flv": ("done", ""),
        "good.mp4": ("done", ""),
    }


@pytest.mark.slow
def test_absurd_media_metadata_is_refused_or_fails_with_a_reason(farm, farm_env):
    import subprocess

    folder = farm_env["tmp"] / "in"
    folder.mkdir()
    cases = _absurd(folder)
    out = farm_env["tmp"] / "out"
    result = farm("run", "h264-web-720p", *(folder / name for name in cases), "-o", out, "--json", timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    jobs = {Path(job["input"]).name: job for job in result.json()["jobs"]}
    outcomes = {name: (job["state"], job["error"] or "") for name, job in jobs.items()}
    for name, (state, words) in cases.items():
        got, error = outcomes[name]
        assert got == state and words in error and "Traceback" not in error, (name, outcomes[name])
    for name, job in jobs.items():
        stem = Path(name).stem
        made = sorted(p.name for p in out.iterdir() if p.name.startswith((stem, f".{stem}")))  # temporaries too
        if job["state"] == "failed":
            assert not job["outputs"] and not made, (name, made)  # nothing half-written delivered
            continue
        assert made == [f"{Path(name).stem}-720p.mp4"]
        frames = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0", "-show_entries",
                                 "stream=nb_read_frames,height", "-of", "csv=p=0", str(out / made[0])],
                                capture_output=True, text=True).stdout.strip()
        assert frames == "720,25", (name, frames)


@pytest.mark.parametrize("processor, settings, message", [
    ("imageseq", {"renderer": "povray", "output": "/tmp/shot_####.png", "width": 64, "height": 48},
     "must be a relative name inside the destination"),
    ("command", {"command": [sys.executable, "-V"], "expect": ["/etc/passwd"]}, "must be a name inside the output folder"),
    ("command", {"command": [sys.executable, "-V"], "expect": ["../up.txt"]}, "must be a name inside the output folder"),
])
def test_absolute_or_parent_paths_where_names_are_expected_are_refused(tmp_path, processor, settings, message):
    path = write_profile(tmp_path, "names", {"processor": processor, "frames": "1", "settings": settings})
    with pytest.raises(FarmError, match=message):
        load_profile(str(path), PLUGINS)


@pytest.mark.parametrize("template", ["sub/{stem}.png", "link.png"])
def test_a_link_inside_the_destination_is_no_way_out_of_it(tmp_path, template):
    destination, elsewhere = tmp_path / "dest", tmp_path / "elsewhere"
    destination.mkdir()
    elsewhere.mkdir()
    (destination / "sub").symlink_to(elsewhere)
    (destination / "link.png").symlink_to(elsewhere / "new.png")  # dangling: the file is yet to be written
    profile = Profile(name="p", processor="command", output=template)
    job = Job(id="j", batch_id="b", input=tmp_path / "in.mov", profile=profile, settings=None,
              destination=destination, work_dir=tmp_path / "w")
    with pytest.raises(FarmError, match="not inside"):
        output_path(job, "{stem}.{ext}", "png")


WRITE_THROUGH = """
import os, pathlib, sys
out, how, secret = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
if how == "folder":  # an ordinary file, in a folder the destination has as a link to elsewhere
    (out / "sub").mkdir()
    (out / "sub" / "x.txt").write_text("written")
else:  # a link among the outputs, to a file the job has no business delivering
    os.symlink(secret, out / "x.txt")
"""


@pytest.mark.parametrize("how", ["folder", "link"])
def test_delivery_never_follows_a_link_out_of_the_destination(farm, farm_env, how):
    tmp = farm_env["tmp"]
    destination, elsewhere = tmp / "dest", tmp / "elsewhere"
    destination.mkdir()
    elsewhere.mkdir()
    (destination / "sub").symlink_to(elsewhere)
    secret = tmp / "secret.txt"
    secret.write_text("not for the destination")
    script = tmp / "write.py"
    script.write_text(WRITE_THROUGH)
    profile = write_profile(tmp, "through", {
        "processor": "command", "frames": "1", "retries": 0,
        "settings": {"command": [sys.executable, str(script), "{output_dir}", how, str(secret)]},
    })
    result = farm("run", profile, "-o", destination, "--json")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    job = result.json()["jobs"][0]
    assert job["state"] == "failed" and not job["outputs"]
    reason = "which is not inside the destination" if how == "folder" else "x.txt is a symbolic link"
    assert reason in job["error"], job["error"]
    assert not list(elsewhere.iterdir())  # nothing written through the link
    assert sorted(p.name for p in destination.iterdir()) == ["sub"]  # and nothing delivered
