"""Live events for the Batch Monitor: what changed, pushed as it happens.

The scheduler's thread publishes; each HTTP stream (an asyncio task in the API's own
thread and loop) waits on its own :class:`asyncio.Event`, woken across threads with
``call_soon_threadsafe``. Events carry a growing id, so a client that reconnects with
``Last-Event-ID`` gets what it missed, as long as it is still in the ring.

An event is encoded once, by the first stream that sends it, however many streams follow:
the ``nodes`` event of a thousand-node farm is most of a megabyte of JSON.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections import deque
from typing import Any

RING_SIZE = 5000


class _Entry:
    __slots__ = ("id", "event", "frame")

    def __init__(self, event_id: int, event: dict[str, Any]):
        self.id, self.event, self.frame = event_id, event, ""

    def encoded(self) -> str:
        """The event as one server-sent event (``id:`` and ``data:`` lines)."""
        if not self.frame:
            self.frame = f"id: {self.id}\ndata: {json.dumps(self.event, default=str)}\n\n"
        return self.frame


class EventHub:
    def __init__(self, ring_size: int = RING_SIZE):
        self._ring: deque[_Entry] = deque(maxlen=ring_size)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        self.closed = False

    def publish(self, kind: str, data: dict[str, Any]) -> int:
        with self._lock:
            event_id = next(self._ids)
            self._ring.append(_Entry(event_id, {"id": event_id, "ts": time.time(), "kind": kind, **data}))
            waiters = list(self._waiters)
        for loop, ready in waiters:
            try:
                loop.call_soon_threadsafe(ready.set)
            except RuntimeError:  # that stream's loop has closed
                with self._lock:
                    self._waiters.discard((loop, ready))
        return event_id

    def since(self, after: int) -> list[_Entry]:
        """Events newer than ``after``; all that are kept when ``after`` has left the ring."""
        with self._lock:
            if not self._ring or self._ring[-1].id <= after:
                return []
            # ids are consecutive in the ring: the first one newer than ``after`` is found by
            # its position, not by reading the whole ring at every wake-up of every stream
            return list(itertools.islice(self._ring, max(0, after + 1 - self._ring[0].id), None))

    @property
    def last_id(self) -> int:
        with self._lock:
            return self._ring[-1].id if self._ring else 0

    async def wait(self, after: int, timeout: float) -> list[_Entry]:
        """Events newer than ``after`` (their ``id`` and ``encoded()`` frame), waiting up to
        ``timeout`` seconds for one."""
        ready = asyncio.Event()
        key = (asyncio.get_running_loop(), ready)
        with self._lock:
            self._waiters.add(key)
        try:
            events = self.since(after)
            if not events and not self.closed:
                try:
                    await asyncio.wait_for(ready.wait(), timeout)
                except TimeoutError:
                    return []
                events = self.since(after)
            return events
        finally:
            with self._lock:
                self._waiters.discard(key)

    def close(self) -> None:
        self.closed = True
        with self._lock:
            waiters = list(self._waiters)
        for loop, ready in waiters:
            try:
                loop.call_soon_threadsafe(ready.set)
            except RuntimeError:
                pass
