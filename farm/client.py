"""Talking to a controller's HTTP API with a client file (or, for older set-ups, a
bundle): the controller is found by ``--controller URL``, ``$FARM_CONTROLLER``, the
client file's URLs, or zeroconf (the cluster's name); the token goes only to a server
whose certificate is the controller's (see :mod:`farm.credentials`)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from farm.config import config_dir
from farm.credentials import ClientFile, PinMismatch, is_client_file, running_quickcluster
from farm.errors import FarmError, UsageError, causes
from farm.security import Bundle

DEFAULT_CLUSTER_DIR = "cluster"
CLIENT_FILE_NAME = "client.yaml"
Credentials = ClientFile | Bundle


class NoCredentials(UsageError):
    """Neither a client file nor a bundle is named or in its default place."""


def default_bundle_path(role: str = "node") -> Path:
    return config_dir() / DEFAULT_CLUSTER_DIR / f"{role}.yaml"


def find_bundle(explicit: str | None, role: str = "node") -> Bundle:
    chosen = explicit or os.environ.get("FARM_BUNDLE")
    if chosen:
        return Bundle.load(chosen)
    default = default_bundle_path(role)
    if default.exists():
        return Bundle.load(default)
    raise UsageError(f"no {role} bundle: pass --bundle FILE, set FARM_BUNDLE, or put it at {default} "
                     f"(copy the cluster's {role}.yaml there: `farm cluster init NAME` writes it on the controller's "
                     "machine; `farm quickcluster` starts its own node)")


def load_credentials(path: str | os.PathLike[str]) -> Credentials:
    """A client file or a bundle, whichever ``path`` holds."""
    if is_client_file(path):
        return ClientFile.load(path)
    return Bundle.load(path)


def find_credentials(client: str | None = None, bundle: str | None = None) -> Credentials:
    """What a person's command talks to the controller with: ``--client``, ``--bundle``,
    ``$FARM_CLIENT``, ``$FARM_BUNDLE``, then the client file of the quickcluster running on this
    machine, the config dir's ``client.yaml``, the admin's ``cluster/admin.yaml`` (on the
    controller's machine) and, for older set-ups, ``cluster/node.yaml``."""
    for chosen in (client, bundle, os.environ.get("FARM_CLIENT"), os.environ.get("FARM_BUNDLE")):
        if chosen:
            return load_credentials(chosen)
    quick = running_quickcluster()
    if quick is not None:
        return quick
    defaults = [config_dir() / CLIENT_FILE_NAME, default_bundle_path("admin"), default_bundle_path("node")]
    for default in defaults:
        if default.exists():
            return load_credentials(default)
    raise NoCredentials(f"no client file: pass --client FILE, set FARM_CLIENT, or put it at {defaults[0]} "
                        "(an admin makes one with `farm cluster token add NAME --role view|submit|admin`); "
                        "a `farm quickcluster` running on this machine is found without one")


def _why(exc: BaseException) -> str:
    """The pin's own sentence when the handshake was refused for it, else the error."""
    for seen in causes(exc):
        if isinstance(seen, PinMismatch) or (seen.args and isinstance(seen.args[0], PinMismatch)):
            return str(seen if isinstance(seen, PinMismatch) else seen.args[0])
    return str(exc)


def _answer(response: Any) -> Any:
    """The JSON a controller answered, or its refusal as one sentence."""
    try:
        data = response.json()
    except ValueError:
        data = {"error": response.text[:300]}
    if response.status_code >= 400:
        message = data.get("error") if isinstance(data, dict) else str(data)
        raise FarmError(f"the controller refused: {message}")
    return data


class ControllerClient:
    def __init__(self, credentials: Credentials, url: str | None = None, timeout: float = 60.0):
        self.credentials = credentials
        self.timeout = timeout
        self.url = (url or os.environ.get("FARM_CONTROLLER") or self._from_file() or self._discover()).rstrip("/")
        self.events_mark = 0

    @property
    def bundle(self) -> Credentials:  # the name callers used before client files
        return self.credentials

    def _ssl(self) -> Any:
        return self.credentials.client_ssl_context()

    def _from_file(self) -> str | None:
        """The first of the client file's URLs whose server passes the pin (a handshake
        only: nothing is sent)."""
        urls = getattr(self.credentials, "urls", None) or []
        if len(urls) <= 1:
            return urls[0] if urls else None
        import socket
        from urllib.parse import urlsplit

        for url in urls:
            parts = urlsplit(url)
            try:
                with socket.create_connection((parts.hostname, parts.port or 443), timeout=min(self.timeout, 5)) as raw:
                    with self._ssl().wrap_socket(raw, server_hostname=parts.hostname):
                        return url
            except (OSError, ValueError):
                continue
        return urls[0]  # none answers now: the request says so

    def _discover(self) -> str:
        from farm.discovery import browse

        found = browse(self.credentials.cluster, timeout=5.0)
        if not found:
            raise UsageError(f"no controller of cluster {self.credentials.cluster!r} found on the local network; "
                             "pass --controller URL or set FARM_CONTROLLER")
        return found[0].api

    def request(self, method: str, path: str, body: Any = None) -> Any:
        import httpx

        try:
            with httpx.Client(verify=self._ssl(), timeout=self.timeout) as client:
                response = client.request(method, self.url + path, json=body,
                                          headers={"Authorization": f"Bearer {self.credentials.token}"})
        except httpx.HTTPError as exc:
            raise UsageError(f"cannot reach the controller at {self.url}: {_why(exc)}{self._scheme_hint()}") from None
        # the live event id when a list was read: following the stream from it misses nothing
        self.events_mark = int(response.headers.get("X-Farm-Events", "0") or 0)
        return _answer(response)

    def events(self, after: int) -> Iterator[dict[str, Any]]:
        """The controller's live events after ``after`` (server-sent events), as they come."""
        import httpx

        try:
            with httpx.Client(verify=self._ssl(), timeout=httpx.Timeout(30, read=60)) as client:
                with client.stream("GET", f"{self.url}/api/events/stream", params={"after": after},
                                   headers={"Authorization": f"Bearer {self.credentials.token}"}) as response:
                    if response.status_code >= 400:
                        response.read()
                        _answer(response)
                    for line in response.iter_lines():
                        if line.startswith("data: "):
                            yield json.loads(line[6:])
        except httpx.HTTPError as exc:
            raise UsageError(f"lost the controller's event stream at {self.url}: {_why(exc)}"
                             f"{self._scheme_hint()}") from None

    def _scheme_hint(self) -> str:
        if self.url.lower().startswith("http://"):
            return f" (the controller's API speaks HTTPS only: use https://{self.url[len('http://'):]})"
        return ""

    def submit(self, **body: Any) -> dict[str, Any]:
        return self.request("POST", "/api/batches", body)

    def jobs(self) -> list[dict[str, Any]]:
        return self.request("GET", "/api/jobs")

    def job(self, job_id: str) -> dict[str, Any]:
        return self.request("GET", f"/api/jobs/{job_id}")

    def wait(self, job_ids: list[str], poll: float = 0.5) -> list[dict[str, Any]]:
        while True:
            docs = [self.job(job_id) for job_id in job_ids]
            if all(doc["state"] in ("done", "failed", "cancelled") for doc in docs):
                return docs
            time.sleep(poll)
