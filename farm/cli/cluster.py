"""Cluster commands: `farm cluster init`, `farm controller`, `farm node`,
`farm quickcluster`, and the client side `farm submit`, `farm nodes`, `farm retry`,
`farm pause-node`, `farm resume-node`."""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, TextIO

from farm import collector
from farm.errors import ExitStatus


def add_commands(commands: Any, common: argparse.ArgumentParser) -> dict[str, Any]:
    remote = argparse.ArgumentParser(add_help=False)
    remote.add_argument("--controller", metavar="URL", help="the controller's API URL (default: $FARM_CONTROLLER, "
                                                            "else found by zeroconf)")
    add_client_arguments(remote)

    cluster = commands.add_parser("cluster", parents=[common], help="create a cluster's certificates and tokens",
                                  description="Cluster set-up, on the controller's machine.")
    cluster_commands = cluster.add_subparsers(dest="cluster_command", metavar="ACTION")
    cluster_commands.required = True
    init = cluster_commands.add_parser(
        "init", parents=[common], help="create a cluster: CA, controller and node bundles, an admin client file",
        description="Create a cluster's own CA, the controller's and the nodes' certificates, the token table, "
                    "and an admin client file. Copy node.yaml to each node only; give people and scripts client "
                    "files (`farm cluster token add`).")
    init.add_argument("name", help="the cluster's name (letters, digits, . _ -)")
    init.add_argument("--dir", help="where to write the files (default: the config dir's cluster/)")
    init.add_argument("--url", action="append", default=[], metavar="URL",
                      help="the controller's API URL, written into the admin client file (repeatable; default: "
                           "none, clients find the controller by zeroconf or --controller)")

    token = cluster_commands.add_parser(
        "token", parents=[common], help="add, list or revoke API tokens (admin, submit, view)",
        description="API tokens with roles, kept hashed in the cluster folder's tokens.yaml, which a running "
                    "controller reads again at once: run these on the controller's machine. A new token is "
                    "written into a client file for the person or script that gets it.")
    token_commands = token.add_subparsers(dest="token_command", metavar="ACTION")
    token_commands.required = True
    add = token_commands.add_parser(
        "add", parents=[common], help="make a token and its client file",
        description="Make a token with a role and write a client file (URL(s), CA, the controller's certificate "
                    "fingerprint, the token). view reads; submit submits shipped profiles by name with the keys "
                    "they expose, into controller.destinations, and steers its own jobs; admin does everything. "
                    "--role node writes a node bundle instead (for nodes, when replacing the nodes' token).")
    add.add_argument("name", help="who gets it: a person, a script, a droplet machine (letters, digits, . _ @ -)")
    add.add_argument("--role", required=True, choices=("admin", "submit", "view", "node"),
                     help="what the token may do: view reads, submit submits and steers its own jobs, admin does "
                          "everything, node is for nodes")
    add.add_argument("--url", action="append", default=[], metavar="URL",
                     help="the controller's API URL (repeatable; default: the admin client file's)")
    add.add_argument("--out", metavar="FILE", help="where to write the client file (default: clients/NAME.yaml in "
                                                    "the cluster folder)")
    add.add_argument("--dir", help="the cluster folder (default: the config dir's cluster/)")
    listing = token_commands.add_parser("list", parents=[common], help="list tokens (names and roles, never the tokens)",
                                        description="List the cluster's tokens: name, role, when made.")
    listing.add_argument("--dir", help="the cluster folder (default: the config dir's cluster/)")
    listing.add_argument("--json", action="store_true", help="print JSON")
    revoke = token_commands.add_parser("revoke", parents=[common], help="revoke a token (at once)",
                                       description="Revoke a token: a running controller refuses it from the next "
                                                   "request on. Jobs it submitted go on.")
    revoke.add_argument("name", help="the token's name (see `farm cluster token list`)")
    revoke.add_argument("--dir", help="the cluster folder (default: the config dir's cluster/)")

    add_export_tls_parser(cluster_commands, common)

    controller = commands.add_parser(
        "controller", parents=[common], help="run the controller service",
        description="Run the controller: store, queue, Dask scheduler, HTTP API, zeroconf. SIGTERM stops it.")
    controller.add_argument("--bundle", metavar="FILE", help="controller bundle (default: controller.yaml in the "
                                                             "config dir's cluster/)")
    controller.add_argument("--scheduler", metavar="ADDRESS", help="use an existing Dask scheduler")
    controller.add_argument("--host", help="address to listen on (default from farm.yaml: 0.0.0.0)")
    controller.add_argument("--port", type=int, help="Dask scheduler port (default 8786)")
    controller.add_argument("--api-port", type=int, help="HTTP API port (default 8780)")
    controller.add_argument("--storage", metavar="DIR", help="cluster storage every node reaches")
    controller.add_argument("--no-advertise", action="store_true", help="do not announce with zeroconf")

    node = commands.add_parser(
        "node", parents=[common], help="run a service node",
        description="Run a service node: a Dask worker that finds the controller and rejoins when it comes back.")
    node.add_argument("--bundle", metavar="FILE", help="node bundle (default: $FARM_BUNDLE or node.yaml in the "
                                                       "config dir's cluster/)")
    where = node.add_mutually_exclusive_group()
    where.add_argument("--cluster", metavar="NAME", help="find this cluster's controller by zeroconf")
    where.add_argument("--controller", metavar="URL", help="the controller's API URL")
    node.add_argument("--slots", type=int, help="segments at once (default: node.slots or the CPU count)")
    node.add_argument("--name", help="node name (default: node.name or the host name)")
    node.add_argument("--part-time", metavar="HOURS", nargs="?", const="", default=None,
                      help="take work only when idle (and within HOURS such as 18:00-08:00 if given)")

    quick = commands.add_parser("quickcluster", parents=[common], help="a controller and a node on this machine",
                                description="Start a controller and one node on this machine (QuickCluster), under a cluster identity "
                                            "of its own kept in the state directory. While it runs, `farm submit`, "
                                            "`farm status`, `farm nodes`, `farm monitor` and farm.submit() on this "
                                            "machine reach it with no options; its node stops with it.")
    quick.add_argument("--slots", type=int, help="the node's slots (default: node.slots or the CPU count)")
    quick.add_argument("--host", help="address to listen on (default from farm.yaml: 0.0.0.0, so that other "
                                      "machines can submit and add nodes; 127.0.0.1 keeps it to this machine)")
    quick.add_argument("--api-port", type=int, default=8780, help="HTTPS API port (default 8780)")
    quick.add_argument("--port", type=int, default=8786, help="Dask scheduler port (default 8786)")

    submit = commands.add_parser("submit", parents=[common, remote], help="submit a batch to the controller",
                                 description="Submit a batch to a controller; --wait exits like `farm run`.")
    submit.add_argument("profile", help="a profile the controller knows by name (a path: admin tokens only)")
    submit.add_argument("inputs", nargs="*", metavar="INPUT", help="input paths as the controller sees them")
    submit.add_argument("-o", "--output", metavar="DEST", help="destination folder, as the controller sees it")
    submit.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a profile key by its dotted path (submit tokens: the keys it exposes)")
    submit.add_argument("--priority", help="high, normal, low or a number")
    submit.add_argument("--overwrite", action="store_true", help="replace outputs that already exist")
    submit.add_argument("--wait", action="store_true", help="wait for every job to end")
    submit.add_argument("--json", action="store_true", help="print one JSON document with the outcome")

    nodes = commands.add_parser("nodes", parents=[common, remote], help="list the cluster's nodes",
                                description="List the nodes connected to the controller.")
    nodes.add_argument("--json", action="store_true", help="print JSON")

    retry = commands.add_parser("retry", parents=[common, remote], help="retry a failed or cancelled job",
                                description="Queue a failed or cancelled job's unfinished segments again.")
    retry.add_argument("job", help="a job id (see `farm status`)")
    retry.add_argument("--all", action="store_true", help="run every segment again, done ones too")

    # `farm resume JOB` is in farm.cli: a paused job on a controller, or an interrupted one here
    pause = commands.add_parser("pause", parents=[common, remote], help="pause a job",
                                description="hand out no more of a job's segments (running ones finish).")
    pause.add_argument("job", help="a job id (see `farm status`)")
    priority = commands.add_parser("priority", parents=[common, remote], help="move a job up or down the queue",
                                   description="Set a job's priority: high, normal, low or a whole number.")
    priority.add_argument("job", help="a job id (see `farm status`)")
    priority.add_argument("priority", help="high, normal, low or a whole number (higher runs first)")

    for verb, description in (
            ("pause", "Pause a node: it gets no new segments; the ones it runs finish."),
            ("resume", "Resume a paused node: it gets segments again.")):
        parser = commands.add_parser(f"{verb}-node", parents=[common, remote], help=f"{verb} a node",
                                     description=description)
        parser.add_argument("node", help="the node's name (see `farm nodes`)")
    return {"cluster": cmd_cluster, "controller": cmd_controller, "node": cmd_node, "quickcluster": cmd_quickcluster,
            "submit": cmd_submit, "nodes": cmd_nodes, "retry": cmd_retry, "pause": cmd_pause_job,
            "priority": cmd_priority,
            "pause-node": cmd_pause_node, "resume-node": cmd_resume_node}


def _config(args: argparse.Namespace) -> Any:
    from farm.config import load_config

    return load_config(getattr(args, "config", None))


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--client", metavar="FILE", help="client file (default: $FARM_CLIENT, or client.yaml in the "
                                                         "config dir)")
    parser.add_argument("--bundle", metavar="FILE", help="a cluster bundle instead of a client file (older set-ups; "
                                                         "default: $FARM_BUNDLE)")


def cmd_cluster(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> ExitStatus:
    from farm.client import default_bundle_path
    from farm.security import Bundle, init_cluster

    folder = Path(args.dir).expanduser() if getattr(args, "dir", None) else default_bundle_path().parent
    if args.cluster_command == "token":
        return _token(args, folder, stdout)
    if args.cluster_command == "export-tls":
        return cmd_export_tls(args, folder, stdout)
    paths = init_cluster(args.name, folder, urls=args.url)
    fingerprint = Bundle.load(paths["controller"]).fingerprint
    print(f"cluster {args.name} created in {folder}", file=stdout)
    print(f"  controller bundle: {paths['controller']}  (keep it on the controller)", file=stdout)
    print(f"  node bundle:       {paths['node']}  (copy it to each node, and only to nodes)", file=stdout)
    print(f"  admin client file: {paths['admin']}  (yours: farm submit/status/... use it; give others their own "
          "with `farm cluster token add NAME --role view|submit|admin`)", file=stdout)
    print(f"  controller certificate fingerprint: {fingerprint}", file=stdout)
    return ExitStatus.OK


def _token(args: argparse.Namespace, folder: Path, stdout: TextIO) -> ExitStatus:
    """`farm cluster token add|list|revoke`: on the controller's machine, in its cluster folder."""
    from farm.credentials import ClientFile
    from farm.errors import UsageError
    from farm.security import Bundle
    from farm.tokens import TOKENS_NAME, TokenTable

    controller_bundle = folder / "controller.yaml"
    if not controller_bundle.exists():
        raise UsageError(f"{folder} holds no cluster (no controller.yaml): run this on the controller's machine, "
                         "with --dir the folder `farm cluster init` wrote")
    bundle = Bundle.load(controller_bundle)
    table = TokenTable(folder / TOKENS_NAME, legacy_token=bundle.token)
    if args.token_command == "list":
        entries = table.list()
        if args.json:
            print(json.dumps(entries, indent=2), file=stdout)
        for entry in [] if args.json else entries:
            note = f"  ({entry['note']})" if entry.get("note") else ""
            print(f"{entry['name']:<20} {entry['role']:<7} {entry.get('created') or '-'}{note}", file=stdout)
        return ExitStatus.OK
    if args.token_command == "revoke":
        gone = table.revoke(args.name)
        print(f"token {gone['name']} ({gone['role']}) revoked; a running controller refuses it from now on",
              file=stdout)
        return ExitStatus.OK
    secret = table.add(args.name, args.role)
    if not args.out:
        (folder / "clients").mkdir(mode=0o700, exist_ok=True)  # client files hold tokens
    if args.role == "node":
        node = Bundle.load(folder / "node.yaml")
        node.token = secret
        node.controller_fingerprint = bundle.fingerprint  # bundles made before roles had no pin
        out = Path(args.out).expanduser() if args.out else folder / "clients" / f"{args.name}.node.yaml"
        out.parent.mkdir(parents=True, exist_ok=True)
        node.save(out)
        print(f"node token {args.name} added; node bundle written to {out} (copy it to the nodes)", file=stdout)
        return ExitStatus.OK
    urls = args.url
    if not urls and (folder / "admin.yaml").exists():
        try:
            urls = ClientFile.load(folder / "admin.yaml").urls
        except UsageError:
            urls = []
    out = Path(args.out).expanduser() if args.out else folder / "clients" / f"{args.name}.yaml"
    ClientFile(bundle.cluster, args.name, args.role, secret, bundle.ca, bundle.fingerprint, list(urls)).save(out)
    print(f"token {args.name} ({args.role}) added; client file written to {out}", file=stdout)
    print(f"  give it to {args.name} (it holds the token: like a password); they use it with --client FILE, "
          f"FARM_CLIENT, or as ~/.config/farm/client.yaml", file=stdout)
    if not urls:
        print("  it names no controller URL: they pass --controller URL or find it by zeroconf "
              "(add --url https://HOST:PORT to write one in)", file=stdout)
    return ExitStatus.OK


def add_export_tls_parser(cluster_commands: Any, common: argparse.ArgumentParser) -> None:
    export = cluster_commands.add_parser(
        "export-tls", parents=[common], help="write PEM files for an outside dask scheduler and dask workers",
        description="Write the cluster's CA certificate, a certificate and key for an outside `dask scheduler` "
                    "(issued by the cluster's CA the first time, kept as scheduler.yaml) and the nodes' certificate "
                    "and key for `dask worker`s, as PEM files (mode 0600) in DIR (made 0700), and print the "
                    "commands that use them. Run it on the controller's machine; the key files are secrets.")
    export.add_argument("out", metavar="DIR", help="the folder to write ca.pem, scheduler.pem, scheduler.key, "
                                                   "worker.pem and worker.key into")
    export.add_argument("--dir", help="the cluster folder (default: the config dir's cluster/)")
    export.add_argument("--scheduler", metavar="ADDRESS", default="tls://SCHEDULER_HOST:8786",
                        help="the outside scheduler's address, as workers and the controller dial it, written into "
                             "the printed commands (default: tls://SCHEDULER_HOST:8786)")
    export.add_argument("--force", action="store_true", help="replace the files DIR already holds")


def cmd_export_tls(args: argparse.Namespace, folder: Path, stdout: TextIO) -> ExitStatus:
    """`farm cluster export-tls DIR`: the PEM files, then the commands that use them."""
    import shlex

    from farm.errors import UsageError
    from farm.security import TLS_FILES, export_tls

    address = args.scheduler if "://" in args.scheduler else f"tls://{args.scheduler}"
    port = address.rsplit(":", 1)[-1]
    if not address.startswith("tls://") or not port.isdigit():
        raise UsageError(f"--scheduler {args.scheduler!r}: expected tls://HOST:PORT")
    paths = export_tls(folder, Path(args.out).expanduser().absolute(), force=args.force)
    files = {name: shlex.quote(str(path)) for name, path in paths.items()}
    print(f"TLS files for an outside Dask deployment written to {paths['ca.pem'].parent} (mode 0600; the .key files "
          "are secrets):", file=stdout)
    for name, what in TLS_FILES.items():
        print(f"  {name:<14} {what}", file=stdout)
    http = "DASK_DISTRIBUTED__{}__HTTP__ROUTES='[\"distributed.http.health\"]'"
    tls = "--tls-ca-file {} --tls-cert {} --tls-key {}"
    print("\nthe scheduler (Farm installed; Dask's HTTP kept to the health check):", file=stdout)
    print(f"  {http.format('SCHEDULER')} dask scheduler --protocol tls --port {port} --no-dashboard "
          f"{tls.format(files['ca.pem'], files['scheduler.pem'], files['scheduler.key'])} "
          "--preload farm.daskroles", file=stdout)
    print("\neach worker (Farm, the plugins and the renderers installed; node settings from FARM_CONFIG's node:):",
          file=stdout)
    print(f"  {http.format('WORKER')} dask worker {address} --name NODE_NAME --nthreads SLOTS --memory-limit 0 "
          f"--no-dashboard {tls.format(files['ca.pem'], files['worker.pem'], files['worker.key'])} "
          "--preload farm.nodeservice --preload-nanny farm.daskroles", file=stdout)
    print("  without shared storage with the controller (node.storage: local, or auto and the inputs not seen), "
          "also FARM_NODE_BUNDLE=/path/node.yaml: a copy of the node bundle "
          f"{shlex.quote(str(folder / 'node.yaml'))} (its node token and its pin of the controller's certificate; "
          "the controller's API address comes through the cluster)", file=stdout)
    print("\nthe controller (its own bundle; farm node can join the same scheduler too):", file=stdout)
    print(f"  farm controller --scheduler {address}", file=stdout)
    return ExitStatus.OK


@collector.held()
def cmd_controller(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> ExitStatus:
    from farm.client import default_bundle_path
    from farm.controller import Controller
    from farm.security import Bundle

    config = _config(args)
    settings = config.controller
    for key, value in (("host", args.host), ("scheduler_port", args.port), ("api_port", args.api_port),
                       ("storage", args.storage)):
        if value is not None:
            setattr(settings, key, value)
    bundle = Bundle.load(args.bundle or settings.bundle or default_bundle_path("controller"))
    controller = Controller(config, bundle, getattr(args, "state", None), args.scheduler,
                            advertise=False if args.no_advertise else None)
    try:
        controller.start()
        collector.tune_for_a_queue()
        print(f"controller of cluster {bundle.cluster}: API {controller.api_url}, scheduler "
              f"{controller.dask_address}", file=stdout, flush=True)
        controller.serve_forever()
    finally:
        controller.close()
    return ExitStatus.OK


def cmd_node(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> ExitStatus:
    with collector.held():  # importing Dask and Farm is most of a node's start
        from farm.client import find_bundle
        from farm.config import PartTime
        from farm.node import require_sandbox
        from farm.nodeservice import serve_node

    config = _config(args)
    require_sandbox(config.node)
    bundle = find_bundle(args.bundle, "node")
    if args.part_time is not None:
        policy = config.node.part_time or PartTime(idle_cpu_below=25)
        if args.part_time:
            policy = policy.model_copy(update={"hours": args.part_time})
        config.node.part_time = PartTime.model_validate(policy.model_dump())
    name = args.name or config.node.name or socket.gethostname()
    slots = args.slots or config.node.slots or os.cpu_count() or 1
    print(f"node {name} ({slots} slot(s)) looking for cluster {bundle.cluster}", file=stdout, flush=True)
    parent = os.environ.get(NODE_PARENT_ENV)  # set by `farm quickcluster`: its node dies with it
    serve_node(config, bundle, controller_url=args.controller, cluster=args.cluster, name=name, slots=slots,
               announce=lambda line: print(line, file=stdout, flush=True),
               parent=int(parent) if parent and parent.isdigit() else None)
    return ExitStatus.OK


NODE_PARENT_ENV = "FARM_NODE_PARENT"
QUICK_PREFIX = "quickcluster"


def _quickcluster_identity(folder: Path) -> Any:
    """The quickcluster's cluster files, made once per state directory under a name of its
    own (host and a short id), so that two on one network never meet."""
    import secrets
    import shutil

    from farm.security import Bundle, init_cluster

    if (folder / "controller.yaml").exists():
        bundle = Bundle.load(folder / "controller.yaml")
        if bundle.cluster != QUICK_PREFIX:
            return bundle
        shutil.rmtree(folder)  # made by an older Farm under the name every quickcluster shared
    host = "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname().split(".")[0]) or "host"
    init_cluster(f"{QUICK_PREFIX}-{host}-{secrets.token_hex(3)}", folder)
    return Bundle.load(folder / "controller.yaml")


def cmd_quickcluster(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> ExitStatus:
    from farm.config import make_state_dir, state_dir
    from farm.controller import Controller
    from farm.credentials import ClientFile, QuickclusterClientFile

    config = _config(args)
    client_file = QuickclusterClientFile()  # refuses a second quickcluster on this machine
    node = None
    controller = None
    try:
        folder = make_state_dir(state_dir(getattr(args, "state", None))) / "quickcluster"
        bundle = _quickcluster_identity(folder)
        if args.host is not None:
            config.controller.host = args.host
        config.controller.api_port = args.api_port
        config.controller.scheduler_port = args.port
        controller = Controller(config, bundle, getattr(args, "state", None),
                                advertise=config.controller.advertise and not _loopback(config.controller.host))
        controller.start()
        port = controller.api_url.rsplit(":", 1)[1]
        local_url = f"https://127.0.0.1:{port}" if not _loopback(config.controller.host) else controller.api_url
        admin = ClientFile.load(folder / "admin.yaml")
        admin.urls = [local_url]
        client_file.write(admin)
        command = [sys.executable, "-m", "farm.cli", "node", "--bundle", str(folder / "node.yaml"),
                   "--controller", local_url, "--name", f"{socket.gethostname()}-quick"]
        if args.slots:
            command += ["--slots", str(args.slots)]
        if getattr(args, "config", None):
            command += ["--config", args.config]
        if getattr(args, "debug", False):
            command.append("--debug")
        # Its own session: Ctrl-C in this terminal reaches this process only, which stops
        # the node; and the node stops by itself once this process is gone, however it ended.
        node = subprocess.Popen(command, env={**os.environ, NODE_PARENT_ENV: str(os.getpid())},
                                start_new_session=True)
        _banner(stdout, bundle.cluster, controller.api_url, client_file.path, folder, config.controller.host)
        controller.serve_forever()
    finally:
        try:
            if node is not None:
                node.terminate()
                try:
                    node.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    node.kill()
            if controller is not None:
                controller.close()
        finally:
            client_file.close()
    return ExitStatus.OK


def _loopback(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1")


def _banner(stdout: TextIO, cluster: str, url: str, client_file: Path, folder: Path, host: str) -> None:
    lines = [f"quickcluster {cluster}: API {url}; Ctrl-C stops it (and its node)",
             "on this machine, farm submit, status, nodes, monitor and farm.submit() find it by themselves while "
             f"it runs (through {client_file})"]
    if _loopback(host):
        lines.append(f"it listens on {host} only: other machines cannot reach it (--host 0.0.0.0 lets them)")
    else:
        lines += [f"from another machine, with {folder / 'admin.yaml'} copied there (it holds the admin token):",
                  f"  farm submit PROFILE INPUT... -o DEST --wait --client admin.yaml --controller {url}",
                  f"  farm monitor --client admin.yaml --controller {url}",
                  f"to add a node, with {folder / 'node.yaml'} copied to it (inputs and outputs at the same paths):",
                  f"  farm node --bundle node.yaml --controller {url}"]
    print("\n".join(lines), file=stdout, flush=True)


def _client(args: argparse.Namespace) -> Any:
    from farm.client import ControllerClient, find_credentials

    return ControllerClient(find_credentials(args.client, args.bundle), args.controller)


def cmd_submit(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> ExitStatus:
    client = _client(args)
    inputs = [str(Path(p).expanduser().absolute()) for p in args.inputs]
    destination = str(Path(args.output).expanduser().absolute()) if args.output else None
    answer = client.submit(profile=args.profile, inputs=inputs, destination=destination,
                           overrides=args.overrides, overwrite=args.overwrite, priority=args.priority)
    jobs = answer["jobs"]
    if args.wait:
        jobs = client.wait([job["id"] for job in jobs])
    report = {"batch": answer["batch"], "jobs": [
        {"id": j["id"], "input": j["input"], "state": j["state"], "outputs": j["outputs"],
         "segments": j.get("segments"), "error": j["error"] if j["state"] != "done" else None} for j in jobs]}
    if args.json:
        print(json.dumps(report, indent=2), file=stdout)
    else:
        print(f"batch {report['batch']}", file=stdout)
        for job in report["jobs"]:
            print(f"  {job['id']}  {job['state']:<9}  {job['input'] or '(no input)'}", file=stdout)
            if job["error"]:
                print(f"    reason: {job['error']}", file=stdout)
    if not args.wait or all(job["state"] == "done" for job in report["jobs"]):
        return ExitStatus.OK
    return ExitStatus.JOB_FAILED


def cmd_nodes(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> ExitStatus:
    nodes = _client(args).request("GET", "/api/nodes")
    if args.json:
        print(json.dumps(nodes, indent=2), file=stdout)
        return ExitStatus.OK
    if not nodes:
        print("no nodes connected", file=stdout)
    for node in nodes:
        if node.get("farm") is False:  # a Dask worker connected to the scheduler without a farm node in it
            print(f"{node['name']}  {node['state']}  {node['slots']} thread(s)  {node['address']}", file=stdout)
            print(f"    {node['reason']}", file=stdout)
            continue
        offers = ", ".join(f"{k} {v}".strip() for k, v in sorted(node["capabilities"].items()))
        reason = f" ({node['reason']})" if node["reason"] else ""
        print(f"{node['name']}  {node['state']}{reason}  {node['running']}/{node['slots']} slots  {offers}", file=stdout)
        if node.get("transfers"):  # a node without shared storage
            from farm.transfer import describe_node_transfers

            print(f"    {describe_node_transfers(node['transfers'])}", file=stdout)
    return ExitStatus.OK


def cmd_retry(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> ExitStatus:
    answer = _client(args).request("POST", f"/api/jobs/{args.job}/retry",
                                   {"segments": "all" if args.all else "failed"})
    print(f"job {args.job}: {answer['segments_queued']} segment(s) queued again", file=stdout)
    return ExitStatus.OK


def cmd_pause_job(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> ExitStatus:
    _client(args).request("POST", f"/api/jobs/{args.job}/pause")
    print(f"job {args.job} paused (segments already running finish)", file=stdout)
    return ExitStatus.OK


def cmd_priority(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> ExitStatus:
    priority: str | int = int(args.priority) if args.priority.lstrip("-").isdigit() else args.priority
    answer = _client(args).request("POST", f"/api/jobs/{args.job}/priority", {"priority": priority})
    print(f"job {args.job} priority {answer['priority']}", file=stdout)
    return ExitStatus.OK


def _pause(args: argparse.Namespace, stdout: TextIO, paused: bool) -> ExitStatus:
    _client(args).request("POST", f"/api/nodes/{args.node}/{'pause' if paused else 'resume'}")
    print(f"node {args.node} {'paused' if paused else 'resumed'}", file=stdout)
    return ExitStatus.OK


def cmd_pause_node(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> ExitStatus:
    return _pause(args, stdout, True)


def cmd_resume_node(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> ExitStatus:
    return _pause(args, stdout, False)


__all__ = ["add_commands"]
