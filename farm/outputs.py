"""Output names from a profile's template, kept inside the job's destination.

Tokens: ``{stem}`` (the input's name without extension), ``{profile}``, ``{ext}`` (the
extension the processor writes, without the dot), ``{date}`` (YYYY-MM-DD), and
``{job}``. A template that would leave the destination is refused.
"""

from __future__ import annotations

import datetime
import os
import shutil
import string
import uuid
from pathlib import Path

from farm.errors import ProcessorError
from farm.model import Job

OUTPUT_TOKENS = ("stem", "profile", "ext", "date", "job")


def output_path(job: Job, default_template: str, ext: str) -> Path:
    """The path in the destination for this job's output, from ``output:`` or the default."""
    template = job.profile.output or default_template
    values = {
        "stem": job.input.stem if job.input else job.profile.name,
        "profile": job.profile.name,
        "ext": ext.lstrip("."),
        "date": datetime.date.today().isoformat(),
        "job": job.id,
    }
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise ProcessorError(f"output template {template!r} is malformed: {exc}") from None
    unknown = [name for name in fields if name not in OUTPUT_TOKENS]
    if unknown:
        known = ", ".join("{" + token + "}" for token in OUTPUT_TOKENS)
        raise ProcessorError(f"output template {template!r}: unknown token {{{unknown[0]}}}; expected {known}")
    name = template.format(**values)
    destination = job.destination.resolve()
    target = (destination / name).resolve()
    if not name or target == destination or not target.is_relative_to(destination):
        raise ProcessorError(f"output template {template!r} gives {name!r}, which is not inside {destination}")
    return target


def inside(target: Path, destination: Path) -> Path:
    """``target`` with its symbolic links followed, refused unless that is still inside
    ``destination``: a folder in the destination that links elsewhere is no way out."""
    root = destination.resolve()
    real = target.resolve()
    if real == root or not real.is_relative_to(root):
        raise ProcessorError(f"{target} leads to {real}, which is not inside the destination {root}")
    return real


def deliver(source: Path, target: Path, *, destination: Path) -> Path:
    """Copy a finished file into its destination under a temporary name on the
    destination's filesystem, then rename: a reader never sees half a file, and
    delivering twice is harmless. ``target`` must stay inside ``destination`` (see
    :func:`inside`); it is written where its links lead."""
    target = inside(target, destination)
    if source.is_symlink():  # copying would deliver whatever the link points at
        raise ProcessorError(f"the segment's output {source.name} is a symbolic link (to {os.readlink(source)}); "
                             "only files a segment writes are delivered")
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.farm-{uuid.uuid4().hex[:8]}")
    try:
        shutil.copyfile(source, temporary)
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
    return target
