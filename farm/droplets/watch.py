"""One watched folder: its observer, settle detection, scans, and outages.

The observer (watchdog's native one, or polling for network shares) only says which
paths may have changed; :class:`FolderWatch` decides when a file is complete. A file
is *settled* when its size and mtime stayed the same over several readings spanning
``settle`` seconds and it can be opened for reading. Events are hints: a scan at
start (and now and then) finds what no event reported, and a folder that goes away
is an outage to wait out, never a sign that its files were deleted. A folder is
watched only while this process holds its lock (:mod:`farm.droplets.lock`): refused
while another watcher holds it, and taken over once that one is gone.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import queue
import stat as stat_module
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from farm.droplets.config import DropletConfig, is_partial_name, real
from farm.droplets.lock import LOCK_NAME, FolderLock

log = logging.getLogger("farm.droplets")

MIB = 1024 * 1024
#: A file is settled only after at least this many readings with the same size and mtime.
MIN_READINGS = 3
#: Seconds between checks that the folder is still there.
HEALTH_SECONDS = 1.0

#: File system types where inotify/FSEvents miss changes made by other machines.
NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb", "smb2", "smb3", "smbfs", "sshfs", "9p", "afs", "ceph", "glusterfs",
    "lustre", "davfs", "ncpfs", "coda", "gpfs", "beegfs", "orangefs", "virtiofs",
})


def _unescape_mount(field: str) -> str:
    """/proc/mounts writes a space as \\040, a tab as \\011, a backslash as \\134."""
    return field.encode().decode("unicode_escape") if "\\" in field else field


def filesystem_type(path: str | os.PathLike[str], mounts: str | None = None) -> str | None:
    """The file system type of the mount holding ``path`` (Linux), or None when unknown."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return None
    target = os.path.realpath(path)
    best, best_type = "", None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point, fstype = _unescape_mount(fields[1]), fields[2]
        if (target == point or target.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, best_type = point, fstype
    return best_type


def is_network_filesystem(fstype: str | None) -> bool:
    if not fstype:
        return False
    fstype = fstype.lower()
    if fstype == "fuseblk":  # a local block device through FUSE (ntfs-3g, exfat)
        return False
    return fstype in NETWORK_FILESYSTEMS or fstype.startswith("fuse") or fstype.split(".")[-1] in NETWORK_FILESYSTEMS


def choose_observer(config: DropletConfig, mounts: str | None = None) -> tuple[str, str]:
    """``("native" | "polling", why)`` for a droplet."""
    if config.observer != "auto":
        return config.observer, "asked for"
    fstype = filesystem_type(config.folder, mounts)
    if is_network_filesystem(fstype):
        return "polling", f"{fstype} is a network file system"
    return "native", f"{fstype or 'local'} file system"


def fingerprint(path: str | os.PathLike[str], size: int) -> str:
    """A hash of the size and the first and last MiB: what makes two drops the same file."""
    digest = hashlib.sha256(f"{size}:".encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(MIB))
        if size > MIB:
            handle.seek(max(MIB, size - MIB))
            digest.update(handle.read(MIB))
    return digest.hexdigest()


@dataclass
class Reading:
    size: int
    mtime_ns: int
    since: float  # wall-clock time from which this size and mtime have held
    readings: int = 1
    last: float = 0.0  # wall-clock time of the last reading


@dataclass
class Settled:
    path: str
    size: int
    mtime_ns: int
    folder_link: bool = False  # a symbolic link to a folder (its own size and mtime): never followed


class _QuietStop(logging.Filter):
    """watchdog logs an error when an inotify emitter is stopped while it reads: harmless, so dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "called when the thread is inactive" not in str(record.msg)


_quiet_stop = _QuietStop()


class _Handler:
    """Turns watchdog events into paths to look at; runs on the observer's thread."""

    def __init__(self, inbox: queue.SimpleQueue[tuple[str, str]], wake: Any):
        self.inbox = inbox
        self.wake = wake

    def dispatch(self, event: Any) -> None:
        kind = event.event_type
        if kind in ("opened", "closed_no_write"):
            return
        if event.is_directory:
            if kind in ("created", "moved"):
                self.inbox.put(("scan", os.fsdecode(event.dest_path or event.src_path)))
            elif kind == "deleted":
                self.inbox.put(("gone", os.fsdecode(event.src_path)))
            else:
                return
        elif kind == "moved":
            self.inbox.put(("drop", os.fsdecode(event.src_path)))
            if event.dest_path:
                self.inbox.put(("file", os.fsdecode(event.dest_path)))
        elif kind == "deleted":
            self.inbox.put(("drop", os.fsdecode(event.src_path)))
        else:
            self.inbox.put(("file", os.fsdecode(event.src_path)))
        self.wake.set()


class FolderWatch:
    """Watches one folder and hands out the files that have settled.

    Not thread-safe: one thread calls :meth:`start`, :meth:`poll` and :meth:`stop`;
    the observer's thread only fills the inbox.
    """

    def __init__(self, config: DropletConfig, wake: Any, mounts: str | None = None, observe: bool = True,
                 lock: FolderLock | None = None):
        """``observe=False``: no observer and no rescans; only the files found at start.
        ``lock``: the folder's lock, taken (and kept) before the folder is watched."""
        self.config = config
        self.lock = lock
        self.observe = observe
        self.folder = config.folder
        self.wake = wake
        self.kind, self.kind_reason = choose_observer(config, mounts)
        self.state = "starting"
        self.message = ""
        self.inbox: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
        self.readings: dict[str, Reading] = {}
        self.observer: Any = None
        self._identity: tuple[int, int] | None = None
        self._health_checked = 0.0
        self._scanned = 0.0
        self.outages = 0
        self.refused_for_good = False
        skip = [config.done_folder, config.failed_folder]
        self._skip = [real(p) for p in skip]
        self._real_folder = real(self.folder)
        self.settle = float(config.settle)
        #: Seconds between two readings of a settling file.
        self.interval = min(0.1, max(0.02, self.settle / 10))

    # -- the observer ------------------------------------------------------------------

    def start(self) -> None:
        self._check_health(force=True)

    def stop(self) -> None:
        self._stop_observer()
        self.readings.clear()
        if self.lock is not None:
            self.lock.release()
        self.state = "stopped"

    def refuse(self, reason: str) -> None:
        """Never watch in this process (another one holds this droplet's ledger)."""
        self._stop_observer()
        self.readings.clear()
        if self.lock is not None:
            self.lock.release()
        self.lock = None
        self.refused_for_good = True
        self.state, self.message = "refused", reason

    def keep_lock(self) -> None:
        """Touch the lock while no longer polling (draining), so that it does not look stale."""
        if self.lock is not None and self.lock.held:
            self.lock.ensure()

    def _start_observer(self) -> None:
        from watchdog.events import (
            DirCreatedEvent, DirDeletedEvent, DirMovedEvent, FileClosedEvent, FileCreatedEvent, FileDeletedEvent,
            FileModifiedEvent, FileMovedEvent,
        )

        if self.kind == "polling":
            from watchdog.observers.polling import PollingObserverVFS

            # lstat: a link is polled as a link, so the observer never walks the tree a
            # link to a folder leads to (outside the folder, or round a loop for ever)
            observer: Any = PollingObserverVFS(stat=os.lstat, listdir=os.scandir,
                                               polling_interval=float(self.config.poll_interval))
        else:
            from watchdog.observers import Observer

            inotify_log = logging.getLogger("watchdog.observers.inotify")
            if _quiet_stop not in inotify_log.filters:
                inotify_log.addFilter(_quiet_stop)
            observer = Observer()
        observer.daemon = True
        observer.schedule(
            _Handler(self.inbox, self.wake), str(self.folder), recursive=self.config.recursive,
            event_filter=[FileCreatedEvent, FileModifiedEvent, FileMovedEvent, FileClosedEvent, FileDeletedEvent,
                          DirCreatedEvent, DirMovedEvent, DirDeletedEvent],
        )
        observer.start()
        self.observer = observer

    def _stop_observer(self) -> None:
        observer, self.observer = self.observer, None
        if observer is not None:
            try:
                observer.stop()
                observer.join(timeout=5)
            except Exception as exc:  # an observer whose folder vanished may complain on the way out
                log.debug("stopping the observer of %s: %s", self.folder, exc)

    def _observer_alive(self) -> bool:
        if self.observer is None or not self.observer.is_alive():
            return False
        emitters = getattr(self.observer, "emitters", None)
        return all(emitter.is_alive() for emitter in emitters) if emitters else True

    def _check_health(self, force: bool = False) -> None:
        """Start, keep or restart the observer as the folder comes and goes."""
        now = time.monotonic()
        if self.refused_for_good or (not force and now - self._health_checked < HEALTH_SECONDS):
            return
        self._health_checked = now
        problem = None
        try:
            info = os.stat(self.folder)
            if not stat_module.S_ISDIR(info.st_mode):
                problem = f"{self.folder} is not a folder any more"
            else:
                with os.scandir(self.folder) as entries:
                    next(entries, None)
        except FileNotFoundError:
            problem = f"folder {self.folder} is missing"
        except OSError as exc:
            problem = f"folder {self.folder} cannot be read: {exc.strerror or exc}"
        if problem:
            if self.state != "unavailable":
                self.outages += 1
                log.warning("droplet %s: %s; its files are kept, and it retries every %g s",
                            self.config.label, problem, HEALTH_SECONDS)
            self.state, self.message = "unavailable", problem
            self._stop_observer()
            self.readings.clear()
            self._identity = None
            if self.lock is not None:  # taken again in the folder that comes back
                self.lock.release()
            return
        refusal = self.lock.ensure() if self.lock is not None else None
        if refusal is not None:
            if (self.state, self.message) != ("refused", refusal):
                log.warning("droplet %s: %s; this droplet takes the folder over once that watcher has stopped",
                            self.config.label, refusal)
            self.state, self.message = "refused", refusal
            self._stop_observer()
            self.readings.clear()
            self._identity = None
            return
        identity = (info.st_dev, info.st_ino)
        if self.state == "watching" and identity == self._identity and (self._observer_alive() or not self.observe):
            return
        was_out, was_refused = self.state == "unavailable", self.state == "refused"
        self._stop_observer()
        try:
            if self.observe:
                self._start_observer()
        except OSError as exc:
            message = f"cannot watch {self.folder}: {exc.strerror or exc}"
            if (self.state, self.message) != ("unavailable", message):
                log.warning("droplet %s: %s; retrying every %g s", self.config.label, message, HEALTH_SECONDS)
            self.state, self.message = "unavailable", message
            return
        self._identity = identity
        self.state = "watching"
        self.message = f"{self.kind} observer ({self.kind_reason})" if self.observe else "files present at start only"
        if self.lock is not None and self.lock.unlocked_reason:
            self.message += f"; {self.lock.unlocked_reason}"
        if was_out:
            log.warning("droplet %s: folder %s is back; watching again", self.config.label, self.folder)
        elif was_refused:
            log.warning("droplet %s: the other watcher of %s has gone; watching it now", self.config.label, self.folder)
        # Anything that arrived while nobody watched is found by a scan.
        self.scan()

    # -- what to look at ---------------------------------------------------------------

    def wanted(self, path: str) -> bool:
        """A file this droplet takes: in its folder, not partial, matching include/exclude."""
        p = Path(path)
        try:
            relative = p.relative_to(self.folder)
        except ValueError:
            return False
        if not relative.parts:
            return False
        if len(relative.parts) > 1:
            if not self.config.recursive:
                return False
            if any(part.startswith(".") for part in relative.parts[:-1]):
                return False
            if any(skip == p.parent or skip in p.parents for skip in self._skip_paths(p)):
                return False
        name = relative.parts[-1]
        if is_partial_name(name) or name == LOCK_NAME:  # the lock is hidden, so a partial name too; said twice
            return False
        if os.path.islink(path) and os.path.isdir(path):
            # Never followed (it may lead out of the folder, or loop), but where sub-folders
            # are taken a user expects its files to be, so it is reported, whatever its name.
            return self.config.recursive and not name.startswith(".")
        name = name.lower()  # *.mov takes A.MOV too
        if not any(fnmatch.fnmatchcase(name, pattern.lower()) for pattern in self.config.include):
            return False
        return not any(fnmatch.fnmatchcase(name, pattern.lower()) for pattern in self.config.exclude)

    def _skip_paths(self, path: Path) -> list[Path]:
        # done/ and failed/ as seen through the watched folder's own spelling
        return [self.folder / skip.relative_to(self._real_folder) for skip in self._skip
                if skip == self._real_folder or self._real_folder in skip.parents]

    def scan(self, under: str | None = None) -> int:
        """Look at every file now in the folder (or below ``under``); returns how many."""
        self._scanned = time.monotonic()
        top = Path(under) if under else self.folder
        found = 0
        stack = [top] if not under or not os.path.islink(under) else []  # a linked folder is never walked
        while stack:
            current = stack.pop()
            try:
                entries = list(os.scandir(current))
            except OSError:
                continue
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        if self.config.recursive and not entry.name.startswith("."):
                            path = Path(entry.path)
                            if not any(path == skip for skip in self._skip_paths(path)):
                                stack.append(path)
                    elif (entry.is_file() or entry.is_symlink()) and self.wanted(entry.path):
                        self.note(entry.path)
                        found += 1
                except OSError:
                    continue
        return found

    def note(self, path: str) -> None:
        """Look at this path again: it may have changed."""
        if path not in self.readings:
            self.readings[path] = Reading(-1, -1, time.time(), 0)

    # -- settling ----------------------------------------------------------------------

    def poll(self, now: float | None = None) -> list[Settled]:
        """Take events, check the folder, read sizes; returns the files that have settled."""
        self._check_health()
        if self.state != "watching":
            return []
        while True:
            try:
                kind, path = self.inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "file" and self.wanted(path):
                self.note(path)
            elif kind == "drop":
                self.readings.pop(path, None)
            elif kind == "scan" and self.config.recursive:
                if os.path.islink(path) and self.wanted(path):  # a link to a folder: reported, never walked
                    self.note(path)
                self.scan(path)
            elif kind == "gone" and os.path.normpath(path) == os.path.normpath(self.folder):
                self._health_checked = 0.0  # look at once
        if self.observe and self.config.rescan and time.monotonic() - self._scanned > self.config.rescan:
            self.scan()
        now = time.time() if now is None else now
        settled: list[Settled] = []
        for path, reading in list(self.readings.items()):
            if reading.readings and now - reading.last < self.interval / 2:
                continue  # woken early by an event: not a new reading yet
            try:
                info = os.stat(path)
            except OSError:
                del self.readings[path]  # moved away or deleted: a new name has its own event
                continue
            if not stat_module.S_ISREG(info.st_mode):
                del self.readings[path]
                if stat_module.S_ISDIR(info.st_mode) and os.path.islink(path):  # wanted() let it through
                    try:
                        link = os.lstat(path)
                    except OSError:
                        continue
                    settled.append(Settled(path, link.st_size, link.st_mtime_ns, folder_link=True))
                continue
            if (info.st_size, info.st_mtime_ns) != (reading.size, reading.mtime_ns):
                # It changed since the last reading, at its mtime if that lies in between
                # (another machine's clock may not); stable only from then on.
                since = now if not reading.readings else min(now, max(reading.last, info.st_mtime_ns / 1e9))
                self.readings[path] = Reading(info.st_size, info.st_mtime_ns, since, 1, now)
                continue
            reading.readings += 1
            reading.last = now
            if reading.readings >= MIN_READINGS and now - reading.since >= self.settle:
                del self.readings[path]
                if info.st_size == 0:
                    log.debug("droplet %s: ignoring empty file %s until it has content", self.config.label, path)
                    continue
                if not os.access(path, os.R_OK):
                    self.readings[path] = Reading(info.st_size, info.st_mtime_ns, now, 1, now)
                    continue
                settled.append(Settled(path, info.st_size, info.st_mtime_ns))
        return settled

    @property
    def settling(self) -> int:
        return len(self.readings)

    def describe(self) -> dict[str, Any]:
        return {"observer": self.kind, "why": self.kind_reason, "settling": self.settling, "outages": self.outages}


__all__ = ["FolderWatch", "Settled", "choose_observer", "filesystem_type", "fingerprint", "is_network_filesystem"]
