"""Starting real controllers and nodes (separate processes) for the cluster tests."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import yaml

from farm.client import load_credentials
from tests.conftest import FARM, Result

try:
    import farmfork  # pytest puts tests/ on the path
except ModuleNotFoundError:  # a benchmark imports this as tests.cluster_helpers
    from tests import farmfork


#: How many ports each pytest-xdist worker has to pick from (see free_port).
PORTS_PER_WORKER = 1500
_next_ports: Iterator[int] | None = None


def _ports() -> Iterator[int]:
    """This worker's ports, from a random start, below the kernel's ephemeral range."""
    ephemeral_from = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:]
    index = int(worker) if worker.isdigit() else 0
    slices = (ephemeral_from - 1024) // PORTS_PER_WORKER
    if slices < 1:
        return
    low = ephemeral_from - (index % slices + 1) * PORTS_PER_WORKER
    start = random.randrange(PORTS_PER_WORKER)
    for offset in range(PORTS_PER_WORKER):
        yield low + (start + offset) % PORTS_PER_WORKER


def free_port() -> int:
    """A port no one listens on, for a controller that may be stopped and started again on
    it. A port the kernel hands out (bind to port 0) is free only until the kernel hands it
    to the next listener or outgoing connection, any test's; so ports come from below the
    ephemeral range, a slice for each xdist worker."""
    global _next_ports
    if _next_ports is None:
        _next_ports = _ports()
    for port in _next_ports:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # no range of our own: as the kernel hands them out
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Cluster:
    def __init__(self, root: Path, name: str = "testfarm", advertise: bool = False, node_config: dict | None = None,
                 controller_config: dict | None = None):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.bundles = root / "bundles"
        self.api_port, self.scheduler_port = free_port(), free_port()
        self.url = f"https://127.0.0.1:{self.api_port}"
        self.config = root / "farm.yaml"
        self.config.write_text(yaml.safe_dump({
            "node": {"allow_commands": ["ffmpeg", sys.executable], "kill_grace": 1.0, **(node_config or {})},
            "controller": {"host": "127.0.0.1", "api_port": self.api_port, "scheduler_port": self.scheduler_port,
                           "advertise": advertise, "storage": str(root / "storage"), **(controller_config or {})},
        }))
        # people's commands use the admin client file; nodes get node.yaml (--bundle, FARM_BUNDLE)
        self.env = {**os.environ, "FARM_CONFIG": str(self.config), "FARM_STATE": str(root / "state"),
                    "FARM_BUNDLE": str(self.bundles / "node.yaml"), "FARM_CLIENT": str(self.bundles / "admin.yaml"),
                    "FARM_CONTROLLER": self.url, "DASK_LOGGING__DISTRIBUTED": "warning"}
        self.controller: subprocess.Popen | None = None
        self._looks: httpx.Client | None = None  # the connection that GETs reuse (api), to _looks_url
        self._looks_url = self.url
        self.nodes: dict[str, subprocess.Popen] = {}
        self.schedulers: list[subprocess.Popen] = []  # plain Dask schedulers a test started: stopped last
        made = self.farm("cluster", "init", name, "--dir", self.bundles)
        assert made.returncode == 0, made.stderr
        #: the admin's token, from the admin client file that `farm cluster init` wrote
        self.token: str = yaml.safe_load((self.bundles / "admin.yaml").read_text())["token"]

    def add_token(self, name: str, role: str) -> Path:
        """A token made with the real CLI; returns its client file."""
        out = self.root / "clients" / f"{name}.yaml"
        result = self.farm("cluster", "token", "add", name, "--role", role, "--dir", self.bundles, "--url", self.url,
                           "--out", out)
        assert result.returncode == 0, result.stderr
        return out

    def farm(self, *args: str, timeout: float = 120, env: dict | None = None) -> Result:
        return Result(*farmfork.run([str(arg) for arg in args], env={**self.env, **(env or {})}, cwd=self.root,
                                    timeout=timeout))

    def start_controller(self) -> None:
        self.controller = farmfork.start(["controller", "--bundle", str(self.bundles / "controller.yaml")],
                                         env=self.env, cwd=self.root, log=self.root / "controller.log")
        self.wait_until(lambda: self.api_up(), 90, "the controller's API")

    def api(self, method: str, path: str, **kwargs) -> httpx.Response:
        """One request to the controller's API from this process, with the credentials the
        cluster's commands use (``FARM_CLIENT``, else ``FARM_BUNDLE``). Waits poll through
        this: a `farm` command per look costs a Python start-up, CPU that the controller
        and nodes under test need on a 2-core machine. What the commands print is tested
        where a test runs them (``farm``)."""
        if method != "GET":  # never sent twice: a fresh connection, and no retry
            with self._client() as client:
                return client.request(method, path, **kwargs)
        # Looks reuse one connection: a TLS handshake per look costs both sides CPU.
        if self._looks is None or self._looks_url != self.url:  # none yet, or a test pointed it elsewhere
            self._close_looks()
            self._looks, self._looks_url = self._client(), self.url
        try:
            return self._looks.request(method, path, **kwargs)
        except httpx.TransportError:  # a controller killed and started again leaves it dead
            self._close_looks()
            self._looks = self._client()
            return self._looks.request(method, path, **kwargs)

    def _close_looks(self) -> None:
        if self._looks is not None:
            self._looks.close()
            self._looks = None

    def _client(self) -> httpx.Client:
        credentials = load_credentials(self.env.get("FARM_CLIENT") or self.env["FARM_BUNDLE"])
        return httpx.Client(base_url=self.url, verify=credentials.client_ssl_context(), timeout=60,
                            headers={"Authorization": f"Bearer {credentials.token}"})

    def api_up(self) -> bool:
        try:
            return self.api("GET", "/api/nodes", timeout=30).status_code == 200
        except httpx.HTTPError:
            return False

    def start_node(self, name: str, *extra: str, bundle: Path | None = None, config: Path | None = None,
                   extra_env: dict | None = None) -> farmfork.Forked | subprocess.Popen:
        env = {**self.env, **(extra_env or {})}
        if config:
            env["FARM_CONFIG"] = str(config)
        args = ["node", "--name", name, "--bundle", str(bundle or self.bundles / "node.yaml"), *extra]
        if "--cluster" not in extra:
            args += ["--controller", self.url]
        proc = farmfork.start(args, env=env, cwd=self.root, log=self.root / f"node-{name}.log", session=True)
        self.nodes[name] = proc
        return proc

    def node_names(self) -> list[str]:
        try:
            answer = self.api("GET", "/api/nodes")
        except httpx.HTTPError:
            return []
        return sorted(node["name"] for node in answer.json()) if answer.status_code == 200 else []

    def wait_for_nodes(self, *names: str, timeout: float = 60) -> None:
        self.wait_until(lambda: set(names) <= set(self.node_names()), timeout, f"nodes {names}")

    def job(self, job_id: str) -> dict:
        """What `farm status JOB --json` prints: the API's document of the job."""
        answer = self.api("GET", f"/api/jobs/{job_id}")
        assert answer.status_code == 200, answer.text
        return answer.json()

    @staticmethod
    def wait_until(check, timeout: float, what: str, every: float = 0.3):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = check()
            if value:
                return value
            time.sleep(every)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")

    def kill_node(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.nodes.pop(name)
        proc.send_signal(sig)
        proc.wait(timeout=30)

    def stop(self) -> None:
        self._close_looks()
        # A plain Dask worker whose scheduler went first waits seconds for it (8 s on a quiet
        # machine, 28 s in a busy suite): a scheduler a test started stops after the rest.
        _end([*self.nodes.values(), *([self.controller] if self.controller else [])])
        _end(self.schedulers)
        for proc in [*self.nodes.values(), *self.schedulers]:  # whatever a node's session left
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.nodes.clear()
        self.schedulers.clear()


def _end(procs: list[subprocess.Popen]) -> None:
    """SIGTERM to all, then wait for each; what is still there after 20 s is killed."""
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class FakeClusterAPI:
    """An HTTPS server that answers every GET the way a controller's API answers
    ``/api/cluster``: with ``scheduler``, under the certificate it is given. ``requests``
    lists the paths it was asked for (nothing, when a client refused its certificate)."""

    def __init__(self, scheduler: str, cert: str | Path, key: str | Path):
        self.scheduler = scheduler
        self.requests: list[str] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                api.requests.append(self.path)
                body = json.dumps({"scheduler": api.scheduler}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
