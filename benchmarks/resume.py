"""Resuming an interrupted `farm run`: only the missing segments run again.

A 100-segment `command` job (each segment a Python process that sleeps a little and writes
its frame) is run with the real CLI and killed with SIGKILL once 60 segments are done;
the same command is then run again and resumes it. Baseline, in the same run: the same
command on a fresh state directory, from nothing. Printed: segments run again by the
resume, and the resume's wall time against the fresh run's.

    .venv/bin/python benchmarks/resume.py [--segments 100] [--kill-after 60] [--seconds 0.2]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

FARM = [sys.executable, "-m", "farm.cli"]
WORK = """
import os, pathlib, sys, time
out, frame, log, seconds = pathlib.Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
with open(log, "a") as handle:
    handle.write(f"{frame}\\n")
time.sleep(seconds)
(out / f"frame_{frame:04d}.txt").write_text(str(frame))
"""


def setup(root: Path, segments: int, seconds: float) -> tuple[Path, dict[str, str]]:
    root.mkdir(parents=True)
    (root / "work.py").write_text(WORK)
    (root / "farm.yaml").write_text(yaml.safe_dump({"node": {"allow_commands": [sys.executable], "slots": 2}}))
    profile = root / "bench.yaml"
    profile.write_text(yaml.safe_dump({
        "name": "bench", "processor": "command", "frames": f"1-{segments}", "segment": {"frames": 1},
        "settings": {"command": [sys.executable, str(root / "work.py"), "{output_dir}", "{start}",
                                 str(root / "runs.log"), str(seconds)], "expect": ["frame_{frame:04d}.txt"]},
    }))
    env = {**os.environ, "FARM_STATE": str(root / "state"), "FARM_CONFIG": str(root / "farm.yaml")}
    return profile, env


def run(profile: Path, root: Path, env: dict[str, str]) -> tuple[float, dict]:
    started = time.perf_counter()
    proc = subprocess.run([*FARM, "run", str(profile), "-o", str(root / "out"), "--json", "--quiet"],
                          capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"farm run failed ({proc.returncode}): {proc.stderr}")
    return elapsed, json.loads(proc.stdout)


def done_segments(state: Path) -> int:
    path = state / "farm.db"
    if not path.exists():
        return 0
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        return db.execute("SELECT COUNT(*) FROM segments WHERE state = 'done'").fetchone()[0]
    except sqlite3.OperationalError:
        return 0
    finally:
        db.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--segments", type=int, default=100)
    parser.add_argument("--kill-after", type=int, default=60)
    parser.add_argument("--seconds", type=float, default=0.2, help="each segment's sleep")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="farm-bench-resume-") as tmp:
        # baseline: the whole run from nothing
        fresh_profile, fresh_env = setup(Path(tmp) / "fresh", args.segments, args.seconds)
        fresh_seconds, _ = run(fresh_profile, Path(tmp) / "fresh", fresh_env)

        root = Path(tmp) / "resumed"
        profile, env = setup(root, args.segments, args.seconds)
        proc = subprocess.Popen([*FARM, "run", str(profile), "-o", str(root / "out"), "--json", "--quiet"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        while done_segments(root / "state") < args.kill_after:
            if proc.poll() is not None:
                raise SystemExit("the run ended before it could be killed; use more segments")
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        done_at_kill = done_segments(root / "state")
        before = (root / "runs.log").read_text().split()
        resume_seconds, report = run(profile, root, env)
        after = (root / "runs.log").read_text().split()
        rerun = len(after) - len(before)
        outputs = len(list((root / "out").iterdir()))
        if report["jobs"][0]["state"] != "done" or outputs != args.segments:
            raise SystemExit(f"the resume did not finish the job: {report}")

    table = Table(title=f"Resume of a {args.segments}-segment command job killed after {done_at_kill} segments")
    for column in ("run", "segments run", "wall time (s)", "vs fresh"):
        table.add_column(column, justify="right" if column != "run" else "left")
    table.add_row("fresh run (baseline)", str(args.segments), f"{fresh_seconds:.2f}", "1.00")
    table.add_row("resume (same command)", str(rerun), f"{resume_seconds:.2f}", f"{resume_seconds / fresh_seconds:.2f}")
    Console().print(table)
    print(f"segments done at the kill: {done_at_kill}; run again by the resume: {rerun} "
          f"(missing: {args.segments - done_at_kill}, of which those running at the kill ran twice); "
          f"outputs delivered: {outputs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
