"""Python's garbage collector in the processes that start Dask and run the queue (a
controller, ``farm run``): held off while they start, tuned once they have."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

#: Python's collector in a process that holds a queue. Its default first threshold (700
#: allocations) runs a young collection hundreds of times a second under a busy queue, each
#: promoting what is alive at that instant (attempts in flight, events not yet published), and
#: the promoted pile up into full collections that scan the whole backlog: at 1,000 nodes and
#: 100,000 segments, 24 to 27 pauses of 200-300 ms in 45 s (benchmarks/scale.py); with this, two.
QUEUE_THRESHOLD = (50_000, 20, 10)


@contextmanager
def held() -> Iterator[None]:
    """No collection until :func:`tune_for_a_queue` (or until the block ends, however it
    ends). Starting (importing Dask, the plugins and pydantic's models, starting a cluster)
    makes objects that all stay alive, so collections then find nothing to free; they took
    0.05 to 0.15 s of a one-frame ``farm run`` (docs/SCALE.md)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def tune_for_a_queue() -> None:
    """For the process that runs the queue, once it has started: what start-up made is never
    scanned again, and young collections are rarer."""
    gc.freeze()
    gc.set_threshold(*QUEUE_THRESHOLD)
    gc.enable()
