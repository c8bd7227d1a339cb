"""Fidelity: every source case of tests/media_cases.py through Farm and through one plain
ffmpeg process with the same settings, side by side.

For each case it prints one table: the source, Farm's output (``farm run``, segmented) and
the plain ffmpeg output, with frames, streams, durations and start times, the measured A/V
onset (the first sound after the first picture: ``-copyts`` + ``silencedetect`` minus the
first video frame's time; every case's tone is silent for its first 0.5 s), pix_fmt, field
order, colour tags, timecode, PSNR against the source (min, mean, and the mean of the
frames either side of Farm's cuts; both put on the source's grid with ``fps=RATE``, and
compared in yuv444p), size and wall time. A summary follows.

    .venv/bin/python benchmarks/fidelity.py [--case NAME ...] [--segment-seconds 1] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from media_cases import CASES, Case, input_argv, make, psnr  # noqa: E402

FARM = [sys.executable, "-m", "farm.cli"]
QUIET = ["-hide_banner", "-loglevel", "error", "-nostdin"]


# -- the same settings, written out by hand as one ffmpeg command (not by Farm's code) -----------


def gop_frames(gop: Any, rate: str) -> int | None:
    if gop is None:
        return None
    if isinstance(gop, str) and gop.endswith("s"):
        num, _, den = rate.partition("/")
        return max(1, round(float(gop[:-1]) * float(num) / float(den or 1)))
    return int(gop)


def plain_argv(case: Case, source: Path, out: Path) -> list[str]:
    settings = case.settings
    video, audio = settings.get("video"), settings.get("audio")
    argv = ["ffmpeg", *QUIET, "-y", *input_argv(case, source), "-map", "0:v:0"]
    if audio:
        argv += ["-map", "0:a?"]
    if video:
        argv += ["-c:v", video["codec"]]
        for key, option in (("crf", "-crf"), ("bitrate", "-b:v"), ("maxrate", "-maxrate"), ("bufsize", "-bufsize"),
                            ("preset", "-preset"), ("profile", "-profile:v"), ("pix_fmt", "-pix_fmt")):
            if key in video:
                argv += [option, str(video[key])]
        if video.get("bit_depth") == 8 and video.get("chroma") in (420, 422, 444):
            argv += ["-pix_fmt", f"yuv{video['chroma']}p"]
        if video.get("interlace") == "keep":  # coded as fields, in the order the decoder flags
            argv += ["-flags", "+ildct+ilme"]
        gop = gop_frames(video.get("gop"), video.get("fps") or case.rate)
        if gop:
            argv += ["-g", str(gop)]
        if video.get("fps"):
            argv += ["-r", str(video["fps"])]
        if video["codec"] == "libx265":
            argv += ["-x265-params", "log-level=error"]
    if audio:
        argv += ["-c:a", audio["codec"]] + (["-b:a", audio["bitrate"]] if audio.get("bitrate") else [])
    if settings.get("container", "mp4") in ("mp4", "mov"):
        argv += ["-movflags", "+faststart"]
    return argv + [str(out)]


# -- measuring a file ---------------------------------------------------------------------------


def ffprobe(path: Path, *args: str) -> dict[str, Any]:
    out = subprocess.run(["ffprobe", "-v", "error", *args, "-of", "json", str(path)], capture_output=True,
                         text=True)
    return json.loads(out.stdout or "{}")


def first_video_time(path: Path) -> float | None:
    frames = ffprobe(path, "-select_streams", "v:0", "-read_intervals", "%+#1", "-show_entries",
                     "frame=pts_time,best_effort_timestamp_time").get("frames") or []
    if not frames:
        return None
    value = frames[0].get("pts_time", frames[0].get("best_effort_timestamp_time"))
    return float(value) if value not in (None, "N/A") else None


def sound_onset(path: Path) -> float | None:
    """When the first sound starts, in the file's own time (FACTS: -copyts + silencedetect)."""
    proc = subprocess.run(["ffmpeg", "-hide_banner", "-nostdin", "-copyts", "-i", str(path), "-map", "0:a:0",
                           "-af", "silencedetect=noise=-50dB:duration=0.05", "-f", "null", "-"],
                          capture_output=True, text=True)
    match = re.search(r"silence_end: (-?[\d.]+)", proc.stderr)
    return float(match.group(1)) if match else None


def describe(path: Path, case: Case) -> dict[str, Any]:
    """What a person checks about a movie (or an image sequence, given by its first frame)."""
    if case.sequence and path.suffix.lower() in (".png", ".tif", ".dpx", ".exr"):
        count = len(list(path.parent.glob(f"*{path.suffix}")))
        info = ffprobe(path, "-show_streams")["streams"][0]
        return {"frames": count, "streams": f"{info['codec_name']} {info.get('pix_fmt')} x{count}",
                "durations": f"{count / float(eval(case.rate)):.3f}", "starts": "-", "onset": "-",
                "pix_fmt": info.get("pix_fmt"), "field": "-", "colour": "-", "timecode": "-",
                "size": sum(p.stat().st_size for p in path.parent.iterdir())}
    data = ffprobe(path, "-count_packets", "-show_streams", "-show_format")
    streams = data.get("streams") or []
    video = next((s for s in streams if s.get("codec_type") == "video"), {})

    def seconds(stream: dict[str, Any]) -> str:
        value = stream.get("duration") or (stream.get("tags") or {}).get("DURATION")
        if value is None:
            return "?"
        if ":" in str(value):
            h, m, s = str(value).split(":")
            value = int(h) * 3600 + int(m) * 60 + float(s)
        return f"{float(value):.3f}"

    def label(stream: dict[str, Any]) -> str:
        kind = stream.get("codec_type", "?")[0]
        extra = ""
        if kind == "v":
            extra = f" {stream.get('width')}x{stream.get('height')}"
            sar = stream.get("sample_aspect_ratio")
            if sar and sar not in ("1:1", "0:1"):
                extra += f" SAR {sar}"
            rotation = next((d.get("rotation") for d in stream.get("side_data_list") or [] if "rotation" in d), None)
            rotation = rotation or (stream.get("tags") or {}).get("rotate")
            if rotation:
                extra += f" rot {rotation}"
        elif kind == "a":
            extra = f" {stream.get('channels')}ch"
        return f"{kind}:{stream.get('codec_name')}{extra}"

    timecodes = {t for s in streams for k, t in (s.get("tags") or {}).items() if k.lower() == "timecode"}
    timecodes |= {t for k, t in (data.get("format", {}).get("tags") or {}).items() if k.lower() == "timecode"}
    onset = sound_onset(path) if any(s.get("codec_type") == "audio" for s in streams) else None
    first = first_video_time(path)
    colour = "/".join(str(video.get(k, "-")) for k in ("color_primaries", "color_transfer", "color_space"))
    return {
        "frames": int(video.get("nb_read_packets") or 0),
        "streams": ", ".join(label(s) for s in streams),
        "durations": " ".join(seconds(s) for s in streams if s.get("codec_type") in ("video", "audio")),
        "starts": " ".join(f"{float(s['start_time']):.3f}" for s in streams
                           if s.get("codec_type") in ("video", "audio") and s.get("start_time") not in (None, "N/A")),
        "onset": f"{(onset - first) * 1000:+.1f} ms" if onset is not None and first is not None else "-",
        "pix_fmt": video.get("pix_fmt", "-"), "field": video.get("field_order", "-"), "colour": colour,
        "timecode": ",".join(sorted(timecodes)) or "-", "size": path.stat().st_size,
    }


# -- running one case ---------------------------------------------------------------------------


def farm_env(home: Path) -> dict[str, str]:
    home.mkdir(parents=True, exist_ok=True)
    (home / "farm.yaml").write_text(yaml.safe_dump({"node": {"kill_grace": 1.0}}))
    return {**os.environ, "FARM_STATE": str(home / "state"), "FARM_CONFIG": str(home / "farm.yaml")}


def run_case(case: Case, work: Path, segment_seconds: float) -> dict[str, Any]:
    folder = work / case.name
    source = make(case, folder / "source")
    profile = folder / "fidelity.yaml"
    profile.write_text(yaml.safe_dump({"name": "fidelity", "processor": "transcode",
                                       "segment": {"seconds": segment_seconds}, "settings": case.settings,
                                       "output": "{stem}-farm.{ext}", "retries": 0}))
    env = farm_env(folder / "farm")
    plan = subprocess.run([*FARM, "plan", str(profile), str(source), "--json"], capture_output=True, text=True,
                          env=env, cwd=ROOT)
    cuts: list[int] = []
    if plan.returncode == 0:
        segments = json.loads(plan.stdout)["jobs"][0]["segments"]
        cuts = [s["params"]["first"] for s in segments if s["params"].get("kind") == "video" and s["params"]["first"]]
    started = time.perf_counter()
    proc = subprocess.run([*FARM, "run", str(profile), str(source), "-o", str(folder / "out"), "--json", "--quiet"],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    farm_wall = time.perf_counter() - started
    farm_out, farm_error = None, None
    try:
        job = json.loads(proc.stdout)["jobs"][0]
        farm_out = Path(job["outputs"][0]) if job["state"] == "done" and job["outputs"] else None
        farm_error = job.get("error")
    except (json.JSONDecodeError, KeyError, IndexError):
        pass
    if farm_out is None and not farm_error:
        farm_error = (plan.stderr or proc.stderr).strip().splitlines()[-1:] or ["failed"]
        farm_error = farm_error[0]
    ext = case.settings.get("container", "mp4")
    plain_out = folder / f"plain.{'mkv' if ext == 'mkv' else ext}"
    started = time.perf_counter()
    plain = subprocess.run(plain_argv(case, source, plain_out), capture_output=True, text=True)
    plain_wall = time.perf_counter() - started
    rows = {"source": describe(source, case)}
    sized = ffprobe(source, "-select_streams", "v:0", "-show_entries", "stream=width,height")["streams"][0]
    for name, out, wall in (("farm", farm_out, farm_wall), ("plain", plain_out if plain.returncode == 0 else None,
                                                            plain_wall)):
        if out is None:
            continue
        row = describe(out, case)
        row["wall"] = f"{wall:.1f} s"
        values = psnr(out, source, case, sized["width"], sized["height"])
        if values:
            near = [values[i] for c in cuts for i in (c - 1, c) if 0 <= i < len(values)]
            row["psnr"] = f"{min(values):.1f}/{statistics.mean(values):.1f}"
            row["joins"] = f"{statistics.mean(near):.2f}" if near else "-"
            row["psnr_frames"] = len(values)
        rows[name] = row
    return {"case": case, "rows": rows, "cuts": cuts, "farm_error": farm_error,
            "plain_error": None if plain.returncode == 0 else plain.stderr.strip().splitlines()[-1:]}


COLUMNS = ("frames", "streams", "durations", "starts", "onset", "pix_fmt", "field", "colour", "timecode",
           "psnr", "joins", "size", "wall")


def verdict(result: dict[str, Any]) -> str:
    rows = result["rows"]
    if result["farm_error"]:
        return "FAILS: " + str(result["farm_error"])[:160]
    farm, plain, source = rows.get("farm", {}), rows.get("plain", {}), rows["source"]
    notes = []
    if plain and farm.get("frames") != plain.get("frames"):
        notes.append(f"frames {farm.get('frames')} vs plain {plain.get('frames')}")
    for key in ("onset", "pix_fmt", "field", "colour", "timecode"):
        if plain and farm.get(key) != plain.get(key):
            notes.append(f"{key} {farm.get(key)} vs plain {plain.get(key)}")
    if source.get("onset") not in ("-", None) and farm.get("onset") != source.get("onset"):
        notes.append(f"onset {farm.get('onset')} vs source {source.get('onset')}")
    return "; ".join(notes) or "same as plain"


def markdown(results: list[dict[str, Any]], command: str) -> str:
    lines = [f"Command: `{command}`", ""]
    lines += ["| case | class | Farm against one ffmpeg |", "| --- | --- | --- |"]
    for result in results:
        lines.append(f"| {result['case'].name} | {result['case'].kind} | {verdict(result).replace('|', '/')} |")
    for result in results:
        case = result["case"]
        lines += ["", f"### {case.name}: {case.kind}", "",
                  f"Cuts before frames {result['cuts'] or 'none'} (from 0)."
                  + (f" **Farm failed**: {result['farm_error']}" if result["farm_error"] else "")
                  + (f" Plain ffmpeg failed: {result['plain_error']}" if result["plain_error"] else ""), "",
                  "| | " + " | ".join(COLUMNS) + " |", "|" + " --- |" * (len(COLUMNS) + 1)]
        for name, row in result["rows"].items():
            cells = [str(row.get(column, "-")).replace("|", "/") for column in COLUMNS]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", help="only these cases (repeatable); default: all")
    parser.add_argument("--segment-seconds", type=float, default=1.0)
    parser.add_argument("--markdown", type=Path, help="also write the tables to this file")
    args = parser.parse_args()
    chosen = [CASES[name] for name in args.case] if args.case else list(CASES.values())
    results = []
    with tempfile.TemporaryDirectory(prefix="farm-bench-fidelity-") as tmp:
        for case in chosen:
            result = run_case(case, Path(tmp), args.segment_seconds)
            results.append(result)
            print(markdown([result], "").split("\n", 2)[2], flush=True)
    command = "python benchmarks/fidelity.py " + " ".join(sys.argv[1:])
    text = markdown(results, command.strip())
    print(text)
    if args.markdown:
        args.markdown.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
