"""The bridge to the execution engine, Dask distributed.

The controller's queue decides what runs where; this module only hands one attempt to
one named worker, asks a worker to cancel an attempt, and reports outcomes and
progress back through a single queue that the scheduler drains.
"""

from __future__ import annotations

import logging
import os
import queue
import time
from dataclasses import dataclass, field
from typing import Any

import dask
from distributed import Client, LocalCluster

from farm.model import Job, Segment
from farm.node import NODE_TOPIC, PROGRESS_TOPIC, cancel_attempt, run_segment

log = logging.getLogger("farm.engine")
NODE_SILENCE_SECONDS = 10.0
RESULT_TIMEOUT_SECONDS = 5.0


@dataclass
class NodeView:
    address: str
    name: str
    slots: int
    capabilities: dict[str, str] = field(default_factory=dict)
    accepting: bool = True  # False when a part-time node is busy or outside its hours
    hand_back: bool = False  # True when it also wants its running segments taken back
    reason: str = ""
    running: int = 0


#: Dask serves HTTP beside its TLS comms (task info, JSON, a proxy to workers) with no
#: authentication at all; a farm keeps only the health check, and only on loopback.
HEALTH_ONLY_HTTP = {"distributed.scheduler.http.routes": ["distributed.http.health"],
                    "distributed.worker.http.routes": ["distributed.http.health"]}
LOOPBACK_HTTP = "127.0.0.1:0"


class Engine:
    """Runs attempts on Dask workers; ``outcomes`` receives ``(kind, attempt_id, value)``."""

    def __init__(self, client: Client, cluster: LocalCluster | None = None,
                 capabilities: dict[str, str] | None = None):
        self.client = client
        self.cluster = cluster
        self.outcomes: queue.Queue[tuple[str, str, Any]] = queue.Queue()
        self._capabilities = capabilities or {}
        self._futures: dict[str, Any] = {}
        self._reports: dict[str, tuple[float, dict[str, Any]]] = {}
        client.subscribe_topic(PROGRESS_TOPIC, self._on_progress)
        client.subscribe_topic(NODE_TOPIC, self._on_report)

    @classmethod
    def embedded(cls, slots: int | None = None, capabilities: dict[str, str] | None = None) -> Engine:
        """An in-process LocalCluster sized to this machine, listening on nothing."""
        client, cluster = embedded_cluster(slots)
        return cls(client, cluster, capabilities)

    def nodes(self) -> list[NodeView]:
        """The nodes connected now; remote ones describe themselves (capabilities, load)."""
        workers = self.client.scheduler_info(n_workers=-1)["workers"]
        if self.cluster is not None and self._capabilities:
            return [NodeView(address, str(info.get("name", address)), int(info.get("nthreads", 1)), self._capabilities)
                    for address, info in workers.items()]
        # Nodes push a report every second; one that falls silent (hung, stopped, cut
        # off) is treated as gone, so a stuck node can never stall the controller.
        now = time.monotonic()
        views = []
        for address in workers:
            heard, report = self._reports.get(address, (0.0, None))
            if report is None or now - heard > NODE_SILENCE_SECONDS:
                continue
            views.append(NodeView(address, report["name"], report["slots"], report["capabilities"],
                                  report["accepting"], report["hand_back"], report["reason"], report["running"]))
        return views

    def _on_report(self, event: Any) -> None:
        _, report = event
        self._reports[report["address"]] = (time.monotonic(), report)

    def forget(self, attempt_id: str) -> None:
        """Stop waiting for an attempt (its node left); Dask may drop the task."""
        future = self._futures.pop(attempt_id, None)
        if future is not None:
            future.release()

    def submit(self, job: Job, segment: Segment, address: str) -> None:
        future = self.client.submit(
            run_segment, job, segment,
            key=f"farm-{segment.attempt_id}", workers=[address], allow_other_workers=False, pure=False,
        )
        self._futures[segment.attempt_id] = future
        attempt_id = segment.attempt_id
        future.add_done_callback(lambda _: self.outcomes.put(("finished", attempt_id, None)))

    def collect(self, attempt_ids: list[str]) -> dict[str, dict[str, Any]]:
        """Outcomes of finished attempts, fetched in one round trip where possible."""
        outcomes: dict[str, dict[str, Any]] = {}
        finished = []
        for attempt_id in attempt_ids:
            future = self._futures.pop(attempt_id, None)
            if future is None:
                continue
            if future.status == "finished":
                finished.append((attempt_id, future))
            else:
                try:
                    error = future.exception(timeout=5)
                    reason = f"{type(error).__name__}: {error}"
                except Exception as exc:
                    reason = f"{type(exc).__name__}: {exc}"
                if "KilledWorker" in reason:
                    reason = f"the node running it died ({reason})"
                outcomes[attempt_id] = {"ok": False, "reason": reason, "lost": True, "log": ""}
        for attempt_id, future in finished:
            # A result held only by a node that has just died would make Dask compute it
            # again, which a pinned task never can: wait a little, then call it lost.
            try:
                outcomes[attempt_id] = future.result(timeout=RESULT_TIMEOUT_SECONDS)
            except Exception as exc:
                future.release()
                outcomes[attempt_id] = {"ok": False, "lost": True, "log": "",
                                        "reason": "its result was lost with the node that held it "
                                                  f"({type(exc).__name__}: {exc or 'not fetched in time'})"}
        return outcomes

    def cancel(self, attempt_id: str, address: str) -> None:
        """Ask the node to end the attempt; its future reports back as usual."""
        try:
            self.client.run(cancel_attempt, attempt_id, workers=[address], wait=False)
        except Exception:  # the node may already be gone; its future will say so
            log.debug("could not reach %s to cancel %s", address, attempt_id, exc_info=True)

    def _on_progress(self, event: Any) -> None:
        _, message = event
        self.outcomes.put(("progress", message.get("attempt", ""), message))

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            if self.cluster is not None:
                self.cluster.close()


def embedded_cluster(slots: int | None = None) -> tuple[Client, LocalCluster]:
    """An in-process LocalCluster sized to this machine, listening on nothing, and its client."""
    slots = slots or os.cpu_count() or 1
    # Dask keeps 100,000 entries of per-task history by default: hundreds of MiB for a
    # long job. A render farm's history lives in its own store.
    with dask.config.set({"distributed.worker.daemon": False, "distributed.admin.low-level-log-length": 1000}):
        cluster = LocalCluster(
            n_workers=1,
            threads_per_worker=slots,
            processes=False,
            # Dask serves HTTP (dashboard, health) on all interfaces by default;
            # the embedded default listens on nothing but loopback.
            dashboard_address="127.0.0.1:0",
            worker_dashboard_address="127.0.0.1:0",
            silence_logs=logging.ERROR,
        )
    return Client(cluster, set_as_default=False), cluster
