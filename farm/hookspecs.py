"""The plugin contract: every hook Farm calls, in lifecycle order.

Plugin authors import only ``from farm import hookimpl``. Implementations may accept
fewer arguments than a hook offers; hooks gain arguments, never lose them. Every hook
is documented in docs/hooks.md and exercised by tests (both checked by the suite).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from farm.config import NodeConfig
    from farm.model import Job
    from farm.processor import Processor

hookspec = pluggy.HookspecMarker("farm")


# -- registration --------------------------------------------------------------------


@hookspec
def farm_processors() -> list[Processor]:
    """Return the processors this plugin provides.

    Called once when the plugin manager is built. Each item is an instance of a
    :class:`farm.processor.Processor` subclass with a unique ``name``; a name that is
    already taken is a warning and the later one is ignored.
    """


@hookspec
def farm_node_capabilities(config: NodeConfig) -> dict[str, str]:
    """Return capabilities this node offers, as ``{name: version}``.

    Called on each node when it starts. ``config`` is the node's configuration (allowed
    commands, slots, ...). Names are free-form (``ffmpeg``, ``povray``,
    ``command:ffmpeg``); the version is a dotted string or ``""`` when it does not
    matter. A profile's ``requires`` (and a processor's ``requires``) are matched
    against the union of every plugin's answer.
    """


@hookspec
def farm_configure(settings: dict[str, Any]) -> None:
    """Receive the ``plugins:`` section of ``farm.yaml``: ``{plugin name: its settings}``.

    Called once when a controller or ``farm run`` starts, before any batch. A plugin
    reads its own key and ignores the others; raising :class:`farm.errors.FarmError`
    (or ``ValueError``) stops the start with that message, naming the plugin.
    """


# -- lifecycle (notifications); called on the controller, never allowed to stop it ----


@hookspec
def farm_batch_submitted(batch_id: str, jobs: list[Job]) -> None:
    """A batch was accepted and stored; ``jobs`` are its jobs, already planned."""


@hookspec
def farm_segment_finished(job: Job, segment_id: str, state: str, result: dict[str, Any] | None, reason: str | None) -> None:
    """An attempt at a segment ended.

    ``state`` is the attempt's final state (``done``, ``failed``, ``timed_out``,
    ``lost``, ``cancelled``); ``result`` is what the processor's ``run`` returned when
    it succeeded, else ``None``; ``reason`` says why it did not.
    """


@hookspec
def farm_job_finished(job: Job, outputs: list[str]) -> None:
    """A job was assembled and verified; ``outputs`` are the paths in its destination."""


@hookspec
def farm_job_failed(job: Job, reason: str) -> None:
    """A job ended ``failed``; ``reason`` is the sentence shown to users."""


@hookspec
def farm_batch_finished(batch_id: str, jobs: list[dict[str, Any]]) -> None:
    """Every job of a batch has ended (``done``, ``failed`` or ``cancelled``).

    ``jobs`` holds one dict per job: ``id``, ``input``, ``profile``, ``state``,
    ``error`` and ``outputs``. Called once per batch, after the last job's end is
    stored (a job chained with ``then:`` belongs to a batch of its own).
    """
