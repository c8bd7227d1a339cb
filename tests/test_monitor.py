"""The Batch Monitor: every API route with good and bad payloads, the live event stream,
schemathesis against the OpenAPI spec, and the page in a real browser (Debian's chromium
driven by Playwright). One controller and one node serve the whole module."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import httpx
import pytest
import yaml

from farm.attemptfiles import image_size
from farm.credentials import ClientFile
from tests.cluster_helpers import FARM, Cluster
from tests.conftest import ROOT, write_config, write_profile
from tests.test_cluster import work_profile

pytestmark = pytest.mark.slow
ARTIFACTS = ROOT / "test-artifacts" / "monitor"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SCENE = ROOT / "examples" / "povray" / "bouncing.pov"

# Writes its frame only once the flag file exists: a job that fails until someone fixes it.
FLAKY = """
import pathlib, sys
out, frame, flag = pathlib.Path(sys.argv[1]), int(sys.argv[2]), pathlib.Path(sys.argv[3])
if not flag.exists():
    sys.exit(f"frame {frame}: the flag file {flag} is missing")
(out / f"frame_{frame:04d}.txt").write_text(str(frame))
"""


@pytest.fixture(scope="module")
def farm_cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("monitor"))
    c.start_controller()
    c.start_node("alpha", "--slots", "2")
    c.wait_for_nodes("alpha")
    bundle = ClientFile.load(c.bundles / "admin.yaml")
    client = httpx.Client(base_url=c.url, verify=bundle.client_ssl_context(), timeout=60,
                          headers={"Authorization": f"Bearer {bundle.token}"})
    c.http, c.token = client, bundle.token
    yield c
    client.close()
    c.stop()


def submit(c: Cluster, profile: Path, dest: str = "out", **extra) -> dict:
    response = c.http.post("/api/batches", json={"profile": str(profile), "destination": str(c.root / dest), **extra})
    assert response.status_code == 201, response.text
    return response.json()


def wait_for(c: Cluster, job_id: str, *states: str, timeout: float = 120) -> dict:
    return c.wait_until(lambda: (d := c.http.get(f"/api/jobs/{job_id}").json())["state"] in states and d,
                        timeout, f"job {job_id} to be {' or '.join(states)}")


def flaky_profile(c: Cluster, frames: str, flag: Path) -> Path:
    script = c.root / "flaky.py"
    script.write_text(textwrap.dedent(FLAKY))
    return write_profile(c.root, "flaky", {
        "processor": "command", "frames": frames, "segment": {"frames": 1}, "retries": 0,
        "settings": {"command": [sys.executable, str(script), "{output_dir}", "{start}", str(flag)],
                     "expect": ["frame_{frame:04d}.txt"]},
    })


# Holds its frame until the gate file exists: a job that is surely running when steered.
HELD = """
import pathlib, sys, time
out, frame, gate = pathlib.Path(sys.argv[1]), int(sys.argv[2]), pathlib.Path(sys.argv[3])
while not gate.exists():
    time.sleep(0.05)
(out / f"frame_{frame:04d}.txt").write_text(str(frame))
"""


def held_profile(c: Cluster, frames: str, gate: Path) -> Path:
    script = c.root / "held.py"
    script.write_text(HELD)
    gate.parent.mkdir(parents=True, exist_ok=True)
    return write_profile(c.root, "held", {
        "processor": "command", "frames": frames, "segment": {"frames": 1},
        "settings": {"command": [sys.executable, str(script), "{output_dir}", "{start}", str(gate)],
                     "expect": ["frame_{frame:04d}.txt"]},
        "sandbox": {"read": [str(gate.parent)]},
    })


def test_a_batch_its_jobs_segments_attempts_logs_and_events(farm_cluster):
    c = farm_cluster
    submitted = submit(c, work_profile(c, "1-6", 0.1), dest="out-basic")
    job_id = submitted["jobs"][0]["id"]
    # the node may have taken it (or even finished it) before the answer was written
    assert submitted["jobs"][0]["segments"] == 6
    assert submitted["jobs"][0]["state"] in ("queued", "running", "assembling", "done")
    job = wait_for(c, job_id, "done")
    assert job["segments_done"] == 6 and len(job["outputs"]) == 6
    attempts = [a for seg in job["segment_list"] for a in seg["attempts"]]
    assert len(attempts) == 6
    assert all(a["node"] == "alpha" and a["state"] == "done" and a["exit_status"] == 0 and a["ended"] >= a["started"]
               for a in attempts)

    [batch] = [b for b in c.http.get("/api/batches").json() if b["id"] == submitted["batch"]]
    assert (batch["state"], batch["segments"], batch["segments_done"], batch["progress"]) == ("done", 6, 6, 1.0)
    assert batch["jobs_by_state"] == {"done": 1} and batch["eta_seconds"] is None
    detail = c.http.get(f"/api/batches/{submitted['batch']}").json()
    assert [j["id"] for j in detail["job_list"]] == [job_id]
    assert [j["id"] for j in c.http.get("/api/jobs", params={"batch": submitted["batch"]}).json()] == [job_id]
    assert job_id in [j["id"] for j in c.http.get("/api/jobs", params={"state": "done"}).json()]

    log = c.http.get(f"/api/attempts/{attempts[0]['id']}/log").json()
    assert log["node"] == "alpha" and "=== finished: exit status 0" in log["log"]
    kinds = [e["kind"] for e in c.http.get("/api/events", params={"job": job_id}).json()]
    assert kinds[0] == "job_running" and kinds[-1] == "job_done" and "job_assembling" in kinds


@pytest.mark.parametrize("method, path, body, status, message", [
    ("POST", "/api/batches", {}, 422, "body.profile: Field required"),
    ("POST", "/api/batches", {"profile": "no-such-profile"}, 400, "no-such-profile"),
    ("POST", "/api/batches", {"profile": "frames-png", "colour": "red"}, 422, "body.colour: Extra inputs"),
    ("POST", "/api/batches", {"profile": "frames-png", "inputs": "one"}, 422, "body.inputs"),
    ("POST", "/api/batches", {"profile": "frames-png", "priority": "urgent"}, 400, "priority"),
    ("GET", "/api/jobs/j-none", None, 404, "no job 'j-none'"),
    ("GET", "/api/batches/b-none", None, 404, "no batch 'b-none'"),
    ("POST", "/api/batches/b-none/cancel", None, 404, "no batch 'b-none'"),
    ("GET", "/api/attempts/a-none/log", None, 404, "no attempt 'a-none'"),
    ("POST", "/api/jobs/j-none/cancel", None, 404, "no job"),
    ("POST", "/api/jobs/j-none/pause", None, 404, "no job"),
    ("POST", "/api/jobs/j-none/retry", {"segments": "some"}, 422, "body.segments"),
    ("POST", "/api/jobs/j-none/priority", {"priority": "urgent"}, 422, "expected high, normal, low or a whole number"),
    ("GET", "/api/events?after=-1", None, 422, "query.after"),
    ("GET", "/api/no-such-route", None, 404, "no such route"),
    ("POST", f"/api/nodes/{'n' * 201}/pause", None, 400, "1 to 200 characters"),
])
def test_bad_requests_get_a_json_error_a_person_can_act_on(farm_cluster, method, path, body, status, message):
    response = farm_cluster.http.request(method, path, json=body)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


def test_actions_on_a_finished_job_are_refused_with_its_state(farm_cluster):
    c = farm_cluster
    job_id = submit(c, work_profile(c, "1", 0.0), dest="out-finished")["jobs"][0]["id"]
    wait_for(c, job_id, "done")
    for action, body in [("cancel", None), ("pause", None), ("resume", None), ("retry", None),
                         ("priority", {"priority": "high"})]:
        response = c.http.post(f"/api/jobs/{job_id}/{action}", json=body)
        assert response.status_code == 409, (action, response.text)
        assert f"job {job_id} is" in response.json()["error"] and "done" in response.json()["error"]


@pytest.mark.parametrize("field, value, expected", [
    ("profile", "~\u0006\u0085\ud94b\udc21", "but there is no user"),  # found by schemathesis: was a 500
    ("profile", "p-\ud94b", "valid string"),
    ("destination", "out-\ud800", "valid string"),
    ("inputs", ["in-\ud800.mov"], "lone UTF-16 surrogates"),
    ("destination", "~nosuchuser/out", "no user 'nosuchuser'"),
])
def test_names_no_file_system_can_hold_are_refused_by_name(farm_cluster, field, value, expected):
    c = farm_cluster
    takes_inputs = write_profile(c.root, "each-input", {
        "processor": "command", "frames": "1", "settings": {"command": [sys.executable, "-c", "pass", "{input}"]}})
    profile = takes_inputs if field == "inputs" else work_profile(c, "1", 0.0)
    body = {"profile": str(profile), "destination": str(c.root / "out-odd"), field: value}
    # the surrogates go over the wire as JSON escapes, the way a browser or a fuzzer sends them
    response = c.http.post("/api/batches", content=json.dumps(body, ensure_ascii=True),
                           headers={"Content-Type": "application/json"})
    assert response.status_code in (400, 422), response.text
    error = response.json()["error"]
    assert expected in error and (field.rstrip("s") in error), error


def test_pause_resume_and_priority_steer_the_queue(farm_cluster):
    c = farm_cluster
    assert c.http.post("/api/nodes/alpha/pause").json() == {"node": "alpha", "paused": True}
    c.wait_until(lambda: c.http.get("/api/nodes").json()[0]["state"] == "paused", 60, "alpha to show paused")
    held = submit(c, work_profile(c, "1-4", 0.1), dest="out-held")["jobs"][0]["id"]
    urgent = submit(c, work_profile(c, "1-4", 0.1), dest="out-urgent")["jobs"][0]["id"]
    assert c.http.post(f"/api/jobs/{held}/pause").json()["state"] == "paused"
    assert c.http.post(f"/api/jobs/{urgent}/priority", json={"priority": "high"}).json()["priority"] == 10
    assert c.http.post("/api/nodes/alpha/resume").json()["paused"] is False

    wait_for(c, urgent, "done")
    held_now = c.http.get(f"/api/jobs/{held}").json()
    assert held_now["state"] == "paused" and held_now["segments_done"] == 0
    assert c.http.get(f"/api/jobs/{urgent}").json()["priority"] == 10
    assert c.http.post(f"/api/jobs/{held}/resume").json()["state"] == "queued"
    assert wait_for(c, held, "done")["segments_done"] == 4
    kinds = [e["kind"] for e in c.http.get("/api/events", params={"job": held}).json()]
    assert kinds.index("job_paused") < kinds.index("job_queued") < kinds.index("job_done")


def test_the_cli_pauses_resumes_reprioritises_and_retries_a_job(farm_cluster):
    c = farm_cluster
    assert c.farm("pause-node", "alpha").returncode == 0
    try:
        job_id = submit(c, work_profile(c, "1-3", 0.0), dest="out-cli")["jobs"][0]["id"]
        paused = c.farm("pause", job_id)
        assert paused.returncode == 0 and f"job {job_id} paused" in paused.stdout
        assert c.job(job_id)["state"] == "paused"
        assert c.farm("priority", job_id, "high").stdout.strip() == f"job {job_id} priority 10"
        refused = c.farm("priority", job_id, "urgent")
        assert refused.returncode == 2 and "expected high, normal, low or a whole number" in refused.stderr
        assert c.farm("resume", job_id).stdout.strip() == f"job {job_id} queued"
    finally:
        c.farm("resume-node", "alpha")
    wait_for(c, job_id, "done")
    again = c.farm("retry", job_id, "--all")
    assert again.returncode == 2 and f"job {job_id} is done" in again.stderr


def test_retry_only_the_failed_segments_or_the_whole_job(farm_cluster):
    c = farm_cluster
    flag = c.root / "flag"
    job_id = submit(c, flaky_profile(c, "1-3", flag), dest="out-flaky")["jobs"][0]["id"]
    failed = wait_for(c, job_id, "failed")
    assert "the flag file" in failed["error"] and "is missing" in failed["error"]

    flag.write_text("fixed")
    assert c.http.post(f"/api/jobs/{job_id}/retry", json={"segments": "failed"}).json()["segments_queued"] >= 1
    done = wait_for(c, job_id, "done")
    assert done["segments_done"] == 3 and sorted(Path(p).name for p in done["outputs"]) == [
        "frame_0001.txt", "frame_0002.txt", "frame_0003.txt"]

    gate = c.root / "gates" / "retry-all"
    cancelled = submit(c, held_profile(c, "1-8", gate), dest="out-again")["jobs"][0]["id"]
    wait_for(c, cancelled, "running")  # its segments are held: it cannot end before the cancel
    batch_id = c.http.get(f"/api/jobs/{cancelled}").json()["batch"]
    assert c.http.post(f"/api/batches/{batch_id}/cancel").json() == {
        "batch": batch_id, "cancel": "requested", "jobs": [cancelled]}
    wait_for(c, cancelled, "cancelled")
    assert c.http.post(f"/api/batches/{batch_id}/cancel").json()["cancel"] == "nothing left to cancel"
    gate.touch()
    assert c.http.post(f"/api/jobs/{cancelled}/retry", json={"segments": "all"}).json()["segments_queued"] == 8
    again = wait_for(c, cancelled, "done", timeout=180)
    assert again["segments_done"] == 8 and len(again["outputs"]) == 8


def test_the_event_stream_pushes_each_change_and_resumes_after_a_reconnect(farm_cluster):
    c = farm_cluster
    received: list[dict] = []
    opened = threading.Event()

    def listen() -> None:
        with c.http.stream("GET", "/api/events/stream", timeout=httpx.Timeout(60, read=30)) as stream:
            opened.set()
            for line in stream.iter_lines():
                if line.startswith("data: "):
                    received.append(json.loads(line[6:]))
                    if received[-1]["kind"] == "job_done":
                        return

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    assert opened.wait(30)
    job_id = submit(c, work_profile(c, "1-3", 0.1), dest="out-stream")["jobs"][0]["id"]
    listener.join(60)
    mine = [e for e in received if e.get("job") == job_id]
    assert [e["kind"] for e in received if e["kind"] == "batch_submitted"] == ["batch_submitted"]
    assert sum(e["kind"] == "segment_started" for e in mine) == 3
    assert [e["segments_done"] for e in mine if e["kind"] == "segment_done"] == [1, 2, 3]
    assert mine[-1]["kind"] == "job_done" and mine[-1]["state"] == "done"
    ids = [e["id"] for e in received]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)

    # a client that reconnects with Last-Event-ID gets exactly what came after it
    middle = mine[len(mine) // 2]["id"]
    with c.http.stream("GET", "/api/events/stream", headers={"Last-Event-ID": str(middle)}) as stream:
        replay = []
        for line in stream.iter_lines():
            if line.startswith("data: "):
                replay.append(json.loads(line[6:]))
                if replay[-1]["id"] >= mine[-1]["id"]:
                    break
    assert replay[0]["id"] == middle + 1 and replay[-1]["kind"] == "job_done"


def test_nodes_show_their_slots_load_state_and_capabilities(farm_cluster):
    c = farm_cluster
    [alpha] = c.http.get("/api/nodes").json()
    assert alpha["name"] == "alpha" and alpha["slots"] == 2 and alpha["state"] in ("idle", "busy")
    assert "processor:command" in alpha["capabilities"] and "ffmpeg" in alpha["capabilities"]
    job_id = submit(c, work_profile(c, "1-4", 1.5), dest="out-load")["jobs"][0]["id"]
    # the node is shared by this module's tests: a segment of another test's cancelled job may
    # still be ending on it, so the node is judged by this job's segments
    def busy_with_the_job() -> dict | None:
        node = c.http.get("/api/nodes").json()[0]
        return node if sum(s.startswith(job_id) for s in node["segments"]) >= 2 else None

    busy = c.wait_until(busy_with_the_job, 60, "alpha busy with the job")
    mine = [s for s in busy["segments"] if s.startswith(job_id)]
    assert busy["state"] == "busy" and len(set(mine)) == len(mine)
    assert set(mine) <= {s["id"] for s in c.http.get(f"/api/jobs/{job_id}").json()["segment_list"]}
    wait_for(c, job_id, "done")


@pytest.mark.parametrize("role", ["admin", "submit", None])
def test_the_api_answers_no_500_and_matches_its_schema_under_schemathesis(tmp_path, role):
    # a controller of its own, with no node: what the fuzzer submits, pauses and re-prioritises
    # stays there and never holds up the other tests. A submit token meets 403s, no token 401s:
    # neither may ever become a 500.
    c = Cluster(tmp_path / "fuzzed")
    try:
        c.start_controller()
        token = c.token if role == "admin" else \
            yaml.safe_load(c.add_token("fuzzer", role).read_text())["token"] if role else None
        schemathesis = Path(sys.executable).parent / "schemathesis"
        # Farm's clients pin the cluster's CA without checking host names (nodes move between
        # addresses); schemathesis can only do both or neither.
        result = subprocess.run(
            [str(schemathesis), "run", f"{c.url}/openapi.json", "--tls-verify", "false",
             *(["-H", f"Authorization: Bearer {token}"] if token else []),
             "--checks", "not_a_server_error,response_schema_conformance",
             # every operation keeps its schema-derived coverage cases; the random part is
             # fewer examples per operation, from a fixed seed (the same cases on every run)
             "--max-examples", "20" if role == "admin" else "8", "--seed", "19",
             # without a token every operation answers 401 before it reads its input: the
             # schema-derived coverage cases would only repeat that 401 some 400 times
             *(["--phases", "examples,fuzzing,stateful"] if role is None else []),
             "--exclude-path", "/api/events/stream",
             "--request-timeout", "30", "--suppress-health-check", "all", "--no-color"],
            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    finally:
        c.stop()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / f"schemathesis-{role or 'no-token'}.txt").write_text(
        result.stdout.replace(token, "TOKEN") if token else result.stdout)
    summary = result.stdout[-8000:]
    assert result.returncode == 0, summary
    assert "No issues found" in summary or "passed" in summary, summary


# -- the page, in a real browser ----------------------------------------------------------------


@pytest.fixture
def browser():
    playwright_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no chromium at {CHROMIUM}: ./setup installs Debian's chromium (as root)")
    with playwright_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        yield chromium
        chromium.close()


def progress_of(page, batch_id: str) -> int:
    return int(page.locator(f"#batch-{batch_id} .head [role=progressbar]").get_attribute("aria-valuenow"))


def test_the_page_follows_a_batch_and_cancels_it_with_the_button(farm_cluster, browser):
    c = farm_cluster
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 800})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{c.url}/#token={c.token}")
    page.wait_for_selector("#live[data-state=live]", timeout=20000)
    assert "token=" not in page.url  # the token does not stay in the address bar or history

    batch = submit(c, work_profile(c, "1-60", 0.4), dest="out-page")
    job_id = batch["jobs"][0]["id"]
    head = page.locator(f"#batch-{batch['batch']} .head")
    head.wait_for(timeout=20000)
    page.wait_for_function(f"document.querySelector('#batch-{batch['batch']} [role=progressbar]')"
                           ".getAttribute('aria-valuenow') > 0", timeout=30000)
    first = progress_of(page, batch["batch"])
    page.wait_for_function(f"document.querySelector('#batch-{batch['batch']} [role=progressbar]')"
                           f".getAttribute('aria-valuenow') > {first}", timeout=30000)
    assert progress_of(page, batch["batch"]) > first  # it moves without a reload
    assert "ETA" in head.inner_text()
    page.screenshot(path=str(ARTIFACTS / "running-1280x800.png"), full_page=True)

    head.click()
    row = page.locator(f"tr[data-job='{job_id}']")
    row.click()
    page.locator(".lane[data-lane=alpha] .seg").first.wait_for(timeout=20000)
    page.locator(".lane[data-lane=alpha] .seg[data-state=done]").first.click()
    page.wait_for_selector("#log:not([hidden])")
    assert "=== finished: exit status 0" in page.locator("#log").inner_text()

    row.locator("button.cancel").click()
    assert page.locator("#confirm").is_visible()
    page.locator("#confirm-yes").click()
    page.wait_for_selector(f"tr[data-job='{job_id}'] .pill[data-state=cancelled]", timeout=30000)
    page.wait_for_selector(f"#batch-{batch['batch']} .head .pill[data-state=cancelled]", timeout=10000)
    assert c.http.get(f"/api/jobs/{job_id}").json()["state"] == "cancelled"
    page.screenshot(path=str(ARTIFACTS / "cancelled-1280x800.png"), full_page=True)

    phone = browser.new_context(ignore_https_errors=True, viewport={"width": 390, "height": 844})
    small = phone.new_page()
    small.goto(f"{c.url}/#token={c.token}")
    small.wait_for_selector(f"#batch-{batch['batch']}", timeout=20000)
    assert small.evaluate("document.documentElement.scrollWidth") <= 390  # nothing runs off the screen
    small.screenshot(path=str(ARTIFACTS / "phone-390x844.png"), full_page=True)
    phone.close()
    context.close()
    assert not errors, errors


def test_the_page_asks_for_the_token_and_refuses_a_wrong_one(farm_cluster, browser):
    context = browser.new_context(ignore_https_errors=True)
    page = context.new_page()
    page.goto(farm_cluster.url + "/")
    page.wait_for_selector("#login:not([hidden])")
    page.fill("#token", "not-the-token")
    page.click("#login button[type=submit]")
    page.wait_for_selector("#login-error:has-text('refused')")
    assert page.locator("#monitor").is_hidden()
    page.fill("#token", farm_cluster.token)
    page.click("#login button[type=submit]")
    page.wait_for_selector("#live[data-state=live]", timeout=20000)
    context.close()


def test_the_page_draws_the_newest_fifty_batches_and_the_rest_on_request(browser, tmp_path):
    c = Cluster(tmp_path / "many")  # no node: the batches wait, which is all this needs
    try:
        c.start_controller()
        bundle = ClientFile.load(c.bundles / "admin.yaml")
        profile = work_profile(c, "1", 0.0)
        with httpx.Client(base_url=c.url, verify=bundle.client_ssl_context(), timeout=60,
                          headers={"Authorization": f"Bearer {bundle.token}"}) as http:
            # each into its own folder: two batches never claim one output
            made = [http.post("/api/batches", json={"profile": str(profile), "destination": str(c.root / f"o{n}")})
                    .json()["batch"] for n in range(55)]
        page = browser.new_context(ignore_https_errors=True).new_page()
        page.goto(f"{c.url}/#token={bundle.token}")
        page.wait_for_selector("#more-batches", timeout=20000)
        assert page.locator(".batch").count() == 50
        assert page.locator(f"#batch-{made[-1]}").is_visible() and page.locator(f"#batch-{made[0]}").count() == 0
        assert page.locator("#more-batches").inner_text() == "Show older batches (5 more)"
        page.click("#more-batches")
        page.wait_for_selector(f"#batch-{made[0]}")
        assert page.locator(".batch").count() == 55 and page.locator("#more-batches").count() == 0
    finally:
        c.stop()


# -- the terminal: farm monitor and farm status --watch ---------------------------------------


def test_farm_monitor_prints_the_page_address_and_keeps_the_token_out_unless_asked(farm_cluster):
    c = farm_cluster
    plain = c.farm("monitor", "--no-browser")
    assert plain.returncode == 0, plain.stderr
    assert f"Batch Monitor of cluster {c.name}: {c.url}/" in plain.stdout
    assert c.token not in plain.stdout + plain.stderr
    link = c.farm("monitor", "--no-browser", "--link")
    assert f"{c.url}/#token={c.token}" in link.stdout
    assert httpx.get(f"{c.url}/", verify=False).text.count("Batch Monitor") >= 1  # the page it points at

    nowhere = c.farm("monitor", "--no-browser", "--controller", "https://127.0.0.1:9")
    assert nowhere.returncode == 2 and "cannot reach the controller at https://127.0.0.1:9" in nowhere.stderr


def test_status_watch_follows_a_job_live_until_it_ends(farm_cluster):
    c = farm_cluster
    # frames 1-4 wait for one gate, 5-8 for another, opened as the watch shows each stage:
    # the watch must show the job part-done however fast or slow the machine is
    gates = c.root / "watch-gates"
    gates.mkdir()
    script = c.root / "gated.py"
    script.write_text("import pathlib, sys, time\n"
                      "out, frame, gates = pathlib.Path(sys.argv[1]), int(sys.argv[2]), pathlib.Path(sys.argv[3])\n"
                      "while not (gates / ('first' if frame <= 4 else 'second')).exists():\n    time.sleep(0.05)\n"
                      "(out / f'frame_{frame:04d}.txt').write_text(str(frame))\n")
    profile = write_profile(c.root, "gated", {
        "processor": "command", "frames": "1-8", "segment": {"frames": 1},
        "settings": {"command": [sys.executable, str(script), "{output_dir}", "{start}", str(gates)],
                     "expect": ["frame_{frame:04d}.txt"]},
        "sandbox": {"read": [str(gates)]},
    })
    job_id = submit(c, profile, dest="out-watch")["jobs"][0]["id"]
    watch = subprocess.Popen([*FARM, "status", job_id, "--watch"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=c.env, cwd=c.root)
    lines: list[str] = []
    try:
        for line in watch.stdout:
            if not line.startswith(job_id):
                continue
            lines.append(line)
            done = int(line.split()[2].split("/")[0])
            if done == 0:
                (gates / "first").touch()
            elif done == 4:
                (gates / "second").touch()
        assert watch.wait(timeout=120) == 0, watch.stderr.read()
    finally:
        watch.kill() if watch.poll() is None else None
    done_counts = [int(line.split()[2].split("/")[0]) for line in lines]
    assert done_counts == sorted(done_counts) and {0, 4, 8} <= set(done_counts) and done_counts[-1] == 8
    assert lines[-1].split()[1] == "done"

    flag = c.root / "never"
    failing = submit(c, flaky_profile(c, "1", flag), dest="out-watch-fail")["jobs"][0]["id"]
    watched = c.farm("status", failing, "--watch", timeout=120)
    assert watched.returncode == 1
    assert "failed" in watched.stdout.splitlines()[-1] and "is missing" in watched.stdout.splitlines()[-1]


def test_status_watch_reads_a_local_store_without_a_controller(farm, farm_env):
    import os

    script = farm_env["tmp"] / "slow.py"
    script.write_text("import pathlib, sys, time\ntime.sleep(0.4)\n"
                      "pathlib.Path(sys.argv[1], 'f%03d.txt' % int(sys.argv[2])).write_text('x')\n")
    profile = write_profile(farm_env["tmp"], "slow", {
        "processor": "command", "frames": "1-6", "segment": {"frames": 1},
        "settings": {"command": [sys.executable, str(script), "{output_dir}", "{start}"], "expect": ["f{frame:03d}.txt"]},
    })
    env = {k: v for k, v in os.environ.items() if k != "FARM_CONTROLLER"}
    write_config(farm_env, slots=1)
    runner = subprocess.Popen([sys.executable, "-m", "farm.cli", "run", str(profile), "-o", str(farm_env["tmp"] / "o")],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        listed = Cluster.wait_until(lambda: (r := farm("status", "--json")).returncode == 0 and r.json(), 60,
                                    "the job in the store")
        watched = farm("status", listed[0]["id"], "--watch", timeout=120)
    finally:
        runner.wait(timeout=120)
    assert watched.returncode == 0, watched.stderr
    assert watched.stdout.splitlines()[-1].split()[1:3] == ["done", "6/6"]


def listening(pids: set[int]) -> list[str]:
    """host:port of every TCP socket these processes (and their children) listen on."""
    for pid in list(pids):
        children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
        pids |= {int(child) for child in children}
    found = []
    for line in subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout.splitlines():
        owner = re.search(r"pid=(\d+)", line)
        if owner and int(owner.group(1)) in pids:
            found.append(line.split()[3])
    return found


def plain_http(port: int, path: str) -> int | None:
    """The status a plain (not TLS) HTTP request gets, or None when nothing speaks HTTP there."""
    try:
        return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5).status_code
    except httpx.HTTPError:
        return None


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2, which ./setup installs)")
def test_nothing_answers_plain_http_but_dasks_health_check_on_loopback(farm_cluster):
    c = farm_cluster
    sockets = listening({c.controller.pid, c.nodes["alpha"].pid})
    assert any(address.endswith(f":{c.api_port}") for address in sockets), sockets
    plain = []
    for address in sockets:
        host, port = address.rsplit(":", 1)
        if plain_http(int(port), "/health") is None:
            continue  # TLS only (the API, Dask's comms) or nothing at all
        plain.append(address)
        assert host == "127.0.0.1", f"{address} answers plain HTTP beyond loopback"
        for path in ("/info/main/workers.html", "/json/counts.json", "/proxy/8788/127.0.0.1/status"):
            assert plain_http(int(port), path) == 404, (address, path)  # nothing about tasks or workers
    assert plain, "Dask's health check was expected on loopback"


# -- pictures and live logs ----------------------------------------------------------------------


def povray_job(c: Cluster, dest: str) -> tuple[str, str]:
    """A three-frame POV-Ray job of 400x300 frames, one frame a segment: (batch, job)."""
    profile = write_profile(c.root, "shot", {
        "processor": "imageseq", "frames": "1-3", "segment": {"frames": 1},
        "settings": {"renderer": "povray", "output": "shot_####.png", "width": 400, "height": 300},
    })
    submitted = submit(c, profile, dest=dest, inputs=[str(SCENE)])
    return submitted["batch"], submitted["jobs"][0]["id"]


def test_previews_are_served_with_a_token_from_the_store_and_nowhere_else(farm_cluster):
    c = farm_cluster
    _, job_id = povray_job(c, "out-previews")
    wait_for(c, job_id, "done")
    previews = c.http.get(f"/api/jobs/{job_id}/previews").json()
    assert [(p["index"], p["label"], p["node"]) for p in previews] == [
        (0, "frames 1", "alpha"), (1, "frames 2", "alpha"), (2, "frames 3", "alpha")]
    for preview in previews:
        picture = c.http.get(f"/api/attempts/{preview['attempt']}/preview")
        assert picture.status_code == 200 and picture.headers["content-type"] == "image/jpeg"
        assert image_size(picture.content) == ("jpg", 320, 240)
    latest = max(previews, key=lambda p: p["ended"])
    assert c.http.get(f"/api/jobs/{job_id}/preview").content == \
        c.http.get(f"/api/attempts/{latest['attempt']}/preview").content

    anyone = httpx.Client(base_url=c.url, verify=False, timeout=30)
    for path in (f"/api/attempts/{latest['attempt']}/preview", f"/api/jobs/{job_id}/preview",
                 f"/api/jobs/{job_id}/previews"):
        assert anyone.get(path).status_code == 401
        assert anyone.get(path, headers={"Authorization": "Bearer not-the-token"}).status_code == 401
    anyone.close()
    for path, message in [("/api/attempts/a-none/preview", "no attempt 'a-none'"),
                          ("/api/attempts/..%2F..%2Ffarm.db/preview", ""),
                          (f"/api/attempts/{job_id}.s00000/preview", "no attempt"),
                          ("/api/jobs/j-none/preview", "no job 'j-none'")]:
        refused = c.http.get(path)
        assert refused.status_code == 404 and message in refused.json()["error"], (path, refused.text)
    # a job whose processor makes no previews (command) has none, and says so
    plain = submit(c, work_profile(c, "1", 0.0), dest="out-no-previews")["jobs"][0]["id"]
    wait_for(c, plain, "done")
    assert c.http.get(f"/api/jobs/{plain}/previews").json() == []
    assert c.http.get(f"/api/jobs/{plain}/preview").json() == {"error": f"job {plain} has no preview yet"}


MEAN_COLOUR_JS = """(img) => {
    const canvas = document.createElement("canvas");
    canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
    const context = canvas.getContext("2d");
    context.drawImage(img, 0, 0);
    const data = context.getImageData(0, 0, canvas.width, canvas.height).data;
    const sum = [0, 0, 0];
    for (let i = 0; i < data.length; i += 4) { sum[0] += data[i]; sum[1] += data[i + 1]; sum[2] += data[i + 2]; }
    return sum.map((s) => s / (data.length / 4));
}"""


def test_the_page_shows_each_jobs_latest_picture_and_a_strip_of_its_frames(farm_cluster, browser):
    from tests.test_pictures import mean_colour

    c = farm_cluster
    batch_id, job_id = povray_job(c, "out-strip")
    wait_for(c, job_id, "done")
    page = browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 800}).new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{c.url}/#token={c.token}")
    page.wait_for_selector("#live[data-state=live]", timeout=20000)
    page.locator(f"#batch-{batch_id} .head").click()
    thumb = page.locator(f"tr[data-job='{job_id}'] img.thumb")
    thumb.wait_for(timeout=20000)
    page.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=thumb.element_handle(), timeout=20000)

    page.locator(f"tr[data-job='{job_id}']").click()
    page.wait_for_function("document.querySelectorAll('#strip img').length === 3", timeout=20000)
    strip = page.locator("#strip img")
    sizes = [strip.nth(i).evaluate("(img) => img.decode().then(() => [img.naturalWidth, img.naturalHeight])")
             for i in range(3)]
    assert sizes == [[320, 240]] * 3
    assert page.locator("#strip figcaption").all_inner_texts() == ["frames 1", "frames 2", "frames 3"]
    # the strip's pictures are the rendered frames, and the row's is the latest
    for i in range(3):
        shown = strip.nth(i).evaluate(MEAN_COLOUR_JS)
        real = mean_colour(c.root / "out-strip" / f"shot_{i + 1:04d}.png", 320)
        assert all(abs(a - b) < 4 for a, b in zip(real, shown)), (i, real, shown)
    latest = max(c.http.get(f"/api/jobs/{job_id}/previews").json(), key=lambda p: p["ended"])
    latest_shown = page.locator(f"#strip figure[data-attempt='{latest['attempt']}'] img").evaluate(MEAN_COLOUR_JS)
    assert thumb.evaluate(MEAN_COLOUR_JS) == latest_shown
    page.screenshot(path=str(ARTIFACTS / "pictures-1280x800.png"), full_page=True)
    page.context.close()
    assert not errors, errors


# Says a line, then waits for the gate file the test creates, then says another.
GATED = """
import pathlib, sys, time
out, gate = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
print("waiting at the gate", flush=True)
while not gate.exists():
    time.sleep(0.05)
print("through the gate", flush=True)
(out / "f_0001.txt").write_text("1")
"""


def test_the_page_shows_a_running_segments_log_lines_as_it_writes_them(farm_cluster, browser):
    c = farm_cluster
    gate = c.root / "gates" / "log-gate"
    gate.parent.mkdir(parents=True, exist_ok=True)
    script = c.root / "gated.py"
    script.write_text(GATED)
    profile = write_profile(c.root, "gated", {
        "processor": "command", "frames": "1", "segment": {"frames": 1}, "retries": 0,
        "settings": {"command": [sys.executable, str(script), "{output_dir}", str(gate)], "expect": ["f_0001.txt"]},
        "sandbox": {"read": [str(gate.parent)]},
    })
    submitted = submit(c, profile, dest="out-gated")
    batch_id, job_id = submitted["batch"], submitted["jobs"][0]["id"]
    try:
        wait_for(c, job_id, "running")
        page = browser.new_context(ignore_https_errors=True).new_page()
        page.goto(f"{c.url}/#token={c.token}")
        page.wait_for_selector("#live[data-state=live]", timeout=20000)
        page.locator(f"#batch-{batch_id} .head").click()
        page.locator(f"tr[data-job='{job_id}']").click()
        page.locator(".seg[data-state=running]").first.click(timeout=20000)
        page.wait_for_selector("#log:has-text('waiting at the gate')", timeout=30000)
        assert "through the gate" not in page.locator("#log").inner_text()
        assert c.http.get(f"/api/jobs/{job_id}").json()["state"] == "running"  # shown while it runs
    finally:
        gate.touch()
    page.wait_for_selector("#log:has-text('=== finished: exit status 0')", timeout=60000)
    text = page.locator("#log").inner_text()
    assert text.count("waiting at the gate") == 1 and "through the gate" in text
    wait_for(c, job_id, "done")
    page.context.close()
