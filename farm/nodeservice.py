"""`farm node`: a Dask worker under a nanny, supervised so that it finds the controller
by itself (zeroconf or a URL) and joins again whenever the controller comes back.

Dask workers exit when their scheduler goes away and never return by themselves; this
loop starts a new one each time. The worker process watches its parent so that a
node killed outright takes its segments' processes with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import ssl
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

# Imported first so that this module, as a worker's preload (`--preload farm.nodeservice`),
# puts the role checks in place before the worker listens or dials its scheduler.
import farm.daskroles  # noqa: F401  (isort: skip)
from farm.config import FarmConfig
from farm.errors import UsageError, causes
from farm.security import Bundle

log = logging.getLogger("farm.node")
RETRY_SECONDS = (1, 2, 3, 5)
STOP_SECONDS = 4  # a node asked to stop is gone by then (promised: within 5 s)


def api_get(url: str, bundle: Bundle, path: str, timeout: float = 5.0) -> Any:
    import httpx

    with httpx.Client(verify=bundle.client_ssl_context(), timeout=timeout) as client:
        response = client.get(url.rstrip("/") + path, headers={"Authorization": f"Bearer {bundle.token}"})
    if response.status_code != 200:
        raise UsageError(f"{url}{path}: {response.status_code} {response.text[:200]}")
    return response.json()


def find_scheduler(bundle: Bundle, controller_url: str | None, cluster: str | None, timeout: float = 5.0) -> str | None:
    """The Dask scheduler's address, from the controller's API or zeroconf; None if not found now."""
    found = find_controller(bundle, controller_url, cluster, timeout)
    return found[0] if found else None


def find_controller(bundle: Bundle, controller_url: str | None, cluster: str | None,
                    timeout: float = 5.0) -> tuple[str, str] | None:
    """(the Dask scheduler's address, the controller's API URL); None if not found now."""
    if controller_url:
        try:
            return api_get(controller_url, bundle, "/api/cluster", timeout)["scheduler"], controller_url
        except Exception as exc:  # the controller may be down; the caller tries again
            _not_reachable(controller_url, exc)
            return None
    from farm.discovery import browse

    for found in browse(cluster or bundle.cluster, timeout=timeout):
        try:
            return api_get(found.api, bundle, "/api/cluster", timeout)["scheduler"], found.api
        except Exception as exc:
            _not_reachable(found.api, exc)
    return None


def _not_reachable(url: str, exc: Exception) -> None:
    if "CERTIFICATE" in str(exc).upper():
        # Someone answers with a certificate that is not this cluster's controller's
        # (another cluster's, or a node's posing as the controller): say so loudly.
        log.warning("controller %s not reachable: its certificate is not the controller's of this cluster (%s)",
                    url, exc)
    else:
        log.info("controller %s not reachable: %s", url, exc)


def node_config_file(config: FarmConfig, name: str, slots: int) -> Path:
    """The worker process reads its node settings from here (through FARM_CONFIG)."""
    data = config.model_dump(mode="json")
    data["node"].update({"name": name, "slots": slots})
    handle = tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="farm-node-", delete=False)
    with handle:
        yaml.safe_dump({"node": data["node"]}, handle)
    return Path(handle.name)


async def _run_worker(address: str, bundle: Bundle, name: str, slots: int, env: dict[str, str],
                      stopping: threading.Event, announce: Callable[[str], None]) -> str:
    import dask
    from distributed import Nanny

    from farm.engine import HEALTH_ONLY_HTTP, LEAN_DASK, LOOPBACK_HTTP

    # Whoever answers at the scheduler's address must hold the controller's certificate
    # (the worker process is told so by its preload, dask_setup below).
    farm.daskroles.expect_controller(address)
    quiet = None if log.isEnabledFor(logging.DEBUG) else logging.WARNING  # Dask's INFO lines drown ours
    with dask.config.set({"distributed.worker.memory.pause": False, **LEAN_DASK, **HEALTH_ONLY_HTTP}):
        nanny = Nanny(address, nthreads=slots, name=name, security=bundle.dask_security(), env=env,
                      preload=["farm.nodeservice"], dashboard=False, dashboard_address=LOOPBACK_HTTP,
                      memory_limit=0, silence_logs=quiet)
        # Joining may wait long for a scheduler that does not answer (or refuses our
        # certificate): a stop request must not wait for it.
        starting = asyncio.ensure_future(nanny.start())
        try:
            while not starting.done():
                if stopping.is_set():
                    starting.cancel()
                    await asyncio.wait({starting}, timeout=1)
                    return "stopping"
                await asyncio.wait({starting}, timeout=0.2)
            starting.result()
            announce(f"node {name} joined {address} with {slots} slot(s)")
            while nanny.status.name in ("running", "starting") and not stopping.is_set():
                if nanny.process is None or nanny.process.status.name not in ("running", "starting"):
                    break
                await asyncio.sleep(0.2)
            return "stopping" if stopping.is_set() else "the controller went away"
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nanny.close(timeout=2, reason="farm-node-stopping"), STOP_SECONDS - 1)


def _watch_parent_then(parent: int, stopping: threading.Event) -> None:
    """Stop the node once ``parent`` is gone (killed, even with SIGKILL: we are re-parented)."""
    while not stopping.is_set():
        if os.getppid() != parent:
            log.warning("the process that started this node (%d) has gone; stopping", parent)
            stopping.set()
            return
        time.sleep(0.25)


def _exit_if_stuck(stopping: threading.Event, config_path: Path) -> None:
    """Once asked to stop, the node is gone within STOP_SECONDS whatever Dask is doing (its
    worker process watches this one and follows it)."""
    stopping.wait()
    time.sleep(STOP_SECONDS)
    log.warning("the node did not stop within %d s; leaving now", STOP_SECONDS)
    config_path.unlink(missing_ok=True)
    os._exit(0)


def serve_node(config: FarmConfig, bundle: Bundle, *, controller_url: str | None, cluster: str | None,
               name: str, slots: int, announce: Callable[[str], None] | None = None,
               parent: int | None = None) -> None:
    """Run the node until SIGTERM or SIGINT (or, with ``parent``, until that process is gone)."""
    if bundle.cluster != (cluster or bundle.cluster):
        raise UsageError(f"the bundle is for cluster {bundle.cluster!r}, not {cluster!r}")
    announce = announce or log.info
    stopping = threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stopping.set())
    config_path = node_config_file(config, name, slots)
    threading.Thread(target=_exit_if_stuck, args=(stopping, config_path), name="farm-node-stop", daemon=True).start()
    if parent is not None:
        threading.Thread(target=_watch_parent_then, args=(parent, stopping), name="farm-node-parent",
                         daemon=True).start()
    # The node's own pid, not the worker's parent as read later: a node killed before its
    # worker's preload ran would otherwise be mistaken for init, and never followed.
    env = {"FARM_CONFIG": str(config_path), "FARM_NODE_SUPERVISED": str(os.getpid())}
    if not log.isEnabledFor(logging.DEBUG):
        # Dask's per-task INFO lines would drown the node's own messages.
        env["DASK_LOGGING__DISTRIBUTED"] = os.environ.get("DASK_LOGGING__DISTRIBUTED", "warning")
        logging.getLogger("distributed").setLevel(logging.WARNING)
    attempt = 0
    number = 1  # the name's number: 1 is the name as asked for, then NAME-2, NAME-3 ...
    try:
        while not stopping.is_set():
            found = find_controller(bundle, controller_url, cluster)
            address = found[0] if found else None
            if stopping.is_set():
                break
            if address is None:
                wait = RETRY_SECONDS[min(attempt, len(RETRY_SECONDS) - 1)]
                log.warning("no controller for cluster %s yet; looking again in %d s", bundle.cluster, wait)
                attempt += 1
                stopping.wait(wait)
                continue
            attempt = 0
            if found and bundle.path:  # a node without shared storage moves files through the API
                from farm.transfer import API_ENV, BUNDLE_ENV

                env.update({API_ENV: found[1], BUNDLE_ENV: str(bundle.path)})
            joining = numbered(name, number)
            try:
                why = asyncio.run(_run_worker(address, bundle, joining, slots, env, stopping, announce))
                number = 1  # it was in: next time the name as asked for is tried first
            except (OSError, ssl.SSLError, TimeoutError) as exc:
                why = f"could not join {address}: {exc}"
            except Exception as exc:  # Dask refusing us (TLS, name taken) must not end the node
                if _name_taken(exc) and not stopping.is_set():
                    number += 1
                    log.warning("another node is connected as %s; joining as %s", joining, numbered(name, number))
                    continue
                why = f"worker stopped: {type(exc).__name__}: {exc}"
            if not stopping.is_set():
                log.warning("node %s left the cluster (%s); looking for the controller again", name, why)
                stopping.wait(1)
    finally:
        config_path.unlink(missing_ok=True)


def numbered(name: str, number: int) -> str:
    """A node's name on the scheduler: as asked for, or with ``-N`` when that one is taken."""
    return name if number <= 1 else f"{name}-{number}"


def _name_taken(exc: BaseException | None) -> bool:
    """Dask's scheduler refused the worker's name (another worker holds it). It says so in
    the worker process; the nanny passes that on as the cause of its own error."""
    return any("name taken" in str(seen) for seen in causes(exc))


# -- inside the worker process (a Dask preload) ------------------------------------------


def _watch_parent(parent: int) -> None:
    while True:
        if os.getppid() != parent:
            # The supervisor died without closing us: end ourselves, and with us our segments
            # (os._exit kills them first: farm.node.leave_no_segments_on_exit). Dask's own
            # pipe from the nanny usually ends us sooner; this covers a nanny that never gave one.
            os._exit(1)
        time.sleep(0.5)


REPORT_MS = 1000


def dask_setup(worker: Any) -> None:
    """Dask preload: build this node's runtime, then report to the controller every second."""
    from tornado.ioloop import PeriodicCallback

    from farm.node import leave_no_segments_on_exit, node_report, runtime
    from farm.wire import NODE_TOPIC

    # Before the worker registers: only the controller may answer at its scheduler's address.
    farm.daskroles.expect_controller(worker.scheduler.address)
    node = runtime()
    # The worker's own name and threads are the truth: `farm node` picks a free name on
    # the scheduler (see numbered), and a plain `dask worker` is sized by --nthreads.
    if isinstance(worker.name, str) and worker.name and worker.name != worker.address:
        node.name = worker.name
    node.slots = worker.state.nthreads

    def report() -> None:
        if worker.status.name == "running":
            worker.log_event(NODE_TOPIC, {**node_report(), "address": worker.address})

    leave_no_segments_on_exit()
    worker._farm_reporter = PeriodicCallback(report, REPORT_MS)
    worker._farm_reporter.start()
    supervisor = os.environ.get("FARM_NODE_SUPERVISED", "")
    if supervisor.isdigit():
        threading.Thread(target=_watch_parent, args=(int(supervisor),), name="farm-parent-watch", daemon=True).start()
