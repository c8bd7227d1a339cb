"""What a starting controller or ``farm run`` clears away: leftovers of jobs that no
longer run.

- In every destination the store knows: staging folders (``.farm-staging-JOB``) of
  ended jobs, undoing a delivery killed part-way (see :mod:`farm.outputs`), and
  temporary files (``.NAME.farm-*``) that killed processes left next to outputs.
- In the work folder (cluster storage): the folders of jobs that are ``done``, unless
  ``keep_work: true`` in farm.yaml. Failed and cancelled jobs keep theirs, because
  ``farm retry`` runs only what did not finish and needs the segment outputs that did.

A staging folder of a job this store does not know is left alone (another state
directory's job may be delivering there), and so is one of a job that has not ended
(its owner may still be running).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from farm.outputs import sweep
from farm.store import Store

log = logging.getLogger("farm.sweep")


def sweep_leftovers(store: Store, work_root: Path | None = None, keep_work: bool = False) -> dict[str, list[str]]:
    """Remove leftovers (see the module's docs) and log each place cleared; returns
    ``{folder: [what was removed]}``."""
    states = store.job_states()
    removed: dict[str, list[str]] = {}
    for destination in store.destinations():
        gone = sweep(Path(destination), states.get)
        if gone:
            removed[destination] = gone
            log.warning("removed leftovers of unfinished deliveries from %s: %s", destination, ", ".join(gone))
    if work_root is not None and not keep_work and work_root.is_dir():
        done = sorted(entry.name for entry in work_root.iterdir()
                      if entry.is_dir() and not entry.is_symlink() and states.get(entry.name) == "done")
        for name in done:
            shutil.rmtree(work_root / name, ignore_errors=True)
        if done:
            removed[str(work_root)] = done
            log.warning("removed the work folders of %d finished job(s) from %s: %s", len(done), work_root,
                        ", ".join(done[:10]) + (f" and {len(done) - 10} more" if len(done) > 10 else ""))
    return removed
