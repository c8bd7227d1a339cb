"""The queue and its order: what is submitted, what waits, in which order, and what
people change in it (cancel, retry, pause, resume, priority); jobs that grow or are
re-cut as they run.

Part of :class:`farm.scheduler.Scheduler` (a mixin: it works on the scheduler's state).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from farm.errors import FarmError, OutputConflict, ProfileError
from farm.frames import chunk_frames, format_frames
from farm.model import Job, JobState, SegmentPlan, SegmentState, TERMINAL_JOB_STATES
from farm.node import input_stamp
from farm.outputs import already_there, real_paths
from farm.profiles import LoadedProfile, load_profile
from farm.scheduling.runtime import JobRuntime, SegmentRuntime, new_id, segment_from_row


# A job's queue holds this many segments at least while the store has more (the hand-out
# looks up to 16 ahead for one its node did not fail), loaded this many at a time.
LOAD_BELOW = 32
LOAD_COUNT = 128


class JobQueue:
    """Submitting, steering and ordering jobs."""

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
            for index, plan in enumerate(plans):  # to the store only: loaded as the queue reaches them
                segment_rows.append({"id": f"{job_id}.s{index:05d}", "job_id": job_id, "idx": index,
                                     "label": plan.label, "frames": plan.frames, "params": plan.params})
            rt.unloaded = len(plans)
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
            elif not rt.total:
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
        self._load_all(rt)
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
        if rt.total and rt.all_done:
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
        self._nodes_version += 1  # its attempts are looked at again

    def _top_up(self, rt: JobRuntime) -> None:
        """Load the next segments of a job from the store when its queue runs short."""
        if rt.unloaded and len(rt.queue) < LOAD_BELOW:
            self._load(rt, LOAD_COUNT)

    def _load_all(self, rt: JobRuntime) -> None:
        if rt.unloaded:
            self._load(rt, None)

    def _load(self, rt: JobRuntime, limit: int | None) -> None:
        rows = self.store.segments_from(rt.job.id, rt.tail, limit)
        for row in rows:
            seg = segment_from_row(row)
            rt.segments[seg.id] = seg
            if seg.state == SegmentState.QUEUED:
                rt.queue.append(seg.id)
        rt.unloaded = 0 if limit is None or len(rows) < limit else max(0, rt.unloaded - len(rows))
        rt.tail = rows[-1]["idx"] + 1 if rows else rt.tail

    def _add_segments(self, rt: JobRuntime, plans: list[SegmentPlan]) -> None:
        self._load_all(rt)  # new segments come last: everything before them is in memory
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
        rt.tail = start + len(plans)

    def _recut(self, rt: JobRuntime) -> None:
        """With ``segment.target_seconds``, re-cut the frames nobody has started so that
        each segment takes about that long, judged by the segments already done."""
        target = rt.job.profile.segment.target_seconds
        if not target or not rt.has_queued:
            return
        self._load_all(rt)
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

    def _reorder(self) -> None:
        self._order = sorted((rt for rt in self.jobs.values() if rt.state not in TERMINAL_JOB_STATES),
                             key=lambda rt: rt.sort_key)


def _stamp(source: Path | None) -> tuple[tuple[int, int] | None, str | None]:
    """The input's (size, mtime_ns) as it is accepted, or why it cannot be: the file may have
    gone in the moment since the submission was checked."""
    try:
        return input_stamp(source), None
    except FileNotFoundError:
        return None, f"the source {source} was deleted before the job was accepted"
    except OSError as exc:
        return None, f"the source {source} cannot be read: {exc.strerror or exc}"
