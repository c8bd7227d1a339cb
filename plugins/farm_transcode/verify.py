"""Checking an assembled output against what the source and the plan promise.

Figures, not opinions: the frame count equals the source's (or what a frame-rate
change implies), the video lasts as long as the source's within one frame, every kept
audio track lasts as long as its source within 50 ms, and the sound plays where it
played against the picture, within a millisecond (measured by decoding both, see sync.py).
The picture is what the plan promised (policy.py): its bit depth, chroma and alpha, and
its fields (progressive, or the source's order when they are kept). Every failed check is
one phrase with its figures.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from farm_transcode.probe import OutputFacts
from farm_transcode.settings import describe_pix_fmt

AUDIO_TOLERANCE = 0.05  # seconds
#: How far the sound may play from the source's timing against the picture: an encoder's
#: delay handled wrongly moves it 6.5 ms (Opus) to 23 ms (MP3), a lossy codec's smear well
#: under this.
SYNC_TOLERANCE = 0.0011
#: ffprobe's field orders (coded, then displayed) by the field shown first; "progressive"
#: is none, and a file that says nothing ("unknown", or no field_order) flags none.
SHOWN_FIRST = {"tt": "tff", "bt": "tff", "bb": "bff", "tb": "bff"}
_FIELD_WORDS = {"tff": "top field first", "bff": "bottom field first", None: "progressive"}


@dataclass
class Expected:
    video_frames: int | None  # None: no video
    video_duration: float = 0.0
    frame_duration: float = 0.0  # one frame, the tolerance on durations and offsets
    video_codec: str | None = None
    video_span: float | None = None  # variable frame rate: first to last frame, instead of the duration
    audio_durations: list[float] = field(default_factory=list)  # one per kept track, from the source
    audio_codec: str | None = None  # None: any (copy)
    av_offset: float = 0.0  # source audio start - source video start
    pix_fmt: str | None = None  # the planned pixel format; None: not checked
    fields: str | None = None  # "tff"/"bff": fields kept; None: progressive
    check_fields: bool = False  # whether the plan decided the fields (policy.Picture)


def problems(found: OutputFacts, expected: Expected) -> list[str]:
    """What is wrong with ``found``, each with its figures; empty when it is right."""
    wrong: list[str] = []
    videos, audios = found.of_type("video"), found.of_type("audio")
    video = videos[0] if videos else None
    video_length = found.duration(video) if video is not None else 0.0
    if expected.video_frames is None:
        if videos:
            wrong.append(f"it has {len(videos)} video stream(s), expected none")
    elif video is None:
        wrong.append("it has no video stream")
    else:
        frames = found.frames(video)
        if frames != expected.video_frames:
            wrong.append(f"video has {frames} frames, expected {expected.video_frames}")
        duration = found.duration(video)
        slack = expected.frame_duration + 0.0015  # Matroska keeps milliseconds
        if expected.video_span is not None and found.video_span is not None:
            # The last frame's duration of a variable rate is a guess; judge its timing by the span.
            video_length = found.video_span + (expected.video_duration - expected.video_span)
            if abs(found.video_span - expected.video_span) > 0.0015 + expected.frame_duration / 2:
                wrong.append(f"video runs {found.video_span:.3f} s from its first frame to its last, the source "
                             f"{expected.video_span:.3f} s")
        elif abs(duration - expected.video_duration) > slack:
            wrong.append(f"video lasts {duration:.3f} s, expected {expected.video_duration:.3f} s "
                         f"(± {expected.frame_duration:.3f} s, one frame)")
        codec = video.get("codec_name")
        if expected.video_codec and codec != expected.video_codec:
            wrong.append(f"video is {codec}, expected {expected.video_codec}")
        wrong += _picture_problems(video, expected)
    if len(audios) != len(expected.audio_durations):
        wrong.append(f"it has {len(audios)} audio track(s), expected {len(expected.audio_durations)}")
    for number, (stream, wanted) in enumerate(zip(audios, expected.audio_durations), start=1):
        duration = found.duration(stream)
        if abs(duration - wanted) > AUDIO_TOLERANCE:
            wrong.append(f"audio track {number} lasts {duration:.3f} s, expected {wanted:.3f} s "
                         f"(± {AUDIO_TOLERANCE * 1000:.0f} ms)")
        codec = stream.get("codec_name")
        if expected.audio_codec and codec != expected.audio_codec:
            wrong.append(f"audio track {number} is {codec}, expected {expected.audio_codec}")
        if video is not None and expected.video_frames is not None:
            gap, wanted_gap = duration - video_length, wanted - expected.video_duration
            if abs(gap - wanted_gap) > AUDIO_TOLERANCE:
                wrong.append(f"audio track {number} lasts {gap * 1000:+.0f} ms against the video, the source's "
                             f"{wanted_gap * 1000:+.0f} ms (± {AUDIO_TOLERANCE * 1000:.0f} ms)")
            if number == 1 and found.audio_lag is not None and abs(found.audio_lag) > SYNC_TOLERANCE:
                wrong.append(f"audio track 1 plays {abs(found.audio_lag) * 1000:.1f} ms "
                             f"{'later' if found.audio_lag > 0 else 'earlier'} against the picture than in the "
                             f"source (± {SYNC_TOLERANCE * 1000:.0f} ms)")
            offset = found.start(stream) - found.start(video)
            # An encoder's priming played before the first sample moves the start, not the
            # sound: up to 2048 samples (AAC 1024, LAME 1105, AC-3 256, Opus 312).
            priming = 2048 / float(stream.get("sample_rate") or 48000)
            slack = max(expected.frame_duration, 0.001) + 0.0015 + priming
            if found.audio_lag is None and abs(offset - expected.av_offset) > slack:
                wrong.append(f"audio track {number} starts {offset * 1000:+.1f} ms from the video, "
                             f"expected {expected.av_offset * 1000:+.1f} ms (± one frame and the encoder's "
                             "priming)")
    return wrong


def _picture_problems(video: dict, expected: Expected) -> list[str]:
    """The picture against the plan: a decoder may hand out more bits than were coded
    (ProRes 4444 decodes as 12-bit), never fewer, and the same chroma and alpha."""
    wrong: list[str] = []
    found_fmt = video.get("pix_fmt")
    promised, found = describe_pix_fmt(expected.pix_fmt), describe_pix_fmt(found_fmt)
    if promised is not None and (found is None or found[0] < promised[0] or found[1:] != promised[1:]):
        wrong.append(f"video is {found_fmt or 'of an unknown pixel format'}, the plan promised {expected.pix_fmt}")
    if expected.check_fields:
        order = video.get("field_order")
        shown = SHOWN_FIRST.get(order or "")
        if shown != expected.fields:
            said = f"flagged {order} ({_FIELD_WORDS[shown]})" if shown else \
                "flagged progressive" if order == "progressive" else "not flagged interlaced"
            wrong.append(f"video is {said}, the plan promised {_FIELD_WORDS[expected.fields]}")
    return wrong
