"""Where Farm keeps things, and the node's own configuration (``farm.yaml``).

The configuration file is found at ``--config``, ``$FARM_CONFIG``, or
``farm.yaml`` in the user's config directory; a missing default file means defaults.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import platformdirs
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from farm.droplets.config import DropletList
from farm.errors import UsageError
from farm.sandbox import DEFAULT_ALLOW_ENV, never_allowed_env

APP = "farm"


def state_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The state directory: ``--state``, then ``$FARM_STATE``, then the platform's."""
    chosen = explicit or os.environ.get("FARM_STATE") or platformdirs.user_state_dir(APP)
    return Path(chosen).expanduser().resolve()


def cache_dir() -> Path:
    """Where Farm keeps what it can fetch or work out again (programs' answers, a node's
    fetched inputs): ``$FARM_CACHE``, then the platform's cache folder."""
    return Path(os.environ.get("FARM_CACHE") or platformdirs.user_cache_dir(APP)).expanduser()


def make_state_dir(path: Path) -> Path:
    """Create the state directory 0700 when it is missing: it holds the store (profiles
    with their ``env`` values, every job's log). One that exists keeps its mode: it may
    be a folder the user chose and shares with other things."""
    if not path.is_dir():
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def config_dir() -> Path:
    return Path(platformdirs.user_config_dir(APP))


class PartTime(BaseModel):
    """Qmaster's part-time processing: take work only when the machine is idle and/or
    inside given hours."""

    model_config = ConfigDict(extra="forbid")

    #: Local hours when work is taken, e.g. "18:00-08:00" (may wrap past midnight).
    hours: str | None = Field(default=None, pattern=r"^\d{1,2}:\d{2}-\d{1,2}:\d{2}$")
    #: Idle means other processes use less than this share of the CPU (percent) ...
    idle_cpu_below: float | None = Field(default=None, gt=0, le=100)
    #: ... for this many minutes.
    idle_minutes: float = Field(default=5.0, ge=0)
    #: When the machine gets busy, hand running segments back (re-queued elsewhere).
    hand_back: bool = False


class NodeConfig(BaseModel):
    """What a node allows and offers."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    slots: int | None = Field(default=None, ge=1)
    #: Executables the command processor may start: names looked up on PATH, or
    #: absolute paths. The default allows only what the shipped examples need.
    allow_commands: list[str] = Field(default_factory=lambda: ["ffmpeg"])
    #: Seconds between SIGTERM and SIGKILL when a segment's process group is ended.
    kill_grace: float = Field(default=1.5, ge=0)
    #: Path prefixes as the controller writes them -> as this node sees them,
    #: e.g. {"/Volumes/Media": "/mnt/media"}.
    path_map: dict[str, str] = Field(default_factory=dict)
    part_time: PartTime | None = None
    #: Run every segment's processes in a bubblewrap sandbox (Linux). ``off`` only for a
    #: node that cannot use it; `farm doctor` and `farm nodes` then say so.
    sandbox: bool = True
    #: Folders every sandboxed process may read besides the system and what its job was
    #: given, e.g. a shared library of textures: ["/mnt/library"].
    sandbox_read: list[str] = Field(default_factory=list)
    #: Environment variables a profile's ``env`` may set. LD_*, DYLD_*, PYTHON* and
    #: FFREPORT can never be listed.
    allow_env: list[str] = Field(default_factory=lambda: list(DEFAULT_ALLOW_ENV))
    #: Whether this node sees the controller's files (inputs, cluster storage) at the same
    #: paths (after path_map): ``shared``; ``local``: it sees none of them, and fetches a
    #: segment's inputs from the controller and sends its outputs back (see
    #: docs/cluster.md); ``auto``: it does so for what it cannot see.
    storage: Literal["auto", "shared", "local"] = "auto"
    #: Where a node without shared storage keeps fetched inputs (by content hash).
    #: Default: ``transfer`` in the user's cache folder.
    cache: str | None = None
    #: The most bytes of fetched inputs kept; the least recently used go first.
    cache_bytes: int = Field(default=20 * 1024**3, ge=0)
    #: Fetch inputs at most this fast (bytes per second), to leave bandwidth to others.
    transfer_rate: int | None = Field(default=None, ge=1)

    @field_validator("allow_env")
    @classmethod
    def _allow_env(cls, names: list[str]) -> list[str]:
        for name in names:
            if never_allowed_env(name):
                raise ValueError(f"{name} can never be allowed: it loads code into or makes files from the process")
        return names

    @field_validator("sandbox_read")
    @classmethod
    def _sandbox_read(cls, paths: list[str]) -> list[str]:
        for path in paths:
            if not os.path.isabs(path):
                raise ValueError(f"{path!r}: expected an absolute path")
        return paths


class ControllerConfig(BaseModel):
    """Where the controller listens and keeps segment outputs."""

    model_config = ConfigDict(extra="forbid")

    #: The cluster bundle (file or folder from `farm cluster init`).
    bundle: str | None = None
    #: Address to listen on for Dask and the API; nodes on other machines need a
    #: reachable one (0.0.0.0 listens everywhere).
    host: str = "0.0.0.0"
    scheduler_port: int = Field(default=8786, ge=0, le=65535)
    api_port: int = Field(default=8780, ge=0, le=65535)
    #: Cluster storage: a folder every node reaches at the same path (after path_map),
    #: where segment outputs wait for assembly. Default: under the state directory.
    storage: str | None = None
    #: Advertise with zeroconf so that nodes find the controller by themselves.
    advertise: bool = True
    #: The largest request body the API takes, in bytes; a bigger one is refused (413)
    #: before it is read. Bodies are JSON (a submission); 1 MiB is thousands of inputs.
    max_request_bytes: int = Field(default=1024 * 1024, ge=1024)

    #: Destination roots: folders under which a ``submit`` token may write outputs
    #: (an ``admin`` token may write anywhere the controller can). Empty: nowhere.
    destinations: list[str] = Field(default_factory=list)
    #: The token table (hashed API tokens with roles). Default: ``tokens.yaml`` next to
    #: the controller's bundle, where `farm cluster token` writes it.
    tokens: str | None = None
    #: Remove jobs that ended (done, failed, cancelled) longer ago than this, with their
    #: logs and work folders, e.g. ``30d`` (checked at start and every hour; see `farm
    #: purge`). Default: keep every job.
    retention: str | None = None

    @field_validator("retention")
    @classmethod
    def _retention(cls, value: str | None) -> str | None:
        if value is not None:
            from farm.purge import parse_age

            parse_age(value)  # its ValueError is the message
        return value


class ProfileLimits(BaseModel):
    """What a profile may hold, checked before anything in it is expanded: a profile
    (or a ``--set`` value) beyond these is refused with one line."""

    model_config = ConfigDict(extra="forbid")

    profile_bytes: int = Field(default=1024 * 1024, ge=1024,
                               description="largest profile file, in bytes")
    depth: int = Field(default=32, ge=4, le=200,
                       description="deepest nesting of mappings and lists")
    values: int = Field(default=10_000, ge=100,
                        description="most values a profile holds once its aliases (*name) are expanded")
    frames: int = Field(default=1_000_000, ge=1,
                        description="most frames a frame range may name (counted before any list is made)")


class FarmConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    node: NodeConfig = Field(default_factory=NodeConfig)
    droplets: DropletList = Field(default_factory=list)
    controller: ControllerConfig = Field(default_factory=ControllerConfig)
    #: Limits on profiles and ``--set`` values (see docs/profiles.md).
    limits: ProfileLimits = Field(default_factory=ProfileLimits)
    #: Keep a done job's work folder (its segments' outputs, in the state directory or the
    #: cluster storage) instead of removing it; by default it is removed when the job is
    #: done, and at the next start if a process was killed first.
    keep_work: bool = False
    #: Settings for plugins, by plugin (entry point) name, e.g. ``notify: {...}``; each
    #: plugin validates its own (see the ``farm_configure`` hook).
    plugins: dict[str, dict[str, Any]] = Field(default_factory=dict)


def load_config(explicit: str | os.PathLike[str] | None = None) -> FarmConfig:
    """Read ``farm.yaml``; an explicitly named file must exist."""
    named = explicit or os.environ.get("FARM_CONFIG")
    path = Path(named).expanduser() if named else config_dir() / "farm.yaml"
    if not path.exists():
        if named:
            raise UsageError(f"config file {path} does not exist")
        return FarmConfig()
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UsageError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    try:
        return FarmConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        raise UsageError(f"{path}: {key}: {first['msg'].removeprefix('Value error, ')}") from None
