"""Source cases of the kinds users drop into a farm, made by ffmpeg when asked.

Nothing is downloaded and no media is committed: every case is a recipe of ffmpeg
commands over lavfi sources (``testsrc2`` pictures, ``sine`` tones), short (a few
seconds) and small wherever the format allows, so tests and ``benchmarks/fidelity.py``
stay fast. Formats with fixed frame sizes (DV, DNxHD, XDCAM HD) are as small as they
allow.

    from media_cases import CASES, make
    source = make(CASES["ts-h264-ac3"], tmp_path)   # the file (or first image) to submit

Each case names the class of source it stands for (issue 16) and the transcode settings
that fit it (10-bit sources through a 10-bit profile, alpha through ProRes 4444, ...).
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FFMPEG = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-y"]

#: Settings every case is transcoded with unless it says otherwise: quick H.264 in mp4,
#: keyframes every second, so a 4 s source cut into 1 s segments has three joins.
X264 = {"codec": "libx264", "crf": 20, "preset": "veryfast", "pix_fmt": "yuv420p", "gop": "1s"}
BASE_SETTINGS: dict[str, Any] = {"container": "mp4", "video": X264, "audio": {"codec": "aac", "bitrate": "128k"}}


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # the class of source (issue 16's words)
    recipe: Callable[[Path], Path]  # writes the source into a folder, returns the path to submit
    settings: dict[str, Any] = field(default_factory=lambda: BASE_SETTINGS)
    rate: str = "25"  # the source's frame rate (image sequences: the one the profile gives)
    sequence: bool = False  # an image sequence, submitted by its first frame

    @property
    def seconds(self) -> float:
        return SECONDS


SECONDS = 4


def _run(*argv: str | Path) -> None:
    subprocess.run([*FFMPEG, *map(str, argv)], check=True, capture_output=True)


def picture(size: str = "320x240", rate: str = "25", seconds: float = SECONDS) -> list[str]:
    return ["-f", "lavfi", "-i", f"testsrc2=size={size}:rate={rate}:duration={seconds}"]


def tone(seconds: float = SECONDS, frequency: int = 440, layout: str = "mono", pulse: bool = True) -> list[str]:
    """A sine, silent for its first 0.5 s (``pulse``), so when its sound starts can be measured."""
    chain = f"sine=frequency={frequency}:sample_rate=48000:duration={seconds}"
    if layout != "mono":
        chain += f",aformat=channel_layouts={layout}"
    if pulse:
        chain += ",volume=enable='lt(t,0.5)':volume=0"
    return ["-f", "lavfi", "-i", chain]


H264 = ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-g", "12"]


def _simple(name: str, inputs: list[str], codecs: list[str]) -> Callable[[Path], Path]:
    def recipe(folder: Path) -> Path:
        out = folder / name
        _run(*inputs, *codecs, out)
        return out
    return recipe


def _av(name: str, video: list[str], audio: list[list[str]] | None = None,
        extra: list[str] | None = None) -> Callable[[Path], Path]:
    """``video`` is its input options through ``-i SOURCE``, then its output options;
    each of ``audio`` (default: one pulsed tone) is an input; ``extra`` output options follow."""
    audio = [tone(pulse=True)] if audio is None else audio
    split = video.index("-i") + 2
    inputs, maps = list(video[:split]), ["-map", "0"]
    for position, chunk in enumerate(audio, start=1):
        inputs += chunk
        maps += ["-map", str(position)]
    return _simple(name, inputs, maps + video[split:] + (extra or []))


def _copy_with(name: str, first: Callable[[Path], Path], *options: str) -> Callable[[Path], Path]:
    """Make ``first``, then stream-copy it into ``name`` with ``options`` (metadata ffmpeg
    writes only when copying, such as rotation)."""
    def recipe(folder: Path) -> Path:
        middle = first(folder)
        out = folder / name
        _run("-i", middle, "-map", "0", "-c", "copy", *options, out)
        middle.unlink()
        return out
    return recipe


def _sequence(stem: str, ext: str, codec: list[str]) -> Callable[[Path], Path]:
    def recipe(folder: Path) -> Path:
        place = folder / stem
        place.mkdir(exist_ok=True)
        _run(*picture(), *codec, "-start_number", "1", place / f"{stem}_%04d.{ext}")
        return place / f"{stem}_0001.{ext}"
    return recipe


def _vfr(folder: Path) -> Path:
    """30 fps for 2 s, then 15 fps (every other frame dropped)."""
    out = folder / "vfr-30-15.mkv"
    _run(*picture(rate="30"), *tone(pulse=True), "-map", "0", "-map", "1",
         "-vf", "select='lt(t,2)+mod(n,2)'", "-fps_mode", "vfr", *H264, "-c:a", "libopus", out)
    return out


def _edit_list_cut(folder: Path) -> Path:
    """An mp4 cut by stream copy 1.3 s into a 2 s GOP: its edit list hides the frames before the cut."""
    whole = folder / "editlist-whole.mp4"
    _run(*picture(seconds=SECONDS + 2), *tone(seconds=SECONDS + 2, pulse=True), "-map", "0", "-map", "1",
         "-c:v", "libx264", "-preset", "ultrafast", "-g", "50", "-pix_fmt", "yuv420p", "-c:a", "aac", whole)
    out = folder / "mp4-editlist-cut.mp4"
    _run("-ss", "1.3", "-i", whole, "-map", "0", "-c", "copy", out)
    whole.unlink()
    return out


def _two_tracks_subtitles(folder: Path) -> Path:
    srt = folder / "two-tracks.srt"
    srt.write_text("1\n00:00:00,500 --> 00:00:01,500\nHello\n\n2\n00:00:02,000 --> 00:00:03,000\nWorld\n",
                   encoding="utf-8")
    out = folder / "two-audio-subtitles.mkv"
    _run(*picture(), *tone(pulse=True), *tone(frequency=660), "-i", srt, "-map", "0", "-map", "1", "-map", "2",
         "-map", "3", *H264, "-c:a", "aac", "-c:s", "srt", "-metadata:s:a:0", "language=eng",
         "-metadata:s:a:1", "language=fra", out)
    srt.unlink()
    return out


def _chapters(folder: Path) -> Path:
    meta = folder / "chapters.txt"
    meta.write_text(";FFMETADATA1\ntitle=Fidelity\n[CHAPTER]\nTIMEBASE=1/1000\nSTART=0\nEND=2000\ntitle=One\n"
                    "[CHAPTER]\nTIMEBASE=1/1000\nSTART=2000\nEND=4000\ntitle=Two\n", encoding="utf-8")
    out = folder / "chapters-tags.mp4"
    _run(*picture(), *tone(pulse=True), "-i", meta, "-map", "0", "-map", "1", "-map_metadata", "2",
         "-map_chapters", "2", *H264, "-c:a", "aac", out)
    meta.unlink()
    return out


INTERLACE_TFF = ["-vf", "tinterlace=mode=interleave_top,setfield=tff", "-flags", "+ilme+ildct", "-top", "1"]
PQ = ["-color_primaries", "bt2020", "-color_trc", "smpte2084", "-colorspace", "bt2020nc", "-color_range", "tv"]

PRORES = {"codec": "prores_ks", "profile": "hq"}
PCM = {"codec": "pcm_s16le"}
#: The shipped xdcam-hd422-mxf profile's settings: MPEG-2 4:2:2 50 Mb/s in MXF OP1a, fields kept.
XDCAM_MXF = {"container": "mxf", "audio": {"codec": "pcm_s24le"},
             "video": {"codec": "mpeg2video", "bitrate": "50M", "maxrate": "50M", "bufsize": "17825792", "chroma": 422,
                       "bit_depth": 8, "gop": 12, "interlace": "keep"}}
HEVC10 = {"codec": "libx265", "crf": 24, "preset": "ultrafast", "pix_fmt": "yuv420p10le", "gop": "1s"}


def _case(name: str, kind: str, recipe: Callable[[Path], Path], settings: dict[str, Any] | None = None,
          **more: Any) -> Case:
    merged = {**BASE_SETTINGS, **(settings or {})}
    return Case(name, kind, recipe, merged, **more)


_CASES = [
    # MPEG-TS and friends: ffmpeg's 1.4 s start, AC-3, MPEG-2, a far start, the 33-bit wrap
    _case("ts-h264-ac3", "MPEG-TS, AC-3", _av("ts-h264-ac3.ts", [*picture(), *H264], extra=["-c:a", "ac3"])),
    _case("m2ts-h264-ac3", "M2TS, AC-3", _av("m2ts-h264-ac3.m2ts", [*picture(), *H264],
                                              extra=["-c:a", "ac3", "-f", "mpegts", "-mpegts_m2ts_mode", "1"])),
    _case("ts-mpeg2-mp2", "MPEG-TS, MPEG-2", _av("ts-mpeg2-mp2.ts", [*picture(), "-c:v", "mpeg2video", "-q:v", "3"],
                                                 extra=["-c:a", "mp2"])),
    _case("ts-start-600", "MPEG-TS, start 600 s", _av("ts-start-600.ts", [*picture(), *H264],
                                                      extra=["-c:a", "ac3", "-output_ts_offset", "600"])),
    _case("ts-pts-wrap", "MPEG-TS, timestamps wrap", _av("ts-pts-wrap.ts", [*picture(), *H264],
                                                         extra=["-c:a", "ac3", "-output_ts_offset", "95441.5"])),
    _case("mts-interlaced-ac3", "AVCHD-style MTS, interlaced, AC-3",
          _av("mts-interlaced-ac3.mts", [*picture(size="640x360", rate="50"), *H264, *INTERLACE_TFF, "-r", "25"],
              extra=["-c:a", "ac3", "-f", "mpegts", "-mpegts_m2ts_mode", "1"])),
    _case("mpeg-ps", "MPEG program stream", _av("mpeg-ps.mpg", [*picture(), "-c:v", "mpeg2video", "-q:v", "3"],
                                               extra=["-c:a", "mp2"])),
    # Matroska/WebM starting late
    _case("mkv-start-9977", "Matroska, start 9.977 s", _av("mkv-start-9977.mkv", [*picture(), *H264],
                                                           extra=["-c:a", "aac", "-output_ts_offset", "9.977"])),
    _case("webm-start-5", "WebM, start 5 s",
          _av("webm-start-5.webm", [*picture(), "-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8",
                                    "-g", "12"], extra=["-c:a", "libopus", "-output_ts_offset", "5"])),
    # MP4/MOV with edit lists
    _case("mp4-editlist-cut", "MP4, edit list (cut by copy)", _edit_list_cut),
    _case("mov-video-delayed", "MOV, video delayed 0.5 s (empty edit)",
          _av("mov-video-delayed.mov", ["-itsoffset", "0.5", *picture(), *H264], extra=["-c:a", "aac"])),
    # Broadcast and post-production formats
    _case("mxf-xdcam-hd422", "MXF OP1a, XDCAM HD422 (MPEG-2 4:2:2 1080i)",
          _av("mxf-xdcam-hd422.mxf", [*picture(size="1920x1080", seconds=2), "-c:v", "mpeg2video",
                                      "-pix_fmt", "yuv422p", "-b:v", "50M", "-minrate", "50M", "-maxrate", "50M",
                                      "-bufsize", "17825792", "-g", "12", "-flags", "+ilme+ildct", "-top", "1",
                                      "-timecode", "10:00:00:00"],
              audio=[tone(seconds=2, pulse=True)], extra=["-c:a", "pcm_s24le"])),
    _case("mxf-dnxhd", "MXF OP1a, DNxHD 720p",
          _av("mxf-dnxhd.mxf", [*picture(size="1280x720", seconds=2), "-c:v", "dnxhd", "-b:v", "90M",
                                "-pix_fmt", "yuv422p"], audio=[tone(seconds=2, pulse=True)],
              extra=["-c:a", "pcm_s16le"])),
    _case("mov-dnxhd", "MOV, DNxHD 720p",
          _av("mov-dnxhd.mov", [*picture(size="1280x720", seconds=2), "-c:v", "dnxhd", "-b:v", "90M",
                                "-pix_fmt", "yuv422p"], audio=[tone(seconds=2, pulse=True)],
              extra=["-c:a", "pcm_s16le"])),
    _case("mov-dnxhr-hqx", "MOV, DNxHR HQX 10-bit",
          _av("mov-dnxhr-hqx.mov", [*picture(), "-c:v", "dnxhd", "-profile:v", "dnxhr_hqx",
                                    "-pix_fmt", "yuv422p10le"], extra=["-c:a", "pcm_s24le"]),
          {"container": "mov", "video": PRORES, "audio": PCM}),
    _case("mov-prores422-10bit", "MOV, ProRes 422 10-bit",
          _av("mov-prores422-10bit.mov", [*picture(), "-c:v", "prores_ks", "-profile:v", "2",
                                          "-pix_fmt", "yuv422p10le"], extra=["-c:a", "pcm_s16le"]),
          {"video": HEVC10, "container": "mkv"}),
    _case("mov-prores4444-alpha", "MOV, ProRes 4444 with alpha",
          _av("mov-prores4444-alpha.mov", [*picture(), "-c:v", "prores_ks", "-profile:v", "4",
                                           "-pix_fmt", "yuva444p10le", "-vf",
                                           "format=rgba,geq=r='r(X,Y)':g='g(X,Y)':b='b(X,Y)':a='X*255/W'"],
              extra=["-c:a", "pcm_s16le"]),
          {"container": "mov", "video": {"codec": "prores_ks", "profile": "4444", "pix_fmt": "yuva444p10le"},
           "audio": PCM}),
    _case("dv-ntsc-43", "DV NTSC, interlaced, anamorphic 4:3",
          _av("dv-ntsc-43.dv", [*picture(size="720x480", rate="30000/1001", seconds=2), "-c:v", "dvvideo",
                                "-pix_fmt", "yuv411p", "-aspect", "4:3"],
              audio=[tone(seconds=2, layout="stereo", pulse=True)], extra=["-c:a", "pcm_s16le"]),
          rate="30000/1001"),
    _case("dv-pal-43", "DV PAL, interlaced, anamorphic 4:3",
          _av("dv-pal-43.dv", [*picture(size="720x576", seconds=2), "-c:v", "dvvideo", "-pix_fmt", "yuv420p",
                               "-aspect", "4:3"],
              audio=[tone(seconds=2, layout="stereo", pulse=True)], extra=["-c:a", "pcm_s16le"])),
    _case("avi-mjpeg-pcm", "AVI, Motion JPEG, PCM",
          _av("avi-mjpeg-pcm.avi", [*picture(), "-c:v", "mjpeg", "-q:v", "3"], extra=["-c:a", "pcm_s16le"])),
    # Bit depth, interlace, HDR, timecode
    _case("hevc-10bit", "HEVC Main10",
          _av("hevc-10bit.mkv", [*picture(), "-c:v", "libx265", "-preset", "ultrafast", "-pix_fmt", "yuv420p10le",
                                 "-x265-params", "log-level=error:keyint=12"], extra=["-c:a", "aac"]),
          {"video": HEVC10, "container": "mkv"}),
    _case("h264-interlaced-tff", "H.264 interlaced, top field first",
          _av("h264-interlaced-tff.mp4", [*picture(rate="50"), *H264, *INTERLACE_TFF, "-r", "25"],
              extra=["-c:a", "aac"])),
    _case("hdr10-hevc", "HDR10 (PQ, BT.2020, mastering display)",
          _av("hdr10-hevc.mkv", [*picture(), "-c:v", "libx265", "-preset", "ultrafast", "-pix_fmt", "yuv420p10le",
                                 *PQ, "-x265-params",
                                 "log-level=error:keyint=12:hdr10=1:max-cll=1000,400:master-display="
                                 "G(13250,34500)B(7500,3000)R(34000,16000)WP(15635,16450)L(10000000,1)"],
              extra=["-c:a", "aac"]),
          {"video": HEVC10, "container": "mkv"}),
    _case("hlg-h264-10bit", "HLG-tagged H.264 High 10",
          _av("hlg-h264-10bit.mp4", [*picture(), "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt",
                                     "yuv420p10le", "-color_primaries", "bt2020", "-color_trc", "arib-std-b67",
                                     "-colorspace", "bt2020nc"], extra=["-c:a", "aac"]),
          {"video": HEVC10, "container": "mkv"}),
    _case("mov-timecode", "MOV with start timecode",
          _av("mov-timecode.mov", [*picture(), *H264, "-timecode", "01:00:00:00"], extra=["-c:a", "aac"]),
          {"container": "mov"}),
    _case("mxf-out-interlaced-tc", "into XDCAM HD422-like MXF: interlaced, timecode, PCM",
          _av("mxf-out-interlaced-tc.mov", [*picture(rate="50"), *H264, *INTERLACE_TFF, "-r", "25",
                                            "-timecode", "10:00:00:00"], extra=["-c:a", "pcm_s16le"]),
          XDCAM_MXF),
    # Audio timing and layout
    _case("late-audio-0.7", "audio starts 0.7 s after the picture",
          _av("late-audio-0.7.mp4", [*picture(), *H264], audio=[["-itsoffset", "0.7", *tone()]],
              extra=["-c:a", "aac"])),
    _case("late-audio-mkv", "Matroska, audio starts 0.3 s late",
          _av("late-audio-mkv.mkv", [*picture(), *H264], audio=[["-itsoffset", "0.3", *tone(pulse=True)]],
              extra=["-c:a", "libopus"])),
    _case("early-audio", "audio starts 0.3 s before the picture",
          _av("early-audio.mp4", ["-itsoffset", "0.3", *picture(), *H264], extra=["-c:a", "aac"])),
    _case("surround-51", "5.1 audio",
          _av("surround-51.mp4", [*picture(), *H264], audio=[tone(layout="5.1", pulse=True)],
              extra=["-c:a", "aac", "-b:a", "384k"]),
          {"audio": {"codec": "aac", "bitrate": "384k"}}),
    _case("two-audio-subtitles", "two audio tracks, subtitles", _two_tracks_subtitles, {"container": "mkv"}),
    _case("chapters-tags", "chapters and tags", _chapters),
    # Frame rates and geometry
    _case("vfr-30-15", "variable frame rate (30 then 15 fps)", _vfr,
          {"vfr": "convert", "video": {**X264, "fps": "30"}}, rate="30"),
    _case("ntsc-2997", "29.97 fps", _av("ntsc-2997.mp4", [*picture(rate="30000/1001"), *H264],
                                        extra=["-c:a", "aac"]), rate="30000/1001"),
    _case("film-23976", "23.976 fps MOV", _av("film-23976.mov", [*picture(rate="24000/1001"), *H264],
                                              extra=["-c:a", "aac"]), rate="24000/1001"),
    _case("hfr-5994", "59.94 fps 720p", _av("hfr-5994.mp4", [*picture(size="1280x720", rate="60000/1001",
                                                                       seconds=2), *H264],
                                            audio=[tone(seconds=2, pulse=True)], extra=["-c:a", "aac"]),
          rate="60000/1001"),
    _case("rotated-90", "phone video, rotation 90",
          _copy_with("rotated-90.mp4", _av("rotated-90-plain.mp4", [*picture(), *H264], extra=["-c:a", "aac"]),
                     "-metadata:s:v:0", "rotate=90")),
    # Image sequences, submitted by their first frame, at the profile's rate
    _case("png-sequence", "PNG sequence", _sequence("png-seq", "png", ["-c:v", "png"]),
          {"audio": None, "video": {**X264, "fps": "25"}}, sequence=True),
    _case("tiff-sequence", "TIFF sequence", _sequence("tiff-seq", "tif", ["-c:v", "tiff"]),
          {"audio": None, "video": {**X264, "fps": "25"}}, sequence=True),
    _case("dpx-sequence", "DPX sequence (10-bit)", _sequence("dpx-seq", "dpx", ["-c:v", "dpx", "-pix_fmt", "gbrp10le"]),
          {"audio": None, "video": {**X264, "fps": "25"}}, sequence=True),
    _case("exr-sequence", "OpenEXR sequence (float)",
          _sequence("exr-seq", "exr", ["-c:v", "exr", "-pix_fmt", "gbrpf32le"]),
          {"audio": None, "video": {**X264, "fps": "25"}}, sequence=True),
]

CASES: dict[str, Case] = {case.name: case for case in _CASES}


def input_argv(case: Case, source: Path) -> list[str]:
    """How ffmpeg opens a case's source (an image sequence at the case's rate)."""
    if case.sequence:
        pattern = re.sub(r"\d+(?=\.[^.]+$)", lambda m: f"%0{len(m.group())}d", source.name)
        return ["-framerate", case.rate, "-start_number", "1", "-i", str(source.parent / pattern)]
    return ["-i", str(source)]


def psnr(path: Path, source: Path, case: Case, width: int, height: int) -> list[float]:
    """Per-frame PSNR (dB, 100 for identical) of ``path`` against the source, both put on
    the source's grid (``fps=RATE`` after their starts are made 0: ffmpeg pairs frames by
    timestamp) at ``width``x``height`` and compared in yuv444p."""
    grid = f"setpts=PTS-STARTPTS,fps={case.rate},scale={width}:{height},format=yuv444p"
    stats = path.parent / f"{path.name}.psnr"
    subprocess.run([*FFMPEG, "-i", str(path), *input_argv(case, source), "-lavfi",
                    f"[0:v]{grid}[a];[1:v]{grid}[b];[a][b]psnr=stats_file={stats}", "-f", "null", "-"],
                   capture_output=True, text=True)
    values = []
    for line in stats.read_text().splitlines() if stats.exists() else []:
        found = re.search(r"psnr_avg:(\S+)", line)
        if found:
            values.append(100.0 if found.group(1) == "inf" else float(found.group(1)))
    return values


def make(case: Case, folder: Path) -> Path:
    """Write ``case``'s source into ``folder``; returns the file to submit (an image
    sequence's first frame)."""
    folder.mkdir(parents=True, exist_ok=True)
    return case.recipe(folder)


if __name__ == "__main__":  # make them all, to look at: python tests/media_cases.py FOLDER
    import sys

    target = Path(sys.argv[1] if len(sys.argv) > 1 else "media-cases")
    for case in _CASES:
        print(case.name, make(case, target / case.name))
