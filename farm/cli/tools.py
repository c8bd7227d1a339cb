"""`farm plugins` and `farm doctor`: what is installed, and what is wrong with this machine;
`farm purge`: old finished jobs out of the store.

Doctor is a list of small checks; each says what it found and, for a problem, what to do.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, TextIO

from farm.errors import ExitStatus, FarmError


def add_commands(commands: Any, common: argparse.ArgumentParser) -> dict[str, Any]:
    plugins = commands.add_parser("plugins", parents=[common], help="list loaded plugins and failures",
                                  description="Plugins, their versions, processors and hooks; failures with reasons.")
    plugins.add_argument("--json", action="store_true", help="print JSON")
    doctor = commands.add_parser("doctor", parents=[common], help="check this machine",
                                 description="Check ffmpeg, renderers, the state dir, the configuration, the "
                                             "sandbox, plugins and the client file (or cluster bundle); say what "
                                             "to do about each problem.")
    doctor.add_argument("--json", action="store_true", help="print JSON")
    purge = commands.add_parser(
        "purge", parents=[common], help="remove old finished jobs, their logs and work folders",
        description="Remove the jobs that ended (done, failed, cancelled) longer ago than --older-than from the "
                    "store of this state directory, with their segments, attempt logs and events, and their work "
                    "folders. Unfinished jobs are never touched, nor outputs in destinations. A controller does "
                    "this by itself with controller.retention in farm.yaml.")
    purge.add_argument("--older-than", required=True, metavar="AGE",
                       help="how long ago a job must have ended: 30d, 2w, 12h, 90m")
    purge.add_argument("--dry-run", action="store_true", help="list what would be removed; remove nothing")
    purge.add_argument("--json", action="store_true", help="print the jobs as JSON")
    return {"plugins": cmd_plugins, "doctor": cmd_doctor, "purge": cmd_purge}


def cmd_purge(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> ExitStatus:
    import datetime

    from farm.config import state_dir
    from farm.errors import UsageError
    from farm.local import STORE_NAME
    from farm.purge import as_json, parse_age, purge
    from farm.store import Store

    try:
        age = parse_age(args.older_than)
    except ValueError as exc:
        raise UsageError(f"--older-than: {exc}") from None
    path = state_dir(getattr(args, "state", None)) / STORE_NAME
    if not path.exists():
        raise UsageError(f"no store at {path}: nothing has run with this state directory yet")
    store = Store(path)
    try:
        jobs = purge(store, age, dry_run=args.dry_run)
    finally:
        store.close()
    if args.json:
        print(json.dumps({"dry_run": args.dry_run, "jobs": as_json(jobs)}, indent=2), file=stdout)
        return ExitStatus.OK
    verb = "would remove" if args.dry_run else "removed"
    folders = sum(1 for job in jobs if job.work_folder)
    print(f"{verb} {len(jobs)} job(s) that ended more than {args.older_than} ago, with their logs, and "
          f"{folders} work folder(s)" + (" (--dry-run: nothing was removed)" if args.dry_run else ""), file=stdout)
    for job in jobs:
        ended = datetime.datetime.fromtimestamp(job.ended).strftime("%Y-%m-%d %H:%M")
        print(f"  {job.id}  {job.state:<9}  ended {ended}  {job.profile}  {job.input or '(no input)'}", file=stdout)
    return ExitStatus.OK


def cmd_plugins(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> ExitStatus:
    import importlib.metadata

    from farm.plugins import ENTRY_POINT_GROUP, load_plugins

    loaded = load_plugins()
    versions = {ep.name: (ep.dist.name, ep.dist.version) if ep.dist else ("?", "?")
                for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    rows = []
    for name, plugin in loaded.manager.list_name_plugin():
        hooks = sorted(caller.name for caller in loaded.manager.get_hookcallers(plugin) or [])
        provided = []
        if hasattr(plugin, "farm_processors"):
            try:
                provided = [p.name for p in plugin.farm_processors()]
            except Exception as exc:  # already reported as a failure when loading
                provided = [f"(error: {exc})"]
        dist, version = versions.get(name, ("", ""))
        rows.append({"name": name, "distribution": dist, "version": version, "processors": provided, "hooks": hooks})
    failures = [asdict(failure) for failure in loaded.failures]
    if args.json:
        print(json.dumps({"plugins": rows, "failures": failures}, indent=2), file=stdout)
        return ExitStatus.OK
    for row in rows:
        print(f"{row['name']}  {row['distribution']} {row['version']}  processors: {', '.join(row['processors']) or '-'}"
              f"  hooks: {', '.join(row['hooks'])}", file=stdout)
    for failure in failures:
        print(f"FAILED {failure['name']}: {failure['reason']}", file=stdout)
    return ExitStatus.OK


@dataclass
class Check:
    name: str
    ok: bool
    found: str
    fix: str = ""
    required: bool = True


def _version(command: list[str], pattern: str) -> str | None:
    if shutil.which(command[0]) is None:
        return None
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(pattern, done.stdout + done.stderr)
    return match.group(1) if match else "unknown version"


def check_ffmpeg(args: argparse.Namespace) -> list[Check]:
    checks = []
    for tool in ("ffmpeg", "ffprobe"):
        version = _version([tool, "-version"], rf"{tool} version (\S+)")
        checks.append(Check(tool, version is not None, version or "not found",
                            "install it: sudo apt-get install ffmpeg (./setup does this)"))
    if checks[0].ok:
        encoders = subprocess.run(["ffmpeg", "-hide_banner", "-encoders"], capture_output=True, text=True).stdout
        for encoder in ("libx264", "aac", "png"):
            present = re.search(rf"^\s*\S+\s+{encoder}\s", encoders, re.M) is not None
            checks.append(Check(f"ffmpeg encoder {encoder}", present, "present" if present else "missing",
                                "install an ffmpeg build with it (Debian's ffmpeg has it)"))
    return checks


def check_renderers(args: argparse.Namespace) -> list[Check]:
    found = []
    for name, command, pattern in (("povray", ["povray", "--version"], r"POV-Ray\s+(\d+(?:\.\d+)+)"),
                                   ("blender", ["blender", "--version"], r"Blender\s+(\d+(?:\.\d+)+)")):
        version = _version(command, pattern)
        found.append(Check(name, version is not None, version or "not found",
                           f"install it for {name} renders: sudo apt-get install {name}", required=False))
    return found


def check_state(args: argparse.Namespace) -> list[Check]:
    from farm.config import make_state_dir, state_dir

    folder = state_dir(getattr(args, "state", None))
    try:
        make_state_dir(folder)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as exc:
        return [Check("state directory", False, f"{folder}: {exc.strerror or exc}",
                      "make it writable, or choose another with --state DIR or FARM_STATE")]
    return [Check("state directory", True, f"{folder} (writable)")]


def check_config(args: argparse.Namespace) -> list[Check]:
    from farm.config import load_config

    try:
        config = load_config(getattr(args, "config", None))
    except FarmError as exc:
        return [Check("configuration", False, str(exc), "fix farm.yaml as the message says")]
    checks = [Check("configuration", True, "valid")]
    for entry in config.node.allow_commands:
        present = shutil.which(entry) is not None
        checks.append(Check(f"allowed command {entry}", present, "found" if present else "not on PATH",
                            f"install {entry} or remove it from node.allow_commands", required=False))
    return checks


def check_sandbox(args: argparse.Namespace) -> list[Check]:
    from farm import sandbox
    from farm.config import load_config

    try:
        config = load_config(getattr(args, "config", None))
    except FarmError:
        return []  # the configuration check says what is wrong with it
    if not config.node.sandbox:
        return [Check("sandbox", False, "off (node.sandbox: off): segment processes run with this node's full rights",
                      "install bubblewrap and remove node.sandbox: off from farm.yaml", required=False)]
    usable = sandbox.availability()
    if usable.ok:
        return [Check("sandbox", True, f"{usable.found} (segment processes run contained)")]
    return [Check("sandbox", False, usable.found,
                  "install bubblewrap (sudo apt-get install bubblewrap; ./setup does this), or set "
                  "node.sandbox: off in farm.yaml for a node that cannot use it")]


def check_plugins(args: argparse.Namespace) -> list[Check]:
    from farm.plugins import load_plugins

    loaded = load_plugins()
    checks = [Check("processors", bool(loaded.processors), ", ".join(sorted(loaded.processors)) or "none",
                    "reinstall farm: .venv/bin/pip install -e .")]
    for failure in loaded.failures:
        checks.append(Check(f"plugin {failure.name}", False, failure.reason,
                            "fix or uninstall the plugin (see `farm plugins`)"))
    return checks


def check_cluster(args: argparse.Namespace) -> list[Check]:
    from farm.client import ControllerClient, NoCredentials, find_credentials

    try:
        credentials = find_credentials()
    except NoCredentials:
        return [Check("client file", True, "none (this machine runs batches on its own)", required=False)]
    except FarmError as exc:
        return [Check("client file", False, str(exc), "ask the farm's admin for a client file again "
                                                      "(`farm cluster token add NAME --role ...`)")]
    kind = "cluster bundle" if hasattr(credentials, "key") else f"client file ({credentials.role})"
    checks = [Check(kind, True, f"cluster {credentials.cluster} ({credentials.path})")]
    try:
        info = ControllerClient(credentials, timeout=10).request("GET", "/api/cluster")
        checks.append(Check("controller", True, f"{info['api']} (scheduler {info['scheduler']})"))
    except FarmError as exc:
        checks.append(Check("controller", False, str(exc),
                            "start `farm controller`, or pass its URL with FARM_CONTROLLER; zeroconf needs "
                            "multicast between this machine and the controller"))
    return checks


CHECKS: list[Callable[[argparse.Namespace], list[Check]]] = [
    check_ffmpeg, check_renderers, check_state, check_config, check_sandbox, check_plugins, check_cluster,
]


def cmd_doctor(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> ExitStatus:
    results = [check for run in CHECKS for check in run(args)]
    problems = [check for check in results if not check.ok and check.required]
    if args.json:
        print(json.dumps({"ok": not problems, "checks": [asdict(c) for c in results]}, indent=2), file=stdout)
    else:
        for check in results:
            mark = "ok  " if check.ok else ("FAIL" if check.required else "warn")
            print(f"{mark}  {check.name}: {check.found}", file=stdout)
            if not check.ok:
                print(f"      -> {check.fix}", file=stdout)
        print("healthy" if not problems else f"{len(problems)} problem(s)", file=stdout)
    return ExitStatus.OK if not problems else ExitStatus.JOB_FAILED
