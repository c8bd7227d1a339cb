"""`farm logs JOB [SEGMENT|ATTEMPT] [--follow]`: the logs of a job's segment attempts, from
the local store (`farm run` jobs) or from the controller (when one is named, or a
quickcluster runs on this machine), the way `farm status` chooses.

A log is stored when its attempt ends (the tail, each with its header and footer); while
it runs, its node writes it line by line to a live file beside the job's work folder
(:mod:`farm.attemptfiles`), so ``--follow`` prints a running attempt's lines as they are
written, then the rest of its log when it ends, until the job ends.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from farm.attemptfiles import read_live_log
from farm.errors import ExitStatus, UsageError

TERMINAL = ("done", "failed", "cancelled")
STOPPED = (*TERMINAL, "interrupted")  # --follow ends there too: an interrupted job waits for `farm resume`
FOLLOW_POLL_SECONDS = 0.5


def add_commands(commands: Any, common: argparse.ArgumentParser) -> dict[str, Any]:
    from farm.cli import _remote_arguments

    logs = commands.add_parser(
        "logs", parents=[common], help="show the logs of a job's segments",
        description="Show the logs of a job's segment attempts (command, host, output, exit status), oldest "
                    "first: every attempt that has ended, or those of one segment, or one attempt. Works for "
                    "`farm run` jobs (the local store) and for a controller's jobs.")
    logs.add_argument("job", help="a job id (see `farm status`)")
    logs.add_argument("target", nargs="?", metavar="SEGMENT|ATTEMPT",
                      help="a segment (its index, or its id as `farm status JOB` shows it) or an attempt id")
    logs.add_argument("--follow", "-f", action="store_true",
                      help="go on printing each attempt's lines as they are written, until the job ends (exit "
                           "status 1 unless it is done)")
    _remote_arguments(logs)
    return {"logs": cmd_logs}


@dataclass
class Attempt:
    id: str
    segment: str
    index: int
    label: str
    node: str
    state: str
    started: float | None
    ended: float | None
    exit_status: int | None
    reason: str | None


class LocalLogs:
    """The store of this state directory (what `farm run` wrote)."""

    def __init__(self, args: argparse.Namespace):
        self.args = args

    def job(self, job_id: str) -> tuple[str, list[Attempt]]:
        from farm.cli import _open_store

        store = _open_store(self.args)
        try:
            row = store.job(job_id)
            if row is None:
                raise UsageError(f"no job {job_id!r} in {store.path}")
            segments = {seg["id"]: seg for seg in store.segments(job_id)}
            attempts = [Attempt(a["id"], a["segment_id"], segments[a["segment_id"]]["idx"],
                                segments[a["segment_id"]]["label"], a["node"], a["state"], a["started"], a["ended"],
                                a["exit_status"], a["reason"])
                        for a in store.attempts(job_id=job_id) if a["segment_id"] in segments]
            return row["state"], attempts
        finally:
            store.close()

    def log(self, attempt_id: str) -> str:
        from farm.cli import _open_store

        store = _open_store(self.args)
        try:
            row = store.attempt(attempt_id)
            return (row["log"] or "") if row is not None else ""
        finally:
            store.close()

    def live(self, job_id: str, attempt_id: str, after: int) -> tuple[str, int]:
        from farm.cli import _open_store

        store = _open_store(self.args)
        try:
            row = store.job(job_id)
        finally:
            store.close()
        return read_live_log(Path(row["work_dir"]), attempt_id, after) if row is not None else ("", after)


class RemoteLogs:
    """A controller's API."""

    def __init__(self, client: Any):
        self.client = client

    def job(self, job_id: str) -> tuple[str, list[Attempt]]:
        doc = self.client.job(job_id)
        attempts = [Attempt(a["id"], seg["id"], seg["index"], seg["label"], a["node"], a["state"], a["started"],
                            a["ended"], a["exit_status"], a["reason"])
                    for seg in doc["segment_list"] for a in seg["attempts"]]
        return doc["state"], attempts

    def log(self, attempt_id: str) -> str:
        return self.client.request("GET", f"/api/attempts/{attempt_id}/log")["log"]

    def live(self, job_id: str, attempt_id: str, after: int) -> tuple[str, int]:
        answer = self.client.request("GET", f"/api/attempts/{attempt_id}/log?after={after}")
        if not answer.get("live"):  # it has just ended: its whole log comes with the next round
            return "", after
        return answer["log"], int(answer["next"])


def _chooser(job_id: str, target: str | None) -> Callable[[Attempt], bool]:
    """Which attempts ``target`` names: a segment index, a segment id or an attempt id
    (with or without the job's id in front)."""
    if target is None:
        return lambda attempt: True
    if target.isdigit():
        return lambda attempt: attempt.index == int(target)
    full = target if target.startswith(f"{job_id}.") else f"{job_id}.{target}"
    return lambda attempt: full in (attempt.id, attempt.segment)


def _header(attempt: Attempt) -> str:
    status = f", exit status {attempt.exit_status}" if attempt.exit_status is not None else ""
    reason = f": {attempt.reason}" if attempt.reason and attempt.state != "done" else ""
    return (f"==> segment {attempt.index} ({attempt.label}), attempt {attempt.id} on node {attempt.node}: "
            f"{attempt.state}{status}{reason} <==")


def _print_running(source: LocalLogs | RemoteLogs, args: argparse.Namespace, attempt: Attempt,
                   followed: dict[str, tuple[int, str]], stdout: TextIO, stderr: TextIO) -> None:
    """The lines a running attempt has written since the last round (its header first)."""
    if attempt.id not in followed:
        followed[attempt.id] = (0, "")
        print(_header(attempt), file=stdout, flush=True)
        if not args.follow:
            print(f"farm: attempt {attempt.id} is still running on {attempt.node}: its lines so far "
                  "(--follow goes on until it ends)", file=stderr, flush=True)
    offset, printed = followed[attempt.id]
    text, offset = source.live(args.job, attempt.id, offset)
    if text:
        print(text, end="", file=stdout, flush=True)
        followed[attempt.id] = (offset, printed + text)


def cmd_logs(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> ExitStatus:
    from farm.cli import _remote

    remote = _remote(args, quickcluster=True)
    source: LocalLogs | RemoteLogs = RemoteLogs(remote) if remote is not None else LocalLogs(args)
    chosen = _chooser(args.job, args.target)
    shown: set[str] = set()  # attempts whose whole log is printed
    followed: dict[str, tuple[int, str]] = {}  # running attempts: (live log offset, text printed)
    while True:
        state, attempts = source.job(args.job)
        mine = [a for a in sorted(attempts, key=lambda a: (a.started or 0, a.id)) if chosen(a)]
        if args.target is not None and not mine and not args.follow:
            raise UsageError(f"job {args.job} has no segment or attempt {args.target!r} (that has started); "
                             f"`farm status {args.job}` lists its segments")
        for attempt in mine:
            if attempt.id in shown:
                continue
            if attempt.ended is None:
                _print_running(source, args, attempt, followed, stdout, stderr)
                continue
            shown.add(attempt.id)
            text = source.log(attempt.id).rstrip("\n")
            if attempt.id not in followed:
                print(_header(attempt), file=stdout)
                print(text or "(empty log)", file=stdout, flush=True)
                continue
            so_far = followed.pop(attempt.id)[1].rstrip("\n")
            if text.startswith(so_far):
                rest = text[len(so_far):].removeprefix("\n")
            else:  # the stored log is cut to its head and tail
                rest = f"=== the log as stored:\n{text}"
            if rest:
                print(rest, file=stdout)
            print(_header(attempt).replace("==> segment", "==> ended: segment", 1), file=stdout, flush=True)
        finished = state in STOPPED and all(a.ended is not None for a in mine)
        if not args.follow or finished:
            break
        time.sleep(FOLLOW_POLL_SECONDS)
    if not mine and not args.follow:
        print(f"farm: job {args.job} ({state}) has no attempt yet", file=stderr)
    if args.follow and state != "done":
        return ExitStatus.JOB_FAILED
    return ExitStatus.OK


__all__ = ["add_commands"]
