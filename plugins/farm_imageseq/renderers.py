"""Renderer adapters: one small class each. A renderer turns a segment's frames into
image files in a folder and names them as the job's pattern wants.

Adding a renderer: subclass :class:`Renderer`, set ``name`` and ``executable``, write
``render`` (and ``version`` if the program reports one), and add it to ``RENDERERS``.
"""

from __future__ import annotations

import functools
import re
import string
from pathlib import Path
from typing import Any, ClassVar

from farm.errors import ProcessorError
from farm.requirements import program_answer
from farm.security import allowed_executable

from farm_imageseq import povray
from farm_imageseq.patterns import FramePattern


def consecutive_runs(frames: list[int]) -> list[list[int]]:
    """[1,2,3,7,9,10] -> [[1,2,3],[7],[9,10]]: renderers take ranges, not lists."""
    runs: list[list[int]] = []
    for frame in frames:
        if runs and frame == runs[-1][-1] + 1:
            runs[-1].append(frame)
        else:
            runs.append([frame])
    return runs


def scene_folder(job: Any) -> list[Path]:
    """What a renderer may read besides the system: the scene's folder (includes,
    textures and INI files sit beside the scene)."""
    return [job.input.parent] if job.input is not None else []


class Renderer:
    name: ClassVar[str] = ""
    executable: ClassVar[str] = ""

    def version(self) -> str | None:
        """The installed version, or None when the program is not on PATH."""
        return None

    def render(self, job: Any, frames: list[int], folder: Path, pattern: FramePattern, context: Any
               ) -> dict[str, Any] | None:
        """Render ``frames`` into ``folder``, named by ``pattern``. May return what goes into
        the segment's result, e.g. ``{"size": [w, h]}`` when the scene chose the size."""
        raise NotImplementedError


@functools.lru_cache(maxsize=None)
def _version_of(executable: str, flag: str, regex: str) -> str | None:
    done = program_answer([executable, flag])  # kept per installed binary: blender takes a second
    if done is None:
        return None
    match = re.search(regex, done.stdout + done.stderr)
    return match.group(1) if match else ""


class PovRay(Renderer):
    """POV-Ray as its users run it, with the scene's INI (see :mod:`farm_imageseq.povray`)."""

    name = "povray"
    executable = "povray"

    def version(self) -> str | None:
        return _version_of("povray", "--version", r"POV-Ray\s+(\d+(?:\.\d+)+)")

    def render(self, job: Any, frames: list[int], folder: Path, pattern: FramePattern, context: Any) -> None:
        povray.render(job, frames, consecutive_runs(frames), folder, pattern, context)


TEMPLATE_TOKENS = ("scene", "start", "end", "output", "output_dir")


class Template(Renderer):
    """A Shake-style command template, as `shake -exec script -t 1-10` was distributed:
    ``{scene} {start} {end} {output}`` (output: the pattern with %04d, in the segment's
    folder). Each item stays one argument; only allowed executables run."""

    name = "template"

    def render(self, job: Any, frames: list[int], folder: Path, pattern: FramePattern, context: Any) -> None:
        template = job.settings.template
        allowed = allowed_executable(template[0], context.node.config.allow_commands)
        if allowed is None:
            raise ProcessorError(f"command {template[0]!r} is not allowed on node {context.node.name} "
                                 "(see node.allow_commands in farm.yaml)")
        for run in consecutive_runs(frames):
            values = {"scene": str(job.input or ""), "start": run[0], "end": run[-1],
                      "output": str(folder / pattern.printf), "output_dir": str(folder)}
            argv = [allowed] + [item.format(**values) for item in template[1:]]
            named = [Path(item) for item in template[1:]  # a script the (admin's) profile names
                     if "{" not in item and Path(item).is_absolute() and Path(item).exists()]
            context.run(argv, cwd=folder, read=[*scene_folder(job), *named])


def check_template(items: list[str]) -> None:
    for item in items:
        for _, field, _, conversion in string.Formatter().parse(item):
            if field is not None and (field not in TEMPLATE_TOKENS or conversion):
                known = ", ".join("{" + token + "}" for token in TEMPLATE_TOKENS)
                raise ValueError(f"unknown token {{{field}}} in {item!r}; expected one of {known}")


# Blender has its own module, which uses the names above (hence imported here, last).
from farm_imageseq.blender import Blender  # noqa: E402

RENDERERS: dict[str, Renderer] = {r.name: r for r in (PovRay(), Blender(), Template())}
