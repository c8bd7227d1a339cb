"""`farm monitor` opens the Batch Monitor page; `farm status --watch` shows the same jobs
live in the terminal.

With a controller, the watch follows its event stream (nothing is polled); with only a
local store (`farm run` in another terminal), it reads the store twice a second, since
no process serves events there.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import time
import webbrowser
from collections.abc import Callable, Iterable
from typing import Any, TextIO

from farm.errors import ExitStatus, UsageError

TERMINAL = ("done", "failed", "cancelled")
LOCAL_POLL_SECONDS = 0.5


def add_commands(commands: Any, common: argparse.ArgumentParser) -> dict[str, Any]:
    monitor = commands.add_parser(
        "monitor", parents=[common], help="open the Batch Monitor page in a browser",
        description="Open the controller's Batch Monitor page in a browser; where none can open, print its "
                    "address. The page asks for your token (in your client file); --link prints a link that carries it.")
    monitor.add_argument("--controller", metavar="URL", help="the controller (default: $FARM_CONTROLLER, else zeroconf)")
    monitor.add_argument("--client", metavar="FILE", help="client file (default: $FARM_CLIENT)")
    monitor.add_argument("--bundle", metavar="FILE", help="a cluster bundle instead (default: $FARM_BUNDLE)")
    monitor.add_argument("--link", action="store_true",
                         help="print a link that signs in by itself (it carries the token: keep it to yourself)")
    monitor.add_argument("--no-browser", action="store_true", help="print the address, open nothing")
    return {"monitor": cmd_monitor}


def _can_open_a_browser() -> bool:
    return sys.platform in ("darwin", "win32") or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def cmd_monitor(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> ExitStatus:
    from farm.client import ControllerClient, find_credentials

    bundle = find_credentials(args.client, args.bundle)
    client = ControllerClient(bundle, args.controller)
    cluster = client.request("GET", "/api/cluster")  # fails clearly when the controller is not there
    page = f"{client.url}/"
    link = f"{page}#token={bundle.token}"
    print(f"Batch Monitor of cluster {cluster['cluster']}: {page}", file=stdout)
    if args.link:
        print(f"sign-in link (carries your token): {link}", file=stdout)
    if not args.no_browser and _can_open_a_browser() and webbrowser.open(link):
        print("opened in your browser", file=stdout)
    else:
        print("open it in a browser and sign in with your token (in your client file), or use "
              "`farm monitor --link`", file=stdout)
    print(f"the page is served over TLS with the cluster's own certificate: trust {bundle.path} 's CA, or "
          "accept the browser's warning once", file=stdout)
    return ExitStatus.OK


# -- farm status --watch ----------------------------------------------------------------------


class Watch:
    """The jobs being watched, updated from events or reads, drawn as a table."""

    def __init__(self, docs: list[dict[str, Any]], only: str | None, stdout: TextIO):
        self.docs = {doc["id"]: _summary(doc) for doc in docs}
        self.only = only
        self.stdout = stdout
        self.live: Any = None
        self._last_lines: dict[str, str] = {}

    def apply(self, event: dict[str, Any]) -> bool:
        """Take one event; True when it changed a watched job."""
        job_id = event.get("job")
        if not job_id or (self.only and job_id != self.only) or job_id not in self.docs:
            return False
        doc = self.docs[job_id]
        for key in ("state", "segments", "segments_done", "error", "waiting"):
            if key in event:
                doc[key] = event[key]
        return True

    def finished(self) -> bool:
        return bool(self.docs) and all(doc["state"] in TERMINAL for doc in self.docs.values())

    def draw(self) -> None:
        if self.live is not None:
            self.live.update(self.table())
            return
        for job_id, doc in self.docs.items():  # not a terminal: one line per change
            line = _line(doc)
            if self._last_lines.get(job_id) != line:
                self._last_lines[job_id] = line
                print(line, file=self.stdout, flush=True)

    def table(self) -> Any:
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        table = Table(box=None, pad_edge=False, header_style="bold")
        for column in ("job", "state", "progress", "segments", "profile", "input", "reason"):
            table.add_column(column)
        for doc in self.docs.values():
            total = max(doc["segments"], 1)
            table.add_row(doc["id"], doc["state"], ProgressBar(total=total, completed=doc["segments_done"], width=24),
                          f"{doc['segments_done']}/{doc['segments']}", doc["profile"], doc["input"] or "-",
                          doc["error"] or (doc["waiting"] if doc["state"] == "queued" else "") or "")
        return table


def _summary(doc: dict[str, Any]) -> dict[str, Any]:
    keys = ("id", "state", "segments", "segments_done", "profile", "input", "error", "waiting")
    return {key: doc.get(key) for key in keys}


def _line(doc: dict[str, Any]) -> str:
    reason = f"  reason: {doc['error']}" if doc["error"] else ""
    return f"{doc['id']}  {doc['state']:<10} {doc['segments_done']}/{doc['segments']} segments  {doc['profile']}{reason}"


def watch_status(job: str | None, remote: Any, read_local: Callable[[], list[dict[str, Any]]],
                 stdout: TextIO) -> ExitStatus:
    """Show the jobs (or one job) live until Ctrl-C, or until the one job ends."""
    if remote is not None:
        docs = [remote.job(job)] if job else remote.jobs()
        watch = Watch(docs, job, stdout)
        updates: Iterable[Any] = _remote_updates(remote, watch, remote.events_mark)
    else:
        watch = Watch(read_local(), job, stdout)
        updates = _local_updates(watch, read_local)
    interactive = hasattr(stdout, "isatty") and stdout.isatty()
    try:
        if interactive:
            from rich.console import Console
            from rich.live import Live

            with Live(watch.table(), console=Console(file=stdout), refresh_per_second=4) as live:
                watch.live = live
                _follow(watch, updates, job)
        else:
            watch.draw()
            _follow(watch, updates, job)
    except KeyboardInterrupt:
        return ExitStatus.OK
    if job and watch.docs[job]["state"] != "done":
        return ExitStatus.JOB_FAILED
    return ExitStatus.OK


def _follow(watch: Watch, updates: Iterable[Any], job: str | None) -> None:
    if job and watch.finished():
        return
    for _ in updates:
        watch.draw()
        if job and watch.finished():
            return


def _remote_updates(remote: Any, watch: Watch, mark: int) -> Iterable[None]:
    """One item per change, from the controller's event stream; a new job is read once."""
    while True:
        try:
            for event in remote.events(mark):
                mark = event["id"]
                if event.get("job") and event["job"] not in watch.docs and not watch.only:
                    watch.docs[event["job"]] = _summary(remote.job(event["job"]))
                if watch.apply(event):
                    yield None
        except UsageError as exc:  # the stream broke (a restart): read again, follow again; a refusal is final
            print(f"farm: {exc}; reconnecting", file=sys.stderr)
            time.sleep(2)
            docs = [remote.job(watch.only)] if watch.only else remote.jobs()
            watch.docs.update({doc["id"]: _summary(doc) for doc in docs})
            mark = remote.events_mark
            yield None


def _local_updates(watch: Watch, read_local: Callable[[], list[dict[str, Any]]]) -> Iterable[None]:
    from farm.pipes import reader_gone

    while True:
        time.sleep(LOCAL_POLL_SECONDS)
        if reader_gone(watch.stdout):  # `farm status --watch | head -1`: end now, not at the next change
            raise BrokenPipeError(errno.EPIPE, "the reader of the output has gone")
        fresh = {doc["id"]: _summary(doc) for doc in read_local()}
        if fresh != watch.docs:
            watch.docs = fresh
            yield None
