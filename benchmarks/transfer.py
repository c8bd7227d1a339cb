"""Moving a source to a node without shared storage, against `cat SRC > DEST`, in the same run.

Baseline: ``cat SRC > DEST`` on this machine (GNU cat copies with copy_file_range, inside
the kernel: the least a copy costs), and ``cat SRC | cat > DEST`` (the bytes pass through
user space once, as they must when they cross a network).
Farm: the controller's transfer route (uvicorn, TLS with the cluster's certificates, a
token) serving the file by its sha256 to a node's cache (``NodeCache.ensure``: streamed
in chunks, hashed, written as ``.part`` and renamed), over loopback, server and node in
two processes. Also shown: each side's peak RSS above what it held before the transfer.

    .venv/bin/python benchmarks/transfer.py [--mib 1024] [--rounds 3]

Also shown, to tell where the time goes: the same route with the node's bytes dropped
(TLS and HTTP alone), and SHA-256 and BLAKE2b alone over the source on one core.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from rich.console import Console
from rich.table import Table

SERVER = r"""
import json, resource, sys, threading, time
from pathlib import Path
from types import SimpleNamespace
from typing import Any
import uvicorn
from fastapi import FastAPI
from farm.security import Bundle
from farm.transfer_api import add_routes

bundle = Bundle.load(sys.argv[1])
source = Path(sys.argv[2])
job = SimpleNamespace(input=source, input_stamp=None)
processor = SimpleNamespace(input_files=lambda job: [job.input])
controller = SimpleNamespace(scheduler=SimpleNamespace(
    jobs={"jbench": SimpleNamespace(state="running", job=job, processor=processor)}, attempts={},
    work_root=source.parent, listeners=[]))
app = FastAPI()
add_routes(app, controller, lambda: None, lambda: None)
with bundle.pem_paths() as files:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, ssl_certfile=files["cert"],
                                           ssl_keyfile=files["key"], log_level="warning", lifespan="off"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.01)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"port": server.servers[0].sockets[0].getsockname()[1], "rss_kib": before,
                  "cpu": usage.ru_utime + usage.ru_stime}), flush=True)
sys.stdin.readline()  # the manifest was asked for (the source hashed): the transfer starts
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"cpu": usage.ru_utime + usage.ru_stime}), flush=True)
sys.stdin.readline()
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"peak_kib": usage.ru_maxrss, "cpu": usage.ru_utime + usage.ru_stime}), flush=True)
"""


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _timed(work: Any) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def _hash_rate(name: str, source: Path) -> float:
    """Seconds for ``hashlib.new(name)`` over the (warm) source in CHUNK pieces, one core."""
    from farm.transfer import CHUNK

    buffer = bytearray(CHUNK)
    digest = hashlib.new(name)
    with open(source, "rb", buffering=0) as handle:
        started = time.perf_counter()
        while count := handle.readinto(buffer):
            digest.update(memoryview(buffer)[:count])
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description="Farm's transfer of a source to a node's cache against cat, "
                                     "in the same run (medians of interleaved rounds)")
    parser.add_argument("--mib", type=int, default=1024, help="size of the source in MiB")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every way, interleaved (medians shown)")
    args = parser.parse_args()
    from farm.security import Bundle, init_cluster
    from farm.transfer import CHUNK, ROUTE, ControllerLink, NodeCache, _read_full, sha256_file

    load_before = f"{os.getloadavg()[0]:.2f}"
    times: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="farm-bench-transfer-", dir=os.environ.get("FARM_BENCH_DIR")) as root:
        base = Path(root)
        bundles = init_cluster("bench", base / "bundles")
        source = base / "source.bin"
        with open(source, "wb") as handle:
            block = os.urandom(1 << 20)
            for _ in range(args.mib):
                handle.write(block)
        size = source.stat().st_size
        subprocess.run(["cat", str(source)], stdout=subprocess.DEVNULL, check=True)  # all start from page cache

        def shell(line: str) -> Any:
            return lambda: subprocess.run(["sh", "-c", line, "sh", str(source), str(base / "cat.bin")], check=True)

        server = subprocess.Popen([sys.executable, "-c", SERVER, str(bundles["controller"]), str(source)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            hello = json.loads(server.stdout.readline())
            link = ControllerLink(f"https://127.0.0.1:{hello['port']}", Bundle.load(bundles["node"]), "bench")
            manifest = link.manifest("jbench")  # the controller hashes the source here
            sha = manifest["files"][0]["sha256"]
            server.stdin.write("\n")
            server.stdin.flush()
            hashed = json.loads(server.stdout.readline())["cpu"]

            def dropped() -> None:  # the route's bytes read and dropped: TLS and HTTP, no hash, no disk
                connection = link._connection()
                connection.request("GET", f"{ROUTE}/blobs/{sha}", headers=link.headers)
                response, buffer = connection.getresponse(), bytearray(CHUNK)
                while _read_full(response, buffer):
                    pass
                connection.close()

            rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            node_cpu = 0.0
            for _ in range(args.rounds):
                for way, work in (("cat", shell('cat "$1" > "$2"')), ("pipe", shell('cat "$1" | cat > "$2"'))):
                    times.setdefault(way, []).append(_timed(work))
                    (base / "cat.bin").unlink()
                shutil.rmtree(base / "cache", ignore_errors=True)
                cache = NodeCache(base / "cache", limit=4 * size)
                cpu_before = _cpu()
                times.setdefault("farm", []).append(_timed(lambda: cache.ensure(link, sha, size)))
                node_cpu += _cpu() - cpu_before
                times.setdefault("dropped", []).append(_timed(dropped))
            rss_node = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
            fetched = cache.blobs / sha
            server.stdin.write("\n")
            server.stdin.flush()
            bye = json.loads(server.stdout.readline())
            rss_controller = bye["peak_kib"] - hello["rss_kib"]
            controller_cpu = (bye["cpu"] - hashed) / args.rounds / 2  # each round served it twice
            hash_cpu = hashed - hello["cpu"]
        finally:
            server.terminate()
            server.wait()
        assert sha256_file(fetched) == sha
        for name in ("sha256", "blake2b"):
            times[name] = [_hash_rate(name, source) for _ in range(args.rounds)]

    median = {way: statistics.median(seconds) for way, seconds in times.items()}
    rate = size / 2**20
    table = Table(title=f"moving a {args.mib} MiB source, median of {args.rounds} (load {load_before})")
    for column in ("way", "seconds", "MiB/s", "vs cat", "extra peak RSS"):
        table.add_column(column)
    rows = [("cat SRC > DEST (baseline)", "cat", ""), ("cat SRC | cat > DEST", "pipe", ""),
            ("farm transfer (TLS, sha256, cache)", "farm",
             f"node {rss_node / 1024:.1f} MiB, controller {rss_controller / 1024:.1f} MiB"),
            ("  its route alone (TLS, HTTP; bytes dropped)", "dropped", ""),
            ("  sha256 alone, one core", "sha256", ""), ("  blake2b alone, one core", "blake2b", "")]
    for label, way, note in rows:
        table.add_row(label, f"{median[way]:.2f}", f"{rate / median[way]:.0f}", f"{median['cat'] / median[way]:.2f}",
                      note)
    Console().print(table)
    gib = size / 2**30
    print(f"all rounds (s): " + "; ".join(f"{way} {' '.join(f'{t:.2f}' for t in seconds)}"
                                        for way, seconds in times.items()))
    print(f"load average before / after: {load_before} / {os.getloadavg()[0]:.2f}")
    print(f"controller CPU: hashing the source once {hash_cpu:.2f} s (kept for later manifests); serving it "
          f"{controller_cpu:.2f} s = {controller_cpu / gib:.2f} s per GiB")
    node_cpu /= args.rounds
    print(f"node CPU for the transfer: {node_cpu:.2f} s = {node_cpu / gib:.2f} s per GiB "
          f"({node_cpu / median['farm'] * 100:.0f}% of its wall time; a busy machine shows as a low share)")
    print(f"throughput ratio farm/cat: {median['cat'] / median['farm']:.2f} (goal >= 0.8); "
          f"farm/piped cat: {median['pipe'] / median['farm']:.2f}")


if __name__ == "__main__":
    main()
