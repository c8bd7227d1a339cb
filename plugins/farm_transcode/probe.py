"""What a source holds, from ffprobe: streams, frame rate, frame count, keyframes.

Planning probes the container and its streams, then at once every video and audio
packet's timestamp (demuxing only, no decoding) and the first decoded frame. The packets
give the exact frame count, where the keyframes are, whether the frame rate is constant,
and where each track starts and ends. A file that is empty, is a playlist or a concat
list, cannot be read, or is cut short is refused with a reason.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from statistics import median
from typing import Any

from farm.errors import PlanError, ProcessorError

from farm_transcode.settings import describe_pix_fmt, parse_rate

FFPROBE = "ffprobe"
PROBE_TIMEOUT = 600.0
#: Beyond these a header or the timestamps are damaged or hostile, not a movie: a side
#: longer than any encoder here takes (the profiles' own limit), more than 1000 frames a
#: second, or less than one frame an hour (mp4 cannot even store such a frame's duration).
MAX_SIDE = 16384
MAX_RATE = Fraction(1000)
MIN_RATE = Fraction(1, 3600)
#: Demuxers that read other files named inside the source: never accepted as sources.
REFUSED_FORMATS = {"hls", "applehttp", "concat", "dash", "sdp", "rtsp", "rtp", "ffmetadata", "tee", "image2"}
#: Text that marks a playlist or a list of files, whatever the file is called.
_PLAYLIST_MARKS = (b"#EXTM3U", b"ffconcat", b"<?xml", b"<MPD", b"[playlist]", b"<smil", b"#EXT-X-")
#: What ffprobe gives as a stream's codec when this ffmpeg does not know it.
UNKNOWN_CODECS = {None, "", "unknown", "none"}
TEXT_SUBTITLES = {"subrip", "srt", "ass", "ssa", "mov_text", "webvtt", "text"}


@dataclass
class VideoFacts:
    index: int  # the stream's index in the file
    codec: str
    width: int
    height: int
    time_base: str  # "1/30000"
    rate: str  # the constant rate ("30000/1001"), or the average for a variable one
    vfr: bool
    frames: int
    start_pts: int  # the first frame's presentation timestamp, in time_base
    last_pts: int  # the last frame's pts
    end_pts: int  # the last frame's pts plus its duration where the container gives one
    duration: float  # seconds from the first frame's start to the last frame's end
    pts: list[int] = field(default_factory=list, repr=False)  # every frame's pts, in presentation order
    keyframes: list[int] = field(default_factory=list, repr=False)  # frame numbers (from 0) of keyframes
    # The picture, as the decoder delivers it (see _picture_facts); None: not known.
    pix_fmt: str | None = None  # yuv422p10le
    bit_depth: int | None = None
    alpha: bool = False
    field_order: str = "progressive"  # or "tff", "bff": the field shown first
    color_primaries: str | None = None  # bt2020
    color_transfer: str | None = None  # smpte2084 (PQ), arib-std-b67 (HLG)
    color_space: str | None = None  # the matrix: bt2020nc
    color_range: str | None = None  # tv, pc
    mastering: dict[str, str] | None = None  # HDR10 mastering display, as ffprobe gives it (red_x: "34000/50000")
    light: dict[str, int] | None = None  # max_content, max_average (cd/m²)
    timecode: str | None = None  # the start timecode, 01:00:00:00 (01:00:00;00 drop-frame)
    rotation: int = 0  # degrees, as ffprobe reports the display matrix (-90: shown turned)
    uncut: str | None = None  # why its timestamps cannot place a cut (it is then read straight through)

    @property
    def fps(self) -> Fraction:
        return parse_rate(self.rate)

    @property
    def tb(self) -> Fraction:
        return parse_rate(self.time_base)


@dataclass
class AudioFacts:
    index: int
    codec: str
    channels: int
    start: float
    duration: float
    language: str | None = None


@dataclass
class SubtitleFacts:
    index: int
    codec: str
    text: bool


@dataclass
class SourceFacts:
    path: str
    demuxer: str  # the demuxer that read it, forced on every later read (-f)
    start: float  # the container's start time, seconds
    duration: float
    video: VideoFacts | None
    audio: list[AudioFacts]
    subtitles: list[SubtitleFacts]
    input_options: dict[str, str] = field(default_factory=dict)  # the demuxer's (an image sequence's rate)

    def summary(self) -> dict[str, Any]:
        """What segments and assembly need, small enough to travel with every segment."""
        data = asdict(self)
        if data["video"] is not None:
            data["video"].pop("pts")
            data["video"].pop("keyframes")
        return data

    @classmethod
    def from_summary(cls, data: dict[str, Any]) -> SourceFacts:
        video = VideoFacts(**data["video"]) if data.get("video") else None
        return cls(data["path"], data["demuxer"], data["start"], data["duration"], video,
                   [AudioFacts(**a) for a in data["audio"]], [SubtitleFacts(**s) for s in data["subtitles"]],
                   dict(data.get("input_options") or {}))


# -- running ffprobe --------------------------------------------------------------------------


def _ffprobe(args: list[str], timeout: float = PROBE_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """ffprobe on the controller while planning (no segment context exists yet)."""
    try:
        return subprocess.run([FFPROBE, "-hide_banner", *args], capture_output=True, text=True, errors="replace",
                              timeout=timeout, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise PlanError("ffprobe is not installed here (it comes with ffmpeg)") from None
    except subprocess.TimeoutExpired:
        raise PlanError(f"ffprobe took longer than {timeout:g} s to read the source") from None


def last_error(stderr: str, path: Path | None = None) -> str:
    """ffprobe's complaints as one phrase: ``moov atom not found; Invalid data found ...``."""
    said: list[str] = []
    for line in stderr.splitlines():
        line = re.sub(r"^(\[[^\]]+\]\s*)+", "", line.strip())  # "[mov,mp4 @ 0x55...] [IMGUTILS @ 0x7f...] "
        if path is not None and line.startswith(f"{path}: "):
            line = line[len(str(path)) + 2:]
        if line.startswith("Last message repeated"):  # says nothing new
            continue
        if line and line not in said:
            said.append(line)
    return "; ".join(said[-3:]) if said else "no reason given"


def sniff(path: Path) -> None:
    """Refuse what is not a movie before ffprobe opens it (a playlist would make it open other files)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(4096)
    except OSError as exc:
        raise PlanError(f"cannot read {path.name}: {exc.strerror or exc}") from None
    if size == 0:
        raise PlanError(f"{path.name} is empty (0 bytes)")
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    for mark in _PLAYLIST_MARKS:
        if text.startswith(mark.lower()):
            raise PlanError(f"{path.name} is a playlist or a list of files, not a movie; "
                            "such sources are refused (they make ffmpeg read other files)")
    if re.match(rb"^(file|#[^\n]*\n\s*file)\s+'?[^\n]+", text):
        raise PlanError(f"{path.name} is a concat list, not a movie; such sources are refused")


def _starts_like_quicktime(path: Path) -> bool:
    """Whether the file opens with an mp4/mov box (ftyp, or the media data of a recorder
    that writes its index last): a real movie, unlike a text file called .mov."""
    try:
        with path.open("rb") as handle:
            head = handle.read(8)
    except OSError:
        return False
    return len(head) == 8 and head[4:8] in (b"ftyp", b"mdat", b"wide", b"free", b"skip")


def _seconds(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number == number else None  # NaN is None


def _tag_duration(stream: dict[str, Any]) -> float | None:
    """Matroska keeps a stream's duration in a tag such as 00:00:10.010000000."""
    for key, value in (stream.get("tags") or {}).items():
        if key.upper() == "DURATION":
            match = re.match(r"^(\d+):(\d+):(\d+(?:\.\d+)?)$", str(value))
            if match:
                hours, minutes, seconds = match.groups()
                return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    return None


def stream_duration(stream: dict[str, Any], container: dict[str, Any] | None = None) -> float | None:
    duration = _seconds(stream.get("duration"))
    if duration is None:
        duration = _tag_duration(stream)
    if duration is None and container is not None:
        duration = _seconds(container.get("duration"))
    return duration


def probe_source(path: Path, picture_wanted: bool = True) -> SourceFacts:
    """Everything planning needs to know about a source (see the module's docstring);
    without ``picture_wanted``, nothing of its first frame (a job that makes sound alone)."""
    sniff(path)
    proc = _ffprobe(["-v", "error", "-protocol_whitelist", "file", "-show_format", "-show_streams",
                     "-of", "json", str(path)])
    if proc.returncode != 0:
        if "moov atom not found" in proc.stderr and _starts_like_quicktime(path):
            raise PlanError(f"{path.name} has no index (its moov atom): the recording was cut short or never "
                            "finished (an mp4 or mov writes its index last); expected a complete file, or one "
                            "written with +faststart")
        raise PlanError(f"ffprobe cannot read {path.name} as a movie: {last_error(proc.stderr, path)}")
    try:
        data = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise PlanError(f"ffprobe gave no description of {path.name}") from None
    container = data.get("format") or {}
    format_name = str(container.get("format_name", ""))
    names = set(format_name.split(","))
    if names & REFUSED_FORMATS:
        raise PlanError(f"{path.name} is read as {format_name!r}, a format that points at other files or "
                        "images; such sources are refused")
    streams = data.get("streams") or []
    if not streams:
        raise PlanError(f"{path.name} has no streams ({container.get('format_long_name') or format_name})")
    picture = next((s for s in streams if s.get("codec_type") == "video"
                    and not (s.get("disposition") or {}).get("attached_pic")), None)
    sounds = [s for s in streams if s.get("codec_type") == "audio"]
    if picture is not None and picture.get("codec_name") in UNKNOWN_CODECS:
        raise PlanError(f"{path.name}: its video (stream {picture.get('index')}, {_codec_words(picture)}) is in a "
                        "codec this ffmpeg does not know, so it cannot be decoded; expected a codec that "
                        "`ffmpeg -decoders` lists")
    # The first frame is decoded while the packets are read: two ffprobes at once, not in
    # turn. Never a frame whose header size is refused below (a decoder's memory bomb).
    decodable = picture_wanted and picture is not None and all(0 < int(picture.get(side) or 0) <= MAX_SIDE for side in ("width", "height"))
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="farm-probe") as pool:
        first_frame = pool.submit(_first_frame, path, int(picture["index"])) if decodable else None
        packets = _packets(path, [s for s in (picture, *sounds) if s is not None])
        video = _video_facts(path, picture, packets.get(int(picture["index"]), [])) if picture is not None else None
        if video is not None and first_frame is not None:
            _picture_facts(video, picture, data, first_frame.result())
    audio = []
    for s in sounds:
        start, duration = _audio_span(s, packets.get(int(s["index"]), []), container)
        audio.append(AudioFacts(index=int(s["index"]), codec=str(s.get("codec_name") or "?"),
                                channels=int(s.get("channels") or 0), start=start, duration=duration,
                                language=(s.get("tags") or {}).get("language")))
    subtitles = [SubtitleFacts(int(s["index"]), str(s.get("codec_name", "?")), s.get("codec_name") in TEXT_SUBTITLES)
                 for s in streams if s.get("codec_type") == "subtitle"]
    return SourceFacts(path=str(path), demuxer=format_name.split(",")[0], start=_seconds(container.get("start_time")) or 0.0,
                       duration=_seconds(container.get("duration")) or 0.0, video=video, audio=audio, subtitles=subtitles)


def _codec_words(stream: dict[str, Any]) -> str:
    tag = str(stream.get("codec_tag_string") or "")
    return f"codec tag {tag!r}" if tag and not tag.startswith("[") else "no codec tag"


#: One packet as planning reads it: its stream's fields ``pts,dts,duration,flags`` as text.
Packet = list[str]


def _packets(path: Path, streams: list[dict[str, Any]]) -> dict[int, list[Packet]]:
    """Every packet of the video and audio streams, in file order, from one read of the file
    (demuxing only): the timestamps that say where frames are and where each track starts
    and ends, whatever the container's header claims (a Matroska DURATION tag is the
    track's end, not its length)."""
    if not streams:
        return {}
    wanted = {int(s["index"]) for s in streams}
    proc = _ffprobe(["-v", "error", "-protocol_whitelist", "file", "-show_entries",
                     "packet=stream_index,pts,dts,duration,flags", "-of", "csv=p=0", str(path)])
    problems = [line for line in proc.stderr.splitlines() if line.strip()]
    if proc.returncode != 0 or problems:
        raise PlanError(f"{path.name} cannot be read to the end; it may be truncated or damaged: "
                        f"{last_error(proc.stderr, path)}")
    found: dict[int, list[Packet]] = {index: [] for index in wanted}
    for line in proc.stdout.splitlines():
        parts = line.split(",")
        if len(parts) < 5 or not parts[0].isdigit() or int(parts[0]) not in wanted:
            continue
        found[int(parts[0])].append(parts[1:5])
    return found


def _tick(text: str) -> int | None:
    return int(text) if text not in ("", "N/A") else None


def _audio_span(stream: dict[str, Any], packets: list[Packet], container: dict[str, Any]) -> tuple[float, float]:
    """An audio track's start and length in seconds: an mp4/mov track's own length (its
    edit list leaves out priming and padding), else from its packets (a Matroska DURATION
    tag is the track's end; an MPEG-TS header's length is a guess, wrong across a
    timestamp wrap), else what the header says."""
    start = _seconds(stream.get("start_time"))
    tb = parse_rate(stream.get("time_base") or "1/1000")
    ends = [pts + (_tick(duration) or 0) for pts, duration in
            ((_tick(p[0]) if _tick(p[0]) is not None else _tick(p[1]), p[2]) for p in packets if "D" not in p[3])
            if pts is not None]
    if not ends:
        return start or 0.0, stream_duration(stream, container) or 0.0
    times = [_tick(p[0]) for p in packets if _tick(p[0]) is not None]
    if _restart(times, tb) is not None:  # timestamps start again: the packets, one after the other
        return start or 0.0, float(sum(_tick(p[2]) or 0 for p in packets if "D" not in p[3]) * tb)
    if "mov" in str(container.get("format_name", "")).split(",") and _seconds(stream.get("duration")) is not None:
        return start or 0.0, _seconds(stream.get("duration")) or 0.0
    if start is None:
        firsts = [_tick(p[0]) for p in packets if _tick(p[0]) is not None]
        start = float(min(firsts) * tb) if firsts else 0.0
    return start, max(0.0, float(max(ends) * tb) - start)


def _video_facts(path: Path, stream: dict[str, Any], rows: list[Packet]) -> VideoFacts:
    index = int(stream["index"])
    packets = []
    discarded = untimed = 0
    for parts in rows:
        if "D" in parts[3]:  # discarded packets (edit lists) are never shown
            discarded += 1
            continue
        pts = parts[0] if parts[0] not in ("", "N/A") else parts[1]
        if pts in ("", "N/A"):
            untimed += 1
            continue
        duration = int(parts[2]) if parts[2] not in ("", "N/A") else 0
        packets.append((int(pts), duration, "K" in parts[3]))
    if not packets and discarded:
        raise PlanError(f"{path.name}: its video stream has no frames to show: its edit list cuts away all "
                        f"{discarded} of them (they lie before the start it sets)")
    if not packets and untimed:
        raise PlanError(f"{path.name}: none of the {untimed} frames of its video stream has a timestamp; "
                        "the file may be damaged")
    if not packets:
        raise PlanError(f"{path.name}: its video stream has no frames")
    declared = stream.get("nb_frames")
    if declared not in (None, "N/A") and int(declared) > len(packets) + discarded + untimed:
        raise PlanError(f"{path.name} looks truncated or damaged: its header says {declared} frames, "
                        f"{len(packets) + discarded + untimed} can be read")
    tb = parse_rate(stream.get("time_base") or "1/1000")
    restart = _restart([p for p, _, _ in packets], tb)
    uncut = None
    if restart is not None:
        uncut = f"its timestamps start again at frame {restart + 1} (a joined or looped recording)"
        untimed_total = len(packets) + untimed
        packets = packets[:restart]  # the timing of the first run; the frames are all counted
    elif untimed:
        uncut = f"{untimed} of its frames carry no timestamp"
        untimed_total = len(packets) + untimed
    packets.sort()
    pts = [p for p, _, _ in packets]
    deltas = [b - a for a, b in zip(pts, pts[1:])]
    declared_rate = _rate(stream.get("r_frame_rate")) or _rate(stream.get("avg_frame_rate"))
    if deltas:
        typical = median(deltas)
        measured = 1 / (typical * tb) if typical > 0 else None
    else:
        measured = None
    rate = declared_rate
    if measured is not None and (rate is None or abs(1 / rate - 1 / measured) > tb * 1.5):
        rate = parse_rate(f"{float(measured):.6f}")
    if rate is None:
        rate = Fraction(25)
    expected = 1 / (rate * tb)  # ticks per frame
    tolerance = max(Fraction(3, 2), expected / 100)
    vfr = any(abs(d - expected) > tolerance for d in deltas)
    last_claim = packets[-1][1]
    if not vfr and last_claim and abs(last_claim - expected) > tolerance:
        # At a constant rate the last frame lasts one frame, whatever a damaged header (a
        # Matroska DefaultDuration of 4295 s) claims: no constant-rate encode could match it.
        last_claim = round(expected)
    last_duration = last_claim if not vfr else last_claim or (deltas[-1] if deltas else 0)
    if not last_duration:
        last_duration = expected
    duration = float((pts[-1] + last_duration - pts[0]) * tb)
    end_pts = pts[-1] + max(0, last_claim)
    if vfr:  # the average, from the frames themselves (containers often state a nominal rate)
        rate = (Fraction(len(pts)) / Fraction(duration).limit_denominator(100000)).limit_denominator(1001)
    width, height = int(stream.get("width") or 0), int(stream.get("height") or 0)
    if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
        raise PlanError(f"{path.name}: its header gives a picture of {width}x{height}, which is not plausible "
                        f"(at most {MAX_SIDE} pixels a side); the file may be damaged")
    if not MIN_RATE <= rate <= MAX_RATE:
        raise PlanError(f"{path.name}: its frame rate of {float(rate):.6g} fps (from its header and timestamps) is "
                        f"not plausible (expected one frame an hour to {MAX_RATE} fps); the file may be damaged")
    keyframes = [i for i, (_, _, key) in enumerate(packets) if key]
    frames = len(pts)
    if uncut is not None:  # every frame, one after the other at the rate of the first run
        frames, vfr, keyframes = untimed_total, False, []
        duration = float(frames / rate)
    return VideoFacts(index=index, codec=str(stream.get("codec_name", "?")), width=width,
                      height=height, time_base=f"{tb.numerator}/{tb.denominator}",
                      rate=f"{rate.numerator}/{rate.denominator}", vfr=vfr, frames=frames, start_pts=pts[0],
                      last_pts=pts[-1], end_pts=end_pts, duration=duration, pts=pts, keyframes=keyframes, uncut=uncut)


def _restart(times: list[int], tb: Fraction) -> int | None:
    """The position (in file order) where timestamps jump back by more than a second: a
    recording joined to another or looped, or a timestamp wrap the demuxer did not undo.
    Frames are stored a few ahead of when they are shown, never a second."""
    latest = None
    for position, pts in enumerate(times):
        if latest is not None and (latest - pts) * tb > 1:
            return position
        latest = pts if latest is None else max(latest, pts)
    return None


_UNKNOWN = {None, "", "unknown", "unspecified", "reserved", "N/A"}
_MASTERING = ("red_x", "red_y", "green_x", "green_y", "blue_x", "blue_y", "white_point_x", "white_point_y",
              "min_luminance", "max_luminance")


def _side_data(entries: list[dict[str, Any]], kind: str) -> dict[str, Any] | None:
    return next((entry for entry in entries if entry.get("side_data_type") == kind), None)


def _first_frame(path: Path, index: int) -> dict[str, Any]:
    """The first decoded frame of stream ``index`` as ffprobe describes it; ``{}`` when none is."""
    proc = _ffprobe(["-v", "error", "-protocol_whitelist", "file", "-select_streams", str(index),
                     "-read_intervals", "%+#1", "-show_frames", "-show_entries",
                     "frame=pix_fmt,interlaced_frame,top_field_first,color_range,color_space,color_primaries,"
                     "color_transfer,side_data_list", "-of", "json", str(path)], timeout=60)
    try:
        frames = json.loads(proc.stdout).get("frames") or [] if proc.returncode == 0 else []
    except json.JSONDecodeError:
        frames = []
    return frames[0] if frames else {}


def _picture_facts(video: VideoFacts, stream: dict[str, Any], data: dict[str, Any], frame: dict[str, Any]) -> None:
    """What the decoder delivers: pixel format, fields, colour, HDR metadata, timecode, rotation.

    The first frame (``frame``, see :func:`_first_frame`) counts too: an interlaced
    picture, its colour and HDR10 metadata are often told only in the bitstream (the
    container says nothing).
    """
    video.pix_fmt = str(frame.get("pix_fmt") or stream.get("pix_fmt") or "") or None
    described = describe_pix_fmt(video.pix_fmt)
    raw_bits = stream.get("bits_per_raw_sample")
    video.bit_depth = described[0] if described else (int(raw_bits) if str(raw_bits).isdigit() else None)
    video.alpha = bool(described and described[2]) or str((stream.get("tags") or {}).get("alpha_mode")) == "1"
    order = stream.get("field_order")
    if frame.get("interlaced_frame"):
        video.field_order = "tff" if frame.get("top_field_first") else "bff"
    elif order in ("tt", "tb", "bb", "bt"):
        video.field_order = "tff" if order in ("tt", "tb") else "bff"
    for key in ("color_primaries", "color_transfer", "color_space", "color_range"):
        value = stream.get(key) if stream.get(key) not in _UNKNOWN else frame.get(key)
        setattr(video, key, None if value in _UNKNOWN else str(value))
    side = [*(stream.get("side_data_list") or []), *(frame.get("side_data_list") or [])]
    mastering = _side_data(side, "Mastering display metadata")
    if mastering and all(mastering.get(key) for key in _MASTERING):
        video.mastering = {key: str(mastering[key]) for key in _MASTERING}
    light = _side_data(side, "Content light level metadata")
    if light and light.get("max_content") is not None:
        video.light = {"max_content": int(light["max_content"]), "max_average": int(light.get("max_average") or 0)}
    matrix = _side_data(side, "Display Matrix")
    rotation = matrix.get("rotation") if matrix else (stream.get("tags") or {}).get("rotate")
    video.rotation = int(round(float(rotation))) % 360 if _seconds(rotation) is not None else 0
    if video.rotation > 180:
        video.rotation -= 360
    tags = [stream.get("tags") or {}, (data.get("format") or {}).get("tags") or {},
            *((s.get("tags") or {}) for s in data.get("streams") or [] if s.get("codec_type") == "data")]
    video.timecode = next((str(t["timecode"]) for t in tags if _TIMECODE.match(str(t.get("timecode", "")))), None)


_TIMECODE = re.compile(r"^\d{2}:\d{2}:\d{2}[:;.]\d{2,3}$")


def _rate(text: Any) -> Fraction | None:
    try:
        rate = parse_rate(str(text))
    except (ValueError, ZeroDivisionError):
        return None
    return rate if 0 < rate <= 1000 else None


# -- probing outputs on a node (through the segment's runner) -------------------------------------


@dataclass
class OutputFacts:
    """An encoded file as ffprobe sees it: packets counted, durations read."""

    format: dict[str, Any]
    streams: list[dict[str, Any]]
    video_span: float | None = None  # seconds from the first frame's start to the last one's
    ends: dict[int, float] = field(default_factory=dict)  # stream index -> its last packet's end, seconds
    audio_lag: float | None = None  # seconds the first audio track plays later than the source's (sync.lag)

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [s for s in self.streams if s.get("codec_type") == kind]

    def frames(self, stream: dict[str, Any]) -> int:
        return int(stream.get("nb_read_packets") or 0)

    def duration(self, stream: dict[str, Any]) -> float:
        """The stream's own duration where the container keeps one (an mp4 edit list's,
        which leaves out priming and padding); else from its start to its last packet's
        end (a Matroska DURATION tag is the end, not the length)."""
        end = self.ends.get(int(stream.get("index", -1)))
        if end is not None and _seconds(stream.get("duration")) is None:
            return max(0.0, end - self.start(stream))
        return stream_duration(stream, self.format) or 0.0

    def start(self, stream: dict[str, Any]) -> float:
        return _seconds(stream.get("start_time")) or 0.0


def probe_output(path: Path, run: Callable[..., Any], scratch: Path, span: bool = False) -> OutputFacts:
    """Count the packets of every stream of an encoded file (``run`` is the segment's runner).

    One read of the file gives the container, its streams with their packets counted, and
    every packet's time (ffprobe's compact writer, whose packet lines stay small for a
    long movie). With ``span``, also the time from the first video frame to the last one
    (for variable frame rates, where the last frame's duration is only a guess).
    """
    report = scratch / f"probe-{path.stem}-{os.getpid()}.txt"
    try:
        run([FFPROBE, "-hide_banner", "-v", "error", "-count_packets", "-show_format", "-show_streams",
             "-show_entries", "packet=stream_index,pts_time,duration_time", "-of", "compact", "-o", str(report),
             str(path)])
        lines = report.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        raise ProcessorError(f"cannot read what ffprobe said about {path.name}: {exc}") from None
    finally:
        report.unlink(missing_ok=True)
    container: dict[str, Any] = {}
    streams: list[dict[str, Any]] = []
    packets: list[list[str]] = []
    for line in lines:
        if line.startswith("packet|"):
            fields = dict(part.split("=", 1) for part in line.split("|")[1:4] if "=" in part)
            packets.append([fields.get("stream_index", ""), fields.get("pts_time", ""),
                            fields.get("duration_time", "")])
        elif line.startswith("stream|"):
            streams.append(_compact_section(line))
        elif line.startswith("format|"):
            container = _compact_section(line)
    facts = OutputFacts(container, streams)
    video = facts.of_type("video")
    video_index = int(video[0]["index"]) if video else None
    times: list[float] = []
    for index_text, pts_text, duration_text in packets:
        if not index_text.isdigit() or _seconds(pts_text) is None:
            continue
        index, pts = int(index_text), float(pts_text)
        facts.ends[index] = max(facts.ends.get(index, pts), pts + (_seconds(duration_text) or 0.0))
        if index == video_index:
            times.append(pts)
    if span and video:
        facts.video_span = max(times) - min(times) if times else 0.0
    return facts


_COMPACT_FIELD = re.compile(r"((?:\\.|[^|\\])*)(?:\||$)")
_COMPACT_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "b": "\b", "f": "\f"}


def _compact_section(line: str) -> dict[str, Any]:
    """One ``stream|...`` or ``format|...`` line of ffprobe's compact writer as ffprobe's JSON
    would hold it: ``tag:NAME`` under ``tags``, ``disposition:NAME`` under ``disposition``.
    Values stay text; ``N/A`` ones are left out. What follows a nested section's name (side
    data) is not the stream's."""
    fields = [m.group(1) for m in _COMPACT_FIELD.finditer(line)][1:]
    section: dict[str, Any] = {}
    for text in fields:
        if "=" not in text:
            if text:  # a nested section starts: its keys are not the stream's
                break
            continue
        key, value = text.split("=", 1)
        if value == "N/A":  # ffprobe's JSON leaves such a field out
            continue
        value = re.sub(r"\\(.)", lambda m: _COMPACT_ESCAPES.get(m.group(1), m.group(1)), value)
        group, _, name = key.partition(":")
        if name and group in ("tag", "disposition"):
            section.setdefault("tags" if group == "tag" else "disposition", {})[name] = value
        else:
            section[key] = value
    return section
