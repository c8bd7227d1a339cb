"""One watcher per watched folder: a lock file inside the folder itself.

Two processes watching one folder would both submit every file and then fight over
moving it (one moves it to ``done/`` while the other's job still reads it). Whatever
their state directories, they share the folder, so the lock lives there:
``FOLDER/.farm-droplet.lock`` (a hidden name, which a droplet never takes as a drop).

- The holder keeps an ``flock`` on the file for its whole life; the kernel drops it when
  the process dies, however it dies, so a dead watcher's lock is taken over at once.
- The file names the holder (host, pid, state directory, droplet, since when), for the
  message that refuses a second watcher, and the holder touches it every
  :data:`HEARTBEAT_SECONDS`.
- On a network share ``flock`` may not reach other machines (NFS mounted with
  ``local_lock=flock``, SMB without byte-range locks). There a record written by another
  host refuses us even when our ``flock`` succeeds, as long as its holder keeps touching
  it; one left untouched for ``stale`` seconds (measured on our clock, so that no two
  machines' clocks are compared) is taken over. On a local file system ``flock`` is the
  whole truth (a container with a new host name takes its old lock over at once).
- A lock file this process may not open for writing (another user's) is still
  ``flock``-ed read-only to learn whether its holder lives; a folder where no lock file
  can be made at all (read-only) is watched unlocked, and the droplet says so.
- A holder checks the file at every health check: deleted (by a person, or with the
  folder) it is made again; overwritten by another host's watcher, the holder stands
  down and reports itself refused, so two watchers never both go on.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat as stat_module
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: one watcher per folder is then up to the user
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".farm-droplet.lock"
#: Seconds between two touches of a held lock file.
HEARTBEAT_SECONDS = 2.0
#: Seconds a record of another host must stay untouched before it is taken over.
STALE_SECONDS = 15.0


class FolderLocked(Exception):
    """The folder is watched by someone else; the message names them."""


@dataclass
class _Foreign:
    """A record of another host, seen while its flock (if any) did not reach us."""

    content: bytes
    mtime_ns: int
    since: float  # monotonic time from which this content and mtime have not changed


class FolderLock:
    """The lock on one watched folder. Not thread-safe: one thread uses it."""

    def __init__(self, folder: str | os.PathLike[str], state: str | os.PathLike[str], label: str = "", *,
                 stale: float = STALE_SECONDS, heartbeat: float = HEARTBEAT_SECONDS, shared: bool | None = None):
        """``shared``: whether the folder is on a network share, where another host's record
        counts even when flock succeeds (default: from the file system's type)."""
        self.folder = Path(folder)
        self._shared = shared
        self.path = self.folder / LOCK_NAME
        self.state = str(state)
        self.label = label or str(folder)
        self.stale = stale
        self.heartbeat = heartbeat
        self.host = socket.gethostname()
        self.fd: int | None = None
        self._record = b""
        self._beat = 0.0
        self._foreign: _Foreign | None = None
        #: Why the folder could not be locked at all (a read-only share): watching goes on unlocked.
        self.unlocked_reason = ""

    @property
    def held(self) -> bool:
        return self.fd is not None

    @property
    def shared(self) -> bool:
        if self._shared is None:
            from farm.droplets.watch import filesystem_type, is_network_filesystem

            fstype = filesystem_type(self.folder)
            self._shared = fstype is None or is_network_filesystem(fstype)
        return self._shared

    # -- taking and keeping -------------------------------------------------------------

    def acquire(self, wait: float | None = None) -> None:
        """Take the lock or raise :class:`FolderLocked`. With ``wait``, a record of another
        host is watched for up to that long (default: ``stale`` plus a heartbeat) to see
        whether its holder is alive; a dead one's is then taken over."""
        deadline = time.monotonic() + (self.stale + self.heartbeat if wait is None else wait)
        while True:
            refusal = self.ensure()
            if refusal is None:
                return
            if self._foreign is None or time.monotonic() >= deadline:
                raise FolderLocked(refusal)
            time.sleep(min(0.2, self.heartbeat / 4))

    def ensure(self) -> str | None:
        """Take the lock, or check that it is still ours and touch it; returns None when it is
        held (or cannot be taken at all, see :attr:`unlocked_reason`), else why not."""
        if self.fd is not None:
            lost = self._keep()
            if lost is None:
                return None
            if lost:
                return lost
        return self._try()

    def release(self) -> None:
        """Give the lock up; the file is removed when it is still ours."""
        fd, self.fd = self.fd, None
        self._foreign = None
        if fd is None:
            return
        try:
            if self._same(fd):
                os.unlink(self.path)  # while the flock is held: nobody else holds this file
        except OSError:
            pass
        finally:
            os.close(fd)

    # -- inside -------------------------------------------------------------------------

    def _try(self) -> str | None:
        if fcntl is None:
            self.unlocked_reason = "not locked (no flock here): a second watcher of this folder is not refused"
            return None
        for _ in range(5):  # a file unlinked by its releaser between our open and our flock: again
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                if exc.errno in (errno.EACCES, errno.EPERM) and os.path.lexists(self.path):
                    outcome = self._not_ours()
                    if outcome == "again":
                        continue
                    return outcome
                return self._cannot_open(exc)
            try:
                outcome = self._take(fd)
            except OSError as exc:  # a share that fails under us (EIO, ESTALE): not ours, say why
                os.close(fd)
                return f"cannot lock {self.path}: {exc.strerror or exc}"
            except BaseException:
                os.close(fd)
                raise
            if outcome == "again":
                os.close(fd)
                continue
            if outcome is not None:
                os.close(fd)
                return outcome
            self.fd = fd
            return None
        return f"the lock file {self.path} keeps being replaced; another watcher may be starting"

    def _cannot_open(self, exc: OSError) -> str | None:
        if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            return f"{self.path} is not a lock file (a link, a folder or a device was put there); remove it"
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            # A folder this process may not write: it can take files but never move them, and
            # the lock cannot be enforced. Watching goes on; the droplet's message says so.
            self.unlocked_reason = f"not locked ({exc.strerror}): a second watcher of this folder is not refused"
            return None
        if exc.errno == errno.ENOENT:
            return f"folder {self.folder} is missing"
        return f"cannot lock {self.path}: {exc.strerror or exc}"

    def _not_ours(self) -> str | None:
        """Another user's lock file: refused while its holder lives, else removed and made anew."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM):  # whose it is cannot be known: not taken
                return (f"{self.path} belongs to another user and cannot be read, so its holder is unknown; "
                        "remove it if no other watcher runs")
            return self._cannot_open(exc)
        try:
            if not stat_module.S_ISREG(os.fstat(fd).st_mode):
                return f"{self.path} is not a lock file; remove it"
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return self._refusal(_read(fd))
            refusal = self._alive_elsewhere(fd, _read(fd))
            if refusal:
                return refusal
            if not self._same(fd):
                return "again"
            try:
                os.unlink(self.path)  # its holder is gone; removing needs the folder's permission only
            except OSError as exc:
                return self._cannot_open(exc)
            return "again"
        finally:
            os.close(fd)

    def _take(self, fd: int) -> str | None:
        info = os.fstat(fd)
        if not stat_module.S_ISREG(info.st_mode):
            return f"{self.path} is not a lock file; remove it"
        flocked = True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return self._refusal(_read(fd))
        except OSError as exc:  # ENOLCK, EOPNOTSUPP: some network shares; the record decides alone
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            flocked = False
        if not self._same(fd):
            return "again"
        content = _read(fd)
        record = _parse(content)
        refusal = self._alive_elsewhere(fd, content)
        if refusal:
            return refusal
        if record and record.get("host") == self.host and not flocked and _pid_alive(record.get("pid")):
            return self._refusal(content, "this share has no working flock, and that process is alive")
        self._foreign = None
        self._record = json.dumps({
            "host": self.host, "pid": os.getpid(), "state": self.state, "droplet": self.label,
            "since": datetime.now().astimezone().isoformat(timespec="seconds"),
        }).encode() + b"\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, self._record, 0)
        self.unlocked_reason = ""
        try:  # readable by every user whatever the umask: the next watcher must learn who holds it
            os.fchmod(fd, 0o644)
        except OSError:
            pass
        self._beat = time.monotonic()
        return None

    def _alive_elsewhere(self, fd: int, content: bytes) -> str | None:
        """flock said yes, but on a share it may not reach the machine that wrote this record:
        its holder counts as alive while the file's mtime keeps moving."""
        record = _parse(content)
        if not record or record.get("host") == self.host or not self.shared:
            return None
        mtime = os.fstat(fd).st_mtime_ns
        now = time.monotonic()
        if self._foreign is None or (self._foreign.content, self._foreign.mtime_ns) != (content, mtime):
            self._foreign = _Foreign(content, mtime, now)
        if now - self._foreign.since < self.stale:
            return self._refusal(content, f"its lock is taken over if it is not renewed for {self.stale:g} s")
        return None

    def _keep(self) -> str | None:
        """None: still ours (touched when due). "": our file is gone, take it anew. Else: lost to whom."""
        fd = self.fd
        assert fd is not None
        try:
            content = _read(fd) if self._same(fd) else None
        except OSError:  # a share that lost our file under us (ESTALE): take it anew
            content = None
        if content is None:
            self.fd = None
            os.close(fd)
            return ""
        if content != self._record:  # another host's watcher wrote over it: it goes on, we stop
            self.fd = None
            os.close(fd)
            return self._refusal(content, "it wrote over this watcher's lock") if content.strip() else ""
        now = time.monotonic()
        if now - self._beat >= self.heartbeat:
            self._beat = now
            try:
                os.utime(fd)
            except OSError:
                pass
        return None

    def _same(self, fd: int) -> bool:
        try:
            here = os.stat(self.path, follow_symlinks=False)
        except OSError:
            return False
        mine = os.fstat(fd)
        return (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)

    def _refusal(self, content: bytes, why: str = "") -> str:
        return (f"{self.folder} is already watched by {describe(content, self.folder)}"
                + (f"; {why}" if why else "") + "; stop that watcher first, or watch another folder")


def describe(content: bytes, folder: str | os.PathLike[str] = "") -> str:
    """``pid 123 on host (state dir /x, droplet y, since ...)`` from a lock file's record."""
    record = _parse(content)
    if not record:
        return "another process (its lock file names nobody yet)"
    parts = [f"state dir {record.get('state', '?')}"]
    if record.get("droplet") and record.get("droplet") != str(folder):
        parts.append(f"droplet {record['droplet']}")
    if record.get("since"):
        parts.append(f"since {record['since']}")
    return f"pid {record.get('pid', '?')} on {record.get('host', '?')} ({', '.join(parts)})"


def _read(fd: int) -> bytes:
    return os.pread(fd, 4096, 0)


def _parse(content: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(content.decode("utf-8", "replace") or "null")
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _pid_alive(pid: Any) -> bool:
    from farm.lease import pid_alive

    return isinstance(pid, int) and pid > 0 and pid != os.getpid() and pid_alive(pid, None)


__all__ = ["LOCK_NAME", "FolderLock", "FolderLocked", "describe"]
