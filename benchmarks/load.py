"""Load: many nodes and many jobs against one controller (all real processes here).

- N one-slot nodes join one controller;
- J one-segment jobs are submitted through the HTTP API at once (C concurrent clients);
- reports time to accept them, time to drain, dispatch rate, and the controller's peak
  memory (VmHWM).

    .venv/bin/python benchmarks/load.py [--nodes 20] [--jobs 1000] [--clients 20]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from farm.security import Bundle  # noqa: E402
from tests.cluster_helpers import Cluster  # noqa: E402
from tests.conftest import write_profile  # noqa: E402


def peak_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        c = Cluster(Path(tmp) / "c")
        try:
            c.start_controller()
            started = time.monotonic()
            names = [f"n{i:02d}" for i in range(args.nodes)]
            for name in names:
                c.start_node(name, "--slots", "1")
            c.wait_for_nodes(*names, timeout=600)
            join_seconds = time.monotonic() - started
            profile = write_profile(c.root, "tiny", {
                "processor": "command", "frames": "1",
                "settings": {"command": [sys.executable, "-S", "-c", "pass", "{start}"]},
            })
            bundle = Bundle.load(c.bundles / "node.yaml")
            headers = {"Authorization": f"Bearer {bundle.token}"}

            def submit(i: int) -> str:
                with httpx.Client(verify=bundle.client_ssl_context(), timeout=600) as http:
                    answer = http.post(f"{c.url}/api/batches", headers=headers,
                                       json={"profile": str(profile), "destination": str(c.root / "out" / str(i))})
                answer.raise_for_status()
                return answer.json()["jobs"][0]["id"]

            t0 = time.monotonic()
            with ThreadPoolExecutor(args.clients) as pool:
                list(pool.map(submit, range(args.jobs)))
            accepted = time.monotonic() - t0
            with httpx.Client(verify=bundle.client_ssl_context(), timeout=120) as http:
                def unfinished() -> int:
                    jobs = http.get(f"{c.url}/api/jobs", headers=headers).json()
                    return sum(1 for j in jobs if j["state"] not in ("done", "failed", "cancelled"))

                c.wait_until(lambda: unfinished() == 0, 3600, "the queue to drain", every=1)
                drained = time.monotonic() - t0
                states = {}
                for job in http.get(f"{c.url}/api/jobs", headers=headers).json():
                    states[job["state"]] = states.get(job["state"], 0) + 1
            memory = peak_kib(c.controller.pid)
        except Exception:
            print((c.root / "controller.log").read_text()[-3000:], file=sys.stderr)
            raise
        finally:
            c.stop()
    table = Table(title=f"{args.jobs} jobs through the API ({args.clients} clients), {args.nodes} one-slot nodes")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("nodes joined", f"{join_seconds:.1f} s")
    table.add_row("all jobs accepted", f"{accepted:.1f} s ({args.jobs / accepted:.0f} jobs/s)")
    table.add_row("submitted -> queue drained", f"{drained:.1f} s")
    table.add_row("dispatch rate", f"{args.jobs / drained:.1f} segments/s")
    table.add_row("job states", ", ".join(f"{k}: {v}" for k, v in sorted(states.items())))
    table.add_row("controller peak memory (VmHWM)", f"{memory / 1024:.0f} MiB")
    Console().print(table)


if __name__ == "__main__":
    main()
