"""Durable state in SQLite (WAL): the single source of truth.

Every state change is a row, written before it is acted on. Writers batch their
changes with :meth:`Store.transaction` so that a busy scheduler commits once per
round, not once per event. Moves are compare-and-set against the transition table
in :mod:`farm.model`, so a change based on a stale view raises instead of winning.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from farm.config import make_state_dir
from farm.errors import IllegalTransition, OutputConflict, StoreError
from farm.model import TERMINAL_JOB_STATES, check_transition

LOG_LIMIT = 64 * 1024  # bytes of each attempt's log kept in the store (the tail)

SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    origin TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    batch_id TEXT NOT NULL REFERENCES batches(id),
    seq INTEGER NOT NULL,
    input TEXT,
    profile_name TEXT NOT NULL,
    profile TEXT NOT NULL,
    processor TEXT NOT NULL,
    destination TEXT NOT NULL,
    work_dir TEXT NOT NULL,
    priority INTEGER NOT NULL,
    state TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    error TEXT,
    outputs TEXT,
    overwrite INTEGER NOT NULL DEFAULT 0,
    input_stamp TEXT,
    waiting TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_by_batch ON jobs(batch_id);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs(state);
CREATE TABLE IF NOT EXISTS segments (
    id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL REFERENCES jobs(id),
    idx INTEGER NOT NULL,
    label TEXT NOT NULL,
    frames TEXT,
    params TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    result TEXT,
    error TEXT,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS segments_by_job ON segments(job_id, idx);
CREATE TABLE IF NOT EXISTS attempts (
    id TEXT PRIMARY KEY,
    segment_id TEXT NOT NULL REFERENCES segments(id),
    job_id TEXT NOT NULL,
    node TEXT NOT NULL,
    state TEXT NOT NULL,
    started REAL NOT NULL,
    ended REAL,
    exit_status INTEGER,
    reason TEXT,
    log TEXT
);
CREATE INDEX IF NOT EXISTS attempts_by_segment ON attempts(segment_id);
CREATE TABLE IF NOT EXISTS nodes (
    name TEXT PRIMARY KEY,
    paused INTEGER NOT NULL DEFAULT 0,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    kind TEXT NOT NULL,
    job_id TEXT,
    segment_id TEXT,
    attempt_id TEXT,
    data TEXT
);
-- output claims: every path a job will write, claimed at submission (or, for outputs
-- known only once they exist, at delivery) so that two unfinished jobs never write the
-- same file. A job's claims are released when it ends.
CREATE TABLE IF NOT EXISTS claims (
    path TEXT PRIMARY KEY,
    job_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS claims_by_job ON claims(job_id);
-- droplets (farm.droplets): the exactly-once ledger of dropped files, one row per file
-- seen (state submitted -> processed | failed; skipped for a duplicate), keyed by the
-- watched folder; and the state each running droplet last reported.
CREATE TABLE IF NOT EXISTS droplet_files (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    folder TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    digest TEXT NOT NULL,
    state TEXT NOT NULL,
    job_id TEXT,
    reason TEXT,
    moved_to TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS droplet_files_by_path ON droplet_files(folder, path);
CREATE INDEX IF NOT EXISTS droplet_files_by_digest ON droplet_files(folder, digest);
CREATE INDEX IF NOT EXISTS droplet_files_by_state ON droplet_files(folder, state);
-- leases (farm.lease): every batch belongs to one living process, its owner (a controller,
-- one `farm run`, one `farm watch`). The owner beats (heartbeat) while it lives; a lease
-- ended, unbeaten for ``ttl`` seconds, or whose process is gone makes the unfinished jobs
-- of its batches `interrupted`.
CREATE TABLE IF NOT EXISTS leases (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    pid_start TEXT,
    started REAL NOT NULL,
    heartbeat REAL NOT NULL,
    ttl REAL NOT NULL,
    ended REAL,
    end_reason TEXT
);
CREATE TABLE IF NOT EXISTS droplets (
    folder TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    message TEXT,
    info TEXT,
    pid INTEGER,
    host TEXT,
    updated REAL NOT NULL
);
"""


#: Columns added after a store was first made: (table, column, declaration). A store made
#: by an older version gets them when it is opened (SQLite has no ADD COLUMN IF NOT EXISTS).
MIGRATIONS: tuple[tuple[str, str, str], ...] = (
    ("batches", "owner", "TEXT"),        # the lease of the process that runs the batch
    ("batches", "fingerprint", "TEXT"),  # what `farm run` ran (profile, inputs, destination): to resume it
    # each job's segments, counted by the triggers below: a list of jobs costs what it
    # shows, not a count over every segment (1,000 jobs of 1,000 segments: 650 ms -> 6 ms)
    ("jobs", "segments_total", "INTEGER NOT NULL DEFAULT 0"),
    ("jobs", "segments_done", "INTEGER NOT NULL DEFAULT 0"),
)
#: How a column added to an existing store gets its values, in the same transaction.
BACKFILLS = {
    ("jobs", "segments_total"): "UPDATE jobs SET segments_total = (SELECT COUNT(*) FROM segments WHERE job_id = jobs.id)",
    ("jobs", "segments_done"): "UPDATE jobs SET segments_done ="
                               " (SELECT COUNT(*) FROM segments WHERE job_id = jobs.id AND state = 'done')",
}
#: Kept in SQLite itself, so that every writer (and every path that moves, adds, drops
#: or deletes segments) keeps the counts true.
TRIGGERS = """
CREATE TRIGGER IF NOT EXISTS segment_added AFTER INSERT ON segments BEGIN
    UPDATE jobs SET segments_total = segments_total + 1, segments_done = segments_done + (new.state = 'done')
    WHERE id = new.job_id;
END;
CREATE TRIGGER IF NOT EXISTS segment_removed AFTER DELETE ON segments BEGIN
    UPDATE jobs SET segments_total = segments_total - 1, segments_done = segments_done - (old.state = 'done')
    WHERE id = old.job_id;
END;
CREATE TRIGGER IF NOT EXISTS segment_done_changed AFTER UPDATE OF state ON segments
WHEN (old.state = 'done') != (new.state = 'done') BEGIN
    UPDATE jobs SET segments_done = segments_done + (new.state = 'done') - (old.state = 'done') WHERE id = new.job_id;
END;
-- a job's first start is the first of its attempts: (job_id, started) finds it at once
CREATE INDEX IF NOT EXISTS attempts_by_job_started ON attempts(job_id, started);
DROP INDEX IF EXISTS attempts_by_job;
"""


def _migrate(db: sqlite3.Connection) -> None:
    for table, column, declaration in MIGRATIONS:
        present = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        if column not in present:
            try:
                db.execute("BEGIN IMMEDIATE")
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
                if (table, column) in BACKFILLS:
                    db.execute(BACKFILLS[table, column])
                db.execute("COMMIT")
            except sqlite3.OperationalError as exc:  # another process added it in between
                if db.in_transaction:
                    db.execute("ROLLBACK")
                if "duplicate column" not in str(exc):
                    raise


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, default=str)


def _make_private(path: Path) -> None:
    """The store holds profiles with their ``env`` values and every job's log: only its
    owner may read it. Its folder is made 0700 when the store creates it (a folder that
    already exists keeps its mode: it may be one the user chose, shared with other
    things); the database and its -wal and -shm files are 0600, old ones included."""
    make_state_dir(path.parent)
    try:  # created 0600 before SQLite opens it: SQLite gives -wal and -shm the same mode
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    for name in (path.name, f"{path.name}-wal", f"{path.name}-shm"):
        file = path.with_name(name)
        try:
            if os.stat(file).st_mode & 0o077 and os.stat(file).st_uid == os.geteuid():
                os.chmod(file, 0o600)
        except FileNotFoundError:
            pass


class Store:
    def __init__(self, path: Path, busy_timeout: float = 30.0):
        """``busy_timeout``: seconds a write waits for another process's lock before failing."""
        self.path = Path(path)
        from farm import sandbox

        sandbox.hide(self.path.parent)  # the store and the work folders of every job
        deadline = time.monotonic() + busy_timeout
        while True:
            try:
                _make_private(self.path)
                self._db = sqlite3.connect(
                    self.path, isolation_level=None, check_same_thread=False, timeout=busy_timeout
                )
                self._db.row_factory = sqlite3.Row
                self._prepare()
                break
            except sqlite3.OperationalError as exc:
                # Two processes opening a new store at once: switching it to WAL takes an
                # exclusive lock, and SQLite answers "locked" at once instead of waiting.
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise StoreError(f"cannot open the state store at {self.path}: {exc}") from None
                self._db.close()
                time.sleep(0.05)
            except (OSError, sqlite3.Error) as exc:
                raise StoreError(f"cannot open the state store at {self.path}: {exc}") from None
        self._lock = threading.RLock()
        self._depth = 0

    def _prepare(self) -> None:
        # a new store gives deleted pages back to the file system in steps (reclaim_space)
        self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        _migrate(self._db)
        self._db.execute("CREATE INDEX IF NOT EXISTS batches_by_fingerprint ON batches(fingerprint)")
        self._db.executescript(TRIGGERS)

    def close(self) -> None:
        self._db.close()

    # -- transactions -----------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Group writes into one commit; nested use joins the outer transaction."""
        with self._lock:
            outer = self._depth == 0
            if outer:
                self._execute("BEGIN IMMEDIATE")
            self._depth += 1
            try:
                yield
            except BaseException:
                self._depth -= 1
                if outer:
                    self._rollback()
                raise
            self._depth -= 1
            if outer:
                try:
                    self._execute("COMMIT")
                except StoreError:
                    self._rollback()  # else the connection keeps the write lock and every later BEGIN fails
                    raise

    def _rollback(self) -> None:
        # A full disk makes SQLite roll the transaction back by itself; a second ROLLBACK
        # would then raise "no transaction is active" and hide the real reason.
        if self._db.in_transaction:
            self._execute("ROLLBACK")

    def _one(self, sql: str, params: Any = ()) -> sqlite3.Row | None:
        """The first row; the statement is finished at once, because a half-read cursor
        keeps its read snapshot open and later reads on this connection would see old data."""
        rows = self._rows(sql, params)
        return rows[0] if rows else None

    def _rows(self, sql: str, params: Any = ()) -> list[sqlite3.Row]:
        """All rows, read under the lock: threads share this connection, and one thread's
        unfinished statement would pin another's reads to an old snapshot."""
        with self._lock:
            return self._execute(sql, params).fetchall()

    def _execute(self, sql: str, params: Any = ()) -> sqlite3.Cursor:
        try:
            with self._lock:
                return self._db.execute(sql, params)
        except sqlite3.OperationalError as exc:
            raise StoreError(f"the state store at {self.path} cannot be written: {exc}") from None

    def _write(self, sql: str, params: Any = ()) -> sqlite3.Cursor:
        with self.transaction():
            return self._execute(sql, params)

    # -- writing ----------------------------------------------------------------------

    def add_batch(self, batch_id: str, origin: str, jobs: list[dict[str, Any]], segments: list[dict[str, Any]],
                  claims: dict[str, list[str]] | None = None, owner: str | None = None,
                  fingerprint: str | None = None) -> None:
        """Store a batch; ``claims`` (job id -> output paths) are claimed in the same
        transaction, so that of two submissions racing for a path exactly one is stored."""
        now = time.time()
        with self.transaction():
            taken: dict[str, str] = {}  # checked before any write, so a refusal leaves nothing behind
            for job_id, paths in (claims or {}).items():
                self._check_claims(job_id, paths)
                for path in paths:
                    if taken.setdefault(path, job_id) != job_id:
                        raise OutputConflict(f"{path} would be written by two jobs of this batch ({taken[path]} "
                                             f"and {job_id}); give their outputs different names")
            self._execute("INSERT INTO batches(id, created, origin, owner, fingerprint) VALUES (?, ?, ?, ?, ?)",
                          (batch_id, now, origin, owner, fingerprint))
            self._db.executemany(
                "INSERT INTO jobs(id, batch_id, seq, input, profile_name, profile, processor, destination,"
                " work_dir, priority, state, created, updated, error, overwrite, input_stamp)"
                " VALUES (:id, :batch_id, :seq, :input, :profile_name, :profile, :processor, :destination,"
                " :work_dir, :priority, :state, :created, :created, :error, :overwrite, :input_stamp)",
                [{"error": None, "created": now, "overwrite": 0, "input_stamp": None, **job} for job in jobs],
            )
            self.add_segments(segments)
            for job_id, paths in (claims or {}).items():
                self._insert_claims(job_id, paths)
            self.event("batch_submitted", data={"batch": batch_id, "jobs": len(jobs)})

    def claim(self, job_id: str, paths: list[str]) -> None:
        """Claim output paths for a job, or raise :class:`OutputConflict` naming the
        unfinished job that holds one of them (claims of ended jobs are free)."""
        with self.transaction():
            self._check_claims(job_id, paths)
            self._insert_claims(job_id, paths)

    def _check_claims(self, job_id: str, paths: list[str]) -> None:
        unique = sorted(set(paths))
        live: list[sqlite3.Row] = []
        for start in range(0, len(unique), 500):
            chunk = unique[start:start + 500]
            marks = ",".join("?" * len(chunk))
            live += [row for row in self._rows(
                f"SELECT c.path, c.job_id, j.state FROM claims c JOIN jobs j ON j.id = c.job_id"
                f" WHERE c.path IN ({marks}) AND c.job_id != ? ORDER BY c.path", [*chunk, job_id])
                if row["state"] not in TERMINAL_JOB_STATES]
        if live:
            first = live[0]
            more = f" and {len(live) - 1} more" if len(live) > 1 else ""
            raise OutputConflict(
                f"{first['path']}{more} will be written by job {first['job_id']} ({first['state']}), "
                f"which has not finished; wait for it, cancel it (farm cancel {first['job_id']}), "
                "or choose another destination")

    def _insert_claims(self, job_id: str, paths: list[str]) -> None:
        try:
            with self._lock:
                self._db.executemany("INSERT OR REPLACE INTO claims(path, job_id) VALUES (?, ?)",
                                     [(path, job_id) for path in sorted(set(paths))])
        except sqlite3.OperationalError as exc:
            raise StoreError(f"the state store at {self.path} cannot be written: {exc}") from None

    def release_claims(self, job_id: str) -> None:
        self._write("DELETE FROM claims WHERE job_id = ?", (job_id,))

    def add_segments(self, segments: list[dict[str, Any]]) -> None:
        """Segments added to a running job (a re-cut, or a re-run after verification)."""
        now = time.time()
        with self.transaction():
            self._db.executemany(
                "INSERT INTO segments(id, job_id, idx, label, frames, params, state, updated)"
                " VALUES (:id, :job_id, :idx, :label, :frames, :params, 'queued', :now)",
                [{**seg, "frames": _json(seg["frames"]), "params": _json(seg["params"]), "now": now}
                 for seg in segments],
            )

    def drop_unstarted_segments(self, segment_ids: list[str]) -> None:
        """Remove queued segments that never ran (their frames were re-cut into others)."""
        marks = ",".join("?" * len(segment_ids))
        with self.transaction():
            cursor = self._execute(
                f"DELETE FROM segments WHERE id IN ({marks}) AND state = 'queued' AND attempts = 0", segment_ids
            )
            if cursor.rowcount != len(segment_ids):
                raise IllegalTransition(f"segments {', '.join(segment_ids)}: only queued, never-run segments can be re-cut")

    def _move(self, table: str, kind: str, entity_id: str, old: str, new: str, fields: dict[str, Any]) -> None:
        check_transition(kind, entity_id, old, new)
        assignments = "".join(f", {name} = :{name}" for name in fields)
        params = {**fields, "id": entity_id, "old": old, "new": new, "now": time.time()}
        stamp = ", updated = :now" if table != "attempts" else ""
        cursor = self._write(
            f"UPDATE {table} SET state = :new{stamp}{assignments} WHERE id = :id AND state = :old", params
        )
        if cursor.rowcount != 1:
            row = self._one(f"SELECT state FROM {table} WHERE id = ?", (entity_id,))
            actual = row["state"] if row else "missing"
            raise IllegalTransition(f"{kind} {entity_id}: expected state {old}, found {actual}")

    def move_job(self, job_id: str, old: str, new: str, **fields: Any) -> None:
        if "outputs" in fields:
            fields["outputs"] = _json(fields["outputs"])
        with self.transaction():
            self._move("jobs", "job", job_id, old, new, fields)
            if new in TERMINAL_JOB_STATES:  # an ended job writes nothing more: its outputs are free
                self.release_claims(job_id)
            self.event(f"job_{new}", job_id=job_id, data={"error": fields.get("error")} if fields.get("error") else None)

    def move_segment(self, segment_id: str, old: str, new: str, **fields: Any) -> None:
        if "result" in fields:
            fields["result"] = _json(fields["result"])
        self._move("segments", "segment", segment_id, old, new, fields)

    def hand_out(self, attempt_id: str, segment_id: str, job_id: str, node: str, number: int, old: str) -> None:
        """A segment handed to a node: the segment moves from ``old`` to running with its
        attempt count, and its attempt starts (what the dispatch loop writes per segment,
        in as few statements as it takes)."""
        with self.transaction():
            self._move("segments", "segment", segment_id, old, "running", {"attempts": number})
            self._execute(
                "INSERT INTO attempts(id, segment_id, job_id, node, state, started) VALUES (?, ?, ?, ?, 'running', ?)",
                (attempt_id, segment_id, job_id, node, time.time()),
            )
            self.event("attempt_started", job_id=job_id, segment_id=segment_id, attempt_id=attempt_id, data={"node": node})

    def start_attempt(self, attempt_id: str, segment_id: str, job_id: str, node: str, number: int) -> None:
        with self.transaction():
            self._execute(
                "INSERT INTO attempts(id, segment_id, job_id, node, state, started) VALUES (?, ?, ?, ?, 'running', ?)",
                (attempt_id, segment_id, job_id, node, time.time()),
            )
            self._execute("UPDATE segments SET attempts = ? WHERE id = ?", (number, segment_id))
            self.event("attempt_started", job_id=job_id, segment_id=segment_id, attempt_id=attempt_id, data={"node": node})

    def end_attempt(
        self,
        attempt_id: str,
        new: str,
        *,
        exit_status: int | None = None,
        reason: str | None = None,
        log: str | None = None,
    ) -> None:
        if log is not None and len(log) > LOG_LIMIT:
            log = "[... earlier output cut ...]\n" + log[-LOG_LIMIT:]
        with self.transaction():
            self._move(
                "attempts", "attempt", attempt_id, "running", new,
                {"ended": time.time(), "exit_status": exit_status, "reason": reason, "log": log},
            )
            self.event(f"attempt_{new}", attempt_id=attempt_id, data={"reason": reason} if reason else None)

    def event(self, kind: str, *, job_id: str | None = None, segment_id: str | None = None,
              attempt_id: str | None = None, data: dict[str, Any] | None = None) -> None:
        self._write(
            "INSERT INTO events(ts, kind, job_id, segment_id, attempt_id, data) VALUES (?, ?, ?, ?, ?, ?)",
            (time.time(), kind, job_id, segment_id, attempt_id, _json(data)),
        )

    def set_node_paused(self, name: str, paused: bool) -> None:
        with self.transaction():
            self._execute(
                "INSERT INTO nodes(name, paused, updated) VALUES (?, ?, ?)"
                " ON CONFLICT(name) DO UPDATE SET paused = excluded.paused, updated = excluded.updated",
                (name, int(paused), time.time()),
            )
            self.event("node_paused" if paused else "node_resumed", data={"node": name})

    def paused_nodes(self) -> set[str]:
        return {row["name"] for row in self._rows("SELECT name FROM nodes WHERE paused = 1")}

    def set_priority(self, job_id: str, priority: int) -> None:
        self._write("UPDATE jobs SET priority = ?, updated = ? WHERE id = ?", (priority, time.time(), job_id))
        self.event("job_priority", job_id=job_id, data={"priority": priority})

    def set_waiting(self, job_id: str, reason: str | None) -> None:
        """Why a queued job is not running (no node offers what it needs, ...), or None."""
        self._write("UPDATE jobs SET waiting = ? WHERE id = ?", (reason, job_id))

    def clear_cancel(self, job_id: str) -> None:
        self._write("UPDATE jobs SET cancel_requested = 0 WHERE id = ?", (job_id,))

    def request_cancel(self, job_id: str) -> bool:
        """Ask whoever runs the job to cancel it; False when there is no such job."""
        cursor = self._write("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
        return cursor.rowcount == 1

    # -- leases (farm.lease) ------------------------------------------------------------

    def add_lease(self, lease_id: str, kind: str, host: str, pid: int, pid_start: str | None, ttl: float) -> None:
        now = time.time()
        self._write(
            "INSERT INTO leases(id, kind, host, pid, pid_start, started, heartbeat, ttl) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (lease_id, kind, host, pid, pid_start, now, now, ttl),
        )

    def beat_lease(self, lease_id: str) -> bool:
        """Renew a lease; False when it has ended (it lapsed and was taken, or was released)."""
        cursor = self._write("UPDATE leases SET heartbeat = ? WHERE id = ? AND ended IS NULL", (time.time(), lease_id))
        return cursor.rowcount == 1

    def end_lease(self, lease_id: str, reason: str, heartbeat: float | None = None) -> bool:
        """End a lease; with ``heartbeat``, only if it was not renewed since that beat was read."""
        sql = "UPDATE leases SET ended = ?, end_reason = ? WHERE id = ? AND ended IS NULL"
        params: tuple[Any, ...] = (time.time(), reason, lease_id)
        if heartbeat is not None:
            sql += " AND heartbeat = ?"
            params += (heartbeat,)
        return self._write(sql, params).rowcount == 1

    def lease(self, lease_id: str | None) -> sqlite3.Row | None:
        return self._one("SELECT * FROM leases WHERE id = ?", (lease_id,)) if lease_id else None

    def set_batch_owner(self, batch_id: str, owner: str | None) -> None:
        self._write("UPDATE batches SET owner = ? WHERE id = ?", (owner, batch_id))

    def owners_of_active_batches(self) -> list[sqlite3.Row]:
        """``(batch id, owner)`` of every batch with a job its owner still works on."""
        return self._rows(
            "SELECT DISTINCT b.id, b.owner FROM batches b JOIN jobs j ON j.batch_id = b.id"
            " WHERE j.state IN ('queued', 'running', 'paused', 'assembling')"
        )

    def unfinished_job_owners(self) -> list[sqlite3.Row]:
        """``(id, state, owner)`` of every unfinished job, oldest first (no stored profiles)."""
        return self._rows(
            "SELECT j.id, j.state, b.owner FROM jobs j JOIN batches b ON b.id = j.batch_id"
            " WHERE j.state NOT IN ('done', 'failed', 'cancelled') ORDER BY j.created, j.seq"
        )

    def batches_by_fingerprint(self, fingerprint: str) -> list[sqlite3.Row]:
        return self._rows("SELECT * FROM batches WHERE fingerprint = ? ORDER BY created DESC", (fingerprint,))

    def running_attempts(self, job_id: str) -> list[sqlite3.Row]:
        return self._rows("SELECT * FROM attempts WHERE job_id = ? AND state = 'running'", (job_id,))

    # -- reading ----------------------------------------------------------------------

    def cancel_requests(self, job_ids: list[str]) -> set[str]:
        if not job_ids:
            return set()
        marks = ",".join("?" * len(job_ids))
        rows = self._rows(
            f"SELECT id FROM jobs WHERE cancel_requested = 1 AND id IN ({marks})", job_ids
        )
        return {row["id"] for row in rows}

    def unfinished_jobs(self) -> list[sqlite3.Row]:
        return self._rows(
            "SELECT * FROM jobs WHERE state NOT IN ('done', 'failed', 'cancelled') ORDER BY created, seq"
        )

    def job_states(self) -> dict[str, str]:
        """Every job's state, by id."""
        return {row["id"]: row["state"] for row in self._rows("SELECT id, state FROM jobs")}

    def destinations(self) -> list[str]:
        """Every destination a job of this store was given."""
        return [row["destination"] for row in self._rows("SELECT DISTINCT destination FROM jobs ORDER BY destination")]

    def job(self, job_id: str) -> sqlite3.Row | None:
        return self._one("SELECT * FROM jobs WHERE id = ?", (job_id,))

    def jobs(self, batch_id: str | None = None) -> list[sqlite3.Row]:
        if batch_id is None:
            return self._rows("SELECT * FROM jobs ORDER BY created, seq")
        return self._rows("SELECT * FROM jobs WHERE batch_id = ? ORDER BY seq", (batch_id,))

    def segments(self, job_id: str) -> list[sqlite3.Row]:
        return self._rows("SELECT * FROM segments WHERE job_id = ? ORDER BY idx", (job_id,))

    def segments_in(self, job_id: str, state: str) -> list[sqlite3.Row]:
        return self._rows("SELECT * FROM segments WHERE job_id = ? AND state = ? ORDER BY idx", (job_id, state))

    def segments_from(self, job_id: str, first: int, limit: int | None = None) -> list[sqlite3.Row]:
        """A job's segments from index ``first`` on, in order (``limit`` of them at most)."""
        return self._rows("SELECT * FROM segments WHERE job_id = ? AND idx >= ? ORDER BY idx LIMIT ?",
                          (job_id, first, -1 if limit is None else limit))

    def fresh_from(self, job_id: str) -> tuple[int, int]:
        """Where a job's segments that never ran begin: the index after the last one that
        ran or left the queue, and how many come from there."""
        row = self._one("SELECT COALESCE(MAX(idx), -1) + 1 AS tail FROM segments"
                        " WHERE job_id = ? AND (state != 'queued' OR attempts > 0)", (job_id,))
        tail = row["tail"] if row else 0
        count = self._one("SELECT COUNT(*) AS n FROM segments WHERE job_id = ? AND idx >= ?", (job_id, tail))
        return tail, count["n"] if count else 0

    def cancel_queued_from(self, job_id: str, first: int) -> None:
        """Cancel a job's queued segments from index ``first`` on (those never loaded)."""
        self._write("UPDATE segments SET state = 'cancelled', updated = ? WHERE job_id = ? AND idx >= ?"
                    " AND state = 'queued'", (time.time(), job_id, first))

    def attempts(self, *, segment_id: str | None = None, job_id: str | None = None) -> list[sqlite3.Row]:
        if segment_id is not None:
            return self._rows(
                "SELECT * FROM attempts WHERE segment_id = ? ORDER BY started", (segment_id,)
            )
        return self._rows("SELECT * FROM attempts WHERE job_id = ? ORDER BY started", (job_id,))

    def job_summaries(self, batch_id: str | None = None, state: str | None = None) -> list[sqlite3.Row]:
        """Jobs with their segment counts and first start, in one query (what lists of
        many jobs need: the API and the monitor)."""
        return self._summaries(batch_id, state)

    def job_summaries_json(self, batch_id: str | None = None, state: str | None = None) -> bytes:
        """The list :meth:`job_summaries` gives, as the JSON array of
        :func:`farm.api.job_document`'s, written by SQLite: the longest list the API serves,
        read by every open monitor, costs less than half the time this way (1,000 jobs: 4 ms
        against 10 ms built and encoded in Python). Times keep 17 digits (SQLite writes 15),
        so that they read back as the same floats; tests/test_store.py holds the two to the
        same documents."""
        def exact(column: str) -> str:
            return f"CASE WHEN {column} IS NULL THEN NULL ELSE json(printf('%!.17g', {column})) END"

        document = (
            "json_object('id', id, 'batch', batch_id, 'input', input, 'profile', profile_name,"
            " 'processor', processor, 'destination', destination, 'priority', priority, 'state', state,"
            " 'error', error, 'waiting', waiting, 'outputs', json(COALESCE(outputs, '[]')),"
            f" 'created', {exact('created')}, 'updated', {exact('updated')}, 'started', {exact('first_start')},"
            " 'segments', segments_total, 'segments_done', COALESCE(segments_done, 0))")
        rows = self._summaries(batch_id, state, select=document)
        return b"[" + b",".join(row[0].encode() for row in rows) + b"]"

    def job_summaries_of(self, job_ids: list[str]) -> list[sqlite3.Row]:
        return self._summaries(ids=job_ids) if job_ids else []

    def _summaries(self, batch_id: str | None = None, state: str | None = None,
                   ids: list[str] | None = None, select: str = "*") -> list[sqlite3.Row]:
        conditions: list[str] = []
        params: list[Any] = []
        if ids is not None:
            conditions.append(f"j.id IN ({', '.join('?' for _ in ids)})")
            params.extend(ids)
        if batch_id is not None:
            conditions.append("j.batch_id = ?")
            params.append(batch_id)
        if state is not None:
            conditions.append("j.state = ?")
            params.append(state)
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        return self._rows(
            # every column but the stored profile, which lists never show and which is the bulk of a row
            f"SELECT {select} FROM (SELECT j.id, j.batch_id, j.seq, j.input, j.profile_name, j.processor,"
            " j.destination, j.priority, j.state, j.created, j.updated, j.error, j.outputs, j.waiting,"
            # counted by the store's triggers; the first start through an index: a job costs
            # the same to list whatever number of segments it has
            " j.segments_total, j.segments_done,"
            " (SELECT MIN(started) FROM attempts WHERE job_id = j.id) AS first_start"
            f" FROM jobs j {where}) ORDER BY created, seq", params)

    def data_version(self) -> int:
        """Changes whenever another connection commits (SQLite's data_version): what this
        connection read before is still true while it stays the same."""
        return self._rows("PRAGMA data_version")[0][0]

    def batches(self) -> list[sqlite3.Row]:
        return self._rows("SELECT * FROM batches ORDER BY created")

    def batch(self, batch_id: str) -> sqlite3.Row | None:
        return self._one("SELECT * FROM batches WHERE id = ?", (batch_id,))

    def attempt(self, attempt_id: str) -> sqlite3.Row | None:
        return self._one("SELECT * FROM attempts WHERE id = ?", (attempt_id,))

    def events_after(self, after: int = 0, job_id: str | None = None, limit: int = 500) -> list[sqlite3.Row]:
        if job_id is None:
            return self._rows("SELECT * FROM events WHERE id > ? ORDER BY id LIMIT ?", (after, limit))
        return self._rows("SELECT * FROM events WHERE id > ? AND job_id = ? ORDER BY id LIMIT ?",
                          (after, job_id, limit))

    def events(self, job_id: str | None = None) -> list[sqlite3.Row]:
        if job_id is None:
            return self._rows("SELECT * FROM events ORDER BY id")
        return self._rows("SELECT * FROM events WHERE job_id = ? ORDER BY id", (job_id,))

    # -- droplets (farm.droplets): the ledger of dropped files ------------------------------
    # One row per file a droplet took: ``submitted`` (with its job) in the same transaction
    # as the job, then ``processed`` or ``failed`` once the job ended; ``skipped`` for a
    # duplicate of content already submitted. Keyed by the watched folder, not the
    # droplet's name, so a renamed droplet keeps its history.

    def droplet_add(self, folder: str, path: str, size: int, mtime_ns: int, digest: str, state: str,
                    job_id: str | None = None, reason: str | None = None, moved_to: str | None = None) -> int:
        now = time.time()
        cursor = self._write(
            "INSERT INTO droplet_files(folder, path, size, mtime_ns, digest, state, job_id, reason, moved_to,"
            " created, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (folder, path, size, mtime_ns, digest, state, job_id, reason, moved_to, now, now),
        )
        return int(cursor.lastrowid or 0)

    def droplet_finish(self, row_id: int, state: str, reason: str | None = None, moved_to: str | None = None) -> None:
        """End a ``submitted`` row; a row that is not ``submitted`` any more is left alone."""
        self._write(
            "UPDATE droplet_files SET state = ?, reason = ?, moved_to = ?, updated = ? WHERE id = ? AND state = 'submitted'",
            (state, reason, moved_to, time.time(), row_id),
        )

    def droplet_seen(self, folder: str, path: str, size: int, mtime_ns: int) -> sqlite3.Row | None:
        """The newest row for this very file (same path, size and mtime), if any."""
        return self._one(
            "SELECT * FROM droplet_files WHERE folder = ? AND path = ? AND size = ? AND mtime_ns = ?"
            " ORDER BY id DESC LIMIT 1", (folder, path, size, mtime_ns),
        )

    def droplet_taken(self, folder: str, digest: str) -> sqlite3.Row | None:
        """The first row that submitted this content (``submitted`` or ``processed``), if any."""
        return self._one(
            "SELECT * FROM droplet_files WHERE folder = ? AND digest = ? AND state IN ('submitted', 'processed')"
            " ORDER BY id LIMIT 1", (folder, digest),
        )

    def droplet_pending(self, folder: str) -> list[sqlite3.Row]:
        return self._rows(
            "SELECT * FROM droplet_files WHERE folder = ? AND state = 'submitted' ORDER BY id", (folder,)
        )

    def droplet_files(self, folder: str | None = None, limit: int = 20) -> list[sqlite3.Row]:
        """The newest rows (of one folder, or all), newest first."""
        if folder is None:
            return self._rows("SELECT * FROM droplet_files ORDER BY id DESC LIMIT ?", (limit,))
        return self._rows(
            "SELECT * FROM droplet_files WHERE folder = ? ORDER BY id DESC LIMIT ?", (folder, limit)
        )

    def droplet_job_states(self, job_ids: list[str]) -> dict[str, sqlite3.Row]:
        """``{job id: (id, state, error, outputs)}`` for the jobs that exist."""
        found: dict[str, sqlite3.Row] = {}
        for start in range(0, len(job_ids), 500):
            chunk = job_ids[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for row in self._rows(
                f"SELECT id, state, error, outputs FROM jobs WHERE id IN ({marks})", chunk
            ):
                found[row["id"]] = row
        return found

    def droplet_report(self, folder: str, name: str, state: str, message: str | None,
                       info: dict[str, Any] | None, pid: int | None, host: str | None) -> None:
        """What a running droplet says of itself (watching, folder missing, stopped, ...)."""
        self._write(
            "INSERT INTO droplets(folder, name, state, message, info, pid, host, updated)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(folder) DO UPDATE SET name = excluded.name,"
            " state = excluded.state, message = excluded.message, info = excluded.info, pid = excluded.pid,"
            " host = excluded.host, updated = excluded.updated",
            (folder, name, state, message, _json(info), pid, host, time.time()),
        )

    def droplet_states(self) -> list[sqlite3.Row]:
        return self._rows("SELECT * FROM droplets ORDER BY name")

    # -- history: recent jobs, and purging finished ones (farm.purge) -----------------------

    def recent_jobs(self, limit: int) -> list[sqlite3.Row]:
        """The ``limit`` most recently submitted jobs, oldest first."""
        return self._rows("SELECT * FROM (SELECT * FROM jobs ORDER BY created DESC, seq DESC LIMIT ?)"
                          " ORDER BY created, seq", (limit,))

    def job_count(self) -> int:
        return self._rows("SELECT COUNT(*) FROM jobs")[0][0]

    def finished_jobs_before(self, before: float) -> list[sqlite3.Row]:
        """Jobs that ended (done, failed, cancelled) before ``before``, oldest first; a job
        whose end a droplet has not recorded yet (its ledger row still ``submitted``) stays."""
        terminal = ",".join(f"'{state}'" for state in sorted(TERMINAL_JOB_STATES))
        return self._rows(
            "SELECT id, batch_id, state, updated, input, profile_name, work_dir FROM jobs"
            f" WHERE state IN ({terminal}) AND updated < ? AND NOT EXISTS"
            " (SELECT 1 FROM droplet_files d WHERE d.job_id = jobs.id AND d.state = 'submitted')"
            " ORDER BY updated", (before,))

    def reclaim_space(self) -> None:
        """Shrink the file after rows were deleted: free pages are given back (a store made
        before incremental vacuuming is rewritten once with VACUUM, which turns it on), and
        the write-ahead log is emptied."""
        with self._lock:
            if self._db.in_transaction:  # never inside another's transaction: the next purge does it
                return
            if self._one("PRAGMA auto_vacuum")[0] == 2:  # incremental
                try:  # run to its end: stepped once (as execute does), it frees one page
                    self._db.executescript("PRAGMA incremental_vacuum;")
                except sqlite3.OperationalError as exc:
                    raise StoreError(f"the state store at {self.path} cannot be written: {exc}") from None
            else:
                self._execute("PRAGMA auto_vacuum=INCREMENTAL")
                self._execute("VACUUM")
            self._rows("PRAGMA wal_checkpoint(TRUNCATE)")

    def purge_jobs(self, job_ids: list[str], before: float) -> list[str]:
        """Delete these jobs, if they are still finished, with their segments, attempts
        (their logs), events and claims; then the batches left without jobs and the events
        of no job older than ``before``. Returns the ids deleted."""
        terminal = ",".join(f"'{state}'" for state in sorted(TERMINAL_JOB_STATES))
        gone: list[str] = []
        with self.transaction():
            for start in range(0, len(job_ids), 500):
                chunk = job_ids[start:start + 500]
                marks = ",".join("?" * len(chunk))
                rows = self._rows(f"SELECT id, batch_id FROM jobs WHERE id IN ({marks}) AND state IN ({terminal})",
                                  chunk)
                ids = [row["id"] for row in rows]
                if not ids:
                    continue
                marks = ",".join("?" * len(ids))
                # the jobs first: their segments' triggers then find no job to count for
                self._execute(f"DELETE FROM jobs WHERE id IN ({marks})", ids)
                for table in ("attempts", "segments", "events", "claims"):
                    self._execute(f"DELETE FROM {table} WHERE job_id IN ({marks})", ids)
                batches = sorted({row["batch_id"] for row in rows})
                self._execute(f"DELETE FROM batches WHERE id IN ({','.join('?' * len(batches))})"
                              " AND NOT EXISTS (SELECT 1 FROM jobs WHERE jobs.batch_id = batches.id)", batches)
                gone += ids
            self._execute("DELETE FROM events WHERE job_id IS NULL AND ts < ?", (before,))
        return gone
