"""The bridge to the execution engine, Dask distributed.

The controller's queue decides what runs where; this module only hands one attempt to
one named worker, asks a worker to cancel an attempt, and reports outcomes and
progress back through a single queue that the scheduler drains.

Outcomes arrive as events (:mod:`farm.wire`), never as task results: a task's result
or exception is a pickle made on the node, and the controller unpickles nothing a node
made. The task's future only says that the attempt ended, or that it was lost.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

import dask
from distributed import Client, LocalCluster

from farm.model import Job, Segment
from farm.node import JobRef, cancel_attempts, run_segment, run_segments
from farm.wire import NODE_TOPIC, PROGRESS_TOPIC, RESULT_TOPIC, SENDER, BadMessage, read_outcome

log = logging.getLogger("farm.engine")
NODE_SILENCE_SECONDS = 10.0
RESULT_TIMEOUT_SECONDS = 30.0  # an ended task whose outcome never came: a bug, or a lying node


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
    # Dask's id of the worker at this address: a new worker given a dead one's freed port
    # has the same address and another id, and is never taken for the dead one
    worker: str = ""


#: Dask serves HTTP beside its TLS comms (task info, JSON, a proxy to workers) with no
#: authentication at all; a farm keeps only the health check, and only on loopback.
HEALTH_ONLY_HTTP = {"distributed.scheduler.http.routes": ["distributed.http.health"],
                    "distributed.worker.http.routes": ["distributed.http.health"]}
LOOPBACK_HTTP = "127.0.0.1:0"
#: Dask keeps 100,000 entries of per-task history by default, and samples every running
#: thread's stack every 10 ms into a profile it keeps a tree of each second for the last
#: 1,000: memory that grew with the length of a job (hundreds of MiB for 10,000
#: segments) and CPU spent on every segment. A render farm's history lives in its store.
#: Every Dask server also wakes every 20 ms only to measure how late it woke (a
#: diagnostic: it warns past 3 s): more than half of what an idle node or controller
#: spent. Once a second still sees a loop held for 3 s.
LEAN_DASK = {"distributed.admin.low-level-log-length": 1000, "distributed.worker.profile.enabled": False,
             "distributed.admin.tick.interval": "1s"}


class Engine:
    """Runs attempts on Dask workers; ``outcomes`` receives ``(kind, attempt_id, value)``."""

    def __init__(self, client: Client, cluster: LocalCluster | None = None,
                 capabilities: dict[str, str] | None = None, stamped: bool = False):
        """``stamped``: the scheduler stamps every farm event with its sender
        (:mod:`farm.daskroles`, a TLS cluster); outcomes are then taken only from the
        worker each attempt was handed to."""
        self.client = client
        self._stamped = stamped
        self._handed: dict[str, str] = {}  # attempt -> the worker it was handed to
        self.cluster = cluster
        self.outcomes: queue.Queue[tuple[str, str, Any]] = queue.Queue()
        self._capabilities = capabilities or {}
        self._futures: dict[str, Any] = {}
        self._sharing: dict[str, int] = {}  # a parcel's task -> its attempts not yet dropped
        self._handouts = itertools.count()
        self._arrived: dict[str, dict[str, Any]] = {}  # outcomes not yet collected
        self._silent_since: dict[str, float] = {}  # tasks that ended before their outcome came
        self._reports: dict[str, tuple[float, dict[str, Any]]] = {}
        self._names: dict[str, tuple[str, str]] = {}  # address -> (the name it reports, the name it goes by)
        self._worker_ids: dict[str, str] = {}  # address -> Dask's id of the worker there when last asked
        # which jobs each worker was sent whole: later segments of a job name it by id
        self._sent_jobs: dict[str, set[str]] = {}
        self._job_of: dict[str, str] = {}  # attempt -> its job
        self._carried_whole: set[str] = set()  # attempts that brought their job with them
        #: Dask workers connected that never reported as farm nodes (a plain `dask worker`
        #: without the farm.nodeservice preload), as of the last nodes()
        self.silent_workers: list[dict[str, Any]] = []
        self._first_seen: dict[str, float] = {}  # worker address -> when nodes() first saw it without a report
        client.subscribe_topic(PROGRESS_TOPIC, self._on_progress)
        client.subscribe_topic(NODE_TOPIC, self._on_report)
        client.subscribe_topic(RESULT_TOPIC, self._on_outcome)

    @classmethod
    def embedded(cls, slots: int | None = None, capabilities: dict[str, str] | None = None) -> Engine:
        """An in-process LocalCluster sized to this machine, listening on nothing."""
        client, cluster = embedded_cluster(slots)
        return cls(client, cluster, capabilities)

    def nodes(self) -> list[NodeView]:
        """The nodes connected now; remote ones describe themselves (capabilities, load)."""
        # Asked directly: Client.scheduler_info(n_workers=-1) returns a cache that the
        # client's own periodic refresh (with no workers in it) can replace between the
        # fetch and the read, and every node would seem to have left at once.
        workers = self.client.sync(self.client.scheduler.identity, n_workers=-1)["workers"]
        ids = {address: str(info.get("id") or "") for address, info in workers.items()}
        for address, worker_id in ids.items():
            if self._worker_ids.get(address, worker_id) != worker_id:
                # another worker on a freed port: what the one before said or held is not its
                self._reports.pop(address, None)
                self._sent_jobs.pop(address, None)
                self._names.pop(address, None)
        self._worker_ids = ids
        for gone in set(self._sent_jobs) - set(workers):  # a node that comes back holds no job
            del self._sent_jobs[gone]
        # a worker that left takes its report along: the next one to get its address (the
        # port is free again) is another node, and is not that node until it reports
        for gone in set(self._reports.copy()) - set(workers):  # copy(): reports arrive on Dask's thread
            self._reports.pop(gone, None)
        if self.cluster is not None and self._capabilities:
            return [NodeView(address, str(info.get("name", address)), int(info.get("nthreads", 1)), self._capabilities,
                             worker=ids[address])
                    for address, info in workers.items()]
        # Nodes push a report every second; one that falls silent (hung, stopped, cut
        # off) is treated as gone, so a stuck node can never stall the controller.
        now = time.monotonic()
        views = []
        silent = []
        for address, info in workers.items():
            heard, view = self._reports.get(address, (0.0, None))
            if view is not None and now - heard <= NODE_SILENCE_SECONDS:
                views.append(replace(view, worker=ids[address]) if view.worker != ids[address] else view)
            elif view is None and now - self._first_seen.setdefault(address, now) > NODE_SILENCE_SECONDS:
                # connected to Dask and never a farm node: `farm nodes` lists it, it gets nothing
                # (a node that fell silent is left out, as one that is gone)
                silent.append({"address": address, "name": str(info.get("name", address)),
                               "slots": int(info.get("nthreads", 1))})
        self._first_seen = {address: seen for address, seen in self._first_seen.items() if address in workers}
        self.silent_workers = silent
        return self._unique_names(views)

    def _unique_names(self, views: list[NodeView]) -> list[NodeView]:
        """Every node under a name of its own: one that reports a name another connected
        node holds (two unnamed `dask worker`s on one host) gets ``NAME-2``, ``NAME-3`` ...,
        kept while it stays connected."""
        live = {view.address for view in views}
        self._names = {address: names for address, names in self._names.items() if address in live}
        unique = []
        for view in views:
            reported, given = self._names.get(view.address, (None, None))
            if reported != view.name or given is None:
                taken = {name for address, (_, name) in self._names.items() if address != view.address}
                given = next(candidate for number in range(1, len(taken) + 2)
                             if (candidate := view.name if number == 1 else f"{view.name}-{number}") not in taken)
                self._names[view.address] = (view.name, given)
            unique.append(view if given == view.name else replace(view, name=given))
        return unique

    def _on_report(self, event: Any) -> None:
        _, report = event
        try:
            # On a cluster a node speaks for its own worker only (the scheduler's stamp)
            address = report[SENDER] if self._stamped else report["address"]
            view = NodeView(str(address), str(report["name"]), int(report["slots"]),
                            {str(key): str(value) for key, value in report["capabilities"].items()},
                            bool(report["accepting"]), bool(report["hand_back"]), str(report["reason"]),
                            int(report["running"]))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            log.warning("ignored a node's report that is not what a farm node sends (%s: %s)", type(exc).__name__, exc)
            return
        self._reports[view.address] = (time.monotonic(), view)

    def forget(self, attempt_id: str) -> None:
        """Stop waiting for an attempt (its node left); Dask may drop the task."""
        self._unsend(attempt_id)
        self._drop(attempt_id)
        self._arrived.pop(attempt_id, None)

    def submit(self, job: Job, segments: list[Segment], address: str) -> None:
        """Hand attempts of one job to one worker, in one task (a parcel, run one after
        another, when there are several). The job itself (profile, settings, frame list:
        hundreds of KB for a long job) goes only with the first task of it that this
        worker gets; the others carry a :class:`~farm.node.JobRef`, so a hand-out costs
        the same whatever the job's size, and Dask's scheduler holds no copy per task."""
        attempt_ids = [segment.attempt_id for segment in segments]
        sent = self._sent_jobs.setdefault(address, set())
        carried: Job | JobRef
        if job.id in sent:
            carried = JobRef(job.id)
        else:
            carried = job
            sent.add(job.id)
            self._carried_whole.update(attempt_ids)
        sent_segments = [replace(segment, job=carried) for segment in segments]
        future = self.client.submit(
            *((run_segment, carried, sent_segments[0]) if len(segments) == 1 else
              (run_segments, carried, sent_segments)),
            key=f"farm-{attempt_ids[0]}", workers=[address], allow_other_workers=False, pure=False,
            # A node starts what it holds in the order it was handed out: Dask ranks tasks
            # sent within 100 ms of each other alike, and a node then ran a later segment
            # before an earlier one (which could wait behind long renders).
            priority=-next(self._handouts),
        )
        if len(segments) > 1:
            self._sharing[future.key] = len(segments)
        for attempt_id in attempt_ids:
            self._futures[attempt_id] = future
            self._handed[attempt_id] = address
            self._job_of[attempt_id] = job.id

        def ended(_: Any) -> None:
            for attempt_id in attempt_ids:
                self.outcomes.put(("finished", attempt_id, None))

        future.add_done_callback(ended)

    def forget_job(self, job_id: str) -> None:
        """The job has ended: later hand-outs of it (a retry) carry it whole again."""
        for sent in self._sent_jobs.values():
            sent.discard(job_id)

    def _on_outcome(self, event: Any) -> None:
        _, message = event
        try:
            attempt_id, outcome = read_outcome(message)
        except BadMessage as exc:
            log.warning("ignored an outcome a node sent: %s", exc)
            return
        if self._stamped and message.get(SENDER) != self._handed.get(attempt_id):
            if message.get(SENDER) is None:
                log.warning("ignored an outcome of attempt %s that its scheduler did not stamp with its sender: "
                            "run an outside scheduler with --preload farm.daskroles", attempt_id)
            else:
                log.warning("ignored an outcome of attempt %s sent by %s, a worker it was not handed to",
                            attempt_id, message.get(SENDER))
            return
        self._arrived[attempt_id] = outcome
        self.outcomes.put(("finished", attempt_id, None))

    def collect(self, attempt_ids: list[str]) -> dict[str, dict[str, Any]]:
        """Outcomes of the attempts among ``attempt_ids`` that have ended.

        An attempt whose task ended but whose outcome has not come yet (the event and
        the task's end travel separately) is asked about again shortly, and called lost
        once it has been silent for ``RESULT_TIMEOUT_SECONDS``.
        """
        outcomes: dict[str, dict[str, Any]] = {}
        for attempt_id in dict.fromkeys(attempt_ids):
            outcome = self._arrived.pop(attempt_id, None)
            future = self._futures.get(attempt_id)
            if outcome is not None:
                if future is not None:
                    if outcome.get("missing_job") and attempt_id in self._carried_whole:
                        # it cannot lack what this very task brought: a broken or lying node, whose
                        # answer would otherwise put the segment back for ever without counting
                        outcome = {"ok": False, "node": outcome.get("node"), "log": outcome.get("log", ""),
                                   "reason": f"the node answered that it did not hold job "
                                             f"{self._job_of.get(attempt_id)}, which this attempt brought it"}
                    elif outcome.get("missing_job"):  # it forgot the job (or never got it): send it whole again
                        self._unsend(attempt_id)
                    self._drop(attempt_id)
                    outcomes[attempt_id] = outcome
                continue  # not an attempt of this controller's (or already collected)
            if future is None or not future.done():
                continue
            if future.status == "finished":
                silent = self._silent_since.setdefault(attempt_id, time.monotonic())
                if time.monotonic() - silent < RESULT_TIMEOUT_SECONDS:
                    self._ask_again(attempt_id)
                    continue
                reason = "the node ended the task without sending its outcome"
            else:
                reason = self._task_error(future)
            self._unsend(attempt_id)
            self._drop(attempt_id)
            outcomes[attempt_id] = {"ok": False, "reason": reason, "lost": True, "log": ""}
        return outcomes

    def _ask_again(self, attempt_id: str) -> None:
        timer = threading.Timer(0.5, self.outcomes.put, args=(("finished", attempt_id, None),))
        timer.daemon = True
        timer.start()

    def _unsend(self, attempt_id: str) -> None:
        """The worker may not hold the job this attempt was to bring it (the attempt was
        lost, or the node answered that it does not know the job): the next hand-out of
        that job to that worker carries it whole again."""
        address, job_id = self._handed.get(attempt_id), self._job_of.get(attempt_id)
        if address is not None and job_id is not None:
            self._sent_jobs.get(address, set()).discard(job_id)

    def _drop(self, attempt_id: str) -> None:
        self._job_of.pop(attempt_id, None)
        self._carried_whole.discard(attempt_id)
        self._silent_since.pop(attempt_id, None)
        self._handed.pop(attempt_id, None)
        future = self._futures.pop(attempt_id, None)
        if future is None:
            return
        sharing = self._sharing.get(future.key)
        if sharing is not None:  # a parcel's task: kept until none of its attempts is waited for
            if sharing > 1:
                self._sharing[future.key] = sharing - 1
                return
            del self._sharing[future.key]
        future.release()

    @staticmethod
    def _task_error(future: Any) -> str:
        """Why a task erred, from what Dask holds locally. A node's own exception reaches
        the controller as text only (:mod:`farm.daskroles`), so reading it unpickles nothing."""
        try:
            error = future.exception(timeout=RESULT_TIMEOUT_SECONDS)
            reason = f"{type(error).__name__}: {error}" if error is not None else f"the task was {future.status}"
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
        if "KilledWorker" in reason:
            return f"the node running it died ({reason})"
        return reason

    def cancel(self, attempt_ids: list[str], address: str) -> None:
        """Ask the node to end these attempts, in one message; their futures report back
        as usual."""
        try:
            self.client.run(cancel_attempts, *attempt_ids, workers=[address], wait=False)
        except Exception:  # the node may already be gone; its future will say so
            log.debug("could not reach %s to cancel %s", address, ", ".join(attempt_ids), exc_info=True)

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
    with dask.config.set({"distributed.worker.daemon": False, **LEAN_DASK}):
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
