"""Trust limits: the API settles who is asking and how much they send before it reads a
body; profiles are measured before they are expanded; the store and the cluster's keys
stay private; /docs fetches nothing from the internet. Real controller processes, the
real CLI."""

from __future__ import annotations

import os
import re
import stat
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from farm.security import Bundle
from tests.cluster_helpers import Cluster
from tests.conftest import write_profile

MiB = 1024 * 1024

# Each line refers to the one before nine times: 9**6 (531,441) values once expanded.
ALIAS_BOMB = """\
name: bomb
processor: command
settings:
  command: [echo, x]
  a: &a [x, x, x, x, x, x, x, x, x]
  b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
  c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
  d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
  e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
  f: [*e, *e, *e, *e, *e, *e, *e, *e, *e]
"""


def hostile_profiles(folder: Path) -> dict[str, tuple[Path, list[str], str]]:
    """name -> (profile, overrides, what the refusal says)."""
    folder.mkdir(parents=True, exist_ok=True)
    good = write_profile(folder, "frames", {"processor": "command", "frames": "1-10",
                                            "settings": {"command": ["echo", "{start}"]}})
    bomb = folder / "bomb.yaml"
    bomb.write_text(ALIAS_BOMB)
    deep = folder / "deep.yaml"
    deep.write_text("name: deep\nprocessor: command\nsettings: " + "[" * 20000 + "]" * 20000 + "\n")
    priority = folder / "priority.yaml"
    priority.write_text(f"name: priority\nprocessor: command\nsettings: {{command: [echo, x]}}\npriority: {10**40}\n")
    return {
        "alias bomb": (bomb, [], "holds more than 10,000 values"),
        "deep nesting": (deep, [], "nested deeper than 32 levels"),
        "deep --set": (good, ["settings.x=" + "[" * 5000 + "]" * 5000], "nested deeper than 32 levels"),
        "10^7 frames": (good, ["frames=1-10000000"], "names 10,000,000 frames; at most 1,000,000"),
        "10^9 frames": (good, ["frames=1-1000000000"], "names 1,000,000,000 frames; at most 1,000,000"),
        "huge priority in the file": (priority, [], "whole number from -1000000 to 1000000"),
        "huge priority by --set": (good, [f"priority={10**30}"], "whole number from -1000000 to 1000000"),
    }


CASES = ["alias bomb", "deep nesting", "deep --set", "10^7 frames", "10^9 frames", "huge priority in the file",
         "huge priority by --set"]


def one_line_error(result) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("farm: error: "), result.stderr[-2000:]
    assert len(lines[0]) < 400, f"{len(lines[0])} characters"
    return lines[0]


# -- profiles on the command line ------------------------------------------------------------------


@pytest.mark.parametrize("command", ["plan", "run"])
@pytest.mark.parametrize("case", CASES)
def test_a_hostile_profile_is_refused_in_one_line_before_it_is_expanded(farm, farm_env, command, case):
    profile, overrides, expected = hostile_profiles(farm_env["tmp"] / "p")[case]
    args = [command, profile, *[item for o in overrides for item in ("--set", o)]]
    if command == "run":
        args += ["-o", farm_env["tmp"] / "out"]
    error = one_line_error(farm(*args, timeout=120))
    assert expected in error


def test_a_50_mb_profile_is_refused_by_its_size(farm, farm_env):
    big = farm_env["tmp"] / "big.yaml"
    with open(big, "w") as handle:
        handle.write("name: big\nprocessor: command\nsettings: {command: [echo, x]}\ndescription: ")
        handle.write("x" * (50 * MiB))
    error = one_line_error(farm("plan", big, timeout=120))
    assert f"{big}: a profile is at most 1,048,576 bytes" in error


def test_a_profile_of_many_plain_values_is_refused_before_it_is_composed(farm, farm_env):
    many = farm_env["tmp"] / "many.yaml"
    many.write_text("name: many\nprocessor: command\nsettings: {command: [echo, x]}\nrequires:\n"
                    + "".join(f"  k{i}: v\n" for i in range(20000)))
    assert "holds more than 10,000 values" in one_line_error(farm("plan", many))


@pytest.mark.slow
def test_the_limits_are_set_in_farm_yaml(farm, farm_env):
    profile, _, _ = hostile_profiles(farm_env["tmp"] / "p")["10^7 frames"]
    data = yaml.safe_load(farm_env["config"].read_text())
    data["limits"] = {"frames": 100, "depth": 4}
    farm_env["config"].write_text(yaml.safe_dump(data))
    result = farm("plan", profile, "--set", "frames=1-100", "--set", "segment.frames=50", "--json")
    assert result.returncode == 0, result.stderr
    assert len(result.json()["jobs"][0]["segments"]) == 2
    error = one_line_error(farm("plan", profile, "--set", "frames=1-50,60-110"))
    assert "names 101 frames; at most 100 are allowed (limits.frames in farm.yaml)" in error
    error = one_line_error(farm("plan", profile, "--set", "settings.x=[[[[[1]]]]]"))
    assert "nested deeper than 4 levels" in error


# -- the API ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def controller(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("limits"))
    c.start_controller()
    bundle = Bundle.load(c.bundles / "node.yaml")
    c.ssl = bundle.client_ssl_context()
    c.http = httpx.Client(base_url=c.url, verify=c.ssl, timeout=120,
                          headers={"Authorization": f"Bearer {c.token}"})
    c.anonymous = httpx.Client(base_url=c.url, verify=c.ssl, timeout=120)
    yield c
    c.http.close()
    c.anonymous.close()
    c.stop()


class PeakRss:
    """The highest resident memory of a process while the block runs, sampled often."""

    def __init__(self, pid: int):
        self.process = psutil.Process(pid)
        self.peak = self.start = self.process.memory_info().rss
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def stream(total: int, chunk: int = MiB):
    block = b"\x00garbage" * (chunk // 8)
    for _ in range(total // chunk):
        yield block


@pytest.mark.slow
def test_a_400_mb_body_without_a_token_is_refused_unread(controller):
    c = controller
    with PeakRss(c.controller.pid) as rss:
        for headers in ({}, {"Content-Length": str(400 * MiB)}):
            try:
                response = c.anonymous.post("/api/batches", content=stream(400 * MiB), headers=headers)
            except httpx.HTTPError as exc:  # the controller may hang up on the rest of the body
                pytest.fail(f"no answer to a 400 MB body without a token: {exc!r}")
            assert response.status_code in (401, 413), response.text
            assert "error" in response.json()
    grown = (rss.peak - rss.start) / MiB
    print(f"controller RSS {rss.start / MiB:.0f} MB -> peak {rss.peak / MiB:.0f} MB (+{grown:.1f} MB) "
          "over two 400 MB bodies without a token")
    assert grown < 20, f"the controller's memory grew by {grown:.0f} MB"


@pytest.mark.slow
@pytest.mark.parametrize("body", [b"\x00\xff garbage {", b"", b'{"profile": "frames-png"}', b"[" * 100000])
def test_without_a_token_every_body_gets_401(controller, body):
    for path in ("/api/batches", "/api/jobs/x-1/priority", "/api/nodes"):
        response = controller.anonymous.post(path, content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 401, (path, response.status_code, response.text)
        assert "token" in response.json()["error"]


@pytest.mark.slow
def test_a_refusal_hangs_up_only_on_a_body_left_unread(controller):
    # a client polling without a token is refused on the same connection, not a new TLS
    # handshake each time; one that sent a body is hung up on rather than read to its end
    for _ in range(2):
        polled = controller.anonymous.get("/api/jobs")
        assert polled.status_code == 401 and polled.headers.get("connection") != "close"
    posted = controller.anonymous.post("/api/batches", content=b'{"profile": "x"}',
                                       headers={"Content-Type": "application/json"})
    assert posted.status_code == 401 and posted.headers.get("connection") == "close"


@pytest.mark.slow
def test_an_oversize_body_with_a_token_gets_413(controller):
    c = controller
    body = b'{"profile": "' + b"x" * (2 * MiB) + b'"}'
    response = c.http.post("/api/batches", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 413, response.text
    assert "larger than 1,048,576 bytes" in response.json()["error"]
    # chunked: no Content-Length, counted as it comes
    response = c.http.post("/api/batches", content=stream(64 * MiB), headers={"Content-Type": "application/json"})
    assert response.status_code == 413, response.text
    # a body within the limit is read as before, whole or chunked
    response = c.http.post("/api/batches", json={"profile": "no-such-profile-here"})
    assert response.status_code == 400 and "unknown profile" in response.json()["error"]
    chunks = iter([b'{"profile": ', b'"no-such-profile-here"}'])
    response = c.http.post("/api/batches", content=chunks, headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and "unknown profile" in response.json()["error"], response.text


@pytest.mark.slow
def test_public_pages_stay_public(controller):
    for path in ("/", "/web/monitor.js", "/web/monitor.css", "/openapi.json", "/docs", "/web/api.js"):
        assert controller.anonymous.get(path).status_code == 200, path


@pytest.mark.slow
def test_hostile_profiles_through_the_api_are_refused_and_others_are_served_meanwhile(controller):
    c = controller
    profiles = hostile_profiles(c.root / "hostile")
    waits: list[float] = []
    refused: dict[str, float] = {}
    done = threading.Event()

    def other_client() -> None:
        with httpx.Client(base_url=c.url, verify=c.ssl, timeout=60, headers=c.http.headers) as other:
            while not done.is_set():
                started = time.monotonic()
                assert other.get("/api/cluster").status_code == 200
                waits.append(time.monotonic() - started)

    watcher = threading.Thread(target=other_client, daemon=True)
    watcher.start()
    try:
        for case, (profile, overrides, expected) in profiles.items():
            started = time.monotonic()
            response = c.http.post("/api/batches", json={"profile": str(profile), "overrides": overrides,
                                                         "destination": str(c.root / "out")})
            assert 400 <= response.status_code < 500, (case, response.status_code, response.text[:500])
            error = response.json()["error"]
            assert expected in error and len(error) < 400, (case, error[:500])
            refused[case] = time.monotonic() - started
        response = c.http.post("/api/batches", json={"profile": str(profiles["alias bomb"][0].parent / "frames.yaml"),
                                                     "priority": 10**30, "destination": str(c.root / "out")})
        assert response.status_code == 400 and "from -1000000 to 1000000" in response.json()["error"], response.text
        response = c.http.post("/api/jobs/x-1/priority", json={"priority": 10**30})
        assert response.status_code == 422 and "from -1000000 to 1000000" in response.json()["error"], response.text
    finally:
        done.set()
        watcher.join()
    print("refused in: " + ", ".join(f"{case} {seconds:.2f} s" for case, seconds in refused.items()))
    print(f"another client meanwhile: {len(waits)} requests, slowest {max(waits):.2f} s")
    assert waits and max(waits) < 1.0, f"another client waited {max(waits):.1f} s"


# -- secrets ----------------------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.slow
def test_the_state_folder_and_the_store_are_private(controller):
    state = controller.root / "state"
    controller.http.post("/api/batches", json={"profile": "no-such-profile-here"})  # the store is open and used
    assert mode(state) == 0o700
    files = [state / name for name in ("farm.db", "farm.db-wal", "farm.db-shm")]
    assert all(path.exists() for path in files), os.listdir(state)
    assert {path.name: oct(mode(path)) for path in files} == {path.name: "0o600" for path in files}


def test_an_old_world_readable_store_is_made_private(farm, farm_env):
    import sqlite3

    farm_env["state"].mkdir(mode=0o755)
    sqlite3.connect(farm_env["state"] / "farm.db").close()
    os.chmod(farm_env["state"] / "farm.db", 0o644)
    result = farm("status")
    assert result.returncode == 0, result.stderr
    assert mode(farm_env["state"] / "farm.db") == 0o600
    assert mode(farm_env["state"]) == 0o755  # a folder Farm did not make keeps its mode


def test_cluster_init_refuses_a_folder_that_is_not_empty(farm, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir(mode=0o755)
    os.chmod(folder, 0o755)
    (folder / "notes.txt").write_text("mine")
    error = one_line_error(farm("cluster", "init", "studio", "--dir", folder))
    assert f"{folder} is not empty" in error
    assert os.listdir(folder) == ["notes.txt"] and mode(folder) == 0o755


@pytest.mark.slow
def test_cluster_init_into_an_empty_folder_leaves_its_mode_and_a_new_one_is_private(farm, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    os.chmod(empty, 0o755)
    result = farm("cluster", "init", "studio", "--dir", empty)
    assert result.returncode == 0, result.stderr
    assert mode(empty) == 0o755
    assert {p.name: mode(p) for p in empty.iterdir()} == {"controller.yaml": 0o600, "node.yaml": 0o600, "ca.key": 0o600,
                                                      "admin.yaml": 0o600, "tokens.yaml": 0o600, ".tokens.yaml.lock": 0o600}
    new = tmp_path / "new" / "cluster"
    assert farm("cluster", "init", "studio", "--dir", new).returncode == 0
    assert mode(new) == 0o700


@pytest.mark.slow
def test_the_docs_page_refers_to_no_other_host(controller):
    c = controller
    page = c.anonymous.get("/docs")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    references = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)""", page.text)
    assert references and all(ref.startswith("/") and not ref.startswith("//") for ref in references), references
    for ref in references:
        asset = c.anonymous.get(ref)
        assert asset.status_code == 200, ref
        if not ref.endswith(".json"):
            assert not re.search(r"https?:|//cdn|unpkg|jsdelivr", asset.text), ref
    assert c.anonymous.get("/redoc").status_code == 404
    assert "/api/batches" in c.anonymous.get("/openapi.json").json()["paths"]


@pytest.mark.slow
def test_the_docs_page_draws_the_routes_in_a_browser_from_this_controller_alone(controller):
    import shutil

    playwright_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).exists():
        pytest.skip(f"no chromium at {chromium}: ./setup installs Debian's chromium (as root)")
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_context(ignore_https_errors=True).new_page()
            requested: list[str] = []
            page.on("request", lambda request: requested.append(request.url))
            page.goto(f"{controller.url}/docs")
            page.wait_for_selector("details.route")
            routes = page.locator("details.route summary").all_inner_texts()
        finally:
            browser.close()
    assert any("/api/batches" in route for route in routes), routes
    assert requested and all(url.startswith(controller.url + "/") for url in requested), requested
