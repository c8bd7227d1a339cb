"""What one encode may change in the picture, decided once per job at plan time.

Bit depth and chroma, alpha, fields, colour and HDR metadata, timecode: each follows a
profile setting (``video.pix_fmt``, ``bit_depth``, ``chroma``, ``alpha``, ``interlace``,
``hdr``, ``timecode``), and each change is said in words for ``farm plan``
("10-bit → 8-bit: the profile pins yuv420p"). The decision travels with every segment
of the job, so all of them are encoded alike and join.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Any

from farm.errors import PlanError

from farm_transcode.probe import SourceFacts, VideoFacts
from farm_transcode.settings import TranscodeSettings, VideoSettings, describe_pix_fmt

HDR_TRANSFERS = {"smpte2084": "PQ", "arib-std-b67": "HLG"}
_FIELDS = {"tff": "top field first", "bff": "bottom field first"}
_COLOUR_OPTIONS = (("color_primaries", "color_primaries"), ("color_transfer", "color_trc"),
                   ("color_space", "colorspace"))
#: Names ffprobe prints that ffmpeg's options spell otherwise.
_OPTION_NAMES = {("color_trc", "bt470m"): "gamma22", ("color_trc", "bt470bg"): "gamma28", ("colorspace", "gbr"): "rgb"}


@dataclass
class Picture:
    """The job's decision, as segment params carry it (``params["picture"]``)."""

    pix_fmt: str
    deinterlace: str | None = None  # "tff"/"bff": bwdif with this parity
    fields: str | None = None  # "tff"/"bff": coded as fields, flagged so (interlace: keep)
    tonemap: bool = False  # PQ/HLG to SDR BT.709
    colour: dict[str, str] = field(default_factory=dict)  # encoder options: color_primaries, color_trc, colorspace
    params: dict[str, str] = field(default_factory=dict)  # encoder params: HDR10 mastering display, light levels
    timecode: str | None = None  # written by the mux as the output's start timecode
    notes: list[str] = field(default_factory=list)  # what farm plan says

    def to_params(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("notes")
        return data

    @classmethod
    def from_params(cls, data: dict[str, Any]) -> Picture:
        return cls(**data)


def _bits_words(bits: int, chroma: int) -> str:
    return f"{bits}-bit {chroma // 100}:{chroma // 10 % 10}:{chroma % 10}"


def _chroma_words(chroma: int) -> str:
    return f"{chroma // 100}:{chroma // 10 % 10}:{chroma % 10}"


def _encoder_words(video: VideoSettings) -> str:
    if video.codec == "prores_ks" and video.profile:
        return f"ProRes {video.profile}"
    return video.codec


def choose_pix_fmt(video: VideoSettings, source: VideoFacts) -> tuple[str, list[str]]:
    """The pixel format to encode, and what it loses of the source, each with its reason."""
    carried = video.pix_fmts
    have = describe_pix_fmt(source.pix_fmt)
    if video.pix_fmt is not None:
        chosen = video.pix_fmt
        why = {key: f"the profile pins {chosen}" for key in ("bits", "chroma", "alpha")}
    else:
        bits, chroma, alpha = have or (8, 420, False)
        want = (bits if video.bit_depth == "source" else video.bit_depth,
                chroma if video.chroma == "source" else video.chroma,
                alpha and video.alpha == "keep")

        def cost(name: str) -> tuple[Any, ...]:
            b, c, a = describe_pix_fmt(name) or (8, 420, False)
            return (want[2] and not a, c < want[1], b < want[0], a and not want[2], abs(c - want[1]), abs(b - want[0]))

        planar = [name for name in carried if re.match(r"^yuva?(420|422|444)p", name)]  # never yuvj, nv12, gray
        chosen = min(planar, key=cost)
        most_bits = max((describe_pix_fmt(n) or (8,))[0] for n in carried)
        why = {
            "bits": f"the profile sets bit_depth: {video.bit_depth}" if video.bit_depth != "source"
            else f"{video.codec} encodes at most {most_bits}-bit",
            "chroma": f"the profile sets chroma: {video.chroma}" if video.chroma != "source"
            else f"{_encoder_words(video)} carries no {_chroma_words(chroma)}",
            "alpha": "the profile sets alpha: drop" if video.alpha == "drop"
            else f"{_encoder_words(video)} carries no alpha",
        }
    out = describe_pix_fmt(chosen) or (8, 420, False)
    if have is None:
        return chosen, [f"picture: {chosen} (the source's pixel format {source.pix_fmt or '?'} is not known here)"]
    changes: dict[str, list[str]] = {}  # reason -> what it changes, so one pin is named once
    if out[0] < have[0]:
        changes.setdefault(why["bits"], []).append(f"{have[0]}-bit → {out[0]}-bit")
    if out[1] < have[1]:
        changes.setdefault(why["chroma"], []).append(f"{_chroma_words(have[1])} → {_chroma_words(out[1])}")
    if have[2] and not out[2]:
        changes.setdefault(why["alpha"], []).append("alpha dropped")
    lost = [f"{', '.join(what)}: {reason}" for reason, what in changes.items()]
    if not lost and (out != have or have != (8, 420, False)):  # the common case goes without saying
        kept = "with alpha, " if out[2] else ""
        lost.append(f"picture: {chosen} ({kept}{_bits_words(*out[:2])}; the source {_bits_words(*have[:2])})")
    return chosen, lost


def _timecode_at(timecode: str, source_rate: Fraction, rate: Fraction) -> str:
    """A non-drop timecode counted again at a new frame rate (the same instant)."""
    match = re.match(r"^(\d{2}):(\d{2}):(\d{2}):(\d{2})$", timecode)
    if not match or source_rate == rate:
        return timecode
    hours, minutes, seconds, frames = (int(g) for g in match.groups())
    counted = min(round(frames * rate / round(source_rate)), max(0, round(rate) - 1))
    return f"{hours:02d}:{minutes:02d}:{seconds:02d}:{counted:02d}"


def _mastering_param(mastering: dict[str, str], decimal: bool = False) -> str:
    """ffprobe's fractions in x264/x265 units (0.00002 for chromaticity, 0.0001 cd/m² for
    luminance), or as decimals (chromaticity, cd/m²) for SVT-AV1."""
    def xy(key: str) -> int | str:
        value = Fraction(mastering[key])
        return f"{float(value):.5f}" if decimal else round(value * 50000)

    def lum(key: str) -> int | str:
        value = Fraction(mastering[key])
        return f"{float(value):.4f}" if decimal else round(value * 10000)

    return (f"G({xy('green_x')},{xy('green_y')})B({xy('blue_x')},{xy('blue_y')})R({xy('red_x')},{xy('red_y')})"
            f"WP({xy('white_point_x')},{xy('white_point_y')})L({lum('max_luminance')},{lum('min_luminance')})")


def decide(facts: SourceFacts, settings: TranscodeSettings, rate: Fraction, mode: str) -> Picture:
    """The job's picture policy for ``facts`` encoded at ``rate`` (``mode`` as planned)."""
    video, source = settings.video, facts.video
    assert video is not None and source is not None
    pix_fmt, notes = choose_pix_fmt(video, source)
    picture = Picture(pix_fmt=pix_fmt, notes=notes)
    out_bits = (describe_pix_fmt(pix_fmt) or (8,))[0]

    if source.field_order in _FIELDS:
        words = _FIELDS[source.field_order]
        if video.interlace == "keep":
            if mode == "rate":
                raise PlanError(f"the source is interlaced ({words}) and the profile keeps its fields "
                                f"(interlace: keep), which a frame-rate change ({float(source.fps):.3f} → "
                                f"{float(rate):.3f} fps) would mix up; remove video.fps or set interlace: deinterlace")
            picture.fields = source.field_order
            picture.notes.append(f"interlaced ({words}) kept: coded as fields, flagged {source.field_order} "
                                 "(interlace: keep)")
        else:
            picture.deinterlace = source.field_order
            picture.notes.append(f"interlaced ({words}) → progressive: deinterlaced with bwdif "
                                 "(interlace: deinterlace)")

    hdr = HDR_TRANSFERS.get(source.color_transfer or "")
    if hdr and video.hdr == "tonemap":
        picture.tonemap = True
        picture.colour = {"color_primaries": "bt709", "color_trc": "bt709", "colorspace": "bt709"}
        picture.notes.append(f"HDR ({hdr}) → SDR BT.709: tone-mapped (hdr: tonemap)")
    else:
        picture.colour = {option: _OPTION_NAMES.get((option, value), value) for key, option in _COLOUR_OPTIONS
                          if (value := getattr(source, key))}
        kept = [f"{source.color_primaries or '?'}/{source.color_transfer or '?'}/{source.color_space or '?'}"]
        dropped = []
        hdr_params = video.encoder.hdr_params
        for name, value, param in (("mastering display", source.mastering, 0), ("light levels", source.light, 1)):
            if value is None:
                continue
            if hdr_params is None:
                dropped.append(name)
            elif param == 0:
                picture.params[hdr_params[0]] = _mastering_param(value, video.encoder.hdr_decimal)
                kept.append(name)
            else:
                picture.params[hdr_params[1]] = f"{value['max_content']},{value['max_average']}"
                kept.append(name)
        if picture.colour or dropped:
            label = f"HDR ({hdr})" if hdr else "colour"
            note = f"{label} kept: {', '.join(kept)}"
            if dropped:
                note += f"; {' and '.join(dropped)} dropped: {video.codec} cannot write them here"
            if hdr and out_bits < 10:
                note += f"; {hdr} in {out_bits} bits may band (hdr: tonemap makes SDR)"
            picture.notes.append(note)

    if source.timecode:
        if video.timecode == "drop":
            picture.notes.append(f"timecode {source.timecode} dropped (timecode: drop)")
        elif not settings.box.timecode:
            picture.notes.append(f"timecode {source.timecode} not kept: {settings.container} has no timecode track")
        else:
            picture.timecode = _timecode_at(source.timecode, source.fps, rate)
            picture.notes.append(f"timecode {picture.timecode} kept")
    if source.rotation:
        picture.notes.append(f"shown rotated {source.rotation}°: the pixels are turned upright")
    return picture
