"""Droplets: watched folders that turn dropped files into batches, exactly once.

- :mod:`farm.droplets.config`: ``DropletConfig`` (the ``droplets:`` list of farm.yaml).
- :mod:`farm.droplets.watch`: one folder: its observer (inotify or polling), settle
  detection, the scan at start, and recovery when the folder goes away and comes back.
- :mod:`farm.droplets.lock`: one watcher per folder: the lock file in the watched folder.
- :mod:`farm.droplets.service`: the droplets of one process bound to a scheduler: the
  ledger in the store, submission, after-actions and ``failed/``.
- :mod:`farm.cli.droplets`: ``farm watch`` and ``farm droplets``.

Only the configuration is imported here, so that ``farm.config`` stays light.
"""

from farm.droplets.config import DropletConfig, DropletList, check_droplets

__all__ = ["DropletConfig", "DropletList", "check_droplets"]
