"""Files a node keeps beside a job's work folder for the Batch Monitor: each running
attempt's live log, and each finished segment's preview picture.

Both live in cluster storage, next to (not inside) the attempt's folder, where a segment's
own processes cannot write: ``WORK_ROOT/JOB/ATTEMPT.live.log`` while the attempt runs
(removed when it ends; the whole log is then in the store), and
``WORK_ROOT/.previews/JOB/ATTEMPT.jpg|png``, which outlives the work folder (removed when
the job is purged). Both are read with ``O_NOFOLLOW`` and only at the names made here.
"""

from __future__ import annotations

import os
import stat
import struct
import threading
from pathlib import Path

PREVIEW_MAX_WIDTH = 320
PREVIEW_MAX_BYTES = 1 << 20
LIVE_LOG_LIMIT = 1 << 20  # bytes of a running attempt's log written live; the stored log keeps the tail
PREVIEWS = ".previews"
_KINDS = {"jpg": ("image/jpeg", b"\xff\xd8\xff"), "png": ("image/png", b"\x89PNG\r\n\x1a\n")}


class PreviewError(ValueError):
    """A processor's preview that Farm does not keep (not a small JPEG or PNG)."""


# -- live logs ------------------------------------------------------------------------


def live_log_path(work_dir: Path, attempt_id: str) -> Path:
    return Path(work_dir) / f"{_plain_name(attempt_id)}.live.log"


class LiveLog:
    """Appends an attempt's log lines to its live file as they come (one write each, so
    a reader sees a line as soon as it is written); gives up quietly when the file cannot
    be written or has reached ``LIVE_LOG_LIMIT``: the log in the store is the record."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None
        self._written = 0
        self._lock = threading.Lock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_NOFOLLOW, 0o600)
        except OSError:
            self._fd = None

    def write(self, line: str) -> None:
        with self._lock:
            if self._fd is None:
                return
            data = (line + "\n").encode("utf-8", errors="replace")
            if self._written + len(data) > LIVE_LOG_LIMIT:
                data = b"[... the live log stops here; the whole log is shown when the attempt ends ...]\n"
                self._stop(data)
                return
            try:
                os.write(self._fd, data)
                self._written += len(data)
            except OSError:
                self._stop(b"")

    def _stop(self, last: bytes) -> None:
        try:
            if last:
                os.write(self._fd, last)  # type: ignore[arg-type]
            os.close(self._fd)  # type: ignore[arg-type]
        except OSError:
            pass
        self._fd = None

    def close(self, remove: bool = True) -> None:
        with self._lock:
            if self._fd is not None:
                self._stop(b"")
        if remove:
            try:
                self.path.unlink()
            except OSError:
                pass


def read_live_log(work_dir: Path, attempt_id: str, after: int = 0, limit: int = LIVE_LOG_LIMIT) -> tuple[str, int]:
    """``(text, next offset)``: what a running attempt's live log holds from byte ``after``
    on (``("", after)`` when there is none)."""
    data = _read(live_log_path(work_dir, attempt_id), limit + after)
    if data is None or len(data) <= after:
        return "", after
    chunk = data[after:]
    end = chunk.rfind(b"\n") + 1  # whole lines only: a half-written one comes next time
    return chunk[:end].decode("utf-8", errors="replace"), after + end


# -- previews -------------------------------------------------------------------------


def previews_folder(work_dir: Path) -> Path:
    """Where a job's previews are kept: beside its work folder, so that they outlive it."""
    work_dir = Path(work_dir)
    return work_dir.parent / PREVIEWS / work_dir.name


def image_size(data: bytes) -> tuple[str, int, int] | None:
    """``(kind, width, height)`` of a PNG or baseline/progressive JPEG, or None."""
    if data.startswith(_KINDS["png"][1]) and data[12:16] == b"IHDR" and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        return "png", width, height
    if not data.startswith(_KINDS["jpg"][1]):
        return None
    at = 2
    while at + 9 < len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            at += 2
            continue
        length = struct.unpack(">H", data[at + 2:at + 4])[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a start of frame
            height, width = struct.unpack(">HH", data[at + 5:at + 9])
            return "jpg", width, height
        at += 2 + length
    return None


def keep_preview(made: Path | None, work_dir: Path, attempt_id: str) -> tuple[Path, int, int] | None:
    """Keep the picture a processor made (``made``, or nothing) as this attempt's preview;
    returns where, and its size. Raises :class:`PreviewError` for anything but a JPEG or
    PNG at most ``PREVIEW_MAX_WIDTH`` wide."""
    folder = previews_folder(work_dir)
    name = _plain_name(attempt_id)
    for kind in _KINDS:
        try:
            (folder / f"{name}.{kind}").unlink()
        except FileNotFoundError:
            pass
    if made is None:
        return None
    data = _read(Path(made), PREVIEW_MAX_BYTES + 1)
    if data is None:
        raise PreviewError(f"{made} is not a file Farm can read")
    if len(data) > PREVIEW_MAX_BYTES:
        raise PreviewError(f"{made} is larger than {PREVIEW_MAX_BYTES} bytes")
    found = image_size(data)
    if found is None:
        raise PreviewError(f"{made} is not a JPEG or PNG")
    kind, width, height = found
    if width > PREVIEW_MAX_WIDTH:
        raise PreviewError(f"{made} is {width} px wide; a preview is at most {PREVIEW_MAX_WIDTH}")
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{name}.{kind}"
    temporary = folder / f".{name}.{os.getpid()}.tmp"
    temporary.write_bytes(data)
    os.replace(temporary, target)
    return target, width, height


def read_preview(work_dir: Path, attempt_id: str) -> tuple[bytes, str] | None:
    """``(bytes, media type)`` of an attempt's preview, or None when it has none."""
    folder = previews_folder(work_dir)
    for kind, (media_type, magic) in _KINDS.items():
        data = _read(folder / f"{_plain_name(attempt_id)}.{kind}", PREVIEW_MAX_BYTES)
        if data is not None and data.startswith(magic):
            return data, media_type
    return None


def has_preview(work_dir: Path, attempt_id: str) -> bool:
    folder = previews_folder(work_dir)
    return any(os.path.isfile(folder / f"{_plain_name(attempt_id)}.{kind}") for kind in _KINDS)


# -- reading, safely -------------------------------------------------------------------


def _plain_name(attempt_id: str) -> str:
    if not attempt_id or "/" in attempt_id or "\0" in attempt_id or attempt_id.startswith("."):
        raise ValueError(f"not an attempt id: {attempt_id!r}")
    return attempt_id


def _read(path: Path, limit: int) -> bytes | None:
    """At most ``limit`` bytes of a regular file, never through a symbolic link; None
    when there is no such file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        chunks, left = [], limit
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 16))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


__all__ = ["LiveLog", "PreviewError", "has_preview", "image_size", "keep_preview", "live_log_path", "previews_folder",
           "read_live_log", "read_preview"]
