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
from farm.errors import PlanError, ProcessorError
from farm.frames import chunk_frames, format_frames
from farm.model import Job, Segment, SegmentPlan
from farm.outputs import deliver
from farm.processor import Context, Processor

from farm_imageseq.patterns import FramePattern
from farm_imageseq.renderers import RENDERERS, check_template

#: With segment.target_seconds and no segment.frames, the first segments are this
#: small so that the farm learns a frame's cost quickly; the core re-cuts the rest.
FIRST_SEGMENT_FRAMES = 2


class ImageSeqSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    renderer: Literal["povray", "blender", "template"]
    output: str = Field(default="frame_####.png", description="file pattern: shot_####.png or shot_%04d.png")
    width: int = Field(default=640, ge=1, le=16384, description="blender with a .blend: the scene's own unless set")
    height: int = Field(default=480, ge=1, le=16384, description="blender with a .blend: the scene's own unless set")
    engine: Literal["CYCLES", "BLENDER_EEVEE", "BLENDER_WORKBENCH"] = Field(
        default="CYCLES", description="blender only; with a .blend: the scene's own unless set")
    samples: int = Field(default=16, ge=1, le=100000,
                         description="blender Cycles/Eevee samples; with a .blend: the scene's own unless set")
    renderer_args: list[str] = Field(default_factory=list, description="extra arguments, each one argument")
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

    @model_validator(mode="after")
    def _renderer_needs(self) -> ImageSeqSettings:
        if self.renderer == "template" and not self.template:
            raise ValueError("renderer template needs settings.template, e.g. [shake, -exec, '{scene}', -t, '{start}-{end}']")
        if self.renderer in ("povray", "blender") and FramePattern.parse(self.output).extension != "png":
            raise ValueError(f"{self.renderer} writes PNG here; use an output pattern ending in .png")
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
        return "empty"
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


class ImageSequence(Processor):
    name = "imageseq"
    description = "renders image sequences by frame ranges (POV-Ray, Blender, command templates)"
    settings_model = ImageSeqSettings
    frame_based = True
    sensitive_settings = frozenset({"renderer", "renderer_args", "template"})

    def input_mode(self, settings: ImageSeqSettings) -> str:
        uses_scene = settings.renderer != "template" or any("{scene}" in item for item in settings.template)
        return "file" if uses_scene and settings.renderer != "blender" else "optional"

    def check(self, profile: Any, settings: ImageSeqSettings) -> None:
        if profile.frames is None:
            raise ProcessorError("frames: an image sequence needs a frame range, such as frames: 1-240")

    def requires(self, job: Job) -> dict[str, str]:
        renderer = job.settings.renderer
        needs = dict(job.profile.requires)
        if renderer == "template":
            needs[f"command:{Path(job.settings.template[0]).name}"] = ""
        else:
            needs.setdefault(renderer, "")
        return needs

    def plan(self, job: Job) -> list[SegmentPlan]:
        if not job.frames:
            raise PlanError("the frame range is empty")
        renderer = RENDERERS[job.settings.renderer]
        declared = renderer.declared_range(job.input) if job.input and hasattr(renderer, "declared_range") else None
        if declared and (job.frames[0] < declared[0] or job.frames[-1] > declared[1]):
            raise PlanError(f"frames {format_frames(job.frames)} are outside the scene's declared range "
                            f"{declared[0]}-{declared[1]} ({job.input.with_suffix('.ini').name})")
        segment = job.profile.segment
        size = segment.frames or (FIRST_SEGMENT_FRAMES if segment.target_seconds else 10)
        return [SegmentPlan(label=f"frames {format_frames(chunk)}", frames=chunk)
                for chunk in chunk_frames(job.frames, size)]

    def run(self, segment: Segment, context: Context) -> dict[str, Any]:
        settings: ImageSeqSettings = segment.job.settings
        pattern = settings.pattern
        frames = segment.frames or []
        made = RENDERERS[settings.renderer].render(segment.job, frames, segment.output_dir, pattern, context)
        context.progress(1.0, f"rendered {len(frames)} frame(s)")
        written = {str(frame): pattern.name(frame) for frame in frames if (segment.output_dir / pattern.name(frame)).exists()}
        missing = [frame for frame in frames if str(frame) not in written]
        if missing:
            raise ProcessorError(f"the renderer did not write frames {format_frames(missing)} "
                                 f"({pattern.name(missing[0])} ...)")
        return {"dir": str(segment.output_dir), "frames": written, **(made or {})}

    def _frame_files(self, results: list[dict[str, Any]]) -> dict[int, Path]:
        files: dict[int, Path] = {}
        for result in results:  # later results (re-renders) win
            for frame, name in result.get("frames", {}).items():
                files[int(frame)] = Path(result["dir"]) / name
        return files

    def verify(self, job: Job, results: list[dict[str, Any]], context: Context) -> list[SegmentPlan]:
        settings: ImageSeqSettings = job.settings
        files = self._frame_files(results)
        # a renderer that renders at the scene's own size (Blender) says which in "size"
        sizes = {int(frame): tuple(result["size"]) for result in results if result.get("size")
                 for frame in result.get("frames", {})}
        bad: dict[int, str] = {}
        for frame in job.frames or []:
            path = files.get(frame)
            width, height = sizes.get(frame, (settings.width, settings.height))
            problem = "missing" if path is None else image_problem(path, width, height, context)
            if problem:
                bad[frame] = problem
        if not bad:
            return []
        context.logger.warning("frames to render again: %s", ", ".join(f"{f} ({why})" for f, why in bad.items()))
        return [SegmentPlan(label=f"re-render frames {format_frames(chunk)}", frames=chunk)
                for chunk in chunk_frames(sorted(bad), job.profile.segment.frames or 10)]

    def outputs(self, job: Job) -> list[Path]:
        pattern = job.settings.pattern
        return [job.destination / pattern.name(frame) for frame in job.frames or []]

    def assemble(self, job: Job, results: list[dict[str, Any]], context: Context) -> list[str]:
        files = self._frame_files(results)
        targets = dict(zip(job.frames or [], self.outputs(job), strict=True))
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
