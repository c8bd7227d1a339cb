"""A long queue stays in the store: a job's segments are loaded into the controller a few
at a time as the hand-out reaches them. Whatever is loaded or not, every segment runs
once, in order, and a cancel, a retry or a restart from the store loses none.

The window is made tiny here (5 segments, loaded when fewer than 2 wait) so that jobs of a
few dozen segments cross it many times; the scheduler, store and Dask are real (the
fixture of tests/test_pipelining.py).
"""

from __future__ import annotations

from collections import Counter

import pytest

from farm.lease import Lease
from farm.scheduling import queue as queue_module
from tests.test_pipelining import GATE, RUNS, farm_of, recorder_profile, step_until  # noqa: F401 (fixture)


@pytest.fixture(autouse=True)
def small_window(monkeypatch):
    monkeypatch.setattr(queue_module, "LOAD_BELOW", 2)
    monkeypatch.setattr(queue_module, "LOAD_COUNT", 5)


def states(scheduler, job_id: str) -> Counter[str]:
    return Counter(row["state"] for row in scheduler.store.segments(job_id))


def written(scheduler, tmp_path, job_id: str) -> list[str]:
    """The frames in the folders of the job's done attempts."""
    done = [a["id"] for a in scheduler.store.attempts(job_id=job_id) if a["state"] == "done"]
    return sorted(path.name for attempt in done for path in (tmp_path / "work" / job_id / attempt).glob("frame_*.txt"))


def frames(first: int, last: int) -> list[str]:
    return [f"frame_{frame:04d}.txt" for frame in range(first, last + 1)]


def test_a_job_longer_than_the_window_runs_every_segment_once_in_order(farm_of, tmp_path):
    scheduler = farm_of(nodes=1, slots=1)
    _, (job_id,) = scheduler.submit(recorder_profile("write", "1-40"), [None], tmp_path / "out")
    _, (other,) = scheduler.submit(recorder_profile("write", "1-12"), [None], tmp_path / "out2")
    scheduler.run_until_done([job_id, other])
    for job, count in ((job_id, 40), (other, 12)):
        assert scheduler.jobs[job].state == "done", scheduler.jobs[job].error
        assert states(scheduler, job) == {"done": count}
        assert written(scheduler, tmp_path, job) == frames(1, count)
    # one slot, pipelined: the node starts what it holds in the order the queue handed it out
    expected = [f"{job_id}.s{index:05d}" for index in range(40)] + [f"{other}.s{index:05d}" for index in range(12)]
    assert [segment for segment, _, _ in RUNS] == expected


def test_a_cancelled_job_cancels_the_segments_never_loaded_and_a_retry_runs_them(farm_of, tmp_path):
    scheduler = farm_of(nodes=1, slots=1)
    _, (job_id,) = scheduler.submit(recorder_profile("hold", "1-30"), [None], tmp_path / "out")
    step_until(scheduler, lambda: RUNS, "the first segment to start")
    scheduler.cancel(job_id)
    step_until(scheduler, lambda: scheduler.jobs[job_id].state == "cancelled", "the job to be cancelled")
    GATE.set()
    step_until(scheduler, lambda: not scheduler.attempts, "its attempts to come back")
    assert states(scheduler, job_id) == {"cancelled": 30}, "a segment was left queued in the store"
    assert scheduler.store.job_summaries_of([job_id])[0]["segments_total"] == 30

    assert scheduler.retry(job_id) == 30
    scheduler.run_until_done([job_id])
    assert scheduler.jobs[job_id].state == "done", scheduler.jobs[job_id].error
    assert states(scheduler, job_id) == {"done": 30}
    assert written(scheduler, tmp_path, job_id) == frames(1, 30)


def test_a_restart_from_the_store_keeps_what_was_done_and_runs_the_rest_once(farm_of, tmp_path):
    scheduler = farm_of(nodes=1, slots=1)
    scheduler.lease = Lease(scheduler.store, "test")  # the owner that rebuilds its own jobs
    try:
        _, (job_id,) = scheduler.submit(recorder_profile("write", "1-30"), [None], tmp_path / "out")
        step_until(scheduler, lambda: states(scheduler, job_id)["done"] >= 8, "8 segments done")
        done_before = {row["id"] for row in scheduler.store.segments(job_id) if row["state"] == "done"}

        scheduler.reset()  # everything in memory forgotten, as after a store error
        assert scheduler.recover() == [job_id]
        scheduler.run_until_done([job_id])
    finally:  # its heartbeat thread must not outlive the store the fixture closes
        scheduler.lease.release()
    assert scheduler.jobs[job_id].state == "done", scheduler.jobs[job_id].error
    assert states(scheduler, job_id) == {"done": 30}
    runs = Counter(segment for segment, _, _ in RUNS)
    assert len(runs) == 30
    assert all(runs[segment] == 1 for segment in done_before), "a segment done before the restart ran again"
    assert max(runs.values()) <= 2  # only those running at the restart run again
    done_attempts = Counter(a["segment_id"] for a in scheduler.store.attempts(job_id=job_id) if a["state"] == "done")
    assert len(done_attempts) == 30 and set(done_attempts.values()) == {1}
