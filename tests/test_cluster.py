"""Farm on many machines, on this one: a controller and nodes as real processes, real
TLS Dask, the real HTTP API, zeroconf, SIGKILLs."""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

from tests.cluster_helpers import Cluster
from tests.conftest import ROOT, write_profile

pytestmark = pytest.mark.slow

WORK = """
    import os, sys, time, pathlib
    out, frame, pids, seconds = pathlib.Path(sys.argv[1]), sys.argv[2], pathlib.Path(sys.argv[3]), float(sys.argv[4])
    (pids / f"{frame}-{os.getpid()}").touch()
    time.sleep(seconds)
    (out / f"frame_{int(frame):04d}.txt").write_text(frame)
"""


@pytest.fixture
def cluster(tmp_path):
    made = []

    def make(**kwargs) -> Cluster:
        c = Cluster(tmp_path / f"cluster{len(made)}", **kwargs)
        made.append(c)
        return c

    yield make
    for c in made:
        c.stop()


def work_profile(c: Cluster, frames: str, seconds: float, per_segment: int = 1, **extra) -> Path:
    script = c.root / "work.py"
    script.write_text(textwrap.dedent(WORK))
    pids = c.root / "pids"
    pids.mkdir(exist_ok=True)
    return write_profile(c.root, "work", {
        "processor": "command", "frames": frames, "segment": {"frames": per_segment},
        "settings": {"command": [sys.executable, str(script), "{output_dir}", "{start}", str(pids), str(seconds)],
                     "expect": ["frame_{frame:04d}.txt"]},
        "sandbox": {"write": [str(pids)]},  # the script says it started there
        **extra,
    })


def frames_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_two_nodes_share_a_batch_and_list_their_capabilities(cluster):
    # a name of its own: another run of this test (a pytest-xdist worker, another checkout)
    # may advertise a "testfarm" on this machine at the same time
    c = cluster(name=f"testfarm-{uuid.uuid4().hex[:6]}", advertise=True)
    c.start_controller()
    c.start_node("alpha", "--slots", "1")
    c.start_node("beta", "--cluster", c.name, "--slots", "1")  # found by zeroconf alone
    c.wait_for_nodes("alpha", "beta")

    nodes = json.loads(c.farm("nodes", "--json").stdout)
    assert {n["name"] for n in nodes} == {"alpha", "beta"}
    for node in nodes:
        assert "processor:command" in node["capabilities"] and f"command:{Path(sys.executable).name}" in node["capabilities"]
        assert node["slots"] == 1 and node["state"] in ("idle", "busy")
        assert node["capabilities"]["sandbox"].startswith("bubblewrap-")  # its segments run contained
    assert "sandbox bubblewrap-" in c.farm("nodes").stdout

    profile = work_profile(c, "1-8", 0.5)
    result = c.farm("submit", profile, "-o", c.root / "out", "--wait", "--json")
    assert result.returncode == 0, result.stderr
    job = json.loads(result.stdout)["jobs"][0]
    assert job["state"] == "done"
    assert frames_in(c.root / "out") == [f"frame_{i:04d}.txt" for i in range(1, 9)]
    status = c.farm("status", job["id"], "--json")  # what a person reads from the controller
    assert status.returncode == 0, status.stderr
    used = {a["node"] for seg in json.loads(status.stdout)["segment_list"] for a in seg["attempts"]}
    assert used == {"alpha", "beta"}  # the work was spread

    # the examples' ffmpeg batch runs on the cluster too
    frames = c.farm("submit", ROOT / "examples" / "testsrc-frames.yaml", "-o", c.root / "frames", "--set",
                    "frames=1-20", "--wait", "--json")
    assert frames.returncode == 0, frames.stderr
    assert len(list((c.root / "frames").glob("testsrc_*.png"))) == 20


def test_the_api_wants_the_token_and_a_foreign_node_cannot_join(cluster):
    c = cluster()
    other = cluster(name="otherfarm")
    c.start_controller()
    response = httpx.get(f"{c.url}/api/jobs", verify=False)
    assert response.status_code == 401 and "token" in response.json()["error"]
    wrong = httpx.get(f"{c.url}/api/jobs", verify=False, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401

    c.start_node("intruder", bundle=other.bundles / "node.yaml")
    c.start_node("member")
    c.wait_for_nodes("member")
    said = c.root / "node-intruder.log"
    c.wait_until(lambda: said.exists() and "not reachable" in said.read_text(), 60, "the intruder to be refused")
    assert "certificate" in said.read_text()
    assert c.node_names() == ["member"]
    refused = c.farm("nodes", env={"FARM_CLIENT": str(other.bundles / "admin.yaml")})
    assert refused.returncode == 2 and "cannot reach the controller" in refused.stderr

    from farm.security import Bundle

    tokens = (Bundle.load(c.bundles / "node.yaml").token, c.token)
    logs = {path.name: path.read_text(errors="replace") for path in c.root.glob("*.log")}
    assert logs and not [name for name, text in logs.items() if any(t in text for t in tokens)], "a token leaked"


def test_a_controller_whose_port_is_taken_says_which_and_leaves(cluster):
    import socket

    c = cluster()
    for port, what in ((c.scheduler_port, "the scheduler"), (c.api_port, "the API")):
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", port))
            taken.listen()
            started = c.farm("controller", "--bundle", c.bundles / "controller.yaml", timeout=90)
        assert started.returncode == 2, started.stderr
        assert "Traceback" not in started.stderr and "internal error" not in started.stderr, started.stderr
        assert started.stderr.strip().splitlines()[-1].startswith(f"farm: error: {what} could not listen on "
                                                                 f"127.0.0.1:{port}"), started.stderr
    c.start_controller()  # the ports free again: it starts
    assert c.api("GET", "/api/nodes").status_code == 200


def test_a_node_killed_mid_batch_loses_nothing(cluster):
    c = cluster()
    c.start_controller()
    c.start_node("steady", "--slots", "1")
    c.start_node("doomed", "--slots", "1")
    c.wait_for_nodes("steady", "doomed")
    profile = work_profile(c, "1-10", 1.5)
    submitted = json.loads(c.farm("submit", profile, "-o", c.root / "out", "--json").stdout)
    job_id = submitted["jobs"][0]["id"]

    def doomed_running():
        detail = c.job(job_id)
        return any(a["node"] == "doomed" and a["state"] == "running" for s in detail["segment_list"] for a in s["attempts"])

    c.wait_until(doomed_running, 60, "a segment running on the doomed node")
    c.kill_node("doomed")
    done = c.wait_until(lambda: (d := c.job(job_id))["state"] in ("done", "failed") and d, 120, "the job to end")
    assert done["state"] == "done", done["error"]
    assert frames_in(c.root / "out") == [f"frame_{i:04d}.txt" for i in range(1, 11)]
    lost = [a for s in done["segment_list"] for a in s["attempts"] if a["state"] == "lost"]
    assert lost and all("doomed" in a["reason"] for a in lost)
    assert list((c.root / "pids").iterdir())  # segments did start
    # That a killed node's segment processes end is tried in test_faults, with segments that
    # would outlive the test: these end by themselves before the job does.


def test_the_controller_killed_mid_batch_resumes_from_the_store(cluster):
    c = cluster()
    c.start_controller()
    c.start_node("n1", "--slots", "2")
    c.wait_for_nodes("n1")
    profile = work_profile(c, "1-12", 0.8)
    job_id = json.loads(c.farm("submit", profile, "-o", c.root / "out", "--json").stdout)["jobs"][0]["id"]
    c.wait_until(lambda: c.job(job_id)["segments_done"] >= 3, 60, "three segments done")
    c.controller.send_signal(signal.SIGKILL)
    c.controller.wait()
    c.start_controller()
    c.wait_for_nodes("n1")  # the node came back by itself
    done = c.wait_until(lambda: (d := c.job(job_id))["state"] in ("done", "failed") and d, 120, "the job to end")
    assert done["state"] == "done", done["error"]
    assert frames_in(c.root / "out") == [f"frame_{i:04d}.txt" for i in range(1, 13)]
    assert done["outputs"] == sorted(str(c.root / "out" / n) for n in frames_in(c.root / "out"))


def test_waiting_jobs_say_why_and_paused_or_part_time_nodes_take_nothing(cluster):
    c = cluster()
    c.start_controller()
    off_hours = c.root / "part-time.yaml"
    data = yaml.safe_load(c.config.read_text())
    now = time.localtime()
    start = (now.tm_hour + 2) % 24
    data["node"]["part_time"] = {"hours": f"{start:02d}:00-{(start + 1) % 24:02d}:00"}
    off_hours.write_text(yaml.safe_dump(data))
    c.start_node("desktop", config=off_hours)
    c.wait_for_nodes("desktop")
    desktop = json.loads(c.farm("nodes", "--json").stdout)[0]
    assert desktop["state"] == "part-time" and "outside its hours" in desktop["reason"]

    profile = work_profile(c, "1-2", 0.1)
    job_id = json.loads(c.farm("submit", profile, "-o", c.root / "out", "--json").stdout)["jobs"][0]["id"]
    waiting = c.wait_until(lambda: c.job(job_id)["waiting"], 60, "a waiting reason")
    assert "paused or busy (part-time)" in waiting and c.job(job_id)["state"] == "queued"

    renderer = work_profile(c, "1", 0.1, requires={"blender": ">=99"})
    other = json.loads(c.farm("submit", renderer, "-o", c.root / "out2", "--json").stdout)["jobs"][0]["id"]
    assert "no node offers blender >=99" in c.wait_until(lambda: c.job(other)["waiting"], 60, "a reason")

    assert c.farm("pause-node", "farmbox").returncode == 0  # paused before it even joins
    c.start_node("farmbox")
    c.wait_for_nodes("farmbox")
    time.sleep(2)
    assert {n["name"]: n["state"] for n in json.loads(c.farm("nodes", "--json").stdout)}["farmbox"] == "paused"
    assert c.job(job_id)["state"] == "queued"
    assert c.farm("resume-node", "farmbox").returncode == 0
    done = c.wait_until(lambda: (d := c.job(job_id))["state"] == "done" and d, 60, "the job to run on farmbox")
    assert {a["node"] for s in done["segment_list"] for a in s["attempts"]} == {"farmbox"}
    assert c.job(other)["state"] == "queued"
    cancelled = c.farm("cancel", other)
    assert cancelled.returncode == 0
    assert c.wait_until(lambda: c.job(other)["state"] == "cancelled", 60, "the cancel")
    retried = c.farm("retry", other)
    assert retried.returncode == 0 and "1 segment(s) queued again" in retried.stdout


class PlayedLoad:
    """A /proc/stat whose counters a thread advances as an idle or a fully busy machine
    would: the part-time node reads it (FARM_PROC_STAT), so the test decides what the
    node's user is doing, whatever else runs on this machine."""

    def __init__(self, path: Path):
        import threading

        self.path, self.busy, self.stopped = path, False, threading.Event()
        self.counters = [0, 0]  # busy, idle jiffies
        self.tick()
        threading.Thread(target=self.run, daemon=True).start()

    def tick(self) -> None:
        self.counters[0 if self.busy else 1] += 100
        busy, idle = self.counters
        temporary = self.path.with_suffix(".new")
        temporary.write_text(f"cpu  {busy} 0 0 {idle} 0 0 0 0 0 0\n")
        os.replace(temporary, self.path)

    def run(self) -> None:
        while not self.stopped.wait(0.1):
            self.tick()


def test_a_part_time_node_that_gets_busy_takes_nothing_new(cluster):
    c = cluster()
    c.start_controller()
    load = PlayedLoad(c.root / "stat")
    idle_only = c.root / "idle.yaml"
    data = yaml.safe_load(c.config.read_text())
    data["node"]["part_time"] = {"idle_cpu_below": 40, "idle_minutes": 0}
    idle_only.write_text(yaml.safe_dump(data))
    try:
        c.start_node("desktop", config=idle_only, extra_env={"FARM_PROC_STAT": str(load.path)})
        c.wait_for_nodes("desktop")

        def state():
            return json.loads(c.farm("nodes", "--json").stdout)[0]

        c.wait_until(lambda: state()["state"] == "idle", 60, "the idle desktop to take work")
        load.busy = True
        busy = c.wait_until(lambda: (s := state())["state"] == "part-time" and s, 60, "the desktop to notice its user")
        assert "the machine is busy" in busy["reason"]
        profile = work_profile(c, "1", 0.1)
        job_id = json.loads(c.farm("submit", profile, "-o", c.root / "out", "--json").stdout)["jobs"][0]["id"]
        waiting = c.wait_until(lambda: (job := c.job(job_id))["waiting"] and job, 60, "the job to say why it waits")
        assert waiting["state"] == "queued" and "part-time" in waiting["waiting"], waiting
        load.busy = False
        assert c.wait_until(lambda: c.job(job_id)["state"] == "done", 60, "the job once the desktop is idle again")
    finally:
        load.stopped.set()


def test_a_droplet_in_the_controller_turns_a_dropped_file_into_a_job_on_a_node(cluster):
    import subprocess

    c = cluster()
    drop, dest = c.root / "drop", c.root / "checked"
    drop.mkdir()
    data = yaml.safe_load(c.config.read_text())
    data["droplets"] = [{"name": "incoming", "folder": str(drop), "profile": str(ROOT / "examples" / "droplet.yaml"),
                         "destination": str(dest), "settle": 0.5}]
    c.config.write_text(yaml.safe_dump(data))
    c.start_controller()
    c.start_node("n1")
    c.wait_for_nodes("n1")
    staging = c.root / "clip.mp4"
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i",
                    "testsrc2=size=160x120:rate=25:duration=1", "-pix_fmt", "yuv420p", str(staging)], check=True)
    staging.rename(drop / "clip.mp4")
    (drop / "notes.mov").write_text("not a movie")
    c.wait_until(lambda: (drop / "done" / "clip.mp4").exists(), 60, "the clip to be processed and moved to done/")
    c.wait_until(lambda: (drop / "failed" / "notes.mov.error.txt").exists(), 60, "the text file to fail")
    assert "Invalid data" in (drop / "failed" / "notes.mov.error.txt").read_text()
    jobs = json.loads(c.farm("status", "--json").stdout)
    assert sorted(Path(j["input"]).name for j in jobs) == ["clip.mp4", "notes.mov"]


def test_a_transcode_batch_is_shared_by_two_nodes_and_verified(cluster):
    import subprocess

    c = cluster()
    c.start_controller()
    c.start_node("enc1", "--slots", "1")
    c.start_node("enc2", "--slots", "1")
    c.wait_for_nodes("enc1", "enc2")
    source = c.root / "source.mp4"
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i",
                    "testsrc2=size=320x240:rate=25:duration=8", "-f", "lavfi", "-i",
                    "sine=frequency=440:sample_rate=48000:duration=8", "-pix_fmt", "yuv420p", "-c:v", "libx264",
                    "-c:a", "aac", "-shortest", str(source)], check=True)
    nodes = json.loads(c.farm("nodes", "--json").stdout)
    assert all("processor:transcode" in n["capabilities"] for n in nodes)
    # at the source's own height: what is checked is the sharing and the verification, and a
    # 720p encode of 200 frames would be most of the suite's CPU for this test
    result = c.farm("submit", "h264-web-720p", source, "-o", c.root / "out", "--set", "segment.seconds=2",
                    "--set", "settings.video.height=240", "--wait", "--json", timeout=300)
    assert result.returncode == 0, result.stderr
    job = json.loads(result.stdout)["jobs"][0]
    assert job["state"] == "done", job["error"]
    output = Path(job["outputs"][0])
    frames = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0", "-show_entries",
                             "stream=nb_read_frames", "-of", "csv=p=0", str(output)], capture_output=True, text=True,
                            check=True).stdout.strip()
    assert int(frames) == 200
    detail = c.job(job["id"])
    assert {a["node"] for s in detail["segment_list"] for a in s["attempts"]} == {"enc1", "enc2"}


def test_the_python_api_submits_to_a_controller_and_waits(cluster):
    import farm as farm_api

    c = cluster()
    c.start_controller()
    c.start_node("n1")
    c.wait_for_nodes("n1")
    batch = farm_api.submit(str(ROOT / "examples" / "testsrc-frames.yaml"), destination=c.root / "out",
                            overrides=["frames=1-8"], controller=c.url, client=c.bundles / "admin.yaml")
    (job,) = batch.jobs
    assert job.wait(timeout=120) == "done" and len(job.outputs) == 8 and job.error is None
