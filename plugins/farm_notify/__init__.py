"""The ``notify`` plugin: email and webhooks when a batch finishes or a job fails.

Built only on Farm's lifecycle hooks, like a third party's plugin; the core does not
know it exists. Configured by the ``plugins.notify`` section of farm.yaml (see
docs/notify.md); without that section it does nothing.

Hooks only build the notice and enqueue it; one daemon thread sends, so a slow or dead
mail server never holds up the scheduler, and a failure is a log line on the
``farm.notify`` logger, never an exception.
"""

from __future__ import annotations

import atexit
import logging
import threading
from typing import Any

from farm import hookimpl
from farm_notify import messages
from farm_notify.outbox import Delivery, Outbox
from farm_notify.settings import NotifySettings, Target, parse_settings

__all__ = ["Notifier", "farm_configure", "farm_batch_finished", "farm_job_failed"]

log = logging.getLogger("farm.notify")


def _send(target: Target, notice: messages.Notice) -> None:
    # httpx is imported only where notices are sent: every farm command and every node
    # loads this plugin, and most never send anything.
    from farm_notify.senders import send

    send(target, notice)


class Notifier:
    """The plugin's state in this process: its settings and its outbox."""

    def __init__(self) -> None:
        self.settings: NotifySettings | None = None
        self.outbox = Outbox(_send)
        self._lock = threading.Lock()
        self._exit_hook = False

    def configure(self, raw: dict[str, Any] | None) -> None:
        # Validate before replacing, so that refused settings leave the old ones in place.
        settings = parse_settings(raw) if raw is not None else None
        with self._lock:
            self.settings = settings
            if settings is not None and settings.targets and not self._exit_hook:
                import farm_notify.senders  # noqa: F401  (now, not in the sender thread at exit)

                atexit.register(self.flush_at_exit)
                self._exit_hook = True

    def wants(self, event: str) -> bool:
        settings = self.settings
        return settings is not None and any(target.wants(event) for target in settings.targets)

    def enqueue(self, notice: messages.Notice) -> None:
        settings = self.settings
        if settings is None:
            return
        for target in settings.targets:
            if target.wants(notice.event):
                self.outbox.put(Delivery(target, notice))

    def flush_at_exit(self) -> None:
        settings = self.settings
        wait = settings.exit_wait if settings is not None else 0.0
        left = self.outbox.flush(wait)
        if left:
            # By now the CLI may have removed its log handler; Python's last-resort handler
            # still prints warnings, so the message names everything on its own.
            names = "; ".join(f"{d.notice.event} by {d.target.describe()}" for d in left)
            log.warning("notify: gave up after %g s at exit with %d notice(s) unsent: %s", wait, len(left), names)


notifier = Notifier()


@hookimpl
def farm_configure(settings: dict[str, Any]) -> None:
    notifier.configure(settings.get("notify"))


@hookimpl
def farm_batch_finished(batch_id: str, jobs: list[dict[str, Any]]) -> None:
    if not notifier.wants("batch_done"):
        return
    try:
        notifier.enqueue(messages.batch_done(batch_id, jobs))
    except Exception:  # a notice we cannot even build must not reach the scheduler
        log.exception("notify: could not prepare the batch_done notice for batch %s", batch_id)


@hookimpl
def farm_job_failed(job: Any, reason: str) -> None:
    if not notifier.wants("job_failed"):
        return
    try:
        notifier.enqueue(messages.job_failed(job, reason))
    except Exception:
        log.exception("notify: could not prepare the job_failed notice for job %s", getattr(job, "id", "?"))
