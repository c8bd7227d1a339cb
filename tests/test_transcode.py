"""The transcode processor, end to end: real ffmpeg, media made with lavfi in each test.

Every output is checked with ffprobe (frames, durations, streams, codecs, sizes) and,
where it is cheap, per-frame PSNR against the source compared with a single-process
encode of the same settings (``segmented: false``), so a dropped or doubled frame at a
join shows.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest

from conftest import write_profile

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    subprocess.run(["which", "ffmpeg"], capture_output=True).returncode != 0, reason="ffmpeg is not installed"
)

X264 = {"codec": "libx264", "crf": 20, "preset": "veryfast", "pix_fmt": "yuv420p", "gop": 25}


# -- helpers ---------------------------------------------------------------------------------


def movie(path: Path, *, seconds: float = 4, size: str = "320x240", rate: str = "25", audio: int = 1,
          vcodec: list[str] | None = None, extra: list[str] | None = None, video: bool = True,
          inputs: list[str] | None = None) -> Path:
    """A test movie: testsrc2 video and ``audio`` sine tracks (different pitches), made by ffmpeg."""
    cmd = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-y"]
    if video:
        cmd += ["-f", "lavfi", "-i", f"testsrc2=size={size}:rate={rate}:duration={seconds}"]
    for track in range(audio):
        cmd += ["-f", "lavfi", "-i", f"sine=frequency={440 + 220 * track}:sample_rate=48000:duration={seconds}"]
    cmd += inputs or []
    for index in range(int(video) + audio):
        cmd += ["-map", str(index)]
    if video:
        cmd += vcodec or ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"]
    if audio:
        cmd += ["-c:a", "aac"]
    cmd += [*(extra or []), str(path)]
    subprocess.run(cmd, check=True)
    return path


def probe(path: Path) -> dict:
    out = subprocess.run(["ffprobe", "-v", "error", "-count_packets", "-show_streams", "-show_format", "-of", "json",
                          str(path)], capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def streams(path: Path, kind: str) -> list[dict]:
    return [s for s in probe(path)["streams"] if s["codec_type"] == kind]


def duration(stream: dict) -> float:
    if "duration" in stream:
        return float(stream["duration"])
    hours, minutes, seconds = stream["tags"]["DURATION"].split(":")
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def psnr(path: Path, reference: Path, rate: str | None = None) -> list[float]:
    """Per-frame PSNR (dB) of ``path`` against ``reference``, frame by frame. With ``rate``,
    both are first counted from their first frame and put on that rate's grid (psnr pairs
    frames by timestamp, and Matroska's millisecond ones pair a frame with its neighbour)."""
    stats = path.parent / f"{path.stem}.psnr.txt"
    grid = f"setpts=PTS-STARTPTS,fps={rate}" if rate else "null"
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-i", path.name, "-i", str(reference),
                    "-lavfi", f"[0:v]{grid}[a];[1:v]{grid}[b];[a][b]psnr=stats_file={stats.name}", "-f", "null", "-"],
                   check=True, cwd=path.parent)
    values = []
    for line in stats.read_text().splitlines():
        field = next(part for part in line.split() if part.startswith("psnr_avg:"))
        values.append(math.inf if field.endswith("inf") else float(field.split(":")[1]))
    return values


def profile(folder: Path, name: str = "t", *, video: dict | None = X264, audio: dict | None = None,
            seconds: float = 1, container: str = "mp4", **settings) -> Path:
    data = {"container": container, "video": video, "audio": audio if audio is not None else {"codec": "aac"},
            **settings}
    if audio is False:
        data["audio"] = None
    return write_profile(folder, name, {"processor": "transcode", "segment": {"seconds": seconds},
                                         "settings": data, "output": "{stem}-{profile}.{ext}", "retries": 0})


def run_json(farm, *args) -> tuple[int, dict]:
    """Exit status and the JSON report; callers show a report with ``json.dumps`` (pytest
    cuts a long dict short, and the job's error comes last)."""
    result = farm("run", *args, "--json", "--quiet")
    assert result.stdout, result.stderr
    return result.returncode, result.json()


# -- settings are refused when the profile is loaded --------------------------------------------


@pytest.mark.parametrize("settings, key, words", [
    ({"video": {**X264, "crf": 99}}, "settings.video.crf", "outside libx264's range 0-51"),
    ({"video": {**X264, "preset": "warp"}}, "settings.video.preset", "unknown preset 'warp'"),
    ({"video": {**X264, "codec": "h264_magic"}}, "settings.video.codec", "unknown video encoder"),
    ({"video": {**X264, "bitrate": "fast"}}, "settings.video.bitrate", "expected a bitrate"),
    ({"video": {**X264, "colour": "red"}}, "settings.video.colour", "unknown key"),
    ({"container": "webm", "audio": {"codec": "libopus"}}, "settings", "cannot hold libx264 video"),
    ({"video": {"codec": "libx264", "bitrate": "2M", "passes": 2}}, "settings", "cannot be segmented"),
    ({"audio": {"codec": "aac", "tracks": [0, 0]}}, "settings.audio.tracks", "distinct"),
])
def test_bad_settings_are_refused_at_load_with_file_line_and_key(farm, farm_env, settings, key, words):
    source = movie(farm_env["tmp"] / "in.mp4", seconds=1)
    data = {"container": "mp4", "video": X264, "audio": {"codec": "aac"}, **settings}
    path = write_profile(farm_env["tmp"], "bad", {"processor": "transcode", "settings": data})
    result = farm("run", path, source, "-o", farm_env["tmp"] / "out")
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip()
    assert line.startswith(f"farm: error: {path}:"), line
    assert f": {key}: " in line and words in line, line
    assert "Traceback" not in result.stderr


def test_shipped_profiles_are_valid(farm):
    shipped = sorted(str(p) for p in (ROOT / "profiles").glob("*.yaml"))
    result = farm("profiles", "validate", *shipped)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("h264-web-1080p", "h264-web-720p", "hevc", "prores-proxy", "vp9-webm", "av1-svt", "aac-audio",
                 "h264-2pass"):
        assert f"profile {name}, processor transcode" in result.stdout


# -- plan -----------------------------------------------------------------------------------------


def test_plan_shows_each_segments_frames_and_times(farm, farm_env):
    source = movie(farm_env["tmp"] / "clip.mp4", seconds=10)
    path = profile(farm_env["tmp"], seconds=2)
    result = farm("plan", path, source)
    assert result.returncode == 0, result.stderr
    lines = [line.strip() for line in result.stdout.splitlines()]
    assert "0  audio: 1 track (00:00:00.000-00:00:10.000)" in lines
    assert "1  frames 1-50 (00:00:00.000-00:00:02.000)" in lines
    assert "5  frames 201-250 (00:00:08.000-00:00:10.000)" in lines
    assert f"{source}: 6 segment(s)" in result.stdout
    plan = farm("plan", path, source, "--json").json()
    video = [s["params"] for s in plan["jobs"][0]["segments"] if s["params"]["kind"] == "video"]
    assert [(v["first"], v["count"]) for v in video] == [(0, 50), (50, 50), (100, 50), (150, 50), (200, 50)]
    assert video[1]["start_pts"] == 50 * 512 and video[1]["end_pts"] == 100 * 512  # mp4 at 25 fps: 1/12800


@pytest.mark.slow
def test_short_sources_and_unsegmented_profiles_are_one_segment(farm, farm_env):
    source = movie(farm_env["tmp"] / "short.mp4", seconds=3)
    path = profile(farm_env["tmp"], seconds=2)  # 3 s is less than two segments of 2 s
    assert farm("plan", path, source).stdout.count("frames ") == 1
    long = movie(farm_env["tmp"] / "long.mp4", seconds=6)
    assert farm("plan", path, long).stdout.count("frames ") == 3
    assert farm("plan", path, long, "--set", "settings.segmented=false").stdout.count("frames ") == 1
    two_pass = farm("plan", "h264-2pass", long)
    assert two_pass.returncode == 0, two_pass.stderr
    assert "2 segment(s)" in two_pass.stdout and "frames 1-150" in two_pass.stdout


@pytest.mark.slow
def test_a_one_segment_job_is_exact_in_frames_duration_and_sound(farm, farm_env):
    """A one-frame movie and a one-second one with a beep, each one video segment: the output
    holds every frame, lasts what the source lasts, and its beep plays where the source's did
    against the picture (measured to 0.125 ms, as a player decodes both)."""
    from farm_transcode import sync

    tmp = farm_env["tmp"]
    beep = "aevalsrc=if(between(t\\,0.3\\,0.5)\\,sin(2*PI*440*t)\\,0):s=48000:d={d}"
    cases = {"one-frame": 0.04, "one-second": 1.0}
    for name, seconds in cases.items():
        source = tmp / f"{name}.mp4"
        subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", f"testsrc2=size=320x240:rate=25:duration={seconds}",
                        "-f", "lavfi", "-i", beep.format(d=seconds), "-c:v", "libx264", "-preset", "ultrafast",
                        "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", str(source)], check=True)
        status, report = run_json(farm, profile(tmp, seconds=10), source, "-o", tmp / "out")
        assert status == 0, json.dumps(report)
        job = report["jobs"][0]
        assert job["segments"] == 2, json.dumps(report)  # its sound and its one video segment
        out = Path(job["outputs"][0])
        video, = streams(out, "video")
        source_video, = streams(source, "video")
        assert int(video["nb_read_packets"]) == int(source_video["nb_read_packets"]) == round(seconds * 25)
        assert abs(duration(video) - duration(source_video)) < 0.001, (duration(video), duration(source_video))
        sound, = streams(out, "audio")
        assert abs(duration(sound) - duration(streams(source, "audio")[0])) < 0.03
        if seconds >= 1:  # a beep to measure by
            def run(argv, on_line=None, check=False):
                proc = subprocess.run(argv, capture_output=True, text=True)
                for line in proc.stderr.splitlines():
                    on_line(line)
                return type("Result", (), {"exit_status": proc.returncode})()

            lag = sync.lag(source, None, 1, out, 0, run, tmp)
            assert lag is not None and abs(lag) <= 1 / sync.RATE, lag


# -- runs: frame-exact joins --------------------------------------------------------------------


@pytest.mark.slow
def test_segmented_encode_is_frame_exact_and_as_good_as_one_process(farm, farm_env):
    """No frame of the joined output is more than 1 dB below a single-process encode with
    the same settings (x264's macroblock-tree off: with it on, see the next test)."""
    tmp = farm_env["tmp"]
    source = movie(tmp / "src.mp4", seconds=8, audio=1)
    video = {**X264, "params": {"mbtree": 0}}
    path = profile(tmp, video=video, seconds=2)
    code, report = run_json(farm, path, source, "-o", tmp / "seg")
    assert code == 0, json.dumps(report)
    assert report["jobs"][0]["segments"] == 5  # audio + 4 video
    code, single = run_json(farm, path, source, "-o", tmp / "one", "--set", "settings.segmented=false")
    assert code == 0 and single["jobs"][0]["segments"] == 2
    joined, reference = tmp / "seg" / "src-t.mp4", tmp / "one" / "src-t.mp4"
    v, = streams(joined, "video")
    a, = streams(joined, "audio")
    assert int(v["nb_read_packets"]) == 200 and v["codec_name"] == "h264"
    assert abs(duration(v) - 8.0) < 0.04 and abs(duration(a) - 8.0) < 0.05
    assert abs(float(a["start_time"]) - float(v["start_time"])) < 0.04  # A/V offset under one frame
    ours, theirs = psnr(joined, source), psnr(reference, source)
    assert len(ours) == len(theirs) == 200
    worst = max(t - o for o, t in zip(ours, theirs))
    assert worst <= 1.0, f"a frame is {worst:.2f} dB below the single-process encode"


@pytest.mark.slow
def test_default_x264_joins_show_only_encoder_noise(farm, farm_env):
    """With x264's defaults, the frames next to a join differ from a single encode by the
    rate control's choices (measured up to ~2.7 dB); a dropped or doubled frame costs far
    more (~20 dB on every later frame), and that is what this test would catch."""
    tmp = farm_env["tmp"]
    source = movie(tmp / "src.mp4", seconds=6, rate="30000/1001", audio=0)
    path = profile(tmp, seconds=2, audio=False)
    assert run_json(farm, path, source, "-o", tmp / "seg")[0] == 0
    assert run_json(farm, path, source, "-o", tmp / "one", "--set", "settings.segmented=false")[0] == 0
    ours, theirs = psnr(tmp / "seg" / "src-t.mp4", source), psnr(tmp / "one" / "src-t.mp4", source)
    assert len(ours) == len(theirs) == 180
    assert max(t - o for o, t in zip(ours, theirs)) < 4.0
    assert sum(ours) / len(ours) > sum(theirs) / len(theirs) - 0.3
    assert min(ours) > 35


@pytest.mark.slow
def test_odd_size_2997_source_comes_out_even_and_whole(farm, farm_env):
    tmp = farm_env["tmp"]
    source = movie(tmp / "odd.mp4", seconds=5, size="853x481", rate="30000/1001",
                   vcodec=["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv444p"])
    code, report = run_json(farm, profile(tmp, seconds=1), source, "-o", tmp / "out")
    assert code == 0, json.dumps(report)
    v, = streams(tmp / "out" / "odd-t.mp4", "video")
    assert (v["width"], v["height"]) == (852, 480)
    assert int(v["nb_read_packets"]) == 150 and v["r_frame_rate"] == "30000/1001"
    assert abs(duration(v) - 150 * 1001 / 30000) < 1001 / 30000


@pytest.mark.slow
def test_23976_mov_to_shipped_prores_proxy_with_pcm(farm, farm_env):
    tmp = farm_env["tmp"]
    source = movie(tmp / "film.mov", seconds=5, rate="24000/1001")
    code, report = run_json(farm, "prores-proxy", source, "-o", tmp / "out", "--set", "segment.seconds=1")
    assert code == 0, json.dumps(report)
    assert report["jobs"][0]["segments"] == 6
    out = tmp / "out" / "film-proxy.mov"
    v, = streams(out, "video")
    a, = streams(out, "audio")
    assert v["codec_name"] == "prores" and v["profile"] == "Proxy" and a["codec_name"] == "pcm_s16le"
    assert int(v["nb_read_packets"]) == 120 and v["r_frame_rate"] == "24000/1001"
    assert min(psnr(out, source)) > 30  # all-intra: every frame, joins included, is close to the source


@pytest.mark.slow
@pytest.mark.parametrize("name, vcodec, acodec, ext", [
    ("h264-web-720p", "h264", "aac", "mp4"),
    ("hevc", "hevc", "aac", "mp4"),
    ("vp9-webm", "vp9", "opus", "webm"),
    ("av1-svt", "av1", "aac", "mp4"),
])
def test_shipped_profiles_make_what_they_promise(farm, farm_env, name, vcodec, acodec, ext):
    tmp = farm_env["tmp"]
    source = movie(tmp / "clip.mp4", seconds=3, size="256x144")
    code, report = run_json(farm, name, source, "-o", tmp / "out", "--set", "segment.seconds=1",
                            "--set", "settings.video.gop=25", "--set", "output={stem}.{ext}")
    assert code == 0, json.dumps(report)
    assert report["jobs"][0]["segments"] == 4
    out = tmp / "out" / f"clip.{ext}"
    v, = streams(out, "video")
    a, = streams(out, "audio")
    assert (v["codec_name"], a["codec_name"]) == (vcodec, acodec)
    if vcodec == "hevc":
        assert v["codec_tag_string"] == "hvc1"
    assert int(v["nb_read_packets"]) == 75
    assert abs(duration(v) - 3.0) <= 0.041 and abs(duration(a) - 3.0) <= 0.05


# -- audio, subtitles, metadata -------------------------------------------------------------------


@pytest.mark.slow
def test_mkv_with_two_audio_tracks_subtitles_and_metadata(farm, farm_env):
    tmp = farm_env["tmp"]
    (tmp / "subs.srt").write_text("1\n00:00:01,000 --> 00:00:02,000\nHello\n\n2\n00:00:03,000 --> 00:00:04,000\nWorld\n")
    source = movie(tmp / "two.mkv", seconds=5, audio=2, inputs=["-i", str(tmp / "subs.srt")], extra=[
        "-map", "3", "-c:s", "srt",
        "-metadata:s:a:0", "language=eng", "-metadata:s:a:1", "language=fra",
        "-metadata", "creation_time=2024-01-02T03:04:05Z", "-metadata", "title=Two tracks"])
    path = profile(tmp, seconds=1)
    code, report = run_json(farm, path, source, "-o", tmp / "all")
    assert code == 0, json.dumps(report)
    out = tmp / "all" / "two-t.mp4"
    info = probe(out)
    audio = [s for s in info["streams"] if s["codec_type"] == "audio"]
    assert [s["tags"]["language"] for s in audio] == ["eng", "fra"]
    assert all(abs(duration(s) - 5.0) < 0.05 for s in audio)
    subs = [s for s in info["streams"] if s["codec_type"] == "subtitle"]
    assert [s["codec_name"] for s in subs] == ["mov_text"]
    assert info["format"]["tags"]["title"] == "Two tracks"
    assert info["format"]["tags"]["creation_time"].startswith("2024-01-02T03:04:05")
    # The profile can choose tracks: only the second one here.
    code, report = run_json(farm, path, source, "-o", tmp / "second", "--set", "settings.audio.tracks=[1]")
    assert code == 0, json.dumps(report)
    audio = streams(tmp / "second" / "two-t.mp4", "audio")
    assert [s["tags"]["language"] for s in audio] == ["fra"]
    # A track the source does not have is refused at planning, with the count.
    code, report = run_json(farm, path, source, "-o", tmp / "third", "--set", "settings.audio.tracks=[2]")
    assert code == 1 and "has 2 audio track(s)" in report["jobs"][0]["error"]


@pytest.mark.slow
def test_source_without_audio(farm, farm_env):
    tmp = farm_env["tmp"]
    source = movie(tmp / "silent.mp4", seconds=3, audio=0)
    code, report = run_json(farm, profile(tmp), source, "-o", tmp / "out")
    assert code == 0, json.dumps(report)
    info = probe(tmp / "out" / "silent-t.mp4")
    assert [s["codec_type"] for s in info["streams"]] == ["video"]
    assert int(info["streams"][0]["nb_read_packets"]) == 75


@pytest.mark.slow
def test_audio_only_profile_and_a_source_without_audio(farm, farm_env):
    tmp = farm_env["tmp"]
    source = movie(tmp / "song.mkv", seconds=3, audio=2)
    code, report = run_json(farm, "aac-audio", source, "-o", tmp / "out")
    assert code == 0, json.dumps(report)
    info = probe(tmp / "out" / "song.m4a")
    assert [s["codec_name"] for s in info["streams"]] == ["aac", "aac"]
    silent = movie(tmp / "silent.mp4", seconds=1, audio=0)
    code, report = run_json(farm, "aac-audio", silent, "-o", tmp / "out")
    assert code == 1 and "has no audio stream" in report["jobs"][0]["error"]


# -- variable frame rates -------------------------------------------------------------------------


def vfr_movie(path: Path) -> Path:
    """3 s at 25 fps, then 3 s at 10 fps: 105 frames with two different spacings."""
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y",
                    "-f", "lavfi", "-i", "testsrc2=size=320x240:rate=25:duration=3",
                    "-f", "lavfi", "-i", "testsrc2=size=320x240:rate=10:duration=3",
                    "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000:duration=6",
                    "-filter_complex", "[0][1]concat=n=2:v=1[v]", "-map", "[v]", "-map", "2",
                    "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac",
                    "-fps_mode", "vfr", str(path)], check=True)
    return path


@pytest.mark.slow
def test_variable_frame_rate_is_one_segment_with_its_timing_or_converted(farm, farm_env):
    tmp = farm_env["tmp"]
    source = vfr_movie(tmp / "phone.mkv")
    path = profile(tmp, seconds=1)
    plan = farm("plan", path, source)
    assert "1  frames 1-105 (00:00:00.000-00:00:06.000, variable frame rate: one segment, timing kept)" in plan.stdout
    code, report = run_json(farm, path, source, "-o", tmp / "kept")
    assert code == 0, json.dumps(report)
    out = tmp / "kept" / "phone-t.mp4"
    assert int(streams(out, "video")[0]["nb_read_packets"]) == 105
    times = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v", "-show_entries", "packet=pts_time",
                            "-of", "csv=p=0", str(out)], capture_output=True, text=True).stdout.split()
    times = sorted(float(t) for t in times)
    assert abs(times[76] - times[75] - 0.1) < 0.002 and abs(times[1] - times[0] - 0.04) < 0.002
    # Converted to a constant rate and segmented: as many frames as ffmpeg's fps filter makes.
    code, report = run_json(farm, path, source, "-o", tmp / "cfr", "--set", "settings.vfr=convert",
                            "--set", "settings.video.fps=25")
    assert code == 0, json.dumps(report)
    assert report["jobs"][0]["segments"] == 7
    v, = streams(tmp / "cfr" / "phone-t.mp4", "video")
    single = subprocess.run(["ffmpeg", "-hide_banner", "-i", str(source), "-vf", "fps=25", "-f", "null", "-"],
                            capture_output=True, text=True).stderr
    made = int(single.rsplit("frame=", 1)[1].split()[0])
    assert int(v["nb_read_packets"]) == made and v["r_frame_rate"] == "25/1"


@pytest.mark.slow
def test_frame_rate_change_matches_ffmpegs_fps_filter(farm, farm_env):
    tmp = farm_env["tmp"]
    source = movie(tmp / "ntsc.mp4", seconds=4, rate="30000/1001", audio=0)
    path = profile(tmp, video={**X264, "fps": 25, "params": {"mbtree": 0}}, seconds=1, audio=False)
    assert run_json(farm, path, source, "-o", tmp / "seg")[0] == 0
    assert run_json(farm, path, source, "-o", tmp / "one", "--set", "settings.segmented=false")[0] == 0
    seg, one = tmp / "seg" / "ntsc-t.mp4", tmp / "one" / "ntsc-t.mp4"
    assert streams(seg, "video")[0]["nb_read_packets"] == streams(one, "video")[0]["nb_read_packets"] == "100"
    assert min(psnr(seg, one)) > 38  # the same source frames picked for every output frame


# -- sources that must fail cleanly ----------------------------------------------------------------


@pytest.mark.slow
def test_bad_sources_fail_with_reasons_while_the_rest_of_the_batch_is_done(farm, farm_env):
    tmp = farm_env["tmp"]
    good = movie(tmp / "good.mp4", seconds=2)
    empty = tmp / "empty.mp4"
    empty.write_bytes(b"")
    text = tmp / "notes.mov"
    text.write_text("these are not the frames you are looking for\n" * 20)
    whole = movie(tmp / "whole.mp4", seconds=4)
    truncated = tmp / "truncated.mp4"  # moov at the end, cut off
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    faststart = movie(tmp / "fs.mp4", seconds=4, extra=["-movflags", "+faststart"])
    cut = tmp / "cut.mp4"  # index intact, half of the frames missing
    cut.write_bytes(faststart.read_bytes()[: faststart.stat().st_size // 2])
    playlist = tmp / "playlist.mp4"
    playlist.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:4\n#EXTINF:4,\n{good}\n#EXT-X-ENDLIST\n")
    concat = tmp / "list.mov"
    concat.write_text(f"ffconcat version 1.0\nfile '{good}'\n")
    song = movie(tmp / "song.m4a", seconds=1, audio=1, video=False)
    inputs = [good, empty, text, truncated, cut, playlist, concat, song]
    code, report = run_json(farm, profile(tmp), *inputs, "-o", tmp / "out")
    assert code == 1
    jobs = {Path(job["input"]).name: job for job in report["jobs"]}
    assert jobs["good.mp4"]["state"] == "done"
    reasons = {name: job["error"] for name, job in jobs.items() if name != "good.mp4"}
    assert all(jobs[name]["state"] == "failed" for name in reasons)
    assert "is empty (0 bytes)" in reasons["empty.mp4"]
    assert "ffprobe cannot read notes.mov as a movie" in reasons["notes.mov"]
    assert "truncated.mp4 has no index (its moov atom): the recording was cut short" in reasons["truncated.mp4"]
    assert "truncated or damaged" in reasons["cut.mp4"]
    assert "is a playlist" in reasons["playlist.mp4"] and "refused" in reasons["playlist.mp4"]
    assert "refused" in reasons["list.mov"]
    assert "has no video stream" in reasons["song.m4a"]
    assert sorted(p.name for p in (tmp / "out").iterdir()) == ["good-t.mp4"]


@pytest.mark.slow
def test_existing_output_is_kept_unless_overwrite_is_asked(farm, farm_env):
    tmp = farm_env["tmp"]
    source = movie(tmp / "clip.mp4", seconds=1)
    path = profile(tmp)
    target = tmp / "out" / "clip-t.mp4"
    target.parent.mkdir()
    target.write_bytes(b"precious")
    refused = farm("run", path, source, "-o", tmp / "out", "--json")  # before anything runs
    assert refused.returncode == 2 and not refused.stdout
    assert f"{target} already exists in the destination; pass --overwrite" in refused.stderr
    assert target.read_bytes() == b"precious"
    code, report = run_json(farm, path, source, "-o", tmp / "out", "--overwrite")
    assert code == 0, json.dumps(report)
    assert int(streams(target, "video")[0]["nb_read_packets"]) == 25
    assert sorted(p.name for p in target.parent.iterdir()) == ["clip-t.mp4"]  # no temporary left


def test_output_never_replaces_its_source(farm, farm_env):
    tmp = farm_env["tmp"]
    source = movie(tmp / "clip.mp4", seconds=1)
    path = write_profile(tmp, "same", {"processor": "transcode", "output": "{stem}.{ext}",
                                       "settings": {"video": X264}})
    code, report = run_json(farm, path, source, "-o", tmp, "--overwrite")
    assert code == 1 and "would replace the source" in report["jobs"][0]["error"]


@pytest.mark.slow
def test_names_with_spaces_and_non_ascii_letters(farm, farm_env):
    tmp = farm_env["tmp"]
    folder = tmp / "Ünïcode fólder"
    folder.mkdir()
    source = movie(folder / "Crème brûlée 'take 2' — ñ.mov", seconds=3)
    code, report = run_json(farm, profile(tmp), source, "-o", folder / "out dir")
    assert code == 0, json.dumps(report)
    out = folder / "out dir" / "Crème brûlée 'take 2' — ñ-t.mp4"
    assert int(streams(out, "video")[0]["nb_read_packets"]) == 75


def test_a_missing_encoder_is_named(farm, farm_env, monkeypatch):
    """A machine whose ffmpeg lacks libsvtav1 refuses the AV1 profile, naming the encoder."""
    bin_dir = farm_env["tmp"] / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "ffmpeg"
    real = subprocess.run(["which", "ffmpeg"], capture_output=True, text=True).stdout.strip()
    wrapper.write_text(f'#!/bin/sh\nif [ "$2" = "-encoders" ]; then {real} "$@" | grep -v libsvtav1; '
                       f'else exec {real} "$@"; fi\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    source = movie(farm_env["tmp"] / "clip.mp4", seconds=1)
    result = farm("run", "av1-svt", source, "-o", farm_env["tmp"] / "out")
    assert result.returncode == 2
    assert "needs ffmpeg-encoder:libsvtav1, which this machine does not offer" in result.stderr


# -- pieces, called directly ---------------------------------------------------------------------


def run_directly(tmp_path: Path, profile_path: Path | str, source: Path):
    """Plan ``source`` with the profile and run every segment in this process, as a node
    would: (processor, job, context, the attempts' log, the segments' results)."""
    import logging
    import threading

    from farm.config import NodeConfig
    from farm.model import Job, Segment
    from farm.node import AttemptLog, CommandRunner
    from farm.plugins import load_plugins
    from farm.processor import Context, NodeInfo
    from farm.profiles import load_profile

    plugins = load_plugins()
    loaded = load_profile(str(profile_path), plugins)
    processor = plugins.processor("transcode")
    job = Job(id="j1", batch_id="b1", input=source, profile=loaded.profile, settings=loaded.settings,
              destination=tmp_path / "out", work_dir=tmp_path / "work")
    plans = processor.plan(job)
    cancelled = threading.Event()
    log = AttemptLog()
    context = Context(scratch=tmp_path, logger=logging.getLogger("t"), progress=lambda f, m="": None,
                      cancelled=cancelled, node=NodeInfo("n", 2, NodeConfig()),
                      run=CommandRunner(log, cancelled, "test", 1.0).run)
    results = []
    for index, plan in enumerate(plans):
        segment = Segment(id=f"s{index}", job=job, index=index, label=plan.label, frames=None, params=plan.params,
                          attempt_id=f"a{index}", output_dir=tmp_path / "work" / f"a{index}")
        segment.output_dir.mkdir(parents=True)
        results.append(processor.run(segment, context))
    (tmp_path / "out").mkdir()
    return processor, job, context, log, results


@pytest.mark.slow
def test_failed_verification_names_the_figures_and_delivers_nothing(farm_env, tmp_path):
    """A segment whose file holds fewer frames than planned: assembly refuses to deliver."""
    from farm.errors import ProcessorError

    source = movie(tmp_path / "clip.mp4", seconds=4)
    processor, job, context, log, results = run_directly(tmp_path, profile(tmp_path, seconds=1), source)
    assert "-threads 1" in log.text()  # 2 slots on this 2-core machine: one thread per encoder
    # A piece's frames are what its ffmpeg reported writing (no ffprobe per piece): they
    # must be what ffprobe counts in the file, for the cut-back pieces as for the encodes.
    pieces = [(r["frames"], r["params"]["count"], int(streams(Path(r["file"]), "video")[0]["nb_read_packets"]))
              for r in results if r["kind"] == "video"]
    assert [reported for reported, _, _ in pieces] == [planned for _, planned, _ in pieces] == \
        [counted for _, _, counted in pieces] == [25, 25, 25, 25]
    assert log.text().count("-c copy -frames:v 25") == 4  # every piece was cut back from a wider encode
    # Swap the third video piece for one that is 5 frames short.
    short = results[3]
    good = Path(short["file"])
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-i", str(good), "-c", "copy",
                    "-frames:v", "20", str(good.with_name("short.mp4"))], check=True)
    os.replace(good.with_name("short.mp4"), good)
    with pytest.raises(ProcessorError) as failure:
        processor.assemble(job, results, context)
    message = str(failure.value)
    assert "failed verification" in message and "video has 95 frames, expected 100" in message
    assert list((tmp_path / "out").iterdir()) == []
    # A piece lost from cluster storage is encoded again rather than failing the job.
    good.unlink()
    again = processor.verify(job, results, context)
    assert [plan.label for plan in again] == [short["label"]]


@pytest.mark.slow
def test_sound_alone_is_verified_whole_at_assembly(farm_env, tmp_path):
    """An audio-only job's piece is read by no ffprobe of its own: the joined output's check
    must refuse a piece that lost a track or was cut short, and deliver nothing."""
    from farm.errors import ProcessorError

    source = movie(tmp_path / "song.mkv", seconds=3, audio=2)
    processor, job, context, log, results = run_directly(tmp_path, "aac-audio", source)
    piece, = [Path(r["file"]) for r in results]
    assert "ffprobe" not in log.text()
    whole = piece.with_name("whole" + piece.suffix)
    os.replace(piece, whole)
    for damage, said in ((["-map", "0:0"], "it has 1 audio track(s), expected 2"),
                         (["-map", "0", "-t", "1.5"], "audio track 1 lasts 1.5")):
        subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-i", str(whole), *damage,
                        "-c", "copy", str(piece)], check=True)
        with pytest.raises(ProcessorError) as failure:
            processor.assemble(job, results, context)
        assert "failed verification" in str(failure.value) and said in str(failure.value), str(failure.value)
        assert list((tmp_path / "out").iterdir()) == []
    os.replace(whole, piece)
    delivered = [Path(path) for path in processor.assemble(job, results, context)]
    assert [path.name for path in delivered] == ["song.m4a"]
    lengths = [duration(s) for s in streams(delivered[0], "audio")]
    assert len(lengths) == 2 and all(abs(length - 3.0) < 0.1 for length in lengths), lengths


@pytest.mark.slow
def test_two_minute_source(farm, farm_env):
    tmp = farm_env["tmp"]
    source = movie(tmp / "long.mp4", seconds=120, size="320x180", audio=1)
    code, report = run_json(farm, profile(tmp, seconds=10), source, "-o", tmp / "out")
    assert code == 0, json.dumps(report)
    assert report["jobs"][0]["segments"] == 13
    out = tmp / "out" / "long-t.mp4"
    v, = streams(out, "video")
    a, = streams(out, "audio")
    assert int(v["nb_read_packets"]) == 3000 and abs(duration(v) - 120) < 0.04 and abs(duration(a) - 120) < 0.05
    assert min(psnr(out, source)) > 35
