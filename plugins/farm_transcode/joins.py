"""Joins as good as one encode: each segment's encoder runs on past the segment's end.

An encoder that reaches the end of its input treats the last frames as the end of the
movie: x264's lookahead and macroblock-tree see no future for them and spend fewer bits
there. Measured on a 10 s 720p source cut every 2 s (docs/FIDELITY.md, ``benchmarks/joins.py``),
the frame before a cut came out up to 2.4 dB below the same frame of a single encode.

So a segment is encoded with ``tail`` more frames than it keeps (half a keyframe interval,
at most the frames that follow it), with a keyframe forced on its first frame past the
end; the frames before that keyframe reference nothing after it (x264's GOPs are closed),
so keeping the first ``count`` packets by stream copy keeps exactly the segment's frames.
The same measurement with the tail: no frame before a cut more than 0.2 dB below the
single encode, the keyframe after it never below, the size within 1.4% of it.

Only for encoders where this was measured and holds (x264 with closed GOPs); others get
no tail.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Any

#: Encoders whose segments are given a tail (a forced keyframe there closes the GOP).
OVERLAPPED_ENCODERS = {"libx264"}


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
