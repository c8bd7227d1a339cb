"""Kinds of source beyond one camera movie, each transcoded in segments: image sequences
at the profile's frame rate, and the post-production and broadcast formats (DNxHD and
DNxHR in MOV, ProRes 4444 with alpha, DV, MXF as ffmpeg writes it).

Each output is checked as a user would: its frame count, and every frame's PSNR against
the source (both put on the source's grid). A frame dropped or doubled at a join puts
every later frame about 20 dB lower (FACTS), far below the floor used here.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import write_profile
from media_cases import CASES, X264, make, psnr

pytestmark = pytest.mark.skipif(
    subprocess.run(["which", "ffmpeg"], capture_output=True).returncode != 0, reason="ffmpeg is not installed"
)

#: Below this a frame is not the source's frame at that position (testsrc2 moves every frame).
SAME_FRAME_DB = 30.0


def video_stream(path: Path) -> dict:
    data = json.loads(subprocess.run(["ffprobe", "-v", "error", "-count_packets", "-select_streams", "v:0",
                                      "-show_streams", "-of", "json", str(path)],
                                     capture_output=True, text=True, check=True).stdout)
    return data["streams"][0]


def transcode(farm, tmp: Path, source: Path, settings: dict, seconds: float) -> tuple[dict, Path | None]:
    path = write_profile(tmp, "sources", {"processor": "transcode", "segment": {"seconds": seconds},
                                          "settings": settings, "output": "{stem}-out.{ext}", "retries": 0})
    result = farm("run", path, source, "-o", tmp / "out", "--json", "--quiet")
    assert result.stdout, result.stderr
    job = result.json()["jobs"][0]
    return job, Path(job["outputs"][0]) if job["outputs"] else None


@pytest.mark.slow
@pytest.mark.parametrize("name", ["png-sequence", "tiff-sequence", "dpx-sequence", "exr-sequence"])
def test_image_sequences_are_sources_at_the_profiles_rate(farm, farm_env, name):
    tmp = farm_env["tmp"]
    case = CASES[name]
    first = make(case, tmp / "src")
    plan = farm("plan", write_profile(tmp, "p", {"processor": "transcode", "segment": {"seconds": 1},
                                                  "settings": case.settings}), first)
    assert plan.returncode == 0, plan.stderr
    assert "image sequence of 100 frames at 25 fps" in plan.stdout
    assert sum(line.split()[1:2] == ["frames"] for line in plan.stdout.splitlines()) == 4
    job, out = transcode(farm, tmp, first, case.settings, seconds=1)
    assert job["state"] == "done", job["error"]
    stream = video_stream(out)
    assert int(stream["nb_read_packets"]) == 100
    assert abs(float(stream["duration"]) - 4.0) < 0.01
    values = psnr(out, first, case, 320, 240)
    assert len(values) == 100
    worst = min(values)
    assert worst >= SAME_FRAME_DB, f"frame {values.index(worst)} is {worst:.1f} dB from the source's"


def test_an_image_sequence_takes_its_rate_from_video_fps(farm, farm_env):
    tmp = farm_env["tmp"]
    first = make(CASES["png-sequence"], tmp / "src")
    settings = {"container": "mp4", "video": {**X264, "fps": "50"}, "audio": None}
    job, out = transcode(farm, tmp, first, settings, seconds=0.5)
    assert job["state"] == "done", job["error"]
    stream = video_stream(out)
    assert int(stream["nb_read_packets"]) == 100 and stream["r_frame_rate"] == "50/1"
    assert abs(float(stream["duration"]) - 2.0) < 0.01
    unset = farm("plan", write_profile(tmp, "p", {"processor": "transcode", "settings": {**settings, "video": X264}}),
                 first)
    assert "image sequence of 100 frames at 25 fps (video.fps not set)" in unset.stdout, unset.stdout


def test_a_gap_in_an_image_sequence_is_refused_naming_the_missing_frame(farm, farm_env):
    tmp = farm_env["tmp"]
    first = make(CASES["png-sequence"], tmp / "src")
    (first.parent / "png-seq_0040.png").unlink()
    path = write_profile(tmp, "p", {"processor": "transcode", "settings": CASES["png-sequence"].settings})
    result = farm("plan", path, first)
    assert result.returncode != 0
    assert "png-seq_0040.png is missing" in result.stderr and "frames from 41 on exist" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("name, frames", [
    ("mov-dnxhd", 50), ("mov-dnxhr-hqx", 100), ("mov-prores4444-alpha", 100), ("dv-ntsc-43", 59),
    ("dv-pal-43", 50), ("mxf-xdcam-hd422", 50), ("mxf-dnxhd", 50),
])
@pytest.mark.slow
def test_post_production_and_broadcast_sources_are_frame_exact_when_segmented(farm, farm_env, name, frames):
    """Into H.264 at 240 lines, so large sources stay quick; cut every half second."""
    tmp = farm_env["tmp"]
    case = CASES[name]
    source = make(case, tmp / "src")
    assert int(video_stream(source)["nb_read_packets"]) == frames
    settings = {"container": "mp4", "video": {**X264, "height": 240, "gop": 12}, "audio": {"codec": "aac"}}
    job, out = transcode(farm, tmp, source, settings, seconds=0.5)
    assert job["state"] == "done", job["error"]
    assert job["segments"] >= 4  # audio + at least three video segments
    stream = video_stream(out)
    assert int(stream["nb_read_packets"]) == frames
    values = psnr(out, source, case, int(stream["width"]), int(stream["height"]))
    assert len(values) == frames
    worst = min(values)
    assert worst >= SAME_FRAME_DB, f"frame {values.index(worst)} is {worst:.1f} dB from the source's"
