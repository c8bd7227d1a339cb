"""Cutting sources of every container ffmpeg reads, and keeping sound where the source has it.

Sources are made by ffmpeg lavfi in each test, with the starts cameras and broadcasters
give them: MPEG-TS/M2TS at 1.4 s, Matroska with a start offset, MP4 with an edit list.
Every segmented output is compared frame by frame with its source: the same number of
frames, and every frame close to the source's frame at the same place (a dropped or
doubled frame costs about 20 dB from there on).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from conftest import write_profile
from test_transcode import psnr

pytestmark = pytest.mark.skipif(
    subprocess.run(["which", "ffmpeg"], capture_output=True).returncode != 0, reason="ffmpeg is not installed"
)

X264 = {"codec": "libx264", "crf": 20, "preset": "veryfast", "pix_fmt": "yuv420p", "gop": 25}
FFMPEG = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-y"]


def make(path: Path, *args: str) -> Path:
    subprocess.run([*FFMPEG, *args, str(path)], check=True)
    return path


def lavfi_av(seconds: float, rate: str = "25", silence: float = 0.0) -> list[str]:
    """testsrc2 video and a 440 Hz tone that starts after ``silence`` seconds of silence."""
    tone = f"aevalsrc='if(gte(t,{silence}),0.5*sin(2*PI*440*t),0)':s=48000:d={seconds}"
    return ["-f", "lavfi", "-i", f"testsrc2=size=192x108:rate={rate}:duration={seconds}",
            "-f", "lavfi", "-i", tone]


def profile(folder: Path, *, video: dict | None = X264, audio: dict | None = None, container: str = "mp4",
            seconds: float = 1, **settings) -> Path:
    data = {"container": container, "video": video, "audio": audio or {"codec": "aac"}, **settings}
    return write_profile(folder, "t", {"processor": "transcode", "segment": {"seconds": seconds}, "settings": data,
                                       "output": "{stem}-{profile}.{ext}", "retries": 0})


def run(farm, *args) -> dict:
    result = farm("run", *args, "--json", "--quiet")
    assert result.stdout, result.stderr
    report = result.json()
    assert result.returncode == 0, report["jobs"][0].get("error")
    return report


def probe(path: Path) -> dict:
    out = subprocess.run(["ffprobe", "-v", "error", "-count_packets", "-show_streams", "-show_format", "-of", "json",
                          str(path)], capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def frames(path: Path) -> int:
    return int(next(s for s in probe(path)["streams"] if s["codec_type"] == "video")["nb_read_packets"])


def onset(path: Path) -> float:
    """When the sound starts against the first picture, in seconds, as a player shows it:
    decoded with the file's own timestamps, the first end of silence less the first
    video frame's time."""
    said = subprocess.run(["ffmpeg", "-hide_banner", "-copyts", "-i", str(path), "-map", "0:a:0", "-map", "0:v:0",
                           "-af", "silencedetect=n=-40dB:d=0.05", "-vf", "showinfo", "-frames:v", "1",
                           "-f", "null", "-"], capture_output=True, text=True).stderr
    ends = re.findall(r"silence_end: (-?[\d.]+)", said)
    first = re.search(r"n:\s*0 pts:\s*-?\d+\s+pts_time:(-?[\d.]+)", said)
    assert ends and first, said[-2000:]
    return float(ends[0]) - float(first.group(1))


def assert_frame_exact(out: Path, source: Path, rate: str, count: int) -> None:
    assert frames(out) == count
    values = psnr(out, source, rate)
    assert len(values) == count
    assert min(values) > 32, f"frame {values.index(min(values))} is {min(values):.1f} dB from the source's"


# -- item 1: cutting works on every container -------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name, muxer", [("cam.ts", []), ("disc.m2ts", ["-mpegts_m2ts_mode", "1"]),
                                         ("clip.mts", ["-f", "mpegts", "-mpegts_m2ts_mode", "1"])])
def test_mpeg_ts_with_its_usual_start_is_cut_frame_exact(farm, farm_env, name, muxer):
    """A .ts starts at 1.4 s; its demuxer seeks to the first keyframe after a point, not
    before. B-frames make decoding time run ahead of presentation time."""
    tmp = farm_env["tmp"]
    source = make(tmp / name, *lavfi_av(6), "-c:v", "libx264", "-preset", "veryfast", "-g", "12",
                  "-pix_fmt", "yuv420p", "-c:a", "aac", *muxer)
    assert float(probe(source)["format"]["start_time"]) > 1.3
    report = run(farm, profile(tmp), source, "-o", tmp / "out")
    assert report["jobs"][0]["segments"] == 7  # audio + 6 video
    out = tmp / "out" / f"{source.stem}-t.mp4"
    assert_frame_exact(out, source, "25", 150)


@pytest.mark.slow
def test_mpeg_ts_whose_timestamps_wrap_midway(farm, farm_env):
    """33-bit timestamps wrap 2.7 s in (a recorder running for 26.5 hours): cut frame-exact,
    the audio as long as it is (the header's length is a guess that the wrap spoils)."""
    tmp = farm_env["tmp"]
    source = make(tmp / "wrap.ts", *lavfi_av(6), "-c:v", "libx264", "-preset", "veryfast", "-g", "12",
                  "-pix_fmt", "yuv420p", "-c:a", "aac", "-output_ts_offset", "95441")
    run(farm, profile(tmp), source, "-o", tmp / "out")
    out = tmp / "out" / "wrap-t.mp4"
    assert_frame_exact(out, source, "25", 150)
    audio = next(s for s in probe(out)["streams"] if s["codec_type"] == "audio")
    assert abs(float(audio["duration"]) - 6.0) < 0.05


@pytest.mark.slow
def test_matroska_with_a_start_offset(farm, farm_env):
    """Start 9.98 s: its audio lasts 6 s, whatever the DURATION tag (the track's end) says."""
    tmp = farm_env["tmp"]
    source = make(tmp / "late.mkv", *lavfi_av(6), "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p",
                  "-c:a", "aac", "-output_ts_offset", "10")
    assert float(probe(source)["format"]["start_time"]) > 9.9
    for container in ("mp4", "mkv"):
        run(farm, profile(tmp, container=container), source, "-o", tmp / container)
        out = tmp / container / f"late-t.{container}"
        assert_frame_exact(out, source, "25", 150)
        audio = next(s for s in probe(out)["streams"] if s["codec_type"] == "audio")
        assert audio["codec_name"] == "aac"


@pytest.mark.slow
def test_mp4_with_an_edit_list_that_starts_between_keyframes(farm, farm_env):
    """Stream copy from 1.3 s: the file holds the frames from the keyframe before and an
    edit list that hides them; the output has exactly the frames shown."""
    tmp = farm_env["tmp"]
    whole = make(tmp / "whole.mp4", *lavfi_av(7), "-c:v", "libx264", "-preset", "veryfast", "-g", "50",
                 "-pix_fmt", "yuv420p", "-c:a", "aac")
    source = make(tmp / "edit.mp4", "-ss", "1.3", "-i", str(whole), "-c", "copy")
    shown = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v", "-count_frames", "-show_entries",
                            "stream=nb_read_frames", "-of", "csv=p=0", str(source)],
                           capture_output=True, text=True, check=True).stdout.strip()
    report = run(farm, profile(tmp), source, "-o", tmp / "out")
    assert report["jobs"][0]["segments"] >= 6
    assert_frame_exact(tmp / "out" / "edit-t.mp4", source, "25", int(shown))


# -- vfr: convert ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_variable_rate_converted_to_its_average_rate_when_the_profile_names_none(farm, farm_env):
    """3 s at 30 fps then 3 s at 15 fps: 135 frames in 6 s, an average of 22.5 fps (not
    23.976, the common rate nearest to it)."""
    tmp = farm_env["tmp"]
    source = make(tmp / "phone.mkv", "-f", "lavfi", "-i", "testsrc2=size=192x108:rate=30:duration=3",
                  "-f", "lavfi", "-i", "testsrc2=size=192x108:rate=15:duration=3",
                  "-filter_complex", "[0][1]concat=n=2:v=1[v]", "-map", "[v]", "-c:v", "libx264",
                  "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-fps_mode", "vfr")
    path = profile(tmp, audio={"codec": "aac"}, vfr="convert")
    plan = farm("plan", path, source)
    assert "variable frame rate converted to 22.500 fps" in plan.stdout, plan.stdout
    run(farm, path, source, "-o", tmp / "out")
    video = next(s for s in probe(tmp / "out" / "phone-t.mp4")["streams"] if s["codec_type"] == "video")
    single = subprocess.run(["ffmpeg", "-hide_banner", "-i", str(source), "-vf", "fps=45/2", "-f", "null", "-"],
                            capture_output=True, text=True).stderr
    assert video["r_frame_rate"] == "45/2"
    assert int(video["nb_read_packets"]) == int(single.rsplit("frame=", 1)[1].split()[0])


# -- item 2: the sound plays where it played against the picture ------------------------------------


def sound_at(path: Path) -> float:
    """When the loudest sample of the first audio track plays, against the first picture,
    decoded as a player does (the file's own timestamps, edit lists and skips)."""
    proc = subprocess.run(["ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "info", "-copyts", "-i", str(path),
                           "-map", "0:a:0", "-af", "aresample=48000,ashowinfo", "-ac", "1", "-f", "s16le", "pipe:1",
                           "-map", "0:v:0", "-vf", "showinfo", "-frames:v", "1", "-f", "null", "-"],
                          capture_output=True, check=True)
    said = proc.stderr.decode(errors="replace")
    first = r"n:\s*0\s+pts:\s*-?\d+\s+pts_time:(-?[\d.]+)"
    audio = float(re.search(r"ashowinfo.*?" + first, said).group(1))
    video = float(re.search(r"Parsed_showinfo.*?" + first, said).group(1))
    samples = memoryview(proc.stdout[: len(proc.stdout) // 2 * 2]).cast("h")
    loudest = max(range(len(samples)), key=lambda i: abs(samples[i]))
    return audio + loudest / 48000 - video


def click_source(path: Path, audio_delay: float, acodec: list[str]) -> Path:
    """6 s of picture; sound from ``audio_delay`` s: silence, a 2 ms click peaking at 0.301 s
    (one raised-cosine bump: a single loudest sample), then a tone."""
    sound = ("aevalsrc='if(between(t,0.3,0.302),0.45*(1-cos(2*PI*(t-0.3)/0.002)),0)"
             "+if(gte(t,0.6),0.2*sin(2*PI*440*t),0)':s=48000:d=5")
    return make(path, "-f", "lavfi", "-i", "testsrc2=size=192x108:rate=25:duration=6",
                "-itsoffset", f"{audio_delay}", "-f", "lavfi", "-i", sound,
                "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", *acodec)


@pytest.mark.parametrize("codec, container", [("aac", "mp4"), ("libopus", "mkv"), ("libmp3lame", "mp4"),
                                              ("ac3", "mkv"), ("pcm_s16le", "mov"), ("flac", "mkv")])
@pytest.mark.slow
def test_sound_plays_against_the_picture_where_it_did_in_the_source(farm, farm_env, codec, container):
    """Audio that starts 0.699 s after the picture: the click is where it was within 1 ms,
    whatever the encoder's priming (AAC 1024 samples, Opus pre-skip, LAME's delay)."""
    tmp = farm_env["tmp"]
    source = click_source(tmp / "late.mov", 0.699, ["-c:a", "pcm_s16le"])
    assert abs(sound_at(source) - 1.000) < 0.0005
    run(farm, profile(tmp, audio={"codec": codec}, container=container), source, "-o", tmp / "out")
    out = tmp / "out" / f"late-t.{container}"
    assert abs(sound_at(out) - sound_at(source)) <= 0.001


@pytest.mark.slow
def test_audio_that_starts_with_the_picture_in_a_ts_stays_there(farm, farm_env):
    tmp = farm_env["tmp"]
    source = click_source(tmp / "cam.ts", 0, ["-c:a", "aac", "-f", "mpegts"])
    for codec, container in (("aac", "mp4"), ("libopus", "mkv")):
        run(farm, profile(tmp, audio={"codec": codec}, container=container), source, "-o", tmp / container)
        assert abs(sound_at(tmp / container / f"cam-t.{container}") - sound_at(source)) <= 0.001


@pytest.mark.slow
def test_vp9_webm_of_a_source_whose_audio_starts_late(farm, farm_env):
    """Was: "audio track 1 lasts +218 ms against the video, the source's -279 ms"."""
    tmp = farm_env["tmp"]
    source = click_source(tmp / "late.mkv", 0.699, ["-c:a", "aac"])
    run(farm, "vp9-webm", source, "-o", tmp / "out", "--set", "segment.seconds=2",
        "--set", "settings.video.speed=8")
    out = tmp / "out" / "late-vp9.webm"
    assert frames(out) == 150
    assert abs(sound_at(out) - sound_at(source)) <= 0.001


# -- bad input: converted exactly, in fewer segments, with the reason in the plan -----------------------


@pytest.mark.slow
def test_ts_recordings_joined_end_to_end_are_read_straight_through(farm, farm_env):
    """Two .ts files joined with cat: timestamps start again halfway, so no cut can be
    placed by time. The plan says so, and the output holds every frame of both."""
    tmp = farm_env["tmp"]
    part = make(tmp / "part.ts", *lavfi_av(3), "-c:v", "libx264", "-preset", "veryfast", "-g", "12",
                "-pix_fmt", "yuv420p", "-c:a", "aac")
    joined = tmp / "joined.ts"
    joined.write_bytes(part.read_bytes() * 2)
    path = profile(tmp)
    plan = farm("plan", path, joined)
    assert plan.returncode == 0, plan.stderr
    assert ("frames 1-150 (00:00:00.000-00:00:06.000, one segment, read straight through: its timestamps "
            "start again at frame 76 (a joined or looped recording))") in plan.stdout
    run(farm, path, joined, "-o", tmp / "out")
    out = tmp / "out" / "joined-t.mp4"
    assert frames(out) == 150
    audio = next(s for s in probe(out)["streams"] if s["codec_type"] == "audio")
    assert abs(float(audio["duration"]) - 6.0) < 0.1
    halves = psnr(out, joined, "25")  # the joined source read as one ffmpeg reads it
    assert len(halves) == 150 and min(halves) > 32
