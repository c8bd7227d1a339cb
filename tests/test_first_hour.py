"""The first hour of a new user (issue 20): a quickcluster that clients on its machine
reach with no options, that takes its node with it however it ends; `farm logs`;
`farm purge`; error messages that blame the right thing."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml

from tests.cluster_helpers import Cluster, FakeClusterAPI, free_port
from tests.conftest import FARM, ROOT, Result, write_profile

EXAMPLE = ROOT / "examples" / "testsrc-frames.yaml"
SMALL = ["--set", "frames=1-4", "--set", "segment.frames=2"]


def clean_env(home: Path) -> dict[str, str]:
    """A new user's environment: no FARM_* variables, nothing in the config dir but what
    Farm itself writes (a private HOME keeps the test off the real one)."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("FARM_", "XDG_", "DASK_"))}
    env["HOME"] = str(home)
    return env


def run(env: dict[str, str], *args: str, cwd: Path, timeout: float = 120) -> Result:
    proc = subprocess.run([*FARM, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    return Result(proc.returncode, proc.stdout, proc.stderr)


class QuickCluster:
    def __init__(self, home: Path):
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        self.env = clean_env(home)
        self.log = home / "quickcluster.log"
        self.proc = subprocess.Popen(
            [*FARM, "quickcluster", "--slots", "2", "--api-port", str(free_port()), "--port", str(free_port())],
            env=self.env, cwd=home, stdout=open(self.log, "w"), stderr=subprocess.STDOUT)

    def farm(self, *args: str, timeout: float = 120) -> Result:
        return run(self.env, *args, cwd=self.home, timeout=timeout)

    def nodes(self) -> list[dict]:
        result = self.farm("nodes", "--json", timeout=60)
        return json.loads(result.stdout) if result.returncode == 0 else []

    def wait_until_ready(self) -> list[dict]:
        def ready():
            assert self.proc.poll() is None, self.log.read_text()
            return [node for node in self.nodes() if node["state"] == "idle"]
        return Cluster.wait_until(ready, 120, "the quickcluster's node, through `farm nodes` with no options")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def quick(tmp_path):
    cluster = QuickCluster(tmp_path / "home")
    yield cluster
    cluster.stop()


@pytest.mark.slow
def test_a_quickcluster_is_reached_with_no_options_and_its_file_goes_with_it(quick, tmp_path):
    nodes = quick.wait_until_ready()
    assert len(nodes) == 1 and nodes[0]["slots"] == 2
    banner = quick.log.read_text()
    name = banner.split()[1].rstrip(":")
    assert name.startswith("quickcluster-") and len(name.rsplit("-", 1)[1]) == 6, banner  # host and a short id
    assert "farm node --bundle node.yaml --controller https://" in banner  # the line for another machine

    out = tmp_path / "out"
    submitted = quick.farm("submit", EXAMPLE, *SMALL, "-o", out, "--wait", "--json")
    assert submitted.returncode == 0, submitted.stderr
    assert sorted(p.name for p in out.iterdir()) == [f"testsrc_{n:04d}.png" for n in range(1, 5)]
    job = submitted.json()["jobs"][0]["id"]
    status = quick.farm("status", job, "--json")
    assert status.returncode == 0, status.stderr
    assert status.json()["state"] == "done"

    script = ("import sys, farm\n"
              "batch = farm.submit(sys.argv[1], destination=sys.argv[2], overrides=sys.argv[3:]).wait(120)\n"
              "print(' '.join(job.state for job in batch.jobs))\n")
    api_out = tmp_path / "api-out"
    api = subprocess.run([sys.executable, "-c", script, str(EXAMPLE), str(api_out), "frames=1-2", "segment.frames=2"],
                         capture_output=True, text=True, env=quick.env, cwd=quick.home, timeout=180)
    assert api.returncode == 0, api.stderr
    assert api.stdout.split() == ["done"]
    assert sorted(p.name for p in api_out.iterdir()) == ["testsrc_0001.png", "testsrc_0002.png"]

    client_file = quick.home / ".config" / "farm" / "quickcluster.yaml"
    assert client_file.exists()
    https = yaml.safe_load(client_file.read_text())["urls"][0]
    plain = quick.farm("nodes", "--controller", https.replace("https://", "http://"))
    assert plain.returncode == 2 and f"use {https}" in plain.stderr, plain.stderr
    quick.stop()
    assert quick.proc.returncode == 0, quick.log.read_text()
    assert not client_file.exists()
    gone = quick.farm("nodes")
    assert gone.returncode == 2 and "no client file" in gone.stderr and "quickcluster" in gone.stderr


@pytest.mark.slow
def test_a_quickcluster_killed_outright_takes_its_node_with_it(quick):
    quick.wait_until_ready()
    family = psutil.Process(quick.proc.pid).children(recursive=True)
    assert any("node" in proc.cmdline() for proc in family)
    quick.proc.kill()
    quick.proc.wait()

    def all_gone() -> bool:
        return not [proc for proc in family if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE]
    Cluster.wait_until(all_gone, 5, "the node and its worker to stop after the quickcluster was SIGKILLed", every=0.1)
    # the client file it left is not taken for a running quickcluster
    left = quick.farm("nodes")
    assert left.returncode == 2 and "no client file" in left.stderr


def test_a_node_without_its_controller_stops_on_sigterm(tmp_path):
    cluster = Cluster(tmp_path / "c")  # never started: the node finds nobody
    node = cluster.start_node("lonely")
    try:
        Cluster.wait_until(lambda: "no controller for cluster" in (cluster.root / "node-lonely.log").read_text(), 60,
                           "the node to look for its controller")
        node.send_signal(signal.SIGTERM)
        node.wait(timeout=5)
    finally:
        cluster.stop()


def test_a_wrong_set_is_blamed_not_the_profile(farm):
    wrong = farm("plan", "h264-web-720p", "--set", "video.crf=18")
    assert wrong.returncode == 2
    assert wrong.stderr.startswith("farm: error: --set video.crf=18: video: unknown key 'video'"), wrong.stderr
    assert "settings.video.crf=18" in wrong.stderr and ".yaml" not in wrong.stderr


# -- farm logs, farm status --limit, farm purge ------------------------------------------

# (no braces: the command processor reads {NAME} in its arguments as placeholders)
TALK = ("import pathlib, sys\n"
        "out, start, count = pathlib.Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])\n"
        "print('said %d-%d' % (start, start + count - 1), flush=True)\n"
        "if start >= int(sys.argv[4]):\n"
        "    import time; time.sleep(600)\n"
        "if start >= int(sys.argv[5]):\n"
        "    sys.exit('frame %d cannot be made' % start)\n"
        "for frame in range(start, start + count):\n"
        "    (out / ('f_%04d.txt' % frame)).write_text(str(frame))\n")


def talk_profile(tmp: Path, name: str, frames: str, *, hang_from: int = 10**6, fail_from: int = 10**6) -> Path:
    return write_profile(tmp, name, {
        "processor": "command", "frames": frames, "segment": {"frames": 2}, "retries": 0,
        "settings": {"command": [sys.executable, "-c", TALK, "{output_dir}", "{start}", "{count}", str(hang_from),
                                 str(fail_from)],
                     "expect": ["f_{frame:04d}.txt"]},
    })


@pytest.mark.slow
def test_farm_logs_shows_the_segments_logs_of_a_farm_run_job(farm, farm_env):
    tmp = farm_env["tmp"]
    ran = farm("run", talk_profile(tmp, "talk", "1-4"), "-o", tmp / "out", "--json", "--quiet")
    assert ran.returncode == 0, ran.stderr
    job = ran.json()["jobs"][0]["id"]

    every = farm("logs", job)
    assert every.returncode == 0, every.stderr
    assert f"==> segment 0 (frames 1-2), attempt {job}.s00000.a1" in every.stdout
    assert "said 1-2" in every.stdout and "said 3-4" in every.stdout
    assert every.stdout.count("exit status 0") >= 2  # the header of each, and the log's own footer

    second = farm("logs", job, "1")
    assert "said 3-4" in second.stdout and "said 1-2" not in second.stdout
    attempt = farm("logs", job, f"{job}.s00000.a1")
    assert "said 1-2" in attempt.stdout and "said 3-4" not in attempt.stdout
    followed = farm("logs", job, "--follow")  # an ended job: everything, then the exit status of the job
    assert followed.returncode == 0 and "said 3-4" in followed.stdout
    missing = farm("logs", job, "7")
    assert missing.returncode == 2 and f"job {job} has no segment or attempt '7'" in missing.stderr


def store_rows(state: Path, sql: str, params: tuple = ()) -> list[tuple]:
    db = sqlite3.connect(state / "farm.db", timeout=30)
    try:
        with db:
            return db.execute(sql, params).fetchall()
    finally:
        db.close()


@pytest.mark.slow
def test_purge_removes_old_finished_jobs_and_nothing_of_unfinished_ones(farm, farm_env):
    tmp, state = farm_env["tmp"], farm_env["state"]
    done = farm("run", talk_profile(tmp, "fine", "1-2"), "-o", tmp / "a", "--json", "--quiet")
    assert done.returncode == 0, done.stderr
    failed = farm("run", talk_profile(tmp, "broken", "1-4", fail_from=3), "-o", tmp / "b", "--json", "--quiet")
    assert failed.returncode == 1, failed.stderr
    done_id, failed_id = done.json()["jobs"][0]["id"], failed.json()["jobs"][0]["id"]
    assert (state / "work" / failed_id).is_dir()  # a failed job keeps its work folder (for `farm retry`)

    hung = subprocess.Popen([*FARM, "run", str(talk_profile(tmp, "hung", "1-4", hang_from=3)), "-o", str(tmp / "c"),
                             "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    Cluster.wait_until(lambda: store_rows(state, "SELECT s.state, COUNT(*) FROM segments s JOIN jobs j ON s.job_id = "
                                                 "j.id WHERE j.profile_name = 'hung' GROUP BY s.state")
                       in ([("done", 1), ("running", 1)],), 120, "the third run's first segment done, second running")
    hung.kill()
    hung.wait()
    [(hung_id,)] = store_rows(state, "SELECT id FROM jobs WHERE profile_name = 'hung'")
    assert farm("status", hung_id, "--json").json()["state"] == "interrupted"
    assert (state / "work" / hung_id).is_dir()

    listed = farm("status", "--limit", "1")
    assert listed.stdout.splitlines()[0].startswith(hung_id) and "2 older job(s) not shown" in listed.stdout
    assert len(farm("status", "--all", "--json").json()) == 3

    # forty days pass
    store_rows(state, "UPDATE jobs SET updated = updated - 40 * 86400")
    assert farm("purge", "--older-than", "60d", "--dry-run", "--json").json()["jobs"] == []
    dry = farm("purge", "--older-than", "30d", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert done_id in dry.stdout and failed_id in dry.stdout and hung_id not in dry.stdout
    assert "would remove 2 job(s)" in dry.stdout
    assert len(farm("status", "--all", "--json").json()) == 3 and (state / "work" / failed_id).is_dir()

    real = farm("purge", "--older-than", "30d", "--json")
    assert real.returncode == 0, real.stderr
    assert sorted(job["id"] for job in real.json()["jobs"]) == sorted([done_id, failed_id])
    assert [job["id"] for job in farm("status", "--all", "--json").json()] == [hung_id]
    assert not (state / "work" / failed_id).exists()
    for table in ("segments", "attempts", "events"):
        assert store_rows(state, f"SELECT COUNT(*) FROM {table} WHERE job_id IN (?, ?)", (done_id, failed_id)) \
            == [(0,)], table
    # the unfinished job is whole: its row, segments, attempts and logs, and its work folder
    detail = farm("status", hung_id, "--json").json()
    assert detail["state"] == "interrupted" and [s["state"] for s in detail["segment_list"]][0] == "done"
    assert "said 1-2" in farm("logs", hung_id, "0").stdout
    assert (state / "work" / hung_id).is_dir()
    assert sorted(p.name for p in (tmp / "a").iterdir()) == ["f_0001.txt", "f_0002.txt"]  # outputs stay


@pytest.mark.slow
def test_a_controller_serves_logs_and_applies_its_retention(tmp_path):
    c = Cluster(tmp_path / "c")
    try:
        ran = c.farm("run", talk_profile(tmp_path, "talk", "1-4"), "-o", tmp_path / "out", "--json", "--quiet",
                     env={"FARM_CONTROLLER": "", "FARM_CLIENT": ""})  # this machine, the controller's store
        assert ran.returncode == 0, ran.stderr
        job = ran.json()["jobs"][0]["id"]
        c.start_controller()
        logs = c.farm("logs", job, "1")  # through the controller's API
        assert logs.returncode == 0, logs.stderr
        assert "said 3-4" in logs.stdout and "said 1-2" not in logs.stdout
        c.stop()

        config = yaml.safe_load(c.config.read_text())
        config["controller"]["retention"] = "30d"
        c.config.write_text(yaml.safe_dump(config))
        store_rows(c.root / "state", "UPDATE jobs SET updated = updated - 40 * 86400")  # forty days pass
        c.start_controller()
        Cluster.wait_until(lambda: c.farm("status", "--all", "--json").json() == [], 60,
                           "the controller to remove the job that ended forty days ago")
    finally:
        c.stop()


def test_a_wrong_retention_is_refused_with_the_key(farm, farm_env):
    farm_env["config"].write_text(yaml.safe_dump({"controller": {"retention": "a month"}}))
    result = farm("doctor")
    assert "farm.yaml: controller.retention: expected an age such as 30d" in result.stdout + result.stderr


class SilentScheduler:
    """The controller's API (its real certificate) naming a scheduler that takes the TCP
    connection and then says nothing: a node joining it waits on the TLS handshake, the
    way a node waits on a controller that went away mid-join."""

    def __init__(self, bundle_path: Path):
        import socket

        from farm.security import Bundle

        self.silent = socket.socket()
        self.silent.bind(("127.0.0.1", 0))
        self.silent.listen(16)  # never accepted: connections wait in the backlog
        with Bundle.load(bundle_path).pem_paths() as files:
            self.api = FakeClusterAPI(f"tls://127.0.0.1:{self.silent.getsockname()[1]}", files["cert"], files["key"])
        self.url = self.api.url

    def close(self):
        self.api.close()
        self.silent.close()


def test_a_node_stuck_joining_stops_within_5_s_of_sigterm(tmp_path):
    cluster = Cluster(tmp_path / "c")
    api = SilentScheduler(cluster.bundles / "controller.yaml")
    cluster.url = api.url
    node = cluster.start_node("stuck")
    try:
        # it has asked the API and is now dialling the scheduler that never answers
        Cluster.wait_until(lambda: any(c.raddr and c.raddr[1] == api.silent.getsockname()[1]
                                       for p in [psutil.Process(node.pid), *psutil.Process(node.pid).children(True)]
                                       for c in p.net_connections(kind="tcp")), 60,
                           "the node to dial the silent scheduler")
        node.send_signal(signal.SIGTERM)
        node.wait(timeout=5)
    finally:
        cluster.stop()
        api.close()


# -- the Batch Monitor names what a batch is, and finds it -------------------------------------


@pytest.mark.slow
def test_the_monitor_names_each_batch_and_filters_by_words_and_state(tmp_path):
    from tests.test_monitor import CHROMIUM

    playwright_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no chromium at {CHROMIUM}")
    c = Cluster(tmp_path / "names")  # no node: the batches wait, which is all this needs
    try:
        c.start_controller()
        client = yaml.safe_load((c.bundles / "admin.yaml").read_text())
        inputs = []
        for name in ("shot01.mov", "shot02.mov"):
            (tmp_path / name).write_text("not really a movie")
            inputs.append(str(tmp_path / name))
        plain = talk_profile(tmp_path, "proofs", "1-2")
        shots = write_profile(tmp_path, "shots-review", {
            "processor": "command", "frames": "1", "segment": {"frames": 1},
            "settings": {"command": [sys.executable, "-c", "print(1)", "{input}", "{output_dir}"]}})
        batches = []
        for submitted in (c.farm("submit", plain, "-o", tmp_path / "o1", "--json"),
                          c.farm("submit", shots, *inputs, "-o", tmp_path / "o2", "--json")):
            assert submitted.returncode == 0, submitted.stderr
            batches.append(submitted.json()["batch"])
        first, second = batches
        for job in json.loads(c.farm("status", "--json").stdout):
            if job["batch"] == second:
                assert c.farm("cancel", job["id"]).returncode == 0

        with playwright_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                "--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking"])
            page = browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 800}).new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"{c.url}/#token={client['token']}")
            page.wait_for_selector(f"#batch-{second} .head .pill[data-state=cancelled]", timeout=30000)
            one, two = page.locator(f"#batch-{first} .head"), page.locator(f"#batch-{second} .head")
            assert one.locator("strong").inner_text().endswith("proofs")
            assert two.locator("strong").inner_text().endswith("shots-review")
            assert "shot01.mov, shot02.mov" in two.inner_text() and "submitted by admin" in two.inner_text()
            assert "no input" in one.inner_text() and f"batch {first}" in one.inner_text()

            def shown() -> list[str]:
                return sorted(page.eval_on_selector_all(".batch", "boxes => boxes.map((b) => b.id.slice(6))"))

            page.fill("#batch-search", "shot02")
            page.wait_for_function("document.querySelectorAll('.batch').length === 1")
            assert shown() == [second]
            page.fill("#batch-search", "PROOFS")
            page.wait_for_function(f"document.querySelector('.batch') && document.querySelector('.batch').id === "
                                   f"'batch-{first}' && document.querySelectorAll('.batch').length === 1")
            page.fill("#batch-search", "")
            page.select_option("#batch-state", "cancelled")
            page.wait_for_function("document.querySelectorAll('.batch').length === 1")
            assert shown() == [second]
            page.select_option("#batch-state", "queued")
            page.wait_for_function(f"document.querySelector('.batch') && document.querySelector('.batch').id === "
                                   f"'batch-{first}'")
            page.fill("#batch-search", "shot")
            page.wait_for_selector("#no-match:not([hidden])")
            assert shown() == []
            browser.close()
            assert not errors, errors
    finally:
        c.stop()
