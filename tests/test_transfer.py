"""Nodes without shared storage (farm.transfer): real controller and node processes, one
node in its own mount namespace where the input, destination and cluster storage folders
are empty tmpfs mounts, so whatever it does went through the controller."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from tests.cluster_helpers import Cluster
from tests.conftest import FARM, lavfi, write_profile

needs_isolation = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                                     reason="hiding folders from a node needs root and unshare")

STAMP = """
    import hashlib, pathlib, sys
    source, out, first, last = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    for frame in range(first, last + 1):
        (out / f"frame_{frame:04d}.txt").write_text(f"{frame} {digest}")
"""

HIDE = 'for folder in "$@"; do [ "$folder" = -- ] && break; mount -t tmpfs tmpfs "$folder"; done; ' \
       'while [ "$1" != -- ]; do shift; done; shift; exec "$@"'


class Farm:
    """A controller, a node on its storage ("shared") and one without it ("island")."""

    def __init__(self, root: Path, island: dict | None = None):
        self.c = Cluster(root)
        self.inputs, self.out = root / "in", root / "out"
        self.inputs.mkdir()
        self.out.mkdir()
        self.hidden = [self.inputs, self.out, root / "storage"]
        self.island_config = root / "island.yaml"
        config = yaml.safe_load(self.c.config.read_text())
        config["node"].update({"storage": "local", "cache": str(root / "island-cache"), **(island or {})})
        self.island_config.write_text(yaml.safe_dump(config))
        self.c.start_controller()

    def start_island(self, *extra: str) -> subprocess.Popen:
        log = open(self.c.root / "node-island.log", "a")
        env = {**self.c.env, "FARM_CONFIG": str(self.island_config)}
        args = ["unshare", "--mount", "--propagation", "private", "sh", "-c", HIDE, "sh", *map(str, self.hidden), "--",
                *FARM, "node", "--name", "island", "--slots", "1", "--bundle", str(self.c.bundles / "node.yaml"),
                "--controller", self.c.url, *extra]
        proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=self.c.root,
                                start_new_session=True)
        self.c.nodes["island"] = proc
        return proc

    def kill_island(self) -> None:
        proc = self.c.nodes.pop("island")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def transfers(self) -> list[dict]:
        answer = self.c.api("GET", "/api/transfers")
        assert answer.status_code == 200, answer.text
        return answer.json()

    def nodes_of(self, job_id: str) -> set[str]:
        return {a["node"] for s in self.c.job(job_id)["segment_list"] for a in s["attempts"] if a["state"] == "done"}

    def submit(self, *args: str, timeout: float = 300) -> dict:
        result = self.c.farm("submit", *args, "--wait", "--json", timeout=timeout)
        assert result.returncode == 0, result.stdout + result.stderr
        job = json.loads(result.stdout)["jobs"][0]
        assert job["state"] == "done", job["error"]
        return job


@pytest.fixture
def farm_without_shared_storage(tmp_path):
    made: list[Farm] = []

    def make(**island) -> Farm:
        made.append(Farm(tmp_path / "farm", island or None))
        return made[-1]

    yield make
    for f in made:
        f.c.stop()


def stamp_profile(f: Farm) -> Path:
    script = f.c.root / "stamp.py"
    script.write_text(textwrap.dedent(STAMP))
    return write_profile(f.c.root, "stamp", {
        "processor": "command", "frames": "1-8", "segment": {"frames": 1},
        "settings": {"command": [sys.executable, str(script), "{input}", "{output_dir}", "{start}", "{end}"],
                     "expect": ["frame_{frame:04d}.txt"]},
    })


def frame_count(path: Path) -> int:
    return int(subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0", "-show_entries",
                               "stream=nb_read_frames", "-of", "csv=p=0", str(path)], capture_output=True, text=True,
                              check=True).stdout.strip())


@pytest.mark.slow
@needs_isolation
def test_a_node_without_shared_storage_runs_command_and_transcode_segments(farm_without_shared_storage):
    f = farm_without_shared_storage()
    f.c.start_node("shared", "--slots", "1")
    f.start_island()
    f.c.wait_for_nodes("shared", "island")
    source = lavfi(f.inputs / "clip.mp4", seconds=4, audio=True, extra=["-c:v", "libx264", "-c:a", "aac"])
    digest = hashlib.sha256(source.read_bytes()).hexdigest()

    job = f.submit(stamp_profile(f), source, "-o", f.out / "stamped")
    assert sorted(p.name for p in (f.out / "stamped").iterdir()) == [f"frame_{n:04d}.txt" for n in range(1, 9)]
    assert all((f.out / "stamped" / f"frame_{n:04d}.txt").read_text() == f"{n} {digest}" for n in range(1, 9))
    assert f.nodes_of(job["id"]) == {"shared", "island"}
    status = f.c.farm("status", job["id"])
    assert status.returncode == 0 and "transfer: sent clip.mp4 to island" in status.stdout, status.stdout
    assert "island sent back frame_" in status.stdout

    job = f.submit("h264-web-720p", source, "-o", f.out / "movie", "--set", "segment.seconds=1",
                   "--set", "settings.video.height=240")
    assert frame_count(Path(job["outputs"][0])) == 100
    assert "island" in f.nodes_of(job["id"])

    sent = [t for t in f.transfers() if t["direction"] == "out"]
    # the source went to the island once for both jobs: its cache answered every other segment
    assert [(t["name"], t["offset"], t["bytes"]) for t in sent] == [("clip.mp4", 0, source.stat().st_size)]
    assert {t["node"] for t in f.transfers()} == {"island"}
    assert any(t["direction"] == "in" and t["name"].startswith("video-") for t in f.transfers())
    lines = f.c.farm("nodes").stdout.splitlines()
    below = {line.split()[0]: (lines[n + 1] if n + 1 < len(lines) else "")
             for n, line in enumerate(lines) if not line.startswith(" ")}
    assert below["island"].strip().startswith(f"no shared storage: {source.stat().st_size / 2**20:.1f} MiB sent to it")
    assert not below["shared"].startswith(" ")  # the node on shared storage moved nothing


@pytest.mark.slow
@needs_isolation
def test_a_transfer_killed_half_way_resumes_and_the_cache_sends_nothing_twice(farm_without_shared_storage):
    f = farm_without_shared_storage(transfer_rate=4 * 1024 * 1024)
    f.start_island()
    f.c.wait_for_nodes("island")
    source = f.inputs / "big.bin"
    with open(source, "wb") as handle:
        handle.write(os.urandom(12 * 1024 * 1024))
    profile = stamp_profile(f)
    submitted = f.c.farm("submit", profile, source, "-o", f.out / "first", "--set", "frames=1-2", "--json")
    assert submitted.returncode == 0, submitted.stderr
    partial = f.c.root / "island-cache" / "blobs" / f"{hashlib.sha256(source.read_bytes()).hexdigest()}.part"
    f.c.wait_until(lambda: partial.exists() and partial.stat().st_size > 3 * 1024 * 1024, 60, "half the source")
    f.kill_island()
    kept = partial.stat().st_size

    f.island_config.write_text(f.island_config.read_text().replace("transfer_rate: 4194304", "transfer_rate: null"))
    f.start_island()
    job_id = json.loads(submitted.stdout)["jobs"][0]["id"]
    f.c.wait_until(lambda: f.c.job(job_id)["state"] in ("done", "failed"), 180, "the job to end")
    assert f.c.job(job_id)["state"] == "done", f.c.job(job_id)["error"]
    assert len(list((f.out / "first").iterdir())) == 2

    sent = [t for t in f.transfers() if t["direction"] == "out"]
    assert sent[0]["offset"] == 0 and sent[-1]["offset"] >= kept  # the second began where the first left off
    assert sent[-1]["offset"] + sent[-1]["bytes"] == source.stat().st_size  # only the rest was sent again

    f.submit(profile, source, "-o", f.out / "second", "--set", "frames=1-2")
    sent_again = [t for t in f.transfers() if t["direction"] == "out"]
    assert [t["started"] for t in sent_again] == [t["started"] for t in sent]  # cached: nothing sent again

    # a partial file that is not what the controller has: the whole file comes again
    other = f.inputs / "other.bin"
    other.write_bytes(os.urandom(3 * 1024 * 1024))
    other_sha = hashlib.sha256(other.read_bytes()).hexdigest()
    (f.c.root / "island-cache" / "blobs" / f"{other_sha}.part").write_bytes(os.urandom(1024 * 1024))
    f.submit(profile, other, "-o", f.out / "third", "--set", "frames=1-2")
    assert (f.out / "third" / "frame_0001.txt").read_text() == f"1 {other_sha}"
    assert [(t["offset"], t["bytes"]) for t in f.transfers() if t["name"] == "other.bin"] == \
        [(1024 * 1024, 2 * 1024 * 1024), (0, 3 * 1024 * 1024)]


SCENE = """\
#version 3.7;
#include "parts/colours.inc"
camera { location <0, 2, -5> look_at <0, 0, 0> }
light_source { <2, 4, -3> color rgb 1 }
sphere { <sin(clock * 2 * pi), 0, 0>, 1 pigment { color Body } }
"""


@pytest.mark.slow
@needs_isolation
@pytest.mark.skipif(not shutil.which("povray"), reason="needs POV-Ray")
def test_a_node_without_shared_storage_renders_a_scene_with_its_include(farm_without_shared_storage):
    # node.storage auto (the default): the island finds out that it cannot see the scene
    f = farm_without_shared_storage(storage="auto")
    f.c.start_node("shared", "--slots", "1")
    f.start_island()
    f.c.wait_for_nodes("shared", "island")
    scene = f.inputs / "orbit" / "orbit.pov"
    (scene.parent / "parts").mkdir(parents=True)
    scene.write_text(SCENE)
    (scene.parent / "parts" / "colours.inc").write_text("#declare Body = rgb <1, 0.4, 0.1>;\n")
    # POV-Ray looks for includes in the folder it runs in: the INI points it at parts/
    (scene.parent / "orbit.ini").write_text("Library_Path=parts\nInitial_Frame=1\nFinal_Frame=6\n")

    job = f.submit("povray-png", scene, "-o", f.out / "orbit", "--set", "segment.frames=1",
                   "--set", "settings.width=64", "--set", "settings.height=48")
    assert sorted(p.name for p in (f.out / "orbit").iterdir()) == [f"frame_{n:04d}.png" for n in range(1, 7)]
    assert f.nodes_of(job["id"]) == {"shared", "island"}
    sent = {t["name"] for t in f.transfers() if t["direction"] == "out"}
    assert sent == {"orbit.pov", "orbit.ini", "colours.inc"}


@pytest.mark.slow
def test_the_transfer_routes_serve_only_running_jobs_inputs_to_nodes(farm_without_shared_storage):
    f = farm_without_shared_storage()
    viewer = yaml.safe_load(f.c.add_token("viewer", "view").read_text())["token"]
    source = f.inputs / "clip.bin"
    source.write_bytes(b"frames" * 1000)
    sha = hashlib.sha256(source.read_bytes()).hexdigest()
    submitted = f.c.farm("submit", stamp_profile(f), source, "-o", f.out / "stamped", "--json")  # no node: it waits
    job_id = json.loads(submitted.stdout)["jobs"][0]["id"]

    manifest = f.c.api("GET", f"/api/transfer/jobs/{job_id}/inputs")
    assert manifest.status_code == 200, manifest.text
    assert manifest.json()["files"] == [{"path": "clip.bin", "size": 6000, "sha256": sha}]
    blob = f.c.api("GET", f"/api/transfer/blobs/{sha}", headers={"Range": "bytes=5994-"})
    assert (blob.status_code, blob.content, blob.headers["content-range"]) == (206, b"frames", "bytes 5994-5999/6000")
    as_viewer = f.c.api("GET", f"/api/transfer/blobs/{sha}", headers={"Authorization": f"Bearer {viewer}"})
    assert as_viewer.status_code == 403 and "needs node or admin" in as_viewer.json()["error"]
    other = hashlib.sha256(b"anything else").hexdigest()
    assert f.c.api("GET", f"/api/transfer/blobs/{other}").status_code == 404
    put = f.c.api("PUT", f"/api/transfer/attempts/{job_id}.s0.a1/files/frame.txt", content=b"x",
                  headers={"X-Farm-Sha256": hashlib.sha256(b"x").hexdigest()})
    assert put.status_code == 404 and "not running" in put.json()["error"]

    assert f.c.farm("cancel", job_id).returncode == 0
    f.c.wait_until(lambda: f.c.job(job_id)["state"] == "cancelled", 60, "the job to be cancelled")
    gone = f.c.api("GET", f"/api/transfer/blobs/{sha}")
    assert gone.status_code == 404 and "running job" in gone.json()["error"]


def test_the_node_cache_evicts_the_least_recently_used_files_but_never_one_in_use(tmp_path):
    from farm.transfer import NodeCache

    cache = NodeCache(tmp_path / "cache", limit=2500)
    names = []
    for age, size in enumerate((1000, 1000, 1000, 1000)):
        name = hashlib.sha256(str(age).encode()).hexdigest()
        (cache.blobs / name).write_bytes(b"x" * size)
        os.utime(cache.blobs / name, (1000 + age, 1000 + age))  # the first written is the least recently used
        names.append(name)
    cache.hold(names[0])  # a running segment uses the oldest
    cache.evict()
    assert sorted(p.name for p in cache.blobs.iterdir()) == sorted([names[0], names[3]])
    cache.release(names[0])
    cache.evict()
    assert sorted(p.name for p in cache.blobs.iterdir()) == sorted([names[0], names[3]])  # 2000 bytes: within
    cache.limit = 1500
    cache.evict()
    assert [p.name for p in cache.blobs.iterdir()] == [names[3]]


class _Cutter:
    """A TCP relay to ``port`` that cuts the first connection after ``limit`` bytes from
    the client (a reset to the client, the end of the stream to the server, as when a
    network breaks), and relays later ones whole."""

    def __init__(self, port: int, limit: int):
        import socket
        import threading

        self.port, self.limit, self.connections = port, limit, 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            server = socket.create_connection(("127.0.0.1", self.port))
            limit = self.limit if self.connections == 0 else None
            self.connections += 1
            threading.Thread(target=self._relay, args=(client, server, limit), daemon=True).start()

    def _relay(self, client, server, limit) -> None:
        import socket
        import struct
        import threading

        back = threading.Thread(target=self._pipe, args=(server, client, None), daemon=True)
        back.start()
        cut = self._pipe(client, server, limit)
        # shutting down wakes the other direction's recv (closing would not), then both close
        for end in (client, server):
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        back.join()
        if cut:  # a reset: the client's next send fails at once instead of filling a buffer nobody reads
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        server.close()

    @staticmethod
    def _pipe(source, target, limit) -> bool:
        """Copy until the source ends (False) or ``limit`` bytes would be passed (True)."""
        moved = 0
        try:
            while data := source.recv(1 << 16):
                if limit is not None and moved + len(data) > limit:
                    return True
                target.sendall(data)
                moved += len(data)
        except OSError:
            pass
        try:
            target.shutdown(1)  # the end of one direction passes on, as TCP would
        except OSError:
            pass
        return False


def test_an_output_upload_cut_half_way_sends_only_the_rest_and_a_corrupt_one_is_sent_again(tmp_path):
    import threading
    import time
    from types import SimpleNamespace

    import uvicorn
    from fastapi import FastAPI

    from farm.security import Bundle, init_cluster
    from farm.transfer import ControllerLink
    from farm.transfer_api import add_routes

    bundles = init_cluster("uploads", tmp_path / "bundles")
    work = tmp_path / "work" / "job1"
    (work / "att1").mkdir(parents=True)
    job = SimpleNamespace(input=None, input_stamp=None, work_dir=work)
    controller = SimpleNamespace(scheduler=SimpleNamespace(
        jobs={"job1": SimpleNamespace(state="running", job=job, processor=None)},
        attempts={"att1": SimpleNamespace(job_id="job1", current=True)}, work_root=tmp_path / "work", listeners=[]))
    app = FastAPI()
    depot = add_routes(app, controller, lambda: None, lambda: None)
    with Bundle.load(bundles["controller"]).pem_paths() as files:
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, ssl_certfile=files["cert"],
                                               ssl_keyfile=files["key"], log_level="warning", lifespan="off"))
        threading.Thread(target=server.run, daemon=True).start()
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.01)
    try:
        port = server.servers[0].sockets[0].getsockname()[1]
        output = tmp_path / "segment.bin"
        output.write_bytes(os.urandom(24 << 20))
        sha = hashlib.sha256(output.read_bytes()).hexdigest()

        # the first connection breaks after about 9 MiB: the retry asks and sends the rest
        cutter = _Cutter(port, 9 << 20)
        link = ControllerLink(f"https://127.0.0.1:{cutter.address}", Bundle.load(bundles["node"]), "island")
        link.upload("att1", "part/segment.bin", output)
        cutter.close()
        landed = work / "att1" / "part" / "segment.bin"
        assert hashlib.sha256(landed.read_bytes()).hexdigest() == sha
        first, second = [doc for doc in depot.documents() if doc["direction"] == "in"]
        assert first["bytes"] > 0 and not first["active"]
        assert second["offset"] == first["bytes"]  # resumed where the first stopped
        assert second["bytes"] == output.stat().st_size - first["bytes"]  # and only the rest sent
        assert not list(work.rglob("*.part"))  # the partial went to its name

        # a partial file damaged on the controller: the whole is refused and sent again from byte 0
        damaged = tmp_path / "damaged.bin"
        damaged.write_bytes(os.urandom(12 << 20))
        cutter = _Cutter(port, 5 << 20)
        link = ControllerLink(f"https://127.0.0.1:{cutter.address}", Bundle.load(bundles["node"]), "island")
        real_put = link._put

        def put_after_damage(where, relative, path, sha, size, offset):
            if offset:  # the retry: damage what arrived before it continues
                partial = next((work / ".farm-incoming" / "att1").glob("damaged.bin.*.part"))
                with open(partial, "r+b") as handle:
                    handle.write(b"\0" * 16)
            return real_put(where, relative, path, sha, size, offset)

        link._put = put_after_damage
        link.upload("att1", "damaged.bin", damaged)
        cutter.close()
        assert (work / "att1" / "damaged.bin").read_bytes() == damaged.read_bytes()
        moves = [(doc["offset"], doc["bytes"]) for doc in depot.documents() if doc["name"] == "damaged.bin"]
        assert len(moves) == 3 and moves[1][0] == moves[0][1] > 0  # cut, resumed (refused), again
        assert moves[2] == (0, damaged.stat().st_size)
    finally:
        server.should_exit = True


def test_a_slow_listing_of_a_jobs_inputs_is_done_once_and_the_node_is_told_to_ask_again(tmp_path):
    # Blender may take minutes to list what a .blend links: longer than a node's request
    import threading
    from types import SimpleNamespace

    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from farm.transfer_api import add_routes

    scene = tmp_path / "scene.blend"
    scene.write_bytes(b"blend")
    texture = tmp_path / "textures" / "wood.png"
    texture.parent.mkdir()
    texture.write_bytes(b"png")
    listed, release = [], threading.Event()

    def input_files(job):
        listed.append(job.input)
        assert release.wait(60)
        return [scene, texture]

    job = SimpleNamespace(input=scene, input_stamp=None, work_dir=tmp_path / "work" / "job1")
    controller = SimpleNamespace(scheduler=SimpleNamespace(
        jobs={"job1": SimpleNamespace(state="running", job=job, processor=SimpleNamespace(input_files=input_files))},
        attempts={}, work_root=tmp_path, listeners=[]))
    app = FastAPI()
    add_routes(app, controller, lambda: None, lambda: None)
    client = TestClient(app)

    first = client.get("/api/transfer/jobs/job1/inputs?wait=0")
    assert first.status_code == 202 and "listing the inputs of job job1" in first.json()["pending"]
    assert client.get("/api/transfer/jobs/job1/inputs?wait=0").status_code == 202
    release.set()
    done = client.get("/api/transfer/jobs/job1/inputs?wait=30")
    assert done.status_code == 200, done.text
    assert [entry["path"] for entry in done.json()["files"]] == ["scene.blend", "textures/wood.png"]
    assert client.get("/api/transfer/jobs/job1/inputs").json() == done.json()
    assert listed == [scene]  # listed once, for every segment's request

    texture.write_bytes(b"another png")  # a file changed since: hashed again
    again = client.get("/api/transfer/jobs/job1/inputs?wait=30").json()
    assert again["files"][1]["sha256"] == hashlib.sha256(b"another png").hexdigest()
    assert client.get("/api/transfer/jobs/job9/inputs").status_code == 404


def test_partial_transfers_left_by_killed_processes_are_cleared_and_never_taken_for_whole_files(tmp_path):
    import time

    from farm.transfer import STALE_SECONDS, Depot, NodeCache

    # a node: a partial blob and an attempt's staging folder from a node killed long ago
    cache = NodeCache(tmp_path / "cache", limit=1 << 30)
    old, young = hashlib.sha256(b"old").hexdigest(), hashlib.sha256(b"young").hexdigest()
    (cache.blobs / f"{old}.part").write_bytes(b"ol")
    (cache.blobs / f"{old}.lock").touch()
    (cache.blobs / f"{young}.part").write_bytes(b"yo")
    staged = cache.root / "attempts" / "job1.s0.a1" / "in"
    staged.mkdir(parents=True)
    (staged / "clip.mp4").write_bytes(b"x")
    later = time.time() + STALE_SECONDS + 60
    for path in [cache.blobs / f"{young}.part"]:
        os.utime(path, (later - 10, later - 10))  # written to a moment ago
    removed = {p.name for p in cache.sweep(now=later)}
    assert removed == {f"{old}.part", f"{old}.lock", "job1.s0.a1"}
    assert sorted(p.name for p in cache.blobs.iterdir()) == [f"{young}.part"]  # kept: the next fetch continues it
    cache.evict()  # a part is not a cached file: not counted, not evicted, not served
    assert (cache.blobs / f"{young}.part").exists() and not (cache.blobs / young).exists()

    # the controller: uploads of an attempt that no longer runs, and of one that does
    work = tmp_path / "work"
    for attempt in ("job1.s0.a1", "job1.s1.a1"):
        incoming = work / "job1" / ".farm-incoming" / attempt
        incoming.mkdir(parents=True)
        (incoming / "frame_0001.png.0123456789abcdef.part").write_bytes(b"half")
    running = {"job1.s1.a1": ("job1", work / "job1" / "job1.s1.a1")}
    depot = Depot(lambda job_id: None, running.get)
    assert [p.name for p in depot.sweep(work)] == ["job1.s0.a1"]
    assert [p.name for p in (work / "job1" / ".farm-incoming").iterdir()] == ["job1.s1.a1"]
    assert [p.name for p in depot.sweep(work, now=later)] == ["job1.s1.a1"]  # nothing added for a day
    assert not (work / "job1" / ".farm-incoming").exists()


def test_a_file_sent_to_a_node_shows_what_the_node_has_until_it_has_all_or_falls_silent(tmp_path):
    """The controller's socket takes a file's bytes long before the node has them (both
    ends buffer megabytes): what the transfer list shows is what the node says it holds."""
    import time

    from farm.transfer import NODE_SILENT, Depot, TransferRecord

    depot = Depot(lambda job_id: None, lambda attempt_id: None)
    sha = hashlib.sha256(b"reel").hexdigest()
    resumed = TransferRecord("out", "island", "reel.bin", size=12 << 20, offset=2 << 20, job="job1", sha=sha)
    depot.records.append(resumed)
    resumed.sent = 10 << 20
    [shown] = depot.documents("job1")
    assert shown["active"] and shown["bytes"] == 10 << 20  # no word from the node yet: the controller's count
    resumed.ended, resumed.whole = resumed.started + 0.5, True  # all handed to the socket at once

    depot.fetched("island", sha, 6 << 20)  # the node counts from the start of its file
    [shown] = depot.documents("job1")
    assert shown["active"] and shown["bytes"] == 4 << 20 and shown["ended"] is None
    depot.fetched("elsewhere", sha, 12 << 20)  # another node's word changes nothing here
    depot.fetched("island", hashlib.sha256(b"other").hexdigest(), 12 << 20)
    assert depot.documents("job1")[0]["bytes"] == 4 << 20

    resumed.heard -= NODE_SILENT + 1  # the node went quiet (gone, or its segment cancelled)
    [shown] = depot.documents("job1")
    assert not shown["active"] and shown["bytes"] == 4 << 20

    depot.fetched("island", sha, 12 << 20)
    [shown] = depot.documents("job1")
    assert not shown["active"] and shown["bytes"] == 10 << 20
    assert depot.by_node()["island"] == {"bytes_out": 10 << 20, "bytes_in": 0, "active": 0, "rate": 0}

    cut = TransferRecord("out", "island", "take2.bin", size=12 << 20, offset=0, job="job2", sha=sha)
    depot.records.append(cut)
    cut.sent, cut.ended = 8 << 20, time.time()  # the node's connection broke
    depot.fetched("island", sha, 3 << 20)
    [shown] = depot.documents("job2")
    assert not shown["active"] and shown["bytes"] == 3 << 20  # over at once, at what the node had


def test_a_node_keeps_fetched_inputs_under_farm_cache_when_farm_yaml_names_no_folder(tmp_path, monkeypatch):
    from farm.config import NodeConfig
    from farm.requirements import answers_path
    from farm.transfer import node_cache

    monkeypatch.setenv("FARM_CACHE", str(tmp_path / "caches"))
    cache = node_cache(NodeConfig(storage="local"))
    assert cache.blobs.is_dir() and cache.blobs.is_relative_to(tmp_path / "caches" / "transfer")
    assert answers_path() == tmp_path / "caches" / "programs.json"  # the programs' answers beside them
    assert node_cache(NodeConfig(storage="local", cache=str(tmp_path / "chosen"))).root == tmp_path / "chosen"
