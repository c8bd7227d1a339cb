"""The imageseq processor with real renderers: POV-Ray, a Shake-style template, Blender."""

from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path

import pytest

from farm.store import Store
from farm_imageseq.patterns import FramePattern
from tests.conftest import ROOT, write_config, write_profile

SCENE = ROOT / "examples" / "povray" / "bouncing.pov"


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def povray_profile(folder: Path, frames: str, per_segment: int = 3, retries: int = 2, **settings) -> Path:
    return write_profile(folder, "pov", {
        "processor": "imageseq", "frames": frames, "segment": {"frames": per_segment}, "retries": retries,
        "settings": {"renderer": "povray", "output": "shot_####.png", "width": 64, "height": 48, **settings},
    })


EXAMPLE = ROOT / "examples" / "povray" / "bouncing.yaml"
SMALL = ("--set", "settings.width=64", "--set", "settings.height=48")


@pytest.mark.slow
def test_a_48_frame_animation_in_segments_of_5_renders_each_frame_once(farm, farm_env):
    out = farm_env["tmp"] / "out"
    result = farm("run", EXAMPLE, SCENE, "-o", out, *SMALL, "--json")
    assert result.returncode == 0, result.stderr
    job = result.json()["jobs"][0]
    assert job["state"] == "done" and job["segments"] == 10
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"bouncing_{i:04d}.png" for i in range(1, 49)]
    assert job["outputs"] == [str(out / n) for n in names]  # in frame order
    assert all(png_size(out / n) == (64, 48) for n in names)
    frames = [(out / n).read_bytes() for n in names]
    assert all(a != b for a, b in zip(frames, frames[1:])), "the clock did not move between two frames"
    store = Store(farm_env["state"] / "farm.db")
    attempts = [s["attempts"] for s in store.segments(job["id"])]
    store.close()
    assert attempts == [1] * 10  # each frame rendered exactly once


def test_a_frame_range_outside_the_scenes_declared_range_is_refused_at_plan_time(farm, farm_env):
    result = farm("plan", EXAMPLE, SCENE, "--set", "frames=40-60")
    assert result.returncode == 2
    assert "outside the scene's declared range 1-48 (bouncing.ini)" in result.stderr


@pytest.mark.slow
def test_a_deleted_frame_is_detected_and_planned_again(farm, farm_env):
    import logging

    from farm.model import Job
    from farm.plugins import load_plugins
    from farm.profiles import load_profile
    from farm_imageseq import ImageSequence

    out = farm_env["tmp"] / "out"
    assert farm("run", EXAMPLE, SCENE, "-o", out, *SMALL, "--set", "frames=1-6").returncode == 0
    (out / "bouncing_0004.png").unlink()
    loaded = load_profile(str(EXAMPLE), load_plugins(), ["frames=1-6", "settings.width=64", "settings.height=48"])
    job = Job(id="j", batch_id="b", input=SCENE, profile=loaded.profile, settings=loaded.settings,
              destination=out, work_dir=out, frames=loaded.profile.frame_list)
    results = [{"dir": str(out), "frames": {str(f): f"bouncing_{f:04d}.png" for f in range(1, 7)}}]

    class Context:
        logger = logging.getLogger("test")

    again = ImageSequence().verify(job, results, Context())
    assert [(plan.label, plan.frames) for plan in again] == [("re-render frames 4", [4])]


@pytest.mark.slow
def test_a_sequence_chained_into_a_movie_has_every_frame(farm, farm_env):
    import subprocess

    chained = farm_env["tmp"] / "chained.yaml"
    chained.write_text(EXAMPLE.read_text() + "then: sequence-to-h264\n")
    out = farm_env["tmp"] / "out"
    result = farm("run", chained, SCENE, "-o", out, *SMALL, "--json")
    assert result.returncode == 0, result.stderr
    render, movie = result.json()["jobs"]
    assert render["state"] == movie["state"] == "done"
    assert movie["input"] == str(out / "bouncing_0001.png") and movie["outputs"] == [str(out / "bouncing.mp4")]
    counted = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0", "-show_entries",
                              "stream=nb_read_frames", "-of", "csv=p=0", str(out / "bouncing.mp4")],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert int(counted) == 48


@pytest.mark.slow
@pytest.mark.parametrize("spec, expected", [("1-10x3", [1, 4, 7, 10]), ("1,5,7-9", [1, 5, 7, 8, 9])])
def test_stepped_and_listed_frames_render_exactly_those(farm, farm_env, spec, expected):
    profile = povray_profile(farm_env["tmp"], spec, output="img.%03d.png")
    result = farm("run", profile, SCENE, "-o", farm_env["tmp"] / "out", "--json")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (farm_env["tmp"] / "out").iterdir()) == [f"img.{i:03d}.png" for i in expected]


def test_a_scene_that_does_not_parse_fails_the_job_with_povrays_reason(farm, farm_env):
    broken = farm_env["tmp"] / "broken.pov"
    broken.write_text("sphere { <0,0,0>, 1 pigment { colour rgb <1,0,0> }\n")  # unbalanced brace
    profile = povray_profile(farm_env["tmp"], "1-2", retries=0)
    result = farm("run", profile, broken, "-o", farm_env["tmp"] / "out", "--json")
    assert result.returncode == 1
    error = result.json()["jobs"][0]["error"]
    assert "povray failed with exit status 1" in error and "Parse Error" in error


def test_a_renderer_version_no_node_has_is_refused(farm, farm_env):
    profile = write_profile(farm_env["tmp"], "future", {
        "processor": "imageseq", "frames": "1", "requires": {"povray": ">=99"},
        "settings": {"renderer": "povray", "width": 8, "height": 8},
    })
    result = farm("run", profile, SCENE, "-o", farm_env["tmp"] / "out")
    assert result.returncode == 2 and "needs povray >=99" in result.stderr and "povray 3.7" in result.stderr


@pytest.mark.parametrize("pattern, message", [
    ("shot.png", "exactly one frame number"), ("../shot_####.png", "inside the destination"),
    ("shot_####", "file extension"), ("a_##_b_%04d.png", "exactly one frame number"),
])
def test_bad_output_patterns_are_refused_at_load(farm, farm_env, pattern, message):
    profile = povray_profile(farm_env["tmp"], "1-2", output=pattern)
    result = farm("run", profile, SCENE, "-o", farm_env["tmp"] / "out")
    assert result.returncode == 2 and "settings.output" in result.stderr and message in result.stderr


def test_patterns_normalise_padding():
    assert FramePattern.parse("shot_####.png").name(7) == "shot_0007.png"
    assert FramePattern.parse("shot.%05d.exr").name(12) == "shot.00012.exr"
    assert FramePattern.parse("s_#.png").name(123) == "s_123.png"


FLAKY_RENDER = """
import pathlib, struct, sys, zlib
start, end, pattern, marks = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], pathlib.Path(sys.argv[4])

def png(width, height):
    raw = b"".join(b"\\x00" + b"\\x80" * (width * 3) for _ in range(height))
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\\x89PNG\\r\\n\\x1a\\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))

for frame in range(start, end + 1):
    first_time = not (marks / f"seen-{frame}").exists()
    (marks / f"seen-{frame}").touch()
    if frame == 3 and first_time:
        continue                                             # a frame silently not written
    if frame == 5 and first_time:
        pathlib.Path(pattern % frame).write_bytes(b"\\x89PNG truncated")  # a broken frame
        continue
    pathlib.Path(pattern % frame).write_bytes(png(16, 8))
"""


@pytest.mark.slow
def test_missing_and_broken_frames_are_rendered_again(farm, farm_env):
    script = farm_env["tmp"] / "render.py"
    script.write_text(FLAKY_RENDER)
    marks = farm_env["tmp"] / "marks"
    marks.mkdir()
    profile = write_profile(farm_env["tmp"], "shake", {
        "processor": "imageseq", "frames": "1-6", "segment": {"frames": 3},
        "settings": {"renderer": "template", "output": "comp_####.png", "width": 16, "height": 8,
                     "template": [sys.executable, str(script), "{start}", "{end}", "{output}", str(marks)]},
        "sandbox": {"write": [str(marks)]},  # the marks outlive an attempt
    })
    result = farm("run", profile, "-o", farm_env["tmp"] / "out", "--json")
    # frame 3 is missing: its segment fails and is retried; frame 5 is written but broken:
    # its segment "succeeds", verification catches the frame and renders it again
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in (farm_env["tmp"] / "out").iterdir())
    assert names == [f"comp_{i:04d}.png" for i in range(1, 7)]
    assert all(png_size(farm_env["tmp"] / "out" / n) == (16, 8) for n in names)
    store = Store(farm_env["state"] / "farm.db")
    job_id = result.json()["jobs"][0]["id"]
    kinds = [e["kind"] for e in store.events(job_id)]
    store.close()
    assert "verify_rerun" in kinds


@pytest.mark.slow
def test_frames_still_broken_after_one_re_render_fail_the_job_listing_them(farm, farm_env):
    profile = write_profile(farm_env["tmp"], "liar", {
        "processor": "imageseq", "frames": "1-4", "retries": 1,
        "settings": {"renderer": "template", "output": "f_####.png", "width": 16, "height": 8,
                     "template": [sys.executable, "-c",
                                  "import sys; [open(sys.argv[3] % f, 'wb').write(b'junk') "
                                  "for f in range(int(sys.argv[1]), int(sys.argv[2]) + 1)]",
                                  "{start}", "{end}", "{output}"]},
    })
    result = farm("run", profile, "-o", farm_env["tmp"] / "out", "--json")
    assert result.returncode == 1
    error = result.json()["jobs"][0]["error"]
    assert "frames 1-4 not a complete PNG, after rendering them again" in error
    assert not (farm_env["tmp"] / "out").exists() or not list((farm_env["tmp"] / "out").iterdir())


def test_a_template_command_not_on_the_allow_list_is_refused(farm, farm_env):
    profile = write_profile(farm_env["tmp"], "shake", {
        "processor": "imageseq", "frames": "1-2",
        "settings": {"renderer": "template", "template": ["shake", "-exec", "{scene}", "-t", "{start}-{end}"]},
    })
    result = farm("run", profile, SCENE, "-o", farm_env["tmp"] / "out")
    assert result.returncode == 2 and "needs command:shake" in result.stderr


@pytest.mark.slow
def test_then_chains_a_follow_up_job_only_after_success(farm, farm_env):
    follow = write_profile(farm_env["tmp"], "follow", {
        "processor": "command", "frames": "1",
        "settings": {"command": [sys.executable, "-c",
                                 "import sys, pathlib; pathlib.Path(sys.argv[1], 'made-from.txt').write_text(sys.argv[2])",
                                 "{output_dir}", "{input}"]},
    })
    profile = povray_profile(farm_env["tmp"], "1-4", per_segment=2)
    data = profile.read_text() + f"then: {follow}\n"
    profile.write_text(data)
    result = farm("run", profile, SCENE, "-o", farm_env["tmp"] / "out", "--json")
    assert result.returncode == 0, result.stderr
    jobs = result.json()["jobs"]
    assert [j["state"] for j in jobs] == ["done", "done"]
    assert (farm_env["tmp"] / "out" / "made-from.txt").read_text() == str(farm_env["tmp"] / "out" / "shot_0001.png")

    broken = farm_env["tmp"] / "broken.pov"
    broken.write_text("sphere {")
    failed = farm("run", profile, broken, "-o", farm_env["tmp"] / "out2", "--json")
    assert failed.returncode == 1 and len(failed.json()["jobs"]) == 1  # no follow-up for a failed job


@pytest.mark.slow
def test_adaptive_segments_recut_the_remaining_frames(farm, farm_env):
    write_config(farm_env, slots=1)
    profile = write_profile(farm_env["tmp"], "adaptive", {
        "processor": "imageseq", "frames": "1-30", "segment": {"target_seconds": 1.5},
        "settings": {"renderer": "povray", "output": "a_####.png", "width": 32, "height": 24},
    })
    result = farm("run", profile, SCENE, "-o", farm_env["tmp"] / "out", "--json")
    assert result.returncode == 0, result.stderr
    assert len(list((farm_env["tmp"] / "out").iterdir())) == 30
    store = Store(farm_env["state"] / "farm.db")
    job_id = result.json()["jobs"][0]["id"]
    recuts = [json.loads(e["data"]) for e in store.events(job_id) if e["kind"] == "recut"]
    sizes = [len(json.loads(s["frames"])) for s in store.segments(job_id)]
    store.close()
    assert recuts and recuts[0]["frames_per_segment"] > 2  # tiny frames: larger segments after learning
    assert max(sizes) > 2 and sum(sizes) == 30


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("blender") is None, reason="Blender is not installed (./setup installs it)")
def test_blender_renders_frames_headless(farm, farm_env):
    profile = write_profile(farm_env["tmp"], "blend", {
        "processor": "imageseq", "frames": "1-6", "segment": {"frames": 2},
        "settings": {"renderer": "blender", "engine": "CYCLES", "samples": 1, "output": "bl_####.png",
                     "width": 32, "height": 24},
    })
    result = farm("run", profile, "-o", farm_env["tmp"] / "out", "--json", timeout=600)
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in (farm_env["tmp"] / "out").iterdir())
    assert names == [f"bl_{i:04d}.png" for i in range(1, 7)]
    assert all(png_size(farm_env["tmp"] / "out" / n) == (32, 24) for n in names)
