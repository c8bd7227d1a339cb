"""MXF out: the shipped ``xdcam-hd422-mxf`` profile (MPEG-2 4:2:2 at 50 Mb/s in MXF OP1a,
24-bit PCM), segmented and joined frame-exact, its fields and start timecode kept.

Sources are made by ffmpeg lavfi, small and short; each output is checked as a broadcast
engineer would: ffprobe's codec, pixel format, field order and timecode, the frame count,
and every frame's PSNR against the source.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from test_transcode import psnr, run_json, streams
from test_transcode_policies import make

pytestmark = pytest.mark.skipif(
    subprocess.run(["which", "ffmpeg"], capture_output=True).returncode != 0, reason="ffmpeg is not installed"
)

FAST = ["--set", "segment.seconds=1"]


def timecode(path: Path) -> str | None:
    out = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format_tags=timecode", "-of", "csv=p=0",
                          str(path)], capture_output=True, text=True, check=True).stdout.strip()
    return out or None


def deliver(farm, source: Path, out: Path, *more: str) -> Path:
    code, report = run_json(farm, "xdcam-hd422-mxf", source, "-o", out, *FAST, *more)
    job = report["jobs"][0]
    assert code == 0 and job["state"] == "done", job
    assert job["segments"] >= 4, job  # audio + three video segments: two joins at least
    return Path(job["outputs"][0])


@pytest.mark.slow
def test_xdcam_mxf_is_joined_frame_exact_with_its_timecode_and_pcm(farm, farm_env):
    tmp = farm_env["tmp"]
    source = make(tmp / "tc.mov", "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
                  "-c:a", "pcm_s16le", "-timecode", "10:00:00:00", seconds=3)
    plan = farm("plan", "xdcam-hd422-mxf", source, *FAST)
    assert plan.returncode == 0, plan.stderr
    assert "picture: yuv422p (8-bit 4:2:2; the source 8-bit 4:2:0); timecode 10:00:00:00 kept" in plan.stdout
    out = deliver(farm, source, tmp / "out")
    assert out.name == "tc-xdcam.mxf"
    video, audio = streams(out, "video")[0], streams(out, "audio")[0]
    assert (video["codec_name"], video["pix_fmt"], video["nb_read_packets"]) == ("mpeg2video", "yuv422p", "75")
    assert (audio["codec_name"], audio["sample_rate"]) == ("pcm_s24le", "48000")
    assert abs(float(audio["duration"]) - 3.0) < 0.05
    assert timecode(out) == "10:00:00:00"
    values = psnr(out, source)
    assert len(values) == 75 and min(values) > 32, f"frame {values.index(min(values))}: {min(values):.1f} dB"


@pytest.mark.slow
def test_an_interlaced_source_keeps_its_fields_in_xdcam_mxf(farm, farm_env):
    tmp = farm_env["tmp"]
    source = make(tmp / "tff.mp4", "-c:v", "libx264", "-preset", "ultrafast", "-flags", "+ilme+ildct", "-top", "1",
                  "-pix_fmt", "yuv420p", "-c:a", "aac", seconds=3, rate=50,
                  vf="tinterlace=mode=interleave_top,setfield=tff")
    plan = farm("plan", "xdcam-hd422-mxf", source, *FAST)
    assert "interlaced (top field first) kept: coded as fields, flagged tff (interlace: keep)" in plan.stdout
    out = deliver(farm, source, tmp / "out")
    video = streams(out, "video")[0]
    assert (video["field_order"], video["nb_read_packets"]) == ("tt", "75")
    values = psnr(out, source)
    assert len(values) == 75 and min(values) > 30, f"frame {values.index(min(values))}: {min(values):.1f} dB"


def test_a_frame_rate_mpeg2_cannot_encode_is_refused_at_plan_time(farm, farm_env):
    tmp = farm_env["tmp"]
    source = make(tmp / "odd.mp4", "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac",
                  seconds=1, rate=12)
    result = farm("plan", "xdcam-hd422-mxf", source)
    assert result.returncode == 2
    assert ("odd.mp4 would be encoded at 12.000 fps, which mpeg2video cannot encode (it encodes 23.976, 24, 25, "
            "29.97, 30, 50, 59.94, 60 fps); set video.fps to one of them") in result.stderr, result.stderr
    assert farm("plan", "xdcam-hd422-mxf", source, "--set", "settings.video.fps=25").returncode == 0


def test_mxf_settings_that_cannot_work_are_refused_at_load(farm, farm_env):
    tmp = farm_env["tmp"]
    source = make(tmp / "in.mp4", "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", seconds=1)
    for override, words in ((["--set", "settings.audio.codec=aac"], "container mxf cannot hold aac audio"),
                            (["--set", "settings.video.bitrate=null", "--set", "settings.video.maxrate=null",
                              "--set", "settings.video.bufsize=null"], "mpeg2video needs a bitrate")):
        result = farm("plan", "xdcam-hd422-mxf", source, *override)
        assert result.returncode == 2 and words in result.stderr, result.stderr
