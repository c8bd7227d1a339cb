"""Taking over: jobs whose owner stopped, rebuilt from the store and queued again.

Part of :class:`farm.scheduler.Scheduler` (a mixin: it works on the scheduler's state).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from farm.errors import FarmError, IllegalTransition
from farm.model import AttemptState, Job, JobState, SegmentState, TERMINAL_JOB_STATES
from farm.profiles import load_profile
from farm.scheduling.runtime import JobRuntime, segment_from_row
from farm.store import Store



class Recovery:
    """Rebuilding jobs from the store after their owner stopped."""

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
        started = self.store.fresh_from(row["id"])[0] > 0  # a segment ran or left the queue
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
        # the segments that never ran stay in the store until the queue reaches them
        rt.tail, rt.unloaded = self.store.fresh_from(job.id)
        attempts_of: dict[str, list[Any]] = {}
        for attempt in self.store.attempts(job_id=job.id) if rt.tail else ():
            attempts_of.setdefault(attempt["segment_id"], []).append(attempt)
        for seg_row in self.store.segments_from(job.id, 0, rt.tail):
            if seg_row["idx"] >= rt.tail:
                break
            seg = segment_from_row(seg_row)
            attempts = attempts_of.get(seg.id, [])
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
        self.store.event("job_recovered", job_id=job.id, data={"queued": len(rt.queue) + rt.unloaded})
        if rt.state == JobState.ASSEMBLING:
            results = [seg.result or {} for seg in sorted(rt.segments.values(), key=lambda s: s.index)]
            self._assembler.submit(self._assemble, rt, results)
        elif rt.state in (JobState.QUEUED, JobState.RUNNING) and rt.total and rt.all_done:
            if rt.state == JobState.QUEUED:
                self._set_job(rt, JobState.RUNNING)
            self._start_assembly(rt)
        return rt

    @staticmethod
    def _output_kept(job: Job, attempts: list[Any]) -> bool:
        done = [a["id"] for a in attempts if a["state"] == AttemptState.DONE]
        return bool(done) and (job.work_dir / done[-1]).is_dir()


def cancel_interrupted(store: Store, job_id: str, reason: str) -> None:
    """End an interrupted job as cancelled at once: nobody runs it, so nobody is asked."""
    with store.transaction():
        for seg in store.segments_in(job_id, SegmentState.RUNNING):
            store.move_segment(seg["id"], seg["state"], SegmentState.CANCELLED)
        store.cancel_queued_from(job_id, 0)
        store.move_job(job_id, JobState.INTERRUPTED, JobState.CANCELLED, error=reason)
