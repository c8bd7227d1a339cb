"""The processor contract: what a plugin implements to plan, run and assemble jobs.

A processor is a class with a ``name``, a ``settings_model`` (a pydantic model that
validates the profile's ``settings``), and the methods below. Return instances of
it from the :func:`~farm.hookspecs.farm_processors` hook.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from farm.model import Job, Segment, SegmentPlan


class NoSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass
class NodeInfo:
    """The node a segment runs on, as a processor sees it."""

    name: str
    slots: int
    config: Any  # farm.config.NodeConfig
    capabilities: dict[str, str] = field(default_factory=dict)


@dataclass
class Context:
    """What the node gives a running segment (and the controller an assemble step).

    ``run`` starts a subprocess the way every segment must: an argv list, in its own
    process group, ended on cancel, with a logged header and footer, inside the node's
    sandbox (see :mod:`farm.sandbox`): it reads the job's input and writes the attempt's
    folder and ``scratch``; pass ``read=[...]`` for more files it must read (a scene's
    folder for its includes), ``write=[...]`` for more it must write.
    """

    scratch: Path
    logger: logging.Logger
    progress: Callable[[float, str], None]
    cancelled: threading.Event
    node: NodeInfo
    run: Callable[..., Any]  # farm.node.CommandRunner.run
    #: In an assemble step: claims output paths for the job in the store before they are
    #: delivered, refusing paths another unfinished job holds (``farm.outputs.deliver``
    #: calls it). None on nodes.
    claim: Callable[[list[Path]], None] | None = None


class Processor:
    """Base class for processors; every method has a safe default except ``run``."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    settings_model: ClassVar[type[BaseModel]] = NoSettings
    #: "file": every job needs an input file; "none": inputs are refused;
    #: "optional": one job without input when none is given.
    inputs: ClassVar[str] = "file"
    #: True when the profile's ``frames`` and ``segment.frames`` apply.
    frame_based: ClassVar[bool] = False
    #: Settings (top-level keys of ``settings``) that decide what a process runs, reads,
    #: writes or loads: executables, argument lists, env, cwd. A submitter may not
    #: override them (see :func:`farm.profiles.sensitive_keys`).
    sensitive_settings: ClassVar[frozenset[str]] = frozenset()

    def input_mode(self, settings: BaseModel) -> str:
        """How this profile takes inputs: ``file``, ``none`` or ``optional`` (see ``inputs``)."""
        return self.inputs

    def input_group(self, path: Path) -> tuple[str, int] | None:
        """Files dropped together that make one job, such as an image sequence's frames:
        the group's name and this file's place in it (the lowest place is the job's input,
        and the rest go with it). None: the file is a job of its own. A droplet asks this
        for every settled file; names only, nothing is read."""
        return None

    def requires(self, job: Job) -> dict[str, str]:
        """Capabilities a node must offer to run this job's segments (name -> version spec)."""
        return dict(job.profile.requires)

    def check(self, profile: Any, settings: BaseModel) -> None:
        """Refuse, with a :class:`~farm.errors.ProfileError`, a profile that cannot work."""

    def outputs(self, job: Job) -> list[Path] | None:
        """Every path in ``job.destination`` this job will write, known before it runs
        (templates and frame patterns expanded), or None when they cannot be known until
        its segments have run.

        The core claims these paths in the store at submission, refusing the job (exit 2)
        when another unfinished job has claimed one, or when one exists already and the
        job may not overwrite. Paths not listed here (all of them, with None) are claimed
        at delivery (:func:`farm.outputs.deliver`), where a clash fails the job instead.
        Cheap and pure, like :meth:`plan`; raise :class:`~farm.errors.ProcessorError` for
        a template that cannot work.
        """
        return None

    def input_files(self, job: Job) -> list[Path]:
        """Every file a segment reads from the controller's side (paths as the controller
        sees them): the job's input, and whatever it refers to (a scene's includes and
        textures). A node without shared storage is sent these, laid out under their
        common folder as they are here. Runs on the controller; cheap, like :meth:`plan`."""
        return [job.input] if job.input is not None else []

    def describe(self, job: Job) -> list[str]:
        """Lines `farm plan` shows under a job: what the processor decided that a person
        would want to check first (a renderer's size and where it came from, ...).
        Cheap and pure, like :meth:`plan`."""
        return []

    def plan(self, job: Job) -> Sequence[SegmentPlan]:
        """Cut a job into segments; cheap and pure (may probe, never writes outputs)."""
        return [SegmentPlan(label="whole job")]

    def plan_ahead(self, job: Job) -> None:
        """Called by ``farm run`` before :meth:`plan`, while its cluster starts: learn what
        planning ``job`` will need (probe the source) and keep it for that plan, so that
        the two waits overlap. Errors are ignored here; :meth:`plan` says them."""

    def run(self, segment: Segment, context: Context) -> dict[str, Any]:
        """Process one segment into ``segment.output_dir``; return a JSON-serialisable result."""
        raise NotImplementedError(f"processor {self.name!r} does not implement run()")

    def preview(self, segment: Segment, result: dict[str, Any], context: Context) -> Path | None:
        """A small picture of what a segment made, for the Batch Monitor: the path of a JPEG
        or PNG at most 320 px wide (made in ``context.scratch`` with ``context.run``), or
        None. Called on the node right after :meth:`run` succeeded, with its result; the
        node keeps a copy beside the job's work folder. A preview that fails or is refused
        is a line in the segment's log, never the segment's failure."""
        return None

    def verify(self, job: Job, results: list[dict[str, Any]], context: Context) -> Sequence[SegmentPlan]:
        """Check segment outputs before ``assemble``; return segments to run again (or none).

        Each round that returns segments counts against the profile's ``retries``; raise
        :class:`~farm.errors.ProcessorError` to fail the job with a reason at once.
        """
        return []

    def assemble(self, job: Job, results: list[dict[str, Any]], context: Context) -> list[str]:
        """Join segment results, verify, and deliver them into the destination with
        :func:`farm.outputs.deliver` (or a :class:`farm.outputs.Delivery`): all outputs or
        none, never replacing a file unless ``job.overwrite``. Return the output paths."""
        return []
