"""What one transcode may change in the picture, and that `farm plan` says so.

Bit depth and chroma, interlaced fields, colour and HDR10 metadata, timecode, alpha and
rotation: each source is made by ffmpeg's lavfi sources, each output checked the way a
user would check it, with ffprobe (pix_fmt, profile, field_order, colour tags, frame side
data, timecode tags) or with PSNR against the source.
"""

from __future__ import annotations

import json
import statistics
import subprocess
from fractions import Fraction
from pathlib import Path

import pytest

from conftest import write_profile
from test_transcode import X264, probe, psnr, run_json

pytestmark = pytest.mark.skipif(
    subprocess.run(["which", "ffmpeg"], capture_output=True).returncode != 0, reason="ffmpeg is not installed"
)

FAST = ["--set", "segment.seconds=1", "--set", "settings.video.gop=25"]
HDR10 = "G(13250,34500)B(7500,3000)R(34000,16000)WP(15635,16450)L(10000000,1)"


def make(path: Path, *args: str, seconds: float = 4, rate: int = 25, vf: str | None = None) -> Path:
    """testsrc2 (and a sine tone) through ``args``: the codec and tags of the source."""
    cmd = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-y",
           "-f", "lavfi", "-i", f"testsrc2=size=320x240:rate={rate}:duration={seconds}",
           "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:duration={seconds}"]
    if vf:
        cmd += ["-vf", vf]
    subprocess.run([*cmd, *args, str(path)], check=True)
    return path


def video(path: Path) -> dict:
    return next(s for s in probe(path)["streams"] if s["codec_type"] == "video")


def first_frame(path: Path) -> dict:
    out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-read_intervals", "%+#1",
                          "-show_frames", "-of", "json", str(path)], capture_output=True, text=True, check=True).stdout
    return json.loads(out)["frames"][0]


def side_data(frame: dict, kind: str) -> dict:
    return next((d for d in frame.get("side_data_list", []) if d["side_data_type"] == kind), {})


def transcode(folder: Path, name: str, vsettings: dict, *, container: str = "mp4", **settings) -> Path:
    audio = {"codec": "pcm_s16le"} if container == "mov" else {"codec": "aac"}
    return write_profile(folder, name, {"processor": "transcode", "segment": {"seconds": 1},
                                        "settings": {"container": container, "video": vsettings, "audio": audio,
                                                     **settings},
                                        "output": "{stem}-{profile}.{ext}", "retries": 0})


def run_one(farm, profile, source: Path, out: Path, *more: str) -> Path:
    code, report = run_json(farm, profile, source, "-o", out, *FAST, *more)
    job = report["jobs"][0]
    assert code == 0 and job["state"] == "done", job
    assert job["segments"] >= 4, job  # segmented: the policies hold across joins
    return Path(job["outputs"][0])


def plan_text(farm, profile, source: Path, *more: str) -> str:
    result = farm("plan", profile, source, *more)
    assert result.returncode == 0, result.stderr
    return result.stdout


# -- bit depth and chroma -------------------------------------------------------------------------


@pytest.mark.slow
def test_10_bit_422_kept_where_the_codec_carries_it_and_every_loss_said(farm, farm_env):
    tmp = farm_env["tmp"]
    source = make(tmp / "prores.mov", "-c:v", "prores_ks", "-profile:v", "hq", "-pix_fmt", "yuv422p10le",
                  "-c:a", "pcm_s16le")
    assert "10-bit → 8-bit, 4:2:2 → 4:2:0: the profile pins yuv420p" in plan_text(farm, "h264-web-720p", source)
    assert "4:2:2 → 4:2:0: the profile sets chroma: 420" in plan_text(farm, "hevc", source)

    hevc = run_one(farm, "hevc", source, tmp / "out", "--set", "settings.video.preset=ultrafast")
    stream = video(hevc)
    assert (stream["codec_name"], stream["profile"], stream["pix_fmt"]) == ("hevc", "Main 10", "yuv420p10le")
    assert stream["nb_read_packets"] == "100"

    free = transcode(tmp, "x264-source", {"codec": "libx264", "crf": 18, "preset": "ultrafast"})
    assert "picture: yuv422p10le (10-bit 4:2:2; the source 10-bit 4:2:2)" in plan_text(farm, free, source)
    x264 = run_one(farm, free, source, tmp / "out")
    stream = video(x264)
    assert (stream["profile"], stream["pix_fmt"], stream["nb_read_packets"]) == ("High 4:2:2", "yuv422p10le", "100")
    assert min(psnr(x264, source)) > 35  # every frame in its place across the joins


@pytest.mark.slow
def test_a_pixel_format_the_encoder_cannot_make_is_refused_at_load(farm, farm_env):
    tmp = farm_env["tmp"]
    source = make(tmp / "in.mp4", "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", seconds=1)
    for vsettings, words in [
        ({"codec": "prores_ks", "profile": "proxy", "pix_fmt": "yuva444p10le"},
         "prores_ks with profile proxy cannot encode pix_fmt yuva444p10le"),
        ({"codec": "libsvtav1", "chroma": 422}, "libsvtav1 cannot encode chroma 422"),
        ({**X264, "bit_depth": 10}, "pix_fmt pins the bit depth and the chroma"),
        ({"codec": "libvpx-vp9", "interlace": "keep"}, "interlace: keep needs an encoder that codes fields"),
    ]:
        container = "mov" if vsettings["codec"] == "prores_ks" else "mkv"
        result = farm("plan", transcode(tmp, "bad", vsettings, container=container), source)
        assert result.returncode == 2 and words in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


# -- interlace ---------------------------------------------------------------------------------


def interlaced(path: Path) -> Path:
    """25 fps, top field first: fields 1/50 s apart, coded as fields by x264."""
    return make(path, "-c:v", "libx264", "-flags", "+ildct+ilme", "-preset", "ultrafast", "-crf", "12",
                "-pix_fmt", "yuv420p", "-c:a", "aac", rate=50, vf="tinterlace=mode=interleave_top,setfield=tff")


@pytest.mark.slow
def test_an_interlaced_source_is_deinterlaced_field_aware_never_woven(farm, farm_env):
    tmp = farm_env["tmp"]
    source = interlaced(tmp / "tff.mp4")
    assert video(source)["field_order"] == "tt"
    path = transcode(tmp, "web", X264)
    assert "interlaced (top field first) → progressive: deinterlaced with bwdif" in plan_text(farm, path, source)
    out = run_one(farm, path, source, tmp / "out")
    stream = video(out)
    assert stream["field_order"] == "progressive" and stream["nb_read_packets"] == "100"
    assert first_frame(out)["interlaced_frame"] == 0
    # Woven fields would match the source as it is; deinterlaced ones match it deinterlaced.
    woven = tmp / "woven.mp4"
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-i", str(source), "-c:v", "libx264", "-crf", "0",
                    "-preset", "ultrafast", str(woven)], check=True)
    deinterlaced = tmp / "bwdif.mp4"
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-i", str(source), "-vf",
                    "bwdif=mode=send_frame:parity=tff:deint=all", "-c:v", "libx264", "-crf", "0",
                    "-preset", "ultrafast", str(deinterlaced)], check=True)
    against_woven, against_bwdif = psnr(out, woven), psnr(out, deinterlaced)
    assert statistics.mean(against_bwdif) > statistics.mean(against_woven) + 3, \
        (statistics.mean(against_bwdif), statistics.mean(against_woven))
    assert min(against_bwdif) > 30  # no frame shifted at a join


@pytest.mark.slow
def test_interlace_keep_codes_fields_with_their_order_and_flags(farm, farm_env):
    tmp = farm_env["tmp"]
    source = interlaced(tmp / "tff.mp4")
    path = transcode(tmp, "broadcast", {**X264, "interlace": "keep"})
    assert "interlaced (top field first) kept: coded as fields, flagged tff (interlace: keep)" in \
        plan_text(farm, path, source)
    out = run_one(farm, path, source, tmp / "out")
    stream = video(out)
    assert stream["field_order"] == "tt" and stream["nb_read_packets"] == "100"
    frame = first_frame(out)
    assert (frame["interlaced_frame"], frame["top_field_first"]) == (1, 1)
    assert min(psnr(out, source)) > 30
    changed = farm("plan", path, source, "--set", "settings.video.fps=30")
    assert changed.returncode == 2 and "interlace: keep" in changed.stderr and "25.000 → 30.000 fps" in changed.stderr


@pytest.mark.slow
def test_an_output_whose_fields_are_not_what_the_plan_promised_is_not_delivered(farm, farm_env):
    """A progressive plan, and x264 told by the profile's own params to flag fields (tff=1):
    verification names the flag and the promise, and nothing reaches the destination."""
    tmp = farm_env["tmp"]
    source = make(tmp / "prog.mp4", "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac",
                  seconds=2)
    path = transcode(tmp, "flagged", {**X264, "params": {"tff": 1}})
    code, report = run_json(farm, path, source, "-o", tmp / "out", *FAST)
    job = report["jobs"][0]
    assert code == 1 and job["state"] == "failed"
    assert "video is flagged tt (top field first), the plan promised progressive" in job["error"], job["error"]
    assert not (tmp / "out" / "prog-flagged.mp4").exists()


@pytest.mark.parametrize("stream, promised, fields, said", [
    ({"pix_fmt": "yuv420p", "field_order": "progressive"}, "yuv422p10le", None,
     "video is yuv420p, the plan promised yuv422p10le"),
    ({"pix_fmt": "yuv444p12le", "field_order": "progressive"}, "yuva444p10le", None,
     "video is yuv444p12le, the plan promised yuva444p10le"),
    ({"pix_fmt": "yuva444p12le", "field_order": "progressive"}, "yuva444p10le", None, None),  # ProRes decodes 12-bit
    ({"pix_fmt": "yuv420p", "field_order": "bb"}, "yuv420p", "tff",
     "video is flagged bb (bottom field first), the plan promised top field first"),
    ({"pix_fmt": "yuv420p"}, "yuv420p", "tff", "video is not flagged interlaced, the plan promised top field first"),
    ({"pix_fmt": "yuv420p", "field_order": "bt"}, "yuv420p", "tff", None),  # shown top first
    ({"pix_fmt": "yuv420p", "field_order": "unknown"}, "yuv420p", None, None),
])
def test_the_verifier_holds_the_picture_to_the_plan(stream, promised, fields, said):
    from farm_transcode.probe import OutputFacts
    from farm_transcode.verify import Expected, problems

    found = OutputFacts({"duration": "1.0"}, [{"index": 0, "codec_type": "video", "codec_name": "h264",
                                               "nb_read_packets": "25", "duration": "1.0", **stream}])
    expected = Expected(video_frames=25, video_duration=1.0, frame_duration=0.04, pix_fmt=promised, fields=fields,
                        check_fields=True)
    assert problems(found, expected) == ([said] if said else [])


# -- colour and HDR ------------------------------------------------------------------------------


def hdr10(path: Path, seconds: float = 4) -> Path:
    return make(path, "-c:v", "libx265", "-preset", "ultrafast", "-pix_fmt", "yuv420p10le",
                "-color_primaries", "bt2020", "-color_trc", "smpte2084", "-colorspace", "bt2020nc",
                "-x265-params", f"log-level=error:hdr10=1:master-display={HDR10}:max-cll=1000,400", "-c:a", "aac",
                seconds=seconds)


@pytest.mark.slow
def test_hdr10_colour_and_metadata_kept_or_tone_mapped_when_the_profile_says(farm, farm_env):
    tmp = farm_env["tmp"]
    source = hdr10(tmp / "hdr.mp4")
    keep = transcode(tmp, "x265", {"codec": "libx265", "crf": 28, "preset": "ultrafast"})
    assert "HDR (PQ) kept: bt2020/smpte2084/bt2020nc, mastering display, light levels" in plan_text(farm, keep, source)
    out = run_one(farm, keep, source, tmp / "out")
    stream = video(out)
    assert (stream["pix_fmt"], stream["color_primaries"], stream["color_transfer"], stream["color_space"]) == \
        ("yuv420p10le", "bt2020", "smpte2084", "bt2020nc")
    frame, original = first_frame(out), first_frame(source)
    mastering = side_data(frame, "Mastering display metadata")
    assert mastering and mastering == side_data(original, "Mastering display metadata")
    light = side_data(frame, "Content light level metadata")
    assert (light.get("max_content"), light.get("max_average")) == (1000, 400)

    web = plan_text(farm, "h264-web-720p", source)
    assert "10-bit → 8-bit: the profile pins yuv420p" in web and "PQ in 8 bits may band" in web
    sdr = transcode(tmp, "sdr", {**X264, "hdr": "tonemap"})
    assert "HDR (PQ) → SDR BT.709: tone-mapped (hdr: tonemap)" in plan_text(farm, sdr, source)
    out = run_one(farm, sdr, source, tmp / "out")
    stream = video(out)
    assert (stream["pix_fmt"], stream["color_primaries"], stream["color_transfer"], stream["color_space"]) == \
        ("yuv420p", "bt709", "bt709", "bt709")
    assert not side_data(first_frame(out), "Mastering display metadata")


def _fractions(data: dict) -> dict[str, float]:
    return {key: float(Fraction(str(value))) for key, value in data.items() if key != "side_data_type"}


@pytest.mark.slow
@pytest.mark.parametrize("name, vsettings, container, carried", [
    ("av1", {"codec": "libsvtav1", "crf": 45, "preset": "12", "gop": 25}, "mp4", True),
    ("vp9", {"codec": "libvpx-vp9", "crf": 45, "speed": 8, "gop": 25}, "webm", False),
    ("prores", {"codec": "prores_ks", "profile": "proxy"}, "mov", False),
])
def test_hdr10_through_encoders_other_than_x26x(farm, farm_env, name, vsettings, container, carried):
    """Colour tags kept by every encoder; mastering display and light levels by SVT-AV1
    (its metadata OBUs), and said to be dropped where the encoder cannot write them."""
    tmp = farm_env["tmp"]
    source = hdr10(tmp / "hdr.mp4", seconds=3)
    audio = {"codec": "libopus"} if container == "webm" else None
    path = transcode(tmp, name, vsettings, container=container, **({"audio": audio} if audio else {}))
    said = plan_text(farm, path, source)
    if carried:
        assert "HDR (PQ) kept: bt2020/smpte2084/bt2020nc, mastering display, light levels" in said, said
    else:
        assert (f"HDR (PQ) kept: bt2020/smpte2084/bt2020nc; mastering display and light levels dropped: "
                f"{vsettings['codec']} cannot write them here") in said, said
    out = run_one(farm, path, source, tmp / "out")
    stream = video(out)
    assert (stream["color_primaries"], stream["color_transfer"], stream["color_space"]) == \
        ("bt2020", "smpte2084", "bt2020nc")
    assert stream["pix_fmt"].startswith(("yuv420p10", "yuv422p10"))
    frame = first_frame(out)
    mastering = _fractions(side_data(frame, "Mastering display metadata"))
    if carried:
        original = _fractions(side_data(first_frame(source), "Mastering display metadata"))
        assert mastering.keys() == original.keys()
        assert all(abs(mastering[key] - original[key]) <= max(0.0001, original[key] / 1000) for key in original), \
            (mastering, original)
        light = side_data(frame, "Content light level metadata")
        assert (light.get("max_content"), light.get("max_average")) == (1000, 400)
    else:
        assert not mastering


# -- timecode, alpha, rotation ---------------------------------------------------------------------


def timecodes(path: Path) -> list[str]:
    data = probe(path)
    tags = [data["format"].get("tags", {}), *(s.get("tags", {}) for s in data["streams"])]
    return [t["timecode"] for t in tags if "timecode" in t]


@pytest.mark.slow
def test_a_start_timecode_is_kept_in_mp4_and_mov_unless_dropped(farm, farm_env):
    tmp = farm_env["tmp"]
    source = make(tmp / "tc.mov", "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
                  "-c:a", "pcm_s16le", "-timecode", "01:00:00:10")
    path = transcode(tmp, "tc", X264, metadata=False)  # the timecode is kept even without the other tags
    assert "timecode 01:00:00:10 kept" in plan_text(farm, path, source)
    assert "timecode 01:00:00:20 kept" in plan_text(farm, path, source, "--set", "settings.video.fps=50")
    out = run_one(farm, path, source, tmp / "out")
    assert "01:00:00:10" in timecodes(out)
    assert any(s["codec_type"] == "data" and s.get("codec_tag_string") == "tmcd" for s in probe(out)["streams"])

    drop = transcode(tmp, "notc", {**X264, "timecode": "drop"}, container="mov")
    assert "timecode 01:00:00:10 dropped (timecode: drop)" in plan_text(farm, drop, source)
    out = run_one(farm, drop, source, tmp / "out")
    assert timecodes(out) == []


@pytest.mark.slow
def test_prores_4444_keeps_its_alpha_and_a_proxy_says_it_drops_it(farm, farm_env):
    tmp = farm_env["tmp"]
    # Alpha that changes across the picture, so that a kept plane is told from an opaque one.
    source = make(tmp / "alpha.mov", "-c:v", "prores_ks", "-profile:v", "4444", "-c:a", "pcm_s16le",
                  vf="format=yuva444p10le,geq=lum='lum(X,Y)':cb='cb(X,Y)':cr='cr(X,Y)':a='X*4'", seconds=4)
    assert "alpha dropped: ProRes proxy carries no alpha" in plan_text(farm, "prores-proxy", source)
    assert "alpha dropped" not in plan_text(farm, "prores-4444", source)
    out = run_one(farm, "prores-4444", source, tmp / "out")
    stream = video(out)
    assert stream["profile"] == "4444" and stream["pix_fmt"].startswith("yuva444p")
    planes = []
    for movie in (out, source):
        plane = tmp / f"{movie.stem}-alpha.mkv"
        subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-i", str(movie), "-vf", "alphaextract",
                        "-c:v", "ffv1", str(plane)], check=True)
        planes.append(plane)
    assert min(psnr(*planes)) > 40


@pytest.mark.slow
def test_rotation_is_said_and_the_picture_shown_the_same_way(farm, farm_env):
    tmp = farm_env["tmp"]
    plain = make(tmp / "plain.mp4", "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
                 "-c:a", "aac", seconds=4)
    source = tmp / "turned.mp4"
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-i", str(plain), "-c", "copy",
                    "-metadata:s:v:0", "rotate=90", str(source)], check=True)
    assert "shown rotated 90°: the pixels are turned upright" in plan_text(farm, transcode(tmp, "r", X264), source)
    out = run_one(farm, transcode(tmp, "r", X264), source, tmp / "out")
    stream = video(out)
    turned = next(d for d in video(source)["side_data_list"] if d["side_data_type"] == "Display Matrix")
    assert turned["rotation"] == 90
    shown = [d.get("rotation", 0) for d in stream.get("side_data_list", []) if d["side_data_type"] == "Display Matrix"]
    assert (stream["width"], stream["height"]) == (240, 320) and shown in ([], [0])


def test_the_probe_learns_the_picture_and_keeps_it_through_the_summary(farm_env):
    from farm_transcode.probe import SourceFacts, probe_source

    source = make(farm_env["tmp"] / "facts.mov", "-c:v", "libx264", "-flags", "+ildct+ilme", "-preset", "ultrafast",
                  "-pix_fmt", "yuv422p10le", "-color_primaries", "bt709", "-color_trc", "bt709", "-colorspace",
                  "bt709", "-timecode", "10:00:00:00", "-c:a", "pcm_s16le", rate=50, seconds=1,
                  vf="tinterlace=mode=interleave_top,setfield=bff")
    facts = probe_source(source)
    picture = facts.video
    assert (picture.pix_fmt, picture.bit_depth, picture.alpha, picture.field_order) == \
        ("yuv422p10le", 10, False, "bff")
    assert (picture.color_primaries, picture.color_transfer, picture.color_space) == ("bt709", "bt709", "bt709")
    assert picture.timecode == "10:00:00:00" and picture.rotation == 0 and picture.mastering is None
    again = SourceFacts.from_summary(json.loads(json.dumps(facts.summary()))).video
    for key in ("pix_fmt", "bit_depth", "alpha", "field_order", "color_primaries", "color_transfer", "color_space",
                "color_range", "mastering", "light", "timecode", "rotation"):
        assert getattr(again, key) == getattr(picture, key), key
