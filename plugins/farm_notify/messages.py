"""What a notice says: a subject and plain text for people, a JSON payload for machines.

Notices are built in the hook call, from plain values, so that the sender thread never
touches the scheduler's objects after the hook has returned.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Outputs shown per job; an image sequence can have thousands.
OUTPUTS_SHOWN = 3
#: Outputs carried per job in the JSON payload (``output_count`` tells the total).
OUTPUTS_IN_PAYLOAD = 20
#: Jobs listed per state in an email before "... and N more".
JOBS_SHOWN = 100

STATES = ("done", "failed", "cancelled")


@dataclass(frozen=True)
class Notice:
    event: str
    subject: str
    text: str
    payload: dict[str, Any] = field(default_factory=dict)


def _host() -> str:
    # Several controllers may mail the same team: say which one this is.
    return socket.gethostname()


def _one_line(text: str) -> str:
    # File names may hold line breaks; a mail header may not.
    return " ".join(text.split())


def _input_name(value: Any) -> str:
    return str(value) if value else "(no input)"


def _more(shown: int, total: int, what: str) -> list[str]:
    return [f"... and {total - shown} more {what}"] if total > shown else []


def batch_done(batch_id: str, jobs: list[dict[str, Any]]) -> Notice:
    counts = {state: sum(1 for job in jobs if job.get("state") == state) for state in STATES}
    total = len(jobs)
    tally = f"{counts['done']} done, {counts['failed']} failed, {counts['cancelled']} cancelled"
    if counts["done"] == total:
        subject = f"[farm] batch {batch_id} done: {total} of {total} job{'s' if total != 1 else ''} done"
    else:
        subject = f"[farm] batch {batch_id} finished: {tally}"

    lines = [f"Batch {batch_id} has finished on {_host()}.", "",
             f"  {tally} ({total} job{'s' if total != 1 else ''})"]
    # Failures first: they are what the reader has to act on.
    for state, heading in (("failed", "Failed"), ("cancelled", "Cancelled"), ("done", "Done")):
        group = [job for job in jobs if job.get("state") == state]
        if not group:
            continue
        lines += ["", f"{heading}:"]
        for job in group[:JOBS_SHOWN]:
            lines.append(f"  {job.get('id')}  {_input_name(job.get('input'))}  (profile {job.get('profile')})")
            if state != "done" and job.get("error"):
                lines.append(f"      reason: {job['error']}")
            outputs = list(job.get("outputs") or [])
            lines += [f"      {output}" for output in outputs[:OUTPUTS_SHOWN]]
            lines += ["      " + line for line in _more(OUTPUTS_SHOWN, len(outputs), "output(s)")]
        lines += ["  " + line for line in _more(JOBS_SHOWN, len(group), f"{state} job(s)")]
    lines += ["", "-- ", "Sent by Farm's notify plugin."]

    payload = {
        "event": "batch_done",
        "batch": batch_id,
        "host": _host(),
        "counts": {**counts, "total": total},
        "jobs": [
            {
                "id": job.get("id"),
                "input": job.get("input"),
                "profile": job.get("profile"),
                "state": job.get("state"),
                "error": job.get("error"),
                "outputs": list(job.get("outputs") or [])[:OUTPUTS_IN_PAYLOAD],
                "output_count": len(job.get("outputs") or []),
            }
            for job in jobs
        ],
        # Chat services (Slack, Mattermost) show "text" and ignore the rest.
        "text": subject,
    }
    return Notice("batch_done", _one_line(subject), "\n".join(lines) + "\n", payload)


def job_failed(job: Any, reason: str) -> Notice:
    profile = getattr(getattr(job, "profile", None), "name", None)
    source = getattr(job, "input", None)
    destination = getattr(job, "destination", None)
    name = Path(source).name if source else "(no input)"
    subject = f"[farm] job {job.id} failed: {name} (profile {profile})"
    lines = [
        f"Job {job.id} of batch {job.batch_id} failed on {_host()}.", "",
        f"  reason:      {reason}",
        f"  input:       {_input_name(source)}",
        f"  profile:     {profile}",
        f"  destination: {destination}",
        "", "-- ", "Sent by Farm's notify plugin.",
    ]
    payload = {
        "event": "job_failed",
        "host": _host(),
        "job": {
            "id": job.id,
            "batch": job.batch_id,
            "input": str(source) if source else None,
            "profile": profile,
            "destination": str(destination) if destination else None,
        },
        "reason": reason,
        "text": f"{subject}: {reason}",
    }
    return Notice("job_failed", _one_line(subject), "\n".join(lines) + "\n", payload)
