"""The `farm` command for the tests, forked instead of started.

A `farm` process spends most of its CPU importing Farm, pydantic and Dask (0.2-0.5 s
each time, against its work of a few hundredths for `farm status` and a few tenths for a
one-frame `farm run`); the suite starts some eight hundred, controllers and nodes included.
Here each one is a child of multiprocessing's fork server, which imported all that once: it
is still a process of its own, with its own environment, folder, output, signals, exit
status and end, but it skips the start. :func:`run` runs a command to its end;
:func:`start` leaves one running (a controller, a node) behind a ``Popen``-like handle.

Whatever changes how an interpreter starts or imports (``PYTHON*``, ``DASK_*`` read at
import, ``FARM_LEASE_HEARTBEAT``) is compared with the fork server's: a command whose
environment differs there starts as a real process, as does every command when the fork
server cannot be had.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

#: What the fork server imports once: what `farm run`, the shorter commands, controllers and nodes use.
PRELOAD = ["farm.cli", "farm.local", "farm.engine", "farm.scheduler", "farm.profiles", "farm.node", "farm.client",
           "farm.controller", "farm.nodeservice", "rich.progress", "farm_transcode", "farm_imageseq", "farm_command",
           "farm_notify"]


def _starts_differently(env: dict[str, str]) -> dict[str, str]:
    """The variables read when Python starts or Farm and Dask are imported. Dask's logger
    levels (``DASK_LOGGING__NAME``) are the exception: the child sets them again."""
    return {key: value for key, value in env.items()
            if (key.startswith(("PYTHON", "DASK_")) and not key.startswith("DASK_LOGGING__"))
            or key == "FARM_LEASE_HEARTBEAT"}


_context: multiprocessing.context.ForkServerContext | None = None
_context_env: dict[str, str] | None = None


def _server_for(env: dict[str, str]) -> multiprocessing.context.ForkServerContext | None:
    global _context, _context_env
    if os.environ.get("FARM_TESTS_FORK") == "0":
        return None
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
        _context_env = _starts_differently(dict(os.environ))
    return _context if _starts_differently(env) == _context_env else None


def _child(argv: list[str], env: dict[str, str], cwd: str, out: str, err: str, session: bool = False) -> None:
    """In the forked process: become `farm ARGV` run in ``cwd`` with ``env``, its output
    going to the files ``out`` and ``err`` (appended to), in a session of its own with
    ``session``, and end as the program ends."""
    if session:
        os.setsid()
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    sys.path[0:0] = [cwd]  # as `python -m farm.cli` run there has it
    for fd, path in ((1, out), (2, err)):
        file_fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        os.dup2(file_fd, fd)
        os.close(file_fd)
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=False)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True,
                                  errors="backslashreplace")
    sys.argv = ["farm", *argv]
    import logging

    import dask.config

    dask.config.refresh()
    for name, level in (dask.config.get("logging", default=None) or {}).items():
        if isinstance(level, str):  # as distributed set them on import, from this environment
            logging.getLogger(name).setLevel(level.upper())
    from farm.cli import main

    try:
        status = main()
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


def run(argv: list[str], *, env: dict[str, str], cwd: Path | str, timeout: float) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `farm ARGV`, as ``subprocess.run`` with
    ``capture_output`` and ``text`` would give them; ``subprocess.TimeoutExpired`` when it
    outlives ``timeout`` (it is killed first)."""
    context = _server_for(env)
    if context is None:
        proc = subprocess.run([sys.executable, "-m", "farm.cli", *argv], capture_output=True, text=True,
                              timeout=timeout, cwd=cwd, env=env)
        return proc.returncode, proc.stdout, proc.stderr
    with tempfile.TemporaryDirectory(prefix="farmfork-") as folder:
        out, err = Path(folder) / "stdout", Path(folder) / "stderr"
        out.touch()
        err.touch()
        process = context.Process(target=_child, args=(argv, env, str(cwd), str(out), str(err)),
                                  name=f"farm {' '.join(argv[:2])}")
        process.start()
        process.join(timeout)
        if process.exitcode is None:
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired(["farm", *argv], timeout, _text(out), _text(err))
        return process.exitcode, _text(out), _text(err)


class Forked:
    """A long-running `farm` command (a controller, a node) forked from the fork server, with
    the part of ``subprocess.Popen`` the tests use."""

    def __init__(self, context: multiprocessing.context.ForkServerContext, argv: list[str], *,
                 env: dict[str, str], cwd: Path | str, log: Path, session: bool = False):
        log.touch()
        self.args = ["farm", *argv]
        self._process = context.Process(target=_child, args=(argv, env, str(cwd), str(log), str(log), session),
                                        name=f"farm {argv[0]}")
        self._process.start()
        self.pid: int = self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self._process.exitcode

    def send_signal(self, sig: int) -> None:
        if self._process.exitcode is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def start(argv: list[str], *, env: dict[str, str], cwd: Path | str, log: Path,
          session: bool = False) -> Forked | subprocess.Popen:
    """`farm ARGV` started and left running, its output appended to ``log``: forked when
    the fork server can have it (see the module's docstring), else a real process."""
    context = _server_for(env)
    if context is not None:
        return Forked(context, argv, env=env, cwd=cwd, log=log, session=session)
    with open(log, "a") as out:
        return subprocess.Popen([sys.executable, "-m", "farm.cli", *argv], env=env, stdout=out,
                                stderr=subprocess.STDOUT, cwd=cwd, start_new_session=session)


def _text(path: Path) -> str:
    """A file's text as ``subprocess`` reads a child's output in text mode (universal newlines)."""
    return path.read_bytes().decode(errors="replace").replace("\r\n", "\n").replace("\r", "\n")
