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
import os
import signal
import sys
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import yaml

from farm import __version__, collector
from farm.errors import ExitStatus, FarmError, UsageError
from farm.pipes import reader_gone, silence

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
                              description="Run a batch (one job per input) on this machine, on an in-process Dask cluster (the embedded "
                                          "default engine), and wait for it.")
    _submission_arguments(run)
    run.add_argument("-o", "--output", metavar="DEST", help="destination folder (default: the profile's, else ./out)")
    run.add_argument("--overwrite", action="store_true", help="replace outputs that already exist")
    run.add_argument("--fresh", action="store_true",
                     help="start over: do not resume an interrupted run of the same command (its jobs are cancelled)")
    run.add_argument("--json", action="store_true", help="print one JSON document with the outcome on stdout")
    run.add_argument("--quiet", action="store_true", help="no progress bars")

    resume = commands.add_parser(
        "resume", parents=[common], help="resume interrupted jobs on this machine",
        description="Resume an interrupted job, or every interrupted job of a batch, on this machine (the embedded default "
                    "engine, as `farm run`) and "
                    "wait for it: segments already done are kept, the others run, then assembly. A job is "
                    "interrupted when the process that ran it (its lease's owner) stopped before it ended. With "
                    "--controller or a client file (or $FARM_CONTROLLER, $FARM_CLIENT): hand out a paused job's "
                    "segments again on that controller.")
    resume.add_argument("target", metavar="JOB|BATCH", help="a job id or a batch id (see `farm status`)")
    resume.add_argument("--json", action="store_true", help="print one JSON document with the outcome on stdout")
    resume.add_argument("--quiet", action="store_true", help="no progress bars")
    _remote_arguments(resume)

    plan = commands.add_parser("plan", parents=[common], help="show the segments a batch would have",
                               description="Plan a batch and show its segments; nothing runs and nothing is stored.")
    _submission_arguments(plan)
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.add_argument("-o", "--output", metavar="DEST",
                      help="destination the batch would write to; the outputs already there are listed")
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
    validate.add_argument("files", nargs="+", metavar="FILE", help="profile files to check")

    status = commands.add_parser("status", parents=[common], help="show jobs in the store",
                                 description="Show the most recent jobs (or one job with its segments) from the "
                                             "store, or from the controller when one is named or a quickcluster "
                                             "runs here. `farm purge` removes old finished ones.")
    status.add_argument("job", nargs="?", help="a job id")
    status.add_argument("--json", action="store_true",
                        help="print JSON (every job, unless --limit is given)")
    shown = status.add_mutually_exclusive_group()
    shown.add_argument("--all", action="store_true", help="list every job, not only the most recent")
    shown.add_argument("--limit", type=_positive, metavar="N",
                       help=f"list the N most recent jobs (default {STATUS_LIMIT})")
    status.add_argument("--watch", action="store_true",
                        help="show the jobs live until Ctrl-C (with a job id: until that job ends; exit status 1 "
                             "unless it is done)")
    _remote_arguments(status)

    cancel = commands.add_parser("cancel", parents=[common], help="cancel a job",
                                 description="Ask the process running a job to cancel it; an interrupted job "
                                             "(its process stopped) is cancelled at once.")
    cancel.add_argument("job", help="a job id")
    _remote_arguments(cancel)
    for module_name in COMMAND_MODULES:
        module = importlib.import_module(module_name)
        COMMANDS.update(module.add_commands(commands, common))
    return parser


#: Modules that add commands: each has ``add_commands(subparsers, common) -> {name: handler}``,
#: and imports anything heavy inside its handlers so that ``farm --help`` stays fast.
COMMAND_MODULES: tuple[str, ...] = ("farm.cli.cluster", "farm.cli.droplets", "farm.cli.tools", "farm.scaffold",
                                     "farm.cli.monitor", "farm.cli.logs")


STATUS_LIMIT = 20  # jobs `farm status` lists unless --all or --limit


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of 1 or more, got {text!r}")
    return int(text)


def _status_limit(args: argparse.Namespace) -> int | None:
    """How many of the most recent jobs to list; None: all."""
    if args.job or args.all:
        return None
    if args.limit:
        return args.limit
    return None if args.json else STATUS_LIMIT


def _remote_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--controller", metavar="URL",
                        help="ask this controller instead of the local store (default: $FARM_CONTROLLER)")
    parser.add_argument("--client", metavar="FILE", help="client file for --controller (default: $FARM_CLIENT)")
    parser.add_argument("--bundle", metavar="FILE", help="a cluster bundle instead of a client file (default: "
                                                         "$FARM_BUNDLE)")


def _remote(args: argparse.Namespace, quickcluster: bool = False) -> Any:
    """A controller client when a controller or a client file is named (or, with
    ``quickcluster``, when one runs on this machine); else None: the local store is used.
    Steering commands (cancel, resume) keep to the store unless told: a `farm run` job
    there belongs to its own process, not to the quickcluster."""
    from farm.credentials import running_quickcluster

    named = args.controller or args.client or os.environ.get("FARM_CONTROLLER") or os.environ.get("FARM_CLIENT")
    if not named and not (quickcluster and running_quickcluster() is not None):
        return None
    from farm.client import ControllerClient, find_credentials

    return ControllerClient(find_credentials(args.client, args.bundle), args.controller)


def _submission_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("profile", help="profile name (see `farm profiles list`) or path to a YAML file")
    parser.add_argument("inputs", nargs="*", metavar="INPUT", help="input files, one job each")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a profile key by its dotted path, e.g. segment.frames=5 (repeatable)")


# -- the error boundary --------------------------------------------------------------------


#: Set by a command once everything it started is closed (``farm run``: its Dask cluster,
#: store and lease): the program may then end without tearing its modules down one by one.
_settled = False


def main(argv: Sequence[str] | None = None) -> int:
    """The ``farm`` program. Called without ``argv`` (as the program, reading sys.argv),
    a command that has closed everything it started ends the process here, after the exit
    handlers, without the interpreter's teardown of every module (0.2-0.4 s of a one-frame
    ``farm run``); :func:`run_cli` is the in-process entry."""
    status = run_cli(argv, sys.stdout, sys.stderr)
    # Output to a pipe is buffered: a reader that left early (`farm status | head -1`) is
    # often only noticed here, and Python would otherwise say so at exit, after the fact.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BrokenPipeError:
            silence(stream)
            if status == ExitStatus.OK:
                status = int(ExitStatus.BROKEN_PIPE)
        except (OSError, ValueError):
            pass
    if argv is None and _settled:
        _exit_now(int(status))
    return status


def _exit_now(status: int) -> None:
    """End the process as Python would, less its module teardown: the exit handlers run
    (a notice still to send, a folder to remove), logs are flushed, then ``os._exit``."""
    import atexit

    try:
        atexit._run_exitfuncs()
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
    finally:
        os._exit(status)


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
    except BrokenPipeError as exc:
        # The reader of our output has gone (`farm status | head -1`): end quietly, as a
        # command killed by SIGPIPE would. A broken pipe to anything else is a real error.
        gone = [stream for stream in (stdout, stderr) if reader_gone(stream)]
        if not gone:
            return _internal(exc, debug, stderr)
        for stream in gone:
            silence(stream)
        return int(ExitStatus.BROKEN_PIPE)
    except Exception as exc:
        return _internal(exc, debug, stderr)
    finally:
        logging.getLogger().removeHandler(handler)
        warnings.showwarning = previous_showwarning


def _internal(exc: Exception, debug: bool, stderr: TextIO) -> int:
    if debug:
        raise exc
    print(f"farm: internal error: {type(exc).__name__}: {exc} (run again with --debug for the traceback, "
          "and please report it)", file=stderr)
    return int(ExitStatus.INTERNAL)


# -- commands ------------------------------------------------------------------------------


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    from farm.config import load_config
    from farm.plugins import load_plugins

    return load_config(getattr(args, "config", None)), load_plugins()


def _import_dask_early() -> None:
    """Import Dask in a thread while this one loads the config and the profile: most of a
    one-frame run's start is importing it. Only an import: nothing to stop if the run is
    refused."""
    def load() -> None:
        try:
            importlib.import_module("farm.engine")
        except Exception:  # noqa: BLE001 - imported again where it is used, and said there
            pass

    threading.Thread(target=load, name="farm-import-dask", daemon=True).start()


@collector.held()
def cmd_run(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> ExitStatus:
    _import_dask_early()
    from farm.lease import describe
    from farm.local import (EarlyCluster, LocalFarm, check_destination, check_inputs, check_runnable, plan_ahead,
                            run_fingerprint)
    from farm.node import install_runtime, require_sandbox
    from farm.profiles import load_profile

    config, plugins = _load(args)
    loaded = load_profile(args.profile, plugins, args.overrides, limits=config.limits,
                          allow_env=config.node.allow_env)
    inputs = check_inputs(loaded, plugins, args.inputs)
    destination = check_destination(args.output or loaded.profile.destination or "out")
    early = EarlyCluster(config.node.slots)  # starts while the node probes what it offers
    # The sources are probed (programs that run on the other core) while this thread checks
    # the sandbox and the node and Dask's thread imports it.
    ahead = threading.Thread(target=plan_ahead, args=(loaded, plugins, inputs), name="farm-plan-ahead", daemon=True)
    ahead.start()
    try:
        try:
            require_sandbox(config.node)
            node = install_runtime(config.node)
            check_runnable(loaded, plugins, inputs, node.capabilities)
        finally:
            ahead.join()  # a refused run leaves no probe behind
        fingerprint = run_fingerprint(loaded, inputs, destination)
        farm = LocalFarm.start(config, plugins, getattr(args, "state", None), node, early=early)
    finally:
        early.close()  # only when it was not taken: the run was refused
    try:
        scheduler = farm.scheduler
        batch_id, stale, owner = scheduler.resumable(fingerprint)
        if owner is not None:
            raise UsageError(f"the same run is running now (batch {batch_id}, {describe(owner)}); follow it with "
                             "`farm status`, or cancel its jobs first (`farm cancel JOB`)")
        if stale and args.fresh:
            scheduler.abandon(stale, "replaced by a fresh run of the same command (--fresh)")
            stale = []
        if stale and batch_id is not None:
            job_ids = scheduler.recover(stale)
            done = sum(scheduler.jobs[j].done for j in job_ids)
            total = sum(scheduler.jobs[j].total for j in job_ids)
            print(f"farm: resuming interrupted batch {batch_id}: {done} of {total} segment(s) already done "
                  "(--fresh starts over)", file=stderr)
            every = [row["id"] for row in farm.store.jobs(batch_id)]
        else:
            batch_id, job_ids = scheduler.submit(loaded, inputs, destination, origin="cli", overwrite=args.overwrite,
                                                 fingerprint=fingerprint)
            every = job_ids
        collector.tune_for_a_queue()  # the batch is planned: it is never scanned again
        report, status = _run_jobs(farm, batch_id, job_ids, every, args, stderr)
    finally:
        farm.close()
    _settle()
    return _finish(report, status, destination, args, stdout, stderr)


def _settle() -> None:
    global _settled
    _settled = True


@collector.held()
def cmd_resume(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> ExitStatus:
    from farm.lease import alive, describe, sweep
    from farm.local import LocalFarm
    from farm.model import JobState, TERMINAL_JOB_STATES
    from farm.node import install_runtime
    from farm.requirements import unmet_requirements

    remote = _remote(args)
    if remote is not None:  # a paused job on a controller (a controller takes interrupted jobs by itself)
        answer = remote.request("POST", f"/api/jobs/{args.target}/resume")
        print(f"job {args.target} {answer['state']}", file=stdout)
        return ExitStatus.OK
    store = _open_store(args)
    try:
        sweep(store)
        row = store.job(args.target)
        batch = store.batch(row["batch_id"] if row is not None else args.target)
        if batch is None:
            raise UsageError(f"no job or batch {args.target!r} in {store.path}")
        rows = [row] if row is not None else store.jobs(batch["id"])
        wanted = [r["id"] for r in rows if r["state"] == JobState.INTERRUPTED]
        if not wanted:
            states = ", ".join(sorted({r["state"] for r in rows})) or "empty"
            if any(r["state"] not in TERMINAL_JOB_STATES for r in rows) and alive(lease := store.lease(batch["owner"])):
                raise UsageError(f"{args.target} is {states}: its owner ({describe(lease)}) is running it; "
                                 "nothing to resume")
            raise UsageError(f"{args.target} is {states}; only interrupted jobs can be resumed")
        destination = Path(rows[0]["destination"])
    finally:
        store.close()
    config, plugins = _load(args)
    node = install_runtime(config.node)
    farm = LocalFarm.start(config, plugins, getattr(args, "state", None), node, owner="farm resume")
    try:
        scheduler = farm.scheduler
        job_ids = scheduler.recover(wanted)
        if not job_ids:
            raise UsageError(f"{args.target}: another process took it over meanwhile; see `farm status`")
        for job_id in job_ids:
            unmet = unmet_requirements(scheduler.jobs[job_id].requires, node.capabilities)
            if unmet:  # left for a machine that can: it is interrupted again when this process ends
                raise UsageError(f"job {job_id} needs {', '.join(unmet)}, which this machine does not offer")
        collector.tune_for_a_queue()
        print(f"farm: resuming {len(job_ids)} job(s) of batch {batch['id']}", file=stderr)
        report, status = _run_jobs(farm, batch["id"], job_ids, job_ids, args, stderr)
    finally:
        farm.close()
    _settle()
    return _finish(report, status, destination, args, stdout, stderr)


def _run_jobs(farm: Any, batch_id: str, job_ids: list[str], every: list[str], args: argparse.Namespace,
              stderr: TextIO) -> tuple[dict[str, Any], Any]:
    """Run ``job_ids`` (this process owns them) to their end with progress bars; returns the
    report of the batch's jobs ``every`` (and the jobs chained after them) and how it went:
    None, "interrupted" (Ctrl-C) or the :class:`farm.lease.LeaseLost` error."""
    from farm.lease import LeaseLost

    scheduler = farm.scheduler
    interrupted = threading.Event()
    outcome: Any = None

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
    except LeaseLost as exc:
        outcome = exc
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    if interrupted.is_set():
        outcome = "interrupted"
    shown: list[str] = []
    for job_id in every:
        for member in scheduler.family([job_id]) if job_id in scheduler.jobs else [job_id]:
            if member not in shown:
                shown.append(member)
    report = {"batch": batch_id, "jobs": [_report_job(scheduler, job_id) for job_id in shown]}
    if outcome is not None and not isinstance(outcome, str):
        report["error"] = str(outcome)
    return report, outcome


def _report_job(scheduler: Any, job_id: str) -> dict[str, Any]:
    """One job of ``farm run``'s report: from this process when it ran it, else from the store."""
    from farm.model import JobState

    rt = scheduler.jobs.get(job_id)
    if rt is not None:
        return {"id": rt.job.id, "input": str(rt.job.input) if rt.job.input else None, "state": str(rt.state),
                "outputs": rt.outputs, "segments": rt.total,
                "error": rt.error if rt.state != JobState.DONE else None}
    row = scheduler.store.job(job_id)
    return {"id": row["id"], "input": row["input"], "state": row["state"],
            "outputs": json.loads(row["outputs"] or "[]"), "segments": row["segments_total"],
            "error": row["error"] if row["state"] != JobState.DONE else None}


def _finish(report: dict[str, Any], outcome: Any, destination: Path, args: argparse.Namespace, stdout: TextIO,
            stderr: TextIO) -> ExitStatus:
    from farm.model import JobState

    if args.json:
        print(json.dumps(report, indent=2), file=stdout)
    else:
        _print_report(report, destination, stdout)
    if outcome == "interrupted":
        return ExitStatus.INTERRUPTED
    if outcome is not None:
        print(f"farm: error: {outcome}", file=stderr)
        return ExitStatus(outcome.exit_status)
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
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from farm.pipes import console

        self.progress = Progress(  # a reader of stderr that leaves stops the bars, not the batch
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[state]}"),
            TimeElapsedColumn(), console=console(self.stream), transient=False,
        )
        self.tasks = {}
        self.done: dict[str, int] = {}
        for job_id in self.job_ids:
            rt = self.scheduler.jobs[job_id]
            name = rt.job.input.name if rt.job.input else rt.job.profile.name
            self.tasks[job_id] = self.progress.add_task(f"{job_id} {name}", total=max(rt.total, 1),
                                                        state=str(rt.state))
            self.done[job_id] = rt.done  # resumed
            self.progress.update(self.tasks[job_id], completed=self.done[job_id])
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
            self.progress.update(task, completed=max(rt.total, 1), state="done")
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
    loaded = load_profile(args.profile, plugins, args.overrides, limits=config.limits,
                          allow_env=config.node.allow_env)
    inputs = check_inputs(loaded, plugins, args.inputs)
    processor = plugins.processor(loaded.profile.processor)
    planned = []
    destination = Path(args.output or loaded.profile.destination or "out").absolute()
    for seq, source in enumerate(inputs):
        job = Job(id=f"job{seq + 1}", batch_id="plan", input=source, profile=loaded.profile, settings=loaded.settings,
                  destination=destination,
                  work_dir=Path("(cluster storage)"), frames=loaded.profile.frame_list,
                  overwrite=args.overwrite or loaded.profile.overwrite)
        try:
            outputs = processor.outputs(job)
            plans = list(processor.plan(job))
            notes = list(processor.describe(job))
        except Exception as exc:
            if source is not None and not source.exists():  # deleted since check_inputs looked
                raise UsageError(f"input {str(source)!r} was deleted while it was being planned") from None
            if not isinstance(exc, FarmError):
                raise
            raise UsageError(f"cannot plan {source or 'the job'}: {exc}") from None
        planned.append({
            "input": str(source) if source else None,
            # null: known only once the job has run (a command without expect:)
            "outputs": None if outputs is None else [str(path) for path in outputs],
            "existing": [] if outputs is None else [str(path) for path in outputs if os.path.lexists(path)],
            "segments": [{"index": i, "label": p.label, "frames": p.frames, "params": p.params}
                         for i, p in enumerate(plans)],
            "notes": notes,
        })
    if args.json:
        print(json.dumps({"profile": loaded.profile.name, "processor": processor.name, "jobs": planned}, indent=2),
              file=stdout)
        return ExitStatus.OK
    print(f"profile {loaded.profile.name} (processor {processor.name}): {len(planned)} job(s)", file=stdout)
    for job in planned:
        outputs = "outputs known once it has run" if job["outputs"] is None else f"{len(job['outputs'])} output(s)"
        print(f"  {job['input'] or '(no input)'}: {len(job['segments'])} segment(s), {outputs}", file=stdout)
        for note in job["notes"]:
            print(f"    {note}", file=stdout)
        for seg in job["segments"]:
            print(f"    {seg['index']:>5}  {seg['label']}", file=stdout)
        if job["existing"]:
            verdict = "would be replaced (--overwrite)" if args.overwrite or loaded.profile.overwrite else \
                "`farm run` refuses them unless --overwrite"
            print(f"    {len(job['existing'])} output(s) exist already in {destination}; {verdict}:", file=stdout)
            for path in job["existing"][:20]:
                print(f"      {path}", file=stdout)
            if len(job["existing"]) > 20:
                print(f"      ... and {len(job['existing']) - 20} more", file=stdout)
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
        loaded = load_profile(args.name, plugins, args.overrides, limits=config.limits,
                              allow_env=config.node.allow_env)
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
            loaded = load_profile(str(Path(name)) if "/" in name else f"./{name}", plugins, limits=config.limits,
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
    remote = _remote(args, quickcluster=True)
    if args.watch:
        from farm.cli.monitor import watch_status

        if args.json:
            raise UsageError("--watch shows a live table; it does not print JSON")
        return watch_status(args.job, remote, lambda: _local_docs(args)[0], stdout)
    limit = _status_limit(args)
    if remote is not None:
        docs = [remote.job(args.job)] if args.job else remote.jobs()
        total = len(docs)
        docs = docs[-limit:] if limit else docs
    else:
        docs, total = _local_docs(args, limit)
    status = _print_status(args, docs, stdout)
    if not args.json and total > len(docs):
        print(f"({total - len(docs)} older job(s) not shown: --all, or --limit N)", file=stdout)
    return status


def _local_docs(args: argparse.Namespace, limit: int | None = None) -> tuple[list[dict[str, Any]], int]:
    """The jobs (the ``limit`` most recent, or all) and how many there are in all."""
    from farm.lease import sweep

    store = _open_store(args)
    try:
        try:
            sweep(store)  # jobs whose process stopped show as interrupted
        except FarmError as exc:  # a store that cannot be written is still read
            log.warning("cannot mark the jobs of stopped processes as interrupted: %s", exc)
        if args.job:
            row = store.job(args.job)
            if row is None:
                raise UsageError(f"no job {args.job!r} in {store.path}")
            segments = store.segments(args.job)
            doc = {**_job_doc(row, segments), "segment_list": [
                {"id": s["id"], "label": s["label"], "state": s["state"], "attempts": s["attempts"], "error": s["error"]}
                for s in segments]}
            return [doc], 1
        rows = store.recent_jobs(limit) if limit else store.jobs()
        total = store.job_count() if limit else len(rows)
        return [_job_doc(row, store.segments(row["id"])) for row in rows], total
    finally:
        store.close()


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
        if doc["state"] == "interrupted":
            print(f"    run the same `farm run` again or `farm resume {doc['id']}` to resume it; "
                  f"`farm cancel {doc['id']}` to end it", file=stdout)
        if doc.get("transfers"):  # files moved for nodes without shared storage
            from farm.transfer import describe_transfer

            for moved in doc["transfers"]:
                print(f"    {describe_transfer(moved)}", file=stdout)
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
    from farm.lease import describe, sweep
    from farm.scheduler import cancel_interrupted

    store = _open_store(args)
    try:
        sweep(store)
        row = store.job(args.job)
        if row is None:
            raise UsageError(f"no job {args.job!r} in {store.path}")
        if row["state"] in ("done", "failed", "cancelled"):
            print(f"job {args.job} is already {row['state']}", file=stdout)
            return ExitStatus.OK
        if row["state"] == "interrupted":
            cancel_interrupted(store, args.job, "cancelled by request (it was interrupted)")
            print(f"job {args.job} was interrupted (its process stopped); it is cancelled", file=stdout)
            return ExitStatus.OK
        store.request_cancel(args.job)
        owner = store.lease((store.batch(row["batch_id"]) or {"owner": None})["owner"])
    finally:
        store.close()
    print(f"cancel requested for job {args.job} from its owner ({describe(owner)})", file=stdout)
    return ExitStatus.OK


COMMANDS = {
    "run": cmd_run,
    "plan": cmd_plan,
    "profiles": cmd_profiles,
    "status": cmd_status,
    "cancel": cmd_cancel,
    "resume": cmd_resume,
}

