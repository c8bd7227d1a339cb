"""The controller's queue: plan, store, dispatch, collect, retry, assemble.

The queue lives here, not inside Dask: a segment is handed to Dask only when a node
has a free slot, pinned to that node. Each hand-out is an attempt with its own id;
only the current attempt's outcome counts, so a late result is recorded and ignored.
Writes are batched: one transaction per scheduling round.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import itertools
import secrets
import shutil
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from farm.engine import Engine, NodeView
from farm.errors import FarmError, IllegalTransition, OutputConflict, ProfileError, SourceChanged, StoreError
from farm.frames import chunk_frames, format_frames
from farm.model import AttemptState, Job, JobState, Segment, SegmentPlan, SegmentState, TERMINAL_JOB_STATES
from farm.node import AttemptLog, CommandRunner, attempt_policy, check_source, input_stamp, runtime
from farm.outputs import already_there, real_paths, staging_folder
from farm.processor import Context, Processor
from farm.profiles import LoadedProfile, load_profile
from farm.requirements import unmet_requirements
from farm.store import Store

log = logging.getLogger("farm.scheduler")
CANCEL_POLL_SECONDS = 0.5
NODE_POLL_SECONDS = 1.0


@dataclass
class SegmentRuntime:
    id: str
    index: int
    label: str
    frames: list[int] | None
    params: dict[str, Any]
    state: str = SegmentState.QUEUED
    attempts: int = 0
    failures: int = 0
    result: dict[str, Any] | None = None
    seconds: float | None = None  # how long the successful attempt took
    avoid: str | None = None  # the node that failed it last: its retry goes elsewhere when a node is free


@dataclass
class JobRuntime:
    job: Job
    processor: Processor
    seq: int
    created: float
    priority: int
    requires: dict[str, str]
    state: str = JobState.QUEUED
    segments: dict[str, SegmentRuntime] = field(default_factory=dict)
    queue: deque[str] = field(default_factory=deque)
    node_failures: Counter[str] = field(default_factory=Counter)
    excluded: set[str] = field(default_factory=set)
    error: str | None = None
    outputs: list[str] = field(default_factory=list)
    waiting: str | None = None
    verify_rounds: int = 0
    then: LoadedProfile | None = None  # the profile of the job chained after this one
    children: list[str] = field(default_factory=list)
    # Segments done, counted as they finish, so that asking "all done?" after each one
    # costs the same at 100 and at 1,000,000 segments; recounted where many change at once.
    done: int = 0

    def recount(self) -> None:
        self.done = sum(1 for seg in self.segments.values() if seg.state == SegmentState.DONE)

    @property
    def all_done(self) -> bool:
        return self.done >= len(self.segments) and all(seg.state == SegmentState.DONE for seg in self.segments.values())

    @property
    def sort_key(self) -> tuple[int, float, int]:
        return (-self.priority, self.created, self.seq)


@dataclass
class AttemptRuntime:
    id: str
    job_id: str
    segment_id: str
    node: NodeView
    started: float  # when it was handed out; for an announced one, when the node started it
    last_progress: float
    current: bool = True  # False once ended by a timeout or a cancel; its slot stays busy
    # announced: handed to a node whose slots were all busy, it waits there for one (its
    # node says when it starts); until then no timeout runs, and it is taken back at no
    # cost when the node leaves or stops taking work
    waiting: bool = False


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(5)}"


def cancel_interrupted(store: Store, job_id: str, reason: str) -> None:
    """End an interrupted job as cancelled at once: nobody runs it, so nobody is asked."""
    with store.transaction():
        for seg in store.segments(job_id):
            if seg["state"] in (SegmentState.QUEUED, SegmentState.RUNNING):
                store.move_segment(seg["id"], seg["state"], SegmentState.CANCELLED)
        store.move_job(job_id, JobState.INTERRUPTED, JobState.CANCELLED, error=reason)


class Scheduler:
    def __init__(self, store: Store, plugins: Any, engine: Engine, work_root: Path, pipeline: bool = True,
                 lease: Any = None, keep_work: bool = False):
        """``pipeline``: each node may hold one announced segment per slot besides those it
        runs, so that a slot that frees starts its next segment without waiting a round
        trip to the controller; the queue still lives here (Dask never holds more).
        ``lease``: the :class:`farm.lease.Lease` of this process; every batch it submits
        or takes over is owned by it (None: batches without an owner, for tests).
        ``keep_work``: keep a done job's work folder (segment outputs) instead of removing it."""
        self.pipeline = pipeline
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
        self._cancel_checked = 0.0
        self._assembler = ThreadPoolExecutor(max_workers=2, thread_name_prefix="farm-assemble")
        self._cancel_local: set[str] = set()
        self._to_cancel: list[AttemptRuntime] = []  # ended in this round; told to nodes after commit
        self._lock = threading.Lock()
        self.paused_nodes: set[str] = store.paused_nodes()
        self._unrunnable_checked = 0.0
        self._ended_batches: set[str] = set()  # told to plugins once their end is committed
        # Lifecycle hooks wait for the commit of what they announce: a plugin never hears of
        # a batch, a segment or an end that the store then refused.
        self._pending_hooks: list[tuple[str, dict[str, Any]]] = []
        self._pending_removals: list[Path] = []  # work folders of done jobs, removed once that is committed

    # -- submitting --------------------------------------------------------------------

    def submit(
        self,
        loaded: LoadedProfile,
        inputs: list[Path | None],
        destination: Path,
        origin: str = "cli",
        overwrite: bool = False,
        fingerprint: str | None = None,
    ) -> tuple[str, list[str]]:
        """Plan every job, claim its outputs, store the batch (owned by this scheduler's
        lease), and queue its segments. ``fingerprint`` names what was run, so that the
        same run can resume it.

        Refused (:class:`~farm.errors.OutputConflict`, nothing stored) when an output
        exists already and the job may not overwrite, or when another unfinished job has
        claimed one."""
        profile = loaded.profile
        processor = self.plugins.processor(profile.processor)
        then = None
        if profile.then:
            where = loaded.origins.get(("then",), str(loaded.source))
            try:
                then = load_profile(profile.then, self.plugins, relative_to=loaded.source.parent if loaded.source else None)
            except FarmError as exc:
                raise ProfileError(f"{where}: then: {exc}") from None
        batch_id = new_id("b")
        job_rows, segment_rows, runtimes = [], [], []
        claims: dict[str, list[str]] = {}
        now = time.time()
        for seq, source in enumerate(inputs):
            job_id = new_id("j")
            stamp, gone = _stamp(source)
            job = Job(
                id=job_id, batch_id=batch_id, input=source, profile=profile, settings=loaded.settings,
                destination=destination, work_dir=self.work_root / job_id,
                frames=profile.frame_list, overwrite=overwrite or profile.overwrite,
                input_stamp=stamp,
            )
            rt = JobRuntime(job, processor, seq, now, profile.priority,
                            {f"processor:{processor.name}": "", **processor.requires(job)}, then=then)
            plans = []
            if gone:  # deleted since the submission was checked: this job fails, the batch goes on
                rt.state, rt.error = JobState.FAILED, gone
            else:
                try:
                    outputs = processor.outputs(job)
                    if outputs is not None:
                        claims[job_id] = self._claimable(job, outputs)
                    plans = list(processor.plan(job))
                except OutputConflict:
                    raise
                except FarmError as exc:
                    rt.state, rt.error = JobState.FAILED, f"cannot plan {source or 'the job'}: {exc}"
                except Exception as exc:  # a processor bug fails this job, not the batch
                    rt.state, rt.error = JobState.FAILED, f"processor {processor.name} failed to plan: {type(exc).__name__}: {exc}"
                if rt.state == JobState.FAILED:
                    plans = []
                    claims.pop(job_id, None)
                gone = _stamp(source)[1] if rt.state == JobState.FAILED else None
                if gone:  # the plan failed because the source went away meanwhile: say that first
                    rt.error = f"{gone} (planning it said: {rt.error})"
            for index, plan in enumerate(plans):
                seg = SegmentRuntime(f"{job_id}.s{index:05d}", index, plan.label, plan.frames, dict(plan.params))
                rt.segments[seg.id] = seg
                rt.queue.append(seg.id)
                segment_rows.append({"id": seg.id, "job_id": job_id, "idx": index, "label": seg.label,
                                     "frames": seg.frames, "params": seg.params})
            job_rows.append({
                "id": job_id, "batch_id": batch_id, "seq": seq, "input": str(source) if source else None,
                "profile_name": profile.name, "profile": profile.model_dump_json(), "processor": processor.name,
                "destination": str(destination), "work_dir": str(job.work_dir), "priority": profile.priority,
                "state": rt.state, "error": rt.error, "overwrite": int(job.overwrite),
                "input_stamp": json.dumps(job.input_stamp) if job.input_stamp else None,
            })
            runtimes.append(rt)
        self.store.add_batch(batch_id, origin, job_rows, segment_rows, claims, owner=self.owner, fingerprint=fingerprint)
        with self._lock:
            for rt in runtimes:
                self.jobs[rt.job.id] = rt
            self._reorder()
        self._notify_later("farm_batch_submitted", batch_id=batch_id, jobs=[rt.job for rt in runtimes])
        for rt in runtimes:
            if rt.state == JobState.FAILED:
                self._notify_later("farm_job_failed", job=rt.job, reason=rt.error)
                self._emit("job_failed", rt)
            elif not rt.segments:
                with self.store.transaction():
                    self._set_job(rt, JobState.RUNNING)
                    self._start_assembly(rt)
        return batch_id, [rt.job.id for rt in runtimes]

    @property
    def owner(self) -> str | None:
        return self.lease.id if self.lease is not None else None

    @staticmethod
    def _claimable(job: Job, outputs: list[Path]) -> list[str]:
        """The paths to claim for a job's outputs (links followed, as delivery writes
        them), refused when one exists and the job may not overwrite it."""
        paths = real_paths(outputs)
        if not job.overwrite:
            existing = [path for path in paths if os.path.lexists(path)]
            if existing:
                raise OutputConflict(f"{already_there(existing)} in the destination; pass --overwrite (or set "
                                     "overwrite: true) to replace, or choose another destination")
        return [str(path) for path in paths]

    def recover(self, job_ids: Iterable[str] | None = None) -> list[str]:
        """Take over jobs whose owner is gone, and rebuild this owner's own jobs from the
        store (after :meth:`reset`); returns the jobs taken.

        Lapsed leases are swept first (:func:`farm.lease.sweep`): their unfinished jobs
        become ``interrupted``, and only those are taken over; a job whose owner lives is
        never touched. Attempts that were running when the owner stopped are recorded as
        lost (without counting against the segment) and their segments queued again; their
        outputs went to their own attempt folders, so nothing is written twice. A done
        segment whose attempt folder is gone runs again. With ``job_ids``, only those jobs.
        """
        from farm.lease import sweep
        from farm.profiles import Profile

        sweep(self.store, spare={rt.job.batch_id for rt in self.jobs.values()})
        recovered = []
        wanted = set(job_ids) if job_ids is not None else None
        # (id, state, owner) first: a controller looks every few seconds, and most unfinished
        # jobs are its own, already in memory; full rows only for the jobs it takes
        for candidate in self.store.unfinished_job_owners():
            if candidate["id"] in self.jobs or (wanted is not None and candidate["id"] not in wanted):
                continue
            ours = self.owner is not None and candidate["owner"] == self.owner
            if candidate["state"] != JobState.INTERRUPTED and not ours:
                continue  # a living owner runs it
            row = self.store.job(candidate["id"])
            if row is None or row["state"] != candidate["state"]:
                continue  # it moved meanwhile: the next look sees it
            try:
                with self.store.transaction():
                    if row["state"] == JobState.INTERRUPTED:
                        row = self._take_over(row, ours)
                    rt = self._rebuild(row, Profile)
            except IllegalTransition:  # another process took it over first
                continue
            if rt is not None:
                recovered.append(rt.job.id)
        with self._lock:
            self._reorder()
        return recovered

    def _claim(self, batch_id: str) -> None:
        """Own this batch from now on (a job of it runs here again); refused while another
        living process runs jobs of it, which would then have no owner if it stopped."""
        from farm.lease import alive, describe

        batch = self.store.batch(batch_id)
        if batch is None or batch["owner"] == self.owner:
            return
        lease = self.store.lease(batch["owner"])
        if alive(lease) and any(row["state"] not in TERMINAL_JOB_STATES for row in self.store.jobs(batch_id)):
            raise FarmError(f"batch {batch_id} is run by another process ({describe(lease)}); "
                            "retry its jobs there, or once it has ended")
        self.store.set_batch_owner(batch_id, self.owner)

    def _take_over(self, row: Any, ours: bool) -> dict[str, Any]:
        """Own an interrupted job's batch and put the job back to work (in a transaction)."""
        if not ours:
            self.store.set_batch_owner(row["batch_id"], self.owner)
        started = any(seg["attempts"] for seg in self.store.segments(row["id"]))
        state = JobState.RUNNING if started else JobState.QUEUED
        self.store.move_job(row["id"], JobState.INTERRUPTED, state, error=None)
        self.store.event("job_taken_over", job_id=row["id"], data={"owner": self.owner})
        return {**dict(row), "state": state, "error": None}

    def resumable(self, fingerprint: str) -> tuple[str | None, list[str], Any]:
        """The newest batch stored with ``fingerprint``: ``(batch id, its interrupted jobs,
        the lease of a living owner or None)``; ``(None, [], None)`` when there is none."""
        from farm.lease import alive, sweep

        sweep(self.store)
        for batch in self.store.batches_by_fingerprint(fingerprint):
            jobs = self.store.jobs(batch["id"])
            lease = self.store.lease(batch["owner"])
            if any(job["state"] not in TERMINAL_JOB_STATES and job["state"] != JobState.INTERRUPTED for job in jobs) \
                    and alive(lease):
                return batch["id"], [], lease
            interrupted = [job["id"] for job in jobs if job["state"] == JobState.INTERRUPTED]
            if interrupted:
                return batch["id"], interrupted, None
            return None, [], None  # the newest run of it ended: a new run starts afresh
        return None, [], None

    def abandon(self, job_ids: list[str], reason: str) -> None:
        """Cancel interrupted jobs at once (nobody runs them: nothing to ask)."""
        with self.store.transaction():
            for job_id in job_ids:
                cancel_interrupted(self.store, job_id, reason)

    def _rebuild(self, row: Any, profile_model: Any) -> JobRuntime | None:
        profile = profile_model.model_validate_json(row["profile"])
        try:
            processor = self.plugins.processor(row["processor"])
            settings = processor.settings_model.model_validate(profile.settings)
        except Exception as exc:
            self.store.move_job(row["id"], row["state"], JobState.FAILED,
                                error=f"cannot resume after a restart: {exc}")
            return None
        job = Job(id=row["id"], batch_id=row["batch_id"], input=Path(row["input"]) if row["input"] else None,
                  profile=profile, settings=settings, destination=Path(row["destination"]),
                  work_dir=Path(row["work_dir"]), frames=profile.frame_list, overwrite=bool(row["overwrite"]),
                  input_stamp=tuple(json.loads(row["input_stamp"])) if row["input_stamp"] else None)
        then = None
        if profile.then:
            try:
                then = load_profile(profile.then, self.plugins)
            except FarmError as exc:
                self.store.event("chain_lost", job_id=job.id, data={"reason": str(exc)})
        rt = JobRuntime(job, processor, row["seq"], row["created"], row["priority"],
                        {f"processor:{processor.name}": "", **processor.requires(job)}, state=row["state"], then=then)
        for seg_row in self.store.segments(job.id):
            seg = SegmentRuntime(seg_row["id"], seg_row["idx"], seg_row["label"],
                                 json.loads(seg_row["frames"]) if seg_row["frames"] else None,
                                 json.loads(seg_row["params"]), state=seg_row["state"], attempts=seg_row["attempts"],
                                 result=json.loads(seg_row["result"]) if seg_row["result"] else None)
            attempts = self.store.attempts(segment_id=seg.id)
            seg.failures = sum(1 for a in attempts if a["state"] in (AttemptState.FAILED, AttemptState.TIMED_OUT))
            for attempt in attempts:
                if attempt["state"] == AttemptState.RUNNING:
                    self.store.end_attempt(attempt["id"], AttemptState.LOST,
                                           reason="the controller stopped while it ran; it runs again")
            if seg.state == SegmentState.RUNNING:
                self.store.move_segment(seg.id, seg.state, SegmentState.QUEUED)
                seg.state = SegmentState.QUEUED
            elif seg.state == SegmentState.DONE and rt.state not in TERMINAL_JOB_STATES \
                    and not self._output_kept(job, attempts):
                # its output went with the work folder (cleaned, another disk): run it again
                self.store.move_segment(seg.id, seg.state, SegmentState.QUEUED, result=None)
                self.store.event("segment_output_missing", job_id=job.id, segment_id=seg.id)
                seg.state, seg.result = SegmentState.QUEUED, None
            rt.segments[seg.id] = seg
            if seg.state == SegmentState.QUEUED:
                rt.queue.append(seg.id)
        rt.recount()
        self.jobs[job.id] = rt
        self.store.event("job_recovered", job_id=job.id, data={"queued": len(rt.queue)})
        if rt.state == JobState.ASSEMBLING:
            results = [seg.result or {} for seg in sorted(rt.segments.values(), key=lambda s: s.index)]
            self._assembler.submit(self._assemble, rt, results)
        elif rt.state in (JobState.QUEUED, JobState.RUNNING) and rt.segments and all(
                seg.state == SegmentState.DONE for seg in rt.segments.values()):
            if rt.state == JobState.QUEUED:
                self._set_job(rt, JobState.RUNNING)
            self._start_assembly(rt)
        return rt

    @staticmethod
    def _output_kept(job: Job, attempts: list[Any]) -> bool:
        done = [a["id"] for a in attempts if a["state"] == AttemptState.DONE]
        return bool(done) and (job.work_dir / done[-1]).is_dir()

    def cancel(self, job_id: str) -> None:
        """Cancel a job (thread-safe; takes effect in the next round)."""
        with self._lock:
            self._cancel_local.add(job_id)
        self.engine.outcomes.put(("wake", "", None))

    def call(self, fn: Callable[[], Any]) -> Future[Any]:
        """Run ``fn`` in the scheduler's own thread, between rounds (for the API)."""
        future: Future[Any] = Future()
        self.engine.outcomes.put(("call", "", (fn, future)))
        return future

    def retry(self, job_id: str, whole: bool = False) -> int:
        """Queue a failed or cancelled job's unfinished segments again (with ``whole``,
        every segment, done ones too); returns how many."""
        if job_id not in self.jobs:  # ended before this controller started: take it back from the store
            from farm.profiles import Profile

            row = self.store.job(job_id)
            if row is not None and row["state"] in (JobState.FAILED, JobState.CANCELLED):
                self._rebuild(row, Profile)
        rt = self._known(job_id)
        if rt.state not in (JobState.FAILED, JobState.CANCELLED):
            raise FarmError(f"job {job_id} is {rt.state}; only failed or cancelled jobs can be retried")
        self._claim(rt.job.batch_id)
        again = [seg for seg in sorted(rt.segments.values(), key=lambda s: s.index)
                 if whole or seg.state in (SegmentState.FAILED, SegmentState.CANCELLED)]
        outputs = rt.processor.outputs(rt.job)
        with self.store.transaction():
            if outputs is not None:  # its claims went when it ended; another job may have taken them since
                self.store.claim(job_id, [str(path) for path in real_paths(outputs)])
            self.store.clear_cancel(job_id)
            self._set_job(rt, JobState.QUEUED, error=None)
            for seg in again:
                self.store.move_segment(seg.id, seg.state, SegmentState.QUEUED, error=None, result=None)
                seg.state, seg.failures, seg.result = SegmentState.QUEUED, 0, None
                rt.queue.append(seg.id)
            rt.error, rt.excluded, rt.verify_rounds = None, set(), 0
            rt.node_failures.clear()
            rt.recount()
            self._reorder()
            if not again and all(seg.state == SegmentState.DONE for seg in rt.segments.values()):
                self._set_job(rt, JobState.RUNNING)
                self._start_assembly(rt)
        self._emit("job_retried", rt, {"segments": len(again)})
        return len(again)

    def pause(self, job_id: str) -> None:
        """Hand out nothing more of this job; segments already running finish."""
        rt = self._known(job_id)
        if rt.state == JobState.PAUSED:
            return
        if rt.state not in (JobState.QUEUED, JobState.RUNNING):
            raise FarmError(f"job {job_id} is {rt.state}; only queued or running jobs can be paused")
        self._set_job(rt, JobState.PAUSED)
        self._emit("job_paused", rt, {})

    def resume(self, job_id: str) -> None:
        rt = self._known(job_id)
        if rt.state != JobState.PAUSED:
            raise FarmError(f"job {job_id} is {rt.state}; only paused jobs can be resumed")
        started = any(seg.attempts for seg in rt.segments.values())
        self._set_job(rt, JobState.RUNNING if started else JobState.QUEUED)
        self._reorder()
        self._emit("job_resumed", rt, {})
        if rt.segments and all(seg.state == SegmentState.DONE for seg in rt.segments.values()):
            self._start_assembly(rt)

    def set_priority(self, job_id: str, priority: int) -> None:
        """Move a job up or down the queue; segments already handed out are not recalled."""
        rt = self._known(job_id)
        if rt.state in TERMINAL_JOB_STATES:
            raise FarmError(f"job {job_id} is {rt.state}; its priority no longer matters")
        self.store.set_priority(job_id, priority)
        rt.priority = priority
        self._reorder()
        self._emit("job_priority", rt, {"priority": priority})

    def _known(self, job_id: str) -> JobRuntime:
        rt = self.jobs.get(job_id)
        if rt is None:
            raise FarmError(f"job {job_id} is not known to this controller")
        return rt

    def set_node_paused(self, name: str, paused: bool) -> None:
        self.store.set_node_paused(name, paused)
        if paused:
            self.paused_nodes.add(name)
        else:
            self.paused_nodes.discard(name)

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
        for attempt in list(self.attempts.values()):
            self.engine.cancel(attempt.id, attempt.node.address)
        self.attempts.clear()
        self.jobs.clear()
        self._order = []
        raise self.lease.lost_error()

    def step(self, wait: float = 0.2) -> None:
        """One round: take outcomes, enforce timeouts and cancels, dispatch."""
        items = []
        try:
            items.append(self.engine.outcomes.get(timeout=wait if not self._can_dispatch() else 0.001))
            while True:
                items.append(self.engine.outcomes.get_nowait())
        except queue.Empty:
            pass
        finished = [attempt_id for kind, attempt_id, _ in items if kind == "finished"]
        outcomes = self.engine.collect(finished) if finished else {}
        dispatched: list[tuple[JobRuntime, Segment, NodeView]] = []
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
                self._apply_cancels()
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
        for attempt in to_cancel:
            self.engine.cancel(attempt.id, attempt.node.address)
        for rt, segment, node in dispatched:
            self.engine.submit(rt.job, segment, node.address)

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

    def _check_nodes(self) -> None:
        """Attempts on nodes that left, or that hand work back, go back to the queue."""
        if not self.attempts:
            return
        nodes = {node.address: node for node in self._current_nodes()}
        for attempt in list(self.attempts.values()):
            if not attempt.current:
                continue
            node = nodes.get(attempt.node.address)
            if node is None and attempt.waiting:  # it never started there: nothing against it
                reason = f"node {attempt.node.name} left the cluster before it started"
                self._requeue(attempt, AttemptState.LOST, reason, count=False)
            elif node is None:
                reason = f"node {attempt.node.name} left the cluster while running it"
                self._requeue(attempt, AttemptState.LOST, reason, count=True)
            elif attempt.waiting and not self._takes_work(node):
                reason = f"node {node.name} stopped taking work before it started ({node.reason or 'paused'})"
                self._requeue(attempt, AttemptState.CANCELLED, reason, count=False)
            elif node.hand_back:
                reason = f"node {node.name} got busy and handed it back ({node.reason})"
                self._requeue(attempt, AttemptState.CANCELLED, reason, count=False)

    def _slot_freed(self, ended: AttemptRuntime) -> None:
        """An attempt left its node: if it held a slot, the oldest announced attempt there
        starts now (its timeout runs from here)."""
        announced = self._announced.get(ended.node.address)
        if ended.waiting or not announced:
            return
        while announced:
            attempt = announced.popleft()
            if attempt.waiting and self.attempts.get(attempt.id) is attempt:
                attempt.waiting = False
                attempt.started = attempt.last_progress = time.monotonic()
                return

    def _requeue(self, attempt: AttemptRuntime, end: str, reason: str, count: bool) -> None:
        attempt.current = False
        self.attempts.pop(attempt.id, None)
        if end != AttemptState.LOST:  # a lost one's node is gone: nothing starts there
            self._slot_freed(attempt)
        self.engine.forget(attempt.id)
        rt = self.jobs[attempt.job_id]
        seg = rt.segments[attempt.segment_id]
        self.store.end_attempt(attempt.id, end, reason=reason)
        self._notify_later("farm_segment_finished", job=rt.job, segment_id=seg.id, state=end, result=None, reason=reason)
        if end == AttemptState.CANCELLED:
            self._to_cancel.append(attempt)
        if count:
            self._segment_failed(rt, seg, attempt.node, reason)
        else:
            self.store.move_segment(seg.id, seg.state, SegmentState.QUEUED)
            seg.state = SegmentState.QUEUED
            rt.queue.appendleft(seg.id)
            self._emit("segment_retry", rt, {"segment": seg.id, "reason": reason})

    def _can_dispatch(self) -> bool:
        return any(rt.queue for rt in self._order) and self._free_slots_exist()

    def _free_slots_exist(self) -> bool:
        busy = Counter(a.node.address for a in self.attempts.values())
        return any(busy[n.address] < self._capacity(n) for n in self._current_nodes() if self._takes_work(n))

    def _capacity(self, node: NodeView) -> int:
        """Attempts a node may hold: one per slot, and with pipelining one announced per slot."""
        return node.slots * 2 if self.pipeline else node.slots

    def _takes_work(self, node: NodeView) -> bool:
        return node.accepting and node.name not in self.paused_nodes

    def _current_nodes(self) -> list[NodeView]:
        now = time.monotonic()
        if now - self._nodes_checked > NODE_POLL_SECONDS or not self._nodes:
            self._nodes = self.engine.nodes()
            self._nodes_checked = now
        return self._nodes

    # -- dispatch ----------------------------------------------------------------------

    def _dispatch(self) -> list[tuple[JobRuntime, Segment, NodeView]]:
        busy = Counter(a.node.address for a in self.attempts.values())
        nodes = sorted(self._current_nodes(), key=lambda n: busy[n.address] - n.slots)
        handed: list[tuple[JobRuntime, Segment, NodeView]] = []
        for node in nodes:
            if not self._takes_work(node):
                continue
            while busy[node.address] < self._capacity(node):
                picked = self._next_for(node, busy, nodes)
                if picked is None:
                    break
                handed.append(picked)
                busy[node.address] += 1
        now = time.monotonic()
        if now - self._unrunnable_checked > NODE_POLL_SECONDS / 2:
            self._unrunnable_checked = now
            self._fail_unrunnable(nodes)
        return handed

    def _next_for(self, node: NodeView, busy: Counter[str],
                  nodes: list[NodeView]) -> tuple[JobRuntime, Segment, NodeView] | None:
        for rt in self._order:
            if not rt.queue or rt.state not in (JobState.QUEUED, JobState.RUNNING):
                continue
            if node.name in rt.excluded or unmet_requirements(rt.requires, node.capabilities):
                continue
            segment_id = self._take(rt, node, busy, nodes)
            if segment_id is None:
                continue
            seg = rt.segments[segment_id]
            seg.attempts += 1
            attempt_id = f"{seg.id}.a{seg.attempts}"
            if rt.state == JobState.QUEUED:
                self._set_job(rt, JobState.RUNNING)
            self.store.hand_out(attempt_id, seg.id, rt.job.id, node.name, seg.attempts, seg.state)
            seg.state = SegmentState.RUNNING
            now = time.monotonic()
            attempt = AttemptRuntime(attempt_id, rt.job.id, seg.id, node, now, now)
            self.attempts[attempt_id] = attempt
            if busy[node.address] >= node.slots:  # every slot is taken: it waits on the node
                attempt.waiting = True
                self._announced.setdefault(node.address, deque()).append(attempt)
            segment = Segment(
                id=seg.id, job=rt.job, index=seg.index, label=seg.label, frames=seg.frames,
                params=seg.params, attempt_id=attempt_id, output_dir=rt.job.work_dir / attempt_id,
            )
            self._emit("segment_started", rt, {"segment": seg.id, "node": node.name})
            return rt, segment, node
        return None

    def _take(self, rt: JobRuntime, node: NodeView, busy: Counter[str], nodes: list[NodeView]) -> str | None:
        """The next segment of ``rt`` for ``node``: the queue's head, unless ``node`` just
        failed it and another node that can run it has a free slot now; then the next one
        it did not fail (from the first few), or none of this job for ``node``."""
        head = rt.segments[rt.queue[0]]
        if head.avoid != node.name or not any(
                other is not node and self._takes_work(other) and busy[other.address] < other.slots
                and other.name not in rt.excluded and not unmet_requirements(rt.requires, other.capabilities)
                for other in nodes):
            return rt.queue.popleft()
        for position, segment_id in enumerate(itertools.islice(rt.queue, 1, 16), start=1):
            if rt.segments[segment_id].avoid != node.name:
                del rt.queue[position]
                return segment_id
        return None

    def _fail_unrunnable(self, nodes: list[NodeView]) -> None:
        """Fail jobs every able node was kept off; say why the others are waiting."""
        for rt in self._order:
            if not rt.queue or rt.state not in (JobState.QUEUED, JobState.RUNNING):
                continue
            able = [n for n in nodes if not unmet_requirements(rt.requires, n.capabilities)]
            waiting = None
            if not nodes:
                waiting = "no node is connected"
            elif able and all(n.name in rt.excluded for n in able) and not self._running_of(rt):
                kept = ", ".join(f'"{name}"' for name in sorted(n.name for n in able))
                count = f"the only node that can run it (node {kept})" if len(able) == 1 else \
                    f"all {len(able)} nodes that can run it (nodes {kept})"
                limit = rt.job.profile.max_node_failures
                self._fail_job(rt, f"{count} failed it {limit} time{'' if limit == 1 else 's'} "
                                   f"(max_node_failures) and "
                                   f"{'was' if len(able) == 1 else 'were'} kept off the job; "
                                   f"last error: {rt.error or 'unknown'}")
                continue
            elif not able:
                missing = sorted({need for n in nodes for need in unmet_requirements(rt.requires, n.capabilities)})
                waiting = f"no node offers {', '.join(missing)}"
            elif not any(self._takes_work(n) for n in able):
                waiting = "every node that can run it is paused or busy (part-time)"
            if waiting != rt.waiting:
                rt.waiting = waiting
                self.store.set_waiting(rt.job.id, waiting)

    # -- outcomes ----------------------------------------------------------------------

    def _on_progress(self, attempt_id: str, message: dict[str, Any]) -> None:
        attempt = self.attempts.get(attempt_id)
        if attempt is None or not attempt.current:
            return
        attempt.last_progress = time.monotonic()
        if message.get("started"):  # from a node that says when a segment starts
            attempt.started = attempt.last_progress
            attempt.waiting = False
            return
        rt = self.jobs[attempt.job_id]
        self._emit("segment_progress", rt, {"segment": attempt.segment_id, "fraction": message.get("fraction", 0.0),
                                            "message": message.get("message", "")})

    def _on_finished(self, attempt_id: str, outcome: dict[str, Any]) -> None:
        attempt = self.attempts.pop(attempt_id, None)
        if attempt is None:
            return
        if not outcome.get("lost"):  # a lost one's node died with it: nothing starts there
            self._slot_freed(attempt)
        if not attempt.current:
            self.store.event("late_result_ignored", job_id=attempt.job_id, segment_id=attempt.segment_id,
                             attempt_id=attempt_id, data={"ok": bool(outcome.get("ok"))})
            return
        rt = self.jobs[attempt.job_id]
        seg = rt.segments[attempt.segment_id]
        attempt_log = outcome.get("log")
        if outcome.get("ok"):
            self.store.end_attempt(attempt_id, AttemptState.DONE, exit_status=0, log=attempt_log)
            self.store.move_segment(seg.id, seg.state, SegmentState.DONE, result=outcome.get("result"))
            seg.state, seg.result = SegmentState.DONE, outcome.get("result") or {}
            rt.done += 1
            seg.seconds = time.monotonic() - attempt.started
            if rt.done & (rt.done - 1) == 0:  # judged again at 1, 2, 4, 8... done: not a scan of the job per segment
                self._recut(rt)
            self._notify_later("farm_segment_finished", job=rt.job, segment_id=seg.id, state=AttemptState.DONE,
                                result=seg.result, reason=None)
            self._emit("segment_done", rt, {"segment": seg.id})
            if rt.state != JobState.PAUSED and rt.all_done:
                self._start_assembly(rt)
            return
        reason = outcome.get("reason") or "unknown failure"
        if outcome.get("missing_job"):  # the node restarted since it was sent the job: nothing ran
            self._unrun(rt, seg, attempt_id, reason)
            return
        if outcome.get("fatal"):  # retrying cannot help (a DeterministicFailure: a parse error, a changed source)
            self.store.end_attempt(attempt_id, AttemptState.FAILED, reason=reason, log=attempt_log)
            self.store.move_segment(seg.id, seg.state, SegmentState.FAILED, error=reason)
            seg.state = SegmentState.FAILED
            self._notify_later("farm_segment_finished", job=rt.job, segment_id=seg.id, state=AttemptState.FAILED,
                                result=None, reason=reason)
            self._fail_job(rt, reason)
            return
        if outcome.get("lost") and attempt.waiting:  # it never started there: nothing against it
            self._unrun(rt, seg, attempt_id, f"its node {attempt.node.name} was lost before it started ({reason})")
            return
        if outcome.get("cancelled"):
            reason = f"cancelled on the node: {reason}"
        end_state = AttemptState.LOST if outcome.get("lost") else AttemptState.FAILED
        self.store.end_attempt(attempt_id, end_state, exit_status=outcome.get("exit_status"), reason=reason, log=attempt_log)
        self._notify_later("farm_segment_finished", job=rt.job, segment_id=seg.id, state=end_state, result=None, reason=reason)
        self._segment_failed(rt, seg, attempt.node, reason)

    def _unrun(self, rt: JobRuntime, seg: SegmentRuntime, attempt_id: str, reason: str) -> None:
        """An attempt that never ran is lost and its segment queued again first, without
        counting against its retries."""
        self.store.end_attempt(attempt_id, AttemptState.LOST, reason=reason)
        self._notify_later("farm_segment_finished", job=rt.job, segment_id=seg.id, state=AttemptState.LOST,
                            result=None, reason=reason)
        self.store.move_segment(seg.id, seg.state, SegmentState.QUEUED)
        seg.state = SegmentState.QUEUED
        rt.queue.appendleft(seg.id)
        self._emit("segment_retry", rt, {"segment": seg.id, "reason": reason})

    def _segment_failed(self, rt: JobRuntime, seg: SegmentRuntime, node: NodeView, reason: str) -> None:
        seg.failures += 1
        seg.avoid = node.name
        rt.node_failures[node.name] += 1
        rt.error = reason
        if rt.node_failures[node.name] >= rt.job.profile.max_node_failures:
            rt.excluded.add(node.name)
        if seg.failures > rt.job.profile.retries:
            self.store.move_segment(seg.id, seg.state, SegmentState.FAILED, error=reason)
            seg.state = SegmentState.FAILED
            tries = "attempt" if seg.failures == 1 else "attempts"
            self._fail_job(rt, f"segment {seg.label} failed after {seg.failures} {tries}: {reason}")
            return
        self.store.move_segment(seg.id, seg.state, SegmentState.QUEUED, error=reason)
        seg.state = SegmentState.QUEUED
        rt.queue.appendleft(seg.id)
        self._emit("segment_retry", rt, {"segment": seg.id, "reason": reason})

    # -- timeouts and cancels ------------------------------------------------------------

    def _enforce_timeouts(self) -> None:
        now = time.monotonic()
        for attempt in list(self.attempts.values()):
            if not attempt.current or attempt.waiting:  # a waiting one has not started: nothing to time
                continue
            profile = self.jobs[attempt.job_id].job.profile
            reason = None
            if profile.timeout and now - attempt.started > profile.timeout:
                reason = f"ran longer than the profile's timeout of {profile.timeout:g} s on {attempt.node.name}; ended"
            elif profile.stall_timeout and now - attempt.last_progress > profile.stall_timeout:
                reason = f"showed no progress for {profile.stall_timeout:g} s (stall_timeout) on {attempt.node.name}; ended"
            if reason:
                attempt.current = False
                rt = self.jobs[attempt.job_id]
                seg = rt.segments[attempt.segment_id]
                self.store.end_attempt(attempt.id, AttemptState.TIMED_OUT, reason=reason)
                self._notify_later("farm_segment_finished", job=rt.job, segment_id=seg.id,
                                    state=AttemptState.TIMED_OUT, result=None, reason=reason)
                self._to_cancel.append(attempt)
                self._segment_failed(rt, seg, attempt.node, reason)

    def _apply_cancels(self) -> None:
        with self._lock:
            wanted = set(self._cancel_local)
            self._cancel_local.clear()
        now = time.monotonic()
        if now - self._cancel_checked > CANCEL_POLL_SECONDS:
            self._cancel_checked = now
            live = [rt.job.id for rt in self._order if rt.state not in TERMINAL_JOB_STATES]
            wanted |= self.store.cancel_requests(live)
        for job_id in wanted:
            rt = self.jobs.get(job_id)
            if rt is None or rt.state in TERMINAL_JOB_STATES or rt.state == JobState.ASSEMBLING:
                continue
            self._stop_job(rt, JobState.CANCELLED, "cancelled by request")

    def _stop_job(self, rt: JobRuntime, final: str, reason: str) -> None:
        for attempt in self._running_of(rt):
            attempt.current = False
            self.store.end_attempt(attempt.id, AttemptState.CANCELLED, reason=reason)
            self._to_cancel.append(attempt)
        for seg in rt.segments.values():
            if seg.state in (SegmentState.QUEUED, SegmentState.RUNNING):
                self.store.move_segment(seg.id, seg.state, SegmentState.CANCELLED)
                seg.state = SegmentState.CANCELLED
        rt.queue.clear()
        self._set_job(rt, final, error=reason if final == JobState.FAILED else None)
        if final == JobState.FAILED:
            rt.error = reason
            self._notify_later("farm_job_failed", job=rt.job, reason=reason)
        self._emit(f"job_{final}", rt, {"reason": reason})

    def _fail_job(self, rt: JobRuntime, reason: str) -> None:
        self._stop_job(rt, JobState.FAILED, reason)

    def _running_of(self, rt: JobRuntime) -> list[AttemptRuntime]:
        return [a for a in self.attempts.values() if a.job_id == rt.job.id and a.current]

    # -- assembly ----------------------------------------------------------------------

    def _start_assembly(self, rt: JobRuntime) -> None:
        self._set_job(rt, JobState.ASSEMBLING)
        results = [seg.result or {} for seg in sorted(rt.segments.values(), key=lambda s: s.index)]
        self._emit("job_assembling", rt, {})
        self._assembler.submit(self._assemble, rt, results)

    def _assemble(self, rt: JobRuntime, results: list[dict[str, Any]]) -> None:
        attempt_log = AttemptLog()
        cancelled = threading.Event()
        node = runtime()
        scratch = rt.job.work_dir / "assemble"
        try:
            scratch.mkdir(parents=True, exist_ok=True)
            context = Context(
                scratch=scratch, logger=logging.getLogger(f"farm.assemble.{rt.job.id}"),
                progress=lambda fraction, message="": None, cancelled=cancelled, node=node.info(),
                # the joining process writes in the job's work folder and, for processors that
                # join straight into it, the job's staging folder in the destination
                run=CommandRunner(attempt_log, cancelled, f"job={rt.job.id} assemble", node.config.kill_grace,
                                  attempt_policy(node.config, rt.job,
                                                 [rt.job.work_dir, staging_folder(rt.job.destination, rt.job.id)]),
                                  home=scratch).run,
                claim=lambda paths: self.store.claim(rt.job.id, [str(path) for path in paths]),
            )
            check_source(rt.job)
            again = list(rt.processor.verify(rt.job, results, context))
            if again:
                value: Any = {"ok": False, "again": again}
            else:
                outputs = rt.processor.assemble(rt.job, results, context)
                value = {"ok": True, "outputs": [str(p) for p in outputs]}
        except FarmError as exc:
            value = {"ok": False, "reason": str(exc), "log": attempt_log.text()}
        except Exception as exc:
            value = {"ok": False, "reason": f"processor {rt.processor.name} failed to assemble: {type(exc).__name__}: {exc}",
                     "log": attempt_log.text()}
        if not value["ok"] and not value.get("again"):
            try:  # it may have failed because the source went away meanwhile: then that is the reason
                check_source(rt.job)
            except SourceChanged as exc:
                if not value["reason"].startswith(str(exc)):
                    value["reason"] = f"{exc} (assembling said: {value['reason']})"
        self.engine.outcomes.put(("assembled", rt.job.id, value))

    def _on_assembled(self, job_id: str, value: dict[str, Any]) -> None:
        rt = self.jobs[job_id]
        if rt.state != JobState.ASSEMBLING:
            return
        if value.get("again"):
            plans: list[SegmentPlan] = value["again"]
            rt.verify_rounds += 1
            labels = "; ".join(plan.label for plan in plans)
            if rt.verify_rounds > rt.job.profile.retries:
                self._set_job(rt, JobState.FAILED, error=f"verification still failing after {rt.job.profile.retries} "
                                                          f"re-runs: {labels}")
                rt.error = f"verification still failing after {rt.job.profile.retries} re-runs: {labels}"
                self._notify_later("farm_job_failed", job=rt.job, reason=rt.error)
                self._emit("job_failed", rt, {"reason": rt.error})
                return
            self._set_job(rt, JobState.RUNNING)
            self.store.event("verify_rerun", job_id=rt.job.id, data={"round": rt.verify_rounds, "segments": labels})
            self._add_segments(rt, plans)
            self._emit("job_rerun", rt, {"segments": labels})
            return
        if value["ok"]:
            rt.outputs = value["outputs"]
            self._set_job(rt, JobState.DONE, outputs=rt.outputs)
            if not self.keep_work:  # thousands of attempt folders: not in the dispatching thread
                self._pending_removals.append(rt.job.work_dir)
            self._notify_later("farm_job_finished", job=rt.job, outputs=rt.outputs)
            self._emit("job_done", rt, {"outputs": rt.outputs})
            self._chain(rt)
        else:
            reason = f"assembly failed: {value['reason']}"
            rt.error = reason
            self._set_job(rt, JobState.FAILED, error=reason)
            self._notify_later("farm_job_failed", job=rt.job, reason=reason)
            self._emit("job_failed", rt, {"reason": reason})

    # -- growing and re-cutting jobs -----------------------------------------------------

    def _add_segments(self, rt: JobRuntime, plans: list[SegmentPlan]) -> None:
        start = max((seg.index for seg in rt.segments.values()), default=-1) + 1
        rows = []
        for offset, plan in enumerate(plans):
            index = start + offset
            seg = SegmentRuntime(f"{rt.job.id}.s{index:05d}", index, plan.label, plan.frames, dict(plan.params))
            rt.segments[seg.id] = seg
            rt.queue.append(seg.id)
            rows.append({"id": seg.id, "job_id": rt.job.id, "idx": index, "label": seg.label,
                         "frames": seg.frames, "params": seg.params})
        self.store.add_segments(rows)

    def _recut(self, rt: JobRuntime) -> None:
        """With ``segment.target_seconds``, re-cut the frames nobody has started so that
        each segment takes about that long, judged by the segments already done."""
        target = rt.job.profile.segment.target_seconds
        if not target or not rt.queue:
            return
        timed = [s for s in rt.segments.values() if s.state == SegmentState.DONE and s.seconds and s.frames]
        unstarted = [rt.segments[sid] for sid in rt.queue if rt.segments[sid].attempts == 0 and rt.segments[sid].frames]
        if not timed or not unstarted:
            return
        per_frame = sum(s.seconds or 0.0 for s in timed) / sum(len(s.frames or []) for s in timed)
        frames = sorted(frame for seg in unstarted for frame in seg.frames or [])
        slots = sum(node.slots for node in self._nodes) or 1
        # Never so large that the last segments leave nodes idle while one finishes alone.
        size = max(1, min(round(target / max(per_frame, 1e-6)), math.ceil(len(frames) / slots)))
        current = max(len(seg.frames or []) for seg in unstarted)
        if abs(size - current) < max(1.0, 0.25 * current):
            return
        dropped = {seg.id for seg in unstarted}
        self.store.drop_unstarted_segments(sorted(dropped))
        for seg_id in dropped:
            del rt.segments[seg_id]
        rt.queue = deque(sid for sid in rt.queue if sid not in dropped)
        params = dict(unstarted[0].params)
        self._add_segments(rt, [SegmentPlan(label=f"frames {format_frames(chunk)}", frames=chunk, params=params)
                                for chunk in chunk_frames(frames, size)])
        self.store.event("recut", job_id=rt.job.id, data={"frames_per_segment": size, "seconds_per_frame": per_frame})
        self._emit("job_recut", rt, {"frames_per_segment": size})

    def _chain(self, rt: JobRuntime) -> None:
        """Submit the ``then:`` job with this job's first output as its input."""
        if rt.then is None:
            return
        if not rt.outputs:
            self.store.event("chain_skipped", job_id=rt.job.id, data={"reason": "the job has no outputs"})
            return
        try:
            _, child_ids = self.submit(rt.then, [Path(rt.outputs[0])], rt.job.destination,
                                       origin=f"then:{rt.job.id}", overwrite=rt.job.overwrite)
        except OutputConflict as exc:  # this job is done; only the chained one is refused
            log.warning("job %s: the chained job %s was refused: %s", rt.job.id, rt.then.profile.name, exc)
            self.store.event("chain_refused", job_id=rt.job.id, data={"reason": str(exc)})
            return
        rt.children.extend(child_ids)
        self.store.event("chained", job_id=rt.job.id, data={"jobs": child_ids})

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

    def _reorder(self) -> None:
        self._order = sorted((rt for rt in self.jobs.values() if rt.state not in TERMINAL_JOB_STATES),
                             key=lambda rt: rt.sort_key)

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
        self._announced.clear()
        self.jobs.clear()
        self._order = []
        self._to_cancel = []
        self._ended_batches = set()
        self._pending_hooks = []
        self._pending_removals = []

    def close(self) -> None:
        self._assembler.shutdown(wait=True)


def _stamp(source: Path | None) -> tuple[tuple[int, int] | None, str | None]:
    """The input's (size, mtime_ns) as it is accepted, or why it cannot be: the file may have
    gone in the moment since the submission was checked."""
    try:
        return input_stamp(source), None
    except FileNotFoundError:
        return None, f"the source {source} was deleted before the job was accepted"
    except OSError as exc:
        return None, f"the source {source} cannot be read: {exc.strerror or exc}"


__all__ = ["Scheduler", "JobRuntime", "new_id", "cancel_interrupted"]
