"""Delivery all or nothing against the old way, file by file, in the same run.

Baseline: each file copied under a temporary name next to its target and renamed
(what Farm did before: a kill part-way leaves part of the set). Farm: every file copied
into the staging folder, then all renamed into place (a kill before the renames leaves
nothing visible; during them, the journal lets the next start undo them). The figure
that matters is the rename phase: the only window in which a killed process has put
part of a set in place.

    .venv/bin/python benchmarks/delivery.py [--files 3000] [--size 20000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

from rich.console import Console
from rich.table import Table

from farm.model import Job
from farm.outputs import Delivery


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=3000)
    parser.add_argument("--size", type=int, default=20000, help="bytes per file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="farm-bench-delivery-") as root:
        base = Path(root)
        sources = base / "segments"
        sources.mkdir()
        payload = os.urandom(args.size)
        for n in range(args.files):
            (sources / f"frame_{n:05d}.png").write_bytes(payload)
        files = sorted(sources.iterdir())

        old = base / "old"
        old.mkdir()
        started = time.perf_counter()
        for source in files:  # the way before: copy to a temporary name, rename, one file at a time
            target = old / source.name
            temporary = target.with_name(f".{target.name}.farm-{uuid.uuid4().hex[:8]}")
            shutil.copyfile(source, temporary)
            os.replace(temporary, target)
        baseline = time.perf_counter() - started

        new = base / "new"
        new.mkdir()
        job = Job(id="jbench", batch_id="b", input=None, profile=None, settings=None, destination=new,
                  work_dir=base / "work")
        started = time.perf_counter()
        delivery = Delivery(job, noun="frames")
        delivery.stage({new / source.name: source for source in files})
        staged = time.perf_counter()
        delivery.commit()
        done = time.perf_counter()
        assert len(list(new.iterdir())) == args.files

    table = Table(title=f"delivering {args.files:,} files of {args.size:,} bytes")
    for column in ("way", "seconds", "vs baseline", "window where a kill leaves part of the set"):
        table.add_column(column)
    table.add_row("copy + rename each (before)", f"{baseline:.2f}", "1.00x", f"{baseline:.2f} s (all of it)")
    table.add_row("stage all, then rename all", f"{done - started:.2f}", f"{(done - started) / baseline:.2f}x",
                  f"{done - staged:.2f} s (the renames; undone at the next start)")
    Console().print(table)


if __name__ == "__main__":
    main()
