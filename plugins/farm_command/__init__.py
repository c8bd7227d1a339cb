"""The ``command`` processor: any command line, run once per frame-range segment.

The command is an argv template: a list whose items may hold tokens. Each item stays
one argument whatever a token expands to, so a profile value can never become shell
syntax or an extra option. Only executables on the node's allow-list
(``node.allow_commands`` in farm.yaml) ever run, with only environment names on the
node's ``allow_env``, in a working folder inside the attempt's folder, inside the
node's sandbox; the files the profile's own command names (a script) are readable there.
"""

from __future__ import annotations

import os
import re
import shutil
import string
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from farm import hookimpl
from farm.errors import PlanError, ProcessorError, ProfileError
from farm.frames import chunk_frames, format_frames
from farm.model import Job, Segment, SegmentPlan
from farm.outputs import deliver
from farm.processor import Context, Processor
from farm.sandbox import ProcessEnv, WorkFolder, check_env
from farm.security import allowed_executable

#: Tokens a command template may use, and what each one means.
COMMAND_TOKENS = {
    "start": "first frame of the segment",
    "end": "last frame of the segment",
    "count": "number of frames in the segment",
    "frames": "the segment's frames as a spec (1-10, or 1-9x2)",
    "input": "the job's input file (absolute path)",
    "stem": "the input file's name without its extension (or the profile's name)",
    "output_dir": "the folder this attempt writes into (absolute path)",
    "segment": "the segment's index, from 0",
    "scratch": "a private folder on the node's own disk, removed after the segment",
    "input_sequence": "for a numbered input (shot_0001.png): its sequence as a printf pattern (shot_%04d.png)",
    "input_number": "for a numbered input: its number (1)",
    "sequence_name": "for a numbered input: the name before the number (shot)",
}
_NUMBERED = re.compile(r"^(?P<prefix>.*?)(?P<digits>\d+)(?P<ext>\.[^.]+)$")


def sequence_values(path: Path | None) -> dict[str, Any]:
    """The sequence tokens for a numbered frame, so a job chained after a render can
    read the whole sequence; empty for other inputs."""
    match = _NUMBERED.match(path.name) if path else None
    if match is None:
        return {}
    prefix, digits, ext = match["prefix"], match["digits"], match["ext"]
    return {"input_sequence": str(path.with_name(f"{prefix}%0{len(digits)}d{ext}")),
            "input_number": int(digits), "sequence_name": prefix.rstrip("._- ") or path.stem}
#: ``expect`` templates are checked once per frame of the segment.
EXPECT_TOKENS = {"frame": "a frame number", "segment": "the segment's index"}

_formatter = string.Formatter()


def template_fields(template: str) -> list[str]:
    """The token names in a template; raises ValueError on a malformed one."""
    return [name for _, name, _, _ in _formatter.parse(template) if name is not None]


def check_template(template: str, allowed: dict[str, str], where: str) -> None:
    try:
        fields = template_fields(template)
    except ValueError as exc:
        raise ValueError(f"{where}: {template!r} is not a valid template ({exc}); write {{{{ and }}}} for braces")
    for name in fields:
        if name not in allowed:
            known = ", ".join("{" + token + "}" for token in allowed)
            raise ValueError(f"{where}: unknown token {{{name}}} in {template!r}; expected one of {known}")


def expand(template: str, values: dict[str, Any]) -> str:
    """Fill a checked template; only plain names with a format spec are accepted."""
    out = []
    for literal, name, spec, conversion in _formatter.parse(template):
        out.append(literal)
        if name is None:
            continue
        if conversion:
            raise ProcessorError(f"template {template!r}: conversions such as !{conversion} are not supported")
        out.append(format(values[name], spec or ""))
    return "".join(out)


class CommandSettings(BaseModel):
    """Settings of the ``command`` processor."""

    model_config = ConfigDict(extra="forbid")

    command: list[str] = Field(min_length=1, description="argv template; the first item is the executable")
    expect: list[str] = Field(
        default_factory=list,
        description="output files each frame must leave in {output_dir}, e.g. frame_{frame:04d}.png",
    )
    cwd: WorkFolder = Field(default=None, description="working folder, relative, inside the attempt's folder "
                                                      "(default: the attempt's folder)")
    env: ProcessEnv = Field(default_factory=dict,
                            description="extra environment variables; only names on the node's allow_env")

    @field_validator("command")
    @classmethod
    def _command(cls, argv: list[str]) -> list[str]:
        for index, item in enumerate(argv):
            check_template(item, COMMAND_TOKENS, f"item {index}")
        if template_fields(argv[0]):
            raise ValueError("the executable (item 0) must be a fixed name or path, not a template")
        return argv

    @field_validator("expect")
    @classmethod
    def _expect(cls, names: list[str]) -> list[str]:
        for name in names:
            check_template(name, EXPECT_TOKENS, "expect")
            if Path(name).is_absolute() or ".." in Path(name).parts:
                raise ValueError(f"expect: {name!r} must be a name inside the output folder")
        return names

    @property
    def uses_input(self) -> bool:
        inputs = {"input", "input_sequence", "input_number", "sequence_name", "stem"}
        return any(inputs & set(template_fields(item)) for item in self.command)


def executable_name(argv0: str) -> str:
    return Path(argv0).name


class CommandProcessor(Processor):
    name = "command"
    description = "runs a command line once per frame-range segment"
    settings_model = CommandSettings
    frame_based = True
    sensitive_settings = frozenset({"command", "env", "cwd"})

    def input_mode(self, settings: CommandSettings) -> str:
        return "file" if settings.uses_input else "none"

    def check(self, profile: Any, settings: CommandSettings) -> None:
        if profile.frames is None:
            raise ProfileError("frames: the command processor needs a frame range, such as frames: 1-100")

    def input_files(self, job: Job) -> list[Path]:
        """The input; for a command that reads its numbered input's sequence
        (``{input_sequence}``), every file of that sequence beside it (a node without
        shared storage is sent them all)."""
        used = {name for item in job.settings.command for name in template_fields(item)}
        match = _NUMBERED.match(job.input.name) if job.input is not None else None
        if match is None or not used & {"input_sequence", "input_number", "sequence_name"}:
            return super().input_files(job)
        digits = match["digits"]
        frame = re.compile(re.escape(match["prefix"]) + (rf"\d{{{len(digits)},}}" if digits.startswith("0") else r"\d+")
                           + re.escape(match["ext"]) + "$")
        return sorted({job.input, *(path for path in job.input.parent.iterdir()
                                    if frame.match(path.name) and path.is_file())})

    def requires(self, job: Job) -> dict[str, str]:
        return {**job.profile.requires, f"command:{executable_name(job.settings.command[0])}": ""}

    def plan(self, job: Job) -> list[SegmentPlan]:
        frames = job.frames or []
        size = job.profile.segment.frames or len(frames)
        if not frames:
            raise PlanError("the frame range is empty")
        return [
            SegmentPlan(label=f"frames {format_frames(chunk)}", frames=chunk)
            for chunk in chunk_frames(frames, size)
        ]

    def run(self, segment: Segment, context: Context) -> dict[str, Any]:
        settings: CommandSettings = segment.job.settings
        allow = context.node.config.allow_commands
        executable = allowed_executable(settings.command[0], allow)
        if executable is None:
            raise ProcessorError(
                f"command {settings.command[0]!r} is not allowed on node {context.node.name} "
                f"(allowed: {', '.join(allow) or 'nothing'}; see node.allow_commands in farm.yaml)"
            )
        frames = segment.frames or []
        values = {
            "start": frames[0], "end": frames[-1], "count": len(frames), "frames": format_frames(frames),
            "input": str(segment.job.input or ""), "output_dir": str(segment.output_dir), "segment": segment.index,
            "scratch": str(context.scratch),
            "stem": segment.job.input.stem if segment.job.input else segment.job.profile.name,
            **sequence_values(segment.job.input),
        }
        needed = {name for item in settings.command for name in template_fields(item)}
        missing = sorted(needed & {"input_sequence", "input_number", "sequence_name"} - values.keys())
        if missing:
            raise ProcessorError(f"{{{missing[0]}}} needs a numbered input such as shot_0001.png, "
                                 f"not {segment.job.input.name if segment.job.input else 'no input'}")
        try:  # the node's own allow-list decides, whatever the controller's said
            check_env(settings.env, context.node.config.allow_env)
        except ValueError as exc:
            raise ProcessorError(f"settings.env: {exc}") from None
        argv = [executable] + [expand(item, values) for item in settings.command[1:]]
        cwd = segment.output_dir
        if settings.cwd:
            cwd = segment.output_dir / settings.cwd
            if not cwd.resolve().is_relative_to(segment.output_dir.resolve()):
                raise ProcessorError(f"settings.cwd {settings.cwd!r} leads out of the attempt's folder")
            cwd.mkdir(parents=True, exist_ok=True)
        # No "100 %" report here: the segment's result follows at once and says it; the
        # report was one more event through Dask and one more store write per segment.
        context.run(argv, cwd=cwd, env=settings.env or None, read=self._named_files(settings, segment))
        missing = [
            name
            for frame in frames
            for name in (expand(pattern, {"frame": frame, "segment": segment.index}) for pattern in settings.expect)
            if not (segment.output_dir / name).is_file()
        ]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise ProcessorError(f"the command exited 0 but did not write {shown} in {segment.output_dir}")
        files = sorted(  # os.walk: a fraction of rglob's cost, paid by every segment
            os.path.relpath(os.path.join(folder, name), segment.output_dir)
            for folder, _, names in os.walk(segment.output_dir)
            for name in names
            if os.path.isfile(os.path.join(folder, name))
        )
        return {"dir": str(segment.output_dir), "files": files}

    def outputs(self, job: Job) -> list[Path] | None:
        """The files ``expect`` names, for every frame; a command without ``expect`` may
        write anything, so its files are claimed when they are delivered."""
        settings: CommandSettings = job.settings
        if not settings.expect:
            return None
        by_segment = any("segment" in template_fields(pattern) for pattern in settings.expect)
        chunks = [(index, plan.frames or []) for index, plan in enumerate(self.plan(job))] if by_segment \
            else [(0, job.frames or [])]
        names = {expand(pattern, {"frame": frame, "segment": index})
                 for index, frames in chunks for frame in frames for pattern in settings.expect}
        return [job.destination / name for name in sorted(names)]

    @staticmethod
    def _named_files(settings: CommandSettings, segment: Segment) -> list[Path]:
        """What the command may read besides its input: the files its profile names
        (``python3 /opt/tools/render.py``), and for a numbered input its whole sequence."""
        named = [Path(item) for item in settings.command[1:]
                 if not template_fields(item) and Path(item).is_absolute() and Path(item).exists()]
        used = {name for item in settings.command for name in template_fields(item)}
        if segment.job.input is not None and used & {"input_sequence", "input_number", "sequence_name"}:
            named.append(segment.job.input.parent)
        return named

    def verify(self, job: Job, results: list[dict[str, Any]], context: Context) -> list[SegmentPlan]:
        """The frames whose ``expect`` files no segment delivered (a node that said "done"
        without writing them) are run again."""
        settings: CommandSettings = job.settings
        if not settings.expect or any("segment" in template_fields(p) for p in settings.expect):
            return []
        made = {name for result in results for name in result.get("files") or []
                if isinstance(name, str) and (Path(str(result.get("dir") or "")) / name).is_file()}
        missing = [frame for frame in job.frames or []
                   if any(expand(p, {"frame": frame, "segment": 0}) not in made for p in settings.expect)]
        size = job.profile.segment.frames or len(missing) or 1
        return [SegmentPlan(label=f"frames {format_frames(chunk)} (their files were missing)", frames=chunk)
                for chunk in chunk_frames(missing, size)]

    def assemble(self, job: Job, results: list[dict[str, Any]], context: Context) -> list[str]:
        moves: dict[Path, Path] = {}
        for result in results:
            for name in result.get("files", []):
                target = job.destination / name
                if target in moves:
                    raise ProcessorError(f"two segments wrote {name}; each segment must write its own files")
                moves[target] = Path(result["dir"]) / name
        return [str(path) for path in deliver(moves, job, context, noun="files")]


@hookimpl
def farm_processors() -> list[Processor]:
    return [CommandProcessor()]


@hookimpl
def farm_node_capabilities(config: Any) -> dict[str, str]:
    """``command:NAME`` for every allowed executable this node actually has."""
    offered = {}
    for entry in config.allow_commands:
        if shutil.which(entry):
            offered[f"command:{executable_name(entry)}"] = ""
    return offered
