"""The embedded default: store, Dask LocalCluster and scheduler in this process.

Also the checks every submission passes before anything is stored: inputs that
exist and are files, a destination that can be written, and a machine that can run
the profile at all.

Dask (``farm.engine``, ``farm.scheduler``) is imported only where a farm starts, a
second's work: ``farm status`` and ``farm plan`` never pay it, and ``farm run`` pays it
in :class:`EarlyCluster`'s thread while the node probes what it offers.
"""

from __future__ import annotations

import logging
import os
import stat
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from farm.config import FarmConfig, state_dir
from farm.errors import UsageError
from farm.lease import Lease
from farm.node import NodeRuntime, install_runtime
from farm.plugins import Plugins
from farm.profiles import LoadedProfile
from farm.requirements import unmet_requirements
from farm.security import usable_path
from farm.store import Store
from farm.sweep import sweep_leftovers

if TYPE_CHECKING:
    from farm.engine import Engine
    from farm.scheduler import Scheduler

STORE_NAME = "farm.db"


def check_inputs(loaded: LoadedProfile, plugins: Plugins, inputs: list[str]) -> list[Path | None]:
    """The job inputs for a submission: existing files, or ``[None]`` for a job without one."""
    processor = plugins.processor(loaded.profile.processor)
    mode = processor.input_mode(loaded.settings)
    if mode == "none":
        if inputs:
            raise UsageError(
                f"profile {loaded.profile.name!r} takes no input files (processor {processor.name}), "
                f"but {len(inputs)} were given: {inputs[0]!r}"
            )
        return [None]
    if not inputs:
        if mode == "optional":
            return [None]
        raise UsageError(f"profile {loaded.profile.name!r} needs at least one input file; none was given")
    checked: list[Path | None] = []
    for raw in inputs:
        path = usable_path(raw, "input")
        # One look at the file, so that one deleted meanwhile gets the right sentence; a file
        # deleted after this check fails its job with that reason (see Scheduler.submit).
        try:
            info = path.stat()
            resolved = path.resolve(strict=True)
        except FileNotFoundError:
            raise UsageError(f"input {raw!r} does not exist") from None
        except (OSError, RuntimeError) as exc:  # RuntimeError: a link loop, as Python 3.11 says it
            raise UsageError(f"input {raw!r} cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
        if stat.S_ISDIR(info.st_mode):
            raise UsageError(f"input {raw!r} is a directory; expected a file")
        if not stat.S_ISREG(info.st_mode):  # a FIFO or a device would hang planning, or never end
            raise UsageError(f"input {raw!r} is not a regular file (a pipe, socket or device); expected a file")
        if not os.access(path, os.R_OK):
            raise UsageError(f"input {raw!r} cannot be read (permission denied)" if path.exists() else
                             f"input {raw!r} does not exist")
        checked.append(resolved)
    return checked


def check_destination(raw: str | os.PathLike[str]) -> Path:
    """Create the destination folder if needed and prove that a file can be written in it."""
    path = usable_path(str(raw), "destination")
    if path.exists() and not path.is_dir():
        raise UsageError(f"destination {str(raw)!r} is a file; expected a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".farm-write-test-"):
            pass
    except OSError as exc:
        raise UsageError(f"destination {str(raw)!r} is not writable: {exc.strerror or exc}") from None
    return path.resolve()


def check_runnable(loaded: LoadedProfile, plugins: Plugins, inputs: list[Path | None], capabilities: dict[str, str]) -> None:
    """Refuse a profile that no node here could run, before anything is stored."""
    from farm.model import Job

    processor = plugins.processor(loaded.profile.processor)
    probe = Job(id="check", batch_id="check", input=inputs[0], profile=loaded.profile, settings=loaded.settings,
                destination=Path("."), work_dir=Path("."), frames=loaded.profile.frame_list)
    unmet = unmet_requirements(processor.requires(probe), capabilities)
    if unmet:
        wanted = processor.requires(probe)
        have = []
        for name in wanted:
            if name in capabilities:
                have.append(f"{name} {capabilities[name]}".strip())
            elif any(need.split()[0] == name for need in unmet):
                have.append(f"no {name}")
        hint = "; commands must be on node.allow_commands in farm.yaml" if any(n.startswith("command:") for n in unmet) else ""
        raise UsageError(
            f"profile {loaded.profile.name!r} needs {', '.join(unmet)}, which this machine does not offer "
            f"(it has: {', '.join(have)}){hint}"
        )


def plan_ahead(loaded: LoadedProfile, plugins: Plugins, inputs: list[Path | None]) -> None:
    """Let the processor learn what planning these inputs needs (probe them) while the
    cluster starts; the plans themselves are made at submission. Nothing here fails a run:
    what is wrong is said by the plan."""
    from farm.model import Job

    processor = plugins.processor(loaded.profile.processor)
    for source in inputs[:8]:  # a run of many inputs plans the rest in turn
        job = Job(id="ahead", batch_id="ahead", input=source, profile=loaded.profile, settings=loaded.settings,
                  destination=Path("."), work_dir=Path("."), frames=loaded.profile.frame_list)
        try:
            processor.plan_ahead(job)
        except Exception:  # noqa: BLE001 - said again, properly, by the plan
            logging.getLogger(__name__).debug("planning ahead of %s failed", source, exc_info=True)


class EarlyCluster:
    """The embedded Dask cluster, started in a background thread as soon as a run is
    known to be well formed, while the node probes what it offers (programs asked for
    their versions) and the run is checked: a job does not wait for both in turn."""

    def __init__(self, slots: int | None):
        self._started: dict[str, Any] = {}
        self._taken = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._start, args=(slots,), name="farm-dask-start", daemon=True)
        self._thread.start()

    def _start(self, slots: int | None) -> None:
        try:
            from farm.engine import embedded_cluster  # importing Dask is most of the wait

            self._started["cluster"] = embedded_cluster(slots)
        except BaseException as exc:  # raised where it is taken
            self._started["error"] = exc

    def take(self) -> tuple[Any, Any]:
        """The (client, cluster), once started; raises what starting it raised."""
        self._thread.join()
        with self._lock:
            self._taken = True
        if "error" in self._started:
            raise self._started["error"]
        return self._started["cluster"]

    def close(self) -> None:
        """Stop it unless it was taken (the run was refused before it started)."""
        with self._lock:
            if self._taken:
                return
            self._taken = True
        self._thread.join()
        if "cluster" in self._started:
            client, cluster = self._started["cluster"]
            try:
                client.close()
            finally:
                cluster.close()


@dataclass
class LocalFarm:
    """Everything ``farm run`` needs, started together and closed together."""

    store: Store
    engine: Engine
    scheduler: Scheduler
    node: NodeRuntime
    lease: Lease

    @classmethod
    def start(cls, config: FarmConfig, plugins: Plugins, state: str | None = None,
              node: NodeRuntime | None = None, owner: str = "farm run", early: EarlyCluster | None = None) -> LocalFarm:
        """``owner``: what this process is, as the lease on its batches names it.
        ``early``: the Dask cluster started beforehand (see :class:`EarlyCluster`)."""
        from farm.engine import Engine
        from farm.scheduler import Scheduler

        root = state_dir(state)
        plugins.configure(config.plugins)
        store = Store(root / STORE_NAME)
        sweep_leftovers(store, root / "work", config.keep_work)
        node = node or install_runtime(config.node)
        if early is not None:
            client, cluster = early.take()
            engine = Engine(client, cluster, node.capabilities)
        else:
            engine = Engine.embedded(node.slots, node.capabilities)
        lease = Lease(store, owner)
        scheduler = Scheduler(store, plugins, engine, root / "work", lease=lease, keep_work=config.keep_work)
        return cls(store, engine, scheduler, node, lease)

    def close(self) -> None:
        try:
            self.scheduler.close()
        finally:
            # Dask reports closing comms at shutdown; none of that concerns the user.
            quiet = logging.getLogger("distributed")
            level = quiet.level
            quiet.setLevel(logging.CRITICAL)
            try:
                self.engine.close()
            finally:
                quiet.setLevel(level)
                try:
                    # its attempts ended with the engine; what it leaves unfinished is interrupted
                    self.lease.release()
                finally:
                    self.store.close()

    def __enter__(self) -> LocalFarm:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def run_fingerprint(loaded: LoadedProfile, inputs: list[Path | None], destination: Path) -> str:
    """What makes two ``farm run`` commands the same run: the profile as it runs (after
    extends and ``--set`` overrides), each input with its size and mtime (an edited input is
    a new run), and the destination. Used to resume an interrupted run of it."""
    import hashlib
    import json

    def stamp(path: Path | None) -> list[Any] | None:
        if path is None:
            return None
        try:
            info = path.stat()
        except OSError:  # gone since it was checked: the submission says so, for this job
            return [str(path), None, None]
        return [str(path), info.st_size, info.st_mtime_ns]

    document = {
        "profile": json.loads(loaded.profile.model_dump_json()),
        "settings": json.loads(loaded.settings.model_dump_json()),
        "inputs": [stamp(path) for path in inputs],
        "destination": str(destination),
    }
    return hashlib.sha256(json.dumps(document, sort_keys=True, default=str).encode()).hexdigest()
