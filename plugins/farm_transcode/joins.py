"""Joins as good as one encode: each segment's encoder overlaps its neighbours.

An encoder that starts or ends with its input treats those frames as the start or end of
the movie: x264's rate control starts cold and its lookahead and macroblock-tree see no
future for the last frames. Measured with ``benchmarks/joins.py`` (docs/FIDELITY.md),
the frame before a cut came out up to 2.4 dB below the same frame of a single encode,
and on clean pictures the keyframe after it 2.7-2.9 dB below.

So a segment's encoder starts ``lead`` frames before the segment and runs ``tail`` frames
past its end (half a keyframe interval each), with keyframes forced on the segment's first
frame and on the first frame past its end; x264's GOPs are closed, so the frames between
those keyframes reference nothing outside them, and a stream copy from the first keyframe,
``count`` frames long, keeps exactly the segment's frames, as encoded with their context.
Measured the same way: before a cut at worst 0.16 dB (720p with grain) / -0.87 dB (clean
320x240) below the single encode, the keyframe after it at worst -1.83 / +0.18 dB; size
1.049 / 1.003 of the single encode's. The price: each inner segment encodes one keyframe
interval more than it keeps (10 s segments with 2 s keyframes: a fifth more work).

Only for encoders where this was measured and holds (x264 with closed GOPs); the others'
segments do not overlap.

The wider encode is written to a QuickTime file whatever the output's container: the cut
back is a seek, which the mov demuxer makes by presentation time onto the keyframe at or
before the point. For demuxers that cannot (Matroska among them), ffmpeg aims 3/23 s
earlier when the stream has B-frames, so in a Matroska piece whose lead is shorter than
that (12 frames at 25 fps) the seek landed on the piece's first frame and kept the lead
instead of the segment.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Any

#: Encoders whose segments are given a tail (a forced keyframe there closes the GOP).
OVERLAPPED_ENCODERS = {"libx264"}
#: The muxer of the wider encode, which is cut back by seeking onto a keyframe (see above).
OVERLAPPED_MUXER = "mov"


def overlapped(params: dict[str, Any]) -> bool:
    """Whether a segment's encoder runs wider than the segment."""
    return bool(params.get("lead") or params.get("tail"))


def overlap(codec: str, params: dict[str, Any], first: int, end: int, total: int, gop: int | None,
            rate: float) -> tuple[int, int]:
    """(lead, tail): how many frames before ``first`` and after ``end`` (exclusive, from 0)
    a segment's encoder also encodes: half a keyframe interval each (half a second without
    one), none before the first segment or after the last."""
    if codec not in OVERLAPPED_ENCODERS or str(params.get("open-gop", "0")) not in ("0", "false"):
        return 0, 0
    wanted = max(1, (gop or round(rate)) // 2)
    return min(wanted, first), max(0, min(wanted, total - end))


def encoder_options(lead: int, count: int, tail: int) -> dict[str, Any]:
    """Output options of an overlapped segment's encode: all its frames, keyframes where the
    segment's own frames start and where they end."""
    if not (lead or tail):
        return {}
    keys = "+".join(f"eq(n,{n})" for n in (lead, lead + count) if n and (n == lead or tail))
    return {"frames:v": lead + count + tail, **({"force_key_frames": f"expr:{keys}"} if keys else {})}


def keep(ffmpeg: str, encoded: Path, out: Path, lead: int, count: int, rate: Fraction, muxer: str,
         timescale: int | None, global_args: tuple[str, ...]) -> list[str]:
    """Keep the segment's own ``count`` frames of ``encoded`` (stream copy): reading starts at
    its keyframe at ``lead`` (a seek lands on the keyframe at or before the point, so the
    point is a microsecond past it, less than any time base's tick), and stops after ``count``."""
    argv = [ffmpeg, *global_args, "-protocol_whitelist", "file"]
    if lead:
        argv += ["-ss", f"{float(lead / rate) + 1e-6:.6f}"]
    argv += ["-i", str(encoded), "-map", "0:v:0", "-c", "copy", "-frames:v", str(count), "-map_metadata", "-1"]
    if timescale:
        argv += ["-video_track_timescale", str(timescale)]
    return [*argv, "-f", muxer, "-y", str(out)]
