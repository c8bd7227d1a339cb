"""A reader that left early (`farm status | head -1`): how the CLI notices it and goes quiet.

Python ignores SIGPIPE, so a write to a pipe whose reader has gone raises
``BrokenPipeError`` instead of ending the process as it would end `cat`. The CLI's error
boundary turns that into a quiet exit with status 141 (128 + SIGPIPE, what a shell shows
for a command SIGPIPE ended), but only when one of its own streams is the broken pipe:
a broken pipe to a subprocess or a socket stays a real error.
"""

from __future__ import annotations

import os
import select
from typing import Any


def reader_gone(stream: Any) -> bool:
    """Whether ``stream`` is a pipe (or socket) whose reader has closed it."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    # A pipe's write end reports POLLERR once its last reader has gone.
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


def silence(stream: Any) -> None:
    """Point a stream whose reader has gone at /dev/null: what is still buffered (and
    Python's flush at exit, which would print "Exception ignored ... BrokenPipeError")
    then goes nowhere instead of raising again."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def console(file: Any) -> Any:
    """A rich Console for live displays on ``file`` that stops drawing when its reader
    goes. (rich's own handling points *stdout* at /dev/null and exits with status 1,
    which would read as "a job failed".)"""
    from rich.console import Console

    class _Console(Console):
        def on_broken_pipe(self) -> None:
            self.quiet = True
            silence(self.file)

    return _Console(file=file)


__all__ = ["console", "reader_gone", "silence"]
