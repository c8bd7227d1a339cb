"""Leases: every batch belongs to one living process.

The process that runs a batch (a controller, one ``farm run``, one ``farm watch``) holds
a lease in the store: host, pid, start, heartbeat. It beats every ``HEARTBEAT_SECONDS``
from a thread of its own (so a long plan or a busy round never starves it). A lease
*lapses* when

- it was ended (its owner stopped cleanly with jobs left, or someone found it lapsed),
- its heartbeat is older than its ``ttl`` (``LAPSE_BEATS`` missed beats), or
- its owner ran on this host and that process is gone (a ``kill -9`` is seen at once:
  the pid is checked with its start time, so a reused pid is not mistaken for it).

:func:`sweep` turns the unfinished jobs of lapsed leases into ``interrupted`` ones, in
one transaction per lease, recording their running attempts as lost. Anyone reading the
store may sweep (``farm status``, ``farm cancel``, ``farm run``, a controller); only
``interrupted`` jobs are ever taken over, so a job whose owner lives is left alone.
An owner whose lease was ended under it (it was stopped longer than the ttl) learns so
at its next beat (:attr:`Lease.lost`) and must stop acting on those jobs.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

from farm.errors import ExitStatus, FarmError, IllegalTransition
from farm.model import ACTIVE_JOB_STATES, AttemptState, JobState, SegmentState

log = logging.getLogger("farm.lease")

#: Seconds between beats; a lease lapses after ``LAPSE_BEATS`` missed beats. The
#: environment may change both (tests make them short); the ttl is stored with the lease,
#: so whoever judges it uses the owner's figure.
HEARTBEAT_SECONDS = float(os.environ.get("FARM_LEASE_HEARTBEAT", "2"))
LAPSE_BEATS = 5


class LeaseLost(FarmError):
    """This process's lease was found lapsed and ended by another; its jobs are interrupted."""

    exit_status = ExitStatus.JOB_FAILED


def process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), None when unknown or gone."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in ("Z", "X"):  # a zombie has stopped; only its parent has not reaped it
        return None
    return fields[19]


def pid_alive(pid: int, start: str | None) -> bool:
    """Whether the process that took a lease on this host still runs."""
    if os.path.isdir("/proc"):
        now = process_start(pid)
        return now is not None and (start is None or now == start)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def alive(row: Any, now: float | None = None) -> bool:
    """Whether a lease row (``farm.store`` leases) still holds."""
    if row is None or row["ended"] is not None:
        return False
    now = time.time() if now is None else now
    if now - row["heartbeat"] > row["ttl"]:
        return False
    if row["host"] == socket.gethostname():
        return pid_alive(row["pid"], row["pid_start"])
    return True


def describe(row: Any) -> str:
    """``farm run, pid 123 on host``: who holds (or held) a lease, for people."""
    if row is None:
        return "no owner"
    return f"{row['kind']}, pid {row['pid']} on {row['host']}"


class Lease:
    """A lease held by this process (``kind``: controller, farm run, farm watch, ...),
    renewed by a background thread until :meth:`release`."""

    def __init__(self, store: Any, kind: str, heartbeat: float | None = None):
        import secrets

        self.store = store
        self.kind = kind
        self.id = f"l{secrets.token_hex(5)}"
        self._beat_every = heartbeat or HEARTBEAT_SECONDS
        self.ttl = self._beat_every * LAPSE_BEATS
        self.lost = threading.Event()
        self._stop = threading.Event()
        store.add_lease(self.id, kind, socket.gethostname(), os.getpid(), process_start(os.getpid()), self.ttl)
        self._thread = threading.Thread(target=self._run, name=f"farm-lease-{self.id}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._beat_every):
            self.beat()

    def beat(self) -> bool:
        """Renew now; False (and :attr:`lost` set) when the lease was ended under us."""
        if self.lost.is_set():
            return False
        try:
            if self.store.beat_lease(self.id):
                return True
        except FarmError as exc:  # a store that cannot be written: try again at the next beat
            log.warning("cannot renew lease %s: %s", self.id, exc)
            return True
        log.error("lease %s (%s) was found lapsed by another process; its jobs are interrupted", self.id, self.kind)
        self.lost.set()
        return False

    def lost_error(self) -> LeaseLost:
        return LeaseLost(
            f"this {self.kind} (pid {os.getpid()}) lost its lease: it went {self.ttl:g} s without renewing it "
            "(stopped or starved), and another process found it lapsed; its unfinished jobs are interrupted "
            "(`farm status` shows them, `farm resume JOB` resumes them)")

    def release(self, reason: str = "stopped") -> None:
        """End the lease; the jobs it leaves unfinished become ``interrupted`` at the next sweep."""
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self.store.end_lease(self.id, reason)
        except FarmError as exc:
            log.warning("cannot end lease %s: %s (it lapses by itself)", self.id, exc)


def sweep(store: Any, spare: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """Make the unfinished jobs of every lapsed lease ``interrupted``; returns their ids.
    ``spare``: batches the caller runs itself (a scheduler without a lease, in tests)."""
    interrupted: list[str] = []
    owners: dict[str | None, list[str]] = {}
    for row in store.owners_of_active_batches():
        if row["id"] not in spare:
            owners.setdefault(row["owner"], []).append(row["id"])
    now = time.time()
    for owner, batch_ids in owners.items():
        lease = store.lease(owner)
        if alive(lease, now):
            continue
        try:
            interrupted += _interrupt(store, lease, batch_ids)
        except IllegalTransition:  # another sweeper (or the owner) moved them first
            continue
    return interrupted


def _interrupt(store: Any, lease: Any, batch_ids: list[str]) -> list[str]:
    done: list[str] = []
    why = f"its owner ({describe(lease)}) stopped before it ended" if lease is not None else \
        "it has no owner (its batch was stored before leases, or by a process that took none)"
    with store.transaction():
        if lease is not None and lease["ended"] is None:
            # compare-and-set on the beat we judged: an owner that beat meanwhile keeps its lease
            if not store.end_lease(lease["id"], "lapsed", heartbeat=lease["heartbeat"]):
                return []
        for batch_id in batch_ids:
            for job in store.jobs(batch_id):
                if job["state"] not in ACTIVE_JOB_STATES:
                    continue
                for attempt in store.running_attempts(job["id"]):
                    store.end_attempt(attempt["id"], AttemptState.LOST, reason=f"{why}; it runs again on resume")
                for seg in store.segments_in(job["id"], SegmentState.RUNNING):
                    store.move_segment(seg["id"], seg["state"], SegmentState.QUEUED)
                store.move_job(job["id"], job["state"], JobState.INTERRUPTED, error=f"interrupted: {why}")
                done.append(job["id"])
    if done:
        log.warning("%d job(s) interrupted: %s", len(done), why)
    return done


__all__ = ["Lease", "LeaseLost", "alive", "describe", "sweep", "HEARTBEAT_SECONDS", "LAPSE_BEATS"]
