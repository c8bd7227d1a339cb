"""Cutting a movie into segments: pure arithmetic on frame numbers, no ffmpeg.

Frames are numbered from 0 in presentation order. A cut is the number of the first
frame of a segment; segments are about the same size, and a cut moves to a multiple
of the profile's keyframe interval when it has one (so keyframes fall where a
single-process encode puts them), or else to a nearby keyframe of the source (so the
node seeks straight to it).
"""

from __future__ import annotations

import bisect
import math
from fractions import Fraction


def cut_points(frames: int, size: int, gop: int | None = None, keyframes: list[int] | None = None) -> list[int]:
    """First frames of every segment, always starting with 0.

    ``size`` is the wanted frames per segment; a movie shorter than two segments is one.
    """
    if frames <= 0:
        return []
    if gop:
        size = max(gop, round(size / gop) * gop)
    size = max(1, size)
    if frames < 2 * size:
        return [0]
    count = max(1, round(frames / size))
    cuts = [0]
    for index in range(1, count):
        ideal = round(index * frames / count)
        if gop:
            cut = round(ideal / gop) * gop
        else:
            cut = _near_keyframe(ideal, keyframes or [], max(1, size // 8))
        if cuts[-1] < cut < frames:
            cuts.append(cut)
    return cuts


def _near_keyframe(ideal: int, keyframes: list[int], reach: int) -> int:
    """The source keyframe nearest to ``ideal`` if one is within ``reach`` frames, else ``ideal``."""
    at = bisect.bisect_left(keyframes, ideal)
    near = [k for k in keyframes[max(0, at - 1): at + 1] if abs(k - ideal) <= reach]
    return min(near, key=lambda k: abs(k - ideal)) if near else ideal


def ranges(cuts: list[int], frames: int) -> list[tuple[int, int]]:
    """``(first, count)`` for each segment."""
    ends = [*cuts[1:], frames]
    return [(start, end - start) for start, end in zip(cuts, ends)]


def timecode(seconds: float) -> str:
    """``01:02:03.040``"""
    millis = round(seconds * 1000)
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    return f"{hours:02d}:{minutes:02d}:{rest // 1000:02d}.{rest % 1000:03d}"


def frame_label(first: int, count: int, rate: Fraction, note: str = "") -> str:
    """How people see a video segment: ``frames 1-250 (00:00:00.000-00:00:10.000)``."""
    start, end = first / rate, (first + count) / rate
    extra = f", {note}" if note else ""
    return f"frames {first + 1}-{first + count} ({timecode(float(start))}-{timecode(float(end))}{extra})"


def output_frame(seconds: Fraction, rate: Fraction) -> int:
    """The frame of a constant ``rate`` that ffmpeg's ``fps`` filter puts a time on:
    the nearest one, halves away from zero."""
    scaled = seconds * rate
    return math.floor(scaled + Fraction(1, 2)) if scaled >= 0 else -math.floor(-scaled + Fraction(1, 2))
