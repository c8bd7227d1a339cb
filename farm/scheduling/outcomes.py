"""Outcomes and retries: what an attempt's end means for its segment and its job;
timeouts and cancels.

Only the current attempt's outcome counts, so a late result is recorded and ignored.

Part of :class:`farm.scheduler.Scheduler` (a mixin: it works on the scheduler's state).
"""

from __future__ import annotations

import heapq
import time
from typing import Any

from farm.engine import NodeView
from farm.model import AttemptState, JobState, SegmentState, TERMINAL_JOB_STATES
from farm.scheduling.runtime import AttemptRuntime, JobRuntime, SegmentRuntime

CANCEL_POLL_SECONDS = 0.5  # how often the store is asked for cancel requests (from other processes)


class Outcomes:
    """Recording attempts' ends, retrying, timing out and cancelling."""

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
        data = {"segment": attempt.segment_id, "fraction": message.get("fraction", 0.0),
                "message": message.get("message", "")}
        fetched = message.get("fetched")  # how much of an input the node holds (nodes without shared storage)
        if isinstance(fetched, dict) and isinstance(fetched.get("sha"), str) and isinstance(fetched.get("bytes"), int):
            data["fetched"] = {"node": attempt.node.name, "sha": fetched["sha"], "bytes": fetched["bytes"]}
        self._emit("segment_progress", rt, data)

    def _on_finished(self, attempt_id: str, outcome: dict[str, Any]) -> None:
        attempt = self._drop(attempt_id)
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
            measured = outcome.get("seconds")
            if isinstance(measured, (int, float)) and measured >= 0:
                self._judge_parcel(rt, measured)
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
        if outcome.get("returned") and attempt.parcel is not None and attempt.id != attempt.parcel.head:
            self._parcel_ran_long(rt)
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
        self._queue_first(rt, seg.id)
        self._emit("segment_retry", rt, {"segment": seg.id, "reason": reason})

    def _queue_first(self, rt: JobRuntime, segment_id: str) -> None:
        """Queue a segment again at the head of its job's queue, behind those put there
        earlier in this round: a parcel's segments that come back together keep their order."""
        position = self._queued_first.get(rt.job.id, 0)
        rt.queue.insert(position, segment_id)
        self._queued_first[rt.job.id] = position + 1

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
        self._queue_first(rt, seg.id)
        self._emit("segment_retry", rt, {"segment": seg.id, "reason": reason})

    def _watch(self, attempt: AttemptRuntime, profile: Any) -> None:
        """Time ``attempt`` out by its profile's limits: it is looked at again when the
        nearest could have passed (a heap of deadlines, not a scan of every attempt)."""
        limits = [limit for limit in (profile.timeout, profile.stall_timeout) if limit]
        if limits:
            heapq.heappush(self._deadlines, (time.monotonic() + min(limits), next(self._deadline_seq), attempt))

    def _enforce_timeouts(self) -> None:
        now = time.monotonic()
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _, _, attempt = heapq.heappop(deadlines)
            if not attempt.current or self.attempts.get(attempt.id) is not attempt:
                continue  # it ended: nothing to time
            profile = self.jobs[attempt.job_id].job.profile
            if attempt.waiting:  # it has not started: its limits run from its start, not before now
                self._watch(attempt, profile)
                continue
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
            else:  # looked at when its nearest limit can pass, as it stands now
                due = [at for at in ((attempt.started + profile.timeout) if profile.timeout else None,
                                     (attempt.last_progress + profile.stall_timeout) if profile.stall_timeout else None)
                       if at is not None]
                heapq.heappush(deadlines, (max(min(due), now + 0.001), next(self._deadline_seq), attempt))

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
        if rt.unloaded:
            self.store.cancel_queued_from(rt.job.id, rt.tail)
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
