"""Blender scenes as their users lay them out: a .blend with a texture and a linked
library by relative paths (``//textures/x.png``, ``//lib/parts.blend``), rendered through
Farm and by hand (``blender -b shot.blend -s n -e m -a``), compared pixel by pixel.

The scenes are built in the test by Blender itself (no .blend is committed); the
texture is made by ffmpeg.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from farm_imageseq.blender import stepped_runs
from tests.conftest import write_profile

pytestmark = pytest.mark.skipif(shutil.which("blender") is None,
                                reason="Blender is not installed (./setup installs it)")

#: Builds lib/parts.blend (a cone in a collection) and shot.blend: a textured plane that
#: moves and turns over the animation, the library's collection linked and instanced, a
#: camera and a sun; the scene's own size is 128x96 at 50 % (64x48), saved relative.
BUILD = r'''
import bpy, json, os, sys
args = json.loads(sys.argv[sys.argv.index("--") + 1])
folder, library = args["folder"], args["library"]
bpy.ops.wm.read_factory_settings(use_empty=True)
bpy.ops.mesh.primitive_cone_add(location=(1.5, 0, 0))
cone = bpy.context.object
parts = bpy.data.collections.new("Parts")
bpy.context.scene.collection.children.link(parts)
for collection in list(cone.users_collection):
    collection.objects.unlink(cone)
parts.objects.link(cone)
bpy.ops.wm.save_as_mainfile(filepath=os.path.join(folder, library))

bpy.ops.wm.read_factory_settings(use_empty=True)
scene = bpy.context.scene
bpy.ops.mesh.primitive_plane_add(size=2)
plane = bpy.context.object
image = bpy.data.images.load(os.path.join(folder, "textures", "x.png"))
material = bpy.data.materials.new("Textured")
material.use_nodes = True
texture = material.node_tree.nodes.new("ShaderNodeTexImage")
texture.image = image
material.node_tree.links.new(texture.outputs["Color"], material.node_tree.nodes["Principled BSDF"].inputs["Base Color"])
plane.data.materials.append(material)
plane.keyframe_insert("location", frame=1)
plane.keyframe_insert("rotation_euler", frame=1)
plane.location.x, plane.rotation_euler.z = 1.0, 1.0
plane.keyframe_insert("location", frame=args["frames"])
plane.keyframe_insert("rotation_euler", frame=args["frames"])
with bpy.data.libraries.load(os.path.join(folder, library), link=True, relative=True) as (source, target):
    target.collections = ["Parts"]
instance = bpy.data.objects.new("PartsInstance", None)
instance.instance_type, instance.instance_collection = "COLLECTION", target.collections[0]
scene.collection.objects.link(instance)
camera = bpy.data.objects.new("Camera", bpy.data.cameras.new("Camera"))
camera.location, camera.rotation_euler = (0, -5, 4), (0.9, 0, 0)
scene.collection.objects.link(camera)
scene.camera = camera
scene.collection.objects.link(bpy.data.objects.new("Sun", bpy.data.lights.new("Sun", "SUN")))
render = scene.render
render.engine = args["engine"]
render.resolution_x, render.resolution_y, render.resolution_percentage = 128, 96, 50
render.filepath = "//byhand/frame_####"
render.image_settings.file_format = "PNG"
scene.frame_start, scene.frame_end, scene.frame_step = 1, args["frames"], args["step"]
scene.display.shading.color_type = "TEXTURE"
scene.cycles.samples, scene.cycles.seed, scene.cycles.use_denoising = 4, 7, False
bpy.ops.wm.save_as_mainfile(filepath=os.path.join(folder, "shot.blend"), relative_remap=True)
assert image.filepath == "//textures/x.png", image.filepath
assert [lib.filepath for lib in bpy.data.libraries] == ["//" + library], [lib.filepath for lib in bpy.data.libraries]
'''


def build_scene(folder: Path, engine: str = "BLENDER_WORKBENCH", frames: int = 12, step: int = 1,
                library: str = "lib/parts.blend") -> Path:
    """folder/shot.blend with //textures/x.png and //<library>; returns the .blend."""
    (folder / "textures").mkdir(parents=True)
    (folder / library).parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc2=size=64x64", "-frames:v", "1",
                    str(folder / "textures" / "x.png")], check=True, timeout=60)
    spec = {"folder": str(folder), "library": library, "engine": engine, "frames": frames, "step": step}
    done = subprocess.run(["blender", "-b", "-noaudio", "--factory-startup", "--python-exit-code", "3",
                           "--python-expr", BUILD, "--", json.dumps(spec)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return folder / "shot.blend"


def by_hand(blend: Path, *args: str, out: Path | None = None) -> Path:
    """Blender as its user runs it; the frames land in the scene's own //byhand/ (or in
    ``out``, for a scene whose own output path is somewhere else)."""
    where = ["-o", str(out / "frame_####")] if out else []
    done = subprocess.run(["blender", "-b", str(blend), *args, *where, "-a"], capture_output=True, text=True,
                          timeout=600, cwd=blend.parent)
    assert done.returncode == 0, done.stdout[-2000:]
    return out or blend.parent / "byhand"


def pixels(path: Path) -> tuple[int, int, bytes]:
    """Width, height and the decoded RGBA (16 bits a channel) of an image."""
    probe = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries", "stream=width,height",
                            "-of", "csv=p=0", str(path)], capture_output=True, text=True, check=True)
    width, height = (int(x) for x in probe.stdout.strip().split(",")[:2])
    raw = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "rgba64le", "-"],
                         capture_output=True, check=True).stdout
    return width, height, raw


def blender_profile(folder: Path, frames: str, per_segment: int = 3, **settings) -> Path:
    return write_profile(folder, "blend", {
        "processor": "imageseq", "frames": frames, "segment": {"frames": per_segment}, "retries": 1,
        "settings": {"renderer": "blender", "output": "f_####.png", **settings},
    })


def farm_render(farm, farm_env, blend: Path, frames: str, **settings):
    out = farm_env["tmp"] / "out"
    result = farm("run", blender_profile(farm_env["tmp"], frames, **settings), blend, "-o", out, "--json",
                  timeout=900)
    return result, out


def assert_same_pixels(farm_out: Path, hand_out: Path, frames: list[int], size: tuple[int, int]) -> None:
    assert sorted(p.name for p in farm_out.iterdir()) == [f"f_{n:04d}.png" for n in frames]
    for n in frames:
        ours, theirs = pixels(farm_out / f"f_{n:04d}.png"), pixels(hand_out / f"frame_{n:04d}.png")
        assert ours[:2] == theirs[:2] == size, f"frame {n}: {ours[:2]} from Farm, {theirs[:2]} by hand"
        assert ours[2] == theirs[2], f"frame {n}: Farm's pixels differ from Blender's own render"


def test_stepped_runs_are_one_process_per_arithmetic_run():
    assert stepped_runs([1, 3, 5, 7, 8, 9]) == [(1, 7, 2), (8, 9, 1)]
    assert stepped_runs([4]) == [(4, 4, 1)]
    assert stepped_runs([1, 2, 3, 10, 20, 30]) == [(1, 3, 1), (10, 30, 10)]
    assert stepped_runs([5, 2]) == [(5, 5, 1), (2, 2, 1)]


@pytest.mark.slow
def test_sub_range_in_segments_is_blenders_own_picture_workbench(farm, farm_env):
    """Frames 3-10 of a 1-12 animation, three frames a segment, with the scene's own size
    (128x96 at 50 %) and engine: the same pixels as `blender -b shot.blend -s 3 -e 10 -a`,
    texture and linked cone included (Workbench is deterministic: no tolerance)."""
    blend = build_scene(farm_env["tmp"] / "the shot – ü")  # any folder name
    result, out = farm_render(farm, farm_env, blend, "3-10")
    assert result.returncode == 0, result.stdout + result.stderr
    hand = by_hand(blend, "-s", "3", "-e", "10")
    assert_same_pixels(out, hand, list(range(3, 11)), (64, 48))
    # the texture is there: a magenta (missing-image) plane would be one flat colour
    _, _, raw = pixels(out / "f_0005.png")
    assert len(set(raw[i:i + 8] for i in range(0, len(raw), 8))) > 50


@pytest.mark.slow
def test_cycles_with_its_saved_seed_and_samples_is_blenders_own_picture(farm, farm_env):
    """Cycles with the scene's seed and 4 samples, on the CPU: Farm's frames 2-5 (two a
    segment) are bit-identical to Blender's own run."""
    blend = build_scene(farm_env["tmp"] / "scene", engine="CYCLES", frames=6)
    result, out = farm_render(farm, farm_env, blend, "2-5", per_segment=2)
    assert result.returncode == 0, result.stdout + result.stderr
    assert_same_pixels(out, by_hand(blend, "-s", "2", "-e", "5"), [2, 3, 4, 5], (64, 48))


@pytest.mark.slow
def test_frame_step_and_profile_overrides(farm, farm_env):
    """frames: 1-3,5-9x2 renders exactly 1, 2, 3, 5, 7, 9 in one segment, although the
    scene was saved with a frame step of 3 (a bare `-s 1 -e 3 -a` renders only frame 1);
    width/height/engine set in the profile replace the scene's own."""
    blend = build_scene(farm_env["tmp"] / "scene", engine="CYCLES", frames=9, step=3)
    result, out = farm_render(farm, farm_env, blend, "1-3,5-9x2", per_segment=6, width=40, height=30,
                              engine="BLENDER_WORKBENCH")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.json()["jobs"][0]["segments"] == 1
    hand = by_hand(blend, "--python-expr", "import bpy; r = bpy.context.scene.render; r.engine = 'BLENDER_WORKBENCH'; "
                   "r.resolution_x, r.resolution_y, r.resolution_percentage = 40, 30, 100", "-s", "1", "-e", "9", "-j", "1")
    assert_same_pixels(out, hand, [1, 2, 3, 5, 7, 9], (40, 30))


@pytest.mark.slow
def test_the_output_pattern_names_the_format_blender_writes(farm, farm_env):
    """output: f_####.exr writes OpenEXR frames (not PNG under another name), the same
    pixels as `blender -b shot.blend -F OPEN_EXR -a`; a format Blender cannot write is
    refused before anything runs."""
    blend = build_scene(farm_env["tmp"] / "scene", frames=2)
    result, out = farm_render(farm, farm_env, blend, "1-2", per_segment=2, output="f_####.exr")
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["f_0001.exr", "f_0002.exr"]
    assert all((out / name).read_bytes()[:4] == b"\x76\x2f\x31\x01" for name in ("f_0001.exr", "f_0002.exr"))
    hand = by_hand(blend, "-F", "OPEN_EXR", "-s", "1", "-e", "2", out=farm_env["tmp"] / "hand")
    for n in (1, 2):
        assert pixels(out / f"f_{n:04d}.exr") == pixels(hand / f"frame_{n:04d}.exr"), f"frame {n}"
    refused = farm("plan", blender_profile(farm_env["tmp"], "1-2", output="f_####.webp"), blend)
    assert refused.returncode == 2 and "blender cannot write .webp frames" in refused.stderr, refused.stderr


@pytest.mark.parametrize("remove, named", [("textures/x.png", "image //textures/x.png"),
                                            ("lib/parts.blend", "library //lib/parts.blend")])
def test_a_missing_texture_or_library_fails_naming_it(farm, farm_env, remove, named):
    blend = build_scene(farm_env["tmp"] / "scene")
    (blend.parent / remove).unlink()
    result, out = farm_render(farm, farm_env, blend, "1-2")
    assert result.returncode == 1, result.stdout + result.stderr
    error = result.json()["jobs"][0]["error"]
    assert named in error and str(blend.parent / remove) in error and "shot.blend" in error, error
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.slow
def test_a_library_outside_the_blend_folder_says_how_to_show_it(farm, farm_env):
    """A library beside the scene's folder, not in it: the sandbox hides it, and the
    reason says so and how to show it; with the profile's sandbox.read it renders."""
    blend = build_scene(farm_env["tmp"] / "scene", library="../shared/parts.blend")
    shared = farm_env["tmp"] / "shared"
    result, out = farm_render(farm, farm_env, blend, "1")
    assert result.returncode == 1, result.stdout + result.stderr
    error = result.json()["jobs"][0]["error"]
    assert "library //../shared/parts.blend" in error and "exists but outside" in error and str(shared) in error, error
    profile = write_profile(farm_env["tmp"], "blend-shared", {
        "processor": "imageseq", "frames": "1", "sandbox": {"read": [str(shared)]},
        "settings": {"renderer": "blender", "output": "f_####.png"}})
    result = farm("run", profile, blend, "-o", out, "--json", timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert pixels(out / "f_0001.png")[:2] == (64, 48)


#: Debian's blender ships no demo files (blender.org's demo scenes are a separate
#: download); the scenes it ships with a camera are the app templates' start-up files.
SHIPPED = Path("/usr/share/blender/scripts/startup/bl_app_templates_system")


@pytest.mark.slow
@pytest.mark.parametrize("template", ["2D_Animation"])  # VFX, Video_Editing: the same, see docs/blender.md
def test_shipped_scenes_are_blenders_own_picture(farm, farm_env, template):
    """Scenes nobody here wrote (Eevee, as saved; only made 64x48, since Eevee renders in
    software here): Farm's frames 1-2, one a segment, are Blender's own pixels."""
    blend = SHIPPED / template / "startup.blend"
    if not blend.exists():
        pytest.skip(f"{blend} is not installed")
    result, out = farm_render(farm, farm_env, blend, "1-2", per_segment=1, width=64, height=48)
    assert result.returncode == 0, result.stdout + result.stderr
    hand = by_hand(blend, "--python-expr", "import bpy; r = bpy.context.scene.render; "
                   "r.resolution_x, r.resolution_y, r.resolution_percentage = 64, 48, 100", "-s", "1", "-e", "2",
                   out=farm_env["tmp"] / "byhand")
    assert_same_pixels(out, hand, [1, 2], (64, 48))


@pytest.mark.slow
def test_a_file_blender_cannot_read_fails_with_blenders_own_words(farm, farm_env):
    """Blender quits (status 1) on a .blend it cannot read; the job says why, naming it."""
    broken = farm_env["tmp"] / "broken.blend"
    broken.write_text("not a blend file\n")
    result, _ = farm_render(farm, farm_env, broken, "1")
    assert result.returncode == 1, result.stdout + result.stderr
    error = result.json()["jobs"][0]["error"]
    assert "blender failed with exit status 1: Error: File format is not supported" in error and str(broken) in error, error
