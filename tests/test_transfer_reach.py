"""Nodes without shared storage, past one file (farm.transfer): an image sequence's
frames and a .blend's linked files are declared inputs, and a droplet's batch runs on
such a node. Real controller and node processes; the isolated node ("island") runs in
its own mount namespace where the input, destination and cluster storage folders are
empty tmpfs mounts (tests/test_transfer.py's helpers)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import write_profile
from tests.test_transfer import Farm, farm_without_shared_storage, frame_count, needs_isolation  # noqa: F401

needs_blender = pytest.mark.skipif(shutil.which("blender") is None, reason="Blender is not installed")


def sent_names(f: Farm) -> list[str]:
    return sorted(t["name"] for t in f.transfers() if t["direction"] == "out")


@pytest.mark.slow
@needs_isolation
def test_a_node_without_shared_storage_transcodes_an_image_sequence(farm_without_shared_storage):
    f = farm_without_shared_storage()
    f.c.start_node("shared", "--slots", "1")
    f.start_island()
    f.c.wait_for_nodes("shared", "island")
    frames = f.inputs / "plate"
    frames.mkdir()
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc2=size=160x120:rate=25", "-frames:v", "100",
                    "-start_number", "1", str(frames / "plate_%04d.png")], check=True, timeout=120)

    job = f.submit("h264-web-720p", frames / "plate_0001.png", "-o", f.out / "movie", "--set", "segment.seconds=1",
                   "--set", "settings.video.height=120")
    assert frame_count(Path(job["outputs"][0])) == 100
    assert "island" in f.nodes_of(job["id"])
    # every frame went to the island once, whatever number of its segments read it
    assert sent_names(f) == [f"plate_{n:04d}.png" for n in range(1, 101)]


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
