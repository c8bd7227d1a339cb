"""The Batch Monitor's API under load, and how fast a change reaches a watching client.

- fills the store with J jobs (one batch of J inputs, no node connected, so they stay
  queued), then C concurrent clients each read `GET /api/jobs` R times: latency p50/p99,
  against `GET /api/cluster` (a route that reads nothing) measured the same way in the
  same run;
- with one node connected, a job of S one-frame segments whose command writes the time
  it finishes into its output: event latency is the time from that moment to a client
  of `/api/events/stream` receiving the segment's `segment_done`.

    .venv/bin/python benchmarks/api.py [--jobs 1000] [--clients 20] [--reads 10] [--segments 100]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import textwrap
import threading
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

STAMP = """
import pathlib, sys, time
out, frame = pathlib.Path(sys.argv[1]), int(sys.argv[2])
(out / f"frame_{frame:05d}.txt").write_text(repr(time.time()))
"""


CHROMIUM = "/usr/bin/chromium"
# Notes, in the page, when each "k/N segments" count first appears (epoch milliseconds).
OBSERVE = """(total) => {
  window.shownAt = {};
  new MutationObserver(() => {
    for (const facts of document.querySelectorAll('.batch .facts')) {
      const m = facts.textContent.match(/(\\d+)\\/(\\d+) segments/);
      if (m && Number(m[2]) === total && !(m[1] in window.shownAt)) {
        window.shownAt[m[1]] = performance.timeOrigin + performance.now();
      }
    }
  }).observe(document.body, { subtree: true, childList: true, characterData: true });
}"""


class PageWatch:
    """The Batch Monitor page in headless chromium, noting when each progress count shows."""

    def __init__(self, url: str, token: str, total: int):
        from playwright.sync_api import sync_playwright

        self._playwright = sync_playwright().start()
        self._browser = self._playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking"])
        self.page = self._browser.new_context(ignore_https_errors=True).new_page()
        self.page.goto(f"{url}/#token={token}")
        self.page.wait_for_selector("#live[data-state=live]", timeout=30000)
        self.page.evaluate(OBSERVE, total)

    def finish(self) -> dict[str, float]:
        self.page.wait_for_timeout(500)
        shown = self.page.evaluate("window.shownAt")
        self._browser.close()
        self._playwright.stop()
        return shown


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def timed_reads(url: str, path: str, bundle: Bundle, clients: int, reads: int) -> list[float]:
    headers = {"Authorization": f"Bearer {bundle.token}"}

    def client(_: int) -> list[float]:
        seconds = []
        with httpx.Client(verify=bundle.client_ssl_context(), timeout=120, headers=headers) as http:
            for _ in range(reads):
                t0 = time.perf_counter()
                http.get(url + path).raise_for_status()
                seconds.append(time.perf_counter() - t0)
        return seconds

    with ThreadPoolExecutor(clients) as pool:
        return [s for batch in pool.map(client, range(clients)) for s in batch]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--reads", type=int, default=10)
    parser.add_argument("--segments", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        c = Cluster(Path(tmp) / "c")
        try:
            c.start_controller()
            bundle = Bundle.load(c.bundles / "node.yaml")
            headers = {"Authorization": f"Bearer {bundle.token}"}
            http = httpx.Client(verify=bundle.client_ssl_context(), timeout=600, headers=headers)
            inputs = c.root / "inputs"
            inputs.mkdir()
            for i in range(args.jobs):
                (inputs / f"in{i:05d}.txt").write_text(str(i))
            held = write_profile(c.root, "held", {
                "processor": "command", "frames": "1-4", "segment": {"frames": 1},
                "settings": {"command": [sys.executable, "-S", "-c", "pass", "{input}", "{start}"]},
            })
            answer = http.post(f"{c.url}/api/batches", json={
                "profile": str(held), "inputs": [str(p) for p in sorted(inputs.iterdir())],
                "destination": str(c.root / "held")})
            answer.raise_for_status()
            stored = len(http.get(f"{c.url}/api/jobs").json())

            jobs_latency = timed_reads(c.url, "/api/jobs", bundle, args.clients, args.reads)
            base_latency = timed_reads(c.url, "/api/cluster", bundle, args.clients, args.reads)
            alone_latency = timed_reads(c.url, "/api/jobs", bundle, 1, args.reads)
            http.post(f"{c.url}/api/batches/{answer.json()['batch']}/cancel").raise_for_status()

            c.start_node("n1", "--slots", "2")
            c.wait_for_nodes("n1")
            script = c.root / "stamp.py"
            script.write_text(textwrap.dedent(STAMP))
            profile = write_profile(c.root, "stamp", {
                "processor": "command", "frames": f"1-{args.segments}", "segment": {"frames": 1},
                "settings": {"command": [sys.executable, str(script), "{output_dir}", "{start}"],
                             "expect": ["frame_{frame:05d}.txt"]},
            })
            received: dict[str, float] = {}
            ready = threading.Event()

            def listen() -> None:
                with httpx.Client(verify=bundle.client_ssl_context(), headers=headers,
                                  timeout=httpx.Timeout(60, read=120)) as stream_client:
                    with stream_client.stream("GET", f"{c.url}/api/events/stream") as stream:
                        ready.set()
                        for line in stream.iter_lines():
                            if line.startswith("data: "):
                                event = json.loads(line[6:])
                                if event["kind"] == "segment_done":
                                    received[event["segment"]] = time.time()
                                if event["kind"] in ("job_done", "job_failed"):
                                    return

            listener = threading.Thread(target=listen, daemon=True)
            listener.start()
            ready.wait(30)
            page = PageWatch(c.url, bundle.token, args.segments) if Path(CHROMIUM).exists() else None
            job = http.post(f"{c.url}/api/batches", json={
                "profile": str(profile), "destination": str(c.root / "stamped")}).json()["jobs"][0]["id"]
            listener.join(600)
            shown = page.finish() if page else {}
            detail = http.get(f"{c.url}/api/jobs/{job}").json()
            event_latency, finishes = [], []
            for segment in detail["segment_list"]:
                [attempt] = [a for a in segment["attempts"] if a["state"] == "done"]
                frame = int(segment["label"].split()[-1])
                stamp = Path(c.root / "storage" / job / attempt["id"] / f"frame_{frame:05d}.txt")
                finished = float(stamp.read_text()) if stamp.exists() else None
                if finished is None:  # assembled and cleaned up: the delivered copy holds the same stamp
                    finished = float((c.root / "stamped" / f"frame_{frame:05d}.txt").read_text())
                event_latency.append(received[segment["id"]] - finished)
                finishes.append(finished)
            # the page shows a count, not which segment: the k-th to finish is shown when k first appears
            page_latency = [shown[str(k)] / 1000 - at for k, at in enumerate(sorted(finishes), 1) if str(k) in shown]
        finally:
            c.stop()

    table = Table(title=f"API with {stored} jobs stored, {args.clients} concurrent clients x {args.reads} reads")
    for column in ("measure", "p50", "p99", "ratio (p50)"):
        table.add_column(column)
    table.add_row("GET /api/cluster (baseline: reads nothing)", f"{percentile(base_latency, .5) * 1000:.1f} ms",
                  f"{percentile(base_latency, .99) * 1000:.1f} ms", "1.00")
    table.add_row(f"GET /api/jobs ({stored} jobs)", f"{percentile(jobs_latency, .5) * 1000:.1f} ms",
                  f"{percentile(jobs_latency, .99) * 1000:.1f} ms",
                  f"{percentile(jobs_latency, .5) / percentile(base_latency, .5):.2f}")
    table.add_row("GET /api/jobs, one client alone", f"{percentile(alone_latency, .5) * 1000:.1f} ms",
                  f"{percentile(alone_latency, .99) * 1000:.1f} ms", "")
    table.add_row(f"segment finished -> segment_done at a stream client ({len(event_latency)} segments)",
                  f"{percentile(event_latency, .5) * 1000:.1f} ms", f"{percentile(event_latency, .99) * 1000:.1f} ms",
                  "")
    if page_latency:
        table.add_row(f"segment finished -> the page shows it ({len(page_latency)} counts seen)",
                      f"{percentile(page_latency, .5) * 1000:.1f} ms", f"{percentile(page_latency, .99) * 1000:.1f} ms",
                      "")
    Console().print(table)
    print(f"mean GET /api/jobs: {statistics.mean(jobs_latency) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
