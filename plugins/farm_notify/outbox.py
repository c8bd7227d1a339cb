"""A queue of notices and the one daemon thread that sends them.

Hook calls run on the scheduler's thread, which must never wait on a mail server, so
they only enqueue. The thread is a daemon so that a stuck server cannot keep a process
alive; :meth:`Outbox.flush` (called at exit) gives short-lived processes such as
``farm run`` a bounded chance to finish sending.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from farm_notify.messages import Notice
from farm_notify.settings import Target

log = logging.getLogger("farm.notify")


@dataclass(frozen=True)
class Delivery:
    target: Target
    notice: Notice


def scrub(text: str, secrets: list[str]) -> str:
    # Longest first, so a secret that contains another is hidden whole.
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "[redacted]")
    return text


class Outbox:
    def __init__(self, send: Callable[[Target, Notice], None]) -> None:
        self._send = send
        self._cond = threading.Condition()
        self._queue: deque[Delivery] = deque()
        self._busy = False
        self._current: Delivery | None = None
        self._thread: threading.Thread | None = None

    def put(self, delivery: Delivery) -> None:
        with self._cond:
            self._queue.append(delivery)
            if self._thread is None or not self._thread.is_alive():
                try:
                    self._thread = threading.Thread(target=self._work, name="farm-notify", daemon=True)
                    self._thread.start()
                except RuntimeError as exc:  # e.g. enqueued while the interpreter shuts down
                    self._queue.pop()
                    self._thread = None
                    log.warning("notify: dropped %s notice for %s: %s",
                                delivery.notice.event, delivery.target.describe(), exc)
                    return
            self._cond.notify_all()

    def pending(self) -> list[Delivery]:
        """What is queued or being sent now."""
        with self._cond:
            current = [self._current] if self._busy and self._current is not None else []
            return current + list(self._queue)

    def flush(self, timeout: float) -> list[Delivery]:
        """Wait up to ``timeout`` seconds for the queue to empty; return what is left."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
        return self.pending()

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                delivery = self._queue.popleft()
                self._current, self._busy = delivery, True
            try:
                self._deliver(delivery)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _deliver(self, delivery: Delivery) -> None:
        target, notice = delivery.target, delivery.notice
        started = time.monotonic()
        try:
            self._send(target, notice)
        except Exception as exc:  # whatever happens, the thread lives on and Farm never sees it
            reason = scrub(str(exc) or type(exc).__name__, target.secrets())
            log.warning("notify: could not send the %s notice by %s: %s", notice.event, target.describe(), reason)
        else:
            log.info("notify: sent the %s notice by %s in %.1f s", notice.event, target.describe(),
                     time.monotonic() - started)
