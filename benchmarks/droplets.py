"""Droplet latency: from a file's last write to its job being queued, and a 200-file drop.

A droplet runs next to the embedded default, as ``farm watch`` runs it. Each of the
``--drops`` files is written in one go into the watched folder, one after another;
its latency is the job's ``created`` time in the store minus the moment its last
write ended. The target is ``settle + 0.5 s`` at most. Then ``--files`` files are
renamed into the folder at once: the time until every one is queued (and done).

    .venv/bin/python benchmarks/droplets.py [--settle 1 --settle 2] [--drops 20] [--files 200] [--polling]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table


class Bench:
    """A LocalFarm whose scheduler a thread drives, and one droplet on ``folder``."""

    def __init__(self, root: Path, folder: Path, settle: float, observer: str, poll_interval: float):
        self.root, self.folder = root, folder
        self.settle, self.observer, self.poll_interval = settle, observer, poll_interval
        self.queued: dict[str, float] = {}
        self.processed: dict[str, float] = {}

    def __enter__(self) -> Bench:
        from farm.config import FarmConfig
        from farm.droplets.config import DropletConfig
        from farm.droplets.service import DropletService, prepare_droplets
        from farm.local import LocalFarm
        from farm.node import install_runtime
        from farm.plugins import load_plugins

        profile = self.root / "read-it.yaml"
        profile.write_text(yaml.safe_dump({
            "name": "read-it", "processor": "command", "frames": "1-1", "retries": 0,
            "settings": {"command": [sys.executable, "-c", "import sys; open(sys.argv[1], 'rb').read()", "{input}"]},
        }))
        config = FarmConfig.model_validate({"node": {"allow_commands": [sys.executable]}})
        plugins = load_plugins()
        node = install_runtime(config.node)
        self.farm = LocalFarm.start(config, plugins, str(self.root / f"state-{self.folder.name}"), node)
        droplet = DropletConfig(folder=self.folder, profile=str(profile), destination=self.root / "out",
                                settle=self.settle, observer=self.observer, poll_interval=self.poll_interval)
        self.service = DropletService(self.farm.scheduler, prepare_droplets([droplet], plugins),
                                      on_event=self._on_event)
        self.service.start()
        self._stop = threading.Event()
        self._driver = threading.Thread(target=self._drive, daemon=True)
        self._driver.start()
        return self

    def _on_event(self, kind: str, name: str, path: str, job: str | None, detail: str) -> None:
        if kind == "queued":
            self.queued[path] = time.time()
        elif kind == "processed":
            self.processed[path] = time.time()

    def _drive(self) -> None:
        while not self._stop.is_set():
            self.service.pump()
            self.farm.scheduler.step(wait=0.05)

    def __exit__(self, *exc: object) -> None:
        self.service.close()
        self._stop.set()
        self._driver.join(timeout=30)
        self.farm.close()

    def created(self, path: Path) -> float | None:
        rows = self.farm.store._execute("SELECT created FROM jobs WHERE input = ?", (str(path),)).fetchall()
        return rows[0]["created"] if rows else None


def wait(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def latency_run(root: Path, settle: float, drops: int, observer: str, poll_interval: float) -> list[float]:
    folder = root / f"drop-{observer}-{settle}"
    folder.mkdir()
    latencies = []
    with Bench(root, folder, settle, observer, poll_interval) as bench:
        for i in range(drops):
            path = folder / f"drop{i:03d}.dat"
            with open(path, "wb") as handle:
                handle.write(os.urandom(256 * 1024))
            last_write = time.time()
            if not wait(lambda: bench.created(path) is not None, settle + poll_interval + 30):
                raise SystemExit(f"{path} was never queued")
            latencies.append(bench.created(path) - last_write)
    return latencies


def burst_run(root: Path, settle: float, files: int, observer: str, poll_interval: float) -> dict[str, float]:
    folder = root / f"burst-{observer}-{settle}"
    staging = root / f"staging-{observer}-{settle}"
    folder.mkdir()
    staging.mkdir()
    for i in range(files):
        (staging / f"file{i:04d}.dat").write_bytes(os.urandom(4096))
    with Bench(root, folder, settle, observer, poll_interval) as bench:
        started = time.time()
        for path in sorted(staging.iterdir()):
            os.rename(path, folder / path.name)
        dropped = time.time()
        if not wait(lambda: len(bench.queued) >= files, 120 + settle):
            raise SystemExit(f"only {len(bench.queued)} of {files} files were queued")
        queued = max(bench.queued.values())
        if not wait(lambda: len(bench.processed) >= files, 600):
            raise SystemExit(f"only {len(bench.processed)} of {files} files were processed")
        processed = max(bench.processed.values())
        jobs = bench.farm.store._execute("SELECT COUNT(*) AS n, COUNT(DISTINCT input) AS d FROM jobs").fetchone()
        batches = bench.farm.store._execute("SELECT COUNT(*) AS n FROM batches").fetchone()["n"]
    if jobs["n"] != files or jobs["d"] != files:
        raise SystemExit(f"{jobs['n']} jobs for {jobs['d']} distinct files, expected {files}")
    return {"drop": dropped - started, "queued": queued - dropped, "processed": processed - dropped,
            "batches": batches}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settle", type=float, action="append", help="settle seconds (repeatable; default 1 and 2)")
    parser.add_argument("--drops", type=int, default=20)
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--polling", action="store_true", help="also measure the polling observer")
    parser.add_argument("--poll-interval", type=float, default=0.5)
    args = parser.parse_args()
    settles = args.settle or [1.0, 2.0]
    observers = ["native", "polling"] if args.polling else ["native"]
    console = Console(width=130)
    latency = Table(title=f"last write -> job queued, {args.drops} drops one after another")
    for column in ("observer", "settle (s)", "median (s)", "max (s)", "median - settle", "max - settle",
                   "target: max - settle <= 0.5"):
        latency.add_column(column, justify="right")
    burst = Table(title=f"{args.files} files renamed into the folder at once")
    for column in ("observer", "settle (s)", "renames took (s)", "all queued after (s)", "all done after (s)",
                   "batches"):
        burst.add_column(column, justify="right")
    with tempfile.TemporaryDirectory(prefix="farm-droplet-bench-") as tmp:
        root = Path(tmp)
        for observer in observers:
            interval = args.poll_interval if observer == "polling" else 0.0
            for settle in settles:
                values = latency_run(root, settle, args.drops, observer, args.poll_interval)
                median, worst = statistics.median(values), max(values)
                target = "yes" if worst - settle <= 0.5 + interval else "NO"
                if observer == "polling":
                    target += f" (+{interval:g} s poll)"
                latency.add_row(observer, f"{settle:g}", f"{median:.3f}", f"{worst:.3f}", f"{median - settle:.3f}",
                                f"{worst - settle:.3f}", target)
            figures = burst_run(root, settles[0], args.files, observer, args.poll_interval)
            burst.add_row(observer, f"{settles[0]:g}", f"{figures['drop']:.3f}", f"{figures['queued']:.3f}",
                          f"{figures['processed']:.3f}", str(figures["batches"]))
    console.print(latency)
    console.print(burst)


if __name__ == "__main__":
    main()
