"""An encoded file read once by ffprobe (farm_transcode.probe.probe_output)."""

from __future__ import annotations

import subprocess

from farm_transcode.probe import probe_output


def _run(argv, **kwargs):
    return subprocess.run(argv, check=True)


def test_one_read_counts_packets_and_keeps_tags_that_hold_the_separator(tmp_path):
    movie = tmp_path / "tagged.mkv"
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y",
                    "-f", "lavfi", "-i", "testsrc2=size=160x120:rate=25:duration=2",
                    "-f", "lavfi", "-i", "sine=duration=2", "-c:v", "libx264", "-c:a", "libopus",
                    "-metadata", "title=a|b\\c", "-metadata:s:v:0", "comment=x|y=z\nnext line", str(movie)],
                   check=True)
    found = probe_output(movie, _run, tmp_path, span=True)
    video, audio = found.of_type("video")[0], found.of_type("audio")[0]
    assert found.frames(video) == 50
    assert abs(found.duration(video) - 2.0) < 0.001  # from the DURATION tag and the packets
    assert abs(found.video_span - 49 / 25) < 0.001
    assert video["tags"]["COMMENT"] == "x|y=z\nnext line"
    assert found.format["tags"]["title"] == "a|b\\c"
    assert audio["codec_name"] == "opus" and found.frames(audio) > 0
    assert list(tmp_path.iterdir()) == [movie]  # ffprobe's report is not left behind
