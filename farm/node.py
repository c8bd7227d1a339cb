"""The node runtime: runs one segment attempt on whatever machine Dask placed it.

Every subprocess is an argv list (never a shell string) started in its own process
group, which is ended (TERM, then KILL after a grace period) on cancel; on Linux the
group leader also dies with its worker (parent-death signal). Every attempt's log
has a header (command, host, cwd, ids) and a footer (exit status, signal, times,
peak memory).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import logging
import os
import selectors
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from farm import attemptfiles, sandbox, transfer
from farm.config import NodeConfig, load_config
from farm.errors import DeterministicFailure, FarmError, ProcessorError, SourceChanged, UsageError
from farm.model import Job, Segment
from farm.processor import Context, NodeInfo
from farm.wire import PROGRESS_TOPIC, RESULT_TOPIC, outcome_message

LOG_LINES_LIMIT = 2000
#: A parcel (several short segments in one task) hands back what it has not started after
#: this long: the controller sized it for about 0.2 s of work.
PARCEL_LIMIT_SECONDS = 1.0


class Cancelled(Exception):
    """The attempt was cancelled (by a user, a timeout or the node leaving)."""


# -- the per-process runtime ----------------------------------------------------------


class NodeRuntime:
    def __init__(self, config: NodeConfig | None = None, name: str | None = None, plugins: Any = None):
        from farm.plugins import load_plugins

        self.config = config or load_config().node
        self.name = name or self.config.name or socket.gethostname()
        self.plugins = plugins or load_plugins()
        self.slots = self.config.slots or os.cpu_count() or 1
        self.capabilities = node_capabilities(self.config, self.plugins)
        self.availability = Availability(self.config.part_time)
        self._active: dict[str, threading.Event] = {}
        self._cancelled_early: set[str] = set()
        self._lock = threading.Lock()
        self.jobs = JobCache()

    def info(self) -> NodeInfo:
        return NodeInfo(self.name, self.slots, self.config, self.capabilities)

    def cancel(self, attempt_id: str) -> bool:
        with self._lock:
            event = self._active.get(attempt_id)
            if event is None:
                self._cancelled_early.add(attempt_id)
                return False
            event.set()
            return True

    def forget_cancel(self, attempt_id: str) -> None:
        """``attempt_id`` will not run here: a cancel that came before it is done with."""
        with self._lock:
            self._cancelled_early.discard(attempt_id)

    def _register(self, attempt_id: str) -> threading.Event:
        event = threading.Event()
        with self._lock:
            self._active[attempt_id] = event
            if attempt_id in self._cancelled_early:
                self._cancelled_early.discard(attempt_id)
                event.set()
        return event

    def _unregister(self, attempt_id: str) -> None:
        with self._lock:
            self._active.pop(attempt_id, None)


@dataclass(frozen=True)
class JobRef:
    """A job this node was sent before, named by its id: a hand-out carries the whole
    :class:`~farm.model.Job` (its profile, settings, frame list) only with the first
    segment of that job that goes to a node, so that its size is paid once per node
    rather than once per segment."""

    id: str


class JobCache:
    """The jobs this node has been sent, by id; the oldest go when it holds too many."""

    LIMIT = 256
    #: how long a segment waits for its job when the segment that carries it was handed
    #: out just before it and has not started yet (two slots starting at once)
    WAIT_SECONDS = 10.0

    def __init__(self) -> None:
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._arrived = threading.Condition()

    def keep(self, job: Job) -> None:
        with self._arrived:
            self._jobs[job.id] = job
            self._jobs.move_to_end(job.id)
            while len(self._jobs) > self.LIMIT:
                self._jobs.popitem(last=False)
            self._arrived.notify_all()

    def find(self, job_id: str) -> Job | None:
        with self._arrived:
            self._arrived.wait_for(lambda: job_id in self._jobs, timeout=self.WAIT_SECONDS)
            return self._jobs.get(job_id)


_runtime: NodeRuntime | None = None
_runtime_lock = threading.Lock()


def runtime() -> NodeRuntime:
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = NodeRuntime()
        return _runtime


def install_runtime(config: NodeConfig, name: str | None = None, plugins: Any = None) -> NodeRuntime:
    """Set this process's node runtime (the embedded default does this before starting)."""
    global _runtime
    with _runtime_lock:
        _runtime = NodeRuntime(config, name, plugins)
        return _runtime


def node_report() -> dict[str, Any]:
    """Run on a node (through ``Client.run``): who it is, what it offers, whether it takes work."""
    node = runtime()
    accepting, hand_back, reason = node.availability.state()
    with node._lock:
        running = len(node._active)
    return {"name": node.name, "slots": node.slots, "capabilities": node.capabilities,
            "accepting": accepting, "hand_back": hand_back, "reason": reason, "running": running}


# -- part-time nodes ----------------------------------------------------------------------

_ACTIVE_GROUPS: set[int] = set()  # process groups of running segments, not "other" load
_ACTIVE_GROUPS_LOCK = threading.Lock()


def _proc_stat() -> Path:
    """Where the machine's CPU counters are read: /proc/stat, or ``$FARM_PROC_STAT`` (a
    container's own view, or a test that plays a user's load without burning the CPU)."""
    return Path(os.environ.get("FARM_PROC_STAT") or "/proc/stat")


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine."""
    fields = [int(x) for x in _proc_stat().read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


def _own_jiffies() -> int:
    """CPU used by this node's own process and its segments' process groups."""
    own_session = os.getsid(0)
    with _ACTIVE_GROUPS_LOCK:
        groups = set(_ACTIVE_GROUPS)
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pgrp, session = int(stat[2]), int(stat[3])
        if session == own_session or pgrp in groups:
            total += int(stat[11]) + int(stat[12])
    return total


class Availability:
    """Whether a part-time node takes work now: inside its hours, and idle (other
    processes below a CPU share for N minutes)."""

    SAMPLE_SECONDS = 1.0

    def __init__(self, policy: Any):
        self.policy = policy
        self._other_busy = 0.0
        self._idle_since: float | None = time.monotonic()
        self._lock = threading.Lock()
        if policy is not None and policy.idle_cpu_below is not None and _proc_stat().exists():
            threading.Thread(target=self._sample, name="farm-part-time", daemon=True).start()

    def _sample(self) -> None:
        busy, total = _cpu_jiffies()
        own = _own_jiffies()
        while True:
            time.sleep(self.SAMPLE_SECONDS)
            busy2, total2 = _cpu_jiffies()
            own2 = _own_jiffies()
            span = max(total2 - total, 1)
            other = max(0.0, (busy2 - busy) - (own2 - own)) * 100.0 / span
            with self._lock:
                self._other_busy = other
                if other < self.policy.idle_cpu_below:
                    self._idle_since = self._idle_since or time.monotonic()
                else:
                    self._idle_since = None
            busy, total, own = busy2, total2, own2

    def state(self) -> tuple[bool, bool, str]:
        """(accepting, hand_back, reason)."""
        policy = self.policy
        if policy is None:
            return True, False, ""
        if policy.hours and not _inside_hours(policy.hours, time.localtime()):
            return False, policy.hand_back, f"outside its hours ({policy.hours})"
        if policy.idle_cpu_below is not None:
            with self._lock:
                idle_since, other = self._idle_since, self._other_busy
            if idle_since is None:
                return False, policy.hand_back, (f"the machine is busy (other processes use {other:.0f}% CPU, "
                                                 f"part-time threshold {policy.idle_cpu_below:g}%)")
            waited = time.monotonic() - idle_since
            if waited < policy.idle_minutes * 60:
                return False, False, f"idle for {waited:.0f} s of the {policy.idle_minutes:g} min it waits"
        return True, False, ""


def _inside_hours(hours: str, now: time.struct_time) -> bool:
    start, end = ((int(h) * 60 + int(m)) for h, m in (part.split(":") for part in hours.split("-")))
    minute = now.tm_hour * 60 + now.tm_min
    if start <= end:
        return start <= minute < end
    return minute >= start or minute < end


# -- path mapping -------------------------------------------------------------------------


def map_path(path: Path | None, mapping: dict[str, str]) -> Path | None:
    """A controller-side path as this node sees it (longest matching prefix wins)."""
    if path is None or not mapping:
        return path
    text = str(path)
    for prefix in sorted(mapping, key=len, reverse=True):
        if text == prefix or text.startswith(prefix.rstrip("/") + "/"):
            return Path(mapping[prefix] + text[len(prefix.rstrip("/")):])
    return path


def unmap_values(value: Any, mapping: dict[str, str]) -> Any:
    """Node-side paths inside a result, put back the way the controller sees them."""
    if not mapping:
        return value
    reverse = {node_side: controller_side for controller_side, node_side in mapping.items()}
    if isinstance(value, str) and value.startswith("/"):
        return str(map_path(Path(value), reverse))
    if isinstance(value, list):
        return [unmap_values(item, mapping) for item in value]
    if isinstance(value, dict):
        return {key: unmap_values(item, mapping) for key, item in value.items()}
    return value


def sandbox_state(config: NodeConfig) -> str:
    """How this node contains its segments, as `farm nodes` shows it: the bubblewrap
    version, ``off`` (node.sandbox: off), or ``unavailable``."""
    if not config.sandbox:
        return "off"
    usable = sandbox.availability()
    return usable.found.replace(" ", "-") if usable.ok else "unavailable"


def require_sandbox(config: NodeConfig) -> None:
    """Refuse to start a node that is to sandbox its segments and cannot: never run
    them with the node's full rights silently."""
    if not config.sandbox:
        return
    usable = sandbox.availability()
    if not usable.ok:
        raise UsageError(f"node.sandbox is on, but {usable.found}; install bubblewrap (sudo apt-get install "
                         "bubblewrap; ./setup does this), or set node.sandbox: off in farm.yaml for a node that "
                         "cannot use it")


def node_capabilities(config: NodeConfig, plugins: Any) -> dict[str, str]:
    """What this node offers. Each plugin's answer (and the sandbox's probe) mostly waits
    on the programs it asks for their versions, so they are asked at the same time: a
    start pays for the slowest, not for all of them."""
    hook = plugins.hook.farm_node_capabilities
    impls = list(reversed(hook.get_hookimpls()))  # the order pluggy calls them in
    wrapped = any(impl.hookwrapper or impl.wrapper for impl in impls)
    with ThreadPoolExecutor(max_workers=len(impls) + 1, thread_name_prefix="farm-capabilities") as pool:
        sandboxed = pool.submit(sandbox_state, config)
        if wrapped:  # a wrapper must see the call as pluggy makes it
            answers = [pool.submit(hook, config=config)]
        else:
            answers = [pool.submit(impl.function, **({"config": config} if "config" in impl.argnames else {}))
                       for impl in impls]
        capabilities: dict[str, str] = {f"processor:{name}": "" for name in plugins.processors}
        capabilities["sandbox"] = sandboxed.result()
        for future in answers:
            result = future.result()
            for answer in (result if wrapped else [result]):
                capabilities.update({str(k): str(v) for k, v in (answer or {}).items()})
    return capabilities


# -- running commands -----------------------------------------------------------------


@functools.cache
def _setpriv() -> str | None:
    return shutil.which("setpriv") if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class CommandResult:
    argv: list[str]
    exit_status: int | None
    signal: int | None
    seconds: float
    peak_memory_kib: int
    output: str


class AttemptLog:
    """A bounded log of one attempt: keeps the head and the tail when it overflows."""

    def __init__(self, live: attemptfiles.LiveLog | None = None) -> None:
        self.live = live  # where each line is also written as it comes, for `farm logs --follow`
        self._head: list[str] = []
        self._tail: list[str] = []
        self._dropped = 0
        self._lock = threading.Lock()

    def write(self, line: str) -> None:
        if self.live is not None:
            self.live.write(line)
        with self._lock:
            if len(self._head) < LOG_LINES_LIMIT // 2:
                self._head.append(line)
                return
            self._tail.append(line)
            if len(self._tail) > LOG_LINES_LIMIT // 2:
                self._tail.pop(0)
                self._dropped += 1

    def text(self) -> str:
        with self._lock:
            cut = [f"[... {self._dropped} lines cut ...]"] if self._dropped else []
            return "\n".join(self._head + cut + self._tail)


class CommandRunner:
    """Starts subprocesses for one attempt; ``Context.run`` is its :meth:`run`.

    With a ``policy`` every command runs in the sandbox (:mod:`farm.sandbox`), allowed
    what the policy names plus what each call adds; without one (``node.sandbox: off``)
    it runs with the node's own rights.
    """

    def __init__(self, log: AttemptLog, cancelled: threading.Event, ids: str, kill_grace: float,
                 policy: sandbox.Policy | None = None, home: str | os.PathLike[str] | None = None):
        self.log = log
        self.cancelled = cancelled
        self.ids = ids
        self.kill_grace = kill_grace
        self.policy = policy
        self.home = os.fspath(home) if home else "/tmp"

    def _contain(self, argv: list[str], workdir: str, env: dict[str, str] | None,
                 read: Sequence[Any], write: Sequence[Any]) -> tuple[list[str], dict[str, str] | None]:
        """The bwrap command line and environment for ``argv``; refuses clearly when the
        node is to sandbox and cannot."""
        usable = sandbox.availability()
        if not usable.ok:
            raise ProcessorError(f"the sandbox cannot start on node {socket.gethostname()}: {usable.found}; install "
                                 "bubblewrap (sudo apt-get install bubblewrap), or set node.sandbox: off in "
                                 "farm.yaml for a node that cannot use it")
        assert self.policy is not None
        policy = sandbox.Policy(read=[*self.policy.read, *map(os.fspath, read)],
                                write=[*self.policy.write, *map(os.fspath, write)], network=self.policy.network)
        wrapped = sandbox.wrap(argv, policy, workdir, sandbox.hidden_paths())
        return wrapped, {**sandbox.sandbox_environment(dict(os.environ), self.home), **(env or {})}

    def run(
        self,
        argv: Sequence[str],
        *,
        cwd: str | os.PathLike[str] | None = None,
        env: dict[str, str] | None = None,
        on_line: Callable[[str], None] | None = None,
        check: bool = True,
        read: Sequence[str | os.PathLike[str]] = (),
        write: Sequence[str | os.PathLike[str]] = (),
    ) -> CommandResult:
        argv = [os.fspath(arg) for arg in argv]
        if not argv or not all(isinstance(arg, str) for arg in argv):
            raise ProcessorError(f"a command must be a non-empty list of strings, got {argv!r}")
        try:
            sandbox.check_env(env or {}, None)
        except ValueError as exc:
            raise ProcessorError(f"refused environment variable {exc}") from None
        if self.cancelled.is_set():
            raise Cancelled("cancelled before the command started")
        if cwd:
            workdir = os.fspath(cwd)
        elif self.policy is not None:  # the node's own folder is not visible inside
            workdir = (self.policy.write or ["/tmp"])[0]
        else:
            workdir = os.getcwd()
        started_argv, started_env = argv, ({**os.environ, **env} if env else None)
        die_with_parent = None
        if self.policy is None:
            die_with_parent = _die_with_parent
            setpriv = _setpriv()
            if setpriv and os.path.isabs(argv[0]) and os.path.isfile(argv[0]) and os.access(argv[0], os.X_OK):
                # the same parent-death signal, set by setpriv before it execs the command:
                # no preexec_fn, so Python vfork-s instead of copying the whole node
                started_argv, die_with_parent = [setpriv, "--pdeathsig", "KILL", "--", *argv], None
        else:
            if shutil.which(argv[0]) is None:
                self.log.write(f"=== could not start: {argv[0]} not found")
                raise ProcessorError(f"cannot start {argv[0]!r}: not found on node {socket.gethostname()}")
            started_argv, started_env = self._contain(argv, workdir, env, read, write)
        self.log.write(f"=== command: {shlex.join(argv)}")
        self.log.write(f"=== host: {socket.gethostname()}  pid: {os.getpid()}  cwd: {workdir}  ids: {self.ids}")
        self.log.write("=== sandbox: " + (f"bwrap; writes {', '.join(self.policy.write + [os.fspath(p) for p in write])}"
                                           f"; network {'on' if self.policy.network else 'off'}"
                                           if self.policy is not None else "off (node.sandbox: off)"))
        self.log.write(f"=== started: {time.strftime('%Y-%m-%d %H:%M:%S %z')}")
        started = time.monotonic()
        try:
            proc = subprocess.Popen(
                started_argv,
                cwd=workdir,
                env=started_env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                # bwrap --die-with-parent ties a sandboxed process to this node; only an
                # unsandboxed one needs the parent-death signal set in the child, and a
                # preexec_fn makes Python fork the whole node instead of vfork-ing.
                preexec_fn=die_with_parent,
            )
        except FileNotFoundError:
            self.log.write(f"=== could not start: {argv[0]} not found")
            raise ProcessorError(f"cannot start {argv[0]!r}: not found on node {socket.gethostname()}") from None
        except PermissionError:
            raise ProcessorError(f"cannot start {argv[0]!r}: permission denied") from None
        except OSError as exc:
            raise ProcessorError(f"cannot start {argv[0]!r}: {exc}") from None

        with _ACTIVE_GROUPS_LOCK:
            _ACTIVE_GROUPS.add(proc.pid)
        tail: deque[str] = deque(maxlen=20)

        def take(line: str) -> None:
            self.log.write(line)
            tail.append(line)
            if on_line is not None:
                try:
                    on_line(line)
                except Exception:  # a progress parser must not break the run
                    pass

        try:
            status, usage = self._follow(proc, take)
        finally:
            with _ACTIVE_GROUPS_LOCK:
                _ACTIVE_GROUPS.discard(proc.pid)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: Popen must not wait again
        seconds = time.monotonic() - started
        exit_status = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        if self.policy is not None and exit_status is not None and 128 < exit_status < 128 + signal.NSIG:
            # bwrap reports its command's death by a signal as 128 + the signal's number
            exit_status, sig = None, exit_status - 128
        peak = int(usage.ru_maxrss)
        ending = f"exit status {exit_status}" if sig is None else f"killed by {signal.Signals(sig).name}"
        self.log.write(
            f"=== finished: {ending}; wall {seconds:.2f} s; cpu user {usage.ru_utime:.2f} s "
            f"sys {usage.ru_stime:.2f} s; peak memory {peak / 1024:.1f} MiB"
        )
        result = CommandResult(argv, exit_status, sig, seconds, peak, "\n".join(tail))
        if self.cancelled.is_set():
            raise Cancelled(f"{argv[0]} was ended ({ending})")
        if check and exit_status != 0:
            last = next((line for line in reversed(tail) if line.strip()), "")
            detail = f": {last.strip()}" if last else ""
            raise ProcessorError(f"{Path(argv[0]).name} failed with {ending}{detail}")
        return result

    def _follow(self, proc: subprocess.Popen[bytes], take: Callable[[str], None]) -> tuple[int, Any]:
        """Pass on the process's output line by line and wait for its end, in this one
        thread: its pipe and a pidfd are watched together (no reader or waiter thread per
        process); a cancel is looked at every 50 ms. Returns wait4's (status, rusage)."""
        assert proc.stdout is not None
        out = proc.stdout.fileno()
        os.set_blocking(out, False)
        selector = selectors.DefaultSelector()
        selector.register(out, selectors.EVENT_READ)
        try:
            pidfd: int | None = os.pidfd_open(proc.pid)
            selector.register(pidfd, selectors.EVENT_READ)
        except (AttributeError, OSError):  # before Linux 5.3: wait4 is tried every 50 ms
            pidfd = None
        pending = b""
        ended: tuple[int, Any] | None = None
        drained = False
        drain_until = 0.0
        terminated_at: float | None = None
        try:
            while True:
                for key, _ in selector.select(0.05):
                    if key.fd != out:
                        continue
                    try:
                        chunk = os.read(out, 65536)
                    except BlockingIOError:
                        continue
                    if not chunk:
                        drained = True
                        selector.unregister(out)
                        break
                    lines = (pending + chunk).split(b"\n")
                    pending = lines.pop()
                    if len(pending) > 1 << 20:  # a line without end is still shown
                        lines.append(pending)
                        pending = b""
                    for raw in lines:
                        take(raw.decode("utf-8", errors="replace").rstrip("\r"))
                if ended is None:
                    pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                    if pid:
                        ended = status, usage
                        # Whatever the leader left behind in its group goes with it.
                        _signal_group(proc.pid, signal.SIGKILL)
                        drain_until = time.monotonic() + 5
                        if pidfd is not None:
                            selector.unregister(pidfd)
                    elif self.cancelled.is_set():
                        if terminated_at is None:
                            self.log.write("=== cancel: sending SIGTERM to the process group")
                            _signal_group(proc.pid, signal.SIGTERM)
                            terminated_at = time.monotonic()
                        elif time.monotonic() - terminated_at > self.kill_grace:
                            self.log.write("=== cancel: still running after the grace period, sending SIGKILL")
                            _signal_group(proc.pid, signal.SIGKILL)
                            terminated_at = float("inf")
                # done when it has ended and its output is read (or a process that left
                # the group still holds the pipe after 5 s)
                if ended is not None and (drained or time.monotonic() > drain_until):
                    break
            if pending:
                take(pending.decode("utf-8", errors="replace").rstrip("\r"))
        finally:
            selector.close()
            if pidfd is not None:
                os.close(pidfd)
            proc.stdout.close()
        return ended


def attempt_policy(config: NodeConfig, job: Job, write: list[Path]) -> sandbox.Policy | None:
    """What an attempt's processes may touch: the job's input and the node's
    ``sandbox_read`` read-only, ``write`` (the attempt's folder and scratch) writable,
    and what the (admin's) profile adds under ``sandbox:``; None when the node does not
    sandbox."""
    if not config.sandbox:
        return None
    own = getattr(job.profile, "sandbox", None)
    extra_read = [str(map_path(Path(p), config.path_map)) for p in (own.read if own else [])]
    extra_write = [str(map_path(Path(p), config.path_map)) for p in (own.write if own else [])]
    return sandbox.Policy(
        read=[*([str(job.input)] if job.input else []), *config.sandbox_read, *extra_read],
        write=[*map(str, write), *extra_write],
        network=bool(own and own.network),
    )


def kill_segments() -> None:
    """SIGKILL every segment's process group: the worker is leaving (its node is gone).

    Besides the groups recorded, every child of this process leads one (segments start in
    a session of their own): a segment whose Popen has returned but is not recorded yet, on
    a loaded machine, is found among the children, and so is a bwrap killed before it set
    its own parent-death signal."""
    with _ACTIVE_GROUPS_LOCK:
        groups = set(_ACTIVE_GROUPS)
    children: set[int] = set()
    for task in Path("/proc/self/task").glob("*/children"):
        try:
            children.update(int(pid) for pid in task.read_text().split())
        except OSError:
            continue
    for pgid in (groups | children) - {os.getpgrp()}:  # never our own group
        _signal_group(pgid, signal.SIGKILL)
    for pid in children:  # ours until reaped, so never another's pid; one between fork and setsid leads no group yet
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def leave_no_segments_on_exit() -> None:
    """Make every ``os._exit`` of this process (a node's Dask worker) kill its segments first.

    Dask ends a worker whose nanny died with ``os._exit`` as soon as a pipe tells it, before
    any watcher of ours runs; the segments were then left to bubblewrap's parent-death
    signal, which a sandbox still being set up misses (seen: a segment alive under init a
    minute after its node was killed)."""
    real_exit = os._exit

    def exit_killing_segments(status: int) -> NoReturn:
        try:
            kill_segments()
        finally:
            real_exit(status)

    os._exit = exit_killing_segments


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# -- the task Dask runs ----------------------------------------------------------------


def input_stamp(path: Path | None) -> tuple[int, int] | None:
    if path is None:
        return None
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def check_source(job: Job) -> None:
    """Refuse to go on when the job's input is gone or is not the file that was accepted."""
    if job.input is None or job.input_stamp is None:
        return
    try:
        now = input_stamp(job.input)
    except FileNotFoundError:
        raise SourceChanged(f"the source {job.input} was deleted after the job was accepted") from None
    except OSError as exc:
        raise SourceChanged(f"the source {job.input} cannot be read any more: {exc.strerror or exc}") from None
    if now != tuple(job.input_stamp):
        size, mtime = job.input_stamp
        raise SourceChanged(
            f"the source {job.input} changed after the job was accepted (size {size} -> {now[0]} bytes, "
            f"modified {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(now[1] / 1e9))}); submit it again"
        )


def _source_changed(job: Job) -> str | None:
    try:
        check_source(job)
    except SourceChanged as exc:
        return str(exc)
    return None


def run_segment(job: Job | JobRef, segment: Segment) -> dict[str, Any]:
    """Run one attempt; never raises. The outcome (a dict the controller stores) is sent
    to the controller as an event (see :mod:`farm.wire`) and also returned, for callers
    outside Dask; the controller never fetches the returned value.

    ``job`` is the whole job the first time this node gets a segment of it, and a
    :class:`JobRef` after that (``segment.job`` likewise)."""
    started = time.monotonic()
    outcome = _run_attempt(job, segment)
    outcome["seconds"] = round(time.monotonic() - started, 6)
    return _tell(segment.attempt_id, outcome)


def run_segments(job: Job | JobRef, segments: list[Segment]) -> list[dict[str, Any]]:
    """Several segments of one job, one after another in one slot, in one task: the
    controller sends them so when each takes much less than a round trip to it. Each
    sends its own outcome as it ends; one cancelled before its turn never starts. Once
    the task has run longer than ``PARCEL_LIMIT_SECONDS`` (the job's segments got slow),
    the rest go back to the controller unstarted, for any node to take."""
    started = time.monotonic()
    outcomes = [run_segment(job, segments[0])]
    missing = outcomes[0] if outcomes[0].get("missing_job") else None
    for segment in segments[1:]:
        elapsed = time.monotonic() - started
        if missing is not None:  # the rest would wait for the job again, in vain
            outcomes.append(_tell(segment.attempt_id, dict(missing)))
            continue
        if elapsed <= PARCEL_LIMIT_SECONDS:
            outcomes.append(run_segment(job, segment))
            missing = outcomes[-1] if outcomes[-1].get("missing_job") else None
            continue
        node = runtime()
        node.forget_cancel(segment.attempt_id)
        outcomes.append(_tell(segment.attempt_id, {
            "ok": False, "returned": True, "log": "", "node": node.name,
            "reason": f"handed back unstarted by node {node.name}: the segments before it in its task "
                      f"took {elapsed:.1f} s, longer than expected"}))
    return outcomes


def _tell(attempt_id: str, outcome: dict[str, Any]) -> dict[str, Any]:
    """Send an attempt's outcome to the controller (see :mod:`farm.wire`); returns it as sent."""
    message = outcome_message(attempt_id, outcome)
    try:
        from distributed import get_worker

        get_worker().log_event(RESULT_TOPIC, message)
    except ValueError:  # not inside a Dask worker (a direct call): nobody to tell
        pass
    return message["outcome"]


def _run_attempt(job: Job | JobRef, segment: Segment) -> dict[str, Any]:
    node = runtime()
    if isinstance(job, JobRef):
        found = node.jobs.find(job.id)
        if found is None:  # this node restarted, or forgot it: the controller sends it again
            return {"ok": False, "missing_job": True, "node": node.name, "log": "",
                    "reason": f"node {node.name} does not hold job {job.id} (it restarted or forgot it)"}
        job = found
    else:
        node.jobs.keep(job)
    segment = dataclasses.replace(segment, job=job)
    mapping = node.config.path_map
    if mapping:
        job = dataclasses.replace(job, input=map_path(job.input, mapping),
                                  destination=map_path(job.destination, mapping), work_dir=map_path(job.work_dir, mapping))
        segment = dataclasses.replace(segment, job=job, output_dir=map_path(segment.output_dir, mapping))
    cancelled = node._register(segment.attempt_id)
    if cancelled.is_set():  # cancelled while it waited on this node (pipelined): it never starts
        node._unregister(segment.attempt_id)
        return {"ok": False, "cancelled": True, "reason": "cancelled before it started", "log": "", "node": node.name}
    log = AttemptLog(attemptfiles.LiveLog(attemptfiles.live_log_path(job.work_dir, segment.attempt_id)))
    # A logger of the attempt's own, not registered with logging: a registered one lives as
    # long as the process, and each new one clears the cache of every other (a cost per
    # segment that grew with the number of segments run).
    logger = logging.Logger(f"farm.segment.{segment.id}", logging.INFO)
    logger.addHandler(_LogHandler(log))
    logger.propagate = False
    scratch: Path | None = None
    staged: Any = None
    log.write(f"=== segment {segment.id} ({segment.label}) attempt {segment.attempt_id} of job {job.id} on node {node.name}")
    if segment.announce_start:
        _progress_reporter(segment.attempt_id)(0.0, "started", started=True)
    try:
        # A node without the controller's storage fetches the inputs and writes locally.
        staged = transfer.stage(node.config, node.name, job, segment, cancelled, _progress_reporter(segment.attempt_id))
        if staged is not None:
            job, segment = staged.job, staged.segment
            log.write(f"=== staged: inputs {', '.join(map(str, staged.read)) or 'none'}; outputs in "
                      f"{segment.output_dir}{' (sent back to the controller)' if staged.remote_outputs else ''}")
        check_source(job)
        try:
            scratch = Path(tempfile.mkdtemp(prefix=f"farm-{segment.attempt_id}-"))
        except OSError as exc:
            raise ProcessorError(f"no scratch space on node {node.name}: {exc.strerror or exc}") from None
        processor = node.plugins.processor(job.profile.processor)
        segment.output_dir.mkdir(parents=True, exist_ok=True)
        policy = attempt_policy(node.config, job, [segment.output_dir, scratch])
        if policy is not None and staged is not None:
            policy.read.extend(map(str, staged.read))
        runner = CommandRunner(log, cancelled, f"job={job.id} segment={segment.id} attempt={segment.attempt_id}",
                               node.config.kill_grace, policy, home=scratch)
        context = Context(
            scratch=scratch,
            logger=logger,
            progress=_progress_reporter(segment.attempt_id),
            cancelled=cancelled,
            node=node.info(),
            run=runner.run,
        )
        result = processor.run(segment, context)
        if cancelled.is_set():
            raise Cancelled("cancelled")
        if job.profile.preview:
            _keep_preview(processor, segment, result or {}, context, log)
        if staged is not None:
            result = staged.finish(result or {})
        return {"ok": True, "result": unmap_values(result or {}, mapping), "log": log.text(), "node": node.name}
    except Cancelled as exc:
        return {"ok": False, "cancelled": True, "reason": str(exc), "log": log.text(), "node": node.name}
    except DeterministicFailure as exc:  # retrying cannot help: the job fails at once
        log.write(f"=== failed: {exc}")
        return {"ok": False, "fatal": True, "reason": str(exc), "log": log.text(), "node": node.name}
    except Exception as exc:
        if isinstance(exc, FarmError):
            reason = str(exc)
            log.write(f"=== failed: {exc}")
        else:  # a processor bug is this segment's failure, not the node's
            reason = f"processor error: {type(exc).__name__}: {exc}"
            log.write(traceback.format_exc())
        changed = None if isinstance(exc, transfer.TransferError) else _source_changed(job)
        if changed:  # it failed because the source went away meanwhile: say that, and retry nothing
            log.write(f"=== {changed}")
            return {"ok": False, "fatal": True, "reason": f"{changed} (the segment said: {reason})", "log": log.text(),
                    "node": node.name}
        return {"ok": False, "reason": reason, "log": log.text(), "node": node.name}
    finally:
        node._unregister(segment.attempt_id)
        if log.live is not None:
            log.live.close()
        if staged is not None:
            staged.close()
        if scratch is not None:
            try:
                os.rmdir(scratch)  # most segments leave their scratch empty: one call, not a tree walk
            except OSError:
                shutil.rmtree(scratch, ignore_errors=True)


def _keep_preview(processor: Any, segment: Segment, result: dict[str, Any], context: Context, log: AttemptLog) -> None:
    """The processor's preview of a segment that succeeded, kept for the monitor; a
    preview that fails is a line in the log, never the segment's failure."""
    try:
        kept = attemptfiles.keep_preview(processor.preview(segment, result, context), segment.job.work_dir,
                                         segment.attempt_id)
        if kept is not None:
            log.write(f"=== preview: {kept[1]}x{kept[2]} {kept[0].suffix[1:].upper()}")
    except Exception as exc:  # Cancelled too: the segment's own work is done, and kept
        log.write(f"=== preview: none ({type(exc).__name__}: {exc})")


async def cancel_attempts(*attempt_ids: str) -> int:
    """Run on a node (through ``Client.run``) to end attempts' process groups; one not
    started yet never starts. All of them in one message: the rest of a parcel is marked
    before the running one's end lets the next begin. Returns how many were running.

    A coroutine, because Dask runs only coroutines without waiting for the answer, and
    the scheduler must not wait on a node that may be slow or gone.
    """
    node = runtime()
    return sum(node.cancel(attempt_id) for attempt_id in attempt_ids)


def _progress_reporter(attempt_id: str) -> Callable[..., None]:
    last = [0.0]

    def report(fraction: float, message: str = "", started: bool = False,
               fetched: tuple[str, int, int] | None = None) -> None:
        """``fetched``: (sha, bytes held, size) of an input coming from the controller."""
        now = time.monotonic()
        whole = fetched is not None and fetched[1] >= fetched[2]
        if now - last[0] < 0.25 and fraction < 1.0 and not started and not whole:
            return
        last[0] = now
        event: dict[str, Any] = {"attempt": attempt_id, "fraction": float(fraction), "message": message,
                                 "started": started}
        if fetched is not None:
            event["fetched"] = {"sha": fetched[0], "bytes": fetched[1]}
        try:
            from distributed import get_worker

            get_worker().log_event(PROGRESS_TOPIC, event)
        except ValueError:  # not inside a Dask worker (a direct call): nobody to tell
            pass

    return report


class _LogHandler(logging.Handler):
    def __init__(self, log: AttemptLog):
        super().__init__()
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        self.log.write(f"[{record.levelname.lower()}] {record.getMessage()}")


__all__ = ["CommandRunner", "CommandResult", "Cancelled", "run_segment", "run_segments", "JobRef", "cancel_attempts", "runtime", "install_runtime",
           "attempt_policy", "require_sandbox", "sandbox_state"]
