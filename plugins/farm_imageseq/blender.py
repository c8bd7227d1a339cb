"""Blender in the background, as its users run it.

A ``.blend`` renders with what its author saved: resolution (and its percentage), engine,
samples, the PNG options, and textures and linked libraries found by their relative
paths (``//textures/wood.png``, resolved against the .blend's folder, which the sandbox
shows read-only). The profile's ``width``, ``height``, ``engine`` and ``samples`` apply
only when the profile sets them; without a .blend (Blender's factory scene) they apply
with their defaults.

Before rendering, a script inside Blender looks for every external file the scene
refers to (images, libraries, movie clips, fonts, volumes, caches, sequencer strips):
Blender renders a missing image as magenta and a missing library as nothing, so a
missing file fails the segment with its name instead of a wrong picture.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
import subprocess
import threading
from pathlib import Path
from typing import Any

from farm.errors import DeterministicFailure, ProcessorError

from farm_imageseq.patterns import FramePattern
from farm_imageseq.renderers import Renderer, _version_of, scene_folder

#: Runs inside Blender (``--python-expr``) before the frames. Its one input is the JSON
#: argument after ``--``, so no profile value ever becomes Python source; it writes what
#: it found to ``report`` and raises when files are missing (``--python-exit-code``
#: makes that a failed exit, which Blender otherwise reports as 0).
SETUP = r'''
import bpy, json, os, sys
args = json.loads(sys.argv[sys.argv.index("--") + 1])
scene = bpy.context.scene
render = scene.render
report = {"missing": [], "notes": []}

def check(kind, name, written, library=None):
    if not written or written.startswith("<"):  # <builtin> font
        return
    full = os.path.normpath(bpy.path.abspath(written, library=library))
    if not os.path.exists(full):
        report["missing"].append([kind, name, written, full])

for lib in bpy.data.libraries:  # an indirect library's path too is relative to the main file
    check("library", lib.name, lib.filepath)
for image in bpy.data.images:
    if image.packed_file is not None or image.source not in ("FILE", "SEQUENCE", "MOVIE", "TILED"):
        continue
    if image.source == "TILED":
        for tile in image.tiles:
            check("image", image.name, image.filepath.replace("<UDIM>", str(tile.number)), image.library)
    else:
        check("image", image.name, image.filepath, image.library)
for kind, blocks in (("movie clip", bpy.data.movieclips), ("font", bpy.data.fonts),
                     ("volume", bpy.data.volumes), ("cache file", bpy.data.cache_files)):
    for block in blocks:
        if getattr(block, "packed_file", None) is None:
            check(kind, block.name, block.filepath, block.library)
if scene.sequence_editor is not None:
    for strip in scene.sequence_editor.sequences_all:
        if strip.type == "IMAGE":
            for element in strip.elements:
                check("sequencer image", strip.name, os.path.join(strip.directory, element.filename))
        elif strip.type == "MOVIE":
            check("sequencer movie", strip.name, strip.filepath)

given = args["overrides"]
if "engine" in given:
    render.engine = given["engine"]
if "width" in given or "height" in given:
    render.resolution_x = given.get("width", render.resolution_x)
    render.resolution_y = given.get("height", render.resolution_y)
    render.resolution_percentage = 100
if "samples" in given:
    scene.cycles.samples = given["samples"]
    scene.eevee.taa_render_samples = given["samples"]
if render.engine == "CYCLES" and scene.cycles.use_denoising and scene.cycles.denoiser != "OPTIX":
    import _cycles
    if not _cycles.with_openimagedenoise:
        scene.cycles.use_denoising = False
        report["notes"].append("this Blender is built without OpenImageDenoise: rendering without denoising")
wanted = args["format"]  # what the profile's output pattern names
if render.image_settings.file_format != wanted:
    report["notes"].append(f"the scene saves {render.image_settings.file_format}; writing {wanted} "
                           "(the profile's output names it)")
    render.image_settings.file_format = wanted
render.use_file_extension = True
render.use_placeholder = False
render.use_overwrite = True

cropped = render.use_border and render.use_crop_to_border
report["size"] = None if cropped else [render.resolution_x * render.resolution_percentage // 100,
                                       render.resolution_y * render.resolution_percentage // 100]
report["engine"] = render.engine
for note in report["notes"]:
    print("farm: note:", note)
with open(args["report"], "w") as handle:
    json.dump(report, handle)
if report["missing"]:
    raise RuntimeError("farm: missing files: " + "; ".join(f"{kind} {written}" for kind, _, written, _ in report["missing"]))
'''

#: Runs inside Blender on the controller (``--python-expr``, scripts in the file not run:
#: ``-Y``) when a node without shared storage asks for a job's inputs: every external file
#: the scene refers to, as written in the file and as an absolute path, on one line of
#: stdout. It looks at the same blocks as :data:`SETUP`, and an image sequence's frames.
LINKS = r'''
import bpy, json, os, re
found = []

def add(kind, written, library=None):
    if written and not written.startswith("<"):
        found.append([kind, written, os.path.normpath(bpy.path.abspath(written, library=library))])

for lib in bpy.data.libraries:
    add("library", lib.filepath)
for image in bpy.data.images:
    if image.packed_file is not None or image.source not in ("FILE", "SEQUENCE", "MOVIE", "TILED"):
        continue
    if image.source == "TILED":
        for tile in image.tiles:
            add("image", image.filepath.replace("<UDIM>", str(tile.number)), image.library)
    elif image.source == "SEQUENCE":  # its frames: the numbered files beside the one named
        add("image", image.filepath, image.library)
        full = os.path.normpath(bpy.path.abspath(image.filepath, library=image.library))
        folder, name = os.path.split(full)
        match = re.match(r"^(.*?)(\d+)(\.[^.]*)$", name)
        if match and os.path.isdir(folder):
            frame = re.compile(re.escape(match.group(1)) + r"\d+" + re.escape(match.group(3)) + "$")
            written_folder = os.path.dirname(image.filepath)
            for other in sorted(os.listdir(folder)):
                if other != name and frame.match(other):
                    add("image", written_folder + "/" + other, image.library)
    else:
        add("image", image.filepath, image.library)
for kind, blocks in (("movie clip", bpy.data.movieclips), ("font", bpy.data.fonts),
                     ("volume", bpy.data.volumes), ("cache file", bpy.data.cache_files)):
    for block in blocks:
        if getattr(block, "packed_file", None) is None:
            add(kind, block.filepath, block.library)
for scene in bpy.data.scenes:
    if scene.sequence_editor is not None:
        for strip in scene.sequence_editor.sequences_all:
            if strip.type == "IMAGE":
                for element in strip.elements:
                    add("sequencer image", os.path.join(strip.directory, element.filename))
            elif strip.type == "MOVIE":
                add("sequencer movie", strip.filepath)
print("FARM-LINKED " + json.dumps(found))
'''
LINKS_TIMEOUT = 300  # seconds: a big .blend on a loaded controller
#: Without Blender on the controller, a node without shared storage is sent the .blend's
#: folder, as many files as this at most.
FOLDER_FILES_LIMIT = 2000
log = logging.getLogger("farm.imageseq.blender")
_linked: dict[tuple[str, int, int], list[list[str]]] = {}
_linked_lock = threading.Lock()
_probing: dict[tuple[str, int, int], threading.Lock] = {}


def _probe_links(blend: Path, readable: list[Path]) -> list[list[str]]:
    """[kind, as written, absolute path] of every file ``blend`` refers to, found by
    Blender itself (sandboxed where bubblewrap works), once per version of the file."""
    stat = blend.stat()
    key = (str(blend), stat.st_size, stat.st_mtime_ns)
    with _linked_lock:
        if key in _linked:
            return _linked[key]
        one = _probing.setdefault(key, threading.Lock())
    with one:  # nodes asking at once for a new file: Blender runs once, the others wait for it
        with _linked_lock:
            if key in _linked:
                return _linked[key]
        try:
            return _run_probe(blend, readable, key)
        finally:
            with _linked_lock:
                _probing.pop(key, None)


def _run_probe(blend: Path, readable: list[Path], key: tuple[str, int, int]) -> list[list[str]]:
    from farm import sandbox

    argv = ["blender", "-b", "-noaudio", "--factory-startup", "-Y", str(blend), "--python-exit-code", "2",
            "--python-expr", LINKS]
    env = dict(os.environ)
    if sandbox.availability().ok:
        argv = sandbox.wrap(argv, sandbox.Policy(read=[str(path) for path in readable]), cwd=str(blend.parent))
        env = sandbox.sandbox_environment(env, "/tmp")
    try:
        done = subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=LINKS_TIMEOUT,
                              stdin=subprocess.DEVNULL, env=env)
    except subprocess.TimeoutExpired:
        raise ProcessorError(f"blender took longer than {LINKS_TIMEOUT} s to list the files {blend.name} "
                             "links") from None
    line = next((line for line in done.stdout.splitlines() if line.startswith("FARM-LINKED ")), None)
    if done.returncode != 0 or line is None:
        lines = (done.stdout + done.stderr).strip().splitlines()
        said = next((x for x in lines if x.startswith("Error:")), None) or \
            (lines[-1] if lines else f"exit status {done.returncode}")
        failure = DeterministicFailure if said.startswith(DETERMINISTIC_ERRORS) else ProcessorError
        raise failure(f"blender could not list the files {blend.name} links: {said}")
    found = json.loads(line[len("FARM-LINKED "):])
    with _linked_lock:
        if len(_linked) >= 256:  # one entry per version of a .blend: forget the oldest
            del _linked[next(iter(_linked))]
        _linked[key] = found
    return found


def linked_files(job: Any) -> list[Path]:
    """The .blend and every file it links (libraries, textures, ...), for a node without
    shared storage. Each must be referred to by a relative path (``//textures/x.png``),
    so that it is found again beside the .blend the node is sent, and lie under the
    .blend's folder or the profile's ``sandbox.read``, all a render may read; a file
    that does not is refused, naming it. A missing file is left to the render, which
    fails naming it. Without Blender on the controller: every file of the .blend's folder."""
    blend = Path(job.input)
    allowed = [blend.parent, *(Path(p) for p in job.profile.sandbox.read)]
    if shutil.which("blender") is None:
        log.info("no blender on the controller to list what %s links: sending its folder", blend)
        files = [blend]
        for path in sorted(blend.parent.rglob("*")):
            if path.is_file() and not path.is_symlink() and path != blend:
                files.append(path)
            if len(files) > FOLDER_FILES_LIMIT:
                raise ProcessorError(f"the folder of {blend.name} holds more than {FOLDER_FILES_LIMIT} files, and "
                                     "without blender on the controller a node without shared storage is sent all "
                                     "of them: install blender on the controller, or keep the .blend and what it "
                                     "links in a folder of their own")
        return files
    files = [blend]
    for kind, written, full in _probe_links(blend, allowed):
        path = Path(full)
        if not written.startswith("//"):
            raise DeterministicFailure(
                f"{blend.name} links {kind} {written} by an absolute path; a node without shared storage is sent "
                "what a .blend links at the same place beside it: make the paths relative (in Blender: File > "
                "External Data > Make Paths Relative) and save")
        if not any(path.is_relative_to(root) for root in allowed):
            raise DeterministicFailure(  # short: a node passes on the first 300 characters
                f"{blend.name} links {kind} {written} outside its folder: a node without shared storage is sent "
                f"only that folder and the profile's sandbox.read; move the file in, or add {path.parent} to the "
                "profile's sandbox: {read: [...]}")
        if path.is_file() and path not in files:
            files.append(path)
    return files


#: What Blender reports for each frame it wrote.
_SAVED = re.compile(r"^Saved: '(.*)'")
#: The last line of a Python traceback (a script given in renderer_args, an add-on).
_PYTHON_ERROR = re.compile(r"^\w*(Error|Exception)\b.*: ")
#: What Blender says of a file it cannot use (exit status 1): the same on every node, every try.
DETERMINISTIC_ERRORS = ("Error: Cannot read file", "Error: File format is not supported", "Error: Cannot render, no camera")


def stepped_runs(frames: list[int]) -> list[tuple[int, int, int]]:
    """[1,3,5,7,8,9] -> [(1,7,2), (8,9,1)]: (first, last, step) for ``-s -e -j``, so
    that frames 1-240x2 are one Blender process, not 120."""
    runs: list[list[int]] = []
    for frame in frames:
        run = runs[-1] if runs else None
        if run and frame > run[-1] and (len(run) == 1 or frame - run[-1] == run[1] - run[0]):
            run.append(frame)
        else:
            runs.append([frame])
    return [(run[0], run[-1], run[1] - run[0] if len(run) > 1 else 1) for run in runs]


def png_size(path: Path) -> tuple[int, int] | None:
    with open(path, "rb") as handle:
        head = handle.read(24)
    if head[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    width, height = struct.unpack(">II", head[16:24])
    return width, height


def missing_reason(missing: list[list[str]], blend: Path | None, visible: list[Path]) -> str:
    """One sentence naming every missing file, and, for a file that is there on the
    node but outside what the sandbox shows, how to show it."""
    parts = []
    for kind, name, written, full in missing:
        details = [f"looked for at {full}"] if written != full else []
        if kind != "library":
            details.append(f"the {kind} called {name!r} in Blender")
        said = f"{kind} {written}" + (f" ({'; '.join(details)})" if details else "")
        if Path(full).exists() and not any(Path(full).is_relative_to(root) for root in visible):
            said += (", which exists but outside the .blend's folder, all that a render may read: add "
                     f"{Path(full).parent} to the profile's sandbox: {{read: [...]}}")
        parts.append(said)
    where = f" in {blend.name}" if blend else ""
    kinds = {kind for kind, *_ in missing}
    why = ("Blender would render a missing image magenta" if "image" in kinds else
           "Blender would leave out what a missing library holds" if "library" in kinds else
           "Blender would render without it")
    return f"missing files{where}: {'; '.join(parts)} ({why})"


#: Blender's file format for an output pattern's extension, and the extension Blender
#: gives it: the profile's ``output`` names the format the frames are written in.
FORMATS = {".png": ("PNG", ".png"), ".exr": ("OPEN_EXR", ".exr"), ".tif": ("TIFF", ".tif"),
           ".tiff": ("TIFF", ".tif"), ".jpg": ("JPEG", ".jpg"), ".jpeg": ("JPEG", ".jpg"),
           ".tga": ("TARGA", ".tga"), ".bmp": ("BMP", ".bmp"), ".dpx": ("DPX", ".dpx")}


def blender_format(pattern: FramePattern) -> tuple[str, str]:
    extension = "." + pattern.suffix.rsplit(".", 1)[-1].lower()
    if extension not in FORMATS:
        raise DeterministicFailure(f"blender cannot write {extension} frames (output {pattern.prefix}#{pattern.suffix}); "
                                   f"expected one of {', '.join(sorted(FORMATS))}")
    return FORMATS[extension]


class Blender(Renderer):
    """Blender in the background: ``-o`` before ``-a``; the frames chosen with
    ``-s/-e/-j`` (always ``-j``: a scene saved with a frame step of 2 would otherwise
    skip every other frame of a segment)."""

    name = "blender"
    executable = "blender"

    def version(self) -> str | None:
        return _version_of("blender", "--version", r"Blender\s+(\d+(?:\.\d+)+)")

    def render(self, job: Any, frames: list[int], folder: Path, pattern: FramePattern, context: Any) -> dict[str, Any]:
        settings = job.settings
        if job.input is not None and job.input.suffix.lower() != ".blend":
            raise DeterministicFailure(f"blender renders a .blend file; {job.input.name} is not one")
        blend = job.input
        # With a .blend, only what the profile says overrides the scene; the factory
        # scene (no .blend) gets the settings with their defaults.
        chosen = settings.model_fields_set if blend else {"width", "height", "engine", "samples"}
        overrides = {key: getattr(settings, key) for key in ("width", "height", "engine", "samples") if key in chosen}
        report_path = folder / "farm-blender-setup.json"
        file_format, extension = blender_format(pattern)
        done = 0

        def on_line(line: str) -> None:
            nonlocal done
            if _SAVED.match(line):
                done += 1
                context.progress(done / len(frames), f"rendered {done} of {len(frames)} frame(s)")

        size: list[int] | None = None
        for first, last, step in stepped_runs(frames):
            report_path.unlink(missing_ok=True)
            argv = ["blender", "-b", "-noaudio", "--factory-startup", *([str(blend)] if blend else []),
                    "--python-exit-code", "2", "--python-expr", SETUP, *settings.renderer_args,
                    "-o", str(folder / "bl_####"), "-s", str(first), "-e", str(last), "-j", str(step), "-a",
                    "--", json.dumps({"overrides": overrides, "report": str(report_path), "format": file_format})]
            result = context.run(argv, cwd=folder, check=False, read=scene_folder(job), on_line=on_line)
            report = json.loads(report_path.read_text()) if report_path.exists() else None
            if report and report["missing"]:
                raise DeterministicFailure(missing_reason(report["missing"], blend, scene_folder(job)))
            if result.exit_status != 0:
                lines = result.output.splitlines()
                said = next((line for line in lines if line.startswith("Error:")), None) or \
                    next((line for line in reversed(lines) if _PYTHON_ERROR.match(line)), None) or \
                    next((line.strip() for line in reversed(lines) if line.strip()), "")
                ending = f"exit status {result.exit_status}" if result.signal is None else f"signal {result.signal}"
                # Blender's own refusals of the file would come again on any node
                failure = DeterministicFailure if said.startswith(DETERMINISTIC_ERRORS) else ProcessorError
                raise failure(f"blender failed with {ending}: {said}")
            if report is None:
                raise ProcessorError("blender exited 0 but its setup script did not run (see the segment's log)")
            for frame in range(first, last + 1, step):
                produced = folder / f"bl_{frame:04d}{extension}"
                if not produced.exists():
                    raise ProcessorError(f"blender exited 0 but did not write frame {frame}")
                produced.rename(folder / pattern.name(frame))
                if size is None:
                    size = report["size"] or list(png_size(folder / pattern.name(frame)) or [])
        report_path.unlink(missing_ok=True)
        return {"size": size} if size else {}
