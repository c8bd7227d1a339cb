"""The ``farm`` command.

One error boundary: every error a user can cause prints as ``farm: error: ...`` with
a typed exit status (see :class:`farm.errors.ExitStatus`); a traceback only with
``--debug``. Only ``--json`` documents go to stdout when ``--json`` is given.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import signal
import sys
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import yaml

from farm import __version__
from farm.errors import ExitStatus, FarmError, UsageError

log = logging.getLogger("farm.cli")


# -- arguments --------------------------------------------------------------------------


def _common() -> argparse.ArgumentParser:
    """Options accepted before or after the command (``farm --state X run`` or ``farm run --state X``)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state", metavar="DIR", default=argparse.SUPPRESS,
                        help="state directory holding the store (default: $FARM_STATE or the platform's state dir)")
    common.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                        help="farm.yaml to use (default: $FARM_CONFIG or the user's config dir)")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks and debug logs")
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(
        prog="farm", parents=[common],
        description="Farm: a plugin-based render farm. Cuts jobs into segments and runs them on Dask.",
    )
    parser.add_argument("--version", action="version", version=f"farm {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    run = commands.add_parser("run", parents=[common], help="run a batch to completion on this machine",
                              description="Run a batch (one job per input) on the embedded default and wait for it.")
    _submission_arguments(run)
    run.add_argument("-o", "--output", metavar="DEST", help="destination folder (default: the profile's, else ./out)")
    run.add_argument("--overwrite", action="store_true", help="replace outputs that already exist")
    run.add_argument("--json", action="store_true", help="print one JSON document with the outcome on stdout")
    run.add_argument("--quiet", action="store_true", help="no progress bars")

    plan = commands.add_parser("plan", parents=[common], help="show the segments a batch would have",
                               description="Plan a batch and show its segments; nothing runs and nothing is stored.")
    _submission_arguments(plan)
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.add_argument("-o", "--output", metavar="DEST", help="destination the batch would write to")
    plan.add_argument("--overwrite", action="store_true", help="plan as if existing outputs may be replaced")

    profiles = commands.add_parser("profiles", parents=[common], help="list, show and validate profiles",
                                   description="Find, show and check job profiles.")
    profile_commands = profiles.add_subparsers(dest="profiles_command", metavar="ACTION")
    profile_commands.required = True
    profile_commands.add_parser("list", parents=[common], help="list the profiles Farm can find",
                                description="List profiles in ./profiles, the user's config dir and the shipped ones.")
    show = profile_commands.add_parser("show", parents=[common], help="show a profile with extends and defaults applied",
                                       description="Show a profile after extends, overrides and defaults.")
    show.add_argument("name", help="profile name or path")
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a key by its dotted path")
    validate = profile_commands.add_parser("validate", parents=[common], help="check profile files",
                                           description="Check profile files; exits 2 when any is invalid.")
    validate.add_argument("files", nargs="+", metavar="FILE")

    status = commands.add_parser("status", parents=[common], help="show jobs in the store",
                                 description="Show jobs (or one job with its segments) from the store.")
    status.add_argument("job", nargs="?", help="a job id")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.add_argument("--watch", action="store_true",
                        help="show the jobs live until Ctrl-C (with a job id: until that job ends; exit status 1 "
                             "unless it is done)")
    _remote_arguments(status)

    cancel = commands.add_parser("cancel", parents=[common], help="cancel a job",
                                 description="Ask the process running a job to cancel it.")
    cancel.add_argument("job", help="a job id")
    _remote_arguments(cancel)
    for module_name in COMMAND_MODULES:
        module = importlib.import_module(module_name)
        COMMANDS.update(module.add_commands(commands, common))
    return parser


#: Modules that add commands: each has ``add_commands(subparsers, common) -> {name: handler}``,
#: and imports anything heavy inside its handlers so that ``farm --help`` stays fast.
COMMAND_MODULES: tuple[str, ...] = ("farm.cluster_cli", "farm.droplets.cli", "farm.tools_cli", "farm.scaffold",
                                     "farm.monitor_cli")


def _remote_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--controller", metavar="URL",
                        help="ask this controller instead of the local store (default: $FARM_CONTROLLER)")
    parser.add_argument("--bundle", metavar="FILE", help="cluster bundle for --controller (default: $FARM_BUNDLE)")


def _remote(args: argparse.Namespace) -> Any:
    """A controller client when one is named, else None (the local store is used)."""
    import os

    if not (args.controller or os.environ.get("FARM_CONTROLLER")):
        return None
    from farm.client import ControllerClient, find_bundle

    return ControllerClient(find_bundle(args.bundle), args.controller)


def _submission_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("profile", help="profile name (see `farm profiles list`) or path to a YAML file")
    parser.add_argument("inputs", nargs="*", metavar="INPUT", help="input files, one job each")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a profile key by its dotted path, e.g. segment.frames=5 (repeatable)")


# -- the error boundary --------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(argv, sys.stdout, sys.stderr)


def run_cli(argv: Sequence[str] | None, stdout: TextIO, stderr: TextIO) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    handler = logging.StreamHandler(stderr)
    # Dask sets its own loggers to INFO; the handler's level keeps their chatter out.
    handler.setLevel(logging.DEBUG if debug else logging.WARNING)
    handler.setFormatter(logging.Formatter("farm: %(levelname)s: %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    if debug:
        logging.getLogger().setLevel(logging.DEBUG)

    def show_warning(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        if debug or category is UserWarning:
            print(f"farm: warning: {message}", file=stderr)

    previous_showwarning, warnings.showwarning = warnings.showwarning, show_warning
    try:
        return int(COMMANDS[args.command](args, stdout, stderr))
    except FarmError as exc:
        if debug:
            raise
        print(f"farm: error: {exc}", file=stderr)
        return int(exc.exit_status)
    except KeyboardInterrupt:
        print("farm: interrupted", file=stderr)
        return int(ExitStatus.INTERRUPTED)
    except Exception as exc:
        if debug:
            raise
        print(f"farm: internal error: {type(exc).__name__}: {exc} (run again with --debug for the traceback, "
              "and please report it)", file=stderr)
        return int(ExitStatus.INTERNAL)
    finally:
        logging.getLogger().removeHandler(handler)
        warnings.showwarning = previous_showwarning


# -- commands ------------------------------------------------------------------------------


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    from farm.config import load_config
    from farm.plugins import load_plugins

    return load_config(getattr(args, "config", None)), load_plugins()


def cmd_run(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> ExitStatus:
    from farm.local import LocalFarm, check_destination, check_inputs, check_runnable
    from farm.model import JobState
    from farm.node import install_runtime, require_sandbox
    from farm.profiles import load_profile

    config, plugins = _load(args)
    loaded = load_profile(args.profile, plugins, args.overrides, allow_env=config.node.allow_env)
    inputs = check_inputs(loaded, plugins, args.inputs)
    destination = check_destination(args.output or loaded.profile.destination or "out")
    require_sandbox(config.node)
    node = install_runtime(config.node)
    check_runnable(loaded, plugins, inputs, node.capabilities)

    farm = LocalFarm.start(config, plugins, getattr(args, "state", None), node)
    interrupted = threading.Event()
    try:
        scheduler = farm.scheduler
        batch_id, job_ids = scheduler.submit(loaded, inputs, destination, origin="cli", overwrite=args.overwrite)

        def on_interrupt(signum: int, frame: Any) -> None:
            if interrupted.is_set():
                raise KeyboardInterrupt
            interrupted.set()
            print("farm: cancelling the batch (Ctrl-C again to quit at once)", file=stderr)
            for job_id in job_ids:
                scheduler.cancel(job_id)

        previous = signal.signal(signal.SIGINT, on_interrupt) if threading.current_thread() is threading.main_thread() else None
        try:
            with _progress(scheduler, job_ids, stderr, enabled=not args.quiet):
                scheduler.run_until_done(job_ids)
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        jobs = [scheduler.jobs[job_id] for job_id in scheduler.family(job_ids)]
        report = {
            "batch": batch_id,
            "jobs": [
                {
                    "id": rt.job.id,
                    "input": str(rt.job.input) if rt.job.input else None,
                    "state": str(rt.state),
                    "outputs": rt.outputs,
                    "segments": len(rt.segments),
                    "error": rt.error if rt.state != JobState.DONE else None,
                }
                for rt in jobs
            ],
        }
    finally:
        farm.close()
    if args.json:
        print(json.dumps(report, indent=2), file=stdout)
    else:
        _print_report(report, destination, stdout)
    if interrupted.is_set():
        return ExitStatus.INTERRUPTED
    if all(job["state"] == JobState.DONE for job in report["jobs"]):
        return ExitStatus.OK
    return ExitStatus.JOB_FAILED


def _print_report(report: dict[str, Any], destination: Path, stdout: TextIO) -> None:
    print(f"batch {report['batch']} -> {destination}", file=stdout)
    for job in report["jobs"]:
        source = job["input"] or "(no input)"
        line = f"  {job['id']}  {job['state']:<9}  {source}  {job['segments']} segments, {len(job['outputs'])} outputs"
        print(line, file=stdout)
        if job["error"]:
            print(f"    reason: {job['error']}", file=stdout)


class _progress:
    """Live progress bars on stderr, fed by the scheduler's events."""

    def __init__(self, scheduler: Any, job_ids: list[str], stream: TextIO, enabled: bool):
        self.enabled = enabled
        self.scheduler = scheduler
        self.job_ids = job_ids
        self.stream = stream

    def __enter__(self) -> _progress:
        if not self.enabled:
            return self
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[state]}"),
            TimeElapsedColumn(), console=Console(file=self.stream), transient=False,
        )
        self.tasks = {}
        self.done: dict[str, int] = {}
        for job_id in self.job_ids:
            rt = self.scheduler.jobs[job_id]
            name = rt.job.input.name if rt.job.input else rt.job.profile.name
            self.tasks[job_id] = self.progress.add_task(f"{job_id} {name}", total=max(len(rt.segments), 1),
                                                        state=str(rt.state))
            self.done[job_id] = 0
        self.scheduler.listeners.append(self.on_event)
        self.progress.start()
        return self

    def on_event(self, kind: str, rt: Any, data: dict[str, Any]) -> None:
        task = self.tasks.get(rt.job.id)
        if task is None:
            return
        if kind == "segment_done":
            self.done[rt.job.id] += 1
            self.progress.update(task, completed=self.done[rt.job.id], state=str(rt.state))
        elif kind == "job_done":
            self.progress.update(task, completed=max(len(rt.segments), 1), state="done")
        else:
            self.progress.update(task, state=str(rt.state))

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self.scheduler.listeners.remove(self.on_event)
            self.progress.stop()


def cmd_plan(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> ExitStatus:
    from farm.local import check_inputs
    from farm.model import Job
    from farm.profiles import load_profile

    config, plugins = _load(args)
    loaded = load_profile(args.profile, plugins, args.overrides, allow_env=config.node.allow_env)
    inputs = check_inputs(loaded, plugins, args.inputs)
    processor = plugins.processor(loaded.profile.processor)
    planned = []
    for seq, source in enumerate(inputs):
        job = Job(id=f"job{seq + 1}", batch_id="plan", input=source, profile=loaded.profile, settings=loaded.settings,
                  destination=Path(args.output or loaded.profile.destination or "out").absolute(),
                  work_dir=Path("(cluster storage)"), frames=loaded.profile.frame_list,
                  overwrite=args.overwrite or loaded.profile.overwrite)
        try:
            plans = list(processor.plan(job))
        except FarmError as exc:
            raise UsageError(f"cannot plan {source or 'the job'}: {exc}") from None
        planned.append({
            "input": str(source) if source else None,
            "segments": [{"index": i, "label": p.label, "frames": p.frames, "params": p.params}
                         for i, p in enumerate(plans)],
        })
    if args.json:
        print(json.dumps({"profile": loaded.profile.name, "processor": processor.name, "jobs": planned}, indent=2),
              file=stdout)
        return ExitStatus.OK
    print(f"profile {loaded.profile.name} (processor {processor.name}): {len(planned)} job(s)", file=stdout)
    for job in planned:
        print(f"  {job['input'] or '(no input)'}: {len(job['segments'])} segment(s)", file=stdout)
        for seg in job["segments"]:
            print(f"    {seg['index']:>5}  {seg['label']}", file=stdout)
    return ExitStatus.OK


def cmd_profiles(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> ExitStatus:
    from farm.profiles import list_profiles, load_profile

    if args.profiles_command == "list":
        entries = list_profiles()
        if not entries:
            print("no profiles found", file=stdout)
        width = max((len(entry.name) for entry in entries), default=0)
        for entry in entries:
            print(f"{entry.name:<{width}}  {entry.description}  ({entry.path})", file=stdout)
        return ExitStatus.OK
    config, plugins = _load(args)
    if args.profiles_command == "show":
        loaded = load_profile(args.name, plugins, args.overrides, allow_env=config.node.allow_env)
        data = loaded.profile.model_dump(mode="json")
        data["settings"] = loaded.settings.model_dump(mode="json")
        print(f"# {loaded.source}", file=stdout)
        print(yaml.safe_dump(data, sort_keys=False), end="", file=stdout)
        return ExitStatus.OK
    bad = 0
    for name in args.files:
        if not Path(name).is_file():
            print(f"farm: error: {name}: no such profile file", file=stderr)
            bad += 1
            continue
        try:
            loaded = load_profile(str(Path(name)) if "/" in name else f"./{name}", plugins,
                                  allow_env=config.node.allow_env)
        except FarmError as exc:
            print(f"farm: error: {exc}", file=stderr)
            bad += 1
        else:
            print(f"ok: {name} (profile {loaded.profile.name}, processor {loaded.profile.processor})", file=stdout)
    return ExitStatus.BAD_INPUT if bad else ExitStatus.OK


def _open_store(args: argparse.Namespace) -> Any:
    from farm.config import state_dir
    from farm.local import STORE_NAME
    from farm.store import Store

    path = state_dir(getattr(args, "state", None)) / STORE_NAME
    if not path.exists():
        raise UsageError(f"no store at {path}: nothing has run with this state directory yet")
    return Store(path)


def cmd_status(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> ExitStatus:
    remote = _remote(args)
    if args.watch:
        from farm.monitor_cli import watch_status

        if args.json:
            raise UsageError("--watch shows a live table; it does not print JSON")
        return watch_status(args.job, remote, lambda: _local_docs(args), stdout)
    if remote is not None:
        docs = [remote.job(args.job)] if args.job else remote.jobs()
        return _print_status(args, docs, stdout)
    return _print_status(args, _local_docs(args), stdout)


def _local_docs(args: argparse.Namespace) -> list[dict[str, Any]]:
    store = _open_store(args)
    try:
        if args.job:
            row = store.job(args.job)
            if row is None:
                raise UsageError(f"no job {args.job!r} in {store.path}")
            segments = store.segments(args.job)
            doc = {**_job_doc(row, segments), "segment_list": [
                {"id": s["id"], "label": s["label"], "state": s["state"], "attempts": s["attempts"], "error": s["error"]}
                for s in segments]}
            docs = [doc]
        else:
            docs = [_job_doc(row, store.segments(row["id"])) for row in store.jobs()]
    finally:
        store.close()
    return docs


def _print_status(args: argparse.Namespace, docs: list[dict[str, Any]], stdout: TextIO) -> ExitStatus:
    if args.json:
        print(json.dumps(docs if not args.job else docs[0], indent=2), file=stdout)
        return ExitStatus.OK
    for doc in docs:
        print(f"{doc['id']}  {doc['state']:<10} {doc['segments_done']}/{doc['segments']} segments  "
              f"{doc['profile']}  {doc['input'] or '(no input)'}", file=stdout)
        if doc["error"]:
            print(f"    reason: {doc['error']}", file=stdout)
        if doc.get("waiting") and doc["state"] == "queued":
            print(f"    waiting: {doc['waiting']}", file=stdout)
        for seg in doc.get("segment_list", []):
            tries = seg["attempts"] if isinstance(seg["attempts"], int) else len(seg["attempts"])
            print(f"    {seg['id']}  {seg['state']:<9} {seg['label']}  attempts {tries}", file=stdout)
    return ExitStatus.OK


def _job_doc(row: Any, segments: list[Any]) -> dict[str, Any]:
    return {
        "id": row["id"], "batch": row["batch_id"], "input": row["input"], "profile": row["profile_name"],
        "state": row["state"], "error": row["error"], "waiting": row["waiting"],
        "outputs": json.loads(row["outputs"] or "[]"),
        "segments": len(segments), "segments_done": sum(1 for s in segments if s["state"] == "done"),
    }


def cmd_cancel(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> ExitStatus:
    remote = _remote(args)
    if remote is not None:
        remote.request("POST", f"/api/jobs/{args.job}/cancel")
        print(f"cancel requested for job {args.job}", file=stdout)
        return ExitStatus.OK
    store = _open_store(args)
    try:
        row = store.job(args.job)
        if row is None:
            raise UsageError(f"no job {args.job!r} in {store.path}")
        if row["state"] in ("done", "failed", "cancelled"):
            print(f"job {args.job} is already {row['state']}", file=stdout)
            return ExitStatus.OK
        store.request_cancel(args.job)
    finally:
        store.close()
    print(f"cancel requested for job {args.job}", file=stdout)
    return ExitStatus.OK


COMMANDS = {
    "run": cmd_run,
    "plan": cmd_plan,
    "profiles": cmd_profiles,
    "status": cmd_status,
    "cancel": cmd_cancel,
}


if __name__ == "__main__":
    sys.exit(main())
