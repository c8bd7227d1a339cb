"""The controller's API address, given to every worker through the cluster.

A node started by ``farm node`` is told the controller's API address by its supervisor
(the address it found the controller at). A worker started outside Farm (``dask worker
… --preload farm.nodeservice``, on Kubernetes or Slurm) knows only its scheduler, so the
controller registers this worker plugin on the scheduler, which installs it on every
worker that is or will be connected: a worker without shared storage can then fetch its
inputs and send its outputs back (:mod:`farm.transfer`).

Only the address travels through the cluster. What makes a worker trust that address and
what lets it in stay on the worker's machine, in the node bundle (``FARM_NODE_BUNDLE``):
its pin of the controller's certificate and the node token. The scheduler, which relays
the plugin, never sees the token, and a scheduler that sent another address could not
make a worker talk to anything but the real controller (see docs/SECURITY.md).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from farm.transfer import API_ENV

log = logging.getLogger("farm.controllerapi")
NAME = "farm-controller-api"


#: Set beside ``FARM_CONTROLLER_API`` when the address came from this plugin, so that a
#: controller that comes back at another address replaces it (``farm node``'s stays).
GIVEN_ENV = "FARM_CONTROLLER_API_FROM_CLUSTER"


class ControllerAPI(WorkerPlugin):
    """Sets ``FARM_CONTROLLER_API`` in a worker that has none (``farm node`` sets its own)."""

    name = NAME

    def __init__(self, url: str):
        self.url = url

    def setup(self, worker: Any) -> None:
        if not os.environ.get(API_ENV) or os.environ.get(GIVEN_ENV):
            os.environ[API_ENV] = self.url
            os.environ[GIVEN_ENV] = "1"


def announce(client: Any, url: str) -> None:
    """Register the plugin on the scheduler: present and future workers get ``url``.
    A failure is a warning: nodes started by ``farm node`` know the address anyway."""
    try:
        client.register_plugin(ControllerAPI(url), name=NAME)
    except Exception as exc:  # noqa: BLE001 (a worker refusing it must not stop the controller)
        log.warning("could not give the workers the API address %s (%s: %s); workers started outside "
                    "`farm node` without shared storage cannot fetch their inputs", url, type(exc).__name__, exc)


__all__ = ["ControllerAPI", "announce"]
