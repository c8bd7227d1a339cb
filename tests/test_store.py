"""The store and the transition table: legal moves persist, illegal ones name the entity."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from farm.errors import IllegalTransition
from farm.model import TRANSITIONS, check_transition
from farm.store import LOG_LIMIT, Store


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "farm.db")
    job = {"id": "j1", "batch_id": "b1", "seq": 0, "input": None, "profile_name": "p", "profile": "{}",
           "processor": "command", "destination": "/d", "work_dir": "/w", "priority": 0, "state": "queued"}
    s.add_batch("b1", "test", [job], [{"id": "j1.s0", "job_id": "j1", "idx": 0, "label": "frames 1-2",
                                       "frames": [1, 2], "params": {}}])
    yield s
    s.close()


def test_store_is_sqlite_in_wal_mode(store):
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_job_runs_to_done_and_every_change_is_an_event(store, tmp_path):
    store.move_job("j1", "queued", "running")
    store.move_segment("j1.s0", "queued", "running")
    store.start_attempt("j1.s0.a1", "j1.s0", "j1", "node-a", 1)
    store.end_attempt("j1.s0.a1", "done", exit_status=0, log="ok")
    store.move_segment("j1.s0", "running", "done", result={"files": ["a"]})
    store.move_job("j1", "running", "assembling")
    store.move_job("j1", "assembling", "done", outputs=["/d/a"])
    store.close()
    reopened = Store(tmp_path / "farm.db")  # the truth survives the process
    assert reopened.job("j1")["state"] == "done"
    assert reopened.segments("j1")[0]["state"] == "done"
    attempt = reopened.attempts(segment_id="j1.s0")[0]
    assert (attempt["node"], attempt["state"], attempt["exit_status"]) == ("node-a", "done", 0)
    kinds = [row["kind"] for row in reopened.events()]
    assert kinds == ["batch_submitted", "job_running", "attempt_started", "attempt_done", "job_assembling", "job_done"]
    reopened.close()


@pytest.mark.parametrize("kind", sorted(TRANSITIONS))
def test_every_illegal_move_in_the_table_raises_naming_the_entity(kind):
    table = TRANSITIONS[kind]
    for old in table:
        for new in table:
            if new in table[old]:
                check_transition(kind, "x1", old, new)
            else:
                with pytest.raises(IllegalTransition, match=f"{kind} x1: cannot go from {old} to {new}"):
                    check_transition(kind, "x1", old, new)


def test_done_is_final_and_failed_or_cancelled_only_go_back_to_the_queue():
    for kind, table in TRANSITIONS.items():
        # a done segment goes back to the queue only when its whole job is retried
        assert table["done"] == (frozenset({"queued"}) if kind == "segment" else frozenset()), kind
        for state in ("failed", "cancelled"):
            assert table[state] <= {"queued"}, (kind, state)


def test_a_stale_move_is_refused(store):
    store.move_job("j1", "queued", "running")
    with pytest.raises(IllegalTransition, match="job j1: expected state queued, found running"):
        store.move_job("j1", "queued", "cancelled")


def test_a_failed_transaction_leaves_nothing_behind(store):
    with pytest.raises(IllegalTransition):
        with store.transaction():
            store.move_job("j1", "queued", "running")
            store.move_job("j1", "running", "done")  # not allowed: must assemble first
    assert store.job("j1")["state"] == "queued"


def test_attempt_logs_are_bounded(store):
    store.start_attempt("j1.s0.a1", "j1.s0", "j1", "n", 1)
    store.end_attempt("j1.s0.a1", "failed", reason="boom", log="x" * (LOG_LIMIT * 3))
    log = store.attempts(segment_id="j1.s0")[0]["log"]
    assert len(log) < LOG_LIMIT + 100 and log.startswith("[... earlier output cut ...]")


def test_only_unstarted_segments_can_be_recut(store):
    store.start_attempt("j1.s0.a1", "j1.s0", "j1", "n", 1)
    with pytest.raises(IllegalTransition, match="never-run"):
        store.drop_unstarted_segments(["j1.s0"])


def counts(store, job_id="j1"):
    [row] = store.job_summaries_of([job_id])
    return row["segments_total"], row["segments_done"]


def test_a_jobs_segment_counts_follow_every_change(store):
    """Lists read each job's counts from the job (kept by the store), not by counting
    its segments: they must follow adds, re-cuts, ends, retries and purges."""
    assert counts(store) == (1, 0)
    store.add_segments([{"id": f"j1.s{i}", "job_id": "j1", "idx": i, "label": f"frames {i}", "frames": [i],
                         "params": {}} for i in (1, 2, 3)])
    assert counts(store) == (4, 0)
    store.drop_unstarted_segments(["j1.s3"])  # a re-cut
    assert counts(store) == (3, 0)
    for seg in ("j1.s0", "j1.s1"):
        store.hand_out(f"{seg}.a1", seg, "j1", "n", 1, "queued")
        store.move_segment(seg, "running", "done")
    store.start_attempt("j1.s2.a1", "j1.s2", "j1", "n", 1)  # changes attempts, not the state
    assert counts(store) == (3, 2)
    store.move_segment("j1.s1", "done", "queued")  # the whole job retried
    assert counts(store) == (3, 1)
    with pytest.raises(IllegalTransition):  # a refused move changes no count
        with store.transaction():
            store.move_segment("j1.s1", "queued", "running")
            store.move_segment("j1.s1", "running", "done")
            store.move_segment("j1.s0", "queued", "running")
    assert counts(store) == (3, 1)
    assert counts(store) == (len(store.segments("j1")), sum(seg["state"] == "done" for seg in store.segments("j1")))


def test_the_api_list_of_jobs_written_by_sqlite_is_the_documents_python_writes(store):
    import json

    from farm.api import job_document

    job = {"id": "j2", "batch_id": "b2", "seq": 0, "input": "/in/ünïcode \"quoted\".mov", "profile_name": "p",
           "profile": "{}", "processor": "transcode", "destination": "/d", "work_dir": "/w", "priority": -3,
           "state": "queued"}
    store.add_batch("b2", "test", [job], [{"id": f"j2.s{i}", "job_id": "j2", "idx": i, "label": f"part {i}",
                                           "frames": None, "params": {}} for i in range(3)])
    store.move_job("j1", "queued", "running")
    store.move_segment("j1.s0", "queued", "running")
    store.start_attempt("j1.s0.a1", "j1.s0", "j1", "node-a", 1)
    store.end_attempt("j1.s0.a1", "done", exit_status=0, log="ok")
    store.move_segment("j1.s0", "running", "done", result={})
    store.move_job("j1", "running", "assembling")
    store.move_job("j1", "assembling", "done", outputs=["/d/é \"a\".mp4", "/d/b\nc.mp4"])
    store.set_waiting("j2", "no node offers ffmpeg ≥ 6")
    store.move_job("j2", "queued", "failed", error='line 1\n\t"quoted" ✗')
    for batch, state in ((None, None), ("b2", None), (None, "done"), ("nope", None)):
        written = json.loads(store.job_summaries_json(batch, state))
        assert written == [job_document(row) for row in store.job_summaries(batch, state)]
    everything = json.loads(store.job_summaries_json())
    assert [job["id"] for job in everything] == ["j1", "j2"]
    assert everything[0]["started"] is not None and everything[1]["started"] is None
    assert everything[1]["segments"] == 3 and everything[0]["segments_done"] == 1


def test_a_store_made_before_the_counts_gets_them_when_opened(tmp_path):
    import sqlite3

    old = Store(tmp_path / "farm.db")
    jobs = [{"id": j, "batch_id": "b1", "seq": n, "input": None, "profile_name": "p", "profile": "{}",
             "processor": "command", "destination": "/d", "work_dir": "/w", "priority": 0, "state": "running"}
            for n, j in enumerate(("j1", "j2"))]
    old.add_batch("b1", "test", jobs, [{"id": f"j1.s{i}", "job_id": "j1", "idx": i, "label": str(i), "frames": [i],
                                        "params": {}} for i in range(3)])
    old.hand_out("j1.s0.a1", "j1.s0", "j1", "n", 1, "queued")
    old.move_segment("j1.s0", "running", "done")
    old.close()
    db = sqlite3.connect(tmp_path / "farm.db")  # as an older version left it: no counts, no triggers
    for name, in db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
        db.execute(f"DROP TRIGGER {name}")
    db.execute("ALTER TABLE jobs DROP COLUMN segments_total")
    db.execute("ALTER TABLE jobs DROP COLUMN segments_done")
    db.execute("UPDATE segments SET state = 'done' WHERE id = 'j1.s1'")
    db.commit()
    db.close()
    reopened = Store(tmp_path / "farm.db")
    assert (counts(reopened, "j1"), counts(reopened, "j2")) == ((3, 2), (0, 0))
    reopened.move_segment("j1.s2", "queued", "running")
    reopened.move_segment("j1.s2", "running", "done")
    assert counts(reopened, "j1") == (3, 3)
    reopened.close()


def test_an_unopenable_store_is_a_clear_error(tmp_path):
    from farm.errors import StoreError

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="cannot open the state store"):
        Store(blocker / "farm.db")


@pytest.mark.parametrize("rows", [3, 2000], ids=["small-commit", "spills-mid-transaction"])
def test_a_full_disk_is_a_store_error_and_the_store_works_once_there_is_room(tmpfs, tmp_path, rows):
    from farm.errors import StoreError
    from tests.conftest import fill_disk

    folder = tmpfs(tmp_path / "small", "1m")
    store = Store(folder / "farm.db")
    filler = fill_disk(folder)
    try:
        # a big transaction outgrows SQLite's page cache and fails mid-way, and SQLite
        # then rolls it back by itself; a small one fails at COMMIT
        with pytest.raises(StoreError, match="cannot be written: database or disk is full"):
            with store.transaction():
                for i in range(rows):
                    store._execute("INSERT INTO batches(id, created, origin) VALUES (?, ?, ?)",
                                   (f"b{i}", 0.0, "x" * 2000))
        assert not store._db.in_transaction  # not left holding the write lock
        filler.unlink()
        store.add_batch("after", "test", [], [])
        assert [row["id"] for row in store._rows("SELECT id FROM batches")] == ["after"]
    finally:
        store.close()


OPEN_AT_ONCE = """
import pathlib, sys, traceback
from farm.store import Store
folder = pathlib.Path(sys.argv[1])
print("ready", flush=True)
for round_, _ in enumerate(sys.stdin):  # one line: go
    try:
        Store(folder / f"farm-{round_}.db").close()
        print("opened", flush=True)
    except Exception:
        print(f"round {round_}: " + traceback.format_exc().strip().splitlines()[-1], flush=True)
"""


@pytest.mark.slow
def test_processes_opening_a_new_store_at_the_same_moment_all_open_it(tmp_path):
    # two `farm run` started together on a new state dir: making the store WAL takes an
    # exclusive lock that SQLite refuses at once ("database is locked") instead of waiting.
    # Four processes open a new store together, sixty times: each waits on its stdin, and
    # the go reaches all four back to back. They live through all the rounds, so the test
    # pays four Python start-ups, not one per opening.
    rounds, openers = 60, 4
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_AT_ONCE, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(openers)]
    failures = []
    try:
        assert [proc.stdout.readline() for proc in procs] == ["ready\n"] * openers, procs[0].stderr.read()
        for _ in range(rounds):
            for proc in procs:
                proc.stdin.write("go\n")
                proc.stdin.flush()
            answers = [proc.stdout.readline().strip() for proc in procs]
            assert all(answers), "an opener died: " + " ".join(proc.stderr.read() for proc in procs if proc.poll())
            failures += [answer for answer in answers if answer != "opened"]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    assert failures == []
