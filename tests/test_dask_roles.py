"""Dask is not a back door: the node bundle's certificate cannot act as a Dask client,
send a worker code, or pose as the controller. Real controller and node processes, real
Dask TLS; the attacker is plain Dask (no farm code) with the PEMs from node.yaml."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from tests.cluster_helpers import FakeClusterAPI
from tests.test_cluster import cluster, frames_in, work_profile  # noqa: F401 (cluster: the fixture)

pytestmark = pytest.mark.slow

# Plain Dask with a node's certificate, doing what the exploit did. Every call is
# reported, never raised, so the test sees all of them; `fn` leaves a marker if it ever runs.
ATTACK = """
    import asyncio, json, os, sys, pathlib
    from distributed import Client, Security
    from distributed.core import rpc
    from distributed.protocol import pickle
    from distributed.protocol.serialize import ToPickle

    pem, scheduler, worker, markers = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    nannies = json.loads(sys.argv[5])
    security = Security(tls_ca_file=str(pem / "ca.pem"), tls_client_cert=str(pem / "cert.pem"),
                        tls_client_key=str(pem / "key.pem"), require_encryption=True)

    def fn(*_):
        import os, pathlib
        pathlib.Path(markers, f"ran-{os.getpid()}").touch()
        return "ran"

    class Boom:  # runs fn as it is unpickled
        def __reduce__(self):
            return (fn, ())

    report = {}

    def attempt(name, call):
        try:
            report[name] = f"done: {call()!r}"
        except BaseException as exc:
            report[name] = f"refused: {type(exc).__name__}: {exc}"

    client = None
    def open_client():
        global client
        client = Client(scheduler, security=security, timeout=15, set_as_default=False)
        return "opened"
    attempt("client", open_client)
    if client is not None:
        attempt("run", lambda: client.run(fn))
        attempt("run_on_scheduler", lambda: client.run_on_scheduler(fn))
        attempt("submit", lambda: client.submit(fn, pure=False).result(timeout=15))

    async def straight(address, **msg):
        async with rpc(address, connection_args=security.get_connection_args("client"), timeout=15) as remote:
            op = msg.pop("op")
            return await getattr(remote, op)(**msg)

    args = pickle.dumps(()), pickle.dumps({})
    attempt("worker run", lambda: asyncio.run(straight(worker, op="run", function=pickle.dumps(fn), args=args[0],
                                                      kwargs=args[1])))
    attempt("worker pickle", lambda: asyncio.run(straight(worker, op="get_data", keys=[ToPickle(Boom())])))
    for address in nannies:
        attempt(f"nanny run {address}", lambda: asyncio.run(straight(address, op="run", function=pickle.dumps(fn),
                                                                     args=args[0], kwargs=args[1])))
    attempt("scheduler pickle", lambda: asyncio.run(straight(scheduler, op="who_has", keys=[ToPickle(Boom())])))
    attempt("scheduler run_function", lambda: asyncio.run(straight(scheduler, op="run_function",
                                                                   function=pickle.dumps(fn))))
    print(json.dumps(report))
"""


def extract_pems(bundle: Path, folder: Path) -> Path:
    """What an attacker who copied node.yaml does: write its PEMs out for plain Dask."""
    data = yaml.safe_load(bundle.read_text())
    folder.mkdir(mode=0o700)
    for name in ("ca", "cert", "key"):
        (folder / f"{name}.pem").write_text(data[name])
    return folder


def keys_in(folder: Path) -> list[str]:
    """Every file under ``folder`` that holds a private key (farm's old farm-tls-*/key.pem)."""
    found = []
    for root, _dirs, files in os.walk(folder):
        for name in files:
            try:
                if b"PRIVATE KEY" in Path(root, name).read_bytes():
                    found.append(os.path.join(root, name))
            except OSError:
                continue
    return found


def listening_in(pid: int) -> list[str]:
    """host:port of the TCP sockets this very process listens on (not its children)."""
    found = []
    for line in subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout.splitlines():
        if f"pid={pid}," in line:
            found.append(line.split()[3])
    return found


def test_a_node_certificate_cannot_run_code_on_the_cluster_but_the_controller_works(cluster, tmp_path):
    c = cluster()
    temp = tmp_path / "temp"  # the farm processes' /tmp (TMPDIR), private to this test
    temp.mkdir()
    c.env["TMPDIR"] = str(temp)
    c.start_controller()
    c.start_node("alpha", "--slots", "1")
    c.wait_for_nodes("alpha")
    worker = json.loads(c.farm("nodes", "--json").stdout)[0]["address"]
    nannies = [f"tls://{address}" for address in listening_in(c.nodes["alpha"].pid)]  # `farm node` holds the nanny
    assert nannies

    pem = extract_pems(c.bundles / "node.yaml", tmp_path / "stolen")
    markers = tmp_path / "markers"
    markers.mkdir()
    script = tmp_path / "attack.py"
    script.write_text(textwrap.dedent(ATTACK))
    attack = subprocess.run([sys.executable, str(script), str(pem), f"tls://127.0.0.1:{c.scheduler_port}", worker,
                             str(markers), json.dumps(nannies)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert attack.returncode == 0, attack.stderr
    report = json.loads(attack.stdout.strip().splitlines()[-1])
    print(json.dumps(report, indent=1), sorted(p.name for p in markers.iterdir()))
    assert report["client"].startswith("refused"), report  # so run, run_on_scheduler, submit never got a client
    for name in ("worker run", "worker pickle", "scheduler pickle", "scheduler run_function",
                 *(f"nanny run {address}" for address in nannies)):
        assert report[name].startswith("refused"), (name, report)
    # fn never ran: not on the node, not in the controller (both on this machine, one folder)
    assert list(markers.iterdir()) == []
    logs = (c.root / "controller.log").read_text() + (c.root / "node-alpha.log").read_text()
    assert "register-client" in logs and "refused" in logs  # the refusal is on record

    # the cluster is unharmed and the controller's certificate still does everything
    profile = work_profile(c, "1-4", 0.1)
    result = c.farm("submit", profile, "-o", c.root / "out", "--wait", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["jobs"][0]["state"] == "done"
    assert frames_in(c.root / "out") == [f"frame_{i:04d}.txt" for i in range(1, 5)]
    assert c.node_names() == ["alpha"]

    # no key was written to a temporary folder: not by a controller, a node or `farm run`
    # stopped cleanly, nor by a controller killed outright
    c.stop()
    c.start_controller()
    c.controller.kill()
    c.controller.wait()
    c.controller = None
    alone = c.farm("run", profile, "-o", c.root / "alone", "--json")
    assert alone.returncode == 0, alone.stderr
    assert keys_in(temp) == []


# A node's Dask side told to join a scheduler at an address (argv: nanny|worker, address, bundle).
JOIN = """
    import asyncio, logging, sys, threading, traceback
    from distributed import Worker
    from farm.nodeservice import _run_worker
    from farm.security import Bundle

    kind, address, bundle = sys.argv[1], sys.argv[2], Bundle.load(sys.argv[3])
    refusals = []

    class Refusals(logging.Handler):
        def emit(self, record):
            if "not the controller's" in record.getMessage():
                refusals.append(record)
                print(record.getMessage(), file=sys.stderr)

    logging.getLogger("farm.daskroles").addHandler(Refusals())

    async def bare_worker():
        async with Worker(address, security=bundle.dask_security(), preload=["farm.nodeservice"], dashboard=False):
            pass

    async def join():
        # A refused nanny gives up; a refused bare worker tries to register again and
        # again: it is stopped once a second try has been refused too.
        task = asyncio.ensure_future(_run_worker(address, bundle, "victim2", 1, {}, threading.Event(), print)
                                     if kind == "nanny" else bare_worker())
        while not task.done() and len(refusals) < 2:
            await asyncio.sleep(0.05)
        if not task.done():
            task.cancel()
            raise RuntimeError(f"refused {len(refusals)} times")
        task.result()

    try:
        asyncio.run(asyncio.wait_for(join(), 60))
        print("JOINED")
    except BaseException:
        print("REFUSED", traceback.format_exc())
"""


def test_a_node_certificate_cannot_pose_as_the_controller(cluster, tmp_path):
    c = cluster()
    pem = extract_pems(c.bundles / "node.yaml", tmp_path / "stolen")
    # A fake controller's API with the node's certificate (from the same CA) ...
    fake_api = FakeClusterAPI("tls://127.0.0.1:1", pem / "cert.pem", pem / "key.pem")
    # ... and its Dask scheduler, plain Dask with the node's certificate.
    scheduler_port = c.scheduler_port
    fake = subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", str(scheduler_port),
         "--protocol", "tls", "--tls-ca-file", pem / "ca.pem", "--tls-cert", pem / "cert.pem",
         "--tls-key", pem / "key.pem", "--no-dashboard", "--dashboard-address", "127.0.0.1:0"],
        stdout=(tmp_path / "fake.log").open("w"), stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        c.wait_until(lambda: "Scheduler at" in (tmp_path / "fake.log").read_text(), 60, "the fake scheduler")
        c.url = fake_api.url  # the node is told to use the fake
        node = c.start_node("victim")
        log = c.root / "node-victim.log"
        c.wait_until(lambda: log.exists() and "not reachable" in log.read_text(), 60, "the node to refuse the API")
        assert "certificate" in log.read_text()
        assert fake_api.requests == []  # refused during the TLS handshake: not even the token was sent
        assert node.poll() is None  # still looking for its real controller

        # Told the fake scheduler's address some other way, the node's Dask side refuses it too.
        # `farm node`'s nanny, and a bare worker with the farm preload (as on an outside
        # Dask deployment), each in a fresh process.
        for kind in ("nanny", "worker"):
            joined = subprocess.run([sys.executable, "-c", textwrap.dedent(JOIN), kind, f"tls://127.0.0.1:{scheduler_port}",
                                     str(c.bundles / "node.yaml")], capture_output=True, text=True, timeout=120,
                                    cwd=tmp_path, env=c.env)
            said = joined.stdout + joined.stderr
            assert "REFUSED" in joined.stdout and "JOINED" not in joined.stdout, (kind, said)
            assert "victim2 joined" not in said, (kind, said)  # the nanny says so once in
            assert "not the controller's" in said, (kind, said)
    finally:
        fake_api.close()
        fake.terminate()
        fake.wait(timeout=30)
    output = (tmp_path / "fake.log").read_text()
    assert "Register worker" not in output and "Register Nanny" not in output, output


# A Dask worker preload for plain `dask worker` with a node's stolen certificate: it
# announces itself as a farm node, then answers every segment with something the
# controller would unpickle if it read it the way Dask does (argv: markers, calls).
MALLORY = r"""
    import itertools, os, pathlib, sys
    import distributed.worker_state_machine as wsm
    from distributed.protocol import pickle
    from tornado.ioloop import PeriodicCallback
    import farm.node
    from farm.wire import NODE_TOPIC, RESULT_TOPIC

    MARKERS, CALLS = pathlib.Path(os.environ["MALLORY_MARKERS"]), pathlib.Path(os.environ["MALLORY_CALLS"])

    # Code by value (a builtin and a string), so that it runs wherever it is unpickled;
    # it leaves a marker unless that is mallory itself (Dask there unpickles its own
    # exception once, to check it).
    PAYLOAD = (f"import os, pathlib\nif os.getpid() != {os.getpid()}:\n"
               f"    pathlib.Path({str(MARKERS)!r}, f'ran-{{os.getpid()}}').write_text(open('/proc/self/cmdline').read())")

    class Boom:  # runs PAYLOAD as it is unpickled
        def __reduce__(self):
            return (exec, (PAYLOAD,))

    class BoomError(Exception):
        def __reduce__(self):
            return (exec, (PAYLOAD,))

    # Dask's own messages, forged: a finished task's "type" and an erred task's exception
    # as plain pickled bytes (Dask's clients pickle.loads both).
    if not hasattr(wsm, "mallory"):  # Dask may import a preload twice
        wsm.mallory = True
        def finished(self, to_dict=wsm.TaskFinishedMsg.to_dict):
            return {**to_dict(self), "type": pickle.dumps(Boom())}
        def erred(self, to_dict=wsm.TaskErredMsg.to_dict):
            return {**to_dict(self), "exception": pickle.dumps(Boom()), "traceback": pickle.dumps(Boom())}
        wsm.TaskFinishedMsg.to_dict, wsm.TaskErredMsg.to_dict = finished, erred
    counter = itertools.count(1)

    def evil_segment(job, segment):
        from distributed import get_worker
        worker, call = get_worker(), next(counter)
        (CALLS / f"call-{call}").touch()
        worker.log_event("warn", {"message": pickle.dumps(Boom()), "category": pickle.dumps(Boom())})
        worker.log_event(RESULT_TOPIC, {"attempt": segment.attempt_id, "outcome": {"ok": "yes", "log": 1}})
        for other in range(4):  # "done", for the attempts of every other segment of the job
            for number in range(1, 13):
                attempt = f"{job.id}.s{other:05d}.a{number}"
                if not attempt.startswith(segment.id):
                    worker.log_event(RESULT_TOPIC, {"attempt": attempt, "outcome": {"ok": True, "result": {}},
                                                    "farm-sender": "tls://127.0.0.1:1"})
        if call % 2:
            return Boom()  # the task's result
        raise BoomError("no")  # the task's exception

    farm.node.run_segment = evil_segment  # what the controller's pickled task resolves to here

    def dask_setup(worker):
        report = {"name": "mallory", "slots": 1, "capabilities": farm.node.node_report()["capabilities"],
                  "accepting": True, "hand_back": False, "reason": "", "running": 0}
        def tell():
            worker.log_event(NODE_TOPIC, {**report, "address": worker.address})
        worker._mallory = PeriodicCallback(tell, 500)
        worker._mallory.start()
"""


def test_a_worker_with_a_stolen_node_certificate_cannot_run_code_in_the_controller(cluster, tmp_path):
    c = cluster()
    c.start_controller()
    pem = extract_pems(c.bundles / "node.yaml", tmp_path / "stolen")
    markers, calls = tmp_path / "markers", tmp_path / "calls"
    markers.mkdir()
    calls.mkdir()
    preload = tmp_path / "mallory_preload.py"
    preload.write_text(textwrap.dedent(MALLORY))
    mallory = subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_worker", f"tls://127.0.0.1:{c.scheduler_port}", "--name", "mallory",
         "--nthreads", "1", "--no-nanny", "--no-dashboard", "--preload", str(preload),
         "--tls-ca-file", pem / "ca.pem", "--tls-cert", pem / "cert.pem", "--tls-key", pem / "key.pem"],
        stdout=(tmp_path / "mallory.log").open("w"), stderr=subprocess.STDOUT, cwd=tmp_path,
        env={**c.env, "MALLORY_MARKERS": str(markers), "MALLORY_CALLS": str(calls)})
    try:
        c.wait_for_nodes("mallory")
        profile = work_profile(c, "1-4", 0.1, retries=50, max_node_failures=50)  # mallory is never kept off
        submitted = c.farm("submit", profile, "-o", c.root / "out", "--json")
        assert submitted.returncode == 0, submitted.stderr
        job_id = submitted.json()["jobs"][0]["id"]
        # mallory answers segments: a forged result, then a forged exception; each is lost
        c.wait_until(lambda: len(list(calls.iterdir())) >= 2, 120, "mallory to be handed segments")
        # what it said "done" for without writing a frame is run again (the command's expect)
        assert c.job(job_id)["state"] in ("running", "assembling")
        mallory.kill()  # it has said all it came to say; a real node does the work
        mallory.wait()
        c.start_node("alpha", "--slots", "1")
        c.wait_until(lambda: c.job(job_id)["state"] in ("done", "failed"), 180, "the job to end")
        job = c.job(job_id)
        assert job["state"] == "done", job
        assert frames_in(c.root / "out") == [f"frame_{i:04d}.txt" for i in range(1, 5)]
    finally:
        mallory.kill()
        mallory.wait()
    assert list(markers.iterdir()) == []  # nothing mallory sent ever ran, in the controller or anywhere
    log = (c.root / "controller.log").read_text()
    assert "ignored an outcome a node sent" in log
    assert "a worker it was not handed to" in log
    assert c.controller.poll() is None  # and the controller is still up


# A node that answers every segment "I do not hold this job" (the answer a restarted
# node gives to a segment that names its job by id only), even to the segment that
# brought the job whole.
LIAR = r"""
    import farm.node
    from farm.wire import NODE_TOPIC, RESULT_TOPIC
    from tornado.ioloop import PeriodicCallback

    def forgetful_segment(job, segment):
        from distributed import get_worker
        get_worker().log_event(RESULT_TOPIC, {"attempt": segment.attempt_id, "outcome": {
            "ok": False, "missing_job": True, "reason": "no such job here", "node": "liar", "log": ""}})

    farm.node.run_segment = forgetful_segment

    def dask_setup(worker):
        report = {"name": "liar", "slots": 1, "capabilities": farm.node.node_report()["capabilities"],
                  "accepting": True, "hand_back": False, "reason": "", "running": 0}
        worker._liar = PeriodicCallback(lambda: worker.log_event(NODE_TOPIC, {**report, "address": worker.address}), 500)
        worker._liar.start()
"""


def test_a_node_that_claims_to_lack_the_job_it_was_sent_cannot_hold_the_job_up_for_ever(cluster, tmp_path):
    c = cluster()
    c.start_controller()
    pem = extract_pems(c.bundles / "node.yaml", tmp_path / "stolen")
    preload = tmp_path / "liar_preload.py"
    preload.write_text(textwrap.dedent(LIAR))
    liar = subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_worker", f"tls://127.0.0.1:{c.scheduler_port}", "--name", "liar",
         "--nthreads", "1", "--no-nanny", "--no-dashboard", "--preload", str(preload),
         "--tls-ca-file", pem / "ca.pem", "--tls-cert", pem / "cert.pem", "--tls-key", pem / "key.pem"],
        stdout=(tmp_path / "liar.log").open("w"), stderr=subprocess.STDOUT, cwd=tmp_path, env=c.env)
    try:
        c.wait_for_nodes("liar")
        profile = work_profile(c, "1-2", 0.1, retries=1, max_node_failures=1)
        submitted = c.farm("submit", profile, "-o", c.root / "out", "--json")
        assert submitted.returncode == 0, submitted.stderr
        job_id = submitted.json()["jobs"][0]["id"]
        c.wait_until(lambda: c.job(job_id)["state"] in ("done", "failed", "cancelled"), 120, "the job to end")
        job = c.job(job_id)
        assert job["state"] == "failed", job
        assert "did not hold job" in job["error"] and "which this attempt brought it" in job["error"], job["error"]
    finally:
        liar.kill()
        liar.wait()
