"""Matching what a job requires against what a node offers, and asking programs what
they offer.

A requirement is ``{name: spec}``; the spec is empty or ``*`` (present at all), or
comma-separated comparisons of dotted versions: ``>=5``, ``>=3.4,<4``, ``==3.7``.

What a program says of itself (``blender --version``, ``ffmpeg -encoders``) is asked once
per installed binary and kept on disk (:func:`program_answer`): ``blender --version``
alone costs a second, and every ``farm run`` and node start would pay it.
"""

from __future__ import annotations

import json
import logging
import operator
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("farm.requirements")

_COMPARISON = re.compile(r"^\s*(>=|<=|==|!=|>|<)?\s*([0-9][0-9A-Za-z.\-]*)\s*$")
_OPS = {">=": operator.ge, "<=": operator.le, "==": operator.eq, "!=": operator.ne, ">": operator.gt, "<": operator.lt}


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:4])


def satisfies(version: str, spec: str) -> bool:
    spec = spec.strip()
    if spec in ("", "*"):
        return True
    have = version_tuple(version)
    if not have:
        return False
    for clause in spec.split(","):
        match = _COMPARISON.match(clause)
        if not match:
            return False
        op, wanted = match.group(1) or ">=", version_tuple(match.group(2))
        width = max(len(have), len(wanted))
        padded_have = have + (0,) * (width - len(have))
        padded_wanted = wanted + (0,) * (width - len(wanted))
        if op == "==":
            padded_have = have[: len(wanted)] + (0,) * (width - len(wanted))
        if not _OPS[op](padded_have, padded_wanted):
            return False
    return True


def unmet_requirements(requires: dict[str, str], capabilities: dict[str, str]) -> list[str]:
    """Each requirement the capabilities do not meet, as a phrase (``blender >=3.4``)."""
    unmet = []
    for name, spec in requires.items():
        if name not in capabilities or not satisfies(capabilities[name], spec):
            unmet.append(f"{name} {spec}".strip())
    return unmet


# -- what programs say of themselves ---------------------------------------------------------

_CACHE_LOCK = threading.Lock()


def answers_path() -> Path:
    """The file that keeps programs' answers, in :func:`farm.config.cache_dir`."""
    from farm.config import cache_dir

    return cache_dir() / "programs.json"


def _identity(executable: str) -> list[object] | None:
    """The installed binary as a key: its real path, and what changes when it is replaced
    or rebuilt (an upgrade, a new build over the old one, a test's fake program)."""
    try:
        real = os.path.realpath(executable)
        info = os.stat(real)
    except OSError:
        return None
    return [real, info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns]


def _read_answers(path: Path) -> dict[str, dict[str, object]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or damaged: asked again
        return {}
    return data if isinstance(data, dict) else {}


def _still_installed(key: str) -> bool:
    """Whether the binary an answer was kept for is still there, unchanged."""
    try:
        identity = json.loads(key)[0]
    except (ValueError, TypeError, IndexError):
        return False
    return isinstance(identity, list) and bool(identity) and _identity(str(identity[0])) == identity


def _keep_answer(path: Path, key: str, answer: dict[str, object]) -> None:
    """Add one answer, and drop those of binaries since removed or replaced (the file
    would otherwise grow with every upgrade); a cache that cannot be written only means
    asking again next time."""
    with _CACHE_LOCK:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            answers = {kept: value for kept, value in _read_answers(path).items() if _still_installed(kept)}
            answers[key] = answer
            handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".programs-", suffix=".json")
            try:
                with os.fdopen(handle, "w") as out:
                    json.dump(answers, out)
                os.replace(temporary, path)
            except BaseException:
                os.unlink(temporary)
                raise
        except OSError as exc:
            log.debug("cannot keep a program's answer in %s: %s", path, exc)


def program_answer(argv: Sequence[str], timeout: float = 30.0) -> subprocess.CompletedProcess[str] | None:
    """Run ``argv`` (a program asked about itself: its version, its encoders) and return
    its exit status and output, or None when the program is not on PATH or cannot be run.

    A successful answer is kept on disk under the binary's real path, size, mtime and
    ctime and the arguments, and given back while that binary stays the same: replacing
    or upgrading the program asks it again."""
    executable = shutil.which(argv[0])
    if executable is None:
        return None
    identity = _identity(executable)
    key = json.dumps([identity, list(argv[1:])]) if identity is not None else None
    path = answers_path()
    if key is not None:
        kept = _read_answers(path).get(key)
        if isinstance(kept, dict) and {"stdout", "stderr"} <= kept.keys():
            return subprocess.CompletedProcess(list(argv), 0, str(kept["stdout"]), str(kept["stderr"]))
    try:
        done = subprocess.run([executable, *argv[1:]], capture_output=True, text=True, errors="replace",
                              timeout=timeout, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode == 0 and key is not None:  # a failure may pass (a busy machine): asked again
        _keep_answer(path, key, {"stdout": done.stdout, "stderr": done.stderr})
    return subprocess.CompletedProcess(list(argv), done.returncode, done.stdout, done.stderr)
