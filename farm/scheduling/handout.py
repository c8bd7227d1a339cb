"""Hand-out and pipelining: which node gets which segment, when.

The queue lives in the controller: a segment is handed to Dask only when a node has room
for it, pinned to that node. With pipelining a node holds, besides one attempt per slot,
one announced attempt per slot that starts when a slot frees, so a slot never waits a
round trip; an announced attempt is taken back at no cost if its node leaves or stops
taking work before it starts.

A job whose segments take much less than a round trip (as its nodes measured them: a
no-op, ``true``, a tiny frame) is handed out several segments to a Dask task, a parcel,
so that Dask's cost per task is shared. A parcel holds one slot; its segments run one
after another there, each sends its own outcome as it ends, and those not yet started
are announced ones: cancelled or taken back one by one, as any other, and taken back
all at once when the one running before them has run far longer than measured.

Part of :class:`farm.scheduler.Scheduler` (a mixin: it works on the scheduler's state).
"""

from __future__ import annotations

import heapq
import itertools
import os
import time
from collections import Counter, deque

from farm.engine import NodeView
from farm.model import AttemptState, JobState, Segment, SegmentState
from farm.requirements import unmet_requirements
from farm.scheduling.runtime import AttemptRuntime, JobRuntime, Parcel

NODE_POLL_SECONDS = 1.0  # how often the nodes' list is asked for
#: Only a job whose segments average less than this on their nodes is parcelled: a Dask
#: task costs the controller and the node a few milliseconds, a round trip more. A parcel
#: then carries about PARCEL_SECONDS of work, in at most MAX_PARCEL segments.
PARCEL_UNDER_SECONDS = 0.02
PARCEL_SECONDS = 0.2
MAX_PARCEL = 16
#: A parcel's segment that has run this long (a hundred times what its job's segments
#: were measured to take) has the rest of its parcel taken back for any free slot, rather
#: than waiting behind it until it ends or times out.
STUCK_PARCEL_SECONDS = 2.0


def parcel_limits() -> tuple[float, float]:
    """(``PARCEL_UNDER_SECONDS``, ``PARCEL_SECONDS``), or what ``$FARM_PARCEL_UNDER_SECONDS``
    and ``$FARM_PARCEL_SECONDS`` say instead: on a machine too busy to measure a few
    milliseconds (a test suite beside its controllers) a job of tiny segments measures
    tens, and would not be parcelled."""
    def from_env(name: str, default: float) -> float:
        try:
            value = float(os.environ.get(name, ""))
        except ValueError:
            return default
        return value if 0 < value < 60 else default

    return from_env("FARM_PARCEL_UNDER_SECONDS", PARCEL_UNDER_SECONDS), from_env("FARM_PARCEL_SECONDS", PARCEL_SECONDS)


class HandOut:
    """Choosing a segment for each node with room, and taking back what nodes cannot run."""

    def _check_nodes(self) -> None:
        """Attempts on nodes that left, or that hand work back, go back to the queue."""
        if not self.attempts:
            return
        current = self._current_nodes()
        if self._nodes_seen == self._nodes_version:  # nothing new about the nodes since the last look
            return
        self._nodes_seen = self._nodes_version
        nodes = {node.address: node for node in current}
        for attempt in list(self.attempts.values()):
            if not attempt.current:
                continue
            node = nodes.get(attempt.node.address)
            if node is not None and node.worker != attempt.node.worker:  # another worker on its port
                node = None
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
        """An attempt left its node: if it held a slot, the next of its parcel starts now,
        or else the oldest announced attempt there (its timeout runs from here)."""
        if ended.waiting:
            return
        if ended.parcel is not None and self._start_next(ended.parcel.waiting):
            return
        self._start_next(self._announced.get(ended.node.address))

    def _start_next(self, waiting: deque[AttemptRuntime] | None) -> bool:
        """The first of ``waiting`` still held here starts now; False if none was left."""
        while waiting:
            attempt = waiting.popleft()
            if attempt.waiting and self.attempts.get(attempt.id) is attempt:
                attempt.waiting = False
                attempt.started = attempt.last_progress = time.monotonic()
                self._check_parcel_later(attempt)
                return True
        return False

    def _check_parcel_later(self, attempt: AttemptRuntime) -> None:
        """``attempt`` runs with segments of its parcel waiting behind it: look again when
        it could have run ``STUCK_PARCEL_SECONDS``."""
        if attempt.parcel is not None and attempt.parcel.waiting:
            due = attempt.started + STUCK_PARCEL_SECONDS
            heapq.heappush(self._parcel_checks, (due, next(self._deadline_seq), attempt))

    def _free_stuck_parcels(self) -> None:
        """The segments waiting behind a parcel's segment that has run too long are taken
        back (cancelled on the node before they start, queued again without counting): a
        hung frame holds its own slot, not a parcel's worth of its job."""
        now = time.monotonic()
        checks = self._parcel_checks
        while checks and checks[0][0] <= now:
            _, _, attempt = heapq.heappop(checks)
            parcel = attempt.parcel
            if self.attempts.get(attempt.id) is not attempt or parcel is None or not parcel.waiting:
                continue  # it ended, and the next of its parcel started (and is looked at itself)
            due = (now if attempt.waiting else attempt.started) + STUCK_PARCEL_SECONDS
            if due > now:  # it started later than thought, or has not started yet
                heapq.heappush(checks, (due, next(self._deadline_seq), attempt))
                continue
            behind = [waiting for waiting in parcel.waiting
                      if waiting.waiting and waiting.current and self.attempts.get(waiting.id) is waiting]
            parcel.waiting.clear()
            if not behind:  # their job ended meanwhile: they are cancelled on the node already
                continue
            self._parcel_ran_long(self.jobs[attempt.job_id])
            reason = (f"taken back before it started: the segment before it in its parcel ran over "
                      f"{STUCK_PARCEL_SECONDS:g} s on node {attempt.node.name}")
            for waiting in behind:
                self._requeue(waiting, AttemptState.CANCELLED, reason, count=False)

    def _requeue(self, attempt: AttemptRuntime, end: str, reason: str, count: bool) -> None:
        attempt.current = False
        self._drop(attempt.id)
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
            self._queue_first(rt, seg.id)
            self._emit("segment_retry", rt, {"segment": seg.id, "reason": reason})

    def _hold(self, attempt: AttemptRuntime) -> None:
        """``attempt`` is handed out: its node holds one more (a parcel counts once)."""
        self.attempts[attempt.id] = attempt
        parcel = attempt.parcel
        if parcel is not None:
            parcel.held += 1
            if parcel.held > 1:
                return
        address = attempt.node.address
        self._busy[address] += 1
        node = self._taking.get(address)
        if node is None or self._busy[address] >= self._capacity(node):
            self._room.discard(address)

    def _drop(self, attempt_id: str) -> AttemptRuntime | None:
        """``attempt_id`` left its node (ended, lost or taken back); its slot is free."""
        attempt = self.attempts.pop(attempt_id, None)
        if attempt is not None:
            parcel = attempt.parcel
            if parcel is not None:
                parcel.held -= 1
                if parcel.held > 0:  # the rest of its parcel still holds the slot
                    return attempt
            address = attempt.node.address
            self._busy[address] -= 1
            if self._busy[address] <= 0:
                del self._busy[address]
            node = self._taking.get(address)
            if node is not None and self._busy[address] < self._capacity(node):
                self._room.add(address)
        return attempt

    def _can_dispatch(self) -> bool:
        return self._free_slots_exist() and any(rt.has_queued for rt in self._order)

    def _free_slots_exist(self) -> bool:
        self._see_room()
        return bool(self._room)

    def _see_room(self) -> None:
        """Which nodes take work (``_taking``) and which of them hold fewer attempts than
        they may (``_room``): worked out again when the nodes' view changes, and kept as
        attempts come and go, so that a round on a full farm of thousands of nodes looks
        at the few that a slot freed on, not at every node."""
        nodes = self._current_nodes()
        if self._room_version == self._nodes_version:
            return
        self._room_version = self._nodes_version
        self._taking = {node.address: node for node in nodes if self._takes_work(node)}
        self._listed = {node.address: position for position, node in enumerate(nodes)}
        busy = self._busy
        self._room = {address for address, node in self._taking.items() if busy[address] < self._capacity(node)}

    def _capacity(self, node: NodeView) -> int:
        """Tasks a node may hold: one per slot, and with pipelining one announced per slot."""
        return node.slots * 2 if self.pipeline else node.slots

    def _takes_work(self, node: NodeView) -> bool:
        return node.accepting and node.name not in self.paused_nodes

    def _current_nodes(self) -> list[NodeView]:
        now = time.monotonic()
        if now - self._nodes_checked > NODE_POLL_SECONDS or not self._nodes:
            self._nodes = self.engine.nodes()
            self._nodes_checked = now
            self._nodes_version += 1
        return self._nodes

    def _dispatch(self) -> list[tuple[JobRuntime, list[Segment], NodeView]]:
        busy = self._busy
        self._see_room()
        listed = self._listed  # equal loads go in the nodes' own order, as when every node was sorted
        nodes = sorted((self._taking[address] for address in self._room),
                       key=lambda n: (busy[n.address] - n.slots, listed[n.address]))
        handed: list[tuple[JobRuntime, list[Segment], NodeView]] = []
        for node in nodes:
            while busy[node.address] < self._capacity(node):
                picked = self._next_for(node, busy, nodes)
                if picked is None:
                    break
                handed.append(picked)
        now = time.monotonic()
        if now - self._unrunnable_checked > NODE_POLL_SECONDS / 2:
            self._unrunnable_checked = now
            self._fail_unrunnable(self._current_nodes())
        return handed

    def _next_for(self, node: NodeView, busy: Counter[str],
                  nodes: list[NodeView]) -> tuple[JobRuntime, list[Segment], NodeView] | None:
        for rt in self._order:
            if not rt.has_queued or rt.state not in (JobState.QUEUED, JobState.RUNNING):
                continue
            if node.name in rt.excluded or unmet_requirements(rt.requires, node.capabilities):
                continue
            self._top_up(rt)
            if not rt.queue:  # what was left in the store had been cancelled
                continue
            segment_id = self._take(rt, node, busy, nodes)
            if segment_id is None:
                continue
            if rt.state == JobState.QUEUED:
                self._set_job(rt, JobState.RUNNING)
            parcel = Parcel() if rt.parcel > 1 else None
            # every slot is taken: it waits on the node
            segments = [self._hand_out(rt, segment_id, node, parcel, announced=busy[node.address] >= node.slots)]
            while parcel is not None and len(segments) < rt.parcel:
                self._top_up(rt)
                segment_id = self._take(rt, node, busy, nodes) if rt.queue else None
                if segment_id is None:
                    break
                segments.append(self._hand_out(rt, segment_id, node, parcel, announced=True))
            if parcel is not None and parcel.waiting:
                self._check_parcel_later(self.attempts[parcel.head])
            return rt, segments, node
        return None

    def _hand_out(self, rt: JobRuntime, segment_id: str, node: NodeView, parcel: Parcel | None,
                  announced: bool) -> Segment:
        """An attempt of ``segment_id`` for ``node``: stored, held and timed. An announced
        one waits on the node (behind its busy slots, or the segments before it in its
        parcel)."""
        seg = rt.segments[segment_id]
        seg.attempts += 1
        attempt_id = f"{seg.id}.a{seg.attempts}"
        self.store.hand_out(attempt_id, seg.id, rt.job.id, node.name, seg.attempts, seg.state)
        seg.state = SegmentState.RUNNING
        now = time.monotonic()
        attempt = AttemptRuntime(attempt_id, rt.job.id, seg.id, node, now, now, waiting=announced, parcel=parcel)
        if parcel is not None and parcel.held:  # it starts when the one before it in its parcel ends
            parcel.waiting.append(attempt)
        else:
            if parcel is not None:
                parcel.head = attempt_id
            if announced:  # it starts when a slot of the node frees
                self._announced.setdefault(node.address, deque()).append(attempt)
        self._hold(attempt)
        self._watch(attempt, rt.job.profile)
        self._emit("segment_started", rt, {"segment": seg.id, "node": node.name})
        return Segment(
            id=seg.id, job=rt.job, index=seg.index, label=seg.label, frames=seg.frames,
            params=seg.params, attempt_id=attempt_id, output_dir=rt.job.work_dir / attempt_id,
        )

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

    def _judge_parcel(self, rt: JobRuntime, seconds: float) -> None:
        """How many of ``rt``'s segments go in one task, now that one took ``seconds`` on
        its node: about ``PARCEL_SECONDS`` of work by a moving average of the last few
        dozen, so that one slow moment does not undo it. A segment longer than a whole
        parcel puts the average at half its time at once: segments that turn slow (a
        title, then the film) go one a task after the first of them."""
        under, parcel_seconds = self.parcel_limits
        average = seconds if rt.seconds_each is None else rt.seconds_each + (seconds - rt.seconds_each) / 16
        if seconds > parcel_seconds:
            average = max(average, seconds / 2)
        rt.seconds_each = average
        rt.parcel = 1 if average >= under else min(MAX_PARCEL, int(parcel_seconds / max(average, 1e-6)))

    def _parcel_ran_long(self, rt: JobRuntime) -> None:
        """A node handed back part of a parcel of ``rt``: its segments are not what they
        were measured to be. One a task, until the segments measured since say otherwise."""
        rt.seconds_each = max(rt.seconds_each or 0.0, self.parcel_limits[1])
        rt.parcel = 1

    def _fail_unrunnable(self, nodes: list[NodeView]) -> None:
        """Fail jobs every able node was kept off; say why the others are waiting."""
        # Jobs share a handful of requirement sets: nodes are matched once per set, not once
        # per job (1,000 jobs x 1,000 nodes cost 240 ms a round in benchmarks/scale.py).
        able_for: dict[tuple[tuple[str, str], ...], list[NodeView]] = {}
        for rt in self._order:
            if not rt.has_queued or rt.state not in (JobState.QUEUED, JobState.RUNNING):
                continue
            key = tuple(sorted(rt.requires.items()))
            able = able_for.get(key)
            if able is None:
                able = able_for[key] = [n for n in nodes if not unmet_requirements(rt.requires, n.capabilities)]
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
