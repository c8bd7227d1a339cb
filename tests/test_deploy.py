"""What cannot run here, checked on paper: the Kubernetes manifest, the Containerfile and
the Slurm script of deploy/ say what docs/cluster.md says, with the preloads, the Secrets
and the files `farm cluster export-tls` writes."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest
import yaml

from farm.security import TLS_FILES
from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
DOCS = (ROOT / "docs" / "cluster.md").read_text()


def manifests() -> dict[str, dict]:
    documents = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "farm-daskcluster.yaml").read_text()))
    return {document["kind"]: document for document in documents}


def container(pod_spec: dict) -> dict:
    only, = pod_spec["containers"]
    return only


def option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def mounted_secret(pod_spec: dict, path: str) -> tuple[str, str]:
    """The Secret mounted at the folder of ``path``, and the file name under it."""
    folder, _, name = path.rpartition("/")
    mount = next(m for m in container(pod_spec)["volumeMounts"] if m["mountPath"] == folder)
    volume = next(v for v in pod_spec["volumes"] if v["name"] == mount["name"])
    return volume["secret"]["secretName"], name


def secrets_made_in_docs() -> dict[str, set[str]]:
    """``kubectl create secret generic NAME --from-file=tls/FILE ...`` lines of docs/cluster.md."""
    made = {}
    for command in re.findall(r"kubectl create secret generic ([^\n]+)", DOCS.replace("\\\n", " ")):
        words = shlex.split(command)
        made[words[0]] = {word.split("=", 1)[1].rsplit("/", 1)[-1] for word in words[1:] if word.startswith("--from-file=")}
    return made


def test_the_daskcluster_runs_the_documented_commands_with_the_secrets_the_docs_create():
    cluster = manifests()["DaskCluster"]
    assert cluster["apiVersion"] == "kubernetes.dask.org/v1"
    made = secrets_made_in_docs()
    assert set(made) == {"farm-scheduler-tls", "farm-worker-tls"}

    scheduler = cluster["spec"]["scheduler"]["spec"]
    args = container(scheduler)["args"]
    assert args[:2] == ["dask", "scheduler"] and option(args, "--preload") == "farm.daskroles"
    assert option(args, "--protocol") == "tls"
    worker = cluster["spec"]["worker"]["spec"]
    wargs = container(worker)["args"]
    assert wargs[:3] == ["dask", "worker", f"tls://farm-scheduler:{option(args, '--port')}"]
    assert option(wargs, "--preload") == "farm.nodeservice" and option(wargs, "--preload-nanny") == "farm.daskroles"
    assert option(wargs, "--memory-limit") == "0"

    for pod, argv, secret, files in ((scheduler, args, "farm-scheduler-tls", ("ca.pem", "scheduler.pem", "scheduler.key")),
                                     (worker, wargs, "farm-worker-tls", ("ca.pem", "worker.pem", "worker.key"))):
        used = [mounted_secret(pod, option(argv, flag)) for flag in ("--tls-ca-file", "--tls-cert", "--tls-key")]
        assert used == [(secret, name) for name in files]
        assert set(files) == made[secret] and set(files) <= set(TLS_FILES)  # what export-tls writes
        env = {item["name"]: item["value"] for item in container(pod)["env"]}
        role = "SCHEDULER" if pod is scheduler else "WORKER"
        assert yaml.safe_load(env[f"DASK_DISTRIBUTED__{role}__HTTP__ROUTES"]) == ["distributed.http.health"]
        assert pod["securityContext"]["runAsNonRoot"] is True

    # The nodes' farm.yaml comes from the ConfigMap, and is one Farm accepts.
    config_map = manifests()["ConfigMap"]
    env = {item["name"]: item["value"] for item in container(worker)["env"]}
    mount = next(m for m in container(worker)["volumeMounts"] if env["FARM_CONFIG"].startswith(m["mountPath"] + "/"))
    volume = next(v for v in worker["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    from farm.config import FarmConfig

    FarmConfig.model_validate(yaml.safe_load(config_map["data"][env["FARM_CONFIG"].rsplit("/", 1)[1]]))

    # The documented health check is the one left open.
    probe = container(scheduler)["readinessProbe"]["httpGet"]
    port = next(p for p in container(scheduler)["ports"] if p["name"] == probe["port"])
    assert probe["path"] == "/health" and port["containerPort"] == 8787


def run_lines(text: str) -> list[str]:
    """The shell commands of a Containerfile's RUN instructions (continuations joined)."""
    joined = text.replace("\\\n", " ")
    return [line.split("RUN", 1)[1].strip() for line in joined.splitlines() if line.startswith("RUN ")]


def test_the_containerfile_installs_what_setup_installs_less_the_tests_own():
    text = (DEPLOY / "Containerfile").read_text()
    assert re.search(r"^FROM \S*debian:bookworm", text, re.M)
    setup = (ROOT / "setup").read_text()
    setup_packages = set(re.search(r'DEBIAN_PACKAGES="([^"]+)"', setup).group(1).split())
    commands = " && ".join(run_lines(text))
    installs = re.findall(r"apt-get install -y --no-install-recommends ([a-z0-9.+\- ]+?)(?:;|&&|\\|$)", commands)
    always, optional = set(installs[0].split()), set(installs[1].split())
    # ./setup's packages, less chromium and iproute2 (only its tests use them); Blender optional
    assert setup_packages - {"chromium", "iproute2"} == (always | optional) - {"python3", "python3-venv", "ca-certificates"}
    assert optional == {"blender"} and 'if [ "$WITH_BLENDER" = 1 ]' in commands
    # Farm itself as ./setup installs it (the same project, without the test extras), into a venv
    assert "-m venv" in setup and "python3 -m venv /opt/farm/venv" in commands
    assert re.search(r"/opt/farm/venv/bin/python -m pip install [^&]*/opt/farm/src(\s|$)", commands)
    assert "ENV PATH=/opt/farm/venv/bin:$PATH" in text
    # never root
    user = re.search(r"^USER (\S+)", text, re.M).group(1)
    assert user != "root" and f"useradd --create-home --uid 1000 --user-group {user}" in commands
    assert re.search(r"runAsUser: 1000", (DEPLOY / "kubernetes" / "farm-daskcluster.yaml").read_text())
    for ignored in (".venv", ".git"):  # the build context leaves out the developer's venv and history
        assert ignored in (ROOT / ".dockerignore").read_text().split()


@pytest.mark.slow
def test_the_slurm_script_gives_its_jobs_the_worker_files_and_the_preloads(tmp_path, farm_env):
    pytest.importorskip("dask_jobqueue")
    folder = tmp_path / "cluster"
    tls = tmp_path / "tls"
    for command in (["cluster", "init", "hpc", "--dir", str(folder)],
                    ["cluster", "export-tls", str(tls), "--dir", str(folder)]):
        made = subprocess.run([sys.executable, "-m", "farm.cli", *command], capture_output=True, text=True, timeout=120)
        assert made.returncode == 0, made.stderr
    shown = subprocess.run([sys.executable, str(DEPLOY / "slurm" / "farm_slurm.py"), "--tls", str(tls), "--port", "0",
                            "--cores", "3", "--farm-config", "/shared/farm.yaml", "--print-job-script"],
                           capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    script = shown.stdout
    assert "#SBATCH --cpus-per-task=3" in script
    assert "export FARM_CONFIG=/shared/farm.yaml" in script
    assert """export DASK_DISTRIBUTED__WORKER__HTTP__ROUTES='["distributed.http.health"]'""" in script
    worker = shlex.split(next(line for line in script.splitlines() if "distributed.cli.dask_worker" in line))
    assert worker[worker.index("distributed.cli.dask_worker") + 1].startswith("tls://")
    assert option(worker, "--preload") == "farm.nodeservice" and option(worker, "--preload-nanny") == "farm.daskroles"
    assert [option(worker, flag) for flag in ("--tls-ca-file", "--tls-cert", "--tls-key")] == \
        [str(tls / "ca.pem"), str(tls / "worker.pem"), str(tls / "worker.key")]
    assert option(worker, "--nthreads") == "3"
    assert worker[len(worker) - 1 - worker[::-1].index("--memory-limit") + 1] == "0"  # the last one given wins
