"""Nodes without shared storage: a segment's inputs go out to the node, and its outputs
come back into cluster storage, through the controller's HTTPS API.

The controller (:class:`Depot`) serves only the files a running job declares as its
inputs (the processor's :meth:`~farm.processor.Processor.input_files`), each by its
SHA-256, with HTTP ranges; and takes an attempt's output files only into that attempt's
folder in the job's work folder, only while the attempt runs. Both ends stream in
chunks, so a file of any size moves with a few MiB of memory.

A node (:class:`NodeCache`) keeps what it fetched under its cache folder by content
hash: a source is sent once per node, not once per segment; a transfer that stops
half-way leaves ``SHA.part``, continued from its end with a ``Range`` request; a file
whose hash comes out wrong is fetched again from its start. The least recently used
files are evicted past ``node.cache_bytes`` (never one that a running segment uses).

Which files: the job's input and whatever else its processor declares (a scene's
includes), laid out under one folder per attempt the way they sit under their common
folder on the controller, so relative references keep working.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import functools
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from farm.errors import FarmError, SourceChanged

log = logging.getLogger("farm.transfer")
CHUNK = 4 << 20  # bytes read, hashed and sent at once
ROUTE = "/api/transfer"
API_ENV = "FARM_CONTROLLER_API"  # set by `farm node` for its worker process
BUNDLE_ENV = "FARM_NODE_BUNDLE"
HASH_HEADER = "X-Farm-Sha256"
NODE_HEADER = "X-Farm-Node"
JOB_HEADER = "X-Farm-Job"
OFFSET_HEADER = "X-Farm-Offset"  # where an upload continues
#: Seconds the controller holds a node's request for a job's inputs before answering
#: "still listing" (202): well within the node's 60 s timeout, so a listing of any length works.
MANIFEST_WAIT = 20
#: Written by the controller in its cluster storage folder: a node that sees it shares that storage
#: (an empty folder at the same path, or a mount point with nothing mounted, does not).
STORAGE_MARK = ".farm-cluster-storage"
_SHA = re.compile(r"^[0-9a-f]{64}$")
#: In a job's work folder: outputs on their way back, until whole and checked
INCOMING = ".farm-incoming"
#: A partial transfer nothing was added to for this long is removed (nodes and controller)
STALE_SECONDS = 24 * 3600
#: A file sent whose node has not said how much it has for this long counts as ended
#: (the node went, or its segment was cancelled): its last word is what it received
NODE_SILENT = 10.0
PROGRESS_EVERY = 0.5  # seconds between a node's words on how much of a file it has


class TransferError(FarmError):
    """A file could not be moved between a node and the controller."""


def sha256_file(path: Path, upto: int | None = None, into: Any = None) -> str:
    """The SHA-256 of ``path`` (of its first ``upto`` bytes), read in chunks; ``into`` is
    a hash object to go on with (it is returned updated, as hex)."""
    digest = into or hashlib.sha256()
    left = upto
    with open(path, "rb") as handle:
        while left is None or left > 0:
            chunk = handle.read(CHUNK if left is None else min(CHUNK, left))
            if not chunk:
                break
            digest.update(chunk)
            if left is not None:
                left -= len(chunk)
    return digest.hexdigest()


def safe_relative(raw: str) -> Path:
    """A relative path that stays inside whatever folder it is joined to."""
    path = Path(raw)
    if not raw or path.is_absolute() or any(part in ("..", "") for part in raw.split("/")) or "\\" in raw:
        raise TransferError(f"{raw!r} is not a plain relative path")
    return path


def common_root(paths: list[Path]) -> Path:
    return Path(os.path.commonpath([str(p.parent) for p in paths])) if paths else Path("/")


# -- the controller's side --------------------------------------------------------------


@dataclass
class TransferRecord:
    """One file sent or taken, as `farm nodes` and the API show it."""

    direction: str  # "out" (to a node) or "in" (an output coming back)
    node: str
    name: str
    size: int
    offset: int  # where it started (a resumed transfer starts past 0)
    sent: int = 0
    started: float = field(default_factory=time.time)
    ended: float | None = None
    job: str | None = None
    sha: str = ""
    #: For a file sent to a node: what the node says it has (its reports). What the
    #: controller has sent runs ahead of it by what both ends' socket buffers hold (about
    #: 10 MiB on loopback), so a file shorter than that would seem sent at once.
    received: int | None = None
    heard: float = 0.0  # when the node last said
    whole: bool = False  # every byte was handed over (not cut off by either end)

    def moved(self) -> int:
        return self.sent if self.received is None else min(self.sent, self.received)

    def finished(self, now: float) -> float | None:
        """When the transfer ended, or None while it moves."""
        if self.ended is None or self.received is None or not self.whole:
            return self.ended  # a transfer cut off is over: the node gets nothing more of it
        if self.received >= self.sent or now - self.heard > NODE_SILENT:  # all there, or the node stopped saying
            return max(self.ended, self.heard)
        return None

    def document(self) -> dict[str, Any]:
        now = time.time()
        ended, moved = self.finished(now), self.moved()
        seconds = max((ended or now) - self.started, 1e-6)
        return {"direction": self.direction, "node": self.node, "name": self.name, "size": self.size,
                "offset": self.offset, "bytes": moved, "rate": round(moved / seconds), "job": self.job,
                "started": self.started, "ended": ended, "active": ended is None}


class Depot:
    """The controller's end: manifests of jobs' inputs, the files behind their hashes, and
    the attempt folders outputs come back into. ``jobs(job_id)`` gives a running job's
    (Job, Processor) or None; ``attempt(attempt_id)`` a running attempt's (job id, output
    folder) or None."""

    KEEP_RECORDS = 200

    def __init__(self, jobs: Callable[[str], Any], attempt: Callable[[str], tuple[str, Path] | None]):
        self._jobs = jobs
        self._attempt = attempt
        self._hashes: dict[tuple[str, int, int], str] = {}
        self._served: dict[str, tuple[Path, int, int]] = {}  # sha -> (path, size, mtime_ns)
        self._declared_by: dict[str, set[str]] = {}  # sha -> the jobs that declared it
        self._arriving: dict[Path, _Arrival] = {}  # partial output -> the upload writing it
        self._listings: dict[str, concurrent.futures.Future[dict[str, Any]]] = {}  # job -> its manifest
        self._lock = threading.Lock()
        self.records: list[TransferRecord] = []

    def _hash(self, path: Path) -> tuple[str, int, int]:
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        with self._lock:
            known = self._hashes.get(key)
        if known is None:
            known = sha256_file(path)
            with self._lock:
                self._hashes[key] = known
        return known, stat.st_size, stat.st_mtime_ns

    def manifest(self, job_id: str) -> concurrent.futures.Future[dict[str, Any]]:
        """The job's inputs, as a future: listing them may be slow (Blender lists what a
        .blend links, up to its own timeout), and hashing a big source too, so it runs
        once per job in a thread of its own while nodes ask again (a long poll), instead
        of once per segment and within one request's time. Checked cheaply each time: a
        source that changed fails (SourceChanged), a file that changed is hashed again."""
        found = self._jobs(job_id)
        if found is None:
            raise LookupError(f"job {job_id} is not running on this controller")
        job, processor = found
        from farm.node import check_source

        check_source(job)  # SourceChanged: the node fails the job with its reason, as on shared storage
        with self._lock:
            for gone in [other for other in self._listings if other != job_id and self._jobs(other) is None]:
                del self._listings[gone]
            listing = self._listings.get(job_id)
            if listing is not None and listing.done() and (listing.exception() is not None or not self._current(listing)):
                listing = None  # a failure is told once, then tried again; a changed file is hashed again
            if listing is None:
                listing = self._listings[job_id] = concurrent.futures.Future()
                # a daemon thread: a controller that stops does not wait for a listing
                threading.Thread(target=self._fill, args=(listing, job_id, job, processor), daemon=True,
                                 name=f"farm-transfer-listing-{job_id}").start()
        return listing

    def _fill(self, listing: concurrent.futures.Future[dict[str, Any]], *args: Any) -> None:
        listing.set_running_or_notify_cancel()
        try:
            listing.set_result(self._list(*args))
        except BaseException as exc:  # noqa: BLE001 (handed to the nodes that ask)
            listing.set_exception(exc)

    def _current(self, listing: concurrent.futures.Future[dict[str, Any]]) -> bool:
        root = Path(listing.result()["root"])
        for entry in listing.result()["files"]:
            path, size, mtime = self._served.get(entry["sha256"], (root / entry["path"], -1, -1))  # under _lock
            try:
                stat = path.stat()
            except OSError:
                return False
            if (stat.st_size, stat.st_mtime_ns) != (size, mtime):
                return False
        return True

    def _list(self, job_id: str, job: Any, processor: Any) -> dict[str, Any]:
        files = [Path(p) for p in processor.input_files(job)]
        root = common_root(files)
        entries = []
        for path in files:
            try:
                sha, size, mtime = self._hash(path)
            except OSError as exc:
                raise TransferError(f"input {path} of job {job_id} cannot be read on the controller: "
                                    f"{exc.strerror or exc}") from None
            with self._lock:
                self._served[sha] = (path, size, mtime)
                self._declared_by.setdefault(sha, set()).add(job_id)
            entries.append({"path": str(path.relative_to(root)), "size": size, "sha256": sha})
        main = str(job.input.relative_to(root)) if job.input is not None else None
        return {"job": job_id, "root": str(root), "input": main, "files": entries}

    def blob(self, sha: str) -> tuple[Path, int]:
        """The file behind ``sha``, if a manifest named it and it is still that file."""
        with self._lock:
            found = self._served.get(sha)
            jobs = list(self._declared_by.get(sha, ()))
        if found is None or not any(self._jobs(job_id) is not None for job_id in jobs):
            raise LookupError(f"no input of a running job has sha256 {sha}")
        path, size, mtime = found
        try:
            stat = path.stat()
        except OSError:
            raise TransferError(f"{path} is gone from the controller") from None
        if (stat.st_size, stat.st_mtime_ns) != (size, mtime):
            raise TransferError(f"{path} changed on the controller after it was hashed")
        return path, size

    def send(self, sha: str, offset: int, node: str, job: str | None = None) -> Iterator[bytes]:
        """The bytes of a declared input from ``offset``, in chunks, counted."""
        path, size = self.blob(sha)
        record = self._record(TransferRecord("out", node, path.name, size, offset, job=job, sha=sha))
        handle = open(path, "rb")

        def chunks() -> Iterator[bytes]:
            try:
                handle.seek(offset)
                while True:
                    chunk = handle.read(CHUNK)
                    if not chunk:
                        break
                    record.sent += len(chunk)
                    yield chunk
                record.whole = True
            finally:
                handle.close()
                record.ended = time.time()

        return chunks()

    def output_target(self, attempt_id: str, relative: str) -> Path:
        found = self._attempt(attempt_id)
        if found is None:
            raise LookupError(f"attempt {attempt_id} is not running on this controller")
        folder = found[1]
        target = folder / safe_relative(relative)
        if not target.resolve().is_relative_to(folder.resolve()):
            raise TransferError(f"{relative!r} leaves the attempt's folder")
        return target

    def _partial(self, attempt_id: str, relative: str, sha: str) -> Path:
        """Where an output arrives before its hash is checked: one per attempt, file and
        content, kept when the connection breaks so that the node sends only the rest.
        Outside the attempt's folder, so that nothing that reads it takes a part for a file."""
        if not _SHA.match(sha or ""):
            raise TransferError(f"{HASH_HEADER} (or ?sha=) must be the file's sha256 in hex")
        target = self.output_target(attempt_id, relative)  # refuses a path that leaves the folder
        folder = target.parents[len(safe_relative(relative).parts) - 1]
        return folder.parent / INCOMING / folder.name / f"{safe_relative(relative)}.{sha[:16]}.part"

    def sweep(self, work_root: Path, now: float | None = None) -> list[Path]:
        """Remove the partial outputs that no node will continue: their attempt is not
        running, or nothing was added to them for :data:`STALE_SECONDS` (a controller or
        node killed part-way leaves them). Returns what was removed."""
        now = time.time() if now is None else now
        removed = []
        for incoming in work_root.glob(f"*/{INCOMING}"):
            for folder in list(incoming.iterdir()):
                newest = max((p.stat().st_mtime for p in folder.rglob("*")), default=folder.stat().st_mtime)
                if self._attempt(folder.name) is None or now - newest > STALE_SECONDS:
                    shutil.rmtree(folder, ignore_errors=True)
                    removed.append(folder)
            with contextlib.suppress(OSError):
                incoming.rmdir()  # when empty
        if removed:
            log.info("removed %d stale partial upload folder(s) under %s", len(removed), work_root)
        return removed

    async def arrived(self, attempt_id: str, relative: str, sha: str) -> int:
        """How many bytes of an output have arrived so far (the node sends the rest). A node
        asks after its connection broke, which this side may not have noticed yet: an
        upload of the same file still going stops first, keeping what it wrote."""
        partial = self._partial(attempt_id, relative, sha)
        await self._supersede(partial)
        try:
            return partial.stat().st_size
        except FileNotFoundError:
            return 0

    async def _supersede(self, partial: Path) -> None:
        arrival = self._arriving.get(partial)
        if arrival is not None:
            arrival.superseded = True
            arrival.task.cancel()
            await asyncio.wait([arrival.task])

    async def receive(self, attempt_id: str, relative: str, expected_sha: str, chunks: Any, node: str,
                      size: int, offset: int = 0) -> dict[str, Any]:
        """Write an output file from ``chunks`` (an async iterator) from byte ``offset`` on
        into its partial file, then, when the whole has the hash the node gave, to its
        name. A broken connection leaves the partial file (every byte that arrived) for the
        node to resume; a hash that comes out wrong deletes it (the node sends the file
        again from its start)."""
        partial = self._partial(attempt_id, relative, expected_sha)
        target = self.output_target(attempt_id, relative)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial.parent.mkdir(parents=True, exist_ok=True)
        await self._supersede(partial)
        have = partial.stat().st_size if partial.exists() else 0
        if offset < 0 or offset > have:
            raise TransferError(f"{relative}: cannot continue at byte {offset}: {have} bytes have arrived")
        record = self._record(TransferRecord("in", node, relative, offset + size, offset,
                                             job=self._attempt(attempt_id)[0]))
        digest = hashlib.sha256()
        # the body is read in a task of its own, which a later request for the same file cancels
        arrival = _Arrival(asyncio.create_task(_consume(partial, offset, chunks, digest, record)))
        self._arriving[partial] = arrival
        try:
            await arrival.task
        except asyncio.CancelledError:
            if not arrival.superseded:
                raise
            raise TransferError(f"{relative}: the node sends it again on a new connection") from None
        finally:
            if self._arriving.get(partial) is arrival:
                del self._arriving[partial]
            record.ended = time.time()
        if digest.hexdigest() != expected_sha:
            partial.unlink(missing_ok=True)
            raise TransferError(f"{relative}: the bytes that arrived do not have the sha256 the node sent")
        os.replace(partial, target)
        return {"path": relative, "size": offset + record.sent}

    def _record(self, record: TransferRecord) -> TransferRecord:
        with self._lock:
            self.records.append(record)
            del self.records[:-self.KEEP_RECORDS]
        return record

    def fetched(self, node: str, sha: str, have: int) -> None:
        """``node`` says it holds the first ``have`` bytes of blob ``sha`` (its newest fetch of it)."""
        with self._lock:
            for record in reversed(self.records):
                if record.direction == "out" and record.node == node and record.sha == sha:
                    record.received, record.heard = max(have - record.offset, record.received or 0), time.time()
                    return

    def documents(self, job: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [record.document() for record in self.records if job is None or record.job == job]

    def by_node(self) -> dict[str, dict[str, Any]]:
        """Per node: bytes sent to it and back from it, and the rate of what moves now."""
        summary: dict[str, dict[str, Any]] = {}
        for record in self.documents():
            entry = summary.setdefault(record["node"], {"bytes_out": 0, "bytes_in": 0, "active": 0, "rate": 0})
            entry["bytes_out" if record["direction"] == "out" else "bytes_in"] += record["bytes"]
            if record["active"]:
                entry["active"] += 1
                entry["rate"] += record["rate"]
        return summary


@dataclass
class _Arrival:
    task: asyncio.Task[None]
    superseded: bool = False


async def _settled(work: Any) -> Any:
    """Await work done in a thread to its end even when cancelled: the thread goes on
    anyway, and the file it writes must not be closed under it."""
    future = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait([future])
        raise


async def _consume(partial: Path, offset: int, chunks: Any, digest: Any, record: TransferRecord) -> None:
    """An upload's body into its partial file from ``offset``, hashed on the way; whatever
    stops it (a broken connection, a newer upload of the file), the bytes that arrived are
    written: they are the file's, and the node sends only the rest."""

    def store(batch: bytearray) -> None:  # in a worker thread: the event loop never waits on the disk
        digest.update(batch)
        handle.write(batch)
        record.sent += len(batch)

    with open(partial, "r+b" if offset else "wb") as handle:
        if offset:
            handle.truncate(offset)
            await _settled(asyncio.to_thread(sha256_file, partial, offset, digest))
            handle.seek(offset)
        batch = bytearray()
        try:
            async for chunk in chunks:  # the server's pieces (64 KiB or so), gathered into CHUNK
                batch += chunk
                if len(batch) >= CHUNK:
                    full, batch = batch, bytearray()
                    await _settled(asyncio.to_thread(store, full))
        finally:
            if batch:
                store(batch)


def _mib(count: int) -> str:
    return f"{count / 2**20:.1f} MiB"


def describe_transfer(doc: dict[str, Any]) -> str:
    """One transfer as `farm status JOB` shows it."""
    way = f"sent {doc['name']} to {doc['node']}" if doc["direction"] == "out" else \
        f"{doc['node']} sent back {doc['name']}"
    resumed = f" from byte {doc['offset']:,}" if doc["offset"] else ""
    state = "moving" if doc["active"] else "done"
    return f"transfer: {way}{resumed}: {_mib(doc['bytes'])} of {_mib(doc['size'])}, {_mib(doc['rate'])}/s, {state}"


def describe_node_transfers(summary: dict[str, Any]) -> str:
    """A node's transfers as `farm nodes` shows them."""
    now = f", {summary['active']} moving at {_mib(summary['rate'])}/s" if summary["active"] else ""
    return (f"no shared storage: {_mib(summary['bytes_out'])} sent to it, {_mib(summary['bytes_in'])} "
            f"sent back{now}")


def parse_range(header: str | None, size: int) -> int:
    """The start of ``Range: bytes=N-`` (the only form nodes send); 0 without one."""
    if not header:
        return 0
    match = re.fullmatch(r"bytes=(\d+)-", header.strip())
    if not match or int(match.group(1)) > size:
        raise TransferError(f"Range {header[:40]!r}: expected bytes=N- with N at most {size}")
    return int(match.group(1))


# -- the node's side -----------------------------------------------------------------------


class ControllerLink:
    """HTTPS to the controller with the node bundle's token, pinned to its certificate."""

    def __init__(self, api_url: str, bundle: Any, node: str, rate: int | None = None):
        parsed = urllib.parse.urlsplit(api_url)
        self.host, self.port = parsed.hostname or "", parsed.port or 443
        self.context = bundle.client_ssl_context()
        self.headers = {"Authorization": f"Bearer {bundle.token}", NODE_HEADER: node}
        self.rate = rate  # bytes per second, or None: as fast as it goes

    def _connection(self, timeout: float = 60) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(self.host, self.port, context=self.context, timeout=timeout,
                                           blocksize=CHUNK)

    def manifest(self, job_id: str, cancelled: threading.Event | None = None) -> dict[str, Any]:
        """A job's inputs: the controller may take minutes to list them (a .blend's
        links), and answers 202 after a while of it; asked again until it is done."""
        while True:
            answer = self.get_json(f"{ROUTE}/jobs/{job_id}/inputs?wait={MANIFEST_WAIT}")
            if answer.get("pending") is None:
                return answer
            if cancelled is not None and cancelled.is_set():
                raise TransferError("cancelled")
            log.info("the controller is still listing the inputs of job %s: %s", job_id, answer["pending"])

    def get_json(self, path: str) -> Any:
        connection = self._connection()
        try:
            connection.request("GET", path, headers=self.headers)
            response = connection.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise TransferError(f"the controller at {self.host}:{self.port} did not answer {path}: {exc}") from None
        finally:
            connection.close()
        if response.status == 409:
            raise SourceChanged(_error_of(body))
        if response.status not in (200, 202):
            raise TransferError(f"the controller refused {path}: {response.status} {_error_of(body)}")
        return json.loads(body)

    def download(self, sha: str, partial: Path, digest: Any, cancelled: threading.Event | None = None,
                 progress: Callable[[int], None] | None = None, job: str = "") -> None:
        """Append the blob's bytes from ``partial``'s size on, updating ``digest``."""
        offset = partial.stat().st_size if partial.exists() else 0
        connection = self._connection()
        try:
            connection.request("GET", f"{ROUTE}/blobs/{sha}", headers={**self.headers, "Range": f"bytes={offset}-",
                                                                       JOB_HEADER: job})
            response = connection.getresponse()
            if response.status not in (200, 206):
                raise TransferError(f"the controller refused blob {sha[:12]}: {response.status} "
                                    f"{_error_of(response.read())}")
            if response.status == 200 and offset:  # no range: start again
                offset = 0
                partial.unlink(missing_ok=True)
                digest.__init__()  # type: ignore[misc]
            started, moved, told = time.monotonic(), 0, 0.0

            def on_read(filled: int) -> None:
                """After each read (a TLS record): keep to the rate, and say how much is here."""
                nonlocal told
                if self.rate:  # a node told to leave bandwidth for others: the socket waits unread
                    ahead = (moved + filled) / self.rate - (time.monotonic() - started)
                    if ahead > 0.01:  # not a sleep per record at high rates
                        time.sleep(ahead)
                if progress is not None and (now := time.monotonic()) - told >= PROGRESS_EVERY:
                    told = now
                    progress(offset + moved + filled)

            with open(partial, "ab") as handle, _Sink(handle, digest) as sink:
                while True:
                    buffer = sink.free()
                    count = _read_full(response, buffer, on_read)
                    if not count:
                        break
                    sink.put(buffer, count)
                    moved += count
                    if cancelled is not None and cancelled.is_set():
                        raise TransferError("cancelled")
            if progress is not None:
                progress(offset + moved)
        except (OSError, http.client.HTTPException) as exc:
            raise TransferError(f"fetching blob {sha[:12]} from the controller stopped: {exc}") from None
        finally:
            connection.close()

    def upload(self, attempt_id: str, relative: str, path: Path, tries: int = 3) -> None:
        """Send an output file; after a broken connection, ask how much arrived and send
        the rest; when the controller refuses the whole (its hash came out wrong), send
        it again from its start."""
        sha = sha256_file(path)
        size = path.stat().st_size
        where = f"{ROUTE}/attempts/{attempt_id}/files/{urllib.parse.quote(relative)}"
        for attempt in range(tries):
            try:
                offset = self.get_json(f"{where}?sha={sha}")["arrived"] if attempt else 0
                self._put(where, relative, path, sha, size, offset)
                return
            except TransferError as exc:
                if attempt == tries - 1 or getattr(exc, "status", None) == 404:
                    raise
                log.warning("%s; sending the rest of %s again", exc, relative)

    def _put(self, where: str, relative: str, path: Path, sha: str, size: int, offset: int) -> None:
        connection = self._connection(timeout=300)
        try:
            with open(path, "rb") as body:
                body.seek(offset)
                connection.request("PUT", where, body=body, headers={
                    **self.headers, HASH_HEADER: sha, OFFSET_HEADER: str(offset), "Content-Length": str(size - offset)})
            response = connection.getresponse()
            answer = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise TransferError(f"sending {relative} to the controller stopped: {exc}") from None
        finally:
            connection.close()
        if response.status != 200:
            error = TransferError(f"the controller refused {relative}: {response.status} {_error_of(answer)}")
            error.status = response.status  # type: ignore[attr-defined]
            raise error


def _read_full(response: Any, buffer: bytearray, on_read: Callable[[int], None] | None = None) -> int:
    """Fill ``buffer`` from ``response`` (TLS records come 16 KiB at a time); the count
    read, short only at the end."""
    view, filled = memoryview(buffer), 0
    while filled < len(buffer):
        count = response.readinto(view[filled:])
        if not count:
            break
        filled += count
        if on_read is not None:
            on_read(filled)
    return filled


class _Sink:
    """Hashes and writes received chunks in a thread of its own, so that decrypting the
    next chunk (in the caller's thread) and hashing and writing this one run side by side:
    hashlib and file writes let go of the GIL. A few reused buffers of CHUNK bytes, no
    per-chunk objects beyond them."""

    DEPTH = 3

    def __init__(self, handle: Any, digest: Any):
        import queue

        self.handle, self.digest = handle, digest
        self._free: queue.Queue[bytearray] = queue.Queue()
        self._full: queue.Queue[tuple[bytearray, int] | None] = queue.Queue()
        for _ in range(self.DEPTH):
            self._free.put(bytearray(CHUNK))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="farm-transfer-sink", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._full.get()) is not None:
            buffer, count = item
            if self._error is None:
                try:
                    view = memoryview(buffer)[:count]
                    self.digest.update(view)
                    self.handle.write(view)
                except BaseException as exc:  # handed to the caller at its next put
                    self._error = exc
            self._free.put(buffer)

    def free(self) -> bytearray:
        if self._error is not None:
            raise self._error
        return self._free.get()

    def put(self, buffer: bytearray, count: int) -> None:
        self._full.put((buffer, count))

    def __enter__(self) -> _Sink:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._full.put(None)
        self._thread.join()
        if self._error is not None and exc[0] is None:
            raise self._error


def _error_of(body: bytes) -> str:
    try:
        return str(json.loads(body).get("error", ""))[:300]
    except (ValueError, AttributeError):
        return body[:200].decode("utf-8", "replace")


class NodeCache:
    """Fetched inputs by content hash under ``root/blobs``, at most ``limit`` bytes of them
    (least recently used go first; never one in use)."""

    def __init__(self, root: Path, limit: int):
        self.root = root
        self.blobs = root / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.limit = limit
        self._in_use: dict[str, int] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self.sweep()

    def sweep(self, now: float | None = None) -> list[Path]:
        """Remove what a killed node left that nothing was added to for
        :data:`STALE_SECONDS`: partial blobs (a younger one is continued by the next
        fetch), their locks, and attempts' staging folders. A ``SHA.part`` is never taken
        for the blob: only a whole file whose hash was checked is renamed to ``SHA``."""
        now = time.time() if now is None else now
        removed = []
        for entry in os.scandir(self.blobs):
            stale = now - entry.stat().st_mtime > STALE_SECONDS
            if entry.name.endswith(".part") or (entry.name.endswith(".lock") and not (self.blobs / entry.name[:-5]).exists()):
                if stale:
                    Path(entry.path).unlink(missing_ok=True)
                    removed.append(Path(entry.path))
        attempts = self.root / "attempts"
        for folder in attempts.iterdir() if attempts.is_dir() else ():
            newest = max((p.lstat().st_mtime for p in folder.rglob("*")), default=folder.lstat().st_mtime)
            if now - newest > STALE_SECONDS:
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
        if removed:
            log.info("removed %d stale partial transfer(s) from %s", len(removed), self.root)
        return removed

    @contextlib.contextmanager
    def _exclusive(self, sha: str) -> Iterator[None]:
        """One fetch of a blob at a time: threads of this node, and another node process
        that shares the folder."""
        with self._lock:
            lock = self._locks.setdefault(sha, threading.Lock())
        with lock, open(self.blobs / f"{sha}.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def ensure(self, link: ControllerLink, sha: str, size: int, cancelled: threading.Event | None = None,
               progress: Callable[[int, int], None] | None = None, job: str = "") -> Path:
        """The cached file with ``sha``: there already, or fetched (resuming a ``.part``)."""
        if not _SHA.match(sha):
            raise TransferError(f"{sha!r} is not a sha256")
        done = self.blobs / sha
        self.hold(sha)
        try:
            with self._exclusive(sha):
                if done.exists() and done.stat().st_size == size:
                    os.utime(done)  # recently used
                    return done
                partial = self.blobs / f"{sha}.part"
                for _ in range(2):  # a corrupt file is fetched once more from its start
                    digest = hashlib.sha256()
                    if partial.exists():
                        if partial.stat().st_size > size:
                            partial.unlink()
                        else:
                            sha256_file(partial, into=digest)
                    link.download(sha, partial, digest, cancelled,
                                  (lambda n: progress(n, size)) if progress else None, job)
                    if digest.hexdigest() == sha and partial.stat().st_size == size:
                        os.replace(partial, done)
                        break
                    log.warning("blob %s arrived corrupt (%d bytes, sha256 %s); fetching it again",
                                sha[:12], partial.stat().st_size, digest.hexdigest()[:12])
                    partial.unlink(missing_ok=True)
                else:
                    raise TransferError(f"blob {sha[:12]} arrived corrupt twice")
            self.evict()
            return done
        except BaseException:
            self.release(sha)
            raise

    def hold(self, sha: str) -> None:
        with self._lock:
            self._in_use[sha] = self._in_use.get(sha, 0) + 1

    def release(self, sha: str) -> None:
        with self._lock:
            left = self._in_use.get(sha, 0) - 1
            if left > 0:
                self._in_use[sha] = left
            else:
                self._in_use.pop(sha, None)

    def evict(self) -> None:
        with self._lock:
            in_use = set(self._in_use)
        blobs = []
        for entry in os.scandir(self.blobs):
            if _SHA.match(entry.name):
                stat = entry.stat()
                blobs.append((stat.st_mtime, stat.st_size, entry.name))
        total = sum(size for _, size, _ in blobs)
        for _, size, name in sorted(blobs):
            if total <= self.limit:
                break
            if name in in_use:
                continue
            (self.blobs / name).unlink(missing_ok=True)
            (self.blobs / f"{name}.lock").unlink(missing_ok=True)
            total -= size
            log.info("evicted %s (%d bytes) from the node's transfer cache", name[:12], size)


@dataclass
class Staging:
    """One attempt's staged inputs and local output folder; ``finish`` sends the outputs
    back and maps paths in the result; ``close`` lets go of everything."""

    job: Any
    segment: Any
    folder: Path
    read: list[Path]
    held: list[str]
    cache: NodeCache | None
    link: ControllerLink
    remote_outputs: Path | None  # the controller's folder for this attempt, when outputs go back
    #: controller-side folder -> node-side folder, to put paths in the result back
    mapping: dict[str, str] = field(default_factory=dict)

    def finish(self, result: dict[str, Any]) -> dict[str, Any]:
        from farm.node import unmap_values

        if self.remote_outputs is not None:
            local = self.segment.output_dir
            for path in sorted(local.rglob("*")):
                if path.is_file():
                    self.link.upload(self.segment.attempt_id, path.relative_to(local).as_posix(), path)
        return unmap_values(result, self.mapping)

    def close(self) -> None:
        if self.cache is not None:
            for sha in self.held:
                self.cache.release(sha)
        shutil.rmtree(self.folder, ignore_errors=True)


_caches: dict[str, NodeCache] = {}
_caches_lock = threading.Lock()


def node_cache(config: Any) -> NodeCache:
    root = Path(config.cache).expanduser() if config.cache else default_cache_root()
    with _caches_lock:
        if str(root) not in _caches:
            _caches[str(root)] = NodeCache(root, config.cache_bytes)
        return _caches[str(root)]


def default_cache_root() -> Path:
    from farm.config import cache_dir

    return cache_dir() / "transfer"


def controller_link(node_name: str, rate: int | None) -> ControllerLink | None:
    """How this worker process reaches its controller's API (given by `farm node`), or None."""
    url, bundle_path = os.environ.get(API_ENV), os.environ.get(BUNDLE_ENV)
    if not url or not bundle_path:
        return None
    return ControllerLink(url, _bundle(bundle_path), node_name, rate)


@functools.lru_cache(maxsize=4)
def _bundle(path: str) -> Any:
    from farm.security import Bundle

    return Bundle.load(path)


def needs_staging(config: Any, job: Any) -> tuple[bool, bool]:
    """(fetch inputs, send outputs back): everything for ``node.storage: local``; with
    ``auto``, what this node cannot see (the input; the cluster storage, known by the
    mark the controller leaves in it)."""
    if config.storage == "local":
        return job.input is not None, True
    if config.storage == "shared":
        return False, False
    inputs = job.input is not None and not job.input.exists()
    outputs = not (job.work_dir.parent / STORAGE_MARK).is_file()
    return inputs, outputs


def stage(config: Any, node_name: str, job: Any, segment: Any, cancelled: threading.Event,
          report: Callable[..., None]) -> Staging | None:
    """Fetch what ``segment`` needs and point it at a local output folder, when this node
    does not share storage with the controller; None when it does."""
    inputs, outputs = needs_staging(config, job)
    if not inputs and not outputs:
        return None
    link = controller_link(node_name, config.transfer_rate)
    if link is None and config.storage == "auto":
        return None  # not under `farm node` (farm run, an outside worker): as on shared storage
    if link is None:
        where = job.input if inputs else job.work_dir
        raise TransferError(f"node {node_name} cannot see {where} and has no controller to fetch it from "
                             "(a worker started outside `farm node` needs FARM_NODE_BUNDLE, a copy of the node bundle: see "
                             "docs/cluster.md)")
    cache = node_cache(config)
    folder = cache.root / "attempts" / segment.attempt_id
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    staging = Staging(job, segment, folder, [], [], cache if inputs else None, link,
                      segment.output_dir if outputs else None)
    try:
        if inputs:
            manifest = link.manifest(job.id, cancelled)
            staged_root = folder / "in"
            total = sum(entry["size"] for entry in manifest["files"]) or 1
            done_before = 0
            for entry in manifest["files"]:
                relative = safe_relative(entry["path"])

                def progress(moved: int, size: int, name: str = relative.name, base: int = done_before,
                             sha: str = entry["sha256"]) -> None:
                    report(0.0, f"fetching {name}: {(base + moved) * 100 // total}%", fetched=(sha, moved, size))

                blob = cache.ensure(link, entry["sha256"], entry["size"], cancelled, progress, job.id)
                staging.held.append(entry["sha256"])
                target = staged_root / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(blob, target)
                except OSError:
                    os.symlink(blob, target)
                done_before += entry["size"]
            staging.read.append(staged_root)
            staging.mapping[manifest["root"]] = str(staged_root)
            new_input = staged_root / safe_relative(manifest["input"]) if manifest.get("input") else None
            job = replace(job, input=new_input, input_stamp=None)
        if outputs:
            job = replace(job, work_dir=folder)
            segment = replace(segment, job=job, output_dir=folder / "out")
            staging.mapping[str(staging.remote_outputs)] = str(segment.output_dir)
        else:
            segment = replace(segment, job=job)
        staging.job, staging.segment = job, segment
        return staging
    except OSError as exc:
        staging.close()
        raise TransferError(f"staging the inputs on node {node_name} failed: {exc}") from None
    except BaseException:
        staging.close()
        raise


__all__ = ["ControllerLink", "Depot", "NodeCache", "Staging", "TransferError", "stage", "sha256_file"]

