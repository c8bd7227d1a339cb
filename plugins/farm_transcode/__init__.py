"""The ``transcode`` processor: one source into one output, its video encoded in
segments on many nodes, joined without re-encoding, and verified before it is moved
into the destination.

Plan
    ffprobe reads the source's streams and every video packet's timestamp: the exact
    frame count, the keyframes, and whether the frame rate is constant. The video is cut
    into segments of about ``segment.seconds`` (default 10) on frame boundaries; a
    source shorter than two segments, ``segmented: false`` (two-pass encodes) or a
    variable-frame-rate source (unless ``vfr: convert``) is one segment, and so is a
    source whose timestamps cannot place a cut (they start again, or frames have none),
    read straight through with the reason in the plan. The audio is one more segment,
    encoded once over the whole duration, so nothing clicks or drifts at the joins. What
    the encode changes in the picture (bit depth, chroma, alpha, fields, colour and HDR
    metadata, timecode) is decided once for the job from the profile's policies (see
    ``policy``); every video segment carries that decision and the first one's label
    says it, so ``farm plan`` shows it.

Run (per video segment)
    Exactly the segment's frames: the node seeks to before the keyframe the segment
    needs (an indexed demuxer onto it; MPEG-TS and other demuxers that land on the next
    keyframe well before it), keeps the source's own timestamps, and a ``trim`` on
    presentation timestamps picks the frames (for a frame-rate change, the same on the
    new rate's grid, after ``fps``). A seek that still lands late is redone from the
    beginning. The encoder starts afresh, so the first frame is a keyframe. Threads per
    encoder are the node's cores divided by its slots. The frames written, as ffmpeg
    reports them at its end, are checked before the segment is reported done.

Assemble
    The segments are joined with ffmpeg's concat demuxer (stream copy), the audio (placed
    by its own timestamps, so an encoder's priming falls before the source's first
    sample), text subtitles, metadata and chapters are added, and the result is written
    under a temporary name in the destination, checked with ffprobe (frame count,
    durations, audio against video), its sound matched against the source's (see
    ``sync``; joined again, corrected, when a muxer moved it), and only then renamed.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import functools
import math
import os
import re
import shutil
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path
from typing import Any

from farm import hookimpl
from farm.errors import PlanError, ProcessorError
from farm.model import Job, Segment, SegmentPlan
from farm.outputs import Delivery, output_path
from farm.processor import Context, Processor
from farm.requirements import program_answer

from farm_transcode import ffmpeg_io, joins, sources, sync
from farm_transcode.planning import cut_points, frame_label, output_frame, ranges, timecode
from farm_transcode.policy import decide
from farm_transcode.probe import FFPROBE, SourceFacts, last_error, probe_output
from farm_transcode.settings import AUDIO_ENCODERS, VIDEO_ENCODERS, TranscodeSettings, parse_rate
from farm_transcode.verify import Expected, problems

DEFAULT_SECONDS = 10.0
#: A sound measured this far from the source's timing at assembly is joined again, corrected.
SYNC_CORRECTED = 0.0004
DEFAULT_OUTPUT = "{stem}-{profile}.{ext}"
#: Common rates: a variable rate whose average is within 0.2 % of one is converted to it.
COMMON_RATES = [Fraction(24000, 1001), Fraction(24), Fraction(25), Fraction(30000, 1001), Fraction(30),
                Fraction(50), Fraction(60000, 1001), Fraction(60)]


def average_rate(average: Fraction) -> Fraction:
    """The constant rate a variable-rate source becomes when the profile names none: its
    average to a hundredth of a frame a second (a phone's 29.96 is its nominal 29.97; a
    30+15 fps clip's 22.5 stays 22.5)."""
    near = min(COMMON_RATES, key=lambda r: abs(r - average))
    return near if abs(near - average) <= average / 500 else Fraction(round(average * 100), 100)


#: A line of the report ``-progress pipe:1`` mixes into ffmpeg's output (frame=12, progress=end).
_PROGRESS_LINE = re.compile(r"^[a-z][a-z0-9_]*=")


def run_ffmpeg(context: Context, argv: list[str], on_line: Callable[[str], None] | None = None,
               **options: Any) -> Any:
    """``context.run`` for ffmpeg, whose failure is told in its own words: the runner's
    reason is the last line of output, which with ``-progress`` is only ``progress=end``."""
    said: collections.deque[str] = collections.deque(maxlen=20)

    def watch(line: str) -> None:
        if line.strip() and not _PROGRESS_LINE.match(line):
            said.append(line)
        if on_line is not None:
            on_line(line)

    result = context.run(argv, on_line=watch, check=False, **options)
    if result.exit_status != 0:
        ending = f"exit status {result.exit_status}" if result.signal is None else \
            f"killed by {signal.Signals(result.signal).name}"
        reason = last_error("\n".join(said))
        raise ProcessorError(f"{Path(argv[0]).name} failed with {ending}: {reason}")
    return result


#: Demuxers that seek through an index to the last keyframe at or before a point. Others
#: (MPEG-TS/M2TS, MPEG-PS, raw streams) search the file by timestamps and land on the first
#: keyframe at or after the point, judged by decoding time.
INDEXED_DEMUXERS = frozenset({"mov", "matroska", "avi", "mxf", "flv", "nut", "asf", "ivf"})


def seek_point(needed: int, source: Any, start: float, demuxer: str) -> float | None:
    """Where a node seeks (seconds from the container's start, as ``-ss`` counts) before
    decoding a segment whose first source frame has the timestamp ``needed``; None: read
    from the beginning.

    Decoding starts at a keyframe and ``trim`` drops what comes before the segment, so
    landing early only costs time, while landing late loses frames. An indexed demuxer
    seeks right onto a segment that starts on a keyframe with no other keyframe just after
    it (nothing is decoded in vain), otherwise a little before, since it may index
    keyframes by decoding time, which runs a few frames ahead of presentation. Any other
    demuxer is aimed well before the keyframe the segment needs.
    """
    frame = 1 / float(source.fps)
    tb = source.tb
    keyframes = [source.pts[k] for k in source.keyframes] if source.pts else []
    at = bisect.bisect_right(keyframes, needed) - 1
    if at <= 0 or keyframes[at] <= source.start_pts:
        return None  # the first keyframe: nothing to skip
    if demuxer not in INDEXED_DEMUXERS:
        return max(0.0, float(keyframes[at] * tb) - start - max(0.5, 8 * frame))
    seconds = float(needed * tb) - start
    following = keyframes[at + 1] if at + 1 < len(keyframes) else None
    if keyframes[at] == needed and (following is None or float((following - needed) * tb) > 4 * frame):
        return seconds + frame / 4
    return max(0.0, seconds - max(0.1, 3 * frame))


PREVIEW_WIDTH = 320  # the most a poster frame may be wide (farm.attemptfiles)


class TranscodeProcessor(Processor):
    name = "transcode"
    description = "ffmpeg transcodes: video encoded in segments across nodes, joined frame-exact and verified"
    settings_model = TranscodeSettings
    inputs = "file"
    #: Encoder parameters are handed to the encoder as they are (x264's stats=FILE).
    sensitive_settings = frozenset({"video.params"})

    def input_group(self, path: Path) -> tuple[str, int] | None:
        """The frames of an image sequence make one job, submitted by its first frame."""
        return sources.sequence_group(path)

    def input_files(self, job: Job) -> list[Path]:
        """The source; for an image sequence, each of its frames (a node without shared
        storage is sent them all, beside each other as they are here)."""
        if job.input is None or not sources.is_sequence(job.input):
            return super().input_files(job)
        prefix, number, ext = sources._parts(job.input) or ("", "0", "")
        digits = len(number) if number.startswith("0") else 1
        return [job.input.parent / sources.frame_name(prefix, int(number) + n, digits, ext)
                for n in range(sources.count_frames(job.input))]

    # -- what a node needs ---------------------------------------------------------------

    def requires(self, job: Job) -> dict[str, str]:
        settings: TranscodeSettings = job.settings
        needs = {**job.profile.requires, "ffmpeg": job.profile.requires.get("ffmpeg", ""),
                 "ffprobe": job.profile.requires.get("ffprobe", "")}
        if settings.video is not None:
            needs[f"ffmpeg-encoder:{settings.video.codec}"] = ""
        if settings.audio is not None and settings.audio.codec != "copy":
            needs[f"ffmpeg-encoder:{settings.audio.codec}"] = ""
        return needs

    # -- plan -----------------------------------------------------------------------------

    def plan(self, job: Job) -> list[SegmentPlan]:
        settings: TranscodeSettings = job.settings
        if job.input is None:
            raise PlanError("a transcode needs an input file")
        target = self.target(job)
        if target == job.input.resolve():
            raise PlanError(f"the output {target} would replace the source; change output: or the destination")
        facts = sources.probe(job.input, settings.video.fps if settings.video else None,
                              picture=settings.video is not None)
        summary = facts.summary()
        plans: list[SegmentPlan] = []
        if settings.audio is not None and facts.audio:
            streams = self._audio_streams(facts, settings)
            seconds = max(facts.audio[0].duration, 0.0)
            tracks = f"{len(streams)} track{'s' if len(streams) > 1 else ''}"
            plans.append(SegmentPlan(label=f"audio: {tracks} ({timecode(0)}-{timecode(seconds)})",
                                     params={"kind": "audio", "streams": streams, "facts": summary}))
        if settings.video is None:
            if not facts.audio:
                raise PlanError(f"{job.input.name} has no audio stream, and profile {job.profile.name!r} makes audio only")
            if settings.audio is None:
                raise PlanError("nothing to make")
            return plans
        if facts.video is None:
            raise PlanError(f"{job.input.name} has no video stream, and profile {job.profile.name!r} makes video; "
                            "use an audio-only profile for it")
        video_plans = self._video_plans(job, facts, summary)
        self._check_rate(job, video_plans)
        kind = sources.note(facts, settings.video.fps)
        if kind and video_plans:  # said once, on the first video segment
            video_plans[0] = dataclasses.replace(video_plans[0], label=f"{video_plans[0].label}; {kind}")
        return plans + self._with_picture(facts, settings, video_plans)

    def plan_ahead(self, job: Job) -> None:
        """Probe the source now and keep its facts for :meth:`plan` (``farm run`` does this
        while its cluster starts)."""
        if job.input is not None:
            settings: TranscodeSettings = job.settings
            sources.probe(job.input, settings.video.fps if settings.video else None, ahead=True,
                          picture=settings.video is not None)

    @staticmethod
    def _check_rate(job: Job, plans: list[SegmentPlan]) -> None:
        """An encoder with a table of frame rates (MPEG-2) is refused a rate outside it at plan time."""
        video = job.settings.video
        rates = video.encoder.rates
        if not rates or not plans:
            return
        rate = parse_rate(plans[0].params["rate"])
        if plans[0].params["mode"] == "passthrough" or rate not in rates:
            what = "a variable frame rate" if plans[0].params["mode"] == "passthrough" else f"{float(rate):.3f} fps"
            known = ", ".join(f"{float(r):.3f}".rstrip("0").rstrip(".") for r in rates)
            raise PlanError(f"{job.input.name} would be encoded at {what}, which {video.codec} cannot encode "
                            f"(it encodes {known} fps); set video.fps to one of them")

    @staticmethod
    def _with_picture(facts: SourceFacts, settings: TranscodeSettings, plans: list[SegmentPlan]) -> list[SegmentPlan]:
        """Every video segment carries the job's picture decision; the first one's label says it."""
        if not plans:
            return plans
        first = plans[0].params
        picture = decide(facts, settings, parse_rate(first["rate"]), first["mode"])
        for plan in plans:
            plan.params["picture"] = picture.to_params()
        said = "".join(f"; {note}" for note in picture.notes)
        return [SegmentPlan(label=plan.label + (said if not number else ""),
                            frames=plan.frames, params=plan.params) for number, plan in enumerate(plans)]

    def _audio_streams(self, facts: SourceFacts, settings: TranscodeSettings) -> list[int]:
        assert settings.audio is not None
        tracks = settings.audio.tracks
        if tracks == "all":
            chosen = list(range(len(facts.audio)))
        elif tracks == "first":
            chosen = [0]
        else:
            missing = [index for index in tracks if index >= len(facts.audio)]
            if missing:
                raise PlanError(f"the profile keeps audio track {missing[0]} (counting from 0), but the source has "
                                f"{len(facts.audio)} audio track(s)")
            chosen = list(tracks)
        unknown = [n for n in chosen if facts.audio[n].codec in ("?", "unknown", "none")]
        if unknown and settings.audio.codec != "copy":
            raise PlanError(f"{Path(facts.path).name}: its audio track {unknown[0]} (counting from 0; stream "
                            f"{facts.audio[unknown[0]].index}) is in a codec this ffmpeg does not know, so it cannot "
                            "be encoded; keep the other tracks (audio.tracks) or copy it (audio.codec: copy)")
        return [facts.audio[n].index for n in chosen]

    def _video_plans(self, job: Job, facts: SourceFacts, summary: dict[str, Any]) -> list[SegmentPlan]:
        settings: TranscodeSettings = job.settings
        video, source = settings.video, facts.video
        assert video is not None and source is not None
        tb = source.tb
        wanted = parse_rate(video.fps) if video.fps else None
        if source.uncut is not None:
            # Cutting needs timestamps that place every frame once; read straight through,
            # as one ffmpeg process would.
            rate = wanted or source.fps
            params = {"kind": "video", "mode": "straight", "first": 0, "count": source.frames,
                      "rate": f"{rate.numerator}/{rate.denominator}", "video_start": float(source.start_pts * tb),
                      "facts": summary}
            label = frame_label(0, source.frames, rate, f"one segment, read straight through: {source.uncut}")
            return [SegmentPlan(label=label, params=params)]
        if source.vfr and settings.vfr == "single" and wanted is None:
            params = {"kind": "video", "mode": "passthrough", "first": 0, "count": source.frames,
                      "rate": source.rate, "video_start": float(source.start_pts * tb), "facts": summary}
            label = frame_label(0, source.frames, source.fps, "variable frame rate: one segment, timing kept")
            return [SegmentPlan(label=label, params=params)]
        if source.vfr:
            rate = wanted or average_rate(source.fps)
        else:
            rate = wanted or source.fps
        mode = "exact" if rate == source.fps and not source.vfr else "rate"
        if mode == "exact":
            origin, total = 0, source.frames
        else:
            # ffmpeg's fps filter puts frames on a grid of the new rate counted from the
            # container's start; the first and last are where the source's start and end round to.
            origin, end = (output_frame((pts * tb) - Fraction(facts.start).limit_denominator(10**9), rate)
                           for pts in (source.start_pts, source.end_pts))
            total = max(1, end - origin)
        segment = job.profile.segment
        if not settings.segmented or video.passes == 2 or (source.vfr and settings.vfr == "single"):
            cuts = [0]
        else:
            size = segment.frames or round((segment.seconds or DEFAULT_SECONDS) * rate)
            keyframes = source.keyframes if mode == "exact" else None
            cuts = cut_points(total, size, gop=video.gop_frames(rate), keyframes=keyframes)
        plans = []
        for first, count in ranges(cuts, total):
            params: dict[str, Any] = {"kind": "video", "mode": mode, "first": first, "count": count,
                                      "rate": f"{rate.numerator}/{rate.denominator}", "facts": summary}
            last = first + count
            if mode == "exact":
                # Timestamps of the first frame in and the first frame out, in the stream's time base.
                params["start_pts"] = source.pts[first] if first else None
                params["end_pts"] = source.pts[last] if last < total else None
                params["video_start"] = float(source.start_pts * tb)
            else:
                # The same on the new rate's grid (its time base is 1/rate after fps).
                params["start_pts"] = origin + first if first else None
                params["end_pts"] = origin + last if last < total else None
                params["shift"] = facts.start
                params["video_start"] = facts.start + float(origin / rate)
            # The encoder starts before the segment and runs on past its end; what it made
            # there is dropped (joins.py).
            lead, tail = joins.overlap(video.codec, video.params, first, last, total, video.gop_frames(rate),
                                       float(rate)) if len(cuts) > 1 else (0, 0)
            if lead or tail:
                params.update(lead=lead, tail=tail)
                params["run_end_pts"] = (None if last + tail >= total else
                                         source.pts[last + tail] if mode == "exact" else origin + last + tail)
            if lead:
                params["run_start_pts"] = source.pts[first - lead] if mode == "exact" else origin + first - lead
            begin = first - lead  # the first frame the encoder reads
            if begin:
                # The timestamp of the first source frame the segment needs.
                needed = source.pts[begin] if mode == "exact" else \
                    math.floor((facts.start + (origin + begin - 1) / rate) / tb)
                params["seek"] = seek_point(needed, source, facts.start, facts.demuxer)
            note = f"{float(rate):.3f} fps from {float(source.fps):.3f}" if mode == "rate" else ""
            if source.vfr and mode == "rate":
                note = f"variable frame rate converted to {float(rate):.3f} fps"
            plans.append(SegmentPlan(label=frame_label(first, count, rate, note), params=params))
        return plans

    def target(self, job: Job) -> Path:
        return output_path(job, DEFAULT_OUTPUT, job.settings.box.ext)

    def outputs(self, job: Job) -> list[Path]:
        return [self.target(job)]

    # -- run ------------------------------------------------------------------------------

    def run(self, segment: Segment, context: Context) -> dict[str, Any]:
        settings: TranscodeSettings = segment.job.settings
        params = segment.params
        facts = SourceFacts.from_summary(params["facts"])
        facts.path = str(segment.job.input)  # as this node sees it
        ext = settings.box.ext
        if params["kind"] == "audio":
            return self._run_audio(segment, context, facts, settings, ext)
        assert settings.video is not None
        threads = settings.video.threads or max(1, (os.cpu_count() or 1) // max(1, context.node.slots))
        out = segment.output_dir / f"video-{params['first']:09d}.{ext}"
        count = params["count"]

        def on_line(line: str) -> None:
            if line.startswith("frame="):
                done = int(line[6:].strip() or 0)
                context.progress(min(done / count, 1.0), f"frame {done}/{count}")

        preview = segment.job.profile.preview
        frames = self._encode_video(context, facts, settings, params, out, threads, on_line, preview)
        if frames != count and params.get("seek") is not None:
            # The demuxer's seek landed after the segment's first frame: read from the
            # beginning instead (slower, always exact).
            context.logger.warning("segment %s: seeking to %.3f s gave %d frames instead of %d; reading the source "
                                   "from its beginning", segment.label, params["seek"], frames, count)
            params = {**params, "seek": None}
            frames = self._encode_video(context, facts, settings, params, out, threads, on_line, preview)
        if frames != count:
            raise ProcessorError(f"segment {segment.label} came out with {frames} frames instead of {count}; "
                                 "the source may be damaged at that point")
        context.progress(1.0, f"{count} frames")
        return {"kind": "video", "file": str(out), "frames": frames, "label": segment.label, "params": params}

    def preview(self, segment: Segment, result: dict[str, Any], context: Context) -> Path | None:
        """A poster frame of a video segment: its piece's first frame, at most 320 px wide,
        as the encoding process wrote it, or else decoded from the piece."""
        if result.get("kind") != "video" or not result.get("file"):
            return None
        made = context.scratch / "poster.jpg"
        if made.is_file() and made.stat().st_size:
            return made
        piece = Path(result["file"])
        context.run([ffmpeg_io.FFMPEG, "-hide_banner", "-nostdin", "-loglevel", "error", "-i", str(piece),
                     "-map", "0:v:0", "-vf", f"scale='min({PREVIEW_WIDTH},iw)':-2", "-frames:v", "1", "-q:v", "4",
                     "-y", str(made)], read=[piece])
        return made

    @staticmethod
    def _encode_video(context: Context, facts: SourceFacts, settings: TranscodeSettings, params: dict[str, Any],
                      out: Path, threads: int, on_line: Callable[[str], None], preview: bool = False) -> int:
        """Encode one video segment; the frames written into it, as the ffmpeg that wrote it
        counts them at its end (``-progress``'s last ``frame=``). The joined output is
        counted by ffprobe at assembly; a piece needs no ffprobe process of its own."""
        assert settings.video is not None
        reads = sources.reads(facts)  # an image sequence's other frames
        overlapped = joins.overlapped(params)
        encoded = context.scratch / f"overlapped.{joins.OVERLAPPED_MUXER}" if overlapped else out
        picture = params.get("picture") or {}
        poster = ((context.scratch / "poster.jpg", PREVIEW_WIDTH) if preview and params["mode"] != "passthrough"
                  and picture.get("pix_fmt") in ffmpeg_io.POSTER_PIX_FMTS and not picture.get("fields") else None)
        if settings.video.passes == 2:
            passlog = context.scratch / "pass"
            run_ffmpeg(context, ffmpeg_io.video_segment(facts, settings, params, encoded, threads, passlog, 1),
                       cwd=context.scratch, on_line=on_line, read=reads)
            argv = ffmpeg_io.video_segment(facts, settings, params, encoded, threads, passlog, 2, poster=poster)
        else:
            argv = ffmpeg_io.video_segment(facts, settings, params, encoded, threads, poster=poster)
        written = ffmpeg_io.FrameCount()

        def watch(line: str) -> None:
            written.read(line)
            on_line(line)

        run_ffmpeg(context, argv, cwd=context.scratch, on_line=watch, read=reads)
        if overlapped:
            written = ffmpeg_io.FrameCount()
            run_ffmpeg(context, ffmpeg_io.keep_frames(settings, params, encoded, out), cwd=context.scratch,
                       on_line=written.read)
        return written.frames

    def _run_audio(self, segment: Segment, context: Context, facts: SourceFacts, settings: TranscodeSettings,
                   ext: str) -> dict[str, Any]:
        assert settings.audio is not None
        out = segment.output_dir / f"audio.{(settings.box.audio_piece or (None, ext))[1]}"
        streams = segment.params["streams"]
        total = max((a.duration for a in facts.audio), default=0.0) or 1.0

        def on_line(line: str) -> None:
            if line.startswith("out_time_us=") and line[12:].strip().lstrip("-").isdigit():
                context.progress(min(int(line[12:]) / 1e6 / total, 1.0), "audio")

        run_ffmpeg(context, ffmpeg_io.audio_segment(facts, settings.audio, settings.box, streams, out),
                   cwd=context.scratch, on_line=on_line)
        if settings.video is None:
            # Sound alone: the joined output's ffprobe checks its tracks, durations and codec,
            # and the join places nothing against a picture, so no ffprobe reads the piece.
            return {"kind": "audio", "file": str(out), "label": segment.label, "params": segment.params}
        found = probe_output(out, context.run, context.scratch)
        tracks = found.of_type("audio")
        if len(tracks) != len(streams):
            raise ProcessorError(f"the audio came out with {len(tracks)} track(s) instead of {len(streams)}")
        # Where the file's timeline starts (an encoder's priming included), which ffmpeg
        # counts from when it reads the file at assembly.
        start = float(found.format.get("start_time") or 0.0)
        return {"kind": "audio", "file": str(out), "label": segment.label, "start": start,
                "durations": [found.duration(t) for t in tracks], "params": segment.params}

    # -- verify and assemble ----------------------------------------------------------------

    @staticmethod
    def _latest(results: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
        """One result per piece; a piece run again (after verify) replaces the earlier one."""
        latest: dict[tuple[str, int], dict[str, Any]] = {}
        for result in results:
            if result.get("kind") in ("video", "audio"):
                latest[(result["kind"], result["params"].get("first", -1))] = result
        return latest

    def verify(self, job: Job, results: list[dict[str, Any]], context: Context) -> list[SegmentPlan]:
        """Pieces whose file went missing from cluster storage are encoded again."""
        return [SegmentPlan(label=r["label"], params=r["params"]) for r in self._latest(results).values()
                if not Path(r["file"]).is_file() or Path(r["file"]).stat().st_size == 0]

    def assemble(self, job: Job, results: list[dict[str, Any]], context: Context) -> list[str]:
        settings: TranscodeSettings = job.settings
        pieces = self._latest(results)
        if not pieces:
            raise ProcessorError("no segment produced anything to assemble")
        facts = SourceFacts.from_summary(next(iter(pieces.values()))["params"]["facts"])
        facts.path = str(job.input)
        videos = sorted((r for (kind, _), r in pieces.items() if kind == "video"), key=lambda r: r["params"]["first"])
        audio = pieces.get(("audio", -1))
        expected = self._expected(facts, settings, videos, audio)
        target = self.target(job)
        if job.input is not None and target == job.input.resolve():
            raise ProcessorError(f"the output {target} would replace the source")
        video_list = None
        if videos:
            video_list = context.scratch / "video.ffconcat"
            pieces_list = [(Path(r["file"]), None if r["params"]["mode"] == "passthrough"
                            else r["params"]["count"] / parse_rate(r["params"]["rate"])) for r in videos]
            video_list.write_text(ffmpeg_io.concat_list(pieces_list), encoding="utf-8")
        offset = video_offset = 0.0
        if audio is not None and videos:
            # The audio file's timestamps count from the source's start, encoder priming
            # included; reading it, ffmpeg starts it at its own first timestamp. Shifted by
            # this, each of its samples lands where it was in the source, against the video's
            # first frame. Sound that starts before the picture moves the picture instead.
            lead = ffmpeg_io.AUDIO_LEAD if "start" in audio else 0.0  # "start": made with the lead
            video_start = videos[0]["params"]["video_start"]
            offset = audio.get("start", 0.0) - lead + facts.start - video_start
            sound = min((a.start for a in facts.audio if a.index in audio["params"]["streams"]), default=video_start)
            video_offset = max(0.0, video_start - sound)
            offset += video_offset
        start_timecode = (videos[0]["params"].get("picture") or {}).get("timecode") if videos else None
        # Joined straight into the staging folder on the destination's disk: delivering is a rename.
        with Delivery(job, claim=context.claim) as delivery:
            delivery.check_room([sum(Path(r["file"]).stat().st_size for r in pieces.values())])
            temporary = delivery.staged(target)
            source_sound: dict[str, Any] = {}  # decoded once, whichever join measures it
            measured = bool(audio is not None and videos and job.input is not None)
            # The processes that do not wait for each other run side by side: the source's
            # sound is decoded while the pieces are joined, the output probed while its
            # sound is measured.
            helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"farm-assemble-{job.id}")

            def measure() -> float | None:
                assert audio is not None and job.input is not None
                return sync.lag(job.input, facts.demuxer, audio["params"]["streams"][0], temporary, 0,
                                context.run, context.scratch, ffmpeg_io.FFMPEG, kept=source_sound)

            def join(offset: float) -> Any:
                run_ffmpeg(context, ffmpeg_io.mux(facts, settings, temporary, video_list=video_list,
                                                  audio_file=Path(audio["file"]) if audio else None,
                                                  audio_streams=audio["params"]["streams"] if audio else [],
                                                  audio_offset=offset, video_offset=video_offset,
                                                  timecode=start_timecode),
                           cwd=context.scratch)
                if measured:
                    source_decoded.result()
                    lag = helper.submit(measure)
                found = probe_output(temporary, context.run, context.scratch, span=expected.video_span is not None)
                if measured:
                    found.audio_lag = lag.result()
                return found

            with helper:
                if measured:
                    assert audio is not None and job.input is not None
                    source_decoded = helper.submit(sync.decode_source, job.input, facts.demuxer,
                                                   audio["params"]["streams"][0], context.run, context.scratch,
                                                   ffmpeg_io.FFMPEG, source_sound)
                found = join(offset)
                if found.audio_lag is not None and abs(found.audio_lag) > SYNC_CORRECTED:
                    # A muxer's own handling of an encoder's delay (Opus in Matroska) can move
                    # the sound: joined again with the difference taken off.
                    context.logger.info("the sound played %+.2f ms off the source's; joining again",
                                        found.audio_lag * 1000)
                    found = join(offset - found.audio_lag)
            wrong = problems(found, expected)
            if wrong:
                raise ProcessorError(f"the joined output failed verification, so it was not delivered: {'; '.join(wrong)}")
            return [str(path) for path in delivery.commit()]

    def _expected(self, facts: SourceFacts, settings: TranscodeSettings, videos: list[dict[str, Any]],
                  audio: dict[str, Any] | None) -> Expected:
        expected = Expected(video_frames=None)
        if videos:
            assert facts.video is not None and settings.video is not None
            first = videos[0]["params"]
            rate = parse_rate(first["rate"])
            frames = sum(r["params"]["count"] for r in videos)
            covered = [(r["params"]["first"], r["params"]["count"]) for r in videos]
            position = 0
            for start, count in covered:
                if start != position:
                    raise ProcessorError(f"the segments do not join up: one ends at frame {position}, the next "
                                         f"starts at frame {start}")
                position = start + count
            expected.video_frames = frames
            if first["mode"] in ("rate", "straight"):
                expected.video_duration = float(frames / rate)
            else:
                expected.video_duration = facts.video.duration
            if first["mode"] == "passthrough":  # variable: the span between first and last frame counts
                expected.video_span = float((facts.video.last_pts - facts.video.start_pts) * facts.video.tb)
                expected.frame_duration = float(1 / facts.video.fps)
            else:
                expected.frame_duration = float(1 / rate)
            expected.video_codec = settings.video.encoder.family
            picture = first.get("picture")
            if picture is not None:  # planned with a picture decision (policy.py)
                expected.pix_fmt, expected.fields = picture["pix_fmt"], picture.get("fields")
                expected.check_fields = True
        if audio is not None and settings.audio is not None:
            by_index = {a.index: a for a in facts.audio}
            expected.audio_durations = [by_index[i].duration for i in audio["params"]["streams"]]
            codec = AUDIO_ENCODERS[settings.audio.codec]
            expected.audio_codec = None if codec == "copy" else codec
            if videos and facts.audio:  # how much later the audio starts than the video
                offset = facts.audio[0].start - videos[0]["params"]["video_start"]
                expected.av_offset = offset if abs(offset) > 0.001 else 0.0
        return expected


# -- what a node offers -------------------------------------------------------------------------


def _version(executable: str) -> str | None:
    proc = program_answer([executable, "-hide_banner", "-version"])
    if proc is None or proc.returncode != 0:
        return None
    match = re.search(r"version\s+n?(\d+(?:\.\d+)*)", proc.stdout)
    return match.group(1) if match else ""


@functools.lru_cache(maxsize=None)
def ffmpeg_capabilities(ffmpeg: str = ffmpeg_io.FFMPEG, ffprobe: str = FFPROBE) -> dict[str, str]:
    """``ffmpeg``/``ffprobe`` with their versions, and ``ffmpeg-encoder:NAME`` for the encoders Farm uses."""
    offered: dict[str, str] = {}
    if shutil.which(ffmpeg) is None:
        return offered
    version = _version(ffmpeg)
    if version is None:
        return offered
    offered["ffmpeg"] = version
    probe_version = _version(ffprobe) if shutil.which(ffprobe) else None
    if probe_version is not None:
        offered["ffprobe"] = probe_version
    answer = program_answer([ffmpeg, "-hide_banner", "-encoders"])
    listing = answer.stdout if answer is not None else ""
    known = set(VIDEO_ENCODERS) | set(AUDIO_ENCODERS)
    for line in listing.splitlines():
        parts = line.split()
        if len(parts) >= 2 and re.fullmatch(r"[VAS.][F.][S.][X.][B.][D.]", parts[0]) and parts[1] in known:
            offered[f"ffmpeg-encoder:{parts[1]}"] = ""
    return offered


@hookimpl
def farm_processors() -> list[Processor]:
    return [TranscodeProcessor()]


@hookimpl
def farm_node_capabilities(config: Any) -> dict[str, str]:
    return dict(ffmpeg_capabilities())
