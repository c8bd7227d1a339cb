"""The controller's scheduler: plan, store, dispatch, collect, retry, assemble.

The queue lives here, not inside Dask: a segment is handed to Dask only when a node
has room for it, pinned to that node. Each hand-out is an attempt with its own id;
only the current attempt's outcome counts, so a late result is recorded and ignored.
Writes are batched: one transaction per scheduling round.

This file holds the rounds (:meth:`Scheduler.step`) and what they share; each step of a
segment's path is in :mod:`farm.scheduling`, in a file named after it: the queue and
its order (``queue``), taking over jobs (``recovery``), hand-out and pipelining
(``handout``), outcomes and retries (``outcomes``), assembly and chaining (``assembly``).
"""

from __future__ import annotations

import itertools
import json
import logging
import queue
import shutil
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from farm.engine import Engine, NodeView
from farm.errors import FarmError, IllegalTransition, StoreError
from farm.model import Segment, TERMINAL_JOB_STATES
from farm.store import Store

from farm.scheduling.assembly import Assembly
from farm.scheduling.handout import HandOut, parcel_limits
from farm.scheduling.outcomes import Outcomes
from farm.scheduling.queue import JobQueue
from farm.scheduling.recovery import Recovery, cancel_interrupted
from farm.scheduling.runtime import AttemptRuntime, JobRuntime, SegmentRuntime, new_id

log = logging.getLogger("farm.scheduler")

# Outcomes taken per round at most: a round writes them, then refills the slots they freed,
# so a slot waits for the outcomes before its own in the round, not for every one queued.
ROUND_ITEMS = 128

class Scheduler(JobQueue, Recovery, HandOut, Outcomes, Assembly):
    """The controller's queue and its rounds; see the module's text for where each step is."""

    def __init__(self, store: Store, plugins: Any, engine: Engine, work_root: Path, pipeline: bool = True,
                 lease: Any = None, keep_work: bool = False):
        """``pipeline``: each node may hold one announced task per slot besides those it
        runs, so that a slot that frees starts its next segment without waiting a round
        trip to the controller. A task is one segment, or a parcel of a job's segments
        that take about 0.2 s together (farm.scheduling.handout); the queue still lives
        here (Dask never holds more).
        ``lease``: the :class:`farm.lease.Lease` of this process; every batch it submits
        or takes over is owned by it (None: batches without an owner, for tests).
        ``keep_work``: keep a done job's work folder (segment outputs) instead of removing it."""
        self.pipeline = pipeline
        self.parcel_limits = parcel_limits()
        # announced attempts per node, oldest first: when one of the node's attempts ends,
        # its freed slot starts the oldest (told by no extra message: a round trip saved)
        self._announced: dict[str, deque[AttemptRuntime]] = {}
        self.lease = lease
        self.keep_work = keep_work
        self.store = store
        self.plugins = plugins
        self.engine = engine
        self.work_root = work_root
        self.jobs: dict[str, JobRuntime] = {}
        self.attempts: dict[str, AttemptRuntime] = {}
        self.listeners: list[Callable[[str, JobRuntime, dict[str, Any]], None]] = []
        self._order: list[JobRuntime] = []
        self._nodes: list[NodeView] = []
        self._nodes_checked = 0.0
        self._nodes_version = 0  # counts each fresh look at the nodes (and each pause): _check_nodes runs on a change
        self._nodes_seen = -1
        self._busy: Counter[str] = Counter()  # attempts held per node address, kept as they come and go
        self._taking: dict[str, NodeView] = {}  # nodes that take work, by address, as of _room_version
        self._room: set[str] = set()  # addresses of those that may be handed more (see HandOut._see_room)
        self._listed: dict[str, int] = {}  # each node's place in the nodes' list
        self._room_version = -1
        self._deadlines: list[tuple[float, int, AttemptRuntime]] = []  # started attempts by when to time them out
        self._deadline_seq = itertools.count()
        self._parcel_checks: list[tuple[float, int, AttemptRuntime]] = []  # running parcel segments, by when to look again
        self._cancel_checked = 0.0
        self._assembler = ThreadPoolExecutor(max_workers=2, thread_name_prefix="farm-assemble")
        self._cancel_local: set[str] = set()
        self._to_cancel: list[AttemptRuntime] = []  # ended in this round; told to nodes after commit
        self._queued_first: dict[str, int] = {}  # segments put back at a job's head in this round, by job
        self._lock = threading.Lock()
        self.paused_nodes: set[str] = store.paused_nodes()
        self._unrunnable_checked = 0.0
        self._ended_batches: set[str] = set()  # told to plugins once their end is committed
        # Lifecycle hooks wait for the commit of what they announce: a plugin never hears of
        # a batch, a segment or an end that the store then refused.
        self._pending_hooks: list[tuple[str, dict[str, Any]]] = []
        self._pending_removals: list[Path] = []  # work folders of done jobs, removed once that is committed

    # -- running -----------------------------------------------------------------------

    def family(self, job_ids: list[str]) -> list[str]:
        """These jobs and every job chained after them (``then:``), in submission order."""
        found: list[str] = []
        pending = list(job_ids)
        while pending:
            job_id = pending.pop(0)
            if job_id not in found:
                found.append(job_id)
                pending.extend(self.jobs[job_id].children)
        return found

    def run_until_done(self, job_ids: list[str]) -> None:
        """Step until these jobs (and those chained after them) end; raises
        :class:`farm.lease.LeaseLost` when this owner's lease was ended under it."""
        while any(self.jobs[j].state not in TERMINAL_JOB_STATES for j in self.family(job_ids)):
            if self.lease is not None and self.lease.lost.is_set():
                self._abandon()
            try:
                self.step()
            except IllegalTransition:
                # another process moved our jobs: only a sweep that found our lease lapsed does
                if self.lease is not None and not self.lease.beat():
                    self._abandon()
                raise
            except FarmError:
                if self.lease is not None and self.lease.lost.is_set():
                    self._abandon()
                raise
        self._drain_stragglers()
        self._flush_hooks()

    def _abandon(self) -> None:
        """Our lease was ended under us: stop every attempt (the store already says they
        were lost), forget the jobs, and raise :class:`farm.lease.LeaseLost`."""
        self._cancel_on_nodes(list(self.attempts.values()))
        self.attempts.clear()
        self._busy.clear()
        self._room_version = -1  # worked out again from the nodes
        self._deadlines = []
        self._parcel_checks = []
        self.jobs.clear()
        self._order = []
        raise self.lease.lost_error()

    def step(self, wait: float = 0.2) -> None:
        """One round: take outcomes, enforce timeouts and cancels, dispatch."""
        items = []
        try:
            items.append(self.engine.outcomes.get(timeout=wait if not self._can_dispatch() else 0.001))
            while len(items) < ROUND_ITEMS:  # the rest waits for the next round: freed slots are refilled sooner
                items.append(self.engine.outcomes.get_nowait())
        except queue.Empty:
            pass
        finished = [attempt_id for kind, attempt_id, _ in items if kind == "finished"]
        outcomes = self.engine.collect(finished) if finished else {}
        dispatched: list[tuple[JobRuntime, list[Segment], NodeView]] = []
        self._queued_first.clear()
        try:
            with self._committed():
                self._hold_lease()
                for kind, attempt_id, value in items:
                    if kind == "progress":
                        self._on_progress(attempt_id, value)
                    elif kind == "finished" and attempt_id in outcomes:
                        self._on_finished(attempt_id, outcomes.pop(attempt_id))
                    elif kind == "assembled":
                        self._on_assembled(attempt_id, value)
                self._check_nodes()
                self._enforce_timeouts()
                self._free_stuck_parcels()
                self._apply_cancels()
                self._queued_first.clear()  # dispatch takes from the heads: later ones go first again
                dispatched = self._dispatch()
        except BaseException as exc:
            for kind, _, value in items:  # nobody waiting on an answer is left hanging
                if kind == "call":
                    value[1].set_exception(exc)
            raise
        calls = [value for kind, _, value in items if kind == "call"]
        for index, (fn, future) in enumerate(calls):  # each in its own transaction, answered after its commit
            try:
                self._run_call(fn, future)
            except StoreError as exc:
                for _, waiting in calls[index + 1:]:
                    waiting.set_exception(exc)
                raise
        self._flush_hooks()
        to_cancel, self._to_cancel = self._to_cancel, []
        self._cancel_on_nodes(to_cancel)
        for rt, segments, node in dispatched:
            self.engine.submit(rt.job, segments, node.address)

    def _cancel_on_nodes(self, attempts: list[AttemptRuntime]) -> None:
        """One message to each node for all of its attempts that are to end."""
        by_node: dict[str, list[str]] = {}
        for attempt in attempts:
            by_node.setdefault(attempt.node.address, []).append(attempt.id)
        for address, attempt_ids in by_node.items():
            self.engine.cancel(attempt_ids, address)

    def _hold_lease(self) -> None:
        """Inside the round's transaction: write nothing once our lease was ended under us
        (a sweep found it lapsed and interrupted our jobs). One indexed read a round."""
        if self.lease is None:
            return
        row = self.store.lease(self.lease.id)
        if row is None or row["ended"] is not None:
            self.lease.lost.set()
            raise self.lease.lost_error()

    def _run_call(self, fn: Callable[[], Any], future: Future[Any]) -> None:
        try:
            with self._committed():
                value = fn()
        except BaseException as exc:  # handed back to the caller, whose request it was
            future.set_exception(exc)
            if isinstance(exc, StoreError):  # what it changed in memory was never stored: start again from the store
                raise
        else:
            future.set_result(value)  # after the commit, so the caller reads what it did

    # -- helpers -----------------------------------------------------------------------

    def _set_job(self, rt: JobRuntime, new: str, **fields: Any) -> None:
        self.store.move_job(rt.job.id, rt.state, new, **fields)
        rt.state = new
        if new in TERMINAL_JOB_STATES:
            self.engine.forget_job(rt.job.id)
            self._reorder()
            self._ended_batches.add(rt.job.batch_id)

    @contextmanager
    def _committed(self) -> Iterator[None]:
        """A store transaction whose hooks are called only if it commits."""
        mark, removals = len(self._pending_hooks), len(self._pending_removals)
        try:
            with self.store.transaction():
                yield
        except BaseException:
            del self._pending_hooks[mark:]
            del self._pending_removals[removals:]
            raise

    def _notify_later(self, hook_name: str, **kwargs: Any) -> None:
        self._pending_hooks.append((hook_name, kwargs))

    def _flush_hooks(self) -> None:
        """Call the hooks of what is now committed, in order; then the batches that ended."""
        pending, self._pending_hooks = self._pending_hooks, []
        removals, self._pending_removals = self._pending_removals, []
        for folder in removals:
            self._assembler.submit(shutil.rmtree, folder, ignore_errors=True)
        for hook_name, kwargs in pending:
            self.plugins.notify(hook_name, **kwargs)
        if self._ended_batches:
            self._announce_batches()

    def _announce_batches(self) -> None:
        """Tell plugins about batches whose every job has ended (the store knows the
        jobs that ended before a restart, too)."""
        ended, self._ended_batches = self._ended_batches, set()
        for batch_id in sorted(ended):
            rows = self.store.jobs(batch_id)
            if rows and all(row["state"] in TERMINAL_JOB_STATES for row in rows):
                jobs = [{"id": row["id"], "input": row["input"], "profile": row["profile_name"], "state": row["state"],
                         "error": row["error"], "outputs": json.loads(row["outputs"] or "[]")} for row in rows]
                self.plugins.notify("farm_batch_finished", batch_id=batch_id, jobs=jobs)

    def _emit(self, kind: str, rt: JobRuntime, data: dict[str, Any] | None = None) -> None:
        for listener in self.listeners:
            try:
                listener(kind, rt, data or {})
            except Exception:
                log.exception("event listener failed on %s", kind)

    def _drain_stragglers(self, timeout: float = 5.0) -> None:
        """Wait (briefly) for ended attempts so their subprocesses are gone before exit."""
        deadline = time.monotonic() + timeout
        while self.attempts and time.monotonic() < deadline:
            self.step(wait=0.1)

    def refuse_pending(self, exc: BaseException) -> None:
        """Answer every waiting request with ``exc`` and drop queued outcomes (after a
        :meth:`reset`, the store decides what runs again)."""
        while True:
            try:
                kind, _, value = self.engine.outcomes.get_nowait()
            except queue.Empty:
                return
            if kind == "call":
                value[1].set_exception(exc)

    def reset(self) -> None:
        """Forget everything held in memory (after the store refused a write): the store
        is the truth, and :meth:`recover` rebuilds from it."""
        for attempt_id in list(self.attempts):
            self.engine.forget(attempt_id)
        self.attempts.clear()
        self._busy.clear()
        self._room_version = -1  # worked out again from the nodes
        self._deadlines = []
        self._parcel_checks = []
        self._announced.clear()
        self.jobs.clear()
        self._order = []
        self._to_cancel = []
        self._ended_batches = set()
        self._pending_hooks = []
        self._pending_removals = []

    def close(self) -> None:
        self._assembler.shutdown(wait=True)




__all__ = ["Scheduler", "JobRuntime", "SegmentRuntime", "AttemptRuntime", "new_id", "cancel_interrupted"]
