"""POV-Ray scenes laid out the way their authors lay them out (a name with a space, an
include beside the scene, an INI with antialiasing and clock settings, a sub-range of a
longer animation), rendered through Farm and by hand (`povray scene.ini +SFn +EFm` in
the scene's folder), frame by frame: the decoded pixels are identical."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from farm.store import Store
from tests.conftest import write_profile

SCENE = """\
#version 3.7;
#include "{include}"
#ifndef (Speed) #declare Speed = 1; #end
camera {{ location <0, 2, -5> look_at <0, 0, 0> }}
light_source {{ <2, 4, -3> color rgb 1 }}
sphere {{ <sin(clock * Speed * 2 * pi), 0, 0>, 1 pigment {{ color Body }} }}
plane {{ y, -1 pigment {{ checker color rgb 1 color rgb 0.2 }} }}
"""
PARTS = "#declare Body = rgb <1, 0.4, 0.1>;\n"


def make_scene(folder: Path, name: str, include: str = "orbit_parts.inc") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / include).write_text(PARTS)
    scene = folder / name
    scene.write_text(SCENE.format(include=include))
    return scene


def pixels(path: Path) -> bytes:
    """The decoded pixels of an image (16 bits a channel, alpha included)."""
    return subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "rgba64le", "-"],
                          capture_output=True, check=True).stdout


def by_hand(folder: Path, args: list[str], out: Path) -> dict[int, Path]:
    """Run povray as a person does, in the scene's folder; its frames by number."""
    out.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["povray", *args, f"+O{out}/hand.png", "+FN", "-D", "-V"], cwd=folder,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    frames = {int(p.stem[4:] or 1): p for p in out.glob("hand*.png")}
    assert frames, f"povray wrote nothing: {done.stderr[-2000:]}"
    return frames


def assert_same_pixels(farm_out: Path, pattern: str, hand: dict[int, Path], frames: list[int]) -> None:
    written = sorted(p.name for p in farm_out.iterdir())
    assert written == sorted(pattern.format(f) for f in frames)
    for frame in frames:
        assert pixels(farm_out / pattern.format(frame)) == pixels(hand[frame]), f"frame {frame} differs from povray's own"


def profile(folder: Path, **keys) -> Path:
    settings = {"renderer": "povray", "output": "f_####.png", **keys.pop("settings", {})}
    return write_profile(folder, "pov", {"processor": "imageseq", "segment": {"frames": 2}, "retries": 1,
                                         "settings": settings, **keys})


def attempts(farm_env, job_id: str) -> list[int]:
    store = Store(farm_env["state"] / "farm.db")
    try:
        return [s["attempts"] for s in store.segments(job_id)]
    finally:
        store.close()


@pytest.mark.slow
def test_a_scene_whose_name_holds_a_space_renders_the_same_pixels(farm, farm_env):
    scene = make_scene(farm_env["tmp"] / "shot", "orbit scene.pov")
    size = {"width": 32, "height": 24}
    result = farm("run", profile(farm_env["tmp"], frames="1-5", settings=size), scene, "-o", farm_env["tmp"] / "out",
                  "--json")
    assert result.returncode == 0, result.stderr
    hand = by_hand(scene.parent, ['+I"orbit scene.pov"', "+KFI1", "+KFF5", "+W32", "+H24"], farm_env["tmp"] / "hand")
    assert_same_pixels(farm_env["tmp"] / "out", "f_{:04d}.png", hand, [1, 2, 3, 4, 5])


@pytest.mark.parametrize("name", ["-dash.pov", "scène.pov"])
def test_names_with_a_leading_dash_or_beyond_ascii_render(farm, farm_env, name):
    scene = make_scene(farm_env["tmp"] / "shot", name)
    result = farm("run", profile(farm_env["tmp"], frames="1-2", settings={"width": 16, "height": 12}), scene,
                  "-o", farm_env["tmp"] / "out", "--json")
    assert result.returncode == 0, result.stderr
    plain = make_scene(farm_env["tmp"] / "plain", "plain.pov")
    hand = by_hand(plain.parent, ["+Iplain.pov", "+KFI1", "+KFF2", "+W16", "+H12"], farm_env["tmp"] / "hand")
    assert_same_pixels(farm_env["tmp"] / "out", "f_{:04d}.png", hand, [1, 2])


@pytest.mark.slow
def test_an_include_beside_the_scene_is_found_from_the_scenes_folder(farm, farm_env):
    scene = make_scene(farm_env["tmp"] / "project" / "scenes", "orbit.pov", include="shared parts.inc")
    result = farm("run", profile(farm_env["tmp"], frames="1-3", settings={"width": 32, "height": 24}), scene,
                  "-o", farm_env["tmp"] / "out", "--json")
    assert result.returncode == 0, result.stderr
    hand = by_hand(scene.parent, ["+Iorbit.pov", "+KFI1", "+KFF3", "+W32", "+H24"], farm_env["tmp"] / "hand")
    assert_same_pixels(farm_env["tmp"] / "out", "f_{:04d}.png", hand, [1, 2, 3])


ANTIALIASED_INI = """\
; the author's own settings: none of them may be lost on the farm
Input_File_Name=orbit.pov
Width=40
Height=30
Antialias=On
Antialias_Threshold=0.05
Antialias_Depth=3
Sampling_Method=2
Jitter=Off
Initial_Frame=1
Final_Frame=8
Initial_Clock=0.25
Final_Clock=0.75
Cyclic_Animation=on
Declare=Speed=3
"""


@pytest.mark.parametrize("given", ["ini", "scene"])
@pytest.mark.slow
def test_an_ini_with_antialiasing_and_clock_settings_renders_as_povray_does(farm, farm_env, given):
    scene = make_scene(farm_env["tmp"] / "shot", "orbit.pov")
    ini = scene.with_suffix(".ini")
    ini.write_text(ANTIALIASED_INI)
    source = ini if given == "ini" else scene
    result = farm("run", profile(farm_env["tmp"]), source, "-o", farm_env["tmp"] / "out", "--json")
    assert result.returncode == 0, result.stderr
    hand = by_hand(scene.parent, ["orbit.ini"], farm_env["tmp"] / "hand")
    assert sorted(hand) == list(range(1, 9))
    assert_same_pixels(farm_env["tmp"] / "out", "f_{:04d}.png", hand, list(range(1, 9)))


@pytest.mark.slow
def test_the_inis_library_path_and_the_profiles_renderer_args_are_honoured(farm, farm_env):
    scene = make_scene(farm_env["tmp"] / "shot", "orbit.pov", include="parts.inc")
    (scene.parent / "lib").mkdir()
    (scene.parent / "parts.inc").rename(scene.parent / "lib" / "parts.inc")
    scene.with_suffix(".ini").write_text("Library_Path=lib\nInitial_Frame=1\nFinal_Frame=4\nWidth=32\nHeight=24\n")
    pov = profile(farm_env["tmp"], settings={"renderer_args": ["Declare=Speed=2", "+A0.1"]})
    result = farm("run", pov, scene, "-o", farm_env["tmp"] / "out", "--json")
    assert result.returncode == 0, result.stderr
    hand = by_hand(scene.parent, ["orbit.ini", "+Iorbit.pov", "Declare=Speed=2", "+A0.1"], farm_env["tmp"] / "hand")
    assert_same_pixels(farm_env["tmp"] / "out", "f_{:04d}.png", hand, [1, 2, 3, 4])
    plain = by_hand(scene.parent, ["orbit.ini", "+Iorbit.pov"], farm_env["tmp"] / "plain")
    assert pixels(plain[2]) != pixels(farm_env["tmp"] / "out" / "f_0002.png")  # the arguments made a difference


@pytest.mark.slow
def test_a_sub_range_of_an_ini_animation_is_the_same_frames_as_the_whole_render(farm, farm_env):
    scene = make_scene(farm_env["tmp"] / "shot", "orbit.pov")
    scene.with_suffix(".ini").write_text("Initial_Frame=1\nFinal_Frame=12\nWidth=32\nHeight=24\n")
    result = farm("run", profile(farm_env["tmp"]), scene, "-o", farm_env["tmp"] / "out", "--set", "frames=5-9",
                  "--json")
    assert result.returncode == 0, result.stderr
    whole = by_hand(scene.parent, ["orbit.ini", "+Iorbit.pov"], farm_env["tmp"] / "hand")
    assert sorted(whole) == list(range(1, 13))
    assert_same_pixels(farm_env["tmp"] / "out", "f_{:04d}.png", whole, [5, 6, 7, 8, 9])


@pytest.mark.slow
def test_a_sub_range_without_an_ini_runs_the_clock_over_the_declared_animation(farm, farm_env):
    scene = make_scene(farm_env["tmp"] / "shot", "orbit.pov")
    pov = profile(farm_env["tmp"], frames="1-12", settings={"width": 32, "height": 24, "animation": "1-12"})
    result = farm("run", pov, scene, "-o", farm_env["tmp"] / "out", "--set", "frames=5-9", "--json")
    assert result.returncode == 0, result.stderr
    whole = by_hand(scene.parent, ["+Iorbit.pov", "+KFI1", "+KFF12", "+W32", "+H24"], farm_env["tmp"] / "hand")
    assert_same_pixels(farm_env["tmp"] / "out", "f_{:04d}.png", whole, [5, 6, 7, 8, 9])


def test_farm_plan_shows_the_size_the_animation_and_which_one_wins(farm, farm_env):
    scene = make_scene(farm_env["tmp"] / "shot", "orbit.pov")
    scene.with_suffix(".ini").write_text("Initial_Frame=1\nFinal_Frame=12\nWidth=320\nHeight=240\n")
    from_ini = farm("plan", profile(farm_env["tmp"]), scene)
    assert from_ini.returncode == 0, from_ini.stderr
    assert "size 320x240 (from orbit.ini)" in from_ini.stdout
    assert "animation frames 1-12 from Initial_Frame/Final_Frame of orbit.ini" in from_ini.stdout
    assert from_ini.stdout.count("frames ") >= 6  # 12 frames in segments of 2
    overridden = farm("plan", profile(farm_env["tmp"]), scene, "--set", "settings.width=64", "--set",
                      "settings.height=48", "--set", "frames=3-4")
    assert "size 64x48 (from the profile, which wins over orbit.ini (Width=320, Height=240))" in overridden.stdout
    assert "frames 3-4" in overridden.stdout
    outside = farm("plan", profile(farm_env["tmp"]), scene, "--set", "frames=10-20")
    assert outside.returncode == 2 and "outside the scene's declared range 1-12 (orbit.ini)" in outside.stderr


def test_an_ini_naming_a_scene_that_is_not_there_is_refused_with_the_name(farm, farm_env):
    folder = farm_env["tmp"] / "shot"
    folder.mkdir()
    (folder / "reflection.ini").write_text("Input_File_Name=reflect.pov\nInitial_Frame=1\nFinal_Frame=4\n")
    result = farm("run", profile(farm_env["tmp"]), folder / "reflection.ini", "-o", farm_env["tmp"] / "out", "--json")
    assert result.returncode == 1
    assert "reflection.ini names Input_File_Name=reflect.pov, which is not in" in result.json()["jobs"][0]["error"]


def test_a_parse_error_fails_the_job_at_once_with_povrays_file_and_line(farm, farm_env):
    folder = farm_env["tmp"] / "a folder with a rather long name so that povray wraps its message"
    folder.mkdir()
    broken = folder / "broken scene.pov"
    broken.write_text("#version 3.7;\ncamera { location -5 look_at 0 }\nsphere { <0,0,0>, 1 pigment { rgb 1 }\n")
    pov = profile(farm_env["tmp"], frames="1-6", retries=2)
    result = farm("run", pov, broken, "-o", farm_env["tmp"] / "out", "--json")
    assert result.returncode == 1
    job = result.json()["jobs"][0]
    assert job["error"].startswith("povray failed with exit status 1: File 'broken scene.pov' line 3: Parse Error: "
                                   "No matching } in 'sphere'"), job["error"]
    # no retry: each segment tried once; at most the two slots' segments and the one each
    # slot held next (pipelined), which starts as its slot frees, before the failure is read
    tries = attempts(farm_env, job["id"])
    assert max(tries) == 1 and sum(tries) <= 4, tries


def test_a_missing_include_fails_at_once_naming_it_whole(farm, farm_env):
    folder = farm_env["tmp"] / "shot"
    folder.mkdir()
    scene = folder / "orbit.pov"
    scene.write_text(SCENE.format(include="a_rather_long_include_name_that_povray_would_wrap_on_its_console.inc"))
    result = farm("run", profile(farm_env["tmp"], frames="1-2", retries=2), scene, "-o", farm_env["tmp"] / "out",
                  "--json")
    assert result.returncode == 1
    job = result.json()["jobs"][0]
    assert "File 'orbit.pov' line 2: Parse Error: Cannot open include file " \
           "a_rather_long_include_name_that_povray_would_wrap_on_its_console.inc" in job["error"], job["error"]
    assert f"the scene's folder {folder}" in job["error"]
    assert attempts(farm_env, job["id"]) == [1]


def test_missing_and_empty_frames_are_named_by_number_and_rendered_once_more(farm, farm_env):
    """A renderer that never writes frame 3 and writes frame 4 empty: both are rendered
    once more, and then the job fails naming them."""
    script = ("import sys\n"
              "for f in range(int(sys.argv[1]), int(sys.argv[2]) + 1):\n"
              "    if f == 3: continue\n"
              "    open(sys.argv[3] % f, 'wb').write(b'' if f == 4 else open(sys.argv[4], 'rb').read())\n")
    good = farm_env["tmp"] / "good.png"
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "color=red:size=16x8", "-frames:v", "1", str(good)],
                   check=True)
    pov = write_profile(farm_env["tmp"], "liar", {
        "processor": "imageseq", "frames": "1-5", "segment": {"frames": 5}, "retries": 2,
        "settings": {"renderer": "template", "output": "f_####.png", "width": 16, "height": 8,
                     "template": [sys.executable, "-c", script, "{start}", "{end}", "{output}", str(good)]},
        "sandbox": {"read": [str(good)]},
    })
    result = farm("run", pov, "-o", farm_env["tmp"] / "out", "--json")
    assert result.returncode == 1
    job = result.json()["jobs"][0]
    assert "frame 3 missing; frame 4 empty (0 bytes), after rendering them again" in job["error"], job["error"]
    store = Store(farm_env["state"] / "farm.db")
    labels = [s["label"] for s in store.segments(job["id"])]
    store.close()
    assert labels == ["frames 1-5", "re-render frames 3-4"]  # rendered once more, not once per retry


def test_a_job_every_node_was_kept_off_says_how_many_nodes_which_and_why(farm, farm_env):
    pov = write_profile(farm_env["tmp"], "crash", {
        "processor": "imageseq", "frames": "1-4", "segment": {"frames": 2}, "retries": 5, "max_node_failures": 1,
        "settings": {"renderer": "template", "output": "f_####.png",
                     "template": [sys.executable, "-c", "import sys; print('out of luck'); sys.exit(3)", "{start}"]},
    })
    result = farm("run", pov, "-o", farm_env["tmp"] / "out", "--json")
    assert result.returncode == 1
    error = result.json()["jobs"][0]["error"]
    assert error.startswith("the only node that can run it (node \""), error
    assert "failed it 1 time (max_node_failures) and was kept off the job; last error: " in error
    assert "exit status 3" in error


# What POV-Ray 3.7 printed for a frame whose scene does not parse, as a node read it: its
# threads put the parse error after the "==== [Parsing...]" banner or, on a busy machine, before it.
OPTIONS_PRINTED = """Rendering frame 1 of 2

Image Output Options
  Image resolution.....640 by 480 (rows 1 to 480, columns 1 to 640).
  Output file........../tmp/pytest-of-root/pytest-52/popen-gw0/test_a_parse_erro
r_fails_the_j0/state/work/jef4d7131c4/jef4d7131c4.s00000.a1/povray-render1.png,
 24 bpp PNG
Information Output Options
  All Streams to console..........On 
  Fatal Stream to console.........On 
  Warning Stream to console.......On """.splitlines()
PARSE_ERROR = ["File 'broken scene.pov' line 3: Parse Error: No matching } in 'sphere', End of",
               " File found instead"]
BANNER = ["==== [Parsing...] =========================================================="]
ENDING = ["Fatal error in parser: Cannot parse input.", "Render failed", ""]


@pytest.mark.parametrize("printed", [OPTIONS_PRINTED + BANNER + PARSE_ERROR + ENDING,
                                     OPTIONS_PRINTED + PARSE_ERROR + BANNER + ENDING,
                                     BANNER + PARSE_ERROR + ENDING],
                         ids=["after the banner", "before the banner", "no options printed"])
def test_povrays_parse_error_is_the_reason_whole_wherever_its_threads_print_it(printed):
    from farm_imageseq.povray import failure_reason

    said, deterministic = failure_reason(printed, Path("/scenes/shot"))
    assert said == "File 'broken scene.pov' line 3: Parse Error: No matching } in 'sphere', End of File found instead"
    assert deterministic
