"""Frame-range and chunk arithmetic: small, pure, and property-tested.

A frame spec is a comma-separated list of items, each a frame (``7``), a range
(``1-240``) or a stepped range (``1-240x2``). Frames are kept in ascending order
without duplicates.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from farm.errors import FarmError

_ITEM = re.compile(r"^\s*(-?\d+)\s*(?:-\s*(-?\d+)\s*(?:x\s*(-?\d+)\s*)?)?$")


class FrameRangeError(FarmError):
    """A frame spec that does not parse or makes no sense."""


def _items(spec: str | int) -> tuple[str, list[tuple[int, int, int]]]:
    """The spec's text and its items as (first, last, step), checked but not expanded."""
    if isinstance(spec, bool):
        raise FrameRangeError(f"frame range {spec!r}: expected frames such as 1-240, 1-240x2 or 1,5,10-20")
    if isinstance(spec, int):
        return str(spec), [(spec, spec, 1)]
    text = str(spec).strip()
    if not text:
        raise FrameRangeError("frame range is empty: expected frames such as 1-240, 1-240x2 or 1,5,10-20")
    shown = text if len(text) <= 60 else f"{text[:40]}...({len(text)} characters)"
    items = []
    for item in text.split(","):
        match = _ITEM.match(item)
        if not match:
            part = item.strip()
            part = part if len(part) <= 40 else f"{part[:30]}..."
            raise FrameRangeError(f"frame range {shown!r}: cannot read {part!r}; expected N, A-B or A-BxSTEP")
        try:
            first, last, by = (int(g) if g is not None else None for g in match.groups())
        except ValueError:  # more digits than Python turns into a number
            raise FrameRangeError(f"frame range {shown!r}: a frame number has too many digits") from None
        last = first if last is None else last
        by = 1 if by is None else by
        if last < first:
            raise FrameRangeError(f"frame range {shown!r}: end {last} is before start {first}")
        if by <= 0:
            raise FrameRangeError(f"frame range {shown!r}: step {by} must be a positive number")
        items.append((first, last, by))
    return shown, items


def count_frames(spec: str | int) -> int:
    """How many frames a spec names, counted item by item (a frame named twice counts
    twice) without building any list: a range of a billion frames costs nothing here."""
    _, items = _items(spec)
    return sum((last - first) // by + 1 for first, last, by in items)


def parse_frames(spec: str | int) -> list[int]:
    """Turn ``"1-10,20,30-40x5"`` into a sorted list of unique frame numbers. Check
    :func:`count_frames` first where the spec comes from outside: the list is built here."""
    _, items = _items(spec)
    frames: set[int] = set()
    for first, last, by in items:
        frames.update(range(first, last + 1, by))
    return sorted(frames)


def chunk_frames(frames: Sequence[int], size: int) -> list[list[int]]:
    """Cut frames, in order, into consecutive chunks of at most ``size`` frames."""
    if size <= 0:
        raise FrameRangeError(f"segment size {size} must be at least 1 frame")
    return [list(frames[i : i + size]) for i in range(0, len(frames), size)]


def format_frames(frames: Iterable[int]) -> str:
    """The shortest spec in this syntax for frames (the inverse of :func:`parse_frames`)."""
    ordered = sorted(set(frames))
    parts: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        if i + 1 < len(ordered):
            step = ordered[i + 1] - ordered[i]
            while j + 1 < len(ordered) and ordered[j + 1] - ordered[j] == step:
                j += 1
        else:
            step = 1
        count = j - i + 1
        if count >= 3 or (count == 2 and step == 1):
            suffix = "" if step == 1 else f"x{step}"
            parts.append(f"{ordered[i]}-{ordered[j]}{suffix}")
            i = j + 1
        else:
            parts.append(str(ordered[i]))
            i += 1
    return ",".join(parts)
