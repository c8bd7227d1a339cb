"""POV-Ray as its users run it: ``povray scene.ini +SFn +EFm`` in the scene's folder.

A job names a scene (``.pov``) or an INI (``.ini``). With a scene, the INI beside it
(same stem) is read when there is one, or the one ``settings.ini`` names. POV-Ray reads
the INI itself, so every option in it is honoured (antialiasing, clock range,
``Cyclic_Animation``, ``Declare=``, ``+K…`` switches); then ``renderer_args``; then
what the farm must set: the size it resolved, the frame subset (``+SF``/``+EF``), the
output file and format. It runs in the scene's folder, so includes and INI paths resolve
as they do by hand. Farm reads a few INI keys itself, only to plan: the animation's
frames, the size, the library paths (to show them to the sandbox) and the scene an INI
names. See docs/povray.md.
"""

from __future__ import annotations

import collections
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from farm.errors import DeterministicFailure, PlanError, ProcessorError
from farm.frames import parse_frames

from farm_imageseq.patterns import FramePattern

#: What POV-Ray's option parser takes inside a quoted name: printable ASCII but '"'
#: (3.7 stops a name at its first non-ASCII byte, quoted or not; FACTS.md).
_QUOTABLE = re.compile(r'^[\x20-\x21\x23-\x7e]+$')
_SWITCH = re.compile(r"^[+-](KFI|KFF|SF|EF|W|H|L|I)(.*)$", re.IGNORECASE)
_KEYS = {"width": "W", "height": "H", "initial_frame": "KFI", "final_frame": "KFF", "subset_start_frame": "SF",
         "subset_end_frame": "EF", "library_path": "L", "input_file_name": "I"}
_PROGRESS = re.compile(r"Rendering frame (\d+) of (\d+)")
#: POV-Ray's own name for the frames it writes, before they are renamed to the job's pattern.
RENDERED = "povray-render"
_FRAME_FILE = re.compile(rf"^{RENDERED}(\d*)\.png$")


@dataclass
class Options:
    """The options Farm must know from an INI or an argument list; the rest is POV-Ray's."""

    values: dict[str, str] = field(default_factory=dict)  # W, H, KFI, KFF, SF, EF, I: the last one said
    library_paths: list[str] = field(default_factory=list)

    def number(self, key: str) -> int | None:
        try:
            return int(self.values[key])
        except (KeyError, ValueError):  # absent, or a fraction (+SF0.5): POV-Ray's business
            return None

    def update(self, other: Options) -> None:
        self.values.update(other.values)
        self.library_paths += other.library_paths


def _unquote(value: str) -> str:
    value = value.strip()
    return value[1:-1] if len(value) >= 2 and value[0] == value[-1] == '"' else value


def _strip_comment(line: str) -> str:
    inside = False
    for index, char in enumerate(line):
        if char == '"':
            inside = not inside
        elif char == ";" and not inside:
            return line[:index]
    return line


def read_options(lines: list[str], arguments: bool = False) -> Options:
    """The options in INI lines (``Key=Value`` or ``+W320 +H240`` switches), up to the
    first ``[section]`` label (what POV-Ray reads of an INI named without a section); or
    in command-line ``arguments``, each item one option."""
    found = Options()
    for raw in lines:
        line = raw.strip() if arguments else _strip_comment(raw).strip()
        if not line:
            continue
        if line.startswith("[") and not arguments:
            break
        key, sep, value = line.partition("=")
        if sep and not key.strip().startswith(("+", "-")):
            short = _KEYS.get(key.strip().lower())
            if short:
                items = [(short, _unquote(value))]
            else:
                continue
        else:
            try:
                tokens = [line] if arguments else shlex.split(line, posix=True)
            except ValueError:
                tokens = line.split()
            items = [(m.group(1).upper(), _unquote(m.group(2))) for m in map(_SWITCH.match, tokens) if m]
        for short, text in items:
            if short == "L":
                found.library_paths.append(text)
            else:
                found.values[short] = text
    return found


def quoted(path: Path | str, what: str) -> str:
    """A name as POV-Ray's option parser takes it whole: in double quotes (it splits at
    spaces otherwise, and a quoted leading dash is a name, not a switch)."""
    text = str(path)
    if not _QUOTABLE.match(text):
        raise PlanError(f"POV-Ray cannot take the {what} {text!r} on its command line: its option parser stops at "
                        "a double quote or a non-ASCII character; rename it")
    return f'"{text}"'


@dataclass
class PovSetup:
    """How one POV-Ray job runs: where, with which INI and scene, at which size, over
    which animation, and which frames."""

    folder: Path
    ini: Path | None
    scene: Path | None  # given with +I; None when the INI names it
    width: int
    height: int
    size_from: str
    animation: tuple[int, int]
    animation_from: str
    pass_animation: bool  # +KFI/+KFF from the farm (no INI or argument declares it)
    frames: list[int]
    read: list[Path]

    def notes(self) -> list[str]:
        first, last = self.animation
        runs = f"POV-Ray runs in {self.folder}" + (f" with {self.ini.name}" if self.ini else " (no INI)")
        return [runs, f"size {self.width}x{self.height} ({self.size_from})",
                f"animation frames {first}-{last} {self.animation_from}: the clock runs over all of them, "
                "+SF/+EF choose the frames to render"]


def _within(path: Path, folder: Path) -> bool:
    resolved, root = path.resolve(), folder.resolve()
    return resolved == root or root in resolved.parents


def _resolve_ini(job: Any) -> tuple[Path | None, Path | None]:
    """(ini, scene named by the job) for a job's input."""
    source: Path = job.input
    wanted = job.settings.ini
    if source.suffix.lower() == ".ini":
        if wanted not in ("auto", "none"):
            raise PlanError(f"settings.ini names {wanted!r}, but the input {source.name} is an INI itself; "
                            "give the scene (.pov) or leave settings.ini out")
        return source, None
    if wanted == "none":
        return None, source
    if wanted == "auto":
        beside = source.with_suffix(".ini")
        return (beside if beside.is_file() else None), source
    named = source.parent / wanted
    if not named.is_file():
        raise PlanError(f"settings.ini names {wanted!r}, which is not a file ({named})")
    return named, source


def setup(job: Any) -> PovSetup:
    """Everything Farm decides about a POV-Ray job, from the job, its INI and the profile.
    Cheap and pure (reads the INI); raises :class:`PlanError` with what to do."""
    settings = job.settings
    if job.input is None:
        raise PlanError("a POV-Ray job needs a scene (.pov) or an INI (.ini) as its input")
    ini, scene = _resolve_ini(job)
    folder = scene.parent if scene is not None else ini.parent  # type: ignore[union-attr]
    from_ini = Options()
    if ini is not None:
        try:
            from_ini = read_options(ini.read_text(errors="replace").splitlines())
        except OSError as exc:
            raise PlanError(f"cannot read {ini}: {exc.strerror or exc}") from None
    from_args = read_options(settings.renderer_args, arguments=True)
    options = Options()
    options.update(from_ini)
    options.update(from_args)
    named = ini.name if ini else "renderer_args"
    if scene is None:
        given = options.values.get("I")
        if not given:
            raise PlanError(f"{named} names no scene (Input_File_Name=scene.pov)")
        scene_path = folder / given
        if not scene_path.is_file() and not scene_path.with_name(scene_path.name + ".pov").is_file():
            raise PlanError(f"{named} names Input_File_Name={given}, which is not in {folder}; "
                            "correct the INI, or give the scene itself as the input")
        readable = scene_path.parent
    else:
        readable = scene.parent
    # The sandbox shows what the profile (an admin's) names and what lies in the scene's folder;
    # a submitted INI cannot widen it to other folders: those go in the profile's sandbox.read.
    read = sorted({folder, *([ini.parent] if ini and job.settings.ini not in ("auto", "none") else []),
                   *(path for path in (readable, *(folder / p for p in options.library_paths))
                     if _within(path, folder) and path.is_dir())})

    explicit = job.profile.settings if isinstance(job.profile.settings, dict) else {}
    dims, sources = [], []
    for key, short in (("width", "W"), ("height", "H")):
        if key in explicit:
            dims.append(getattr(settings, key))
            sources.append("the profile")
        elif from_args.number(short):
            dims.append(from_args.number(short))
            sources.append("renderer_args")
        elif ini is not None and from_ini.number(short):
            dims.append(from_ini.number(short))
            sources.append(ini.name)
        else:
            dims.append(getattr(settings, key))
            sources.append("the profile's default")
    size_from = f"from {sources[0]}" if sources[0] == sources[1] else \
        f"width from {sources[0]}, height from {sources[1]}"
    said = [f"{k}={from_ini.values[s]}" for k, s in (("Width", "W"), ("Height", "H")) if s in from_ini.values]
    if ini is not None and "the profile" in sources and said:
        size_from += f", which wins over {ini.name} ({', '.join(said)})"
    elif ini is not None and not said and "the profile's default" in sources:
        size_from += f": {ini.name} sets no Width/Height"

    declared = "KFI" in options.values or "KFF" in options.values
    if declared:
        animation = (options.number("KFI") or 1, options.number("KFF") or 1)
        animation_from = f"from Initial_Frame/Final_Frame of {named}"
        if settings.animation is not None:
            own = parse_frames(settings.animation)
            if (own[0], own[-1]) != animation:
                raise PlanError(f"settings.animation {settings.animation} disagrees with {named} "
                                f"({animation[0]}-{animation[1]}); remove one of them")
    elif settings.animation is not None:
        own = parse_frames(settings.animation)
        animation, animation_from = (own[0], own[-1]), "from settings.animation"
    elif job.frames:
        animation, animation_from = (job.frames[0], job.frames[-1]), \
            "from the profile's frames (no INI declares one; to render part of a longer animation, set settings.animation)"
    else:
        raise PlanError(f"no frames to render: the profile gives no frames and {job.input.name} has no INI that "
                        "declares an animation (Initial_Frame/Final_Frame); set frames, e.g. --set frames=1-48")

    if job.frames:
        frames = list(job.frames)
    else:
        start = options.number("SF") or animation[0]
        end = options.number("EF") or animation[1]
        frames = list(range(start, end + 1))
    if frames[0] < animation[0] or frames[-1] > animation[1]:
        raise PlanError(f"frames {frames[0]}-{frames[-1]} are outside the scene's declared range "
                        f"{animation[0]}-{animation[1]} ({ini.name if declared and ini else animation_from})")
    return PovSetup(folder=folder, ini=ini, scene=scene, width=dims[0], height=dims[1], size_from=size_from,
                    animation=animation, animation_from=animation_from, pass_animation=not declared,
                    frames=frames, read=read)


SCENE_FILES_LIMIT = 2000


def scene_files(pov: PovSetup, source: Path) -> list[Path]:
    """Every file POV-Ray may read for a scene: those under its folder (includes, textures,
    INIs, in the Library_Path folders inside it), for a node that must be sent them."""
    found = {source}
    for folder in pov.read:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.is_symlink():
                found.add(path)
            if len(found) > SCENE_FILES_LIMIT:
                raise ProcessorError(f"the scene's folder {pov.folder} holds more than {SCENE_FILES_LIMIT} files; "
                                     "a node without shared storage is sent all of them: keep the scene, its "
                                     "includes and textures in a folder of their own")
    return sorted(found)


def failure_reason(lines: list[str], folder: Path) -> tuple[str, bool]:
    """POV-Ray's own error from its console output, lines it wrapped at 80 columns joined
    again; and whether it is deterministic (a parse or option error: no retry mends it)."""
    # The last frame's messages follow its options (whose list ends with the warning
    # stream's line). POV-Ray's threads print a parse error before or after the
    # "==== [Parsing...]" banner, so the banner does not mark where they start.
    ends = [i for i, line in enumerate(lines) if line.lstrip().startswith("Warning Stream to console")]
    start = (ends[-1] if ends else max((i for i, line in enumerate(lines) if line.startswith("==== [")), default=-1)) + 1
    joined: list[str] = []
    previous = ""
    for line in lines[start:]:
        if line.startswith("==== ["):
            previous = ""
            continue
        # a line POV-Ray wrapped: the one before it filled the 80 columns, or it starts with one space
        if joined and previous and (line.startswith(" ") and not line.startswith("  ") or len(previous) >= 79):
            joined[-1] += line
        elif line.strip():
            joined.append(line.rstrip())
        previous = line if line.strip() else ""
    messages = [line for line in joined if line.strip() not in ("Render failed",)]
    said = next((m for m in messages if "Parse Error:" in m and "Possible Parse Error" not in m), None) \
        or next((m for m in messages if "Parse Error" in m), None) \
        or next((m for m in messages if "error" in m.lower() or "failed to parse" in m.lower()), None) \
        or next((m for m in reversed(messages) if m.strip()), "")
    deterministic = any(marker in text for text in messages
                        for marker in ("Parse Error", "Fatal error in parser", "Failed to parse", "Problem with option"))
    if "include file" in said or "Cannot find file" in said:
        said += (f" (POV-Ray looks in the scene's folder {folder} and the Library_Path folders; put the file there "
                 "or add its folder to the INI with Library_Path=)")
    return said.strip(), deterministic


def render(job: Any, frames: list[int], runs: list[list[int]], folder: Path, pattern: FramePattern,
           context: Any) -> None:
    """Render ``runs`` (consecutive frames) of ``job`` into ``folder`` under the job's pattern."""
    pov = setup(job)
    out = quoted(folder / f"{RENDERED}.png", "attempt folder")
    head: list[str] = ["povray"]
    links = context.scratch / "povray-input"
    for path, what in ((pov.ini, "ini"), (pov.scene, "scene")):
        if path is None:
            continue
        name = path.name if path.parent == pov.folder else str(path)
        if not _QUOTABLE.match(name):  # reached through an ASCII link; includes still resolve in the folder
            links.mkdir(exist_ok=True)
            link = links / f"{what}{path.suffix.lower()}"
            link.unlink(missing_ok=True)
            link.symlink_to(path)
            name = str(link)
        head.append(quoted(name, what) if what == "ini" else "+I" + quoted(name, what))
    head += list(job.settings.renderer_args)
    done = 0
    for run in runs:
        tail = [f"+W{pov.width}", f"+H{pov.height}"]
        if pov.pass_animation:
            tail += [f"+KFI{pov.animation[0]}", f"+KFF{pov.animation[1]}"]
        tail += [f"+SF{run[0]}", f"+EF{run[-1]}", "+O" + out, "+FN", "-D", "-V"]
        output: collections.deque[str] = collections.deque(maxlen=400)

        def seen(line: str, total: int = len(frames), before: int = done, first: int = run[0]) -> None:
            output.append(line)
            match = _PROGRESS.search(line)  # "Rendering frame 2 of 5": the 2nd of this run
            if match:
                nth = int(match.group(1))
                context.progress((before + nth - 1) / total, f"frame {first + nth - 1}")

        result = context.run([*head, *tail], cwd=pov.folder, check=False, read=pov.read, on_line=seen)
        if result.exit_status != 0:
            said, deterministic = failure_reason(list(output), pov.folder)
            ending = f"exit status {result.exit_status}" if result.signal is None else f"signal {result.signal}"
            error = DeterministicFailure if deterministic and result.signal is None else ProcessorError
            raise error(f"povray failed with {ending}: {said}")
        for produced in sorted(folder.iterdir()):
            match = _FRAME_FILE.match(produced.name)
            if not match:
                continue
            number = int(match.group(1)) if match.group(1) else run[0]  # a one-frame animation has no number
            if number in run:
                produced.rename(folder / pattern.name(number))
        done += len(run)
