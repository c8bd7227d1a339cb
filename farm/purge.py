"""History that stays small: `farm purge --older-than AGE` and the controller's
``controller.retention`` remove jobs that ended (done, failed, cancelled) longer ago than
AGE, with their segments, attempt logs and events, their work folders and previews; the
store's file then shrinks (:meth:`farm.store.Store.reclaim_space`).

Unfinished jobs (queued, running, paused, assembling, interrupted) are never touched, and
neither are outputs in destinations: only Farm's own records and scratch go. A job whose
end a droplet has not recorded yet stays until it has (the droplet's ledger needs it).
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from farm.attemptfiles import previews_folder
from farm.errors import StoreError
from farm.store import Store

log = logging.getLogger("farm.purge")

_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(w|d|h|m|s)\s*$")
_UNIT_SECONDS = {"w": 7 * 86400, "d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_age(text: str) -> float:
    """Seconds from ``30d``, ``2w``, ``12h``, ``90m``, ``45s`` (or ``1h30m``)."""
    match = _AGE.match(str(text))
    if match:
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    else:
        from farm.profiles import parse_duration

        try:
            seconds = parse_duration(text)
        except ValueError:
            raise ValueError(f"expected an age such as 30d, 2w, 12h or 90m, got {text!r}") from None
    if seconds <= 0:
        raise ValueError(f"an age must be more than zero, got {text!r}")
    return seconds


@dataclass
class Purged:
    """One finished job that was (or, in a dry run, would be) removed."""

    id: str
    batch: str
    state: str
    ended: float
    profile: str
    input: str | None
    #: its work folder, when one is on disk
    work_folder: str | None
    #: the folder of its segments' previews (farm.attemptfiles), when one is on disk
    previews: str | None = None


def _work_folder(job_id: str, work_dir: str | None) -> Path | None:
    """The job's own work folder (named after the job), never anything else."""
    if not work_dir:
        return None
    path = Path(work_dir)
    if path.name != job_id or path.is_symlink() or not path.is_dir():
        return None
    return path


def _previews(job_id: str, work_dir: str | None) -> Path | None:
    if not work_dir or Path(work_dir).name != job_id:
        return None
    path = previews_folder(Path(work_dir))
    return path if path.is_dir() and not path.is_symlink() else None


def find(store: Store, older_than: float, now: float | None = None) -> list[Purged]:
    before = (now if now is not None else time.time()) - older_than
    found = []
    for row in store.finished_jobs_before(before):
        folder = _work_folder(row["id"], row["work_dir"])
        previews = _previews(row["id"], row["work_dir"])
        found.append(Purged(row["id"], row["batch_id"], row["state"], row["updated"], row["profile_name"],
                            row["input"], str(folder) if folder else None, str(previews) if previews else None))
    return found


def purge(store: Store, older_than: float, *, dry_run: bool = False, now: float | None = None,
          remove_folders: bool = True) -> list[Purged]:
    """Remove the finished jobs older than ``older_than`` seconds (see the module's docs);
    returns them. The rows go first, in one transaction that checks again that each job is
    still finished (a `farm retry` may have come in between): a work folder is removed only
    once its job's rows are gone, so a job that runs again keeps its segments' outputs."""
    now = now if now is not None else time.time()
    candidates = find(store, older_than, now)
    if dry_run or not candidates:
        return candidates
    gone = set(store.purge_jobs([job.id for job in candidates], now - older_than))
    purged = [job for job in candidates if job.id in gone]
    if purged:
        try:
            store.reclaim_space()
        except StoreError as exc:  # the rows are gone; the file shrinks next time
            log.warning("purged %d job(s), but the store could not be shrunk: %s", len(purged), exc)
    if remove_folders:
        remove_work_folders(purged)
    return purged


def remove_work_folders(purged: list[Purged]) -> None:
    for job in purged:
        for folder in (job.work_folder, job.previews):
            if folder:
                shutil.rmtree(folder, ignore_errors=True)


def as_json(purged: list[Purged]) -> list[dict[str, object]]:
    return [asdict(job) for job in purged]


__all__ = ["Purged", "as_json", "find", "parse_age", "purge", "remove_work_folders"]
