"""The controller: the store, the queue, a Dask scheduler, the HTTP API and zeroconf,
in one long-running process.

The store is the truth: a controller killed with SIGKILL and started again takes
every unfinished job back from it. SIGTERM stops it cleanly; the jobs it held resume
at the next start.

The controller holds a lease (:mod:`farm.lease`) on every batch it runs, its droplets'
included. At start, and every ``TAKEOVER_SECONDS`` after, it takes over the jobs whose
owner's lease lapsed (``interrupted`` ones: a killed ``farm run``, a dead controller);
a job whose owner lives (a ``farm run`` on the same state directory) is never touched.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from farm import __version__
from farm.config import FarmConfig, state_dir
from farm.engine import HEALTH_ONLY_HTTP, LEAN_DASK, LOOPBACK_HTTP, Engine
from farm.events import EventHub
from farm.errors import Forbidden, IllegalTransition, StoreError, UsageError, causes
from farm.lease import Lease, LeaseLost
from farm.local import STORE_NAME, check_destination, check_inputs
from farm.model import Submission
from farm.plugins import load_plugins
from farm.profiles import load_profile, looks_like_path
from farm.scheduler import Scheduler
from farm.security import Bundle, usable_path
from farm.store import Store
from farm.sweep import sweep_leftovers
from farm.tokens import TOKENS_NAME, Principal, TokenTable

log = logging.getLogger("farm.controller")
STORE_BUSY_SECONDS = 5.0  # a locked store is reported after this, not after SQLite's 30 s
# The nodes' view (farm nodes, the monitor's nodes event) is rebuilt at most this often, or
# when the nodes change (one joins or leaves, reports, is paused): at 1,000 busy nodes one
# view is 700 KB of JSON, and four a second cost a tenth of the controller's CPU.
NODES_PUBLISH_SECONDS = 1.0
TAKEOVER_SECONDS = 5.0  # how often the store is looked at for jobs whose owner is gone
RETENTION_SECONDS = 3600.0  # how often controller.retention is applied (and once at start)


class Controller:
    def __init__(self, config: FarmConfig, bundle: Bundle, state: str | None = None,
                 scheduler_address: str | None = None, advertise: bool | None = None):
        if bundle.role != "controller":
            raise UsageError(f"{bundle.path}: this is a {bundle.role} bundle; the controller needs controller.yaml "
                             "from `farm cluster init`")
        self.config = config
        self.bundle = bundle
        self.root = state_dir(state)
        if config.controller.tokens:
            tokens_path = Path(config.controller.tokens).expanduser()
        else:
            tokens_path = (bundle.path.parent if bundle.path else self.root) / TOKENS_NAME
        self.tokens = TokenTable(tokens_path, legacy_token=bundle.token)
        self.scheduler_address = scheduler_address
        self.advertise = config.controller.advertise if advertise is None else advertise
        self.stopping = threading.Event()
        self.plugins = load_plugins()
        self.api_url = ""
        self._threads: list[threading.Thread] = []
        self._advertiser: Any = None
        self._server: Any = None
        self.store_error: str | None = None  # set while the store cannot be written
        self.droplets: Any = None
        self.events = EventHub()
        self._nodes_published: list[dict[str, Any]] | None = None
        self._nodes_built_at, self._nodes_built_version = 0.0, -1
        self._node_documents: list[dict[str, Any]] = []
        # Changes are published once the round that made them is committed, so that a list
        # read at event N holds every change up to N.
        self._unpublished: list[tuple[str, dict[str, Any]]] = []
        self._retain_at = 0.0  # controller.retention: first applied in the first round

    # -- starting and stopping -----------------------------------------------------------

    def start(self) -> None:
        from distributed import Client, LocalCluster

        settings = self.config.controller
        self.plugins.configure(self.config.plugins)
        self.store = Store(self.root / STORE_NAME, busy_timeout=STORE_BUSY_SECONDS)
        security = self.bundle.dask_security()
        cluster = None
        if self.scheduler_address:
            from farm.daskroles import expect_controller

            # An outside scheduler runs with the certificate of `farm cluster export-tls`
            # (scheduler.NAME.farm) and `--preload farm.daskroles`; anything else
            # answering there (a node's certificate, another cluster's) is refused.
            expect_controller(self.scheduler_address)
            client = self._outside_client(security)
        else:
            import dask

            with dask.config.set({**LEAN_DASK, **HEALTH_ONLY_HTTP}):
                try:
                    cluster = LocalCluster(
                        n_workers=0, processes=False, host=settings.host, scheduler_port=settings.scheduler_port,
                        protocol="tls://", security=security, dashboard_address=LOOPBACK_HTTP,
                        scheduler_kwargs={"dashboard": False}, silence_logs=logging.ERROR,
                    )
                except RuntimeError as exc:  # Dask's "Cluster failed to start", the reason two causes down
                    reason = _refusal_to_listen(exc)
                    if reason is None:
                        raise
                    logging.getLogger("distributed.deploy.spec").setLevel(logging.ERROR)  # "closed without starting up"
                    raise UsageError(f"the scheduler could not listen on {settings.host}:{settings.scheduler_port}: "
                                     f"{reason.strerror or reason} (controller.scheduler_port in farm.yaml)") from None
            client = Client(cluster, security=security, set_as_default=False)
        self.engine = Engine(client, cluster, stamped=True)  # its scheduler runs farm.daskroles
        storage = Path(settings.storage).expanduser() if settings.storage else self.root / "work"
        storage.mkdir(parents=True, exist_ok=True)
        sweep_leftovers(self.store, storage, self.config.keep_work)
        self.lease = Lease(self.store, "controller")
        self.scheduler = Scheduler(self.store, self.plugins, self.engine, storage, lease=self.lease,
                                   keep_work=self.config.keep_work)
        self.scheduler.listeners.append(self._publish_job_event)
        self._take_over()
        if self.config.droplets:
            from farm.droplets.service import start_droplets

            self.droplets = start_droplets(self.scheduler, self.config.droplets, self.plugins)
        self._start_api()
        from farm.controllerapi import announce

        announce(client, self.api_url)  # workers started outside `farm node` learn where to fetch inputs
        self.dask_address = self._reachable(client.scheduler.address)
        if self.advertise:
            from farm.discovery import Advertised, Advertiser

            self._advertiser = Advertiser(
                Advertised(self.bundle.cluster, self.api_url, self.dask_address, self.bundle.fingerprint),
                settings.api_port or 0)

    def _outside_client(self, security: Any) -> Any:
        """The Dask client of an outside scheduler (``--scheduler``), or a sentence why not."""
        from distributed import Client

        address = self.scheduler_address or ""
        if not address.startswith("tls://"):
            raise UsageError(f"--scheduler {address!r}: expected tls://HOST:PORT (cluster traffic is TLS; start the "
                             "scheduler with the files of `farm cluster export-tls`)")
        try:
            return Client(address, security=security, set_as_default=False)
        except (OSError, TimeoutError) as exc:
            raise UsageError(f"cannot reach the Dask scheduler at {address}: {exc}; is it running, with --protocol tls "
                             "and the certificate of `farm cluster export-tls` (scheduler.pem)?") from None

    def _take_over(self) -> None:
        """Take over the jobs whose owner's lease lapsed (never one whose owner lives)."""
        self._taken_over_at = time.monotonic()
        recovered = self.scheduler.recover()
        if recovered:
            log.warning("took over %d unfinished job(s) whose owner stopped: %s", len(recovered),
                        ", ".join(recovered))

    def _renew_lease(self) -> None:
        """Our lease was found lapsed (this process was stopped longer than its ttl) and
        our jobs interrupted: forget them, take a new lease, and take back whatever nobody
        else took meanwhile."""
        log.error("this controller's lease lapsed while it was stopped; its jobs were interrupted; taking a new lease")
        self.scheduler.reset()
        self.lease.release("lapsed")
        self.lease = self.scheduler.lease = Lease(self.store, "controller")
        self._take_over()

    def _reachable(self, address: str) -> str:
        """The scheduler's address as another machine dials it (not 0.0.0.0)."""
        if "0.0.0.0" in address or "://:" in address:
            from farm.discovery import local_addresses

            return address.replace("0.0.0.0", local_addresses()[0]).replace("://:", f"://{local_addresses()[0]}:")
        return address

    def _start_api(self) -> None:
        import uvicorn

        from farm.api import create_app

        settings = self.config.controller
        with self.bundle.pem_paths() as files:  # uvicorn loads them while starting
            config = uvicorn.Config(create_app(self), host=settings.host, port=settings.api_port,
                                    ssl_certfile=files["cert"], ssl_keyfile=files["key"], log_level="warning",
                                    lifespan="off", timeout_graceful_shutdown=2)
            self._server = uvicorn.Server(config)
            thread = threading.Thread(target=self._server.run, name="farm-api", daemon=True)
            thread.start()
            deadline = time.monotonic() + 15
            while not self._server.started and thread.is_alive() and time.monotonic() < deadline:
                time.sleep(0.02)
        if not self._server.started:
            raise UsageError(f"the API could not listen on {settings.host}:{settings.api_port} (port in use?)")
        port = self._server.servers[0].sockets[0].getsockname()[1]
        host = settings.host if settings.host not in ("0.0.0.0", "") else self._first_address()
        self.api_url = f"https://{host}:{port}"
        self._threads.append(thread)

    def _first_address(self) -> str:
        from farm.discovery import local_addresses

        return local_addresses()[0]

    def serve_forever(self) -> None:
        """Run the queue until SIGTERM or SIGINT."""
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stopping.set())
        while not self.stopping.is_set():
            try:
                if self.lease.lost.is_set():
                    self._renew_lease()
                elif time.monotonic() - self._taken_over_at > TAKEOVER_SECONDS:
                    self._take_over()
                if self.config.controller.retention and time.monotonic() >= self._retain_at:
                    self._retain()
                self.scheduler.step(wait=0.2)
            except StoreError as exc:
                self._unpublished.clear()  # those changes were never stored
                self._survive(exc)
            except (IllegalTransition, LeaseLost):
                if self.lease.beat():  # not a lapsed lease: a real bug
                    raise
                self._unpublished.clear()  # the next round takes a new lease
            self._publish_committed()
            self._publish_nodes()

    def _retain(self) -> None:
        """controller.retention: old finished jobs leave the store (here, in the scheduler's
        thread, which then forgets them too) and their work folders the disk (in the background)."""
        from farm.purge import parse_age, purge, remove_work_folders

        self._retain_at = time.monotonic() + RETENTION_SECONDS
        purged = purge(self.store, parse_age(self.config.controller.retention), remove_folders=False)
        for job in purged:
            self.scheduler.jobs.pop(job.id, None)
        if purged:
            log.info("retention %s: removed %d finished job(s) and their logs", self.config.controller.retention,
                        len(purged))
            threading.Thread(target=remove_work_folders, args=(purged,), name="farm-retention", daemon=True).start()

    def _survive(self, exc: StoreError) -> None:
        """The store refused a write (disk full, locked): take no new work, keep what was
        accepted, and start again from the store once it can be written."""
        log.error("%s; new work is refused until the store can be written again", exc)
        self.store_error = str(exc)
        self.scheduler.reset()
        while not self.stopping.wait(2.0):
            self.scheduler.refuse_pending(exc)
            try:
                self.scheduler.recover()
            except StoreError as again:
                log.error("the store still cannot be written: %s", again)
                self.scheduler.reset()
                continue
            self.store_error = None
            log.warning("the store can be written again; resumed from it")
            return

    def close(self) -> None:
        self.stopping.set()
        self.events.close()
        if self._advertiser is not None:
            self._advertiser.close()
        if self._server is not None:
            self._server.should_exit = True
        for thread in self._threads:
            thread.join(timeout=5)
        quiet = logging.getLogger("distributed")
        quiet.setLevel(logging.CRITICAL)
        if not hasattr(self, "store"):
            return  # start() failed before anything was opened
        try:
            if self.droplets is not None:
                self.droplets.close()
            if hasattr(self, "scheduler"):  # else start() failed before the queue was made
                self.scheduler.close()
            if hasattr(self, "engine"):
                self.engine.close()
            if hasattr(self, "lease"):
                self.lease.release()  # what it leaves unfinished is interrupted, and taken at the next start
        finally:
            self.store.close()

    # -- what the API asks for -------------------------------------------------------------

    def authenticate(self, token: str | None) -> Principal | None:
        """The principal a bearer token stands for, or None (a missing, wrong or revoked
        token). The token table is read again whenever it changed, so a revoked token is
        refused from the next request on."""
        return self.tokens.authenticate(token)

    def submit(self, request: Submission) -> tuple[str, list[str]]:
        if self.store_error:
            raise StoreError(f"the controller takes no new work until its store can be written: {self.store_error}")
        principal = request.principal
        restricted = principal is not None and not principal.may("admin")
        if restricted:
            self._check_submission(principal, request)  # before anything is read by path or written
        origin = principal.origin if principal is not None else request.origin
        overrides = list(request.overrides or [])
        if request.priority is not None:
            overrides.append(f"priority={request.priority}")
        loaded = load_profile(request.profile, self.plugins, overrides, limits=self.config.limits,
                              allow_env=self.config.node.allow_env)
        inputs = check_inputs(loaded, self.plugins, request.inputs)
        raw_destination = str(request.destination or loaded.profile.destination or self.root / "out")
        if restricted:
            self._check_destination(principal, raw_destination)  # before check_destination creates it
        destination = check_destination(raw_destination)
        batch_id, job_ids = self.scheduler.call(
            lambda: self.scheduler.submit(loaded, inputs, destination, origin=origin,
                                          overwrite=request.overwrite)
        ).result(timeout=120)
        self.events.publish("batch_submitted", {"batch": batch_id, "jobs": job_ids})
        return batch_id, job_ids

    def _check_submission(self, principal: Principal, request: Submission) -> None:
        """What a ``submit`` token may ask for: a profile known by name, only the keys that
        profile exposes, a destination under ``controller.destinations``."""
        if not principal.may("submit"):
            raise Forbidden(principal.refusal("submitting", "submit", "admin"))
        who = f"token {principal.name!r} has role {principal.role}"
        if looks_like_path(request.profile):
            raise Forbidden(f"{who}: name a profile the controller knows (see `farm profiles list` there), "
                            f"not a path ({request.profile!r}); profiles by path need admin")
        # the profile as the controller has it: an override cannot widen its own expose list
        exposed = load_profile(request.profile, self.plugins).profile.expose
        for item in request.overrides or []:
            key = item.partition("=")[0].strip()
            if not any(key == allowed or key.startswith(f"{allowed}.") for allowed in exposed):
                offered = ", ".join(exposed) if exposed else "no keys"
                raise Forbidden(f"{who}: profile {request.profile!r} exposes {offered}, not {key!r}; "
                                "overriding other keys needs admin (or the key in the profile's expose list)")

    def _check_destination(self, principal: Principal, raw: str) -> None:
        who = f"token {principal.name!r} has role {principal.role}"
        real = Path(os.path.realpath(usable_path(raw, "destination")))
        roots = [Path(os.path.realpath(Path(root).expanduser())) for root in self.config.controller.destinations]
        if not any(real == root or real.is_relative_to(root) for root in roots):
            where = ", ".join(str(root) for root in roots) if roots else \
                "nowhere: the controller's farm.yaml has no controller.destinations"
            raise Forbidden(f"{who}: it may write only under the destination roots ({where}), not {raw!r}; "
                            "writing elsewhere needs admin")

    # -- what the monitor sees -------------------------------------------------------------

    def _publish_job_event(self, kind: str, rt: Any, data: dict[str, Any]) -> None:
        """Called in the scheduler's thread for every change to a job or a segment."""
        if kind == "segment_progress":
            return  # many per segment; the monitor shows segments started and done
        job_id = rt.job.id
        done = rt.done  # kept by the scheduler as segments finish: no count of every segment per event
        self._unpublished.append((kind, {
            "job": job_id, "batch": rt.job.batch_id, "state": rt.state, "segments": rt.total,
            "segments_done": done, "priority": rt.priority, "error": rt.error, "waiting": rt.waiting,
            **{key: value for key, value in data.items() if key in ("segment", "node", "reason", "outputs")},
        }))

    def _publish_committed(self) -> None:
        pending, self._unpublished = self._unpublished, []
        for kind, data in pending:
            self.events.publish(kind, data)

    def _publish_nodes(self) -> None:
        """Refresh the nodes' view (in the scheduler's thread) and publish it when it changed;
        at most every NODES_PUBLISH_SECONDS (it reads every attempt: not once per round)."""
        scheduler = self.scheduler
        now = time.monotonic()
        if now - self._nodes_built_at < NODES_PUBLISH_SECONDS and self._nodes_built_version == scheduler._nodes_version:
            return
        self._nodes_built_at, self._nodes_built_version = now, scheduler._nodes_version
        running: dict[str, list[str]] = {}
        for attempt in list(scheduler.attempts.values()):
            if attempt.current:
                running.setdefault(attempt.node.address, []).append(attempt.segment_id)
        documents = []
        for view in scheduler._nodes:
            paused = view.name in scheduler.paused_nodes
            segments = sorted(running.get(view.address, []))
            state = "paused" if paused else ("part-time" if not view.accepting else ("busy" if segments else "idle"))
            documents.append({"name": view.name, "address": view.address, "slots": view.slots,
                              "running": len(segments), "segments": segments, "state": state,
                              "reason": view.reason, "capabilities": view.capabilities})
        for worker in getattr(self.engine, "silent_workers", []):  # connected, and no farm node: listed, given nothing
            documents.append({
                "name": worker["name"], "address": worker["address"], "slots": worker["slots"], "running": 0,
                "segments": [], "state": "not a farm node", "farm": False, "capabilities": {},
                "reason": "a Dask worker that never reported as a farm node (started without --preload "
                          "farm.nodeservice?); it gets no segments"})
        self._node_documents = documents
        if documents != self._nodes_published:
            self._nodes_published = documents
            self.events.publish("nodes", {"nodes": documents})

    def node_documents(self) -> list[dict[str, Any]]:
        return self._node_documents

    def info(self) -> dict[str, Any]:
        return {"cluster": self.bundle.cluster, "version": __version__, "scheduler": self.dask_address,
                "api": self.api_url, "fingerprint": self.bundle.fingerprint}


def _refusal_to_listen(exc: BaseException) -> OSError | None:
    """The system's refusal to listen (address in use or not this machine's, port not
    allowed) behind an exception, if one is in its chain of causes."""
    refusals = (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES)
    return next((seen for seen in causes(exc) if isinstance(seen, OSError) and seen.errno in refusals), None)
