"""The Python API for scripts: run a batch on the embedded default and follow its jobs.

    import farm
    batch = farm.run("examples/testsrc-frames.yaml", destination="out/frames")
    for job in batch.jobs:
        print(job.state, len(job.outputs))

``farm.start(...)`` returns at once; its jobs can be waited for or cancelled. Errors a
person can fix are :class:`farm.errors.FarmError` with a one-line message.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from farm.errors import FarmError

FINAL = ("done", "failed", "cancelled")


@dataclass
class JobHandle:
    """One job of a batch, as it is now."""

    id: str
    input: Path | None
    _batch: Batch = field(repr=False)

    def _runtime(self) -> Any:
        return self._batch._scheduler.jobs[self.id]

    @property
    def state(self) -> str:
        return str(self._runtime().state)

    @property
    def outputs(self) -> list[str]:
        return list(self._runtime().outputs)

    @property
    def error(self) -> str | None:
        rt = self._runtime()
        return None if rt.state == "done" else rt.error

    def wait(self, timeout: float | None = None) -> str:
        """Wait until this job ends; returns its state (raises TimeoutError)."""
        self._batch._wait_for(lambda: self.state in FINAL, timeout)
        return self.state

    def cancel(self) -> None:
        self._batch._scheduler.cancel(self.id)


class Batch:
    """A running or finished batch on this machine; close it (or use ``with``) when done."""

    def __init__(self, farm: Any, batch_id: str, job_ids: list[str]):
        self._farm = farm
        self._scheduler = farm.scheduler
        self.id = batch_id
        self._ids = job_ids
        self._changed = threading.Condition()
        self._error: BaseException | None = None
        self._closed = False
        self._scheduler.listeners.append(self._notify)
        self._thread = threading.Thread(target=self._drive, name=f"farm-batch-{batch_id}", daemon=True)
        self._thread.start()

    @property
    def jobs(self) -> list[JobHandle]:
        """Every job, including those chained after others with ``then:``."""
        return [JobHandle(job_id, self._scheduler.jobs[job_id].job.input, self)
                for job_id in self._scheduler.family(self._ids)]

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> Batch:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"batch {self.id} still running after {timeout} s")
        if self._error is not None:
            raise self._error
        return self

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancel()

    def close(self) -> None:
        if self._thread.is_alive():
            self.cancel()
            self._thread.join()
        if not self._closed:
            self._closed = True
            self._farm.close()

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _drive(self) -> None:
        try:
            self._scheduler.run_until_done(self._ids)
        except BaseException as exc:  # handed to whoever waits
            self._error = exc
        finally:
            self._notify()

    def _notify(self, *args: Any) -> None:
        with self._changed:
            self._changed.notify_all()

    def _wait_for(self, check: Any, timeout: float | None) -> None:
        with self._changed:
            if not self._changed.wait_for(lambda: check() or self.done, timeout):
                raise TimeoutError(f"batch {self.id}: still waiting after {timeout} s")


def start(profile: str | Path, inputs: Iterable[str | Path] = (), destination: str | Path | None = None,
          overrides: Iterable[str] = (), overwrite: bool = False, state: str | Path | None = None,
          config: str | Path | None = None) -> Batch:
    """Check and submit a batch on the embedded default; returns at once."""
    from farm.config import load_config
    from farm.local import LocalFarm, check_destination, check_inputs, check_runnable
    from farm.node import install_runtime, require_sandbox
    from farm.plugins import load_plugins
    from farm.profiles import load_profile

    settings = load_config(config)
    plugins = load_plugins()
    loaded = load_profile(str(profile), plugins, list(overrides), limits=settings.limits,
                          allow_env=settings.node.allow_env)
    sources = check_inputs(loaded, plugins, [str(p) for p in inputs])
    dest = check_destination(destination or loaded.profile.destination or "out")
    require_sandbox(settings.node)
    node = install_runtime(settings.node)
    check_runnable(loaded, plugins, sources, node.capabilities)
    local = LocalFarm.start(settings, plugins, str(state) if state else None, node, owner="farm.start (Python)")
    try:
        batch_id, job_ids = local.scheduler.submit(loaded, sources, dest, origin="python", overwrite=overwrite)
    except BaseException:
        local.close()
        raise
    return Batch(local, batch_id, job_ids)


def run(profile: str | Path, inputs: Iterable[str | Path] = (), destination: str | Path | None = None,
        overrides: Iterable[str] = (), overwrite: bool = False, state: str | Path | None = None,
        config: str | Path | None = None) -> Batch:
    """Run a batch to its end on the embedded default; the returned batch is closed."""
    batch = start(profile, inputs, destination, overrides, overwrite, state, config)
    try:
        batch.wait()
    finally:
        batch.close()
    return batch


class RemoteJob:
    """A job on a controller, read through its API each time it is asked."""

    def __init__(self, client: Any, job_id: str):
        self._client = client
        self.id = job_id

    def _doc(self) -> dict[str, Any]:
        return self._client.job(self.id)

    @property
    def state(self) -> str:
        return self._doc()["state"]

    @property
    def outputs(self) -> list[str]:
        return self._doc()["outputs"]

    @property
    def error(self) -> str | None:
        doc = self._doc()
        return None if doc["state"] == "done" else doc["error"]

    def wait(self, timeout: float | None = None, poll: float = 0.5) -> str:
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while (state := self.state) not in FINAL:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {self.id} is still {state} after {timeout} s")
            time.sleep(poll)
        return state

    def cancel(self) -> None:
        self._client.request("POST", f"/api/jobs/{self.id}/cancel")


@dataclass
class RemoteBatch:
    id: str
    jobs: list[RemoteJob]

    def wait(self, timeout: float | None = None) -> RemoteBatch:
        for job in self.jobs:
            job.wait(timeout)
        return self


def submit(profile: str, inputs: Iterable[str | Path] = (), destination: str | Path | None = None,
           overrides: Iterable[str] = (), overwrite: bool = False, priority: str | int | None = None,
           controller: str | None = None, bundle: str | Path | None = None,
           client: str | Path | None = None) -> RemoteBatch:
    """Submit a batch to a controller (``controller`` URL, $FARM_CONTROLLER, the client
    file's URL, or zeroconf) with a client file (``client``, $FARM_CLIENT) or, in older
    set-ups, a bundle; paths are as the controller sees them."""
    from farm.client import ControllerClient, find_credentials

    remote = ControllerClient(find_credentials(str(client) if client else None, str(bundle) if bundle else None),
                              controller)
    answer = remote.submit(profile=str(profile), inputs=[str(Path(p).absolute()) for p in inputs],
                           destination=str(Path(destination).absolute()) if destination else None,
                           overrides=list(overrides), overwrite=overwrite, priority=priority)
    return RemoteBatch(answer["batch"], [RemoteJob(remote, job["id"]) for job in answer["jobs"]])


__all__ = ["Batch", "FarmError", "JobHandle", "RemoteBatch", "RemoteJob", "run", "start", "submit"]
