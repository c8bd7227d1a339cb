"""Nodes without shared storage, past one file (farm.transfer): an image sequence's
frames and a .blend's linked files are declared inputs, and a droplet's batch runs on
such a node. Real controller and node processes; the isolated node ("island") runs in
its own mount namespace where the input, destination and cluster storage folders are
empty tmpfs mounts (tests/test_transfer.py's helpers)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import write_profile
from tests.test_monitor import browser  # noqa: F401 (a fixture)
from tests.test_transfer import Farm, farm_without_shared_storage, frame_count, needs_isolation  # noqa: F401

needs_blender = pytest.mark.skipif(shutil.which("blender") is None, reason="Blender is not installed")


def sent_names(f: Farm) -> list[str]:
    return sorted(t["name"] for t in f.transfers() if t["direction"] == "out")


@pytest.mark.slow
@needs_isolation
def test_a_node_without_shared_storage_transcodes_an_image_sequence(farm_without_shared_storage):
    f = farm_without_shared_storage()
    # the island alone: beside a node on shared storage it could be left no segment (a
    # shared node finishes 4 small ones before the island has fetched its 100 frames)
    f.start_island()
    f.c.wait_for_nodes("island")
    frames = f.inputs / "plate"
    frames.mkdir()
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc2=size=160x120:rate=25", "-frames:v", "100",
                    "-start_number", "1", str(frames / "plate_%04d.png")], check=True, timeout=120)

    job = f.submit("h264-web-720p", frames / "plate_0001.png", "-o", f.out / "movie", "--set", "segment.seconds=1",
                   "--set", "settings.video.height=120")
    assert frame_count(Path(job["outputs"][0])) == 100
    assert f.nodes_of(job["id"]) == {"island"}
    # every frame went to the island once, whatever number of its segments read it
    assert sent_names(f) == [f"plate_{n:04d}.png" for n in range(1, 101)]


#: Copies frame N of its input's sequence (a printf pattern) to frame_N.txt.
SEQUENCE_COPY = """
import pathlib, sys
pattern, out, first, last = sys.argv[1], pathlib.Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
for frame in range(first, last + 1):
    (out / f"frame_{frame:04d}.txt").write_text(pathlib.Path(pattern % frame).read_text())
"""


@pytest.mark.slow
@needs_isolation
def test_a_command_reading_its_inputs_sequence_runs_on_a_node_without_shared_storage(farm_without_shared_storage):
    f = farm_without_shared_storage()
    f.start_island()  # the only node: every frame it read came through the controller
    f.c.wait_for_nodes("island")
    shots = f.inputs / "shots"
    shots.mkdir()
    for n in range(1, 7):
        (shots / f"shot_{n:04d}.txt").write_text(f"picture {n}")
    (shots / "notes.txt").write_text("not a frame")
    script = f.c.root / "sequence_copy.py"
    script.write_text(SEQUENCE_COPY)
    profile = write_profile(f.c.root, "copy-sequence", {
        "processor": "command", "frames": "1-6", "segment": {"frames": 2},
        "settings": {"command": [sys.executable, str(script), "{input_sequence}", "{output_dir}", "{start}", "{end}"],
                     "expect": ["frame_{frame:04d}.txt"]}})

    job = f.submit(profile, shots / "shot_0001.txt", "-o", f.out / "copied")
    assert [(f.out / "copied" / f"frame_{n:04d}.txt").read_text() for n in range(1, 7)] == \
        [f"picture {n}" for n in range(1, 7)]
    assert f.nodes_of(job["id"]) == {"island"}
    assert sent_names(f) == [f"shot_{n:04d}.txt" for n in range(1, 7)]  # the sequence, not the folder


def blend_job(f: Farm, blend: Path, out: Path, frames: str, **profile) -> subprocess.CompletedProcess:
    path = write_profile(f.c.root, f"blend-{out.name}", {
        "processor": "imageseq", "frames": frames, "segment": {"frames": 1}, "retries": 1, **profile,
        "settings": {"renderer": "blender", "output": "f_####.png"}})
    return f.c.farm("submit", path, blend, "-o", out, "--wait", "--json", timeout=900)


@pytest.mark.slow
@needs_isolation
@needs_blender
def test_a_node_without_shared_storage_renders_a_blend_with_its_library_and_texture(farm_without_shared_storage):
    from tests.test_blender_scenes import assert_same_pixels, build_scene, by_hand

    f = farm_without_shared_storage(storage="auto")
    f.c.start_node("shared", "--slots", "1")
    f.start_island()
    f.c.wait_for_nodes("shared", "island")
    blend = build_scene(f.inputs / "shot")  # //textures/x.png and //lib/parts.blend, Workbench

    result = blend_job(f, blend, f.out / "shot", "1-6")
    assert result.returncode == 0, result.stdout + result.stderr
    job = json.loads(result.stdout)["jobs"][0]
    assert job["state"] == "done", job["error"]
    assert f.nodes_of(job["id"]) == {"shared", "island"}
    assert sent_names(f) == ["parts.blend", "shot.blend", "x.png"]  # what it links, found by Blender, no more
    assert_same_pixels(f.out / "shot", by_hand(blend, "-s", "1", "-e", "6"), list(range(1, 7)), (64, 48))


@pytest.mark.slow
@needs_isolation
@needs_blender
def test_a_linked_file_outside_the_blends_folder_is_refused_unless_the_profile_shows_it(farm_without_shared_storage):
    from tests.test_blender_scenes import build_scene, pixels

    f = farm_without_shared_storage()
    f.start_island()  # the only node: everything it renders went through the controller
    f.c.wait_for_nodes("island")
    blend = build_scene(f.inputs / "shot", library="../shared/parts.blend")
    shared = f.inputs / "shared"

    result = blend_job(f, blend, f.out / "refused", "1")
    job = json.loads(result.stdout)["jobs"][0]
    assert result.returncode == 1 and job["state"] == "failed", result.stdout + result.stderr
    assert "links library //../shared/parts.blend" in job["error"] and "outside its folder" in job["error"]
    assert f"add {shared} to the profile's sandbox" in job["error"], job["error"]
    assert sent_names(f) == []

    result = blend_job(f, blend, f.out / "shown", "1-2", sandbox={"read": [str(shared)]})
    job = json.loads(result.stdout)["jobs"][0]
    assert job["state"] == "done", job["error"]
    assert f.nodes_of(job["id"]) == {"island"}
    assert sent_names(f) == ["parts.blend", "shot.blend", "x.png"]
    assert [pixels(f.out / "shown" / f"f_{n:04d}.png")[:2] for n in (1, 2)] == [(64, 48), (64, 48)]


@pytest.mark.slow
@needs_isolation
def test_a_droplets_batch_runs_on_a_node_without_shared_storage(farm_without_shared_storage):
    """Files dropped into the controller's watch folder (which the island cannot see)
    become jobs whose segments run partly on the island; the outputs land exactly in the
    droplet's destination, and the dropped files move to done/."""
    import yaml

    from tests.conftest import lavfi

    f = farm_without_shared_storage()
    drop, destination = f.inputs / "drop", f.out / "dropped"
    drop.mkdir()
    config = yaml.safe_load(f.c.config.read_text())
    config["droplets"] = [{"name": "incoming", "folder": str(drop), "profile": "h264-web-720p", "destination":
                           str(destination), "settle": 0.5,
                           "set": {"segment.seconds": 1, "settings.video.height": 120}}]
    f.c.config.write_text(yaml.safe_dump(config))
    f.c.controller.terminate()  # started without the droplet: again with it
    f.c.controller.wait(timeout=60)
    f.c.start_controller()
    f.c.start_node("shared", "--slots", "1")
    f.start_island()
    f.c.wait_for_nodes("shared", "island")

    for name, seconds in (("dawn", 4), ("dusk", 3)):  # made aside, then moved in whole (two contents: two jobs)
        clip = lavfi(f.c.root / f"{name}.mp4", seconds=seconds, audio=True, extra=["-c:v", "libx264", "-c:a", "aac"])
        clip.rename(drop / clip.name)

    def finished() -> list[dict]:
        jobs = f.c.api("GET", "/api/jobs").json()
        return jobs if len(jobs) == 2 and all(j["state"] in ("done", "failed", "cancelled") for j in jobs) else []

    jobs = f.c.wait_until(finished, 300, "the two dropped files' jobs to end")
    assert [j["state"] for j in jobs] == ["done", "done"], [j.get("error") for j in jobs]
    assert sorted(p.name for p in destination.iterdir()) == ["dawn-720p.mp4", "dusk-720p.mp4"]
    assert [frame_count(destination / f"{name}-720p.mp4") for name in ("dawn", "dusk")] == [100, 75]
    f.c.wait_until(lambda: sorted(p.name for p in (drop / "done").iterdir()) == ["dawn.mp4", "dusk.mp4"]
                   if (drop / "done").is_dir() else False, 60, "the dropped files to move to done/")
    assert "island" in set().union(*(f.nodes_of(j["id"]) for j in jobs))
    assert set(sent_names(f)) <= {"dawn.mp4", "dusk.mp4"} and sent_names(f)


@pytest.mark.slow
@needs_isolation
def test_the_monitor_page_shows_a_running_transfers_bytes_and_rate(farm_without_shared_storage, browser):
    """A source going to the island at 1 MiB/s: the page's Transfers section shows its
    bytes growing and a rate, the island's row its totals, and the finished transfer
    all of the file. The file is smaller than what the sockets of both ends buffer on
    loopback (about 10 MiB): the bytes shown are those the node has, not those the
    controller has handed to its socket."""
    import hashlib
    import os

    from tests.test_transfer import stamp_profile

    f = farm_without_shared_storage(transfer_rate=1024 * 1024)
    f.start_island()
    f.c.wait_for_nodes("island")
    source = f.inputs / "reel.bin"
    source.write_bytes(os.urandom(12 * 1024 * 1024))

    page = browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 800}).new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{f.c.url}/#token={f.c.token}")
    page.wait_for_selector("#live[data-state=live]", timeout=20000)
    assert page.locator("#transfers-section").is_hidden()  # nothing moved yet

    submitted = f.c.farm("submit", stamp_profile(f), source, "-o", f.out / "stamped", "--set", "frames=1-2", "--json")
    assert submitted.returncode == 0, submitted.stderr
    job_id = json.loads(submitted.stdout)["jobs"][0]["id"]
    row = page.locator("tr[data-transfer='out:island:reel.bin'][data-state=moving]")
    row.wait_for(timeout=60000)

    def moved() -> float:
        text = row.locator(".moved").inner_text()  # "3.0 MiB of 12.0 MiB"
        assert text.endswith("of 12.0 MiB"), text
        return float(text.split()[0])

    first = moved()
    assert first < 12
    assert row.locator(".rate").inner_text().endswith("MiB/s")
    assert "MiB sent to it" in page.locator("[data-node-transfers=island]").inner_text()
    page.screenshot(path=str(f.c.root / "transfer-moving.png"), full_page=True)
    page.wait_for_function("(first) => { const m = document.querySelector(\"tr[data-transfer='out:island:reel.bin'] "
                           ".moved\"); return m && parseFloat(m.textContent) > first; }", arg=first, timeout=30000)

    f.c.wait_until(lambda: f.c.job(job_id)["state"] in ("done", "failed"), 180, "the job to end")
    assert f.c.job(job_id)["state"] == "done", f.c.job(job_id)["error"]
    done = page.locator("tr[data-transfer='out:island:reel.bin'][data-state=done] .moved")
    done.wait_for(timeout=30000)
    assert done.inner_text() == "12.0 MiB of 12.0 MiB"
    assert page.locator("[data-node-transfers=island]").inner_text().startswith(
        "no shared storage: 12.0 MiB sent to it")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    assert (f.out / "stamped" / "frame_0001.txt").read_text() == f"1 {digest}"
    assert not errors, errors


@pytest.mark.slow
@needs_isolation
def test_a_plain_dask_worker_without_shared_storage_fetches_through_the_controller(tmp_path):
    """A worker started as `dask worker … --preload farm.nodeservice` (the line `farm
    cluster export-tls` prints), in a mount namespace without the input, destination and
    storage folders, with only the node bundle beside it: the controller's API address
    comes through the cluster, and it runs a whole job through the controller."""
    import hashlib
    from types import SimpleNamespace

    import yaml

    from tests.cluster_helpers import Cluster, free_port
    from tests.conftest import FARM
    from tests.test_outside_dask import listening, printed_command, start
    from tests.test_transfer import HIDE, stamp_profile

    c = Cluster(tmp_path / "farm")
    try:
        port = free_port()
        address = f"tls://127.0.0.1:{port}"
        exported = c.farm("cluster", "export-tls", c.root / "tls", "--dir", c.bundles, "--scheduler", address)
        assert exported.returncode == 0, exported.stderr
        assert f"FARM_NODE_BUNDLE=/path/node.yaml: a copy of the node bundle {c.bundles / 'node.yaml'}" in \
            exported.stdout
        env, argv = printed_command(exported.stdout, "scheduler")
        start(c, "scheduler", [*argv, "--host", "127.0.0.1", "--dashboard-address", "127.0.0.1:0"], env,
              scheduler=True)
        c.wait_until(lambda: listening(port), 90, "the dask scheduler to listen")
        log = open(c.root / "controller.log", "a")
        c.controller = subprocess.Popen([*FARM, "controller", "--bundle", str(c.bundles / "controller.yaml"),
                                         "--scheduler", address], env=c.env, stdout=log, stderr=subprocess.STDOUT,
                                        cwd=c.root)
        c.wait_until(c.api_up, 90, "the controller's API")

        inputs, out = c.root / "in", c.root / "out"
        inputs.mkdir()
        out.mkdir()
        config = yaml.safe_load(c.config.read_text())
        config["node"].update({"storage": "local", "cache": str(c.root / "worker-cache")})
        island_config = c.root / "worker.yaml"
        island_config.write_text(yaml.safe_dump(config))
        env, argv = printed_command(exported.stdout, "worker", NODE_NAME="plain-island", SLOTS="1")
        hidden = [str(inputs), str(out), str(c.root / "storage")]
        start(c, "plain-island", ["unshare", "--mount", "--propagation", "private", "sh", "-c", HIDE, "sh", *hidden,
                                  "--", *argv, "--host", "127.0.0.1"],
              {**env, "FARM_CONFIG": str(island_config), "FARM_NODE_BUNDLE": str(c.bundles / "node.yaml")})
        c.wait_until(lambda: c.node_names() == ["plain-island"], 180, "the plain worker to report as a node")

        source = inputs / "clip.bin"
        source.write_bytes(b"frames" * 100_000)
        f = SimpleNamespace(c=c)
        result = c.farm("submit", stamp_profile(f), source, "-o", out / "stamped", "--set", "frames=1-3", "--wait",
                        "--json", timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        job = json.loads(result.stdout)["jobs"][0]
        assert job["state"] == "done", job["error"]
        digest = hashlib.sha256(source.read_bytes()).hexdigest()
        assert [(out / "stamped" / f"frame_{n:04d}.txt").read_text() for n in (1, 2, 3)] == \
            [f"{n} {digest}" for n in (1, 2, 3)]
        moved = c.api("GET", "/api/transfers").json()
        assert [(t["direction"], t["node"], t["name"]) for t in moved if t["direction"] == "out"] == \
            [("out", "plain-island", "clip.bin")]
    finally:
        c.stop()


@pytest.mark.slow
def test_farm_nodes_lists_a_connected_dask_worker_that_is_no_farm_node(tmp_path):
    """A plain `dask worker` with the cluster's certificate but without the farm preload
    connects to the controller's scheduler: `farm nodes` lists it, marked, and it gets no
    segment."""
    from tests.cluster_helpers import Cluster
    from tests.test_cluster import work_profile
    from tests.test_outside_dask import printed_command, start

    c = Cluster(tmp_path / "farm")
    try:
        c.start_controller()
        c.start_node("alpha", "--slots", "1")
        c.wait_for_nodes("alpha")
        exported = c.farm("cluster", "export-tls", c.root / "tls", "--dir", c.bundles, "--scheduler",
                          f"tls://127.0.0.1:{c.scheduler_port}")
        assert exported.returncode == 0, exported.stderr
        env, argv = printed_command(exported.stdout, "worker", NODE_NAME="bare", SLOTS="2")
        at = argv.index("farm.nodeservice")
        start(c, "bare", [*argv[:at - 1], *argv[at + 1:], "--host", "127.0.0.1"], env)  # no --preload farm.nodeservice

        def listed() -> list[str]:
            lines = c.farm("nodes").stdout.splitlines()
            return lines if any(line.startswith("bare  not a farm node  2 thread(s)") for line in lines) else []

        lines = c.wait_until(listed, 120, "farm nodes to list the plain worker")
        at = next(n for n, line in enumerate(lines) if line.startswith("bare  "))
        assert "never reported as a farm node" in lines[at + 1] and "gets no segments" in lines[at + 1]
        assert any(line.startswith("alpha  idle") for line in lines), lines
        nodes = {node["name"]: node for node in c.api("GET", "/api/nodes").json()}
        assert nodes["bare"]["farm"] is False and "farm" not in nodes["alpha"]

        submitted = c.farm("submit", work_profile(c, "1-4", 0), "-o", c.root / "out", "--wait", "--json")
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        job = json.loads(submitted.stdout)["jobs"][0]
        assert {a["node"] for s in c.job(job["id"])["segment_list"] for a in s["attempts"]} == {"alpha"}
    finally:
        c.stop()


ABSOLUTE = """
import bpy
bpy.ops.file.make_paths_absolute()
bpy.ops.wm.save_mainfile()
"""


@pytest.mark.slow
@needs_blender
def test_what_a_blend_links_is_listed_by_blender_and_absolute_links_are_refused(tmp_path, monkeypatch):
    """What a node without shared storage would be sent for a .blend (the controller's side,
    no cluster): its library and texture, as Blender lists them; a missing texture is
    left to the render; a file linked by an absolute path is refused, naming it."""
    from types import SimpleNamespace

    from farm.errors import DeterministicFailure
    from farm_imageseq import blender
    from tests.test_blender_scenes import build_scene

    blend = build_scene(tmp_path / "shot")
    (blend.parent / "notes.txt").write_text("not linked")
    job = SimpleNamespace(input=blend, profile=SimpleNamespace(sandbox=SimpleNamespace(read=[])))
    assert blender.linked_files(job) == [blend, blend.parent / "lib" / "parts.blend", blend.parent / "textures" / "x.png"]
    with monkeypatch.context() as patched:  # no Blender on the controller: the .blend's folder
        patched.setattr(blender.shutil, "which", lambda name: None)
        assert sorted(p.name for p in blender.linked_files(job)) == ["notes.txt", "parts.blend", "shot.blend", "x.png"]

    (blend.parent / "textures" / "x.png").unlink()
    blender._linked.clear()
    assert blender.linked_files(job) == [blend, blend.parent / "lib" / "parts.blend"]  # the render names it missing

    made = subprocess.run(["blender", "-b", "-noaudio", "--factory-startup", str(blend), "--python-exit-code", "3",
                           "--python-expr", ABSOLUTE], capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-2000:]
    with pytest.raises(DeterministicFailure) as refused:
        blender.linked_files(job)
    said = str(refused.value)
    assert said.startswith(f"shot.blend links library {blend.parent / 'lib' / 'parts.blend'} by an absolute path")
    assert "Make Paths Relative" in said
