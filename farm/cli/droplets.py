"""``farm watch`` (one droplet on the embedded default) and ``farm droplets`` (what they did)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from farm.errors import ExitStatus, UsageError


def add_commands(commands: Any, common: argparse.ArgumentParser) -> dict[str, Any]:
    watch = commands.add_parser(
        "watch", parents=[common], help="watch a folder and run a profile on every file dropped into it",
        description="Watch a folder (a droplet) on this machine (the embedded default engine, as `farm run`): every file dropped into it becomes a job, "
                    "exactly once. Runs until Ctrl-C or SIGTERM (the first lets jobs in flight finish, the second "
                    "cancels them); --once takes the files present now and exits. A folder has one watcher: a "
                    "second one, whatever its state directory, is refused with a message naming the first.")
    watch.add_argument("folder", metavar="DIR", help="the folder to watch")
    watch.add_argument("--profile", required=True, help="profile name or path to a YAML file")
    watch.add_argument("-o", "--output", metavar="DEST", required=True,
                       help="destination folder for outputs (never inside DIR)")
    watch.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a profile key by its dotted path (repeatable)")
    watch.add_argument("--settle", metavar="S", help="seconds a file's size and mtime must hold before it is taken "
                                                      "(default 2)")
    watch.add_argument("--polling", action="store_true",
                       help="poll instead of native events (network shares; chosen by itself on nfs/cifs/sshfs/fuse)")
    watch.add_argument("--poll-interval", metavar="S", help="seconds between polls (default 1)")
    watch.add_argument("--after", choices=["leave", "move", "delete"], default="move",
                       help="what happens to a processed file: leave it, move it to DIR/done/ (default), delete it")
    watch.add_argument("--recursive", action="store_true", help="watch sub-folders too")
    watch.add_argument("--include", action="append", metavar="PATTERN", help="take only names matching (repeatable)")
    watch.add_argument("--exclude", action="append", metavar="PATTERN", help="leave names matching (repeatable)")
    watch.add_argument("--name", help="how the droplet is shown (default: the folder's path)")
    watch.add_argument("--once", action="store_true", help="process the files present now, then exit")
    watch.add_argument("--quiet", action="store_true", help="print nothing per file")

    droplets = commands.add_parser(
        "droplets", parents=[common], help="list droplets, their state and recent submissions",
        description="List the droplets of farm.yaml and those that ran with this state directory (farm watch), "
                    "with their state and recent files.")
    droplets.add_argument("--recent", type=int, default=5, metavar="N", help="files shown per droplet (default 5)")
    droplets.add_argument("--json", action="store_true", help="print JSON")
    return {"watch": cmd_watch, "droplets": cmd_droplets}


# -- farm watch -------------------------------------------------------------------------------


def cmd_watch(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> ExitStatus:
    from pydantic import ValidationError

    from farm.config import load_config, state_dir
    from farm.droplets.config import DropletConfig
    from farm.droplets.lock import FolderLock, FolderLocked
    from farm.droplets.service import DropletService, prepare_droplets
    from farm.local import LocalFarm, check_runnable
    from farm.node import install_runtime
    from farm.plugins import load_plugins

    config = load_config(getattr(args, "config", None))
    plugins = load_plugins()
    raw: dict[str, Any] = {"folder": args.folder, "profile": args.profile, "destination": args.output,
                           "set": args.overrides, "after": args.after, "recursive": args.recursive,
                           "observer": "polling" if args.polling else "auto"}
    for key, value in (("name", args.name), ("settle", args.settle), ("poll_interval", args.poll_interval),
                       ("include", args.include), ("exclude", args.exclude)):
        if value is not None:
            raw[key] = value
    try:
        droplet = DropletConfig.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(part) for part in first["loc"]) or "watch"
        raise UsageError(f"{key}: {first['msg'].removeprefix('Value error, ')}") from None
    prepared = prepare_droplets([droplet], plugins, require_folders=True)
    node = install_runtime(config.node)
    check_runnable(prepared[0].loaded, plugins, [None], node.capabilities)
    # One watcher per folder, whatever its state directory: refused before anything starts.
    lock = FolderLock(droplet.folder, state_dir(getattr(args, "state", None)), droplet.label)
    try:
        lock.acquire()
    except FolderLocked as exc:
        raise UsageError(str(exc)) from None
    prepared[0].lock = lock

    def say(line: str) -> None:
        try:
            print(line, file=stdout, flush=True)
        except BrokenPipeError:  # the reader left (`farm watch ... | head`): stop as after one Ctrl-C
            from farm.pipes import silence

            silence(stdout)
            if "pipe" not in stops:
                stops.append("pipe")

    def on_event(kind: str, name: str, path: str, job_id: str | None, detail: str) -> None:
        if args.quiet:
            return
        shown = os.path.relpath(path, droplet.folder) if path.startswith(str(droplet.folder)) else path
        if kind == "queued":
            say(f"queued     {shown}  job {job_id}")
        elif kind == "processed":
            say(f"done       {shown}  job {job_id}" + (f"  -> {detail}" if detail else ""))
        elif kind == "failed":
            say(f"failed     {shown}  job {job_id or '-'}: {detail}")
        elif kind == "skipped":
            say(f"skipped    {shown}: {detail}")

    try:
        farm = LocalFarm.start(config, plugins, getattr(args, "state", None), node, owner="farm watch")
    except BaseException:
        lock.release()
        raise
    service = DropletService(farm.scheduler, prepared, on_event=on_event, once=args.once)
    stops: list[Any] = []  # one entry per Ctrl-C or SIGTERM
    wake = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stops.append(signum)
        if len(stops) > 2:
            raise KeyboardInterrupt
        wake.set()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        service.start()
        watch = service.droplets[0].watch
        if watch.state == "refused":
            raise UsageError(watch.message)
        if args.once:
            print(f"farm: taking the files in {droplet.folder} with profile {prepared[0].loaded.profile.name} "
                  f"-> {prepared[0].destination}", file=stderr, flush=True)
        else:
            print(f"farm: watching {droplet.folder} with profile {prepared[0].loaded.profile.name} -> "
                  f"{prepared[0].destination} ({watch.message}; settle {droplet.settle:g} s; after: {droplet.after}); "
                  "Ctrl-C to stop", file=stderr, flush=True)
        handled = 0
        while True:
            service.pump()
            farm.scheduler.step(wait=0.1)
            if args.once and service.idle:
                break
            if len(stops) != handled:
                handled = len(stops)
                if handled == 1:
                    service.stop_intake()
                    if not service.pending:
                        break
                    print(f"farm: stopping; waiting for {len(service.pending)} job(s) in flight "
                          "(Ctrl-C again to cancel them)", file=stderr, flush=True)
                elif handled == 2:
                    print(f"farm: cancelling {len(service.pending)} job(s) in flight", file=stderr, flush=True)
                    service.cancel_pending("farm watch was stopped before it finished")
            if handled and not service.pending:
                break
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        try:
            service.close()
        finally:
            lock.release()
            farm.close()
    counts = service.droplets[0].counts
    if args.once or not args.quiet:
        print(f"farm: {counts['queued']} queued, {counts['processed']} processed, {counts['failed']} failed, "
              f"{counts['skipped']} skipped", file=stderr, flush=True)
    if stops and stops[0] == signal.SIGINT:
        return ExitStatus.INTERRUPTED
    if stops and stops[0] == "pipe":
        return ExitStatus.BROKEN_PIPE
    if args.once and counts["failed"]:
        return ExitStatus.JOB_FAILED
    return ExitStatus.OK


# -- farm droplets ------------------------------------------------------------------------------


def cmd_droplets(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> ExitStatus:
    from farm.config import load_config, state_dir
    from farm.local import STORE_NAME
    from farm.store import Store

    config = load_config(getattr(args, "config", None))
    path = state_dir(getattr(args, "state", None)) / STORE_NAME
    store = Store(path) if path.exists() else None
    try:
        docs = droplet_docs(config.droplets, store, args.recent)
    finally:
        if store is not None:
            store.close()
    if args.json:
        print(json.dumps(docs, indent=2), file=stdout)
        return ExitStatus.OK
    if not docs:
        print("no droplets: add a droplets: list to farm.yaml, or run `farm watch DIR --profile P -o DEST`",
              file=stdout)
        return ExitStatus.OK
    for doc in docs:
        print(f"{doc['name']}  [{doc['state']}]" + (f"  {doc['message']}" if doc["message"] else ""), file=stdout)
        print(f"  folder {doc['folder']} -> {doc['destination'] or '?'}  profile {doc['profile'] or '?'}"
              f"  ({doc['source']})", file=stdout)
        for item in doc["recent"]:
            when = datetime.fromtimestamp(item["updated"]).strftime("%Y-%m-%d %H:%M:%S")
            line = f"    {when}  {item['state']:<9}  {Path(item['path']).name}"
            if item["job"]:
                line += f"  job {item['job']}"
            if item["reason"]:
                line += f"  ({item['reason']})"
            print(line, file=stdout)
    return ExitStatus.OK


def droplet_docs(configured: list[Any], store: Any, recent: int) -> list[dict[str, Any]]:
    """One document per droplet: from farm.yaml, then the ones only the store knows (farm watch)."""
    reports = {row["folder"]: row for row in store.droplet_states()} if store is not None else {}
    docs = []
    seen = set()
    for config in configured:
        seen.add(config.key)
        docs.append(_doc(config.key, config.label, "farm.yaml", reports.get(config.key), store, recent,
                         profile=config.profile, destination=str(config.destination), enabled=config.enabled))
    for key, row in reports.items():
        if key not in seen:
            docs.append(_doc(key, row["name"], "farm watch", row, store, recent))
    return docs


def _doc(key: str, name: str, source: str, report: Any, store: Any, recent: int, *, profile: str | None = None,
         destination: str | None = None, enabled: bool = True) -> dict[str, Any]:
    from farm.droplets.service import STALE_SECONDS

    info = json.loads(report["info"]) if report is not None and report["info"] else {}
    state, message = "not running", ""
    if not enabled:
        state = "disabled"
    elif report is not None:
        alive = report["state"] != "stopped" and time.time() - report["updated"] < STALE_SECONDS * 3
        if alive and report["host"] == socket.gethostname() and report["pid"] and not _pid_alive(report["pid"]):
            alive = False
        if alive:
            state, message = report["state"], report["message"] or ""
            message += f" (run by pid {report['pid']} on {report['host']})"
    rows = store.droplet_files(key, recent) if store is not None else []
    return {
        "name": name, "folder": key, "source": source, "state": state, "message": message,
        "profile": profile or info.get("profile"), "destination": destination or info.get("destination"),
        "counts": {k: info[k] for k in ("queued", "processed", "failed", "skipped", "pending") if k in info},
        "recent": [{"path": row["path"], "state": row["state"], "job": row["job_id"], "reason": row["reason"],
                    "moved_to": row["moved_to"], "updated": row["updated"]} for row in rows],
    }


def _pid_alive(pid: int) -> bool:
    from farm.lease import pid_alive

    return pid_alive(pid, None)

