"""Pipelined hand-outs: a node holds one announced segment per slot besides those it runs;
a job of very short segments goes several segments to a task (a parcel).

The in-process tests drive a real scheduler, store and Dask LocalCluster (its workers are
the nodes) with a processor that records every run; the slow ones kill a real node
process holding announced segments.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from collections import Counter
from typing import Callable

import pytest
from distributed import Client, LocalCluster

from farm import hookimpl
from farm.config import NodeConfig
from farm.engine import Engine
from farm.errors import ProcessorError
from farm.frames import chunk_frames
from farm.model import SegmentPlan
from farm.node import JobCache, install_runtime, runtime
from farm.plugins import load_plugins
from farm.processor import Processor
from farm.profiles import LoadedProfile, Profile
from farm.scheduler import Scheduler
from farm.store import Store
from farm_imageseq.renderers import consecutive_runs
from tests.cluster_helpers import Cluster
from tests.conftest import write_profile
from tests.test_faults import HELD, assert_exact_outputs, finished

RUNS: list[tuple[str, str, str]] = []  # (segment, attempt, node) of every run that started
TASKS: dict[str, str] = {}  # attempt -> the Dask task it ran in
GATE = threading.Event()  # "hold" segments wait for it
LATE = 100  # "hold-late" and "slow-late" segments after this frame hold or take 0.6 s


class Recorder(Processor):
    """Runs one frame a segment; what it does is chosen by the profile's name: ``write``
    writes its frame, ``hold`` waits for GATE first, ``fail-once`` fails its first attempt,
    ``hold-late`` and ``slow-late`` write frames up to LATE at once and then wait for GATE
    or take 0.6 s, ``hold-two`` waits for GATE in frames LATE + 1 and LATE + 2 only."""

    name = "recorder"
    frame_based = True
    inputs = "none"

    def plan(self, job):
        return [SegmentPlan(f"frame {chunk[0]}", chunk) for chunk in chunk_frames(job.frames, 1)]

    def run(self, segment, context):
        from distributed import get_worker

        worker = get_worker()
        RUNS.append((segment.id, segment.attempt_id, str(worker.name)))
        TASKS[segment.attempt_id] = str(worker.get_current_task())
        behaviour = segment.job.profile.name
        late = segment.start > LATE
        if behaviour == "hold" or (behaviour == "hold-late" and late) or (
                behaviour == "hold-two" and segment.start in (LATE + 1, LATE + 2)):
            while not GATE.wait(0.05):
                if context.cancelled.is_set():
                    raise ProcessorError("cancelled while held")
        if behaviour == "slow-late" and late:
            time.sleep(0.6)
        if behaviour == "fail-once" and segment.attempt_id.endswith(".a1"):
            raise ProcessorError("the first attempt fails")
        (segment.output_dir / f"frame_{segment.start:04d}.txt").write_text(segment.attempt_id)
        return {}


class RecorderPlugin:
    @hookimpl
    def farm_processors(self):
        return [Recorder()]


def recorder_profile(behaviour: str, frames: str, retries: int = 2, timeout: float | None = None) -> LoadedProfile:
    profile = Profile(name=behaviour, processor="recorder", frames=frames, segment={"frames": 1}, retries=retries,
                      timeout=timeout)
    return LoadedProfile(profile, Recorder.settings_model(), None)


@pytest.fixture
def farm_of(tmp_path):
    """``farm_of(nodes, slots)``: a scheduler over a LocalCluster of ``nodes`` workers."""
    made: list[tuple[Scheduler, Store, Engine]] = []
    RUNS.clear()
    TASKS.clear()
    GATE.clear()

    def make(nodes: int, slots: int) -> Scheduler:
        plugins = load_plugins(extra=[RecorderPlugin()])
        node = install_runtime(NodeConfig(), plugins=plugins)
        cluster = LocalCluster(n_workers=nodes, threads_per_worker=slots, processes=False,
                               dashboard_address="127.0.0.1:0", worker_dashboard_address="127.0.0.1:0")
        engine = Engine(Client(cluster, set_as_default=False), cluster, node.capabilities)
        store = Store(tmp_path / "farm.db")
        scheduler = Scheduler(store, plugins, engine, tmp_path / "work", keep_work=True)
        made.append((scheduler, store, engine))
        return scheduler

    yield make
    GATE.set()
    for scheduler, store, engine in made:
        scheduler.close()
        engine.close()
        store.close()


def step_until(scheduler: Scheduler, check, what: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        scheduler.step(wait=0.05)
        value = check()
        if value:
            return value
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


#: Parcels even when a busy machine measures each segment tens of milliseconds (the
#: suite's other workers, or the scheduler, Dask and the node sharing one process): a
#: parcel is then half of what a node runs before it hands back the rest
#: (farm.node.PARCEL_LIMIT_SECONDS). Read when a scheduler starts (handout.parcel_limits).
BUSY_MACHINE_PARCELS = {"FARM_PARCEL_UNDER_SECONDS": "0.1", "FARM_PARCEL_SECONDS": "0.5"}


@pytest.fixture
def parcels_on_a_busy_machine(monkeypatch):
    for name, value in BUSY_MACHINE_PARCELS.items():
        monkeypatch.setenv(name, value)


def assert_each_ran_once(scheduler: Scheduler, job_id: str, frames: int) -> list:
    """The job is done: every segment ran once, into its own frame. Returns its attempts."""
    assert scheduler.jobs[job_id].state == "done", scheduler.jobs[job_id].error
    runs = Counter(segment for segment, _, _ in RUNS)
    assert len(runs) == frames and set(runs.values()) == {1}, "a segment ran twice, or not at all"
    attempts = scheduler.store.attempts(job_id=job_id)
    done = [a["segment_id"] for a in attempts if a["state"] == "done"]
    assert len(done) == len(set(done)) == frames
    written = sorted(path.name for path in (scheduler.work_root / job_id).glob("*/frame_*.txt"))
    assert written == [f"frame_{frame:04d}.txt" for frame in range(1, frames + 1)]
    return attempts


def test_pipelined_hand_outs_never_run_a_segment_twice_into_an_output(farm_of, tmp_path):
    scheduler = farm_of(nodes=2, slots=2)
    _, (job_id,) = scheduler.submit(recorder_profile("write", "1-120"), [None], tmp_path / "out")
    scheduler.run_until_done([job_id])
    attempts = assert_each_ran_once(scheduler, job_id, 120)
    assert len(attempts) == 120
    assert len({a["node"] for a in attempts}) == 2, "both nodes took part"


def test_a_cancelled_announced_segment_never_starts(farm_of, tmp_path):
    scheduler = farm_of(nodes=1, slots=1)
    _, (held,) = scheduler.submit(recorder_profile("hold", "1"), [None], tmp_path / "out")
    _, (waiting,) = scheduler.submit(recorder_profile("write", "1"), [None], tmp_path / "out2")
    # the one slot runs the held segment; the other job's segment is announced behind it
    step_until(scheduler, lambda: RUNS and scheduler.store.attempts(job_id=waiting), "a segment announced")
    (announced,) = scheduler.store.attempts(job_id=waiting)
    assert announced["state"] == "running" and [run[0] for run in RUNS] == [f"{held}.s00000"]
    scheduler.cancel(waiting)
    step_until(scheduler, lambda: scheduler.jobs[waiting].state == "cancelled", "the job to be cancelled")
    GATE.set()
    scheduler.run_until_done([held])
    # the node took the announced task up after the held one, and ended it unstarted
    step_until(scheduler, lambda: announced["id"] not in scheduler.attempts, "the announced task to come back")
    assert scheduler.jobs[held].state == "done"
    assert [run[0] for run in RUNS] == [f"{held}.s00000"], "the cancelled segment ran"
    assert scheduler.store.attempt(announced["id"])["state"] == "cancelled"
    assert not (tmp_path / "work" / waiting / announced["id"]).exists()


def test_a_retried_segment_goes_to_another_node_when_one_is_free(farm_of, tmp_path):
    scheduler = farm_of(nodes=2, slots=1)
    for round_ in range(3):
        _, (job_id,) = scheduler.submit(recorder_profile("fail-once", "1", retries=1), [None],
                                        tmp_path / f"out{round_}")
        scheduler.run_until_done([job_id])
        assert scheduler.jobs[job_id].state == "done", scheduler.jobs[job_id].error
        first, second = sorted(scheduler.store.attempts(job_id=job_id), key=lambda a: a["id"])
        assert (first["state"], second["state"]) == ("failed", "done")
        assert first["node"] != second["node"], f"the retry ran on {second['node']}, the node that failed it"


def kill_victim_holding(c: Cluster, frames: int, command: list[str], holding: Callable[[list[dict]], bool],
                        what: str) -> dict:
    """A job of ``frames`` one-frame ``command`` segments (argv ends: output folder, frame,
    a gate file that held frames wait for), run by a victim node of one slot while a
    steady node is paused; the victim is killed once what it holds satisfies ``holding``,
    then the gate opens and the steady node runs the rest. Returns the ended job."""
    c.start_controller()
    c.start_node("steady", "--slots", "1")
    c.wait_for_nodes("steady")
    assert c.farm("pause-node", "steady").returncode == 0  # it waits while the victim works
    gate = c.root / "gate" / "open"
    gate.parent.mkdir()
    profile = write_profile(c.root, "held", {
        "processor": "command", "frames": f"1-{frames}", "segment": {"frames": 1}, "retries": 1,
        "settings": {"command": [*command, "{output_dir}", "{start}", str(gate)], "expect": ["frame_{frame:04d}.txt"]},
        "sandbox": {"read": [str(gate.parent)]},
    })
    job_id = json.loads(c.farm("submit", profile, "-o", c.root / "out", "--json").stdout)["jobs"][0]["id"]
    c.start_node("victim", "--slots", "1")

    def held_by_victim() -> list[dict]:
        return [a for s in c.job(job_id)["segment_list"] for a in s["attempts"]
                if a["node"] == "victim" and a["state"] == "running"]

    c.wait_until(lambda: holding(held_by_victim()), 120, what, every=0.1)
    c.kill_node("victim")
    c.wait_until(lambda: not held_by_victim(), 120, "the victim's segments to go back to the queue")
    gate.touch()
    assert c.farm("resume-node", "steady").returncode == 0
    done = finished(c, job_id)
    assert done["state"] == "done", done["error"]
    assert_exact_outputs(c.root / "out", frames)
    return done


@pytest.mark.slow
def test_a_node_killed_with_an_announced_segment_loses_nothing(tmp_path):
    c = Cluster(tmp_path / "c")
    try:
        script = c.root / "held.py"
        script.write_text(HELD)
        # one segment runs on its one slot, the next is announced behind it
        done = kill_victim_holding(c, 4, [sys.executable, str(script)], lambda held: len(held) == 2,
                                   "the victim to hold two segments")
        lost = [a for s in done["segment_list"] for a in s["attempts"] if a["node"] == "victim"]
        assert sorted(a["state"] for a in lost) == ["lost", "lost"]
        assert any("before it started" in (a["reason"] or "") for a in lost), [a["reason"] for a in lost]
    finally:
        c.stop()


def test_a_job_on_one_slot_runs_each_segment_once(farm_of, tmp_path):
    # one slot and its announced segment: every freed slot is refilled from the queue kept here
    scheduler = farm_of(nodes=1, slots=1)
    _, (job_id,) = scheduler.submit(recorder_profile("write", "1-60"), [None], tmp_path / "out")
    scheduler.run_until_done([job_id])
    assert len(assert_each_ran_once(scheduler, job_id, 60)) == 60
    assert not scheduler.attempts, "an attempt was left held"


def test_an_announced_segments_timeout_runs_from_its_start_not_its_hand_out(farm_of, tmp_path):
    scheduler = farm_of(nodes=1, slots=1)
    held_profile = recorder_profile("hold", "1", retries=0, timeout=3)
    waiting_profile = recorder_profile("write", "1", retries=0, timeout=2)
    _, (held,) = scheduler.submit(held_profile, [None], tmp_path / "out")
    _, (waiting,) = scheduler.submit(waiting_profile, [None], tmp_path / "out2")
    # the held segment runs past its 3 s; the other waited behind it for longer than its own 2 s
    scheduler.run_until_done([held, waiting])
    assert scheduler.jobs[held].state == "failed"
    assert "timeout of 3 s" in scheduler.jobs[held].error
    assert scheduler.jobs[waiting].state == "done", scheduler.jobs[waiting].error
    (attempt,) = scheduler.store.attempts(job_id=waiting)
    assert attempt["state"] == "done"


@pytest.mark.usefixtures("parcels_on_a_busy_machine")
def test_a_job_of_very_short_segments_goes_several_to_a_task_each_run_once(farm_of, tmp_path):
    scheduler = farm_of(nodes=2, slots=2)
    _, (job_id,) = scheduler.submit(recorder_profile("write", "1-400"), [None], tmp_path / "out")
    scheduler.run_until_done([job_id])
    attempts = assert_each_ran_once(scheduler, job_id, 400)
    # on a busy machine a parcel may outlast the node's limit: what it had not started came back
    assert all(a["state"] == "done" or "handed back unstarted" in (a["reason"] or "") for a in attempts)
    tasks = Counter(TASKS.values())
    assert len(tasks) < 200 and max(tasks.values()) > 1, f"{len(tasks)} tasks for 400 segments of a few ms"
    assert not scheduler.attempts, "an attempt was left held"


@pytest.mark.usefixtures("parcels_on_a_busy_machine")
def test_a_cancelled_job_never_starts_the_rest_of_its_parcels(farm_of, tmp_path):
    scheduler = farm_of(nodes=1, slots=1)
    _, (job_id,) = scheduler.submit(recorder_profile("hold-late", "1-300"), [None], tmp_path / "out")
    # frames up to LATE go quickly and in parcels; the first after them holds its task, the
    # rest of its parcel and the next parcel wait behind it
    def holding_late_frames_only() -> bool:
        held = [int(attempt.segment_id[-5:]) for attempt in scheduler.attempts.values()]
        return len(held) > 2 and min(held) >= LATE

    step_until(scheduler, holding_late_frames_only, "the node to hold only frames after the first late one")
    held = dict(scheduler.attempts)
    scheduler.cancel(job_id)
    step_until(scheduler, lambda: scheduler.jobs[job_id].state == "cancelled", "the job to be cancelled")
    # the held frame ends on its cancel; the one message that brought it marked the others
    step_until(scheduler, lambda: not scheduler.attempts, "the node's tasks to come back")
    started = {attempt for _, attempt, _ in RUNS}
    late = [attempt for attempt in held if attempt in started]
    assert len(late) == 1, f"{len(late)} of the {len(held)} attempts held at the cancel had started: {late}"
    for attempt in held:
        assert scheduler.store.attempt(attempt)["state"] == "cancelled"
        if attempt not in started:
            assert not (tmp_path / "work" / job_id / attempt).exists(), f"{attempt} never started but left files"


@pytest.mark.usefixtures("parcels_on_a_busy_machine")
def test_a_segment_held_in_a_parcel_is_timed_out_by_its_profile(farm_of, tmp_path):
    scheduler = farm_of(nodes=1, slots=1)
    profile = recorder_profile("hold-late", "1-300", retries=0, timeout=2)
    _, (job_id,) = scheduler.submit(profile, [None], tmp_path / "out")
    # the first late frame holds; it started when the one before it in its task ended
    step_until(scheduler, lambda: scheduler.jobs[job_id].state == "failed", "the job to fail on the timeout")
    assert "timeout of 2 s" in scheduler.jobs[job_id].error
    assert scheduler.jobs[job_id].done >= LATE
    timed_out = [a for a in scheduler.store.attempts(job_id=job_id) if a["state"] == "timed_out"]
    assert [a["segment_id"][-6:] for a in timed_out] == [f"s{LATE:05d}"]


@pytest.mark.usefixtures("parcels_on_a_busy_machine")
def test_a_parcel_that_runs_long_hands_back_what_it_has_not_started(farm_of, tmp_path):
    scheduler = farm_of(nodes=1, slots=2)
    _, (job_id,) = scheduler.submit(recorder_profile("slow-late", f"1-{LATE + 12}"), [None], tmp_path / "out")
    scheduler.run_until_done([job_id])
    attempts = assert_each_ran_once(scheduler, job_id, LATE + 12)
    returned = [a for a in attempts if "handed back unstarted" in (a["reason"] or "")]
    assert returned, "no parcel of late frames handed anything back"
    assert {a["state"] for a in returned} == {"lost"}


@pytest.mark.usefixtures("parcels_on_a_busy_machine")
def test_the_rest_of_a_parcel_behind_a_hung_segment_runs_elsewhere(farm_of, tmp_path):
    # Two consecutive frames hang: wherever the parcels' bounds fall, one of them runs with
    # segments of its parcel behind it (the first, or else the second at the head of the
    # next parcel). Two slots can hang, the third runs the rest.
    scheduler = farm_of(nodes=1, slots=3)
    frames = LATE + 60
    _, (job_id,) = scheduler.submit(recorder_profile("hold-two", f"1-{frames}"), [None], tmp_path / "out")
    hung = (f"s{LATE:05d}", f"s{LATE + 1:05d}")
    rt = scheduler.jobs[job_id]

    def parcel_behind_hung():
        return any(a.segment_id.endswith(hung) and not a.waiting and a.parcel is not None and a.parcel.waiting
                   for a in scheduler.attempts.values())

    def taken_back():
        return [a for a in scheduler.store.attempts(job_id=job_id) if "taken back before it started" in (a["reason"] or "")]

    step_until(scheduler, parcel_behind_hung, "a hung frame to run with part of its parcel waiting behind it")
    # what waited behind a hung frame is taken back, and the free slot runs it: all but the two end
    step_until(scheduler, lambda: taken_back() and rt.done == frames - 2,
               "the rest of the parcel taken back, and every frame but the two hung ones done")
    assert rt.state == "running" and not GATE.is_set()
    assert {a["state"] for a in taken_back()} == {"cancelled"}
    assert all("ran over 2 s" in a["reason"] for a in taken_back())
    GATE.set()
    scheduler.run_until_done([job_id])
    attempts = assert_each_ran_once(scheduler, job_id, frames)
    counted = [a for a in attempts if a["state"] in ("failed", "timed_out")
               or (a["state"] == "lost" and "handed back unstarted" not in a["reason"])]  # a busy machine's parcel
    assert not counted, f"a taken-back segment counted: {counted}"


@pytest.mark.usefixtures("parcels_on_a_busy_machine")
def test_what_a_parcel_hands_back_runs_again_in_its_order(farm_of, tmp_path):
    scheduler = farm_of(nodes=1, slots=1)  # one slot: segments start in the order they are handed out
    _, (job_id,) = scheduler.submit(recorder_profile("slow-late", f"1-{LATE + 12}"), [None], tmp_path / "out")
    scheduler.run_until_done([job_id])
    attempts = assert_each_ran_once(scheduler, job_id, LATE + 12)
    returned = sorted(int(a["segment_id"][-5:]) for a in attempts if "handed back unstarted" in (a["reason"] or ""))
    assert len(returned) > 1, "no parcel of late frames handed back more than one segment"
    started = [int(segment[-5:]) for segment, _, _ in RUNS]
    # a parcel's unstarted tail is a run of consecutive segments (its first one always runs)
    for tail in consecutive_runs(returned):
        again = [index for index in started if index in tail]
        assert again == tail, f"handed back {tail}, run again in the order {again}"


#: frames up to 40 are written at once; later ones wait for the gate file (argv: folder, frame, gate)
QUICK_THEN_HELD = 'if [ "$2" -gt 40 ]; then while [ ! -e "$3" ]; do sleep 0.05; done; fi; ' \
                  'printf %s "$2" > "$1/frame_$(printf %04d "$2").txt"'


@pytest.mark.slow
def test_a_node_killed_with_parcels_of_segments_loses_nothing(tmp_path):
    # unsandboxed: a sandbox's start (30 to 50 ms on a busy machine) would make these too long to parcel
    c = Cluster(tmp_path / "c", node_config={"allow_commands": ["sh"], "sandbox": False})
    c.env.update(BUSY_MACHINE_PARCELS)
    try:
        frame_41 = None

        def holds_frame_41_and_its_parcel(held: list[dict]) -> bool:
            nonlocal frame_41
            frame_41 = next((a["id"] for a in held if a["id"].endswith(".s00040.a1")), None)
            if len(held) <= 2 or frame_41 is None:
                return False
            frame_40 = next(s for s in c.job(frame_41.split(".")[0])["segment_list"] if s["id"].endswith(".s00039"))
            return frame_40["state"] == "done"  # recorded: the controller knows that frame 41 started

        # its one slot holds a task: frame 41, which waits for the gate, and the rest of its
        # parcel; the next task waits behind it
        done = kill_victim_holding(c, 120, ["sh", "-c", QUICK_THEN_HELD, "sh"], holds_frame_41_and_its_parcel,
                                   "the victim to hold frame 41 and the rest of its parcel")
        lost = [a for s in done["segment_list"] for a in s["attempts"] if a["state"] == "lost"]
        assert len(lost) > 2 and all(a["node"] == "victim" for a in lost)
        # only the frame that ran counts against its segment; the others never started
        counted = [a["id"] for a in lost if "before it started" not in (a["reason"] or "")]
        assert counted == [frame_41], [(a["id"], a["reason"]) for a in lost]
    finally:
        c.stop()


@pytest.mark.usefixtures("parcels_on_a_busy_machine")
def test_a_node_that_forgot_the_job_answers_for_its_whole_parcel_and_nothing_is_lost(farm_of, tmp_path, monkeypatch):
    monkeypatch.setattr(JobCache, "WAIT_SECONDS", 0.5)
    scheduler = farm_of(nodes=1, slots=2)
    _, (job_id,) = scheduler.submit(recorder_profile("write", "1-400"), [None], tmp_path / "out")
    step_until(scheduler, lambda: scheduler.jobs[job_id].done >= 100 and scheduler.jobs[job_id].parcel > 1,
               "a hundred segments done, in parcels")
    runtime().jobs = JobCache()  # as after a restart: the tasks sent since carry the job by reference
    scheduler.run_until_done([job_id])
    attempts = assert_each_ran_once(scheduler, job_id, 400)
    # those the node could not run went back without counting: the node's answer, or handed
    # back unstarted behind a segment that waited for the job
    unrun = [a for a in attempts if a["state"] == "lost"]
    assert any("does not hold job" in a["reason"] for a in unrun), [a["reason"] for a in unrun]
    assert all("does not hold job" in a["reason"] or "handed back unstarted" in a["reason"] for a in unrun)


@pytest.mark.slow
def test_a_controller_killed_while_its_node_holds_parcels_loses_nothing(tmp_path):
    c = Cluster(tmp_path / "c", node_config={"allow_commands": ["sh"], "sandbox": False})  # unsandboxed: see above
    c.env.update(BUSY_MACHINE_PARCELS)
    try:
        c.start_controller()
        c.start_node("n1", "--slots", "2")
        c.wait_for_nodes("n1")
        gate = c.root / "gate" / "open"
        gate.parent.mkdir()
        profile = write_profile(c.root, "held", {
            "processor": "command", "frames": "1-120", "segment": {"frames": 1}, "retries": 1,
            "settings": {"command": ["sh", "-c", QUICK_THEN_HELD, "sh", "{output_dir}", "{start}", str(gate)],
                         "expect": ["frame_{frame:04d}.txt"]},
            "sandbox": {"read": [str(gate.parent)]},
        })
        job_id = json.loads(c.farm("submit", profile, "-o", c.root / "out", "--json").stdout)["jobs"][0]["id"]

        def holding_parcels() -> bool:
            # frames up to 40 done; the node holds more attempts than its 2 slots and 2
            # announced tasks: held frames in parcels
            detail = c.job(job_id)
            held = [a for s in detail["segment_list"] for a in s["attempts"] if a["state"] == "running"]
            return detail["segments_done"] >= 40 and len(held) > 4

        c.wait_until(holding_parcels, 120, "the node to hold parcels of held frames", every=0.1)
        c.controller.send_signal(signal.SIGKILL)
        c.controller.wait()
        c.start_controller()
        c.wait_for_nodes("n1")
        gate.touch()
        done = finished(c, job_id)
        assert done["state"] == "done", done["error"]
        assert_exact_outputs(c.root / "out", 120)
        # the frames that ran before the kill were kept, not run again
        early = [s for s in done["segment_list"] if int(s["id"][-5:]) < 40]
        assert all(len(s["attempts"]) == 1 for s in early), [s["id"] for s in early if len(s["attempts"]) > 1]
    finally:
        c.stop()
