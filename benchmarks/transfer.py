"""Moving a source to a node without shared storage, against `cat SRC > DEST`, in the same run.

Baseline: ``cat SRC > DEST`` on this machine (GNU cat copies with copy_file_range, inside
the kernel: the least a copy costs), and ``cat SRC | cat > DEST`` (the bytes pass through
user space once, as they must when they cross a network).
Farm: the controller's transfer route (uvicorn, TLS with the cluster's certificates, a
token) serving the file by its sha256 to a node's cache (``NodeCache.ensure``: streamed
in chunks, hashed, written as ``.part`` and renamed), over loopback, server and node in
two processes. Also shown: each side's peak RSS above what it held before the transfer.

    .venv/bin/python benchmarks/transfer.py [--mib 1024]
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
from pathlib import Path
from types import SimpleNamespace

from rich.console import Console
from rich.table import Table

SERVER = r"""
import json, resource, sys, threading, time
from pathlib import Path
from types import SimpleNamespace
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
    work_root=source.parent))
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=1024, help="size of the source in MiB")
    args = parser.parse_args()
    from farm.security import Bundle, init_cluster
    from farm.transfer import ControllerLink, NodeCache, sha256_file

    load_before = f"{os.getloadavg()[0]:.2f}"
    with tempfile.TemporaryDirectory(prefix="farm-bench-transfer-", dir=os.environ.get("FARM_BENCH_DIR")) as root:
        base = Path(root)
        bundles = init_cluster("bench", base / "bundles")
        source = base / "source.bin"
        with open(source, "wb") as handle:
            block = os.urandom(1 << 20)
            for _ in range(args.mib):
                handle.write(block)
        size = source.stat().st_size
        subprocess.run(["cat", str(source)], stdout=subprocess.DEVNULL, check=True)  # both start from page cache

        started = time.perf_counter()
        subprocess.run(["sh", "-c", 'cat "$1" > "$2"', "sh", str(source), str(base / "cat.bin")], check=True)
        cat_seconds = time.perf_counter() - started
        (base / "cat.bin").unlink()
        started = time.perf_counter()  # the same through a pipe: the bytes pass through user space
        subprocess.run(["sh", "-c", 'cat "$1" | cat > "$2"', "sh", str(source), str(base / "cat.bin")], check=True)
        pipe_seconds = time.perf_counter() - started
        (base / "cat.bin").unlink()

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
            cache = NodeCache(base / "cache", limit=4 * size)
            rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            cpu_before = _cpu()
            started = time.perf_counter()
            fetched = cache.ensure(link, sha, size)
            farm_seconds = time.perf_counter() - started
            node_cpu = _cpu() - cpu_before
            rss_node = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
            server.stdin.write("\n")
            server.stdin.flush()
            bye = json.loads(server.stdout.readline())
            rss_controller = bye["peak_kib"] - hello["rss_kib"]
            controller_cpu = bye["cpu"] - hashed
            hash_cpu = hashed - hello["cpu"]
        finally:
            server.terminate()
            server.wait()
        assert sha256_file(fetched) == sha

    rate = size / 2**20
    table = Table(title=f"moving a {args.mib} MiB source (load {load_before})")
    for column in ("way", "seconds", "MiB/s", "extra peak RSS"):
        table.add_column(column)
    table.add_row("cat SRC > DEST (baseline)", f"{cat_seconds:.2f}", f"{rate / cat_seconds:.0f}", "")
    table.add_row("cat SRC | cat > DEST", f"{pipe_seconds:.2f}", f"{rate / pipe_seconds:.0f}", "")
    table.add_row("farm transfer (TLS, sha256, cache)", f"{farm_seconds:.2f}", f"{rate / farm_seconds:.0f}",
                  f"node {rss_node / 1024:.1f} MiB, controller {rss_controller / 1024:.1f} MiB")
    Console().print(table)
    gib = size / 2**30
    print(f"load average before / after: {load_before} / {os.getloadavg()[0]:.2f}")
    print(f"controller CPU: hashing the source once {hash_cpu:.2f} s (kept for later manifests); serving it "
          f"{controller_cpu:.2f} s = {controller_cpu / gib:.2f} s per GiB")
    print(f"node CPU for the transfer: {node_cpu:.2f} s = {node_cpu / gib:.2f} s per GiB ({node_cpu / farm_seconds * 100:.0f}% of its wall time; "
          f"a busy machine shows as a low share)")
    print(f"throughput ratio farm/cat: {cat_seconds / farm_seconds:.2f} (goal >= 0.8); "
          f"farm/piped cat: {pipe_seconds / farm_seconds:.2f}")


if __name__ == "__main__":
    main()
