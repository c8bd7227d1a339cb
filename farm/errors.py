"""Error categories and the exit status each one maps to.

Every error a user can cause is a :class:`FarmError` whose message says what went
wrong, where, and what was expected; the CLI prints it as one line.
"""

from __future__ import annotations

from collections.abc import Iterator
from enum import IntEnum


class ExitStatus(IntEnum):
    OK = 0
    JOB_FAILED = 1
    BAD_INPUT = 2
    INTERNAL = 3
    INTERRUPTED = 130
    BROKEN_PIPE = 141  # 128 + SIGPIPE: the reader of the output left early, as with any Unix command


class FarmError(Exception):
    """A problem a person can fix; the message is shown as it is."""

    exit_status = ExitStatus.BAD_INPUT


class ProfileError(FarmError):
    """A profile that cannot be found, parsed or validated."""


class UsageError(FarmError):
    """Bad arguments, inputs or destinations."""


class OutputConflict(UsageError):
    """An output path that another unfinished job has claimed (or that exists already):
    the submission is refused before anything runs."""


class Forbidden(FarmError):
    """A request that the caller's token may not make (HTTP 403); the message names the
    token, its role and what the action needs."""


class PlanError(FarmError):
    """A processor could not cut a job into segments."""


class ProcessorError(FarmError):
    """A segment or an assemble step failed; the message is the job's reason."""


class DeterministicFailure(ProcessorError):
    """A segment failure that would happen again on any node, on every try: a scene that
    does not parse, a missing include or texture. A processor raises it (the message is
    the renderer's own reason, with file and line); the job fails at once with that
    reason instead of retrying the segment and keeping nodes off the job."""


class SourceChanged(DeterministicFailure):
    """A job's input was deleted or changed after the job was accepted; retrying cannot help."""


class IllegalTransition(FarmError):
    """A state change that the transition table does not allow."""

    exit_status = ExitStatus.INTERNAL


class StoreError(FarmError):
    """The state store cannot be opened or written."""

    exit_status = ExitStatus.INTERNAL


def causes(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc`` and what it was raised from or while handling, outermost first: libraries
    (Dask, httpx) wrap the error a user can act on in their own."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__
