"""Farm on a Dask deployment it did not start: `farm cluster export-tls` writes the PEM
files, a plain `dask scheduler` and plain `dask worker`s (the `dask` command of
distributed, as on Kubernetes or Slurm) run with them, and `farm controller --scheduler`
drives that scheduler. And node names stay unique however many nodes share one."""

from __future__ import annotations

import json
import re
import shlex
import socket
import ssl
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from tests.cluster_helpers import Cluster, free_port
from tests.conftest import FARM
from tests.test_cluster import cluster, frames_in, work_profile  # noqa: F401 (cluster: the fixture)

PEMS = ["ca.pem", "scheduler.key", "scheduler.pem", "worker.key", "worker.pem"]


def init_cluster(farm, folder: Path, name: str = "studio") -> Path:
    result = farm("cluster", "init", name, "--dir", str(folder))
    assert result.returncode == 0, result.stderr
    return folder


def common_name(pem: Path) -> str:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    cert = x509.load_pem_x509_certificate(pem.read_bytes())
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def test_export_tls_writes_private_pem_files_that_the_cluster_ca_vouches_for(farm, tmp_path):
    folder = init_cluster(farm, tmp_path / "cluster")
    out = tmp_path / "tls"
    result = farm("cluster", "export-tls", str(out), "--dir", str(folder), "--scheduler", "tls://sched.example:8786")
    assert result.returncode == 0, result.stderr

    assert sorted(p.name for p in out.iterdir()) == PEMS
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    for path in out.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert common_name(out / "scheduler.pem") == "scheduler.studio.farm"
    assert common_name(out / "worker.pem") == "node.studio.farm"
    node = yaml.safe_load((folder / "node.yaml").read_text())
    assert (out / "worker.pem").read_text() == node["cert"] and (out / "ca.pem").read_text() == node["ca"]
    from cryptography import x509

    ca = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    for who in ("scheduler", "worker"):  # each key goes with its certificate, and the CA signed it
        x509.load_pem_x509_certificate((out / f"{who}.pem").read_bytes()).verify_directly_issued_by(ca)
        ssl.create_default_context().load_cert_chain(out / f"{who}.pem", out / f"{who}.key")

    # The commands printed use these files and the preloads.
    lines = result.stdout.splitlines()
    scheduler = next(line for line in lines if " dask scheduler " in line)
    worker = next(line for line in lines if " dask worker " in line)
    assert f"--tls-cert {out / 'scheduler.pem'}" in scheduler and "--preload farm.daskroles" in scheduler
    assert "--port 8786" in scheduler and "--protocol tls" in scheduler
    assert worker.split()[3] == "tls://sched.example:8786"
    assert f"--tls-key {out / 'worker.key'}" in worker and "--preload farm.nodeservice" in worker
    assert "--preload-nanny farm.daskroles" in worker
    assert "farm controller --scheduler tls://sched.example:8786" in result.stdout

    # Again: refused without --force, naming what is there; with --force the same scheduler
    # identity (kept beside the bundles), written anew with private modes.
    (out / "worker.key").chmod(0o644)
    again = farm("cluster", "export-tls", str(out), "--dir", str(folder))
    assert again.returncode == 2
    assert "already holds ca.pem, scheduler.pem, scheduler.key, worker.pem, worker.key" in again.stderr
    assert "--force" in again.stderr and "Traceback" not in again.stderr
    first = (out / "scheduler.pem").read_text()
    forced = farm("cluster", "export-tls", str(out), "--dir", str(folder), "--force")
    assert forced.returncode == 0, forced.stderr
    assert (out / "scheduler.pem").read_text() == first
    assert stat.S_IMODE((out / "worker.key").stat().st_mode) == 0o600
    assert sorted(p.name for p in out.iterdir()) == PEMS  # no temporary file left behind


def test_export_tls_says_what_is_missing_or_unwritable(farm, tmp_path):
    empty = tmp_path / "nothing"
    empty.mkdir()
    missing = farm("cluster", "export-tls", str(tmp_path / "tls"), "--dir", str(empty))
    assert missing.returncode == 2
    assert f"{empty} holds no cluster (no controller.yaml)" in missing.stderr and "Traceback" not in missing.stderr
    assert not (tmp_path / "tls").exists()

    folder = init_cluster(farm, tmp_path / "cluster")
    (folder / "ca.key").unlink()  # a copy of the bundles without the CA's key cannot issue the scheduler's
    no_key = farm("cluster", "export-tls", str(tmp_path / "tls"), "--dir", str(folder))
    assert no_key.returncode == 2 and "ca.key cannot be read" in no_key.stderr, no_key.stderr

    folder = init_cluster(farm, tmp_path / "cluster2")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    unwritable = farm("cluster", "export-tls", str(blocker / "tls"), "--dir", str(folder))
    assert unwritable.returncode == 2
    assert f"cannot write the TLS files into {blocker / 'tls'}: Not a directory" in unwritable.stderr
    assert "Traceback" not in unwritable.stderr
    not_a_folder = farm("cluster", "export-tls", str(blocker), "--dir", str(folder))
    assert not_a_folder.returncode == 2 and "is not a folder" in not_a_folder.stderr
    assert blocker.read_text() == "not a folder"

    bad = farm("cluster", "export-tls", str(tmp_path / "tls"), "--dir", str(folder), "--scheduler", "tcp://h:1")
    assert bad.returncode == 2 and "expected tls://HOST:PORT" in bad.stderr


# A Dask client with the workers' certificate asks a nanny to run a function
# (argv: the exported folder, the nanny's address, a marker the function would write).
RUN_IN_NANNY = """
    import asyncio, pathlib, sys
    from distributed import Security
    from distributed.core import rpc
    from distributed.protocol import pickle

    tls, nanny, marker = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]

    def fn():
        pathlib.Path(marker).touch()

    async def main():
        security = Security(tls_ca_file=str(tls / "ca.pem"), tls_client_cert=str(tls / "worker.pem"),
                            tls_client_key=str(tls / "worker.key"), require_encryption=True)
        async with rpc(nanny, connection_args=security.get_connection_args("client")) as remote:
            return await asyncio.wait_for(remote.run(function=pickle.dumps(fn)), 30)

    try:
        print("ANSWERED", asyncio.run(main()))
    except Exception as exc:
        print("REFUSED", type(exc).__name__, exc)
"""


def printed_command(stdout: str, program: str, **fill: str) -> tuple[dict[str, str], list[str]]:
    """The environment and argv of the line export-tls printed for ``dask PROGRAM``, with
    its placeholders filled in."""
    line = next(line for line in stdout.splitlines() if f" dask {program} " in line)
    for placeholder, value in fill.items():
        line = line.replace(placeholder, value)
    words = shlex.split(line)
    env = dict(word.split("=", 1) for word in words[:words.index("dask")])
    argv = words[words.index("dask") + 2:]
    return env, [sys.executable, "-m", f"distributed.cli.dask_{program}", *argv]


def start(c: Cluster, name: str, argv: list[str], env: dict[str, str], scheduler: bool = False) -> subprocess.Popen:
    log = open(c.root / f"{name}.log", "a")
    proc = subprocess.Popen(argv, env={**c.env, **env}, stdout=log, stderr=subprocess.STDOUT, cwd=c.root,
                            start_new_session=True)
    if scheduler:
        c.schedulers.append(proc)  # stopped with the cluster, after its workers
    else:
        c.nodes[name] = proc  # stopped with the cluster
    return proc


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def log_of(c: Cluster, name: str) -> str:
    path = c.root / f"{name}.log"
    return path.read_text() if path.exists() else ""


@pytest.mark.slow
def test_plain_dask_scheduler_and_worker_with_exported_files_run_a_batch(cluster, farm, tmp_path):
    c = cluster()
    port = free_port()
    address = f"tls://127.0.0.1:{port}"
    exported = c.farm("cluster", "export-tls", c.root / "tls", "--dir", c.bundles, "--scheduler", address)
    assert exported.returncode == 0, exported.stderr

    # The scheduler and the worker exactly as printed, kept to loopback for the test.
    env, argv = printed_command(exported.stdout, "scheduler")
    start(c, "scheduler", [*argv, "--host", "127.0.0.1", "--dashboard-address", "127.0.0.1:0"], env, scheduler=True)
    c.wait_until(lambda: listening(port), 90, "the dask scheduler to listen")
    env, argv = printed_command(exported.stdout, "worker", NODE_NAME="outside-1", SLOTS="1")
    start(c, "outside-1", [*argv, "--host", "127.0.0.1"], {**env, "DASK_LOGGING__DISTRIBUTED": "info"})
    # Two more without --name, on the same host: they report the same name (the host's).
    unnamed = [word for word in argv if word not in ("--name", "outside-1")]
    start(c, "unnamed", [*unnamed, "--host", "127.0.0.1", "--nworkers", "2"], env)

    # The controller drives that scheduler; the worker shows as a node with its own name and slots.
    log = open(c.root / "controller.log", "a")
    c.controller = subprocess.Popen([*FARM, "controller", "--bundle", str(c.bundles / "controller.yaml"),
                                     "--scheduler", address], env=c.env, stdout=log, stderr=subprocess.STDOUT,
                                    cwd=c.root)
    c.wait_until(c.api_up, 90, "the controller's API")
    host = socket.gethostname()
    names = sorted(["outside-1", host, f"{host}-2"])
    c.wait_until(lambda: c.node_names() == names, 180, f"nodes {names}")
    for node in c.api("GET", "/api/nodes").json():
        assert node["slots"] == 1 and "processor:command" in node["capabilities"]
    assert c.api("GET", "/api/cluster").json()["scheduler"] == address

    profile = work_profile(c, "1-4", 0)
    submitted = c.farm("submit", profile, "-o", c.root / "out", "--wait", "--json")
    assert submitted.returncode == 0, submitted.stderr + submitted.stdout
    job, = json.loads(submitted.stdout)["jobs"]
    assert job["state"] == "done" and job["segments"] == 4
    assert frames_in(c.root / "out") == [f"frame_{i:04d}.txt" for i in range(1, 5)]
    assert [(c.root / "out" / f"frame_{i:04d}.txt").read_text() for i in range(1, 5)] == ["1", "2", "3", "4"]
    attempts = [a for s in c.job(job["id"])["segment_list"] for a in s["attempts"]]
    assert {a["node"] for a in attempts} <= set(names) and len(attempts) == 4

    # The worker's certificate cannot make its nanny run code (the nanny's preload).
    nanny = re.search(r"Start Nanny at: '(tls://[^']+)'", log_of(c, "outside-1")).group(1)
    marker = tmp_path / "ran"
    attack = subprocess.run([sys.executable, "-c", textwrap.dedent(RUN_IN_NANNY), str(c.root / "tls"), nanny,
                             str(marker)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert "REFUSED" in attack.stdout, attack.stdout + attack.stderr
    assert not marker.exists()

    # A worker with another cluster's exported files is refused by the scheduler and never
    # becomes a node.
    other = init_cluster(farm, tmp_path / "other", "elsewhere")
    theirs = c.farm("cluster", "export-tls", tmp_path / "other-tls", "--dir", other, "--scheduler", address)
    assert theirs.returncode == 0, theirs.stderr
    env, argv = printed_command(theirs.stdout, "worker", NODE_NAME="intruder", SLOTS="1")
    intruder = start(c, "intruder", [*argv, "--host", "127.0.0.1", "--death-timeout", "20"], env)
    assert intruder.wait(timeout=180) != 0
    assert "TLS certificate does not match" in log_of(c, "intruder")
    assert "TLS handshake failed" in log_of(c, "scheduler")
    assert c.node_names() == names


@pytest.mark.slow
def test_nodes_started_under_one_name_all_join_under_names_of_their_own(cluster):
    c = cluster()
    c.start_controller()
    for number in range(3):
        c.start_node("vm-quick", "--slots", "1")
        c.nodes[f"vm-quick#{number}"] = c.nodes.pop("vm-quick")  # three processes, all stopped at the end
    names = ["vm-quick", "vm-quick-2", "vm-quick-3"]
    c.wait_until(lambda: c.node_names() == names, 180, f"nodes {names}")
    listed = c.farm("nodes")
    assert listed.returncode == 0, listed.stderr
    assert sorted(line.split()[0] for line in listed.stdout.splitlines()) == names
    assert "joining as vm-quick-2" in (c.root / "node-vm-quick.log").read_text()

    # Each of them does work: three one-slot nodes, six segments handed out to the idle ones.
    profile = work_profile(c, "1-6", 0.5)
    submitted = c.farm("submit", profile, "-o", c.root / "out", "--wait", "--json")
    assert submitted.returncode == 0, submitted.stderr + submitted.stdout
    job, = json.loads(submitted.stdout)["jobs"]
    assert job["state"] == "done"
    assert frames_in(c.root / "out") == [f"frame_{i:04d}.txt" for i in range(1, 7)]
    attempts = [a for s in c.job(job["id"])["segment_list"] for a in s["attempts"]]
    assert {a["node"] for a in attempts} == set(names)
