"""Cluster dispatch: a controller and two nodes as real processes on this machine.

- dispatch latency: on each node slot, the gap between one segment's command ending and
  the next one's starting (result back, stored, next segment chosen, sent, started),
  over N short segments; median and p99;
- joining: seconds from starting `farm node` to its first segment starting, with work
  already queued.

    .venv/bin/python benchmarks/cluster.py [--segments 1000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.cluster_helpers import Cluster  # noqa: E402  (the same harness the tests use)
from tests.conftest import write_profile  # noqa: E402

# Each segment's command writes when it started and ended, as the node's clock saw it.
STAMP = ("import sys, time, pathlib; t = time.time(); "
         "pathlib.Path(sys.argv[1], 'stamp' + sys.argv[2]).write_text(repr(t) + ' ' + repr(time.time()))")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--segments", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        c = Cluster(Path(tmp) / "c")
        try:
            c.start_controller()
            profile = write_profile(c.root, "stamp", {
                "processor": "command", "frames": f"1-{args.segments}", "segment": {"frames": 1}, "retries": 0,
                "settings": {"command": [sys.executable, "-S", "-c", STAMP, "{output_dir}", "{start}"]},
            })
            # keep every segment's folder: the stamps are read after the run, so assemble into one
            out = c.root / "out"
            job_id = json.loads(c.farm("submit", profile, "-o", out, "--json").stdout)["jobs"][0]["id"]
            started = time.time()
            c.start_node("first", "--slots", "1")
            c.wait_until(lambda: c.job(job_id)["segments_done"] >= 1, 120, "the first segment", every=0.05)
            first_segment = min(a["started"] for s in c.job(job_id)["segment_list"] for a in s["attempts"])
            join_seconds = first_segment - started
            c.start_node("second", "--slots", "1")
            c.wait_until(lambda: c.job(job_id)["state"] in ("done", "failed"), 3600, "the batch", every=1)
            detail = c.job(job_id)
        finally:
            c.stop()
        assert detail["state"] == "done", detail["error"]
        gaps = []
        by_node: dict[str, list[tuple[float, float]]] = {}
        for seg in detail["segment_list"]:
            frame = seg["label"].split()[-1]
            start, end = (float(x) for x in (out / f"stamp{frame}").read_text().split())
            by_node.setdefault(seg["attempts"][-1]["node"], []).append((start, end))
        for spans in by_node.values():
            spans.sort()
            gaps += [b[0] - a[1] for a, b in zip(spans, spans[1:])]
    gaps_ms = sorted(g * 1000 for g in gaps if g >= 0)
    p99 = gaps_ms[int(len(gaps_ms) * 0.99) - 1]
    table = Table(title=f"{args.segments} one-frame segments, controller and two one-slot nodes (real processes)")
    for column in ("measure", "value"):
        table.add_column(column)
    table.add_row("dispatch gap, median (segment end -> next start on that slot)", f"{statistics.median(gaps_ms):.1f} ms")
    table.add_row("dispatch gap, p99", f"{p99:.1f} ms")
    table.add_row("segments per node", ", ".join(f"{k}: {len(v)}" for k, v in sorted(by_node.items())))
    table.add_row("joining node: `farm node` start -> first segment started", f"{join_seconds:.2f} s")
    Console().print(table)


if __name__ == "__main__":
    main()
