"""What the bubblewrap sandbox costs: the same batches with ``node.sandbox`` on and off,
in the same run, through the real `farm run` (one process per batch).

- 200 one-frame command segments (``touch`` per frame): the sandbox's start-up cost per
  process, where it shows most;
- a transcode of a 60 s 1280x720 source made with lavfi (the shipped
  ``h264-web-720p`` profile: 10 s segments, AAC, joined and verified), where the
  encoding dominates (target: ratio <= 1.03).

Runs alternate (off, on, off, on, ...) so that a change in the machine's load falls on
both; the figure is the median of each.

    .venv/bin/python benchmarks/sandbox.py [--segments 200] [--seconds 60] [--repeat 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
FARM = [sys.executable, "-m", "farm.cli"]


def farm_run(folder: Path, sandbox: bool, profile: Path, inputs: list[Path], dest: Path) -> float:
    config = folder / f"farm-{'on' if sandbox else 'off'}.yaml"
    config.write_text(yaml.safe_dump({"node": {"allow_commands": ["touch", "ffmpeg"], "sandbox": sandbox}}))
    env = {**os.environ, "FARM_CONFIG": str(config), "FARM_STATE": str(folder / f"state-{dest.name}")}
    started = time.perf_counter()
    done = subprocess.run([*FARM, "run", str(profile), *map(str, inputs), "-o", str(dest), "--quiet", "--overwrite"],
                          env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"farm run failed ({'sandbox on' if sandbox else 'sandbox off'}): {done.stderr[-2000:]}")
    return elapsed


def measure(folder: Path, name: str, profile: Path, inputs: list[Path], repeat: int) -> tuple[float, float]:
    times: dict[bool, list[float]] = {False: [], True: []}
    for round_ in range(repeat):
        for sandbox in (False, True):
            times[sandbox].append(farm_run(folder, sandbox, profile, inputs, folder / f"out-{name}-{round_}-{sandbox}"))
    return statistics.median(times[False]), statistics.median(times[True])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--segments", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--repeat", type=int, default=1, help="runs of each (the median is shown)")
    args = parser.parse_args()
    console = Console()
    rows = []
    with tempfile.TemporaryDirectory(prefix="farm-bench-sandbox-") as raw:
        folder = Path(raw)
        commands = folder / "touch.yaml"
        commands.write_text(yaml.safe_dump({
            "name": "touch", "processor": "command", "frames": f"1-{args.segments}", "segment": {"frames": 1},
            "settings": {"command": ["touch", "{output_dir}/frame_{start:04d}.txt"], "expect": ["frame_{frame:04d}.txt"]},
        }))
        off, on = measure(folder, "commands", commands, [], args.repeat)
        rows.append((f"{args.segments} one-frame command segments", off, on))

        source = folder / "source.mp4"
        subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y",
                        "-f", "lavfi", "-i", f"testsrc2=size=1280x720:rate=25:duration={args.seconds}",
                        "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:duration={args.seconds}",
                        "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac",
                        str(source)], check=True)
        off, on = measure(folder, "transcode", ROOT / "profiles" / "h264-web-720p.yaml", [source], args.repeat)
        rows.append((f"transcode {args.seconds:g} s 1280x720 (h264-web-720p)", off, on))

    table = Table(title=f"node.sandbox on vs off ({os.cpu_count()} cores, median of {args.repeat})")
    for column in ("batch", "sandbox off (s)", "sandbox on (s)", "on / off"):
        table.add_column(column, justify="left" if column == "batch" else "right")
    for label, off, on in rows:
        table.add_row(label, f"{off:.2f}", f"{on:.2f}", f"{on / off:.3f}")
    console.print(table)


if __name__ == "__main__":
    main()
