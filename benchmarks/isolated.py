"""A transcode on a node that shares the controller's storage, against one that does not.

One real controller and one node of one slot. For the first way the node sees the input
and destination folders; for the second it runs in a mount namespace of its own where they
are empty tmpfs mounts (root and ``unshare`` needed), so the source reaches it through the
controller's transfer route and each segment's output goes back the same way. The same
profile, the same source (a lavfi movie of ``--seconds`` at 1280x720, 25 fps, with sound),
the ways alternated over ``--rounds`` and the medians shown; both outputs must hold the
same number of frames.

    .venv/bin/python benchmarks/isolated.py [--seconds 60] [--profile h264-web-720p] [--rounds 1]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import lavfi  # noqa: E402
from tests.test_transfer import Farm, frame_count  # noqa: E402


def one_run(workdir: Path, source: Path, profile: str, isolated: bool) -> tuple[float, int, int]:
    """(wall seconds of the job, frames in its output, bytes its transfers moved)."""
    farm = Farm(workdir)
    try:
        if isolated:
            farm.start_island()
            farm.c.wait_for_nodes("island", timeout=120)
        else:
            farm.c.start_node("shared", "--slots", "1")
            farm.c.wait_for_nodes("shared", timeout=120)
        placed = farm.inputs / source.name
        shutil.copyfile(source, placed)
        started = time.perf_counter()
        job = farm.submit(profile, str(placed), "-o", str(farm.out / "movie"), timeout=3600)
        wall = time.perf_counter() - started
        outputs = [path for path in (farm.out / "movie").iterdir() if path.is_file()]
        moved = sum(t.get("bytes", 0) for t in farm.transfers() if t.get("job") == job["id"])
        return wall, frame_count(outputs[0]), moved
    finally:
        farm.c.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the source movie")
    parser.add_argument("--profile", default="h264-web-720p", help="the transcode profile (a name or a file)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of both ways, alternated (medians shown)")
    args = parser.parse_args()
    if os.geteuid() != 0 or not shutil.which("unshare"):
        sys.exit("benchmarks/isolated.py: hiding folders from a node needs root and unshare")
    with tempfile.TemporaryDirectory(prefix="farm-bench-isolated-") as tmp:
        source = lavfi(Path(tmp) / "source.mp4", seconds=args.seconds, size="1280x720", audio=True,
                       extra=["-c:v", "libx264", "-preset", "veryfast", "-c:a", "aac"])
        runs: dict[bool, list[tuple[float, int, int]]] = {False: [], True: []}
        for round_ in range(args.rounds):
            for isolated in (False, True):
                runs[isolated].append(one_run(Path(tmp) / f"r{round_}-{'island' if isolated else 'shared'}",
                                              source, args.profile, isolated))
    shared, island = (statistics.median(r[0] for r in runs[way]) for way in (False, True))
    frames = {r[1] for way in runs.values() for r in way}
    table = Table(title=f"{args.seconds:g} s 1280x720 source, profile {args.profile}, one node of one slot, "
                        f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    for column in ("node", "wall s", "ratio to shared", "bytes through the controller", "frames out"):
        table.add_column(column, justify="right" if column != "node" else "left")
    for label, way, wall in (("shares the storage", False, shared), ("no shared storage", True, island)):
        moved = statistics.median(r[2] for r in runs[way])
        table.add_row(label, f"{wall:.2f}", f"{wall / shared:.2f}", f"{moved:,.0f}",
                      ", ".join(str(r[1]) for r in runs[way]))
    Console().print(table)
    if len(frames) != 1:
        sys.exit(f"the outputs differ in frames: {sorted(frames)}")


if __name__ == "__main__":
    main()
