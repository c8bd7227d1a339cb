"""What the controller holds in memory for each job, segment and attempt it runs.

The store is the truth; these are its working copy, rebuilt from it after a restart.
"""

from __future__ import annotations

import json
import secrets
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from farm.engine import NodeView
from farm.model import Job, JobState, SegmentState
from farm.processor import Processor
from farm.profiles import LoadedProfile


@dataclass(slots=True)  # a million of them may be queued: no __dict__ each (about half the memory)
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
    # Segments never handed out are kept in the store, not here, until the queue nears
    # them: ``unloaded`` of them, every one from index ``tail`` on (a million queued
    # segments held as objects took 0.5 KiB each).
    tail: int = 0
    unloaded: int = 0
    # Segments handed to a node in one Dask task: more than one while the time its nodes
    # measured for its recent segments (a moving average) is much shorter than a round
    # trip (farm.scheduling.handout)
    parcel: int = 1
    seconds_each: float | None = None

    def recount(self) -> None:
        self.done = sum(1 for seg in self.segments.values() if seg.state == SegmentState.DONE)

    @property
    def total(self) -> int:
        return len(self.segments) + self.unloaded

    @property
    def has_queued(self) -> bool:
        return bool(self.queue) or self.unloaded > 0

    @property
    def all_done(self) -> bool:
        return not self.unloaded and self.done >= len(self.segments) and all(
            seg.state == SegmentState.DONE for seg in self.segments.values())

    @property
    def sort_key(self) -> tuple[int, float, int]:
        return (-self.priority, self.created, self.seq)


@dataclass(slots=True)
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
    parcel: Parcel | None = None  # the segments handed out with it in one task, if more than one


@dataclass(slots=True)
class Parcel:
    """Attempts handed to one node in one task: they run one after another in one slot,
    which they hold until the last of them leaves the node."""

    head: str = ""  # the attempt the node starts first: it never hands that one back
    held: int = 0  # attempts of it still on the node
    waiting: deque[AttemptRuntime] = field(default_factory=deque)  # in the order the node starts them


def segment_from_row(row: Any) -> SegmentRuntime:
    """A segment as the store holds it (a row of its ``segments`` table)."""
    return SegmentRuntime(row["id"], row["idx"], row["label"], json.loads(row["frames"]) if row["frames"] else None,
                          json.loads(row["params"]), state=row["state"], attempts=row["attempts"],
                          result=json.loads(row["result"]) if row["result"] else None)


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(5)}"

