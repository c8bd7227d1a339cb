"""Credentials by role, against real controller processes: view, submit and admin tokens
over the API and through the CLI with client files, revocation while the controller runs,
a client that refuses any certificate but the controller's before it sends its token, and
an old single-token cluster that keeps working."""

from __future__ import annotations

import json
import socket
import ssl
import stat
import sys
import textwrap
import threading
from pathlib import Path

import httpx
import pytest
import yaml

from tests.cluster_helpers import Cluster

pytestmark = pytest.mark.slow

WORK = """
    import pathlib, sys
    pathlib.Path(sys.argv[1], f"frame_{int(sys.argv[2]):04d}.txt").write_text(sys.argv[2])
"""


def profile(c: Cluster, name: str, **keys) -> None:
    """A profile the controller knows by name (its working folder's profiles/)."""
    folder = c.root / "profiles"
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.yaml").write_text(yaml.safe_dump({"name": name, **keys}))


@pytest.fixture(scope="module")
def farm_roles(tmp_path_factory):
    root = tmp_path_factory.mktemp("roles")
    dest = root / "dest"
    dest.mkdir()
    c = Cluster(root / "c", controller_config={"destinations": [str(dest)]})
    script = c.root / "work.py"
    script.write_text(textwrap.dedent(WORK))
    frames = {"processor": "command", "frames": "1-4", "segment": {"frames": 1},
              "settings": {"command": [sys.executable, str(script), "{output_dir}", "{start}"],
                           "expect": ["frame_{frame:04d}.txt"]}}
    profile(c, "frames", **frames, expose=["frames"])
    # no node offers this: its jobs stay queued, to be steered
    profile(c, "stuck", **frames, requires={"unobtainium": ">=1"})
    c.start_controller()
    c.start_node("n1", "--slots", "2")
    c.wait_for_nodes("n1")
    c.dest = dest
    c.clients = {role: c.add_token(f"a-{role}", role) for role in ("view", "submit")}
    c.clients["other"] = c.add_token("other-submitter", "submit")
    yield c
    c.stop()


def api(c: Cluster, client_file: Path) -> httpx.Client:
    data = yaml.safe_load(client_file.read_text())
    context = ssl.create_default_context(cadata=data["ca"])
    context.check_hostname = False
    return httpx.Client(base_url=c.url, verify=context, timeout=60,
                        headers={"Authorization": f"Bearer {data['token']}"})


def as_(client_file: Path) -> dict:
    return {"FARM_CLIENT": str(client_file)}


def refused(result, *words: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    line = result.stderr.strip()
    assert line.startswith("farm: error: the controller refused:") and "Traceback" not in line, line
    for word in words:
        assert word in line, line


def submit_stuck(c: Cluster, client_file: Path, out: Path) -> dict:
    result = c.farm("submit", "stuck", "-o", out, "--json", env=as_(client_file))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_view_reads_and_changes_nothing(farm_roles):
    c = farm_roles
    view = c.clients["view"]
    assert [n["name"] for n in json.loads(c.farm("nodes", "--json", env=as_(view)).stdout)] == ["n1"]
    theirs = submit_stuck(c, c.bundles / "admin.yaml", c.dest / "admin-view")["jobs"][0]["id"]
    status = c.farm("status", theirs, "--json", env=as_(view))
    assert status.returncode == 0 and json.loads(status.stdout)["state"] == "queued"
    monitor = c.farm("monitor", "--no-browser", env=as_(view))
    assert monitor.returncode == 0 and c.url in monitor.stdout
    doctor = {check["name"]: check for check in json.loads(c.farm("doctor", "--json", env=as_(view)).stdout)["checks"]}
    assert doctor["client file (view)"]["ok"] and doctor["controller"]["ok"], doctor

    refused(c.farm("submit", "frames", "-o", c.dest / "v", env=as_(view)),
            "token 'a-view' has role view; submitting needs submit or admin")
    for verb in (["cancel", theirs], ["pause", theirs], ["retry", theirs], ["priority", theirs, "high"]):
        refused(c.farm(*verb, env=as_(view)), "token 'a-view' has role view", "needs submit or admin")
    refused(c.farm("pause-node", "n1", env=as_(view)), "pausing or resuming a node needs admin")
    assert not (c.dest / "v").exists()

    with api(c, view) as http:
        assert http.get("/api/jobs").status_code == 200
        answer = http.post("/api/batches", json={"profile": "frames", "destination": str(c.dest / "v")})
        assert answer.status_code == 403 and "has role view" in answer.json()["error"]
        assert http.post(f"/api/jobs/{theirs}/cancel").status_code == 403
    assert c.job(theirs)["state"] == "queued"


def test_the_node_token_only_finds_the_scheduler(farm_roles):
    c = farm_roles
    node = yaml.safe_load((c.bundles / "node.yaml").read_text())
    context = ssl.create_default_context(cadata=node["ca"])
    context.check_hostname = False
    with httpx.Client(base_url=c.url, verify=context, headers={"Authorization": f"Bearer {node['token']}"}) as http:
        assert http.get("/api/cluster").json()["scheduler"].startswith("tls://")
        for path in ("/api/jobs", "/api/nodes", "/api/batches"):
            answer = http.get(path)
            assert answer.status_code == 403 and "role node" in answer.json()["error"]
        assert http.post("/api/batches", json={"profile": "frames"}).status_code == 403
    refused(c.farm("nodes", env={"FARM_CLIENT": "", "FARM_BUNDLE": str(c.bundles / "node.yaml")}), "role node")


def test_submit_runs_known_profiles_with_exposed_keys_into_the_destination_roots(farm_roles):
    c = farm_roles
    submit = c.clients["submit"]
    done = c.farm("submit", "frames", "-o", c.dest / "shots", "--set", "frames=1-3", "--wait", "--json",
                  env=as_(submit))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["jobs"][0]["state"] == "done"
    assert sorted(p.name for p in (c.dest / "shots").iterdir()) == [f"frame_{i:04d}.txt" for i in (1, 2, 3)]

    outside = c.root / "outside"
    refused(c.farm("submit", "frames", "-o", outside, env=as_(submit)),
            "token 'a-submit' has role submit", f"only under the destination roots ({c.dest.resolve()})")
    assert not outside.exists()  # refused before the folder was made
    refused(c.farm("submit", "frames", "-o", c.dest / ".." / "escape", env=as_(submit)), "destination roots")
    assert not (c.root / "escape").exists()
    refused(c.farm("submit", "frames", "-o", c.dest / "x", "--set", "settings.command=[/bin/sh,-c,id]",
                   env=as_(submit)), "profile 'frames' exposes frames, not 'settings.command'")
    refused(c.farm("submit", "frames", "-o", c.dest / "x", "--set", "settings.env.LD_PRELOAD=/tmp/x.so",
                   env=as_(submit)), "not 'settings.env.LD_PRELOAD'")
    refused(c.farm("submit", "frames", "-o", c.dest / "x", "--set", "expose=[settings]", env=as_(submit)),
            "not 'expose'")
    refused(c.farm("submit", c.root / "profiles" / "frames.yaml", "-o", c.dest / "x", env=as_(submit)),
            "not a path", "profiles by path need admin")
    refused(c.farm("submit", "stuck", "-o", c.dest / "x", "--set", "frames=1-2", env=as_(submit)),
            "profile 'stuck' exposes no keys")
    assert not (c.dest / "x").exists()

    with api(c, submit) as http:
        for body in ({"profile": "frames", "destination": "/etc"},
                     {"profile": "frames", "destination": str(c.dest), "overrides": ["settings.command=[id]"]},
                     {"profile": str(c.root / "profiles" / "frames.yaml"), "destination": str(c.dest)}):
            answer = http.post("/api/batches", json=body)
            assert answer.status_code == 403 and "role submit" in answer.json()["error"], answer.text

    # admin may do all of it
    admin = c.farm("submit", c.root / "profiles" / "frames.yaml", "-o", c.root / "admin-out", "--set",
                   "frames=1-2", "--wait", "--json")
    assert admin.returncode == 0, admin.stderr
    assert len(list((c.root / "admin-out").iterdir())) == 2


def test_submit_steers_only_the_jobs_it_submitted(farm_roles):
    c = farm_roles
    submit, other = c.clients["submit"], c.clients["other"]
    theirs = submit_stuck(c, c.bundles / "admin.yaml", c.dest / "admins")["jobs"][0]["id"]
    answer = submit_stuck(c, submit, c.dest / "mine")
    mine, batch = answer["jobs"][0]["id"], answer["batch"]

    for verb in (["cancel", theirs], ["pause", theirs], ["retry", theirs], ["priority", theirs, "high"]):
        refused(c.farm(*verb, env=as_(submit)), "it may change only the jobs it submitted")
    for verb in (["cancel", mine], ["priority", mine, "low"]):
        refused(c.farm(*verb, env=as_(other)), "token 'other-submitter'", "only the jobs it submitted")
    with api(c, other) as http:
        assert http.post(f"/api/batches/{batch}/cancel").status_code == 403

    assert c.farm("pause", mine, env=as_(submit)).returncode == 0
    assert c.job(mine)["state"] == "paused"
    assert c.farm("resume", mine, env=as_(submit)).returncode == 0
    assert c.farm("priority", mine, "high", env=as_(submit)).returncode == 0
    assert c.job(mine)["priority"] == 10
    assert c.farm("cancel", mine, env=as_(submit)).returncode == 0
    c.wait_until(lambda: c.job(mine)["state"] == "cancelled", 60, "the cancel")
    assert c.farm("retry", mine, env=as_(submit)).returncode == 0
    c.wait_until(lambda: c.job(mine)["state"] == "queued", 60, "the retry")
    assert c.job(theirs)["state"] == "queued" and c.job(theirs)["priority"] == 0

    # the batch list says who submitted what; admin steers anyone's
    with api(c, c.bundles / "admin.yaml") as http:
        origins = {b["id"]: b["origin"] for b in http.get("/api/batches").json()}
    assert origins[batch].startswith("api:a-submit:")
    assert c.farm("cancel", mine).returncode == 0 and c.farm("cancel", theirs).returncode == 0


def test_a_revoked_token_is_refused_at_once(farm_roles):
    c = farm_roles
    gone = c.add_token("leaver", "submit")
    with api(c, gone) as http, api(c, gone) as streaming:
        assert http.get("/api/nodes").status_code == 200
        with streaming.stream("GET", "/api/events/stream", timeout=httpx.Timeout(60)) as events:
            lines = events.iter_lines()
            assert next(lines).startswith("retry:")
            revoked = c.farm("cluster", "token", "revoke", "leaver", "--dir", c.bundles)
            assert revoked.returncode == 0 and "revoked" in revoked.stdout
            answer = http.get("/api/nodes")  # the very next request, no restart, no wait
            assert answer.status_code == 401 and "revoked" in answer.json()["error"]
            # the stream it opened before ends at the next event: nothing more reaches it
            job = submit_stuck(c, c.bundles / "admin.yaml", c.dest / "after-revoke")["jobs"][0]["id"]
            rest = list(lines)  # ends, rather than timing out
            assert not [line for line in rest if job in line]
    assert c.farm("cancel", job).returncode == 0
    refused(c.farm("nodes", env=as_(gone)), "missing, wrong or revoked API token")
    assert c.farm("nodes", env=as_(c.clients["view"])).returncode == 0  # the others go on


def test_the_token_table_keeps_no_token_and_the_cli_explains_itself(farm_roles):
    c = farm_roles
    listed = c.farm("cluster", "token", "list", "--dir", c.bundles, "--json")
    assert listed.returncode == 0
    names = {entry["name"]: entry["role"] for entry in json.loads(listed.stdout)}
    assert names["admin"] == "admin" and names["nodes"] == "node" and names["a-view"] == "view"
    table = (c.bundles / "tokens.yaml").read_text()
    for client_file in (*c.clients.values(), c.bundles / "admin.yaml"):
        token = yaml.safe_load(client_file.read_text())["token"]
        assert token not in table and token not in listed.stdout
        assert stat.S_IMODE(client_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((c.bundles / "tokens.yaml").stat().st_mode) == 0o600
    client = yaml.safe_load(c.clients["view"].read_text())
    assert "cert" not in client and "key" not in client  # no Dask certificate: a client cannot join as a node
    assert client["urls"] == [c.url] and len(client["fingerprint"]) == 64

    for args, words in ((["add", "a-view", "--role", "view"], "exists already"),
                        (["revoke", "nobody"], "no token named 'nobody'"),
                        (["add", "bad name", "--role", "view"], "token name 'bad name'")):
        result = c.farm("cluster", "token", *args, "--dir", c.bundles)
        assert result.returncode == 2 and words in result.stderr and "Traceback" not in result.stderr
    elsewhere = c.farm("cluster", "token", "list", "--dir", c.root / "nothing-here")
    assert elsewhere.returncode == 2 and "no controller.yaml" in elsewhere.stderr


class Impostor:
    """A TLS server with another certificate of the same CA (a node's), recording every
    byte a client sends it after the handshake."""

    def __init__(self, bundle: Path, tmp: Path):
        from farm.security import Bundle, load_cert_chain

        node = Bundle.load(bundle)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        load_cert_chain(context, node.cert, node.key)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.received = b""
        self.handshakes = 0
        self.context = context
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            try:
                with self.context.wrap_socket(raw, server_side=True) as conn:
                    self.handshakes += 1
                    conn.settimeout(5)
                    while chunk := conn.recv(65536):
                        self.received += chunk
            except (OSError, ssl.SSLError):
                pass


def test_a_client_refuses_another_cluster_certificate_before_sending_its_token(tmp_path):
    c = Cluster(tmp_path / "c")
    impostor = Impostor(c.bundles / "node.yaml", tmp_path)
    url = f"https://127.0.0.1:{impostor.port}"
    admin = yaml.safe_load((c.bundles / "admin.yaml").read_text())

    pinned = c.farm("nodes", "--controller", url)
    assert pinned.returncode == 2 and "is not the controller's" in pinned.stderr, pinned.stderr
    assert "the token was not sent" in pinned.stderr
    # a node bundle pins the controller too (nodes ask it where the scheduler is) ...
    node = c.farm("nodes", "--controller", url, env={"FARM_CLIENT": "", "FARM_BUNDLE": str(c.bundles / "node.yaml")})
    assert node.returncode == 2 and "is not the controller's" in node.stderr, node.stderr
    # ... and one made before roles has no pin, but a node's certificate is not named as the controller
    old = yaml.safe_load((c.bundles / "node.yaml").read_text())
    del old["controller_fingerprint"]
    (tmp_path / "old-node.yaml").write_text(yaml.safe_dump(old))
    named = c.farm("nodes", "--controller", url, env={"FARM_CLIENT": "", "FARM_BUNDLE": str(tmp_path / "old-node.yaml")})
    assert named.returncode == 2 and "not the controller's 'controller.testfarm.farm'" in named.stderr, named.stderr
    assert impostor.handshakes >= 1  # the TLS handshake happened, and then nothing was sent
    assert impostor.received == b"" and admin["token"].encode() not in impostor.received

    from farm.client import ControllerClient
    from farm.credentials import ClientFile
    from farm.errors import UsageError

    with pytest.raises(UsageError, match="is not the controller's"):
        ControllerClient(ClientFile.load(c.bundles / "admin.yaml"), url).request("GET", "/api/jobs")
    assert impostor.received == b""


def test_an_old_single_token_cluster_keeps_working_as_admin(tmp_path):
    c = Cluster(tmp_path / "c")
    # a cluster made before roles: one token in every bundle, no token table, no client file
    old_token = "the-old-single-cluster-token-0123456789abcdef"
    for name in ("controller.yaml", "node.yaml"):
        data = yaml.safe_load((c.bundles / name).read_text())
        data["token"] = old_token
        data.pop("controller_fingerprint", None)
        (c.bundles / name).write_text(yaml.safe_dump(data, sort_keys=False))
    (c.bundles / "tokens.yaml").unlink()
    (c.bundles / "admin.yaml").unlink()
    old = {"FARM_CLIENT": "", "FARM_BUNDLE": str(c.bundles / "node.yaml")}
    c.env.update(old)  # every command below, the controller's check included, uses the old bundle
    c.start_controller()
    c.start_node("n1")
    c.wait_for_nodes("n1")
    listed = c.farm("cluster", "token", "list", "--dir", c.bundles)
    assert "cluster" in listed.stdout and "admin" in listed.stdout

    c.root.joinpath("work.py").write_text(textwrap.dedent(WORK))
    path = c.root / "w.yaml"
    path.write_text(yaml.safe_dump({"name": "w", "processor": "command", "frames": "1-2", "segment": {"frames": 1},
                                    "settings": {"command": [sys.executable, str(c.root / "work.py"),
                                                             "{output_dir}", "{start}"],
                                                 "expect": ["frame_{frame:04d}.txt"]}}))
    done = c.farm("submit", path, "-o", c.root / "out", "--set", "frames=1-2", "--wait", "--json")
    assert done.returncode == 0, done.stderr  # admin: a profile by path, any override, any destination
    assert c.farm("pause-node", "n1").returncode == 0 and c.farm("resume-node", "n1").returncode == 0

    # an admin adds a token: the old one is kept in the table as 'cluster' (admin) until revoked
    view = c.add_token("viewer", "view")
    assert c.farm("nodes", env=as_(view)).returncode == 0
    assert c.farm("nodes").returncode == 0
    made = c.farm("cluster", "token", "add", "nodes", "--role", "node", "--dir", c.bundles)
    assert made.returncode == 0 and "clients/nodes.node.yaml" in made.stdout, made.stderr
    assert c.farm("cluster", "token", "revoke", "cluster", "--dir", c.bundles).returncode == 0
    refused(c.farm("nodes"), "missing, wrong or revoked API token")
    # a node started now, with the new node bundle, finds the scheduler; the old shared token is gone
    c.start_node("n2", bundle=c.bundles / "clients" / "nodes.node.yaml")
    c.wait_until(lambda: "n2" in c.farm("nodes", "--json", env=as_(view)).stdout, 90, "n2 to join")
    c.stop()


def test_a_token_table_that_cannot_be_read_refuses_every_token(tmp_path):
    from farm.tokens import TokenTable

    table = TokenTable(tmp_path / "tokens.yaml")
    token = table.add("ana", "submit")
    assert table.authenticate(token).role == "submit" and table.authenticate("guess") is None
    (tmp_path / "tokens.yaml").write_text("tokens: [\n")  # a hand edit gone wrong
    assert table.authenticate(token) is None
    TokenTable(tmp_path / "again.yaml").add("x", "view")
    (tmp_path / "tokens.yaml").write_text((tmp_path / "again.yaml").read_text())
    assert table.authenticate(token) is None  # ana is not in the new file


def test_expose_lists_key_paths(farm, farm_env, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "bad", "processor": "command", "settings": {"command": ["ffmpeg"]},
                                   "expose": ["frames", "settings command"]}))
    result = farm("plan", bad)
    assert result.returncode == 2 and "expose" in result.stderr and "'settings command'" in result.stderr, result.stderr


def test_a_client_file_finds_the_controller_among_its_urls(farm_roles, tmp_path):
    from tests.cluster_helpers import free_port

    c = farm_roles
    impostor = Impostor(c.bundles / "node.yaml", tmp_path)
    out = tmp_path / "roaming.yaml"
    made = c.farm("cluster", "token", "add", "roaming", "--role", "view", "--dir", c.bundles, "--out", out,
                  "--url", f"https://127.0.0.1:{free_port()}", "--url", f"https://127.0.0.1:{impostor.port}",
                  "--url", c.url)
    assert made.returncode == 0, made.stderr
    alone = {"FARM_CLIENT": str(out), "FARM_CONTROLLER": ""}  # no URL but the file's
    nodes = c.farm("nodes", "--json", env=alone)
    assert nodes.returncode == 0, nodes.stderr
    assert [n["name"] for n in json.loads(nodes.stdout)] == ["n1"]
    job = submit_stuck(c, c.bundles / "admin.yaml", c.dest / "roaming")["jobs"][0]["id"]
    status = c.farm("status", "--json", env={**alone, "FARM_STATE": str(tmp_path / "empty-state")})
    assert status.returncode == 0 and job in status.stdout  # the controller's jobs, not this machine's store
    assert c.farm("cancel", job).returncode == 0
    assert impostor.received == b""
