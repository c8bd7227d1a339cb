"""The transcode processor's pure parts: cutting arithmetic, labels, rates, settings."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given, settings, strategies as st
from pydantic import ValidationError

from farm_transcode.ffmpeg_io import concat_list, timescale
from farm_transcode.planning import cut_points, frame_label, output_frame, ranges, timecode
from farm_transcode.settings import TranscodeSettings, parse_rate


@given(frames=st.integers(1, 20000), size=st.integers(1, 2000), gop=st.none() | st.integers(1, 300),
       keyframes=st.lists(st.integers(0, 20000), max_size=50))
@settings(max_examples=300, deadline=None)
def test_segments_tile_the_movie_exactly(frames, size, gop, keyframes):
    cuts = cut_points(frames, size, gop=gop, keyframes=sorted(set(keyframes)))
    pieces = ranges(cuts, frames)
    assert cuts[0] == 0 and all(count > 0 for _, count in pieces)
    assert sum(count for _, count in pieces) == frames
    assert all(a + n == b for (a, n), (b, _) in zip(pieces, pieces[1:]))
    if gop:
        assert all(cut % gop == 0 for cut in cuts)
    wanted = max(gop, round(size / gop) * gop) if gop else size
    if frames < 2 * wanted:
        assert cuts == [0]


def test_cuts_are_even_and_move_to_nearby_source_keyframes():
    assert cut_points(300, 100) == [0, 100, 200]
    assert cut_points(250, 100) == [0, 125]  # two even segments, not 100 + 150
    assert cut_points(199, 100) == [0]  # shorter than two segments: one
    assert cut_points(300, 100, keyframes=[0, 96, 185, 250]) == [0, 96, 200]  # 185 is too far from 200
    assert cut_points(300, 90, gop=60) == [0, 120]  # segments are whole GOPs


def test_labels_and_timecodes():
    assert timecode(3725.04) == "01:02:05.040"
    assert frame_label(0, 250, Fraction(25)) == "frames 1-250 (00:00:00.000-00:00:10.000)"
    assert frame_label(300, 300, Fraction(30000, 1001)) == "frames 301-600 (00:00:10.010-00:00:20.020)"


def test_rates_and_the_fps_filters_rounding():
    assert parse_rate("29.97") == Fraction(30000, 1001) and parse_rate(23.976) == Fraction(24000, 1001)
    assert parse_rate("25") == 25 and parse_rate("30000/1001") == Fraction(30000, 1001)
    # ffmpeg -vf fps=50 on 300 frames at 29.97 ends at 10.01 s: 500.5 frames rounds up to 501.
    assert output_frame(Fraction(1001, 100), Fraction(50)) == 501
    assert output_frame(Fraction(1001, 100), Fraction(24)) == 240
    assert timescale(Fraction(30000, 1001)) == 30000 and timescale(Fraction(25)) == 10000


def test_concat_list_quotes_any_path(tmp_path):
    text = concat_list([(tmp_path / "it's a file.mp4", Fraction(10)), (tmp_path / "b.mp4", None)])
    assert "file '" + str(tmp_path) + "/it'\\''s a file.mp4'\nduration 10.000000\n" in text
    assert text.startswith("ffconcat version 1.0\n")


@pytest.mark.parametrize("data, words", [
    ({"video": {"codec": "prores_ks", "crf": 20}}, "no constant-quality mode"),
    ({"video": {"codec": "libx264", "crf": 20, "bitrate": "2M"}}, "crf or bitrate, not both"),
    ({"video": {"codec": "libx264", "maxrate": "2M"}}, "maxrate and bufsize go together"),
    ({"video": {"codec": "libx264", "params": {"keyint": "1;rm -rf /"}}}, "not a plain key=value"),
    ({"video": {"codec": "prores_ks", "params": {"a": 1}}}, "takes no params"),
    ({"video": {"codec": "libx264", "tune": "-y"}}, "plain name"),
    ({"video": {"codec": "libx264", "fps": "fast"}}, "frame rate"),
    ({"video": {"codec": "libx264", "gop": "2 seconds"}}, "frames (48) or seconds (2s)"),
    ({"video": None, "audio": None}, "nothing to make"),
    ({"container": "m4a"}, "cannot hold libx264 video"),
    ({"container": "mov", "audio": {"codec": "libopus"}}, "cannot hold libopus audio"),
    ({"audio": {"codec": "copy", "bitrate": "128k"}}, "remove bitrate"),
])
def test_settings_that_cannot_work_are_refused(data, words):
    with pytest.raises(ValidationError) as failure:
        TranscodeSettings.model_validate(data)
    assert words in str(failure.value)


def test_gop_in_seconds_follows_the_rate():
    video = TranscodeSettings.model_validate({"video": {"codec": "libx264", "gop": "2s"}}).video
    assert video.gop_frames(Fraction(30000, 1001)) == 60 and video.gop_frames(Fraction(25)) == 50


def test_a_source_probed_ahead_is_planned_as_it_is_when_planned(tmp_path):
    """`farm run` probes while its cluster starts; a source replaced meanwhile is probed
    again, and facts kept ahead serve one plan only."""
    import os
    import subprocess

    from farm_transcode import sources

    def movie(seconds: int) -> None:
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i",
                        f"testsrc2=size=160x120:rate=25:duration={seconds}", "-c:v", "libx264", "-preset",
                        "ultrafast", str(tmp_path / "clip.mp4")], check=True)

    clip = tmp_path / "clip.mp4"
    movie(1)
    ahead = sources.probe(clip, None, ahead=True)
    assert sources.probe(clip, None) is ahead  # the plan takes what was probed ahead
    assert sources.probe(clip, None) is not ahead  # once
    sources.probe(clip, None, ahead=True)
    movie(2)  # replaced before it was planned
    os.utime(clip, ns=(1, 1))  # whatever the clock's grain, the stamp differs
    assert sources.probe(clip, None).video.frames == 50
