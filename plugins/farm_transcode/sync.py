"""When the sound plays against the picture: an output's audio compared with its source's.

A container's ``start_time`` does not tell when a track's first sound plays: an encoder's
priming (AAC's 1024 samples, Opus's pre-skip, LAME's delay) is played or skipped
depending on what the container says about it, and a mistake moves every sample by
6.5-23 ms while ``start_time`` looks right. So both files are decoded as a player does
(their own timestamps, edit lists and skips applied), placed against their first video
frame, and the output's sound is matched with the source's by cross-correlation over a
62.5 ms around its first loud sample.
"""

from __future__ import annotations

import array
import itertools
import operator
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

RATE = 8000  # samples a second compared: 0.125 ms steps
WINDOW = RATE // 16  # 62.5 ms: the sound's first edge weighs in it
REACH = RATE * 40 // 1000  # lags searched either way: 40 ms, beyond any encoder's delay
SECONDS = 30.0  # how much of the audio is read to find a passage that is not silent
MATCH = 0.8  # the least correlation (1: the same waveform) at which the sounds are the same passage
UNIQUE = 0.98  # a match elsewhere this close to the best one makes the lag unknown
LOUD = 1000  # a sample this loud (16-bit, about -30 dBFS) starts the passage compared

_FIRST_PTS = re.compile(r"\bn:\s*0\s+pts:\s*-?\d+\s+pts_time:(-?[\d.]+)")


def _decoded(path: Path, demuxer: str | None, track: str, run: Callable[..., Any], scratch: Path,
             ffmpeg: str, name: str) -> tuple[float, array.array] | None:
    """The track's first ``SECONDS`` as mono samples, and the time of the first one
    against the first video frame; None when either cannot be read."""
    raw = scratch / f"sync-{name}.s16"
    argv = [ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "info", "-copyts"]
    if demuxer:
        argv += ["-f", demuxer]
    argv += ["-protocol_whitelist", "file", "-i", str(path),
             "-map", f"0:{track}", "-af", f"aresample={RATE},ashowinfo", "-ac", "1", "-t", f"{SECONDS:g}",
             "-f", "s16le", "-y", str(raw),
             "-map", "0:v:0", "-vf", "showinfo", "-frames:v", "1", "-f", "null", "-"]
    said: list[str] = []
    try:
        result = run(argv, on_line=said.append, check=False)
        if getattr(result, "exit_status", 1) != 0:
            return None
        text = "\n".join(said)
        firsts = _FIRST_PTS.findall(text)
        audio_line = next((line for line in said if "Parsed_ashowinfo" in line and _FIRST_PTS.search(line)), None)
        video_line = next((line for line in said if "Parsed_showinfo" in line and _FIRST_PTS.search(line)), None)
        if not firsts or audio_line is None or video_line is None:
            return None
        audio_start = float(_FIRST_PTS.search(audio_line).group(1))  # type: ignore[union-attr]
        video_start = float(_FIRST_PTS.search(video_line).group(1))  # type: ignore[union-attr]
        data = raw.read_bytes()
        samples = array.array("h")
        samples.frombytes(data[: len(data) // 2 * 2])
        return audio_start - video_start, samples
    except OSError:
        return None
    finally:
        raw.unlink(missing_ok=True)


def _loud_passage(samples: array.array) -> int | None:
    """Where to compare: a window around the first loud sample, so that it holds the
    sound's first edge (a steady tone alone would match at every period). Before the
    first sample counts as silence."""
    first = next((i for i, v in enumerate(samples) if abs(v) > LOUD), None)
    return None if first is None else first - WINDOW // 2


def _piece(samples: array.array, begin: int) -> list[int]:
    """``WINDOW`` samples from ``begin``, silence outside the track."""
    return _piece_of(samples, begin, WINDOW)


def _piece_of(samples: array.array, begin: int, length: int) -> list[int]:
    """``length`` samples from ``begin``, silence outside the track."""
    before = min(length, max(0, -begin))
    after = min(length - before, max(0, begin + length - len(samples)))
    return [0] * before + list(samples[max(0, begin):max(0, begin + length)]) + [0] * after


def decode_source(source: Path, source_demuxer: str | None, source_stream: int, run: Callable[..., Any],
                  scratch: Path, ffmpeg: str, kept: dict[str, Any]) -> None:
    """Decode the source's sound into ``kept`` for :func:`lag`, ahead of the output it is
    compared with (while that output is being made)."""
    key = f"{source}|{source_stream}"
    if key not in kept:
        kept[key] = _decoded(source, source_demuxer, str(source_stream), run, scratch, ffmpeg, "source")


def lag(source: Path, source_demuxer: str | None, source_stream: int, output: Path, output_track: int,
        run: Callable[..., Any], scratch: Path, ffmpeg: str = "ffmpeg",
        kept: dict[str, Any] | None = None) -> float | None:
    """Seconds the output's audio track ``output_track`` (counting audio tracks from 0)
    plays later than the source's stream ``source_stream`` (negative: earlier), both
    against their first picture; None when it cannot be told (silence, no video, sound
    too unlike the source's, or matching equally well at other lags, as a steady tone does).

    ``kept``: a dict that keeps the source's decoded sound between calls (an output
    joined again is measured against the same source without decoding it again)."""
    key = f"{source}|{source_stream}"
    if kept is not None and key in kept:
        theirs = kept[key]
    else:
        theirs = _decoded(source, source_demuxer, str(source_stream), run, scratch, ffmpeg, "source")
        if kept is not None:
            kept[key] = theirs
    ours = _decoded(output, None, f"a:{output_track}", run, scratch, ffmpeg, "output")
    if theirs is None or ours is None:
        return None
    (source_start, a), (output_start, b) = theirs, ours
    at = _loud_passage(a)
    if at is None:
        return None
    # Where the same moment lies in the output's samples, if it plays on time.
    expected = at + round((source_start - output_start) * RATE)
    window = _piece(a, at)
    reference = sum(x * x for x in window) ** 0.5
    # Every shift's piece of the output lies in one stretch; its running sum of squares
    # gives each piece's energy without adding it up again (exact: integers).
    stretch = _piece_of(b, expected - REACH, 2 * REACH + WINDOW)
    squares = [0, *itertools.accumulate(y * y for y in stretch)]
    scores: dict[int, float] = {}
    for shift in range(-REACH, REACH + 1):
        begin = shift + REACH
        # Normalised: a shift that brings more of a steady sound into the window must not win.
        energy = squares[begin + WINDOW] - squares[begin]
        dot = sum(map(operator.mul, window, stretch[begin:begin + WINDOW]))
        scores[shift] = dot / energy ** 0.5 / reference if energy else 0.0
    if not reference:
        return None
    best = max(scores, key=lambda shift: scores[shift])
    others = max((score for shift, score in scores.items() if abs(shift - best) > RATE // 1000), default=0.0)
    if scores[best] < MATCH or others > scores[best] * UNIQUE:
        return None
    return best / RATE
