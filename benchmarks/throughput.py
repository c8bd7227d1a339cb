"""Dispatch throughput: no-op segments through Farm's whole path against raw Dask.

Farm: plan -> store -> queue -> Dask (pinned, slot-aware) -> result -> store.
Baseline: the same number of no-op tasks submitted one by one with ``client.submit``
to the same LocalCluster, in the same run. Also the store's size and the peak memory
of a controller holding one 10,000-segment job.

    .venv/bin/python benchmarks/throughput.py [--segments 2000] [--big 10000]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from farm.config import NodeConfig
from farm.engine import Engine
from farm.frames import chunk_frames
from farm.model import SegmentPlan
from farm.node import install_runtime
from farm.plugins import load_plugins
from farm.processor import Processor
from farm.profiles import LoadedProfile, Profile
from farm.scheduler import Scheduler
from farm.store import Store


class NoOp(Processor):
    name = "noop"
    frame_based = True
    inputs = "none"

    def plan(self, job):
        return [SegmentPlan(f"frame {chunk[0]}", chunk) for chunk in chunk_frames(job.frames, 1)]

    def run(self, segment, context):
        return {}


class NoOpPlugin:
    from farm import hookimpl

    @hookimpl
    def farm_processors(self):
        return [NoOp()]


def noop(i: int) -> int:
    return i


def farm_profile(segments: int) -> LoadedProfile:
    profile = Profile(name="noop", processor="noop", frames=f"1-{segments}", segment={"frames": 1})
    return LoadedProfile(profile, NoOp.settings_model(), None)


def run_farm(engine: Engine, plugins, root: Path, segments: int, prefetch: int = 0) -> tuple[float, Scheduler, Store]:
    store = Store(root / "farm.db")
    scheduler = Scheduler(store, plugins, engine, root / "work", prefetch=prefetch)
    started = time.perf_counter()
    _, job_ids = scheduler.submit(farm_profile(segments), [None], root / "out")
    scheduler.run_until_done(job_ids)
    elapsed = time.perf_counter() - started
    assert scheduler.jobs[job_ids[0]].state == "done", scheduler.jobs[job_ids[0]].error
    return elapsed, scheduler, store


def run_dask(engine: Engine, tasks: int) -> float:
    started = time.perf_counter()
    futures = [engine.client.submit(noop, i, pure=False) for i in range(tasks)]
    engine.client.gather(futures)
    return time.perf_counter() - started


def run_dask_limited(engine: Engine, tasks: int, in_flight: int) -> float:
    """Raw Dask held to Farm's rule: a new task only when one of ``in_flight`` is done."""
    import queue

    done: queue.Queue = queue.Queue()
    started = time.perf_counter()

    def submit(i: int) -> None:
        engine.client.submit(noop, i, pure=False).add_done_callback(done.put)

    for i in range(min(in_flight, tasks)):
        submit(i)
    for i in range(in_flight, tasks + in_flight):
        done.get()
        if i < tasks:
            submit(i)
    return time.perf_counter() - started


def big_job(segments: int) -> None:
    """Child process: one job of ``segments`` segments; prints its figures as JSON."""
    plugins = load_plugins(extra=[NoOpPlugin()])
    node = install_runtime(NodeConfig(), plugins=plugins)
    engine = Engine.embedded(node.slots, node.capabilities)
    with tempfile.TemporaryDirectory() as tmp:
        elapsed, scheduler, store = run_farm(engine, plugins, Path(tmp), segments)
        scheduler.close()
        store.close()
        size = sum(p.stat().st_size for p in Path(tmp).glob("farm.db*"))
    engine.close()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": elapsed, "store_bytes": size, "peak_kib": peak_kib}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--segments", type=int, default=2000)
    parser.add_argument("--big", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the best of each is kept")
    parser.add_argument("--big-job", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.big_job:
        big_job(args.big_job)
        return

    plugins = load_plugins(extra=[NoOpPlugin()])
    node = install_runtime(NodeConfig(), plugins=plugins)
    engine = Engine.embedded(node.slots, node.capabilities)
    prefetch = 3 * node.slots
    times: dict[str, list[float]] = {"dask": [], "dask_limited": [], "farm": [], "farm_prefetch": []}
    try:
        run_dask(engine, 200)  # warm up both paths
        for _ in range(args.rounds):
            times["dask"].append(run_dask(engine, args.segments))
            times["dask_limited"].append(run_dask_limited(engine, args.segments, node.slots))
            for key, extra in (("farm", 0), ("farm_prefetch", prefetch)):
                with tempfile.TemporaryDirectory() as tmp:
                    elapsed, scheduler, store = run_farm(engine, plugins, Path(tmp), args.segments, extra)
                    scheduler.close()
                    store.close()
                times[key].append(elapsed)
    finally:
        engine.close()

    child = subprocess.run([sys.executable, __file__, "--big-job", str(args.big)], capture_output=True, text=True,
                           check=True)
    big = json.loads(child.stdout.strip().splitlines()[-1])

    rate = {key: args.segments / min(values) for key, values in times.items()}
    table = Table(title=f"{args.segments} no-op segments, LocalCluster with {node.slots} slots "
                        f"(best of {args.rounds}, same cluster, same run)")
    for column in ("path", "seconds", "per second", "ratio to raw Dask"):
        table.add_column(column, justify="right" if column != "path" else "left")
    rows = [
        ("dask", "raw Dask: client.submit one by one, all in flight"),
        ("dask_limited", f"raw Dask, at most {node.slots} in flight (Farm's rule)"),
        ("farm", "Farm: plan, store, queue, Dask, store (strict slots)"),
        ("farm_prefetch", f"Farm with prefetch={prefetch}"),
    ]
    for key, label in rows:
        table.add_row(label, f"{min(times[key]):.2f}", f"{rate[key]:.0f}", f"{rate[key] / rate['dask']:.2f}")
    console = Console()
    console.print(table)
    big_table = Table(title=f"one {args.big}-segment job (a separate process)")
    for column in ("seconds", "segments per second", "store size", "controller peak memory"):
        big_table.add_column(column, justify="right")
    big_table.add_row(f"{big['seconds']:.1f}", f"{args.big / big['seconds']:.0f}",
                      f"{big['store_bytes'] / 2**20:.1f} MiB", f"{big['peak_kib'] / 1024:.0f} MiB")
    console.print(big_table)


if __name__ == "__main__":
    main()
