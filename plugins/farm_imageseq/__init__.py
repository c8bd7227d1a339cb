"""The ``imageseq`` processor: image-sequence renders by frame ranges, as Qmaster
distributed Shake and Maya renders. A scene, a frame range, frames per segment, an
output pattern; each node renders its frames; the job is done when every frame is
there, readable, of the expected size.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from farm import hookimpl
from farm.errors import FarmError, PlanError, ProcessorError
from farm.frames import chunk_frames, format_frames, parse_frames
from farm.model import Job, Segment, SegmentPlan
from farm.outputs import deliver
from farm.processor import Context, Processor

from farm_imageseq import povray
from farm_imageseq.patterns import FramePattern
from farm_imageseq.renderers import RENDERERS, check_template
from farm_imageseq.blender import FORMATS as BLENDER_FORMATS  # noqa: I001 (after renderers, which it extends)
from farm_imageseq.blender import linked_files as blender_linked_files

#: With segment.target_seconds and no segment.frames, the first segments are this
#: small so that the farm learns a frame's cost quickly; the core re-cuts the rest.
FIRST_SEGMENT_FRAMES = 2
PREVIEW_WIDTH = 320  # the most a preview may be wide (farm.attemptfiles)


class ImageSeqSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    renderer: Literal["povray", "blender", "template"]
    output: str = Field(default="frame_####.png", description="file pattern: shot_####.png or shot_%04d.png; its extension is the format "
                        "(povray: png; blender: png, exr, tif, jpg, tga, bmp, dpx)")
    width: int = Field(default=640, ge=1, le=16384, description="blender with a .blend: the scene's own unless set")
    height: int = Field(default=480, ge=1, le=16384, description="blender with a .blend: the scene's own unless set")
    engine: Literal["CYCLES", "BLENDER_EEVEE", "BLENDER_WORKBENCH"] = Field(
        default="CYCLES", description="blender only; with a .blend: the scene's own unless set")
    samples: int = Field(default=16, ge=1, le=100000,
                         description="blender Cycles/Eevee samples; with a .blend: the scene's own unless set")
    renderer_args: list[str] = Field(default_factory=list, description="extra arguments, each one argument")
    ini: str = Field(default="auto", description="povray: the INI to read with a scene: auto (the one beside it, same "
                                                 "stem, when there is one), none, or a path relative to the scene's folder")
    animation: str | None = Field(default=None, description="povray: the whole animation the clock runs over "
                                                            "(Initial_Frame-Final_Frame) when no INI declares it, "
                                                            "e.g. 1-240; default: the profile's frames")
    template: list[str] = Field(default_factory=list,
                                description="template renderer: argv with {scene} {start} {end} {output} {output_dir}")

    @field_validator("output")
    @classmethod
    def _output(cls, value: str) -> str:
        FramePattern.parse(value)
        return value

    @field_validator("template")
    @classmethod
    def _template(cls, value: list[str]) -> list[str]:
        check_template(value)
        return value

    @field_validator("animation")
    @classmethod
    def _animation(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                frames = parse_frames(value)
            except FarmError as exc:
                raise ValueError(str(exc)) from None
            if frames != list(range(frames[0], frames[-1] + 1)):
                raise ValueError(f"expected one range such as 1-240, got {value!r}")
        return value

    @model_validator(mode="after")
    def _renderer_needs(self) -> ImageSeqSettings:
        if self.renderer != "povray" and (self.ini != "auto" or self.animation is not None):
            raise ValueError("ini and animation are POV-Ray settings (renderer: povray)")
        if self.renderer == "template" and not self.template:
            raise ValueError("renderer template needs settings.template, e.g. [shake, -exec, '{scene}', -t, '{start}-{end}']")
        extension = FramePattern.parse(self.output).extension
        if self.renderer == "povray" and extension != "png":
            raise ValueError("povray writes PNG here; use an output pattern ending in .png")
        if self.renderer == "blender" and f".{extension}" not in BLENDER_FORMATS:
            raise ValueError(f"blender cannot write .{extension} frames; use an output pattern ending in "
                             f"{', '.join(sorted(BLENDER_FORMATS))}")
        return self

    @property
    def pattern(self) -> FramePattern:
        return FramePattern.parse(self.output)


def image_problem(path: Path, width: int, height: int, context: Any) -> str | None:
    """Why a rendered frame is not sound, or None. A frame other than PNG is probed with
    ``context.run``: ffprobe reads what a renderer wrote, so it runs sandboxed too."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "missing"
    if size == 0:
        return "empty (0 bytes)"
    if path.suffix.lower() == ".png":
        with open(path, "rb") as handle:
            head = handle.read(24)
            handle.seek(max(size - 12, 0))
            tail = handle.read()
        if head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR" or b"IEND" not in tail:
            return "not a complete PNG"
        found = struct.unpack(">II", head[16:24])
    else:
        probe = context.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries",
                     "stream=width,height", "-of", "csv=p=0", str(path)], check=False, read=[path])
        try:
            found = tuple(int(x) for x in probe.output.strip().splitlines()[0].split(",")[:2])
        except (ValueError, IndexError):
            return "not a readable image"
    if tuple(found) != (width, height):
        return f"{found[0]}x{found[1]}, expected {width}x{height}"
    return None


def frame_list(frames: list[int], noun: str) -> str:
    """[17, 18] -> "frames 17, 18"; [3] -> "frame 3"; long runs as ranges: "frames 1-40, 45"."""
    runs: list[list[int]] = []
    for frame in sorted(frames):
        if runs and frame == runs[-1][-1] + 1:
            runs[-1].append(frame)
        else:
            runs.append([frame])
    parts = [f"{run[0]}-{run[-1]}" if len(run) > 2 else ", ".join(map(str, run)) for run in runs]
    return f"{noun}{'s' if len(frames) > 1 else ''} {', '.join(parts)}"


def _by_problem(bad: dict[int, str]) -> dict[str, list[int]]:
    grouped: dict[str, list[int]] = {}
    for frame, problem in sorted(bad.items()):
        grouped.setdefault(problem, []).append(frame)
    return grouped


class ImageSequence(Processor):
    name = "imageseq"
    description = "renders image sequences by frame ranges (POV-Ray, Blender, command templates)"
    settings_model = ImageSeqSettings
    frame_based = True
    sensitive_settings = frozenset({"renderer", "renderer_args", "template", "ini"})

    def input_mode(self, settings: ImageSeqSettings) -> str:
        uses_scene = settings.renderer != "template" or any("{scene}" in item for item in settings.template)
        return "file" if uses_scene and settings.renderer != "blender" else "optional"

    def check(self, profile: Any, settings: ImageSeqSettings) -> None:
        if profile.frames is None and settings.renderer != "povray":  # POV-Ray: the scene's INI may declare them
            raise ProcessorError("frames: an image sequence needs a frame range, such as frames: 1-240")

    def requires(self, job: Job) -> dict[str, str]:
        renderer = job.settings.renderer
        needs = dict(job.profile.requires)
        if renderer == "template":
            needs[f"command:{Path(job.settings.template[0]).name}"] = ""
        else:
            needs.setdefault(renderer, "")
        return needs

    def frames(self, job: Job) -> list[int]:
        """The frames a job renders: the profile's, or (POV-Ray) those its scene's INI declares."""
        if job.settings.renderer == "povray" and job.input is not None:
            return povray.setup(job).frames
        return list(job.frames or [])

    def size(self, job: Job) -> tuple[int, int]:
        if job.settings.renderer == "povray" and job.input is not None:
            pov = povray.setup(job)
            return pov.width, pov.height
        return job.settings.width, job.settings.height

    def input_files(self, job: Job) -> list[Path]:
        """For POV-Ray, the files of the scene's folder (its INI, includes and textures, as
        the sandbox shows them to POV-Ray); for Blender, the .blend and the files it links
        (:func:`farm_imageseq.blender.linked_files`); for the others, the input."""
        if job.settings.renderer == "povray" and job.input is not None:
            return povray.scene_files(povray.setup(job), job.input)
        if job.settings.renderer == "blender" and job.input is not None and job.input.suffix.lower() == ".blend":
            return blender_linked_files(job)
        return super().input_files(job)

    def describe(self, job: Job) -> list[str]:
        if job.settings.renderer == "povray" and job.input is not None:
            return povray.setup(job).notes()
        return []

    def plan(self, job: Job) -> list[SegmentPlan]:
        frames = self.frames(job)
        if not frames:
            raise PlanError("the frame range is empty")
        segment = job.profile.segment
        size = segment.frames or (FIRST_SEGMENT_FRAMES if segment.target_seconds else 10)
        return [SegmentPlan(label=f"frames {format_frames(chunk)}", frames=chunk)
                for chunk in chunk_frames(frames, size)]

    def run(self, segment: Segment, context: Context) -> dict[str, Any]:
        settings: ImageSeqSettings = segment.job.settings
        pattern = settings.pattern
        frames = segment.frames or []
        made = RENDERERS[settings.renderer].render(segment.job, frames, segment.output_dir, pattern, context)
        context.progress(1.0, f"rendered {len(frames)} frame(s)")
        written = {str(frame): pattern.name(frame) for frame in frames if (segment.output_dir / pattern.name(frame)).exists()}
        missing = [frame for frame in frames if str(frame) not in written]
        if missing:  # verification names them and renders them once more
            context.logger.warning("the renderer did not write %s", frame_list(missing, "frame"))
        result: dict[str, Any] = {"dir": str(segment.output_dir), "frames": written, **(made or {})}
        if segment.params.get("again"):
            result["again"] = frames  # what verification asked for: still bad after this, the job fails
        return result

    def preview(self, segment: Segment, result: dict[str, Any], context: Context) -> Path | None:
        """The segment's last frame, scaled to at most 320 px wide (a PNG that small as it is)."""
        frames = result.get("frames") or {}
        if not frames:
            return None
        last = Path(result["dir"]) / frames[max(frames, key=int)]
        if last.suffix.lower() == ".png":
            with open(last, "rb") as handle:
                head = handle.read(24)
            if head[12:16] == b"IHDR" and struct.unpack(">I", head[16:20])[0] <= PREVIEW_WIDTH:
                return last
        made = context.scratch / "preview.jpg"
        context.run(["ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error", "-i", str(last),
                     "-vf", f"scale='min({PREVIEW_WIDTH},iw)':-2", "-frames:v", "1", "-q:v", "4", "-y", str(made)],
                    read=[last])
        return made

    def _frame_files(self, results: list[dict[str, Any]]) -> dict[int, Path]:
        files: dict[int, Path] = {}
        for result in results:  # later results (re-renders) win
            for frame, name in result.get("frames", {}).items():
                files[int(frame)] = Path(result["dir"]) / name
        return files

    def verify(self, job: Job, results: list[dict[str, Any]], context: Context) -> list[SegmentPlan]:
        """Every frame there, readable, of the expected size; bad frames are rendered once
        more, and still bad after that, they fail the job by number."""
        files = self._frame_files(results)
        # a renderer that renders at the scene's own size (Blender) says which in "size"
        sizes = {int(frame): tuple(result["size"]) for result in results if result.get("size")
                 for frame in result.get("frames", {})}
        default_size = self.size(job)
        bad: dict[int, str] = {}
        for frame in self.frames(job):
            path = files.get(frame)
            width, height = sizes.get(frame, default_size)
            problem = "missing" if path is None else image_problem(path, width, height, context)
            if problem:
                bad[frame] = problem
        if not bad:
            return []
        said = "; ".join(f"{frame_list(frames, 'frame')} {problem}" for problem, frames in _by_problem(bad).items())
        tried = {frame for result in results for frame in result.get("again", [])}
        if any(frame in tried for frame in bad):
            raise ProcessorError(f"{said}, after rendering them again")
        context.logger.warning("%s; rendering them again", said)
        return [SegmentPlan(label=f"re-render frames {format_frames(chunk)}", frames=chunk, params={"again": True})
                for chunk in chunk_frames(sorted(bad), job.profile.segment.frames or 10)]

    def outputs(self, job: Job) -> list[Path]:
        pattern = job.settings.pattern
        return [job.destination / pattern.name(frame) for frame in self.frames(job)]

    def assemble(self, job: Job, results: list[dict[str, Any]], context: Context) -> list[str]:
        files = self._frame_files(results)
        targets = dict(zip(self.frames(job), self.outputs(job), strict=True))
        return [str(path) for path in deliver({target: files[frame] for frame, target in targets.items()},
                                              job, context, noun="frames")]


@hookimpl
def farm_processors() -> list[Processor]:
    return [ImageSequence()]


@hookimpl
def farm_node_capabilities(config: Any) -> dict[str, str]:
    """Renderers found on PATH, with their versions."""
    found = {}
    for renderer in RENDERERS.values():
        version = renderer.version()
        if version is not None and renderer.executable:
            found[renderer.name] = version
    return found
