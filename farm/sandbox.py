"""What a segment's process may see and touch: a bubblewrap sandbox, and the checked
vocabulary (environment names, working folder) a profile may hand to a process.

On Linux every process a segment or an assemble step starts runs inside ``bwrap``:

- the system (``/usr``, ``/etc`` and the ``/bin``, ``/lib*`` links) read-only, with
  the files that hold secrets masked and ``/etc/passwd``/``group`` replaced by a stub;
- what the attempt was given read-only (its input; paths a processor or the profile's
  ``sandbox.read`` add; the allowed executable's own installation);
- only the attempt's output folder and scratch writable (and ``sandbox.write``);
- a private ``/tmp``, ``/dev`` and ``/proc`` (its own pid namespace), no network unless
  the profile says ``sandbox: {network: true}``;
- the state directory, the store and the cluster bundle hidden even where they lie
  inside a folder that is visible.

The profile author (an admin) is trusted; a submitter is not, which is why the keys
that widen what a process may do are listed by :func:`sensitive_settings` for the API
to refuse in a submit token's overrides. This module knows no codec or renderer.
"""

from __future__ import annotations

import atexit
import functools
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, ValidationInfo

#: Environment names no profile may set, whatever a node allows: they load code into
#: the process (LD_PRELOAD, DYLD_INSERT_LIBRARIES, PYTHONSTARTUP) or make it write files
#: (FFREPORT).
_NEVER_ENV = re.compile(r"^(LD_|DYLD_|PYTHON)|^FFREPORT$")
#: What ``node.allow_env`` holds when farm.yaml does not say.
DEFAULT_ALLOW_ENV = ["LANG", "LC_ALL", "TZ", "OMP_NUM_THREADS"]
#: Read-only in every sandbox: the installed system. Links such as /bin -> usr/bin are
#: recreated as links.
SYSTEM_PATHS = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
                "/var/cache/fontconfig")  # without its cache fontconfig rescans every font, every time
#: Secrets under /etc that the system part must not show.
MASKED_SYSTEM = ("/etc/shadow", "/etc/shadow-", "/etc/gshadow", "/etc/gshadow-", "/etc/ssh", "/etc/ssl/private",
                 "/etc/sudoers", "/etc/sudoers.d", "/etc/security/opasswd")


def never_allowed_env(name: str) -> bool:
    return _NEVER_ENV.match(name) is not None


def check_env(env: dict[str, str], allow: Iterable[str] | None) -> None:
    """Refuse (ValueError naming the key) an environment name a profile may not set.

    ``allow`` is the node's ``allow_env``; None checks only the names that are never
    allowed (a profile read back from the store is checked again on the node).
    """
    allowed = set(allow) if allow is not None else None
    for name in env:
        if never_allowed_env(name):
            raise ValueError(f"{name}: this variable can load code into or make files from the process, so no "
                             "profile may set it")
        if allowed is not None and name not in allowed:
            shown = ", ".join(sorted(allowed)) or "nothing"
            raise ValueError(f"{name}: not on the node's environment allow-list (node.allow_env in farm.yaml "
                             f"allows {shown})")


def check_cwd(cwd: str | None) -> str | None:
    """A working folder is a relative path inside the attempt's folder."""
    if cwd is None:
        return None
    path = Path(cwd)
    if path.is_absolute() or ".." in path.parts or not cwd.strip():
        raise ValueError(f"{cwd!r}: the working folder must be a relative path inside the attempt's folder, "
                         "such as 'work' (absolute paths and '..' are refused)")
    return cwd


def _validate_env(value: dict[str, str], info: ValidationInfo) -> dict[str, str]:
    check_env(value, (info.context or {}).get("allow_env"))
    return value


def _validate_cwd(value: str | None, info: ValidationInfo) -> str | None:
    return check_cwd(value)


#: For a processor's settings model: environment variables for its processes, checked
#: against the node's allow-list when the profile is loaded.
ProcessEnv = Annotated[dict[str, str], AfterValidator(_validate_env)]
#: For a processor's settings model: a working folder inside the attempt's folder.
WorkFolder = Annotated[str | None, AfterValidator(_validate_cwd)]


# -- what to hide ---------------------------------------------------------------------

_hidden: set[str] = set()
_hidden_lock = threading.Lock()


def hide(path: str | os.PathLike[str] | None) -> None:
    """Never show ``path`` (a store's folder, a cluster bundle) to a sandboxed process,
    even when a folder holding it is visible. Called by whoever opens such a thing."""
    if path is None:
        return
    with _hidden_lock:
        _hidden.add(os.path.abspath(os.fspath(path)))


def hidden_paths() -> list[str]:
    from farm.config import config_dir, state_dir

    with _hidden_lock:
        found = set(_hidden)
    found.update({str(state_dir()), str(config_dir())})
    if os.environ.get("FARM_BUNDLE"):
        found.add(os.path.abspath(os.environ["FARM_BUNDLE"]))
    return sorted(found)


# -- is bubblewrap usable here ----------------------------------------------------------


@dataclass
class Availability:
    ok: bool
    found: str  # "bubblewrap 0.8.0", or why not


@functools.lru_cache(maxsize=4)
def _probe(bwrap: str | None) -> Availability:
    if bwrap is None:
        return Availability(False, "bwrap not found on PATH")
    try:
        version = subprocess.run([bwrap, "--version"], capture_output=True, text=True, timeout=30)
        trial = subprocess.run([bwrap, *_system_args(), "--unshare-all", "--die-with-parent", "--", "true"],
                               capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Availability(False, f"{bwrap} cannot run: {exc}")
    if trial.returncode != 0:
        said = (trial.stderr.strip().splitlines() or [f"exit status {trial.returncode}"])[-1]
        return Availability(False, f"{bwrap} cannot create its namespaces here: {said}")
    return Availability(True, version.stdout.strip() or "bubblewrap")


def availability() -> Availability:
    """Whether this machine can run sandboxed processes (probed once per bwrap found)."""
    return _probe(shutil.which("bwrap"))


# -- building the command line ----------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _identity_files() -> tuple[str, str]:
    """Stub /etc/passwd and /etc/group: the users a process may need to look up (itself,
    root, nobody), and nothing of the host's list."""
    folder = Path(tempfile.mkdtemp(prefix="farm-sandbox-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    uid, gid = os.getuid(), os.getgid()
    users = {0: "root:x:0:0:root:/root:/usr/sbin/nologin", 65534: "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin"}
    users.setdefault(uid, f"farm:x:{uid}:{gid}:farm:/nonexistent:/usr/sbin/nologin")
    groups = {0: "root:x:0:", 65534: "nogroup:x:65534:"}
    groups.setdefault(gid, f"farm:x:{gid}:")
    (folder / "passwd").write_text("\n".join(users.values()) + "\n")
    (folder / "group").write_text("\n".join(groups.values()) + "\n")
    return str(folder / "passwd"), str(folder / "group")


def _system_args() -> list[str]:
    return list(_system_layout())


@functools.lru_cache(maxsize=1)
def _system_layout() -> tuple[str, ...]:
    """The system part of every sandbox, looked up once per process (a dozen stat calls
    per segment otherwise): the installed system does not move under a running node."""
    args: list[str] = []
    for path in SYSTEM_PATHS:
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    args += ["--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp", "--dir", "/var/tmp"]
    for path in MASKED_SYSTEM:
        if os.path.isdir(path) and not os.path.islink(path):
            args += ["--tmpfs", path, "--remount-ro", path]
        elif os.path.lexists(path):
            args += ["--ro-bind", "/dev/null", path]
    return tuple(args)


def _system_visible(path: str) -> bool:
    return any(path == root or path.startswith(root + "/") for root in ("/usr", "/etc")) and \
        not any(path == masked or path.startswith(masked + "/") for masked in MASKED_SYSTEM)


def executable_paths(argv0: str) -> list[str]:
    """What must be visible for ``argv0`` to start: nothing for a system program; for
    another (an allowed tool in /opt, a Python in a venv) its folder and, beside a
    ``bin/`` folder, the ``lib``, ``lib64``, ``share`` folders and ``pyvenv.cfg``."""
    found = shutil.which(argv0)
    if found is None:
        return []
    paths: list[str] = []
    for candidate in {os.path.abspath(found), os.path.realpath(found)}:
        folder = os.path.dirname(candidate)
        if _system_visible(folder) or folder in ("/bin", "/sbin"):
            continue
        paths.append(folder)
        if os.path.basename(folder) == "bin":
            prefix = os.path.dirname(folder)
            paths += [os.path.join(prefix, name) for name in ("lib", "lib64", "share", "pyvenv.cfg")
                      if os.path.exists(os.path.join(prefix, name))]
    return paths


@dataclass
class Policy:
    """What one attempt's processes may touch (paths as this machine sees them)."""

    read: list[str] = field(default_factory=list)
    write: list[str] = field(default_factory=list)
    network: bool = False


def _inside(path: str, roots: Iterable[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


def wrap(argv: Sequence[str], policy: Policy, cwd: str, hidden: Sequence[str] = ()) -> list[str]:
    """The bwrap command line that runs ``argv`` in ``cwd`` under ``policy``.

    Mounts are laid out from the shallowest path to the deepest, so a folder hidden
    inside a readable one stays hidden, and a writable attempt folder inside the hidden
    state directory is still writable.
    """
    passwd, group = _identity_files()
    if not (os.path.exists(passwd) and os.path.exists(group)):  # a /tmp cleaner took them: write them again
        _identity_files.cache_clear()
        passwd, group = _identity_files()
    args = ["bwrap", *_system_args(), "--ro-bind", passwd, "/etc/passwd", "--ro-bind", group, "/etc/group"]
    mounts: list[tuple[int, int, str, str]] = []  # (depth, order, kind, path)
    visible: list[str] = []
    writable = [os.path.abspath(raw) for raw in policy.write]
    hidden = [os.path.abspath(path) for path in hidden]
    if policy.network and os.path.islink("/etc/resolv.conf"):  # e.g. systemd-resolved's, under /run
        args += ["--ro-bind-try", os.path.realpath("/etc/resolv.conf"), os.path.realpath("/etc/resolv.conf")]
    for order, kind, paths in ((0, "ro", [*policy.read, *executable_paths(argv[0])]), (2, "rw", policy.write)):
        for raw in paths:
            path = os.path.abspath(raw)
            if not os.path.lexists(path):
                continue
            if kind == "ro" and (_system_visible(path) or _inside(path, writable)):
                continue  # visible already, and a file inside a writable folder stays writable
            if kind == "ro" and _inside(path, hidden):
                continue  # a store or a bundle stays hidden even when named
            mounts.append((path.count("/"), order, kind, path))
            visible.append(path)
    for path in hidden:
        if os.path.lexists(path) and (_inside(path, visible) or _system_visible(path)):
            mounts.append((path.count("/"), 1, "hide", path))
    for _, _, kind, path in sorted(set(mounts)):
        real = os.path.realpath(path)
        if kind == "hide":
            args += ["--tmpfs", path] if os.path.isdir(path) else ["--ro-bind", "/dev/null", path]
            continue
        flag = "--ro-bind" if kind == "ro" else "--bind"
        args += [flag, real, path]
        if real != path:  # reachable by its real name too (a link to the input, a venv's python)
            args += [flag, real, real]
    if os.geteuid() == 0:
        args += ["--cap-drop", "ALL"]  # root in the sandbox must not remount what is read-only
    # --as-pid-1: the command itself heads its process namespace, so the node's wait4()
    # sees its CPU time and memory (behind bwrap's own init they are lost); when it ends,
    # or bwrap dies with its worker (--die-with-parent), everything in the namespace ends,
    # even a child that left the process group.
    args += ["--unshare-all", *(["--share-net"] if policy.network else []), "--die-with-parent", "--as-pid-1",
             "--chdir", cwd, "--", *argv]
    return args


def sandbox_environment(base: dict[str, str], home: str) -> dict[str, str]:
    """The node's environment without Farm's own variables (tokens, bundle paths), with
    ``home`` (the attempt's scratch folder, on the node's disk rather than in the
    memory of the private /tmp) as its home and temporary folder."""
    env = {key: value for key, value in base.items() if not key.startswith("FARM_")}
    env.update({"HOME": home, "TMPDIR": home})
    return env


__all__ = ["ProcessEnv", "WorkFolder", "Policy", "wrap", "availability", "check_env", "check_cwd", "hide", "hidden_paths",
           "DEFAULT_ALLOW_ENV", "never_allowed_env", "sandbox_environment"]
