"""The droplets of one process, bound to its scheduler: exactly once, and nothing lost.

How a dropped file travels (in a folder this process holds: each droplet takes the lock
file in its folder, :mod:`farm.droplets.lock`, before it watches; a droplet refused it
reports ``refused`` naming the holder, and takes the folder once that one has gone):

1. **Settle.** :class:`~farm.droplets.watch.FolderWatch` reports a file once its size
   and mtime held for ``settle`` seconds over several readings and it can be read.
2. **Know it?** The ledger (``droplet_files`` in the store) is asked about this very
   file (path, size, mtime), then about its content (a hash of its size and its first
   and last MiB). Content already submitted is a duplicate: recorded as ``skipped``,
   never submitted again, whatever its name or mtime (``touch``, a rename, a copy).
3. **Submit.** In the scheduler's thread, the batch and a ``submitted`` ledger row per
   file are written in one transaction: a crash leaves both or neither.
4. **Finish.** When the job ends (the store says so), the file is left, moved to
   ``done/`` or deleted (``after``) and its row becomes ``processed``; a failed or
   cancelled job's file goes to ``failed/`` beside ``NAME.error.txt`` saying why.
5. **Restart.** At start, rows still ``submitted`` are matched with their jobs: ended
   ones are finished, jobs the scheduler resumed are waited for, and the rest are
   resumed (``Scheduler.recover(job_ids=...)``) or, where the scheduler cannot resume
   them, failed with a reason. None is submitted a second time.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from farm.droplets.config import DropletConfig, check_droplets, lock_name
from farm.droplets.lock import FolderLock
from farm.droplets.watch import FolderWatch, Settled, fingerprint
from farm.errors import FarmError, UsageError

log = logging.getLogger("farm.droplets")

TERMINAL = ("done", "failed", "cancelled")
REPORT_SECONDS = 2.0
#: How a running droplet's report goes stale for ``farm droplets``.
STALE_SECONDS = 10.0


@dataclass
class PreparedDroplet:
    """A droplet checked at configuration time: its profile loaded, its destination writable."""

    config: DropletConfig
    loaded: Any  # LoadedProfile
    destination: Path
    lock: FolderLock | None = None  # the folder's lock when taken already (farm watch); else taken at start


def prepare_droplets(configs: list[DropletConfig], plugins: Any, *, require_folders: bool = False) -> list[PreparedDroplet]:
    """Check droplets before anything watches; every problem is a :class:`UsageError` naming the droplet."""
    from pydantic_core import PydanticCustomError

    from farm.local import check_destination
    from farm.profiles import load_profile

    enabled = [config for config in configs if config.enabled]
    try:
        check_droplets(enabled)
    except PydanticCustomError as exc:
        raise UsageError(exc.message()) from None
    prepared = []
    for config in enabled:
        where = f"droplet {config.label}"
        try:
            loaded = load_profile(config.profile, plugins, config.overrides)
        except FarmError as exc:
            raise UsageError(f"{where}: {exc}") from None
        processor = plugins.processor(loaded.profile.processor)
        if processor.input_mode(loaded.settings) == "none":
            raise UsageError(
                f"{where}: profile {loaded.profile.name!r} takes no input file (processor {processor.name}); a droplet "
                "needs a profile that takes one, e.g. a command with {input}")
        if require_folders and not config.folder.is_dir():
            what = "is not a folder" if config.folder.exists() else "does not exist"
            raise UsageError(f"{where}: watched folder {config.folder} {what}")
        try:
            destination = check_destination(config.destination)
        except UsageError as exc:
            raise UsageError(f"{where}: {exc}") from None
        prepared.append(PreparedDroplet(config, loaded, destination))
    return prepared


@dataclass
class Droplet:
    """A running droplet."""

    config: DropletConfig
    loaded: Any
    destination: Path
    watch: FolderWatch
    known: dict[str, tuple[int, int]] = field(default_factory=dict)  # path -> (size, mtime_ns) already decided
    #: The processor's grouping of dropped files (Processor.input_group): an image sequence is one job.
    group: Callable[[Path], tuple[str, int] | None] = lambda path: None
    #: Settled files of a group that is still arriving: group -> path -> (place, file).
    waiting: dict[str, dict[str, tuple[int, Settled]]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=lambda: {"queued": 0, "processed": 0, "failed": 0, "skipped": 0})
    reported: tuple[str, str] | None = None
    reported_at: float = 0.0

    @property
    def key(self) -> str:
        return self.config.key

    @property
    def label(self) -> str:
        return self.config.label


@dataclass
class Pending:
    row_id: int
    droplet: Droplet
    path: str
    size: int
    mtime_ns: int
    job_id: str
    queued: float
    members: list[str] = field(default_factory=list)  # the other files of its group (an image sequence's frames)


#: ``on_event(kind, droplet, path, job_id, detail)``; kinds: queued, processed, failed, skipped.
EventCallback = Callable[[str, str, str, "str | None", str], None]


class DropletService:
    """Runs droplets in a thread of their own next to a scheduler driven by someone else.

    ``start()`` is called from the thread that drives the scheduler, before it steps
    (it settles files left from the last run); afterwards that thread keeps calling
    ``scheduler.step()`` (and :meth:`pump`, which runs submissions when the scheduler
    has no ``call``). ``once``: take only the files present at start, then be idle.
    """

    def __init__(self, scheduler: Any, droplets: list[PreparedDroplet], *, on_event: EventCallback | None = None,
                 once: bool = False, mounts: str | None = None):
        self.scheduler = scheduler
        self.once = once
        self.on_event = on_event
        self._wake = threading.Event()
        state = Path(scheduler.store.path).parent  # named in the folder's lock, for the message that refuses others
        plugins = getattr(scheduler, "plugins", None)
        self.droplets = [
            Droplet(p.config, p.loaded, p.destination, FolderWatch(
                p.config, self._wake, mounts, observe=not once,
                lock=p.lock or FolderLock(p.config.folder, state, p.config.label)),
                **({"group": plugins.processor(p.loaded.profile.processor).input_group} if plugins else {}))
            for p in droplets
        ]
        self.pending: dict[str, Pending] = {}
        self._stop = threading.Event()
        self._intake = True
        self._thread: threading.Thread | None = None
        self._calls: list[tuple[Callable[[], Any], Future[Any]]] = []
        self._calls_lock = threading.Lock()
        self._locks: list[Any] = []
        self._refused: dict[str, str] = {}  # droplet key -> why its ledger is another process's now
        self._cancel_reason: str | None = None
        self._busy = False
        self._store: Any = None
        self.tick = min((d.watch.interval for d in self.droplets), default=0.1)
        self.errors: list[str] = []

    # -- life --------------------------------------------------------------------------

    def start(self) -> None:
        from farm.store import Store

        self._lock_folders()
        self._store = Store(self.scheduler.store.path)
        for droplet in self.droplets:
            if droplet.key not in self._refused:
                self._restore(droplet)
        for droplet in self.droplets:
            if droplet.key in self._refused:
                droplet.watch.refuse(self._refused[droplet.key])
            else:
                droplet.watch.start()
            self._report(droplet, force=True)
        self.scheduler.listeners.append(self._on_scheduler_event)
        self._thread = threading.Thread(target=self._run, name="farm-droplets", daemon=True)
        self._thread.start()

    def stop_intake(self) -> None:
        """Take no new files; jobs in flight still finish and their files are still moved."""
        self._intake = False
        self._wake.set()

    def cancel_pending(self, reason: str) -> None:
        """Cancel every job in flight; their files go to ``failed/`` with ``reason``."""
        self._cancel_reason = reason
        for job_id in list(self.pending):
            self.scheduler.cancel(job_id)

    def close(self) -> None:
        self._intake = False
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        try:
            self.scheduler.listeners.remove(self._on_scheduler_event)
        except ValueError:
            pass
        for droplet in self.droplets:
            droplet.watch.stop()
            if self._store is not None:
                self._report(droplet, force=True)
        if self._store is not None:
            self._store.close()
        self._unlock_folders()

    def __enter__(self) -> DropletService:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def pump(self) -> None:
        """Run submissions queued for the scheduler's thread (when the scheduler has no ``call``)."""
        with self._calls_lock:
            calls, self._calls = self._calls, []
        for fn, future in calls:
            try:
                with self.scheduler.store.transaction():
                    future.set_result(fn())
            except BaseException as exc:  # handed back to the droplet thread, whose request it was
                future.set_exception(exc)

    @property
    def idle(self) -> bool:
        """Nothing settling, nothing in flight (with ``once``: all the files found at start are handled)."""
        return not self._busy and not self.pending and all(d.watch.settling == 0 and not d.waiting
                                                           for d in self.droplets)

    # -- the droplet thread ------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.tick)
            self._wake.clear()
            try:
                self._round()
            except Exception as exc:  # one bad round must not end the droplets
                log.exception("droplets: %s", exc)
                self.errors.append(f"{type(exc).__name__}: {exc}")
                time.sleep(self.tick)
            time.sleep(0.005)  # a burst of events is read in one round, not one by one

    def _round(self) -> None:
        now = time.time()
        self._busy = True
        try:
            if not self._intake:
                for droplet in self.droplets:
                    droplet.watch.keep_lock()
            else:
                for droplet in self.droplets:
                    settled = droplet.watch.poll(now)
                    if settled:
                        try:
                            self._take(droplet, settled)
                        except Exception:
                            for item in settled:  # looked at again in the next rounds, not forgotten
                                if droplet.known.get(item.path) != (item.size, item.mtime_ns):
                                    droplet.watch.note(item.path)
                            raise
                    self._report(droplet)
            self._finish()
        finally:
            self._busy = False

    def _on_scheduler_event(self, kind: str, rt: Any, data: dict[str, Any]) -> None:
        if kind in ("job_done", "job_failed", "job_cancelled") and rt.job.id in self.pending:
            self._wake.set()

    # -- taking files ------------------------------------------------------------------

    def _grouped(self, droplet: Droplet, settled: list[Settled]) -> tuple[list[Settled], dict[str, list[Settled]]]:
        """The files to take on their own, and each group's first file with the others of
        its group; a group is taken once none of its files is still settling."""
        alone: list[Settled] = []
        for item in settled:
            group = None if item.folder_link else droplet.group(Path(item.path))
            if group is None:
                alone.append(item)
            else:
                droplet.waiting.setdefault(group[0], {})[item.path] = (group[1], item)
        arriving = {found[0] for path in droplet.watch.readings if (found := droplet.group(Path(path)))}
        members: dict[str, list[Settled]] = {}
        for name in [name for name in droplet.waiting if name not in arriving]:
            files = [item for _, item in sorted(droplet.waiting.pop(name).values(), key=lambda pair: pair[0])]
            alone.append(files[0])
            members[files[0].path] = files[1:]
            for item in files[1:]:
                droplet.known[item.path] = (item.size, item.mtime_ns)
        return alone, members

    def _take(self, droplet: Droplet, settled: list[Settled]) -> None:
        settled, members = self._grouped(droplet, settled)
        fresh: list[tuple[Settled, str]] = []
        batch_digests: dict[str, str] = {}
        for item in settled:
            if droplet.known.get(item.path) == (item.size, item.mtime_ns):
                continue
            row = self._store.droplet_seen(droplet.key, item.path, item.size, item.mtime_ns)
            if row is not None and (row["state"] in ("submitted", "processed", "skipped")
                                    or (row["state"] == "failed" and not row["moved_to"])):
                droplet.known[item.path] = (item.size, item.mtime_ns)
                continue
            if self._refuse_link(droplet, item):
                continue
            try:
                digest = fingerprint(item.path, item.size)  # a group's: its first file, and how many go with it
                if members.get(item.path):
                    digest = hashlib.sha256(f"{digest}+{len(members[item.path])}".encode()).hexdigest()
                after = os.stat(item.path)
            except OSError as exc:
                log.debug("droplet %s: %s is not readable yet: %s", droplet.label, item.path, exc)
                droplet.watch.note(item.path)
                continue
            if (after.st_size, after.st_mtime_ns) != (item.size, item.mtime_ns):
                droplet.watch.note(item.path)  # written to while it was read: settle again
                continue
            prior = self._store.droplet_taken(droplet.key, digest)
            if prior is not None:
                self._skip(droplet, item, digest, f"same content as {prior['path']} (job {prior['job_id']})")
            elif digest in batch_digests:
                self._skip(droplet, item, digest, f"same content as {batch_digests[digest]}, dropped with it")
            else:
                batch_digests[digest] = item.path
                fresh.append((item, digest))
        if fresh:
            self._submit(droplet, fresh, members)

    def _refuse_link(self, droplet: Droplet, item: Settled) -> bool:
        """A symbolic link that leads out of the watched folder is never read: whoever may
        drop files here must not make the farm read (and deliver) files elsewhere. It goes
        to ``failed/`` with the reason; a link to a folder stays where it is, noted once."""
        target = Path(os.path.realpath(item.path))
        name = Path(item.path).name
        if item.folder_link:
            self._note(droplet, item, "skipped", f"{name} is a link to the folder {target}; a droplet never follows "
                                                 "links to folders")
            return True
        if target.is_relative_to(Path(os.path.realpath(droplet.config.folder))):
            return False
        where = f"outside the watched folder {droplet.config.folder}; it was not read"
        if os.path.islink(item.path):  # the link itself goes to failed/, never what it points at
            self._fail_unsubmitted(droplet, item, "", f"{name} is a symbolic link to {target}, {where}")
        else:  # reached through a linked folder: moving it would move a file that is not ours
            self._note(droplet, item, "failed", f"{name} is reached through a symbolic link: it is {target}, {where}")
        return True

    def _note(self, droplet: Droplet, item: Settled, state: str, reason: str) -> None:
        """A ledger row for a file that is neither submitted nor moved."""
        self._store.droplet_add(droplet.key, item.path, item.size, item.mtime_ns, "", state, reason=reason)
        droplet.known[item.path] = (item.size, item.mtime_ns)
        droplet.counts[state] += 1
        log.warning("droplet %s: %s", droplet.label, reason)
        self._emit(state, droplet, item.path, None, reason)

    def _skip(self, droplet: Droplet, item: Settled, digest: str, reason: str) -> None:
        moved = None
        if droplet.config.after == "move":  # a copy of what is done joins it; nothing is deleted
            moved = self._move_to(droplet, item.path, droplet.config.done_folder)
        self._store.droplet_add(droplet.key, item.path, item.size, item.mtime_ns, digest, "skipped",
                                reason=reason, moved_to=moved)
        droplet.known[item.path] = (item.size, item.mtime_ns)
        droplet.counts["skipped"] += 1
        log.info("droplet %s: %s skipped: %s", droplet.label, item.path, reason)
        self._emit("skipped", droplet, item.path, None, reason)

    def _submit(self, droplet: Droplet, fresh: list[tuple[Settled, str]],
                members: dict[str, list[Settled]] | None = None) -> None:
        members = members or {}
        ledger = self.scheduler.store
        inputs = [Path(item.path) for item, _ in fresh]
        abandoned = threading.Event()

        def submit() -> tuple[list[str], list[int]]:
            if abandoned.is_set():
                raise FarmError("the droplet stopped before the submission ran")
            _, job_ids = self.scheduler.submit(droplet.loaded, inputs, droplet.destination,
                                               origin=f"droplet:{droplet.label}")
            rows = [ledger.droplet_add(droplet.key, item.path, item.size, item.mtime_ns, digest, "submitted",
                                       job_id=job_id)
                    for (item, digest), job_id in zip(fresh, job_ids, strict=True)]
            for (item, _), job_id in zip(fresh, job_ids, strict=True):
                for member in members.get(item.path, []):  # known from now on, never a job of their own
                    ledger.droplet_add(droplet.key, member.path, member.size, member.mtime_ns, "", "skipped",
                                       job_id=job_id, reason=f"goes with {Path(item.path).name} (one job)")
            return job_ids, rows

        try:
            job_ids, rows = self._in_scheduler(submit, abandoned)
        except _Stopped:
            return
        except Exception as exc:
            reason = str(exc) if isinstance(exc, FarmError) else f"internal error: {type(exc).__name__}: {exc}"
            if not isinstance(exc, FarmError):
                log.exception("droplet %s: submitting %d file(s) failed", droplet.label, len(fresh))
            for item, digest in fresh:
                self._fail_unsubmitted(droplet, item, digest, f"could not be submitted: {reason}")
            return
        now = time.time()
        for (item, _), job_id, row_id in zip(fresh, job_ids, rows, strict=True):
            self.pending[job_id] = Pending(row_id, droplet, item.path, item.size, item.mtime_ns, job_id, now,
                                           [member.path for member in members.get(item.path, [])])
            droplet.known[item.path] = (item.size, item.mtime_ns)
            droplet.counts["queued"] += 1
            self._emit("queued", droplet, item.path, job_id, "")
        self._wake.set()

    def _in_scheduler(self, fn: Callable[[], Any], abandoned: threading.Event) -> Any:
        call = getattr(self.scheduler, "call", None)
        if call is not None:
            future = call(fn)
        else:
            future = Future()
            with self._calls_lock:
                self._calls.append((fn, future))
        while True:
            try:
                return future.result(timeout=0.5)
            except FutureTimeout:
                if self._stop.is_set():
                    abandoned.set()
                    raise _Stopped() from None

    def _fail_unsubmitted(self, droplet: Droplet, item: Settled, digest: str, reason: str) -> None:
        moved = self._to_failed(droplet, item.path, item.size, item.mtime_ns, reason, None)
        self._store.droplet_add(droplet.key, item.path, item.size, item.mtime_ns, digest, "failed",
                                reason=reason, moved_to=moved)
        droplet.known[item.path] = (item.size, item.mtime_ns)
        droplet.counts["failed"] += 1
        self._emit("failed", droplet, item.path, None, reason)

    # -- finishing ---------------------------------------------------------------------

    def _finish(self) -> None:
        if not self.pending:
            return
        states = self._store.droplet_job_states(list(self.pending))
        for job_id, row in states.items():
            if row["state"] in TERMINAL:
                pending = self.pending.pop(job_id, None)
                if pending is not None:
                    self._finalize(pending, row["state"], row["error"])

    def _finalize(self, pending: Pending, state: str, error: str | None) -> None:
        droplet = pending.droplet
        if state == "done":
            moved = self._after_done(pending)
            self._store.droplet_finish(pending.row_id, "processed", moved_to=moved)
            droplet.counts["processed"] += 1
            self._emit("processed", droplet, pending.path, pending.job_id, moved or "")
            return
        if state == "cancelled":
            reason = f"the job was cancelled ({self._cancel_reason or 'by request'})"
        else:
            reason = error or "the job failed without a reason"
        moved = self._to_failed(droplet, pending.path, pending.size, pending.mtime_ns, reason, pending.job_id)
        if moved is not None:
            for path in pending.members:  # the rest of its group goes with it, so it can be dropped again
                self._move_to(droplet, path, droplet.config.failed_folder)
        self._store.droplet_finish(pending.row_id, "failed", reason=reason, moved_to=moved)
        droplet.counts["failed"] += 1
        self._emit("failed", droplet, pending.path, pending.job_id, reason)

    def _after_done(self, pending: Pending) -> str | None:
        droplet = pending.droplet
        after = droplet.config.after
        if after == "leave":
            return None
        if not _same_file(pending.path, pending.size, pending.mtime_ns):
            log.info("droplet %s: %s changed or went away while its job ran; left as it is",
                     droplet.label, pending.path)
            return None
        droplet.known.pop(pending.path, None)
        if after == "delete":
            for path in (*pending.members, pending.path):
                try:
                    os.remove(path)
                except OSError as exc:
                    log.warning("droplet %s: cannot delete %s: %s", droplet.label, path, exc.strerror or exc)
                    if path == pending.path:
                        return None
            return "(deleted)"
        for path in pending.members:  # the rest of its group goes with it
            self._move_to(droplet, path, droplet.config.done_folder)
        return self._move_to(droplet, pending.path, droplet.config.done_folder)

    def _move_to(self, droplet: Droplet, path: str, folder: Path) -> str | None:
        target = _unique(folder / _relative(droplet, path))
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(path, target)
        except OSError as exc:
            log.warning("droplet %s: cannot move %s to %s: %s", droplet.label, path, folder, exc.strerror or exc)
            return None
        droplet.known.pop(path, None)
        return str(target)

    def _to_failed(self, droplet: Droplet, path: str, size: int, mtime_ns: int, reason: str,
                   job_id: str | None) -> str | None:
        """Move a file to ``failed/`` and write ``NAME.error.txt`` beside it; returns where it went."""
        folder = droplet.config.failed_folder
        target = _unique(folder / _relative(droplet, path), also=".error.txt")
        present = _same_file(path, size, mtime_ns)
        lines = [
            f"{Path(path).name} was not processed.",
            "",
            f"reason: {reason}",
            f"job: {job_id or '(none)'}",
            f"profile: {droplet.loaded.profile.name}",
            f"droplet: {droplet.label}" + (f" ({droplet.config.folder})" if droplet.config.name else ""),
            f"when: {datetime.now().astimezone().isoformat(timespec='seconds')}",
            "",
            "To try again, fix the cause and drop the file into the watched folder again." if present else
            f"The file was not moved here: it changed or went away from {path} while its job ran.",
        ]
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            note = target.with_name(target.name + ".error.txt")
            temporary = note.with_name(f".{note.name}.tmp")
            temporary.write_text("\n".join(lines) + "\n", encoding="utf-8")
            os.replace(temporary, note)
        except OSError as exc:
            log.warning("droplet %s: cannot write the reason for %s into %s: %s", droplet.label, path, folder,
                        exc.strerror or exc)
        log.info("droplet %s: %s failed: %s", droplet.label, path, reason)
        if not present:
            return None
        return self._move_to(droplet, path, folder)

    # -- restart -----------------------------------------------------------------------

    def _restore(self, droplet: Droplet) -> None:
        """Match rows left ``submitted`` by the last run with their jobs (runs in the scheduler's thread)."""
        rows = self._store.droplet_pending(droplet.key)
        if not rows:
            return
        jobs = self.scheduler.store.droplet_job_states([row["job_id"] for row in rows])
        orphans = [row["job_id"] for row in rows if row["job_id"] in jobs
                   and jobs[row["job_id"]]["state"] not in TERMINAL and row["job_id"] not in self.scheduler.jobs]
        resumed = self._resume(orphans)
        for job_id in orphans:
            now = self.scheduler.store.job(job_id)["state"]  # a failed resume may have ended it already
            if job_id not in resumed and now not in TERMINAL and not self._owned_elsewhere(job_id):
                self.scheduler.store.move_job(
                    job_id, now, "failed",
                    error="the process running it stopped before it finished, and this scheduler cannot resume "
                          "it; drop the file again to run it again")
        for row in rows:
            pending = Pending(row["id"], droplet, row["path"], row["size"], row["mtime_ns"], row["job_id"], row["created"])
            droplet.known[row["path"]] = (row["size"], row["mtime_ns"])
            if row["job_id"] not in jobs:
                self._finalize(pending, "failed", f"its job {row['job_id']} is not in the store any more")
            else:
                self.pending[row["job_id"]] = pending
        log.info("droplet %s: %d file(s) from the last run: %d resumed, %d waited for", droplet.label, len(rows),
                 len(resumed), len(rows) - len(orphans))

    def _owned_elsewhere(self, job_id: str) -> bool:
        """A living process owns this job's batch (a controller took it over): wait for it."""
        from farm.lease import alive

        store = self.scheduler.store
        job = store.job(job_id)
        batch = store.batch(job["batch_id"]) if job is not None else None
        return batch is not None and job["state"] not in TERMINAL and job["state"] != "interrupted" \
            and alive(store.lease(batch["owner"]))

    def _resume(self, job_ids: list[str]) -> set[str]:
        if not job_ids:
            return set()
        return set(self.scheduler.recover(job_ids=job_ids)) & set(job_ids)

    # -- one process per folder ----------------------------------------------------------

    def _lock_folders(self) -> None:
        """Lock each droplet's ledger in the state directory (besides the lock in the folder
        itself, which a missing folder cannot hold): a droplet whose ledger another process
        holds is refused, and the others run."""
        try:
            import fcntl
        except ImportError:  # not on Windows: one process per folder is then up to the user
            return
        folder = Path(self.scheduler.store.path).parent / "droplets"
        folder.mkdir(parents=True, exist_ok=True)
        for droplet in self.droplets:
            path = folder / lock_name(droplet.key)
            handle = open(path, "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.seek(0)
                owner = handle.read().strip() or "another process"
                handle.close()
                self._refused[droplet.key] = (
                    f"{droplet.config.folder} is already watched by {owner} with this state directory; this droplet "
                    "stays off until this process is started again after that one has stopped")
                log.warning("droplet %s: %s", droplet.label, self._refused[droplet.key])
                continue
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            handle.flush()
            self._locks.append(handle)

    def _unlock_folders(self) -> None:
        for handle in self._locks:
            handle.close()
        self._locks = []

    # -- telling -----------------------------------------------------------------------

    def _report(self, droplet: Droplet, force: bool = False) -> None:
        state = droplet.watch.state
        if not self._intake and state == "watching":
            state = "draining"
        current = (state, droplet.watch.message)
        now = time.monotonic()
        if not force and current == droplet.reported and now - droplet.reported_at < REPORT_SECONDS:
            return
        droplet.reported, droplet.reported_at = current, now
        info = {
            **droplet.watch.describe(),
            "profile": droplet.loaded.profile.name, "destination": str(droplet.destination),
            "settle": droplet.config.settle, "after": droplet.config.after,
            "pending": sum(1 for p in self.pending.values() if p.droplet is droplet), **droplet.counts,
        }
        try:
            self._store.droplet_report(droplet.key, droplet.label, state, droplet.watch.message, info,
                                       os.getpid(), socket.gethostname())
        except FarmError as exc:
            log.warning("droplets: cannot record the state of %s: %s", droplet.label, exc)

    def _emit(self, kind: str, droplet: Droplet, path: str, job_id: str | None, detail: str) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event(kind, droplet.label, path, job_id, detail)
        except Exception:
            log.exception("droplet event listener failed on %s", kind)


def start_droplets(scheduler: Any, configs: list[DropletConfig], plugins: Any,
                   on_event: EventCallback | None = None) -> DropletService | None:
    """For a controller: check and start the droplets of farm.yaml; None when there are none.

    Call it after ``scheduler.recover()`` (so the jobs of files taken before a restart
    are waited for, not failed), from the thread that drives the scheduler, before that
    thread steps again; call ``close()`` on the result before the scheduler closes. A bad
    droplet is a :class:`UsageError` (the controller refuses to start); a folder that is
    missing is an outage the droplet reports and waits out; a folder that another
    process watches refuses only its droplet, which reports why (``refused``) and takes
    the folder over once that process has stopped.
    """
    prepared = prepare_droplets(configs, plugins)
    if not prepared:
        return None
    service = DropletService(scheduler, prepared, on_event=on_event or _log_event)
    service.start()
    return service


def _log_event(kind: str, name: str, path: str, job_id: str | None, detail: str) -> None:
    level = logging.WARNING if kind == "failed" else logging.INFO
    log.log(level, "droplet %s: %s %s%s%s", name, kind, path, f" (job {job_id})" if job_id else "",
            f": {detail}" if detail else "")


class _Stopped(Exception):
    """The service stopped while a submission waited for the scheduler."""


def _same_file(path: str, size: int, mtime_ns: int) -> bool:
    try:
        info = os.stat(path)
    except OSError:
        return False
    return (info.st_size, info.st_mtime_ns) == (size, mtime_ns)


def _relative(droplet: Droplet, path: str) -> Path:
    try:
        return Path(path).relative_to(droplet.config.folder)
    except ValueError:
        return Path(Path(path).name)


def _unique(target: Path, also: str = "") -> Path:
    """``target``, or ``NAME (2).EXT``... when it (or its ``also`` companion) exists."""
    candidate, number = target, 1
    while candidate.exists() or (also and candidate.with_name(candidate.name + also).exists()):
        number += 1
        candidate = target.with_name(f"{target.stem} ({number}){target.suffix}")
    return candidate


__all__ = ["DropletService", "PreparedDroplet", "prepare_droplets", "start_droplets"]
