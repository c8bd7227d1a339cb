"""Dispatch throughput: no-op segments through Farm's whole path against raw Dask.

Farm: plan -> store -> queue -> Dask (pinned, slot-aware) -> result -> store, with
pipelining (each node holds one announced task per slot) and without it (strict slots),
and with parcels (a job of very short segments goes several segments to a task) and
without them (one segment a task).
Baseline: the same number of no-op tasks submitted one by one with ``client.submit``
to the same LocalCluster, in the same run. Also: one-frame ``command`` segments running
``true`` through ``farm run`` (sandboxed, and with ``node.sandbox: off``) against a pool
of as many processes running ``/bin/true`` the same number of times, bare and in the
bubblewrap sandbox a segment gets (what the sandbox alone allows here); and, for one job of
each size in ``--big``, its rate (a hand-out should cost the same whatever the job's size),
the store's size and the controller's peak memory (the embedded Dask scheduler and worker
run in the same process, so they are counted too).

    .venv/bin/python benchmarks/throughput.py [--segments 2000] [--true 1000] [--big 100,1000,10000,100000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

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
from farm.scheduling import handout
from farm.scheduling.handout import MAX_PARCEL
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


def run_farm(engine: Engine, plugins, root: Path, segments: int, pipeline: bool = True,
             parcels: bool = True) -> tuple[float, Scheduler, Store]:
    handout.MAX_PARCEL = MAX_PARCEL if parcels else 1
    store = Store(root / "farm.db")
    scheduler = Scheduler(store, plugins, engine, root / "work", pipeline=pipeline)
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


def run_pool(argv: list[str], count: int, slots: int, env: dict[str, str] | None = None) -> float:
    """Baseline: ``count`` runs of ``argv``, ``slots`` at a time."""
    started = time.perf_counter()
    with ThreadPoolExecutor(slots) as pool:
        list(pool.map(lambda _: subprocess.run(argv, env=env, check=True), range(count)))
    return time.perf_counter() - started


def run_true_sandboxed_pool(count: int, slots: int) -> float:
    """Baseline: ``count`` runs of /bin/true, ``slots`` at a time, each in the sandbox a
    segment's process gets (its own output folder and scratch writable)."""
    from farm import sandbox

    with tempfile.TemporaryDirectory(prefix="farm-bench-bwrap-") as tmp:
        folders = [Path(tmp) / "out", Path(tmp) / "scratch"]
        for folder in folders:
            folder.mkdir()
        argv = sandbox.wrap(["/bin/true"], sandbox.Policy(read=[], write=list(map(str, folders))), str(folders[0]),
                            sandbox.hidden_paths())
        return run_pool(argv, count, slots, sandbox.sandbox_environment(dict(os.environ), str(folders[1])))


def run_true_farm(count: int, slots: int, sandbox: bool = True) -> float:
    """``farm run`` of ``count`` one-frame command segments running ``true``, from start to exit."""
    with tempfile.TemporaryDirectory(prefix="farm-bench-true-") as tmp:
        home = Path(tmp)
        (home / "farm.yaml").write_text(yaml.safe_dump({"node": {"allow_commands": ["true"], "slots": slots,
                                                                 "sandbox": sandbox}}))
        (home / "true.yaml").write_text(yaml.safe_dump({
            "name": "true", "processor": "command", "frames": f"1-{count}", "segment": {"frames": 1},
            "settings": {"command": ["true"]}}))  # quoted by the dumper: a bare true is a boolean
        env = {**os.environ, "FARM_STATE": str(home / "state"), "FARM_CONFIG": str(home / "farm.yaml")}
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "farm.cli", "run", str(home / "true.yaml"), "-o", str(home / "out"),
                        "--quiet", "--json"], env=env, check=True, capture_output=True)
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
    parser.add_argument("--true", type=int, default=1000, help="true segments through farm run (0: skip)")
    parser.add_argument("--big", default="100,1000,10000,100000",
                        help="sizes of the jobs whose rate and controller memory are measured (empty: skip)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the best of each is kept")
    parser.add_argument("--big-job", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.big_job:
        big_job(args.big_job)
        return

    plugins = load_plugins(extra=[NoOpPlugin()])
    node = install_runtime(NodeConfig(), plugins=plugins)
    engine = Engine.embedded(node.slots, node.capabilities)
    times: dict[str, list[float]] = {"dask": [], "dask_limited": [], "farm": [], "farm_strict": [], "farm_single": []}
    try:
        run_dask(engine, 200)  # warm up both paths
        for _ in range(args.rounds):
            times["dask"].append(run_dask(engine, args.segments))
            times["dask_limited"].append(run_dask_limited(engine, args.segments, node.slots))
            for key, pipeline, parcels in (("farm", True, True), ("farm_strict", False, True),
                                           ("farm_single", True, False)):
                with tempfile.TemporaryDirectory() as tmp:
                    elapsed, scheduler, store = run_farm(engine, plugins, Path(tmp), args.segments, pipeline, parcels)
                    scheduler.close()
                    store.close()
                times[key].append(elapsed)
    finally:
        engine.close()

    true_times: dict[str, float] = {}
    if args.true:
        true_times["pool"] = run_pool(["/bin/true"], args.true, node.slots)
        true_times["bwrap_pool"] = run_true_sandboxed_pool(args.true, node.slots)
        true_times["farm_small"] = run_true_farm(args.true // 10, node.slots)
        true_times["farm"] = run_true_farm(args.true, node.slots)
        true_times["farm_open"] = run_true_farm(args.true, node.slots, sandbox=False)
    bigs = {}
    for size in (int(part) for part in args.big.split(",") if part.strip()):
        child = subprocess.run([sys.executable, __file__, "--big-job", str(size)], capture_output=True, text=True,
                               check=True)
        bigs[size] = json.loads(child.stdout.strip().splitlines()[-1])

    rate = {key: args.segments / min(values) for key, values in times.items()}
    table = Table(title=f"{args.segments} no-op segments, LocalCluster with {node.slots} slots "
                        f"(best of {args.rounds}, same cluster, same run)")
    for column in ("path", "seconds", "per second", "ratio to raw Dask"):
        table.add_column(column, justify="right" if column != "path" else "left")
    rows = [
        ("dask", "raw Dask: client.submit one by one, all in flight"),
        ("dask_limited", f"raw Dask, at most {node.slots} in flight (Farm's rule)"),
        ("farm", "Farm: plan, store, queue, Dask, store (pipelined: one announced task a slot; parcels)"),
        ("farm_strict", "Farm, strict slots (no pipelining)"),
        ("farm_single", "Farm, one segment a task (no parcels)"),
    ]
    for key, label in rows:
        table.add_row(label, f"{min(times[key]):.2f}", f"{rate[key]:.0f}", f"{rate[key] / rate['dask']:.2f}")
    console = Console()
    console.print(table)
    if true_times:
        true_table = Table(title=f"{args.true} one-frame command segments running true, {node.slots} at a time")
        for column in ("path", "seconds", "per second", "ratio to the pool", "ratio to the sandboxed pool"):
            true_table.add_column(column, justify="right" if column != "path" else "left")
        pool_rate = args.true / true_times["pool"]
        bwrap_rate = args.true / true_times["bwrap_pool"]

        def true_row(label: str, seconds: float, rate: float) -> None:
            true_table.add_row(label, f"{seconds:.2f}", f"{rate:.0f}", f"{rate / pool_rate:.2f}",
                               f"{rate / bwrap_rate:.2f}")

        true_row(f"a pool of {node.slots} running /bin/true", true_times["pool"], pool_rate)
        true_row(f"a pool of {node.slots} running /bin/true in a segment's sandbox (bwrap)", true_times["bwrap_pool"],
                 bwrap_rate)
        true_row("farm run, start to exit (sandboxed)", true_times["farm"], args.true / true_times["farm"])
        true_row("farm run, start to exit, node.sandbox: off", true_times["farm_open"],
                 args.true / true_times["farm_open"])
        # what each segment costs, without the job's fixed cost: the difference of two runs
        small = args.true // 10
        marginal = (args.true - small) / max(true_times["farm"] - true_times["farm_small"], 1e-9)
        true_row(f"farm run, per segment ({small} vs {args.true} segments)",
                 true_times["farm"] - true_times["farm_small"], marginal)
        console.print(true_table)
    big_table = Table(title="one job per size, each in a separate process")
    for column in ("segments", "seconds", "segments per second", "store size", "controller peak memory"):
        big_table.add_column(column, justify="right")
    for size, big in bigs.items():
        big_table.add_row(str(size), f"{big['seconds']:.1f}", f"{size / big['seconds']:.0f}",
                          f"{big['store_bytes'] / 2**20:.1f} MiB", f"{big['peak_kib'] / 1024:.0f} MiB")
    console.print(big_table)

if __name__ == "__main__":
    main()
