"""Quality at the joins of a segmented encode: the ways of cutting, measured with plain ffmpeg.

Every variant encodes the same source in segments of ``--segment`` frames (keyframes every
segment, as the shipped profiles put them), joins them with the concat demuxer, and is
compared frame by frame (PSNR against the source) with one ffmpeg process encoding the
whole source with the same settings. For the two frames either side of every cut, it
prints how far they fall below the single encode (dB), and the size against it.

- ``fresh``: each segment encoded on its own from its first frame (what Farm does today);
- ``pre=N``: each segment's encoder starts N frames early (rate-control and lookahead
  warm-up), a keyframe is forced at the segment's first frame, and the N frames are
  dropped by stream copy;
- ``post=N``: each segment's encoder runs N frames past its end, with a keyframe forced
  at its end (the frames before the cut see their future, as in one encode), and the N
  frames are dropped;
- ``pre=N,post=M``: both: overlapping segments.

    .venv/bin/python benchmarks/joins.py [--seconds 12] [--size 1280x720] [--segment 50] [--preset medium] [--noise 4]
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

QUIET = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-y"]


def run(argv: list[str]) -> None:
    subprocess.run(argv, check=True)


def psnr(path: Path, source: Path, rate: int) -> list[float]:
    """Per-frame PSNR against the source, both on the source's grid (FACTS)."""
    stats = path.with_suffix(".psnr")
    grid = f"setpts=PTS-STARTPTS,fps={rate}"
    run([*QUIET, "-i", str(path), "-i", str(source), "-lavfi",
         f"[0:v]{grid}[a];[1:v]{grid}[b];[a][b]psnr=stats_file={stats}", "-f", "null", "-"])
    return [float(m.group(1)) for m in re.finditer(r"psnr_avg:([\d.]+)", stats.read_text())]


def encode_options(args: argparse.Namespace, gop: int) -> list[str]:
    return ["-c:v", "libx264", "-crf", str(args.crf), "-preset", args.preset, "-profile:v", "high",
            "-pix_fmt", "yuv420p", "-g", str(gop), "-an"]


def segmented(args: argparse.Namespace, source: Path, work: Path, total: int, pre: int, post: int) -> Path:
    rate = args.rate
    pieces = []
    for first in range(0, total, args.segment):
        count = min(args.segment, total - first)
        lead = min(pre, first)
        tail = min(post, total - first - count)
        raw = work / f"raw-{first:06d}.mp4"
        keys = [lead / rate, (lead + count) / rate] if (lead or tail) else []
        force = ["-force_key_frames", ",".join(f"{t:.6f}" for t in keys)] if keys else []
        # decode-side seek: exact frames, timestamps from 0 at the first frame encoded
        run([*QUIET, "-ss", f"{(first - lead) / rate:.6f}", "-i", str(source), "-frames:v", str(lead + count + tail),
             *encode_options(args, args.segment), *force, "-video_track_timescale", str(rate * 1000), str(raw)])
        piece = work / f"piece-{first:06d}.mp4"
        if lead or tail:  # keep frames lead .. lead+count: from the forced keyframe, count packets
            run([*QUIET, "-ss", f"{lead / rate:.6f}", "-i", str(raw), "-map", "0:v", "-c", "copy",
                 "-frames:v", str(count), "-video_track_timescale", str(rate * 1000), str(piece)])
        else:
            raw.rename(piece)
        pieces.append((piece, count / rate))
    listing = work / "list.ffconcat"
    listing.write_text("ffconcat version 1.0\n" + "".join(f"file '{p}'\nduration {d:.6f}\n" for p, d in pieces))
    joined = work / "joined.mp4"
    run([*QUIET, "-f", "concat", "-safe", "0", "-i", str(listing), "-c", "copy", str(joined)])
    return joined


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=12)
    parser.add_argument("--size", default="1280x720")
    parser.add_argument("--rate", type=int, default=25)
    parser.add_argument("--segment", type=int, default=50, help="frames per segment (and keyframe interval)")
    parser.add_argument("--crf", type=float, default=21)
    parser.add_argument("--preset", default="medium")
    parser.add_argument("--noise", type=int, default=4, help="grain added to the test pattern (0-100)")
    parser.add_argument("--variants", default="fresh;pre=25;post=25;pre=50,post=50",
                        help="semicolon-separated: fresh, pre=N, post=N, pre=N,post=M")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="farm-bench-joins-") as tmp:
        work = Path(tmp)
        source = work / "source.mkv"
        # moving pictures with grain: rate control has something to decide
        run([*QUIET, "-f", "lavfi", "-i", f"testsrc2=size={args.size}:rate={args.rate}:duration={args.seconds},"
             f"noise=alls={args.noise}:allf=t", "-c:v", "ffv1", str(source)])
        total = args.seconds * args.rate
        single = work / "single.mp4"
        started = time.perf_counter()
        run([*QUIET, "-i", str(source), *encode_options(args, args.segment), str(single)])
        single_wall = time.perf_counter() - started
        reference = psnr(single, source, args.rate)
        cuts = list(range(args.segment, total, args.segment))
        print(f"{args.seconds} s {args.size} @ {args.rate}, x264 crf {args.crf:g} {args.preset}, "
              f"{len(cuts)} cuts every {args.segment} frames; single encode {single.stat().st_size} bytes, "
              f"{single_wall:.1f} s, mean PSNR {statistics.mean(reference):.2f} dB")
        print("| variant | before cut: dB below single (mean / worst) | after cut | other frames | size / single "
              "| wall s |")
        print("| --- | --- | --- | --- | --- | --- |")
        for variant in args.variants.split(";"):
            options = dict(part.split("=") for part in variant.split(",") if "=" in part)
            folder = work / variant.replace("=", "").replace(",", "-")
            folder.mkdir()
            started = time.perf_counter()
            joined = segmented(args, source, folder, total, int(options.get("pre", 0)), int(options.get("post", 0)))
            wall = time.perf_counter() - started
            ours = psnr(joined, source, args.rate)
            assert len(ours) == total, f"{variant}: {len(ours)} frames, expected {total}"
            loss = [r - o for r, o in zip(reference, ours)]
            before = [loss[c - 1] for c in cuts]
            after = [loss[c] for c in cuts]
            near = {i for c in cuts for i in (c - 1, c)}
            other = [value for i, value in enumerate(loss) if i not in near]
            print(f"| {variant} | {statistics.mean(before):+.2f} / {max(before):+.2f} | "
                  f"{statistics.mean(after):+.2f} / {max(after):+.2f} | {statistics.mean(other):+.2f} | "
                  f"{joined.stat().st_size / single.stat().st_size:.3f} | {wall:.1f} |", flush=True)


if __name__ == "__main__":
    main()
