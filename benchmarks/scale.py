"""One real controller against many simulated nodes: does it hold a studio farm?

The controller is the real one, in a process of its own: its store (SQLite, WAL), its
queue and scheduler, its HTTPS API served by uvicorn and its live event stream. Only
Dask is replaced. The cut is the Dask client that :class:`farm.engine.Engine` holds: a
simulated one plays N workers of S slots each. It speaks what a farm node speaks
through Dask (:mod:`farm.wire`): every second each node's report on ``farm-node``; when
a segment ends, its outcome on ``farm-result`` (stamped with the sender, as a cluster's
scheduler does), then the task's end. A segment "runs" for a random time: uniform
between 0.5x and 1.5x a mean chosen so that the nodes could take ``--demand`` segments a
second if the controller handed them out at once. What is not simulated: Dask's
scheduler and the network (see docs/SCALE.md).

The backlog (``--segments`` across ``--jobs`` jobs of the command processor) is submitted
through ``POST /api/batches`` before any node is connected; then every node arrives at
once and the run is timed until the backlog is handed out (or ``--duration`` seconds).
Meanwhile ``--api-clients`` HTTPS clients read ``GET /api/jobs`` back to back and one
client reads ``/api/events/stream``.

- dispatch rate: hand-outs a second from half a mean segment after every slot is filled
  (before that, the segments handed out at the fill, all started together, have not begun
  to end, and the nodes free next to no slots) to the backlog handed out; the slowest 5 s
  window is printed with what the nodes freed in it;
- dispatch latency: from a slot becoming free (its segment's outcome sent) to the next
  segment starting in that slot: what a node waits with a backlog queued. As a Dask
  worker does, a simulated node runs ``slots`` segments at once and holds the rest; the
  controller pipelines (one announced segment per slot), so a slot that frees starts the
  one its node holds, and the controller has a segment's length to send the next;
- refill: from a slot becoming free to the controller's next hand-out to its node;
- event lag: from a segment's outcome sent by its node to its ``segment_done`` read by
  the stream client (and from the event's publication to its reading);
- controller CPU: the process's CPU less the simulator's own work (Engine's handlers,
  which run in the simulator's thread as they run in Dask's, count as controller).

    .venv/bin/python benchmarks/scale.py                       # quick: 100 nodes, 10,000 segments
    .venv/bin/python benchmarks/scale.py --nodes 1000 --jobs 1000 --segments 1000000
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from array import array
from collections import deque
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TARGETS = {"rate": 1000.0, "p99": 0.050, "rss": 500 * 2**20, "api_p99": 0.200}
CAPABILITIES = {  # what a Debian node with ffmpeg, POV-Ray and Blender reports, plus `true`
    "processor:command": "", "processor:imageseq": "", "processor:transcode": "", "sandbox": "bubblewrap-0.8.0",
    "ffmpeg": "5.1.9", "ffprobe": "5.1.9", "ffmpeg-encoder:libx264": "", "ffmpeg-encoder:libx265": "",
    "ffmpeg-encoder:prores_ks": "", "ffmpeg-encoder:libvpx-vp9": "", "ffmpeg-encoder:aac": "",
    "povray": "3.7.0.10", "blender": "3.4.1", "command:ffmpeg": "", "command:true": "",
}
#: a segment's log as a node sends it for a short command (header, command, footer)
LOG = ("=== segment {seg} (frames {frame}) attempt {attempt} of job {job} on node {node}\n"
       "$ bwrap --ro-bind / / --dev /dev --proc /proc --tmpfs /tmp --unshare-net -- /usr/bin/true {frame}\n"
       "=== exit status 0 after 0.004 s, peak memory 1.2 MiB\n")
BUCKET = 1e-4  # latency histogram: 0.1 ms buckets up to 10 s
BUCKETS = 100_000
SAMPLES = 20_000  # about this many segments have their end time kept, for the event lag


def sampled(segment_id: str, every: int) -> bool:
    return zlib.crc32(segment_id.encode()) % every == 0


# -- the controller's side (the child process) ---------------------------------------------


class SimulatedFuture:
    __slots__ = ("key", "status", "callbacks")

    def __init__(self, key: str):
        self.key, self.status, self.callbacks = key, "pending", []

    def add_done_callback(self, callback: Any) -> None:
        self.callbacks.append(callback)

    def done(self) -> bool:
        return self.status != "pending"

    def release(self) -> None:
        pass

    def exception(self, timeout: float | None = None) -> None:
        return None


class SimulatedDask:
    """What :class:`farm.engine.Engine` uses of a Dask client, played by N nodes of S slots.

    One thread delivers everything in time order (a heap): node reports, outcomes, task
    ends; handlers run in it as they run in Dask's event-loop thread."""

    def __init__(self, nodes: int, slots: int, mean: float, sample_every: int, stats_path: Path):
        from farm.wire import NODE_TOPIC, RESULT_TOPIC, SENDER

        self._topics = (NODE_TOPIC, RESULT_TOPIC, SENDER)
        self.workers = [(f"tls://10.{i // 250}.{i % 250}.7:40{i % 1000:03d}", f"sim{i:04d}") for i in range(nodes)]
        self._names = dict(self.workers)
        self.slots, self.mean, self.sample_every = slots, mean, sample_every
        self.stats_path = stats_path
        self.scheduler = SimpleNamespace(address="tls://127.0.0.1:8786", identity=self.scheduler_info)
        self._handlers: dict[str, Any] = {}
        self._heap: list[tuple[float, int, str, Any]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        # Slots freed and not yet given a segment (when each was freed; True while the nodes
        # first fill), and segments handed to a node whose slots are all busy: a Dask worker
        # runs ``slots`` tasks at once and keeps the rest (pipelined hand-outs) until a slot frees.
        self._free: dict[str, deque[tuple[float, bool]]] = {address: deque() for address, _ in self.workers}
        self._held: dict[str, deque[tuple[Any, ...]]] = {address: deque() for address in self._free}
        self._running: dict[str, int] = dict.fromkeys(self._free, 0)
        self._freed_at: dict[str, deque[float]] = {address: deque() for address in self._free}
        self._cancelled: set[str] = set()
        self._random = random.Random(19)
        self.live = threading.Event()
        self.stopped = threading.Event()
        self._stats_lock = threading.Lock()  # the final document is never overwritten by a last count
        self._stats_final = False
        # figures
        self.histogram = array("l", bytes(8 * (BUCKETS + 1)))  # slot free -> its next segment starts
        self.refill = array("l", bytes(8 * (BUCKETS + 1)))  # slot free -> the controller's next hand-out to that node
        self.fill_latency_max = 0.0
        self.dispatched = self.ended = self.filled_at_count = 0
        self.live_at = self.filled_at = 0.0
        self.pickle_seconds = 0.0
        self.handler_cpu = 0.0
        self.sim_cpu = 0.0
        self.finished_at: dict[str, float] = {}
        self.timeline: list[tuple[float, int, int]] = []
        self._thread = threading.Thread(target=self._run, name="simulated-dask", daemon=True)
        self._thread.start()

    # -- what Engine calls -----------------------------------------------------------------

    def subscribe_topic(self, topic: str, handler: Any) -> None:
        self._handlers[topic] = handler

    def scheduler_info(self, n_workers: int = -1) -> dict[str, Any]:
        if not self.live.is_set():
            return {"workers": {}}
        return {"workers": {address: {"name": name, "nthreads": self.slots, "id": f"Worker-{name}"}
                            for address, name in self.workers}}

    def sync(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)  # the scheduler is asked directly (farm.engine.Engine.nodes)

    def submit(self, fn: Any, job: Any, segment: Any, key: str, workers: list[str], **_: Any) -> SimulatedFuture:
        cpu = time.thread_time()
        # Dask pickles a task's arguments once, in the controller, to send them to the worker
        pickle.dumps((job, segment), protocol=5)
        self.pickle_seconds += time.thread_time() - cpu
        now = time.perf_counter()
        address = workers[0]
        freed = self._freed_at[address]
        if freed:
            self.refill[min(BUCKETS, int((now - freed.popleft()) / BUCKET))] += 1
        self.dispatched += 1
        future = SimulatedFuture(key)
        task = (future, segment.attempt_id, segment.id, job.id, address, str(segment.output_dir), segment.label)
        if self._free[address]:
            self._start(now, task)
        else:
            self._held[address].append(task)
        return future

    def _start(self, now: float, task: tuple[Any, ...]) -> None:
        """A slot of the node takes the task: it "runs" for a random time."""
        address = task[4]
        if task[1] in self._cancelled:  # cancelled while held: it never starts, its outcome says so
            self._push(now, "end", task)
            return
        freed, fill = self._free[address].popleft()
        latency = now - freed
        if fill:
            self.fill_latency_max = max(self.fill_latency_max, latency)
        else:
            self.histogram[min(BUCKETS, int(latency / BUCKET))] += 1
        self._running[address] += 1
        self._push(now + self.mean * (0.5 + self._random.random()), "end", task + (True,))

    def run(self, fn: Any, *attempt_ids: str, workers: list[str], wait: bool = True) -> None:
        self._cancelled.update(attempt_ids)  # a node ends the attempts' process groups; their outcomes say cancelled

    def close(self) -> None:
        self.stopped.set()
        with self._cond:
            self._cond.notify()

    # -- the nodes ------------------------------------------------------------------------------

    def connect(self) -> None:
        """Every node arrives at once, with all its slots free."""
        now = time.perf_counter()
        self.live_at = now
        for index, (address, _) in enumerate(self.workers):
            self._free[address].extend([(now, True)] * self.slots)
            self._push(now + index / len(self.workers), "report", index)
        self.live.set()

    def _push(self, when: float, kind: str, payload: Any) -> None:
        item = (when, next(self._seq), kind, payload)
        with self._cond:
            heapq.heappush(self._heap, item)
            if self._heap[0] is item:  # sooner than anything the thread waits for
                self._cond.notify()

    def _run(self) -> None:
        next_stats = time.perf_counter() + 1.0
        while not self.stopped.is_set():
            with self._cond:
                wait = min(self._heap[0][0] - time.perf_counter() if self._heap else 0.05, 0.05)
                if wait > 0:
                    self._cond.wait(wait)
                now = time.perf_counter()
                due = []
                while self._heap and self._heap[0][0] <= now:
                    due.append(heapq.heappop(self._heap))
            for _, _, kind, payload in due:
                if kind == "end":
                    self._end(*payload)
                else:
                    self._report(payload)
            if now >= next_stats:
                next_stats = now + 1.0
                self.timeline.append((now, self.dispatched, self.ended))
                if not self.filled_at and self.live_at and not any(
                        fill for free in self._free.values() for _, fill in free):
                    self.filled_at, self.filled_at_count = now, self.dispatched
                self.sim_cpu = time.thread_time()
                self.write_stats()

    def _deliver(self, topic: str, message: dict[str, Any]) -> None:
        started = time.thread_time()
        self._handlers[topic]((time.time(), message))
        self.handler_cpu += time.thread_time() - started

    def _report(self, index: int) -> None:
        node_topic, _, sender = self._topics
        address, name = self.workers[index]
        self._deliver(node_topic, {"name": name, "slots": self.slots, "capabilities": CAPABILITIES, "accepting": True,
                                   "hand_back": False, "reason": "", "running": self._running[address],
                                   "address": address, sender: address})
        self._push(time.perf_counter() + 1.0, "report", index)

    def _end(self, future: SimulatedFuture, attempt_id: str, segment_id: str, job_id: str, address: str,
             output_dir: str, label: str, ran: bool = False) -> None:
        from farm.wire import outcome_message

        _, result_topic, sender = self._topics
        name = self._names[address]
        if attempt_id in self._cancelled:
            self._cancelled.discard(attempt_id)
            outcome = {"ok": False, "cancelled": True, "reason": "cancelled", "log": "", "node": name}
        else:
            outcome = {"ok": True, "result": {"dir": output_dir, "files": []}, "node": name,
                       "log": LOG.format(seg=segment_id, frame=label.split()[-1], attempt=attempt_id, job=job_id,
                                         node=name)}
        started = time.thread_time()
        message = outcome_message(attempt_id, outcome)  # what the node does, on the node
        message[sender] = address
        self.handler_cpu -= time.thread_time() - started
        if ran:
            now = time.perf_counter()
            self._running[address] -= 1
            self._free[address].append((now, False))
            self._freed_at[address].append(now)
            held = self._held[address]
            while held and self._free[address]:  # the node starts what it holds at once
                self._start(now, held.popleft())
        if sampled(segment_id, self.sample_every):
            self.finished_at[segment_id] = time.time()
        self._deliver(result_topic, message)
        future.status = "finished"
        started = time.thread_time()
        for callback in future.callbacks:
            callback(future)
        self.handler_cpu += time.thread_time() - started
        self.ended += 1

    def write_stats(self, final: bool = False) -> None:
        """The counts every second (cheap: this process is the one measured); everything at the end."""
        document: dict[str, Any] = {"dispatched": self.dispatched, "ended": self.ended}
        if final:
            document.update({
                "live_at": self.live_at, "filled_at": self.filled_at, "filled_at_count": self.filled_at_count,
                "fill_latency_max": self.fill_latency_max, "timeline": self.timeline,
                "pickle_seconds": self.pickle_seconds, "sim_cpu": self.sim_cpu, "handler_cpu": self.handler_cpu,
                "histogram": list(self.histogram), "refill": list(self.refill), "finished_at": self.finished_at,
            })
        with self._stats_lock:
            if self._stats_final:
                return
            self._stats_final = final
            temporary = self.stats_path.with_suffix(".tmp")
            temporary.write_text(json.dumps(document))
            temporary.replace(self.stats_path)


class SimulatedCluster:
    def close(self) -> None:
        pass


def serve(args: argparse.Namespace) -> None:
    """The controller's process: a real Controller whose Dask is :class:`SimulatedDask`."""
    import distributed

    from farm.config import ControllerConfig, FarmConfig
    from farm.controller import Controller
    from farm.collector import tune_for_a_queue
    from farm.security import Bundle

    root = Path(args.serve)
    slots_total = args.nodes * args.slots
    every = max(1, args.segments // SAMPLES)
    dask = SimulatedDask(args.nodes, args.slots, slots_total / args.demand, every, root / "stats.json")
    distributed.LocalCluster = lambda *a, **k: SimulatedCluster()  # what Controller.start builds
    distributed.Client = lambda *a, **k: dask
    signal.signal(signal.SIGUSR1, lambda *_: dask.connect())
    config = FarmConfig(controller=ControllerConfig(host="127.0.0.1", api_port=args.port, scheduler_port=0,
                                                    advertise=False, storage=str(root / "storage")))
    controller = Controller(config, Bundle.load(root / "bundles" / "controller.yaml"), str(root / "state"))
    try:
        controller.start()
        tune_for_a_queue()  # as `farm controller` does
        (root / "ready").write_text(controller.api_url)
        controller.serve_forever()
    finally:
        dask.stopped.set()
        dask.write_stats(final=True)
        controller.close()


# -- the bench's side (the parent process) --------------------------------------------------


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))] if ordered else float("nan")


def histogram_percentile(histogram: list[int], share: float) -> float:
    total = sum(histogram)
    if not total:
        return float("nan")
    wanted, seen = share * total, 0
    for index, count in enumerate(histogram):
        seen += count
        if seen >= wanted:
            return (index + 1) * BUCKET
    return BUCKETS * BUCKET


class Proc:
    """CPU seconds and memory of a process, from /proc."""

    def __init__(self, pid: int):
        self.pid = pid
        self.tick = os.sysconf("SC_CLK_TCK")

    def cpu(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / self.tick

    def memory(self, key: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--slots", type=int, default=4, help="slots per node")
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--segments", type=int, default=10_000, help="the whole backlog, across the jobs")
    parser.add_argument("--demand", type=float, default=2000.0,
                        help="segments/s the nodes would take if handed out at once (sets the segments' length)")
    parser.add_argument("--api-clients", type=int, default=2)
    parser.add_argument("--duration", type=float, default=600.0, help="stop timing after this many seconds")
    parser.add_argument("--keep", action="store_true", help="keep the state folder (its path is printed)")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args)
        return
    if args.segments % args.jobs:
        parser.error("--segments must be a multiple of --jobs (every job has the same number of segments)")
    root = Path(tempfile.mkdtemp(prefix="farm-scale-"))
    try:
        figures = run(args, root)
    finally:
        if not args.keep:
            import shutil

            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"state kept in {root}")
    show(args, figures)


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    import httpx
    import yaml

    from farm.client import load_credentials
    from farm.security import init_cluster
    from tests.cluster_helpers import free_port

    paths = init_cluster("scale", root / "bundles")
    credentials = load_credentials(paths["admin"])
    port = free_port()
    url = f"https://127.0.0.1:{port}"
    per_job = args.segments // args.jobs
    inputs = root / "inputs"
    inputs.mkdir()
    for index in range(args.jobs):
        (inputs / f"shot{index:05d}.txt").write_text(str(index))
    profile = root / "scale.yaml"
    profile.write_text(yaml.safe_dump({
        "name": "scale", "processor": "command", "frames": f"1-{per_job}", "segment": {"frames": 1},
        "settings": {"command": ["true", "{input}", "{start}"]},
    }))
    log = open(root / "controller.log", "w")
    child = subprocess.Popen([sys.executable, __file__, "--serve", str(root), "--port", str(port),
                              "--nodes", str(args.nodes), "--slots", str(args.slots), "--demand", str(args.demand),
                              "--segments", str(args.segments)], stdout=log, stderr=subprocess.STDOUT)
    proc = Proc(child.pid)
    figures: dict[str, Any] = {}
    stop = threading.Event()
    try:
        deadline = time.monotonic() + 120
        while not (root / "ready").exists():
            if child.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the controller did not start; see {root / 'controller.log'}:\n"
                                 + (root / "controller.log").read_text()[-3000:])
            time.sleep(0.1)
        headers = {"Authorization": f"Bearer {credentials.token}"}
        http = httpx.Client(base_url=url, verify=credentials.client_ssl_context(), timeout=600, headers=headers)

        # the backlog, through the API, before any node is connected
        started = time.perf_counter()
        chunk = max(1, 20_000 // per_job)
        all_inputs = sorted(str(path) for path in inputs.iterdir())
        for first in range(0, len(all_inputs), chunk):
            answer = http.post("/api/batches", json={"profile": str(profile), "inputs": all_inputs[first:first + chunk],
                                                     "destination": str(root / "out")})
            answer.raise_for_status()
        figures["submit_seconds"] = time.perf_counter() - started
        figures["rss_backlog"] = proc.memory("VmRSS")

        # the readers: the event stream and the API
        every = max(1, args.segments // SAMPLES)
        received: dict[str, float] = {}
        hub_lag: list[float] = []
        streaming = threading.Event()

        def listen() -> None:
            with httpx.Client(verify=credentials.client_ssl_context(), headers=headers,
                              timeout=httpx.Timeout(60, read=120)) as client:
                with client.stream("GET", f"{url}/api/events/stream") as stream:
                    streaming.set()
                    for line in stream.iter_lines():
                        if stop.is_set():
                            return
                        if not line.startswith("data: "):
                            continue
                        now = time.time()
                        event = json.loads(line[6:])
                        hub_lag.append(now - event["ts"])
                        if event["kind"] == "segment_done" and sampled(event["segment"], every):
                            received[event["segment"]] = now

        api_seconds: list[float] = []

        def read_jobs() -> None:
            with httpx.Client(base_url=url, verify=credentials.client_ssl_context(), timeout=120,
                              headers=headers) as client:
                while not stop.is_set():
                    t0 = time.perf_counter()
                    client.get("/api/jobs").raise_for_status()
                    api_seconds.append(time.perf_counter() - t0)

        listener = threading.Thread(target=listen, daemon=True)
        listener.start()
        streaming.wait(30)
        readers = [threading.Thread(target=read_jobs, daemon=True) for _ in range(args.api_clients)]

        # every node arrives; time until the backlog is handed out
        cpu0, t0 = proc.cpu(), time.perf_counter()
        child.send_signal(signal.SIGUSR1)
        for reader in readers:
            reader.start()
        stats: dict[str, Any] = {}
        while time.perf_counter() - t0 < args.duration:
            time.sleep(1.0)
            try:
                stats = json.loads((root / "stats.json").read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                continue
            if child.poll() is not None:
                raise SystemExit(f"the controller stopped; see {root / 'controller.log'}")
            if stats["dispatched"] >= args.segments:
                break
        figures["cpu"], figures["wall"] = proc.cpu() - cpu0, time.perf_counter() - t0
        figures["rss_peak"] = proc.memory("VmHWM")
        figures["rss_end"] = proc.memory("VmRSS")
        stop.set()
        for reader in readers:
            reader.join(130)
        time.sleep(2.0)  # the last events reach the stream
        child.send_signal(signal.SIGTERM)
        child.wait(120)
        stats = json.loads((root / "stats.json").read_text())
        figures["stats"] = stats
        figures["api"] = api_seconds
        figures["hub_lag"] = hub_lag
        figures["event_lag"] = [received[seg] - at for seg, at in stats["finished_at"].items() if seg in received]
        figures["store"] = sum(path.stat().st_size for path in (root / "state").glob("farm.db*")) if (
            root / "state").exists() else 0
        return figures
    finally:
        stop.set()
        if child.poll() is None:
            child.kill()
            child.wait()
        log.close()


def show(args: argparse.Namespace, figures: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    stats = figures["stats"]
    timeline = stats["timeline"]
    live = stats["live_at"]
    filled = stats["filled_at"] or live
    # Steady: from the nodes freeing slots at the demand's pace to the backlog handed out (or
    # the end of timing). Every segment handed out at the fill starts at once and none ends
    # before half a mean segment: until then the nodes free next to nothing, and no
    # controller could hand out more than they free.
    mean = args.nodes * args.slots / args.demand
    steady = [(t, d, e) for t, d, e in timeline if t >= filled + 0.5 * mean]
    if len(steady) >= 2:
        rate = (steady[-1][1] - steady[0][1]) / (steady[-1][0] - steady[0][0])
        windows = [((b[1] - a[1]) / (b[0] - a[0]), (b[2] - a[2]) / (b[0] - a[0]))
                   for a, b in zip(steady, steady[5:]) if b[1] < args.segments]
        worst, freed = min(windows) if windows else (rate, float("nan"))
    else:
        rate = worst = freed = float("nan")
    p50 = histogram_percentile(stats["histogram"], 0.50)
    p99 = histogram_percentile(stats["histogram"], 0.99)
    sim_own = stats["sim_cpu"] - stats["handler_cpu"]
    controller_cpu = figures["cpu"] - sim_own
    slots = args.nodes * args.slots
    mib = 2**20

    def mark(ok: bool) -> str:
        return "[green]met[/]" if ok else "[red]missed[/]"

    table = Table(title=f"one controller, {args.nodes} simulated nodes x {args.slots} slots, "
                        f"{args.segments:,} segments in {args.jobs:,} jobs (demand {args.demand:g}/s)")
    for column in ("measure", "value", "target", ""):
        table.add_column(column)
    table.add_row("backlog submitted through the API", f"{figures['submit_seconds']:.1f} s "
                  f"({args.segments / figures['submit_seconds']:,.0f} segments/s)", "", "")
    table.add_row(f"all {slots:,} slots filled", f"{filled - live:.1f} s after the nodes arrived "
                  f"(slowest first hand-out {stats['fill_latency_max'] * 1000:.0f} ms)", "", "")
    table.add_row(f"dispatch rate, sustained (every slot busy, from {0.5 * mean:.1f} s after the fill: half a "
                  "mean segment); the slowest 5 s, and what the nodes freed in them",
                  f"{rate:,.0f}/s (slowest 5 s: {worst:,.0f}/s; freed {freed:,.0f}/s)",
                  "≥ 1,000/s", mark(worst >= TARGETS["rate"]))
    table.add_row("dispatch latency p50 / p99 (slot free -> its next segment starts)",
                  f"{p50 * 1000:.1f} / {p99 * 1000:.1f} ms", "p99 ≤ 50 ms", mark(p99 <= TARGETS["p99"]))
    table.add_row("refill p50 / p99 (slot free -> the next hand-out to its node; pipelined, the node "
                  "holds one per slot meanwhile)",
                  f"{histogram_percentile(stats['refill'], .5) * 1000:.1f} / "
                  f"{histogram_percentile(stats['refill'], .99) * 1000:.1f} ms", "", "")
    table.add_row("handed out / ended in the timed run",
                  f"{stats['dispatched']:,} / {stats['ended']:,} in {figures['wall']:.0f} s", "", "")
    table.add_row("controller CPU", f"{controller_cpu / figures['wall'] * 100:.0f}% of one core "
                  f"({controller_cpu / max(1, stats['dispatched']) * 1000:.2f} ms per dispatch; "
                  f"pickling tasks {stats['pickle_seconds'] / max(1, stats['dispatched']) * 1e6:.0f} µs)", "", "")
    table.add_row("controller RSS: backlog held / peak", f"{figures['rss_backlog'] / mib:.0f} / "
                  f"{figures['rss_peak'] / mib:.0f} MiB", "≤ 500 MiB", mark(figures["rss_peak"] <= TARGETS["rss"]))
    table.add_row("store on disk (farm.db, -wal, -shm)", f"{figures['store'] / mib:.0f} MiB", "", "")
    api = figures["api"]
    table.add_row(f"GET /api/jobs ({args.jobs:,} jobs) p50 / p99, {args.api_clients} clients, "
                  f"{len(api):,} reads", f"{percentile(api, .5) * 1000:.0f} / {percentile(api, .99) * 1000:.0f} ms",
                  "p99 ≤ 200 ms", mark(percentile(api, .99) <= TARGETS["api_p99"]))
    lag = figures["event_lag"]
    table.add_row(f"event lag p50 / p99: outcome sent -> segment_done read ({len(lag):,} sampled)",
                  f"{percentile(lag, .5) * 1000:.0f} / {percentile(lag, .99) * 1000:.0f} ms", "", "")
    hub = figures["hub_lag"]
    table.add_row(f"event lag p50 / p99: published -> read ({len(hub):,} events)",
                  f"{percentile(hub, .5) * 1000:.0f} / {percentile(hub, .99) * 1000:.0f} ms", "", "")
    table.add_row("simulator's own CPU (left out above)", f"{sim_own:.1f} s", "", "")
    Console(width=160).print(table)
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
