"""Talking to a controller's HTTP API: found by ``--controller URL``, ``$FARM_CONTROLLER``,
or zeroconf (the bundle's cluster), authenticated with the bundle's token over TLS
that trusts only the cluster's CA."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from farm.config import config_dir
from farm.errors import FarmError, UsageError
from farm.security import Bundle

DEFAULT_CLUSTER_DIR = "cluster"


def default_bundle_path(role: str = "node") -> Path:
    return config_dir() / DEFAULT_CLUSTER_DIR / f"{role}.yaml"


def find_bundle(explicit: str | None, role: str = "node") -> Bundle:
    chosen = explicit or os.environ.get("FARM_BUNDLE")
    if chosen:
        return Bundle.load(chosen)
    default = default_bundle_path(role)
    if default.exists():
        return Bundle.load(default)
    raise UsageError(f"no cluster bundle: pass --bundle FILE, set FARM_BUNDLE, or put it at {default} "
                     "(`farm cluster init NAME` makes one)")


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
    def __init__(self, bundle: Bundle, url: str | None = None, timeout: float = 60.0):
        self.bundle = bundle
        self.url = (url or os.environ.get("FARM_CONTROLLER") or self._discover()).rstrip("/")
        self.timeout = timeout
        self.events_mark = 0

    def _discover(self) -> str:
        from farm.discovery import browse

        found = browse(self.bundle.cluster, timeout=5.0)
        if not found:
            raise UsageError(f"no controller of cluster {self.bundle.cluster!r} found on the local network; "
                             "pass --controller URL or set FARM_CONTROLLER")
        return found[0].api

    def request(self, method: str, path: str, body: Any = None) -> Any:
        import httpx

        try:
            with httpx.Client(verify=self.bundle.client_ssl_context(), timeout=self.timeout) as client:
                response = client.request(method, self.url + path, json=body,
                                          headers={"Authorization": f"Bearer {self.bundle.token}"})
        except httpx.HTTPError as exc:
            raise UsageError(f"cannot reach the controller at {self.url}: {exc}") from None
        # the live event id when a list was read: following the stream from it misses nothing
        self.events_mark = int(response.headers.get("X-Farm-Events", "0") or 0)
        return _answer(response)

    def events(self, after: int) -> Iterator[dict[str, Any]]:
        """The controller's live events after ``after`` (server-sent events), as they come."""
        import httpx

        try:
            with httpx.Client(verify=self.bundle.client_ssl_context(), timeout=httpx.Timeout(30, read=60)) as client:
                with client.stream("GET", f"{self.url}/api/events/stream", params={"after": after},
                                   headers={"Authorization": f"Bearer {self.bundle.token}"}) as response:
                    if response.status_code >= 400:
                        response.read()
                        _answer(response)
                    for line in response.iter_lines():
                        if line.startswith("data: "):
                            yield json.loads(line[6:])
        except httpx.HTTPError as exc:
            raise UsageError(f"lost the controller's event stream at {self.url}: {exc}") from None

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
