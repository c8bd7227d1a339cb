"""Batches, jobs, segments and attempts: their states and the moves between them.

Each entity has one transition table; :func:`check_transition` is the only judge of
whether a move is allowed, and an illegal move raises an error that names the entity.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from farm.errors import IllegalTransition

if TYPE_CHECKING:
    from farm.tokens import Principal


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    ASSEMBLING = "assembling"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    # its owner (the process holding the batch's lease) stopped before the job ended
    INTERRUPTED = "interrupted"


class SegmentState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class AttemptState(StrEnum):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    LOST = "lost"
    CANCELLED = "cancelled"


TERMINAL_JOB_STATES = frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED})
#: States a job is in while its owner works on it: the ones a lapsed lease interrupts.
ACTIVE_JOB_STATES = frozenset({JobState.QUEUED, JobState.RUNNING, JobState.PAUSED, JobState.ASSEMBLING})

TRANSITIONS: dict[str, dict[str, frozenset[str]]] = {
    "job": {
        JobState.QUEUED: frozenset(
            {JobState.RUNNING, JobState.PAUSED, JobState.FAILED, JobState.CANCELLED, JobState.INTERRUPTED}
        ),
        JobState.RUNNING: frozenset(
            {JobState.QUEUED, JobState.PAUSED, JobState.ASSEMBLING, JobState.FAILED, JobState.CANCELLED,
             JobState.INTERRUPTED}
        ),
        # paused: nothing new is handed out; segments already running finish.
        JobState.PAUSED: frozenset(
            {JobState.QUEUED, JobState.RUNNING, JobState.FAILED, JobState.CANCELLED, JobState.INTERRUPTED}
        ),
        # assembling -> running: verification found segments to run again.
        JobState.ASSEMBLING: frozenset(
            {JobState.RUNNING, JobState.DONE, JobState.FAILED, JobState.CANCELLED, JobState.INTERRUPTED}
        ),
        # interrupted: the batch's lease lapsed. A new owner resumes it (queued when nothing
        # ran yet, else running; all segments done means assembling next), or a person
        # cancels it at once; a resume that cannot rebuild it fails it.
        JobState.INTERRUPTED: frozenset(
            {JobState.QUEUED, JobState.RUNNING, JobState.FAILED, JobState.CANCELLED}
        ),
        JobState.DONE: frozenset(),
        # failed or cancelled -> queued is a retry asked for by a person.
        JobState.FAILED: frozenset({JobState.QUEUED}),
        JobState.CANCELLED: frozenset({JobState.QUEUED}),
    },
    "segment": {
        # running -> queued is a retry (or a hand-back); the attempt keeps the reason.
        SegmentState.QUEUED: frozenset(
            {SegmentState.RUNNING, SegmentState.FAILED, SegmentState.CANCELLED}
        ),
        SegmentState.RUNNING: frozenset(
            {SegmentState.QUEUED, SegmentState.DONE, SegmentState.FAILED, SegmentState.CANCELLED}
        ),
        # done -> queued: a retry of the whole job, asked for by a person.
        SegmentState.DONE: frozenset({SegmentState.QUEUED}),
        SegmentState.FAILED: frozenset({SegmentState.QUEUED}),
        SegmentState.CANCELLED: frozenset({SegmentState.QUEUED}),
    },
    "attempt": {
        AttemptState.RUNNING: frozenset(
            {
                AttemptState.DONE,
                AttemptState.FAILED,
                AttemptState.TIMED_OUT,
                AttemptState.LOST,
                AttemptState.CANCELLED,
            }
        ),
        AttemptState.DONE: frozenset(),
        AttemptState.FAILED: frozenset(),
        AttemptState.TIMED_OUT: frozenset(),
        AttemptState.LOST: frozenset(),
        AttemptState.CANCELLED: frozenset(),
    },
}


def check_transition(kind: str, entity_id: str, old: str, new: str) -> None:
    """Raise :class:`IllegalTransition` unless ``kind`` may move from ``old`` to ``new``."""
    table = TRANSITIONS[kind]
    if old not in table:
        raise IllegalTransition(f"{kind} {entity_id}: unknown state {old!r}")
    if new not in table[old]:
        allowed = ", ".join(sorted(table[old])) or "nothing (it is final)"
        raise IllegalTransition(
            f"{kind} {entity_id}: cannot go from {old} to {new}; from {old} it may go to {allowed}"
        )


@dataclass(frozen=True)
class SegmentPlan:
    """What a processor's plan returns for one segment.

    ``frames`` is the frame list for frame-based processors (else ``None``);
    ``params`` is the processor's own JSON-serialisable description (a time range, ...);
    ``label`` is how people see it (``frames 1-10``, ``00:10-00:20``, ``audio``).
    """

    label: str
    frames: list[int] | None = None
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Job:
    """One source processed with one profile into one destination, as plugins see it."""

    id: str
    batch_id: str
    input: Path | None
    profile: Any  # farm.profiles.Profile
    settings: Any  # the processor's validated settings model
    destination: Path
    work_dir: Path  # cluster storage for this job's segment outputs
    frames: list[int] | None = None
    overwrite: bool = False
    input_stamp: tuple[int, int] | None = None  # (size, mtime_ns) of the input when accepted


@dataclass(frozen=True)
class Segment:
    """One piece of a job, handed to a node for one attempt."""

    id: str
    job: Job
    index: int
    label: str
    frames: list[int] | None
    params: dict[str, Any]
    attempt_id: str
    output_dir: Path  # where this attempt writes, inside cluster storage
    announce_start: bool = False  # tell the controller when it starts (it may wait on the node)

    @property
    def start(self) -> int | None:
        return self.frames[0] if self.frames else None

    @property
    def end(self) -> int | None:
        return self.frames[-1] if self.frames else None


@dataclass
class Submission:
    """A request for a batch, as the API (or a droplet) hands it to the controller."""
    profile: str
    inputs: list[str]
    destination: str | None = None
    overrides: list[str] | None = None
    overwrite: bool = False
    priority: str | int | None = None
    origin: str = "api"
    #: who asks; None (the controller's own droplets, tests) is not checked
    principal: Principal | None = None
