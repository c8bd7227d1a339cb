"""Sources Farm cannot convert are refused when the job is planned, each with what in the
source is wrong (never the output), where, and what was expected: not a segment failing
three times later. Broken files are made from lavfi movies by cutting or patching bytes."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from test_transcode import movie, profile, run_json

pytestmark = pytest.mark.skipif(
    subprocess.run(["which", "ffmpeg"], capture_output=True).returncode != 0, reason="ffmpeg is not installed"
)


def patched(source: Path, out: Path, *swaps: tuple[bytes, bytes]) -> Path:
    """``source`` with each box name swapped, the first after the sample descriptions
    (``stsd``) and after the previous swap: a codec this ffmpeg does not know."""
    data = bytearray(source.read_bytes())
    at = data.find(b"stsd")
    for old, new in swaps:
        at = data.find(old, at)
        assert at > 0, old
        data[at:at + len(old)] = new
    out.write_bytes(bytes(data))
    return out


def refused(farm, *args) -> str:
    result = farm("plan", *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    return result.stderr


@pytest.fixture
def whole(farm_env) -> Path:
    return movie(farm_env["tmp"] / "whole.mp4", seconds=2, size="192x108")


@pytest.mark.slow
def test_an_unfinished_mp4_is_refused_as_cut_short(farm, farm_env, whole):
    tmp = farm_env["tmp"]
    cut = tmp / "cut.mp4"  # the index (moov) comes last, and is gone
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    path = profile(tmp)
    assert ("cut.mp4 has no index (its moov atom): the recording was cut short or never finished (an mp4 or mov "
            "writes its index last); expected a complete file, or one written with +faststart") in refused(farm, path, cut)
    code, report = run_json(farm, path, cut, "-o", tmp / "out")
    job = report["jobs"][0]
    assert code == 1 and job["state"] == "failed" and "has no index (its moov atom)" in job["error"]
    assert "attempt" not in job["error"]  # refused while planning, before any segment ran


def test_a_source_damaged_midway_is_refused_with_the_demuxers_words(farm, farm_env):
    tmp = farm_env["tmp"]
    source = movie(tmp / "fs.mp4", seconds=3, size="192x108", audio=0, extra=["-movflags", "+faststart"])
    data = bytearray(source.read_bytes())
    start, length = len(data) * 55 // 100, len(data) * 15 // 100
    data[start:start + length] = bytes(length)  # a stretch of the frames zeroed, the index intact
    damaged = tmp / "damaged.mp4"
    damaged.write_bytes(bytes(data))
    said = refused(farm, profile(tmp, audio=False), damaged)
    assert "damaged.mp4 cannot be read to the end; it may be truncated or damaged: " in said
    assert "Invalid NAL unit size" in said


def test_a_video_codec_ffmpeg_does_not_know_is_refused(farm, farm_env, whole):
    tmp = farm_env["tmp"]
    alien = patched(whole, tmp / "alien.mp4", (b"avc1", b"zzzz"))
    assert ("alien.mp4: its video (stream 0, codec tag 'zzzz') is in a codec this ffmpeg does not know, so it "
            "cannot be decoded; expected a codec that `ffmpeg -decoders` lists") in refused(farm, profile(tmp), alien)


def test_an_audio_codec_ffmpeg_does_not_know_is_refused_unless_left_out(farm, farm_env, whole):
    tmp = farm_env["tmp"]
    alien = patched(whole, tmp / "mute.mp4", (b"mp4a", b"zzzz"), (b"esds", b"zzzz"))
    assert ("mute.mp4: its audio track 0 (counting from 0; stream 1) is in a codec this ffmpeg does not know, so "
            "it cannot be encoded; keep the other tracks (audio.tracks) or copy it (audio.codec: copy)") in \
        refused(farm, profile(tmp), alien)
    assert farm("plan", profile(tmp, "v", audio=False), alien).returncode == 0  # video only: nothing to decode there


def test_a_source_without_video_is_refused_for_a_video_profile(farm, farm_env):
    tmp = farm_env["tmp"]
    song = movie(tmp / "song.m4a", seconds=1, audio=1, video=False)
    assert ("song.m4a has no video stream, and profile 't' makes video; use an audio-only profile for it") in \
        refused(farm, profile(tmp), song)
