"""The ``settings`` of a transcode profile, validated when the profile is loaded.

Every value is checked here, against a table of the encoders Farm knows, so that a
profile value can only ever become one whole ffmpeg argument of an expected shape,
never an option or a fragment of one.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

# -- what Farm knows about encoders and containers ----------------------------------------


class VideoEncoder(BaseModel):
    family: str  # the codec ffprobe reports for its output
    crf: tuple[int, int] | None = None  # the encoder's constant-quality range
    presets: tuple[str, ...] | None = None  # allowed ``preset`` values (None: no preset)
    profiles: tuple[str, ...] = ()
    params_option: str | None = None  # the encoder's own ``key=value:...`` option
    speed_option: str | None = None  # ``speed`` becomes this option (e.g. -cpu-used)
    two_pass: bool = False
    pix_fmt: str = "yuv420p"
    #: What it can carry (ffmpeg -h encoder=NAME), in ffmpeg 5.1; the pixel format is
    #: chosen from these at plan time, so every segment of a job is encoded alike.
    pix_fmts: tuple[str, ...] = ("yuv420p",)
    fields: bool = False  # codes interlaced pictures as fields (interlace: keep)
    #: The params keys that write HDR10 mastering-display and content-light SEI (or AV1 metadata OBUs).
    hdr_params: tuple[str, str] | None = None
    #: How its mastering display is written: x264/x265's integer units, or SVT-AV1's decimals (cd/m²).
    hdr_decimal: bool = False
    needs_bitrate: bool = False  # no quality mode, and a default bitrate no one wants (mpeg2video: 200k)
    #: The only frame rates it encodes (None: any).
    rates: tuple[Fraction, ...] | None = None


_X26X_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow", "placebo")

# Formats an encoder also takes, named only when a profile pins them (never chosen from a source).
_X264_MORE = ("yuvj420p", "yuvj422p", "yuvj444p", "nv12", "nv16", "nv21", "nv20le", "gray", "gray10le")
_X265_MORE = ("yuvj420p", "yuvj422p", "yuvj444p", "gbrp", "gbrp10le", "gbrp12le", "gray", "gray10le", "gray12le")
_VP9_MORE = ("yuv440p", "yuv440p10le", "yuv440p12le", "gbrp", "gbrp10le", "gbrp12le")
_AOM_MORE = ("gbrp", "gbrp10le", "gbrp12le", "gray", "gray10le", "gray12le")

#: MPEG-2's frame-rate table (frame_rate_code 1-8).
_MPEG_RATES = (Fraction(24000, 1001), Fraction(24), Fraction(25), Fraction(30000, 1001), Fraction(30), Fraction(50),
               Fraction(60000, 1001), Fraction(60))

VIDEO_ENCODERS: dict[str, VideoEncoder] = {
    "libx264": VideoEncoder(family="h264", crf=(0, 51), presets=_X26X_PRESETS,
                            profiles=("baseline", "main", "high", "high10", "high422", "high444"),
                            params_option="x264-params", two_pass=True,
                            pix_fmts=("yuv420p", "yuv422p", "yuv444p", "yuv420p10le", "yuv422p10le", "yuv444p10le",
                                      *_X264_MORE),
                            fields=True, hdr_params=("mastering-display", "cll")),
    "libx265": VideoEncoder(family="hevc", crf=(0, 51), presets=_X26X_PRESETS,
                            profiles=("main", "main10", "mainstillpicture", "main422-10", "main444-8"),
                            params_option="x265-params", two_pass=True,
                            pix_fmts=("yuv420p", "yuv422p", "yuv444p", "yuv420p10le", "yuv422p10le", "yuv444p10le",
                                      "yuv420p12le", "yuv422p12le", "yuv444p12le", *_X265_MORE),
                            hdr_params=("master-display", "max-cll")),
    "libvpx-vp9": VideoEncoder(family="vp9", crf=(0, 63), speed_option="cpu-used", two_pass=True,
                               pix_fmts=("yuv420p", "yuva420p", "yuv422p", "yuv444p", "yuv420p10le", "yuv422p10le",
                                         "yuv444p10le", "yuv420p12le", "yuv422p12le", "yuv444p12le", *_VP9_MORE)),
    "libsvtav1": VideoEncoder(family="av1", crf=(0, 63), presets=tuple(str(n) for n in range(14)),
                              params_option="svtav1-params", pix_fmts=("yuv420p", "yuv420p10le"),
                              hdr_params=("mastering-display", "content-light"), hdr_decimal=True),
    "libaom-av1": VideoEncoder(family="av1", crf=(0, 63), speed_option="cpu-used", two_pass=True,
                               pix_fmts=("yuv420p", "yuv422p", "yuv444p", "yuv420p10le", "yuv422p10le", "yuv444p10le",
                                         "yuv420p12le", "yuv422p12le", "yuv444p12le", *_AOM_MORE)),
    # MPEG-2 as XDCAM HD422 and IMX carry it (4:2:2, fields): long GOPs, closed at every segment's start.
    "mpeg2video": VideoEncoder(family="mpeg2video", pix_fmt="yuv422p", pix_fmts=("yuv420p", "yuv422p"), fields=True,
                               needs_bitrate=True, rates=_MPEG_RATES),
    "prores_ks": VideoEncoder(family="prores", profiles=("proxy", "lt", "standard", "hq", "4444", "4444xq"),
                              pix_fmt="yuv422p10le", pix_fmts=("yuv422p10le", "yuv444p10le", "yuva444p10le"),
                              fields=True),
}

AUDIO_ENCODERS: dict[str, str] = {  # encoder -> codec ffprobe reports ("copy": the source's)
    "aac": "aac",
    "libopus": "opus",
    "libvorbis": "vorbis",
    "libmp3lame": "mp3",
    "ac3": "ac3",
    "flac": "flac",
    "pcm_s16le": "pcm_s16le",
    "pcm_s24le": "pcm_s24le",
    "copy": "copy",
}


class Container(BaseModel):
    muxer: str  # ffmpeg's muxer name
    ext: str
    video: tuple[str, ...]  # codec families it may hold
    audio: tuple[str, ...]  # audio encoders it may hold
    subtitles: str | None  # subtitle encoder for text subtitles, or None
    mp4_like: bool = False  # has a per-track timescale and +faststart
    timecode: bool = False  # keeps a start timecode (a timecode track, or MXF's material package)
    #: The muxer and extension of the audio piece, for a container that cannot hold audio alone (MXF).
    audio_piece: tuple[str, str] | None = None


CONTAINERS: dict[str, Container] = {
    "mp4": Container(muxer="mp4", ext="mp4", video=("h264", "hevc", "av1", "vp9"),
                     audio=("aac", "libopus", "libmp3lame", "ac3", "flac", "copy"), subtitles="mov_text", mp4_like=True,
                     timecode=True),
    "mov": Container(muxer="mov", ext="mov", video=("h264", "hevc", "prores"),
                     audio=("aac", "pcm_s16le", "pcm_s24le", "copy"), subtitles="mov_text", mp4_like=True,
                     timecode=True),
    # OP1a, as broadcasters exchange it: one video track first, PCM audio.
    "mxf": Container(muxer="mxf", ext="mxf", video=("mpeg2video",), audio=("pcm_s16le", "pcm_s24le"), subtitles=None,
                     timecode=True, audio_piece=("matroska", "mka")),
    "mkv": Container(muxer="matroska", ext="mkv", video=("h264", "hevc", "vp9", "av1", "prores"),
                     audio=tuple(AUDIO_ENCODERS), subtitles="copy"),
    "webm": Container(muxer="webm", ext="webm", video=("vp9", "av1"), audio=("libopus", "libvorbis"),
                      subtitles="webvtt"),
    "m4a": Container(muxer="ipod", ext="m4a", video=(), audio=("aac", "copy"), subtitles=None, mp4_like=True),
}

_BITRATE = re.compile(r"^\d+(\.\d+)?[kKM]?$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_PARAM_VALUE = re.compile(r"^[A-Za-z0-9_.+/-]+$")
_RATE = re.compile(r"^\d+(\.\d+)?$|^\d+/\d+$")
_GOP_SECONDS = re.compile(r"^\d+(\.\d+)?s$")


def parse_rate(value: str | float | int) -> Fraction:
    """``25``, ``29.97`` (read as 30000/1001), ``24000/1001`` -> an exact fraction."""
    text = str(value).strip()
    if "/" in text:
        num, den = text.split("/", 1)
        return Fraction(int(num), int(den))
    rate = Fraction(text)
    for exact in (Fraction(24000, 1001), Fraction(30000, 1001), Fraction(60000, 1001), Fraction(120000, 1001)):
        if abs(float(rate) - float(exact)) < 0.006:  # 23.976, 29.97, 59.94 as people write them
            return exact
    return rate.limit_denominator(1001)


def _depth_of(pix_fmt: str) -> int:
    match = re.search(r"p(\d+)(le|be)$", pix_fmt)
    return int(match.group(1)) if match else 8


_PLANAR_YUV = re.compile(r"^yuv(a?)j?(4\d\d)p(\d+)?(le|be)?$")
_SEMI_PLANAR = {"nv12": (8, 420), "nv21": (8, 420), "nv16": (8, 422), "nv24": (8, 444), "nv20le": (10, 422),
                "p010le": (10, 420), "p016le": (16, 420), "p210le": (10, 422), "p410le": (10, 444)}


def describe_pix_fmt(pix_fmt: str | None) -> tuple[int, int, bool] | None:
    """``(bits, chroma, alpha)`` of a pixel format: ``yuv422p10le`` -> (10, 422, False);
    RGB counts as 4:4:4 and grey as 4:2:0 (what a YUV encoder makes of them). None: not known."""
    if not pix_fmt:
        return None
    match = _PLANAR_YUV.match(pix_fmt)
    if match:
        chroma = int(match.group(2))
        return (int(match.group(3) or 8), chroma if chroma in (420, 422, 444) else 420, bool(match.group(1)))
    if pix_fmt in _SEMI_PLANAR:
        bits, chroma = _SEMI_PLANAR[pix_fmt]
        return bits, chroma, False
    rgb = re.match(r"^(gbra?p|rgba|bgra|argb|abgr|0rgb|rgb0|bgr0|0bgr|rgb|bgr)(\d*)(le|be)?$", pix_fmt)
    if rgb:
        alpha = "a" in rgb.group(1).replace("gbrap", "gbra")
        bits = int(rgb.group(2)) if rgb.group(2) else 8
        if rgb.group(1) in ("rgb", "bgr", "rgba", "bgra") and bits in (24, 32, 48, 64):  # rgb24, rgba64: per pixel
            bits = bits // (4 if rgb.group(1) in ("rgba", "bgra") else 3)
        return bits, 444, alpha
    grey = re.match(r"^(ya|gray)(\d*)(le|be)?$", pix_fmt)
    if grey:
        bits = int(grey.group(2)) if grey.group(2) else 8
        return bits, 420, grey.group(1) == "ya"
    return None


def _check_bitrate(value: str | None) -> str | None:
    if value is not None and not _BITRATE.match(value):
        raise ValueError(f"expected a bitrate such as 5M, 800k or 128000, got {value!r}")
    return value


# -- the settings --------------------------------------------------------------------------


class VideoSettings(BaseModel):
    """How the video is encoded; `farm plan` says what it changes in each job's picture."""

    model_config = ConfigDict(extra="forbid")

    codec: str = Field(default="libx264", description="the encoder: " + ", ".join(VIDEO_ENCODERS))
    crf: float | None = Field(default=None, ge=0, description="constant quality (lower is better)")
    bitrate: str | None = Field(default=None, description="target bitrate, e.g. 5M (instead of crf)")
    maxrate: str | None = Field(default=None, description="peak bitrate for VBV, e.g. 8M")
    bufsize: str | None = Field(default=None, description="VBV buffer size, e.g. 16M")
    preset: str | None = Field(default=None, description="encoder preset (x264/x265 names, SVT-AV1 0-13)")
    speed: int | None = Field(default=None, ge=0, le=8, description="-cpu-used for VP9 and libaom AV1")
    profile: str | None = Field(default=None, description="codec profile: high, main10, proxy, hq, ...")
    tune: str | None = Field(default=None, description="encoder tune, e.g. film, animation")
    pix_fmt: str | None = Field(
        default=None, description="pins the pixel format (yuv420p, yuv422p10le, ...); unset: the source's, within "
                                  "bit_depth, chroma and alpha, as near as the encoder can carry it")
    bit_depth: Literal["source", 8, 10, 12] = Field(
        default="source", description="bits per sample: source keeps 10 and 12 bits where the encoder carries them")
    chroma: Literal["source", 420, 422, 444] = Field(
        default="source", description="chroma subsampling: source keeps 4:2:2 and 4:4:4 where the encoder carries them")
    alpha: Literal["keep", "drop"] = Field(
        default="keep", description="a source's alpha channel: kept where the encoder carries it (ProRes 4444, VP9)")
    interlace: Literal["deinterlace", "keep"] = Field(
        default="deinterlace", description="an interlaced source: deinterlace it field-aware (bwdif, same frame rate), "
                                           "or keep its fields, field order and flags (libx264, mpeg2video, prores_ks)")
    hdr: Literal["keep", "tonemap"] = Field(
        default="keep", description="colour primaries, transfer, matrix, HDR10 mastering display and light levels: "
                                    "keep them, or tone-map a PQ/HLG source to SDR BT.709")
    timecode: Literal["keep", "drop"] = Field(
        default="keep", description="the source's start timecode, kept in mp4, mov and mxf outputs")
    width: int | None = Field(default=None, ge=16, le=16384, description="scale to this width (aspect kept)")
    height: int | None = Field(default=None, ge=16, le=16384, description="scale to this height (aspect kept)")
    fps: str | None = Field(default=None, description="constant output frame rate: 25, 29.97, 30000/1001")
    gop: int | str | None = Field(default=None, description="keyframe interval in frames (48) or seconds (2s)")
    passes: Literal[1, 2] = Field(default=1, description="2 for a two-pass bitrate encode (not segmented)")
    threads: int | None = Field(default=None, ge=1, le=64,
                                description="threads per encoder (default: the node's cores / its slots)")
    params: dict[str, str | int | float] = Field(
        default_factory=dict, description="the encoder's own key=value options (x264-params, x265-params, svtav1-params)")

    @field_validator("codec")
    @classmethod
    def _codec(cls, value: str) -> str:
        if value not in VIDEO_ENCODERS:
            raise ValueError(f"unknown video encoder {value!r}; expected one of {', '.join(VIDEO_ENCODERS)}")
        return value

    @field_validator("crf")
    @classmethod
    def _crf(cls, value: float | None, info: ValidationInfo) -> float | None:
        encoder = VIDEO_ENCODERS.get(info.data.get("codec", ""))
        if value is None or encoder is None:
            return value
        if encoder.crf is None:
            raise ValueError(f"{info.data['codec']} has no constant-quality mode; use profile or bitrate")
        low, high = encoder.crf
        if not low <= value <= high:
            raise ValueError(f"crf {value:g} is outside {info.data['codec']}'s range {low}-{high}")
        return value

    @field_validator("bitrate", "maxrate", "bufsize")
    @classmethod
    def _bitrates(cls, value: str | None) -> str | None:
        return _check_bitrate(value)

    @field_validator("preset")
    @classmethod
    def _preset(cls, value: str | None, info: ValidationInfo) -> str | None:
        encoder = VIDEO_ENCODERS.get(info.data.get("codec", ""))
        if value is None or encoder is None:
            return value
        value = str(value)
        if encoder.presets is None:
            hint = f"; use speed ({encoder.speed_option})" if encoder.speed_option else ""
            raise ValueError(f"{info.data['codec']} has no presets{hint}")
        if value not in encoder.presets:
            raise ValueError(f"unknown preset {value!r} for {info.data['codec']}; expected one of {', '.join(encoder.presets)}")
        return value

    @field_validator("preset", mode="before")
    @classmethod
    def _preset_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("speed")
    @classmethod
    def _speed(cls, value: int | None, info: ValidationInfo) -> int | None:
        encoder = VIDEO_ENCODERS.get(info.data.get("codec", ""))
        if value is not None and encoder is not None and encoder.speed_option is None:
            raise ValueError(f"{info.data['codec']} takes no speed; use preset")
        return value

    @field_validator("profile")
    @classmethod
    def _profile(cls, value: str | None, info: ValidationInfo) -> str | None:
        encoder = VIDEO_ENCODERS.get(info.data.get("codec", ""))
        if value is None or encoder is None:
            return value
        if value not in encoder.profiles:
            known = ", ".join(encoder.profiles) or "none"
            raise ValueError(f"unknown profile {value!r} for {info.data['codec']}; expected one of {known}")
        return value

    @field_validator("bit_depth", "chroma", mode="before")
    @classmethod
    def _number_text(cls, value: Any) -> Any:
        return int(value) if isinstance(value, str) and value.isdigit() else value

    @field_validator("tune", "pix_fmt")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and not _NAME.match(value):
            raise ValueError(f"expected a plain name such as film or yuv420p, got {value!r}")
        return value

    @field_validator("fps", mode="before")
    @classmethod
    def _fps(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, bool) or not _RATE.match(str(value).strip()):
            raise ValueError(f"expected a frame rate such as 25, 29.97 or 30000/1001, got {value!r}")
        rate = parse_rate(value)
        if not 1 <= rate <= 240:
            raise ValueError(f"a frame rate must be between 1 and 240, got {value!r}")
        return f"{rate.numerator}/{rate.denominator}"

    @field_validator("gop")
    @classmethod
    def _gop(cls, value: int | str | None) -> int | str | None:
        if isinstance(value, int) and value < 1:
            raise ValueError(f"a keyframe interval must be at least 1 frame, got {value}")
        if isinstance(value, str) and not _GOP_SECONDS.match(value):
            raise ValueError(f"expected frames (48) or seconds (2s), got {value!r}")
        return value

    @field_validator("params")
    @classmethod
    def _params(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        encoder = VIDEO_ENCODERS.get(info.data.get("codec", ""))
        if value and encoder is not None and encoder.params_option is None:
            raise ValueError(f"{info.data['codec']} takes no params")
        for key, item in value.items():
            if not _NAME.match(key) or isinstance(item, bool) or not _PARAM_VALUE.match(str(item)):
                raise ValueError(f"params: {key}={item!r} is not a plain key=value pair")
        return value

    @model_validator(mode="after")
    def _rate_control(self) -> VideoSettings:
        if self.crf is not None and self.bitrate is not None:
            raise ValueError("give crf or bitrate, not both")
        if self.passes == 2:
            if self.bitrate is None:
                raise ValueError("a two-pass encode needs a bitrate")
            if not VIDEO_ENCODERS[self.codec].two_pass:
                raise ValueError(f"{self.codec} is not used two-pass here")
        if self.encoder.needs_bitrate and self.bitrate is None:
            raise ValueError(f"{self.codec} needs a bitrate (it has no constant-quality mode), e.g. bitrate: 50M")
        if (self.maxrate is None) != (self.bufsize is None):
            raise ValueError("maxrate and bufsize go together")
        carried = self.pix_fmts
        if self.pix_fmt is not None:
            if self.bit_depth != "source" or self.chroma != "source":
                raise ValueError("pix_fmt pins the bit depth and the chroma; give pix_fmt, or bit_depth and chroma")
            if self.pix_fmt not in carried:
                raise ValueError(f"{self.codec}{self._profile_words()} cannot encode pix_fmt {self.pix_fmt}; "
                                 f"expected one of {', '.join(carried)}")
        if self.chroma != "source" and not any(f"{self.chroma}p" in name for name in carried):
            raise ValueError(f"{self.codec}{self._profile_words()} cannot encode chroma {self.chroma}")
        if self.bit_depth != "source" and not any(_depth_of(name) == self.bit_depth for name in carried):
            raise ValueError(f"{self.codec}{self._profile_words()} cannot encode {self.bit_depth}-bit video")
        if self.interlace == "keep" and not self.encoder.fields:
            fields = ", ".join(name for name, e in VIDEO_ENCODERS.items() if e.fields)
            raise ValueError(f"interlace: keep needs an encoder that codes fields ({fields}); {self.codec} does not")
        return self

    def _profile_words(self) -> str:
        return f" with profile {self.profile}" if self.profile and self.codec == "prores_ks" else ""

    @property
    def pix_fmts(self) -> tuple[str, ...]:
        """The pixel formats this encoder, with this codec profile, can encode."""
        if self.codec == "prores_ks" and self.profile is not None:  # 4:2:2 profiles, and 4:4:4(:4) ones
            return ("yuv444p10le", "yuva444p10le") if self.profile.startswith("4444") else ("yuv422p10le",)
        return self.encoder.pix_fmts

    @property
    def encoder(self) -> VideoEncoder:
        return VIDEO_ENCODERS[self.codec]

    def gop_frames(self, rate: Fraction) -> int | None:
        if self.gop is None:
            return None
        if isinstance(self.gop, int):
            return self.gop
        return max(1, round(float(self.gop[:-1]) * rate))


class AudioSettings(BaseModel):
    """How the audio is encoded: once, over the whole duration."""

    model_config = ConfigDict(extra="forbid")

    codec: str = Field(default="aac", description="the encoder: " + ", ".join(AUDIO_ENCODERS))
    bitrate: str | None = Field(default=None, description="e.g. 192k")
    channels: int | None = Field(default=None, ge=1, le=8)
    sample_rate: int | None = Field(default=None, ge=8000, le=192000)
    tracks: Literal["all", "first"] | list[int] = Field(
        default="all", description="which audio tracks to keep: all, first, or a list of indexes from 0")

    @field_validator("codec")
    @classmethod
    def _codec(cls, value: str) -> str:
        if value not in AUDIO_ENCODERS:
            raise ValueError(f"unknown audio encoder {value!r}; expected one of {', '.join(AUDIO_ENCODERS)}")
        return value

    @field_validator("bitrate")
    @classmethod
    def _bitrate(cls, value: str | None) -> str | None:
        return _check_bitrate(value)

    @field_validator("tracks")
    @classmethod
    def _tracks(cls, value: Any) -> Any:
        if isinstance(value, list):
            if not value or any(index < 0 for index in value) or len(set(value)) != len(value):
                raise ValueError("expected distinct audio track indexes from 0, such as [0, 1]")
        return value

    @model_validator(mode="after")
    def _copy(self) -> AudioSettings:
        if self.codec == "copy" and (self.bitrate or self.channels or self.sample_rate):
            raise ValueError("copy keeps the source's audio as it is; remove bitrate, channels and sample_rate")
        return self


class TranscodeSettings(BaseModel):
    """Settings of the ``transcode`` processor."""

    model_config = ConfigDict(extra="forbid")

    container: Literal["mp4", "mov", "mxf", "mkv", "webm", "m4a"] = "mp4"
    video: VideoSettings | None = Field(default_factory=VideoSettings, description="null for audio only")
    audio: AudioSettings | None = Field(default_factory=AudioSettings, description="null to drop the audio")
    segmented: bool = Field(default=True, description="false: encode in one segment (two-pass, or codecs that "
                                                      "segmenting would harm)")
    vfr: Literal["single", "convert"] = Field(
        default="single", description="a variable-frame-rate source: encode it as one segment with its own "
                                      "timing, or convert it to video.fps (or its average rate) and segment it")
    subtitles: bool = Field(default=True, description="keep text subtitles where the container allows")
    metadata: bool = Field(default=True, description="keep the source's metadata and chapters")

    @model_validator(mode="after")
    def _fits(self) -> TranscodeSettings:
        box = CONTAINERS[self.container]
        if self.video is None and self.audio is None:
            raise ValueError("video and audio are both null: nothing to make")
        if self.video is not None:
            family = self.video.encoder.family
            if family not in box.video:
                fits = ", ".join(name for name, c in CONTAINERS.items() if family in c.video)
                raise ValueError(f"container {self.container} cannot hold {self.video.codec} video; use {fits}")
            if self.video.passes == 2 and self.segmented:
                raise ValueError("a two-pass encode cannot be segmented (each segment would spend its own bits); "
                                 "set segmented: false")
        if self.audio is not None and self.audio.codec not in box.audio:
            raise ValueError(f"container {self.container} cannot hold {self.audio.codec} audio; "
                             f"use one of {', '.join(box.audio)}")
        return self

    @property
    def box(self) -> Container:
        return CONTAINERS[self.container]
