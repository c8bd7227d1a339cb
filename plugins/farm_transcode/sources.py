"""Kinds of source that are not one movie file: image sequences.

An image sequence (PNG, TIFF, DPX, OpenEXR, JPEG) is submitted by its first frame,
``shot_0001.png``; its frames are the files beside it numbered on from there
(``shot_0002.png``, ...), with nothing skipped. It has no clock of its own, so its frame
rate comes from the profile (``video.fps``, else 25 fps, and the plan says so).

ffmpeg reads it with the ``image2`` demuxer, which Farm otherwise refuses (a pattern can
name any file). Here the pattern is built by Farm from the first frame's own name, only
numbers are substituted (``-pattern_type sequence``, no globbing) and every ``%`` in the
rest of the path is escaped, so it names only that sequence's frames.
"""

from __future__ import annotations

import json
import re
from fractions import Fraction
from pathlib import Path
from typing import Any

from farm.errors import PlanError

from farm_transcode.probe import SourceFacts, VideoFacts, _ffprobe, last_error, probe_source

IMAGE_EXTENSIONS = {".png", ".tif", ".tiff", ".dpx", ".exr", ".jpg", ".jpeg"}
SEQUENCE_DEMUXER = "image2"
DEFAULT_RATE = Fraction(25)
#: The number at the end of a frame's stem: ``shot_0001`` -> ``shot_``, ``0001``.
_NUMBERED = re.compile(r"^(.*?)(\d+)$")


def _parts(path: Path) -> tuple[str, str, str] | None:
    """(prefix, number, extension) of a numbered image's name, or None."""
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return None
    match = _NUMBERED.match(path.stem)
    return (match.group(1), match.group(2), path.suffix) if match else None


def is_sequence(path: Path) -> bool:
    return _parts(Path(path)) is not None


def sequence_group(path: Path) -> tuple[str, int] | None:
    """A dropped frame's sequence (its folder, the name before the number, the extension)
    and its number; None for a file that is not a numbered image."""
    parts = _parts(Path(path))
    if parts is None:
        return None
    prefix, number, ext = parts
    return f"{Path(path).parent}/{prefix}#{ext.lower()}", int(number)


def frame_name(prefix: str, number: int, digits: int, ext: str) -> str:
    return f"{prefix}{number:0{digits}d}{ext}"


def pattern(first: Path) -> str:
    """The image2 pattern naming ``first``'s sequence: ``/a/100%% b/shot_%04d.png``."""
    prefix, number, ext = _parts(Path(first)) or ("", "", "")
    digits = len(number) if number.startswith("0") else 1
    folder = str(Path(first).parent).replace("%", "%%")
    return f"{folder}/{prefix.replace('%', '%%')}%0{digits}d{ext.replace('%', '%%')}"


def count_frames(first: Path) -> int:
    """How many frames follow on from ``first`` without a gap; a gap is refused, naming the missing frame."""
    prefix, number, ext = _parts(first) or ("", "0", "")
    digits = len(number) if number.startswith("0") else 1
    start = int(number)
    folder = first.parent
    count = 0
    while (folder / frame_name(prefix, start + count, digits, ext)).is_file():
        count += 1
    later = []
    for sibling in folder.iterdir():
        parts = _parts(sibling)
        if parts and parts[0] == prefix and parts[2] == ext and int(parts[1]) > start + count:
            later.append(int(parts[1]))
    if later:
        missing = frame_name(prefix, start + count, digits, ext)
        raise PlanError(f"the image sequence {first.name} stops at frame {start + count - 1}: {missing} is missing, "
                        f"but frames from {min(later)} on exist; fill the gap or submit the frames after it separately")
    return count


def probe_sequence(first: Path, rate: Fraction | None) -> SourceFacts:
    """A sequence's facts, as ffmpeg will read it with ``input_options``: every frame a keyframe,
    frame N at N/rate seconds."""
    rate = rate or DEFAULT_RATE
    count = count_frames(first)
    options = {"framerate": f"{rate.numerator}/{rate.denominator}", "start_number": str(int(_parts(first)[1])),
               "pattern_type": "sequence"}
    args = ["-v", "error", "-f", SEQUENCE_DEMUXER, "-protocol_whitelist", "file"]
    for key, value in options.items():
        args += [f"-{key}", value]
    proc = _ffprobe([*args, "-count_packets", "-show_streams", "-of", "json", "-i", pattern(first)])
    try:
        streams = json.loads(proc.stdout or "{}").get("streams") or []
    except json.JSONDecodeError:
        streams = []
    if proc.returncode != 0 or not streams:
        raise PlanError(f"ffprobe cannot read the image sequence {first.name}: {last_error(proc.stderr, first)}")
    stream = streams[0]
    readable = int(stream.get("nb_read_packets") or 0)
    if readable != count:
        raise PlanError(f"the image sequence {first.name} has {count} frames, but ffmpeg reads {readable} of them")
    tb = 1 / rate
    video = VideoFacts(index=0, codec=str(stream.get("codec_name", "?")), width=int(stream.get("width") or 0),
                       height=int(stream.get("height") or 0), time_base=f"{tb.numerator}/{tb.denominator}",
                       rate=f"{rate.numerator}/{rate.denominator}", vfr=False, frames=count, start_pts=0,
                       last_pts=count - 1, end_pts=count, duration=float(count / rate), pts=list(range(count)),
                       keyframes=list(range(count)))
    if not (video.width and video.height):
        raise PlanError(f"{first.name}: ffprobe gives no picture size for it")
    return SourceFacts(path=str(first), demuxer=SEQUENCE_DEMUXER, start=0.0, duration=video.duration, video=video,
                       audio=[], subtitles=[], input_options=options)


#: Facts probed ahead (``farm run`` plans once while its cluster starts), each taken by the
#: next plan of the same file as it is now; a few at most, never kept past that plan.
_AHEAD: dict[tuple[Any, ...], SourceFacts] = {}
_AHEAD_MOST = 16


def probe(path: Path, fps: str | None, ahead: bool = False, picture: bool = True) -> SourceFacts:
    """What planning needs to know about any source: an image sequence or a movie file.

    ``ahead``: keep the facts for the next plan of this file, as long as the file does not
    change meanwhile (its size, mtime and inode); that plan probes nothing. ``picture``:
    False for a job that makes no video, whose plan needs no decoded frame."""
    key = _stamp(path, fps, picture)
    if key is not None and not ahead and key in _AHEAD:
        return _AHEAD.pop(key)
    facts = probe_sequence(path, Fraction(fps) if fps else None) if is_sequence(path) else \
        probe_source(path, picture)
    if ahead and key is not None:
        while len(_AHEAD) >= _AHEAD_MOST:
            _AHEAD.pop(next(iter(_AHEAD)))
        _AHEAD[key] = facts
    return facts


def _stamp(path: Path, fps: str | None, picture: bool) -> tuple[Any, ...] | None:
    if is_sequence(path):  # its other frames are not in the first one's stamp
        return None
    try:
        info = path.stat()
    except OSError:
        return None
    return (str(path), fps, picture, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


def input_for(facts: SourceFacts) -> tuple[str, dict[str, Any]]:
    """The path ffmpeg opens for a source, and the demuxer's options for it."""
    if facts.demuxer == SEQUENCE_DEMUXER:
        return pattern(Path(facts.path)), dict(facts.input_options)
    return facts.path, {}


def reads(facts: SourceFacts) -> list[Path]:
    """What a segment reads besides the submitted file: an image sequence's folder."""
    return [Path(facts.path).parent] if facts.demuxer == SEQUENCE_DEMUXER else []


def note(facts: SourceFacts, fps: str | None) -> str:
    """What a plan says about a source of this kind ('' for a movie)."""
    if facts.demuxer != SEQUENCE_DEMUXER or facts.video is None:
        return ""
    given = "" if fps else " (video.fps not set)"
    return f"image sequence of {facts.video.frames} frames at {float(facts.video.fps):g} fps{given}"
