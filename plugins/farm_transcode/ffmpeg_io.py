"""Every ffmpeg command line the transcode processor runs, built with ffmpeg-python.

This is the only module that imports ``ffmpeg`` (ffmpeg-python): it builds argv lists,
and the node's runner starts them (process group, cancellation, logs). Nothing here
starts a process. Every source is read with the demuxer that planning accepted
(``-f``) and only through the ``file`` protocol, so a file swapped for a playlist or a
concat list cannot make ffmpeg read other files.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Any

import ffmpeg

from farm_transcode import joins
from farm_transcode.policy import Picture
from farm_transcode.probe import SourceFacts
from farm_transcode.settings import (AudioSettings, Container, TranscodeSettings, VideoSettings, describe_pix_fmt,
                                     parse_rate)
from farm_transcode.sources import SEQUENCE_DEMUXER, input_for

FFMPEG = "ffmpeg"
_GLOBAL = ("-hide_banner", "-nostdin", "-nostats", "-loglevel", "warning", "-stats_period", "1",
           "-progress", "pipe:1")


class FrameCount:
    """The frames an ffmpeg run with ``_GLOBAL`` wrote into its first video output, from its
    ``-progress`` report: the last ``frame=``, given once more after the encoder is flushed.
    It equals ffprobe's packet count of the file, encoding or stream copying (see
    tests/test_transcode.py); 0 when it reported none."""

    def __init__(self) -> None:
        self.frames = 0

    def read(self, line: str) -> None:
        if line.startswith("frame=") and line[6:].strip().isdigit():
            self.frames = int(line[6:])


def _source(facts: SourceFacts, **options: Any) -> Any:
    path, demuxer_options = input_for(facts)
    return ffmpeg.input(path, f=facts.demuxer, protocol_whitelist="file", **demuxer_options, **options)


def _compile(node: Any) -> list[str]:
    return node.global_args(*_GLOBAL).compile(cmd=FFMPEG, overwrite_output=True)


def timescale(rate: Fraction) -> int:
    """An mp4/mov track timescale that holds every frame time of ``rate`` exactly."""
    num = rate.numerator
    return num * max(1, -(-10000 // num)) if num < 10000 else num


def _scale(video: VideoSettings, subsampled: bool) -> dict[str, Any] | None:
    """The scale filter's arguments: aspect kept, even sizes where chroma is subsampled."""
    step = 2 if subsampled else 1
    if video.width and video.height:
        return {"w": video.width, "h": video.height, "force_original_aspect_ratio": "decrease",
                "force_divisible_by": step}
    if video.height:
        return {"w": -step, "h": video.height}
    if video.width:
        return {"w": video.width, "h": -step}
    if subsampled:  # an odd-sized source (853x481) becomes the nearest even size
        return {"w": "trunc(iw/2)*2", "h": "trunc(ih/2)*2"}
    return None


def pix_fmt(video: VideoSettings) -> str:
    return video.pix_fmt or video.encoder.pix_fmt


#: PQ or HLG to SDR BT.709: linear light, BT.709 primaries, a tone curve, BT.709 transfer.
_TONEMAP = (("zscale", {"t": "linear", "npl": 100}), ("format", {"pix_fmts": "gbrpf32le"}), ("zscale", {"p": "bt709"}),
            ("tonemap", {"tonemap": "hable", "desat": 0}), ("zscale", {"t": "bt709", "m": "bt709", "r": "tv"}))


def _picture_filters(stream: Any, picture: Picture, video: VideoSettings) -> Any:
    """Tone-mapping, scaling and the pixel format, after the segment's frames are picked."""
    if picture.tonemap:
        for name, args in _TONEMAP:
            stream = stream.filter(name, **args)
    scale = _scale(video, subsampled=(describe_pix_fmt(picture.pix_fmt) or (8, 420))[1] != 444)
    if picture.fields:  # fields scaled and converted apart, never blended into each other
        stream = stream.filter("scale", **{**(scale or {}), "interl": 1})
        stream = stream.filter("format", pix_fmts=picture.pix_fmt)
        return stream.filter("setfield", picture.fields)
    if scale is not None:
        stream = stream.filter("scale", **scale)
    return stream


def _encoder_options(video: VideoSettings, threads: int, picture: Picture | None = None) -> dict[str, Any]:
    encoder = video.encoder
    options: dict[str, Any] = {"c:v": video.codec, "pix_fmt": picture.pix_fmt if picture else pix_fmt(video)}
    if picture is not None:
        options.update(picture.colour)
        if picture.fields:  # libx264: PAFF/MBAFF; ProRes: interlaced frames; the container says which field leads
            options.update({"flags": "+ildct+ilme" if video.codec in ("libx264", "mpeg2video") else "+ildct",
                            "field_order": "tt" if picture.fields == "tff" else "bb"})
    if video.crf is not None:
        options["crf"] = f"{video.crf:g}"
        if video.codec == "libvpx-vp9":
            options["b:v"] = "0"  # constant quality in libvpx needs a zero bitrate
    if video.bitrate is not None:
        options["b:v"] = video.bitrate
    if video.maxrate is not None:
        options["maxrate"], options["bufsize"] = video.maxrate, video.bufsize
    if video.preset is not None:
        options["preset"] = video.preset
    if video.speed is not None and encoder.speed_option:
        options[encoder.speed_option] = video.speed
    if video.profile is not None:
        options["profile:v"] = video.profile
    if video.tune is not None:
        options["tune"] = video.tune
    params = {**(picture.params if picture else {}), **{key: str(value) for key, value in video.params.items()}}
    if video.codec == "libx265":
        params.setdefault("pools", str(threads))
        params.setdefault("log-level", "warning")
    elif video.codec == "libsvtav1":
        params.setdefault("lp", str(threads))
    else:
        options["threads"] = threads
    if video.codec in ("libvpx-vp9", "libaom-av1"):
        options["row-mt"] = 1
    if params and encoder.params_option:
        options[encoder.params_option] = ":".join(f"{key}={value}" for key, value in params.items())
    return options


#: Pictures whose first frame the encoding process also writes as the segment's poster
#: (8-bit, no alpha: what the JPEG encoder takes as it is); others get one made afterwards.
POSTER_PIX_FMTS = frozenset({"yuv420p", "yuv422p", "yuv444p", "yuvj420p", "yuvj422p", "yuvj444p", "nv12"})


def video_segment(facts: SourceFacts, settings: TranscodeSettings, params: dict[str, Any], out: Path,
                  threads: int, passlog: Path | None = None, pass_number: int | None = None,
                  poster: tuple[Path, int] | None = None) -> list[str]:
    """Encode one segment's frames, video only, into ``out`` (see the processor's docs for the modes).

    ``poster``: (a JPEG, the most pixels wide) that the same process also writes from the
    segment's first frame, so that no second process decodes the piece for its preview."""
    video = settings.video
    assert video is not None and facts.video is not None
    mode = params["mode"]
    rate = parse_rate(params["rate"])
    # The source's own timestamps throughout (-copyts): trim compares them with the ones
    # planning read. Seeking is only a shortcut to a keyframe before the segment.
    input_options: dict[str, Any] = {"threads": threads}
    if mode != "straight":  # straight: ffmpeg's own timing, which mends timestamps that start again
        input_options["copyts"] = None
    if params.get("seek"):
        input_options.update(ss=f"{params['seek']:.6f}", noaccurate_seek=None)
    stream = _source(facts, **input_options)[str(facts.video.index)]
    picture = Picture.from_params(params["picture"]) if params.get("picture") else None
    if picture is not None and picture.deinterlace:  # before the frames are picked: bwdif looks at neighbours
        stream = stream.filter("bwdif", mode="send_frame", parity=picture.deinterlace, deint="all")
        stream = stream.filter("settb", facts.video.time_base)  # bwdif halves it; trim counts in the source's
    if mode == "rate":  # a new constant rate: frames picked on the output's own grid
        if params.get("shift"):  # the container's start, as ffmpeg counts time without -copyts
            stream = stream.filter("setpts", f"PTS-{params['shift']:.6f}/TB")
        stream = stream.filter("fps", fps=params["rate"])
    trim = {key: params[name] for key, name in (("start_pts", "start_pts"), ("end_pts", "end_pts"))
            if params.get(name) is not None}
    for key in ("start_pts", "end_pts"):  # an overlapped segment's encoder runs wider (joins.py)
        if f"run_{key}" in params:
            trim.pop(key, None)
            if params[f"run_{key}"] is not None:
                trim[key] = params[f"run_{key}"]
    if trim:
        stream = stream.filter("trim", **trim)
    stream = stream.filter("setpts", "PTS-STARTPTS")
    if picture is not None:
        stream = _picture_filters(stream, picture, video)
    else:  # planned before the picture was decided
        scale = _scale(video, subsampled=pix_fmt(video).startswith(("yuv420", "yuv422", "nv12", "yuvj420", "yuvj422")))
        if scale is not None:
            stream = stream.filter("scale", **scale)
    options = _encoder_options(video, threads, picture)
    gop = video.gop_frames(rate)
    if gop:
        options["g"] = gop
    options.update({"frames:v": params["count"], "an": None, "sn": None, "dn": None, "map_metadata": "-1"})
    options.update(joins.encoder_options(params.get("lead", 0), params["count"], params.get("tail", 0)))
    if mode == "passthrough":  # every frame keeps its own time, in the source's time base
        options.update({"fps_mode": "passthrough", "enc_time_base": facts.video.time_base})
    else:
        options.update({"r": params["rate"], "fps_mode": "cfr"})
    box = settings.box
    if pass_number is not None and passlog is not None:
        options.update({"pass": pass_number, "passlogfile": str(passlog)})
    if pass_number == 1:
        options["f"] = "null"
        return _compile(ffmpeg.output(stream, "-", **options))
    muxer, mp4_like = (joins.OVERLAPPED_MUXER, True) if joins.overlapped(params) else (box.muxer, box.mp4_like)
    if mp4_like and mode != "passthrough":
        options["video_track_timescale"] = timescale(rate)
    options["f"] = muxer
    if poster is None:
        return _compile(ffmpeg.output(stream, str(out), **options))
    path, width = poster
    branches = stream.split()
    picture = branches[1].filter("trim", start_frame=params.get("lead", 0)).filter("scale", f"min({width},iw)", -2)
    return _compile(ffmpeg.merge_outputs(
        ffmpeg.output(branches[0], str(out), **options),
        ffmpeg.output(picture, str(path), **{"frames:v": 1, "q:v": 4, "f": "image2", "update": 1})))


def keep_frames(settings: TranscodeSettings, params: dict[str, Any], encoded: Path, out: Path) -> list[str]:
    """An overlapped segment (joins.py), cut back to its own frames by stream copy."""
    box = settings.box
    rate = parse_rate(params["rate"])
    scale = timescale(rate) if box.mp4_like and params["mode"] != "passthrough" else None
    return joins.keep(FFMPEG, encoded, out, params.get("lead", 0), params["count"], rate, box.muxer, scale, _GLOBAL)


#: Seconds added to the audio file's timestamps. An encoder's priming (AAC's 1024
#: samples, Opus's pre-skip, LAME's delay) is placed before the first sample, at a negative
#: time where the source starts with its audio, and a muxer that cannot store negative times
#: (Matroska) would shift the track, moving every sample late by the priming. With this lead
#: nothing is negative, and assembly takes it back off.
AUDIO_LEAD = 10.0


#: Muxers that write an mp4/QuickTime movie, and the movie timescale given to an audio
#: piece: 7,056,000 ticks a second hold a sample of 8, 11.025, 16, 22.05, 44.1, 48 and 96 kHz
#: exactly (and 32 kHz to 0.2 µs).
MOVIE_MUXERS = frozenset({"mp4", "mov", "ipod"})
MOVIE_TIMESCALE = 7_056_000


def audio_segment(facts: SourceFacts, audio: AudioSettings, box: Container, streams: list[int], out: Path) -> list[str]:
    """Encode the chosen audio tracks once, over the whole duration, into one file whose
    timestamps are the source's, counted from the source's start, plus ``AUDIO_LEAD``."""
    source = _source(facts)
    chosen = [source[str(index)] for index in streams]
    muxer = box.audio_piece[0] if box.audio_piece else box.muxer
    options: dict[str, Any] = {"c:a": audio.codec, "vn": None, "sn": None, "dn": None, "f": muxer,
                               "output_ts_offset": f"{AUDIO_LEAD:g}"}
    if muxer in MOVIE_MUXERS:
        # An mp4's edit list counts in the movie's timescale, 1/1000 s unless told: the
        # encoder's priming (1024 samples, 21.333 ms) was written as 21 ms, and the sound
        # landed 0.667 ms off at assembly, which then joined everything again to correct it.
        options["movie_timescale"] = MOVIE_TIMESCALE
    if audio.bitrate:
        options["b:a"] = audio.bitrate
    if audio.channels:
        options["ac"] = audio.channels
    if audio.sample_rate:
        options["ar"] = audio.sample_rate
    return _compile(ffmpeg.output(*chosen, str(out), **options))


def concat_list(files: list[tuple[Path, Fraction | None]]) -> str:
    """An ffconcat list naming each file (quoted, so any path is read as a path) with its
    exact duration: the concat demuxer starts the next file there. Left to itself, it
    takes the duration from the container, which an mp4 edit list can make longer by a
    fraction of a frame at every join."""
    lines = ["ffconcat version 1.0"]
    for path, seconds in files:
        quoted = str(path).replace("'", "'\\''")
        lines.append(f"file '{quoted}'")
        if seconds is not None:
            lines.append(f"duration {float(seconds):.6f}")
    return "\n".join(lines) + "\n"


def mux(facts: SourceFacts, settings: TranscodeSettings, out: Path, *, video_list: Path | None,
        audio_file: Path | None, audio_streams: list[int] | None = None, audio_offset: float = 0.0,
        video_offset: float = 0.0, timecode: str | None = None) -> list[str]:
    """Join the video segments (no re-encoding), add the audio, keep subtitles and metadata.

    Written out by hand: ffmpeg-python cannot open an input only for its metadata.
    ``audio_streams`` are the source streams the audio file's tracks were made from;
    ``audio_offset`` is where the audio file's first timestamp goes against the video's
    first frame, ``video_offset`` where that frame goes: a negative audio time is an
    encoder's priming, which an mp4 edit list hides and a Matroska muxer shifts with the
    video; sound before the picture is kept by moving the video later instead.
    ``timecode`` is the output's start timecode (mp4 and mov write it as a timecode track,
    MXF in its material package).
    """
    box = settings.box
    argv = [FFMPEG, *_GLOBAL]
    maps: list[str] = []
    inputs = 0
    if video_list is not None:
        if video_offset > 0:
            argv += ["-itsoffset", f"{video_offset:.6f}"]
        argv += ["-f", "concat", "-safe", "0", "-protocol_whitelist", "file", "-i", str(video_list)]
        maps += ["-map", f"{inputs}:v:0"]
        inputs += 1
    if audio_file is not None:
        if audio_offset and video_list is not None:
            argv += ["-itsoffset", f"{audio_offset:.6f}"]
        argv += ["-protocol_whitelist", "file", "-i", str(audio_file)]
        maps += ["-map", f"{inputs}:a"]
        inputs += 1
    options = ["-c", "copy"]
    subtitles = [s for s in facts.subtitles if s.text] if settings.subtitles and box.subtitles else []
    if (subtitles or settings.metadata) and facts.demuxer != SEQUENCE_DEMUXER:  # images carry no tags
        source = inputs
        argv += ["-f", facts.demuxer, "-protocol_whitelist", "file", "-i", facts.path]
        for position, sub in enumerate(subtitles):
            maps += ["-map", f"{source}:{sub.index}"]
            codec = "srt" if box.subtitles == "copy" and sub.codec == "mov_text" else str(box.subtitles)
            options += [f"-c:s:{position}", codec]
        if settings.metadata:
            # Global tags and chapters from the source; each stream's tags (language,
            # handler, title) from the source stream it was made from.
            options += ["-map_metadata", str(source), "-map_chapters", str(source)]
            if video_list is not None and facts.video is not None:
                options += ["-map_metadata:s:v:0", f"{source}:s:{facts.video.index}"]
            for position, index in enumerate(audio_streams or [] if audio_file is not None else []):
                options += [f"-map_metadata:s:a:{position}", f"{source}:s:{index}"]
            for position, sub in enumerate(subtitles):
                options += [f"-map_metadata:s:s:{position}", f"{source}:s:{sub.index}"]
    else:
        options += ["-map_metadata", "-1", "-map_chapters", "-1"]
    if video_list is not None and settings.video is not None:
        if timecode is not None:
            options += ["-timecode", timecode]
        elif settings.metadata:  # a timecode tag copied from the source would make a timecode track
            options += ["-metadata", "timecode=", "-metadata:s:v:0", "timecode="]
    if box.mp4_like:
        options += ["-movflags", "+faststart"]
        if video_list is not None and settings.video is not None and settings.video.encoder.family == "hevc":
            options += ["-tag:v", "hvc1"]  # what Apple's players look for (ffmpeg writes hev1)
    return [*argv, *maps, *options, "-f", box.muxer, "-y", str(out)]
