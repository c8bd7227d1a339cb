"""Find, load, merge and validate YAML job profiles.

Profiles are found by path, or by name in ``./profiles``, the user's config directory
(``profiles/``) and the shipped ``profiles/``, first match wins. ``extends:`` starts
from another profile; ``--set a.b=c`` overrides any key. Every error names the file
(and line where there is one), the key path, and what was expected.
"""

from __future__ import annotations

import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo,
                      field_validator)

from farm.config import ProfileLimits, config_dir
from farm.errors import FarmError, ProfileError, UsageError
from farm.frames import count_frames, parse_frames
from farm.security import usable_path

SHIPPED_PROFILES = Path(__file__).resolve().parent.parent / "profiles"
PRIORITY_NAMES = {"high": 10, "normal": 0, "low": -10}
PRIORITY_BOUND = 1_000_000  # a priority is a whole number from -PRIORITY_BOUND to PRIORITY_BOUND
_DURATION = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s)?\s*$")


def parse_duration(value: Any) -> float:
    """Seconds from ``90``, ``"90s"``, ``"30m"``, ``"1h30m"``."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 90s, 30m or 1h30m")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif re.fullmatch(r"\s*\d+(?:\.\d+)?\s*", str(value)):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match or not any(match.groups()):
            raise ValueError(f"expected a duration such as 90s, 30m or 1h30m, got {value!r}")
        hours, minutes, secs = (float(g) if g else 0.0 for g in match.groups())
        seconds = hours * 3600 + minutes * 60 + secs
    if seconds <= 0:
        raise ValueError(f"a duration must be more than zero, got {value!r}")
    return seconds


def parse_priority(value: Any) -> int:
    expected = f"expected high, normal, low or a whole number from {-PRIORITY_BOUND} to {PRIORITY_BOUND}"
    if isinstance(value, bool):
        raise ValueError(expected)
    if isinstance(value, str) and value.strip().lower() in PRIORITY_NAMES:
        return PRIORITY_NAMES[value.strip().lower()]
    if isinstance(value, str) and re.fullmatch(r"-?\d{1,30}", value.strip()):
        value = int(value)
    if isinstance(value, int):
        if not -PRIORITY_BOUND <= value <= PRIORITY_BOUND:
            raise ValueError(f"{expected}, got {clip(value)}")
        return value
    raise ValueError(f"{expected}, got {clip(value)}")


def clip(value: Any, limit: int = 60) -> str:
    """``repr(value)`` short enough for a one-line error, however big the value."""
    if isinstance(value, (dict, list)) and len(value) > 20:
        return f"a {type(value).__name__} of {len(value)} items"
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**60 else f"a number of {len(str(value))} digits"
    return text if len(text) <= limit else f"{text[: limit - 20]}...({len(text)} characters)"


Duration = Annotated[float, BeforeValidator(parse_duration)]
Priority = Annotated[int, BeforeValidator(parse_priority)]


class SegmentConfig(BaseModel):
    """How a job is cut: by frames (frame-based processors) or seconds (time-based)."""

    model_config = ConfigDict(extra="forbid")

    frames: int | None = Field(default=None, ge=1, description="frames per segment")
    seconds: float | None = Field(default=None, gt=0, description="seconds per segment")
    target_seconds: float | None = Field(
        default=None, gt=0, description="re-cut remaining frames so a segment takes about this long"
    )


class SandboxConfig(BaseModel):
    """What a profile's processes may touch besides what the job gives them (see
    docs/cluster.md, "The sandbox"). Only an admin's profile may widen it: a submit
    token's overrides of these keys are refused."""

    model_config = ConfigDict(extra="forbid")

    network: bool = Field(default=False, description="the processes may use the network")
    read: list[str] = Field(default_factory=list, description="more folders or files to read (absolute paths)")
    write: list[str] = Field(default_factory=list, description="more folders to write (absolute paths)")

    @field_validator("read", "write")
    @classmethod
    def _absolute(cls, paths: list[str]) -> list[str]:
        for path in paths:
            if not Path(path).is_absolute():
                raise ValueError(f"{path!r}: expected an absolute path")
        return paths


#: Profile keys (dotted) that widen what a process may do, whatever the processor.
SENSITIVE_PROFILE_KEYS = frozenset({"sandbox"})


def sensitive_keys(processor: Any) -> frozenset[str]:
    """Dotted keys a submitter must not override for this processor: the profile's own
    (``sandbox``) and the processor's ``sensitive_settings`` under ``settings.``."""
    own = getattr(processor, "sensitive_settings", frozenset())
    return SENSITIVE_PROFILE_KEYS | {f"settings.{key}" for key in own}


def is_sensitive(key: str, processor: Any) -> bool:
    """Whether an override of ``key`` (``settings.env.LD_PRELOAD``, ``sandbox.network``)
    touches a sensitive key or something below one."""
    parts = key.strip().split(".")
    return any(".".join(parts[:depth]) in sensitive_keys(processor) for depth in range(1, len(parts) + 1)) or \
        any(sensitive.startswith(key.strip() + ".") for sensitive in sensitive_keys(processor))


class Profile(BaseModel):
    """The keys common to every processor; ``settings`` belongs to the processor."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, description="how users and droplets refer to it (default: the file name)")
    description: str = Field(default="", description="one line shown by `farm profiles list`")
    processor: str = Field(min_length=1, description="a registered processor: command, transcode, imageseq, ...")
    frames: str | None = Field(default=None, description="frame range: 1-240, 1-240x2, 1,5,10-20 "
                                                         "(at most limits.frames frames, 1,000,000 by default)")
    segment: SegmentConfig = Field(default_factory=SegmentConfig, description="how a job is cut into segments")
    settings: dict[str, Any] = Field(default_factory=dict, description="the processor's own settings (below)")
    output: str | None = Field(default=None, description="output name template")
    destination: str | None = Field(default=None, description="default destination folder (-o overrides it)")
    overwrite: bool = Field(default=False, description="replace outputs that already exist")
    retries: int = Field(default=2, ge=0, description="retries per segment")
    timeout: Duration | None = Field(default=None, description="per segment attempt")
    stall_timeout: Duration | None = Field(
        default=None, description="an attempt with no progress for this long is ended"
    )
    priority: Priority = Field(default=0, description="high (10), normal (0), low (-10) or a whole number "
                                                      "from -1000000 to 1000000")
    requires: dict[str, str] = Field(default_factory=dict, description="what a node must offer: {povray: '>=3.7'}")
    then: str | None = Field(default=None, description="a profile to run on this job's first output when it is done")
    preview: bool = Field(default=True, description="make a small picture of each finished segment for the "
                                                     "Batch Monitor (false: none, and no time spent on it)")
    max_node_failures: int = Field(
        default=3, ge=1, description="failures on one node before it is kept off the job"
    )
    expose: list[str] = Field(
        default_factory=list,
        description="keys a `submit` token may set (`--set`), as dotted paths: frames, settings.video.crf; "
                    "a group (settings.video) exposes every key in it. Admin tokens may set any key",
    )

    @field_validator("expose")
    @classmethod
    def _expose(cls, value: list[str]) -> list[str]:
        for key in value:
            if not re.fullmatch(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*", key):
                raise ValueError(f"expected dotted key paths such as settings.video.crf, got {key!r}")
        return value
    sandbox: SandboxConfig = Field(default_factory=SandboxConfig,
                                   description="network, extra read and write paths for the processes")

    @field_validator("frames", mode="before")
    @classmethod
    def _frames(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(f"expected frames such as 1-240, 1-240x2 or 1,5,10-20, got {clip(value)}")
        limits = (info.context or {}).get("limits")
        try:
            # counted, never expanded: a range of a billion frames is refused at no cost
            count = count_frames(value)
        except FarmError as exc:
            raise ValueError(str(exc)) from None
        if limits is not None and count > limits.frames:
            raise ValueError(f"names {count:,} frames; at most {limits.frames:,} are allowed "
                             "(limits.frames in farm.yaml)")
        return str(value)

    @field_validator("requires", mode="before")
    @classmethod
    def _requires(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {str(k): "" if v is None else str(v) for k, v in value.items()}
        return value

    @property
    def frame_list(self) -> list[int] | None:
        return parse_frames(self.frames) if self.frames is not None else None


@dataclass
class LoadedProfile:
    profile: Profile
    settings: BaseModel
    source: Path | None
    origins: dict[tuple[str, ...], str] = field(default_factory=dict)


# -- finding ------------------------------------------------------------------------


def search_paths() -> list[Path]:
    return [Path.cwd() / "profiles", config_dir() / "profiles", SHIPPED_PROFILES]


def looks_like_path(ref: str) -> bool:
    """A profile named by path rather than by name (path-like names are never searched)."""
    return "/" in ref or "\\" in ref or ref.endswith((".yaml", ".yml")) or ref in (".", "..")


def resolve(ref: str, relative_to: Path | None = None) -> Path:
    """The file behind a profile name or path."""
    try:
        usable_path(ref, "profile")
    except UsageError as exc:
        raise ProfileError(str(exc)) from None
    if looks_like_path(ref):
        candidates = [Path(ref).expanduser()]
        if relative_to is not None and not Path(ref).is_absolute():
            candidates.insert(0, relative_to / ref)
        for candidate in candidates:
            if candidate.is_file():
                return candidate.resolve()
        if candidates[-1].is_dir():
            raise ProfileError(f"profile {ref!r} is a directory; expected a YAML file")
        raise ProfileError(f"profile file {ref!r} does not exist")
    folders = ([relative_to] if relative_to else []) + search_paths()
    for folder in folders:
        for suffix in (".yaml", ".yml"):
            candidate = folder / f"{ref}{suffix}"
            if candidate.is_file():
                return candidate.resolve()
    looked = ", ".join(str(p) for p in folders)
    known = ", ".join(sorted(entry.name for entry in list_profiles())) or "none"
    raise ProfileError(f"unknown profile {ref!r}; looked in {looked}; known profiles: {known}")


@dataclass
class ProfileEntry:
    name: str
    path: Path
    description: str


def list_profiles() -> list[ProfileEntry]:
    """Every profile on the search path; a name found twice is listed once (first wins)."""
    found: dict[str, ProfileEntry] = {}
    for folder in search_paths():
        if not folder.is_dir():
            continue
        for path in sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]):
            if path.stem in found:
                continue
            try:
                data, _ = load_yaml(read_text(path, ProfileLimits()), str(path), ProfileLimits())
                description = str(data.get("description", ""))[:200] if isinstance(data, dict) else ""
            except FarmError:
                description = "(unreadable)"
            found[path.stem] = ProfileEntry(path.stem, path, description)
    return sorted(found.values(), key=lambda entry: entry.name)


# -- reading and merging --------------------------------------------------------------


# libyaml's parser when PyYAML has it: a profile near the size limit is read in a tenth
# of the time the pure-Python one takes.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _TooDeep(Exception):
    def __init__(self, mark: Any):
        self.mark = mark


class _TooMany(Exception):
    pass


def _check_shape(text: str, limits: ProfileLimits) -> None:
    """Refuse nesting deeper than ``limits.depth``, and more written values than
    ``limits.values``, on the event stream, before anything is composed: composing
    recurses (a few thousand ``[`` end in RecursionError) and costs far more per value."""
    depth = 0
    values = 0
    try:
        for event in yaml.parse(text, Loader=_Loader):
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                values += 1
                if depth > limits.depth:
                    raise _TooDeep(event.start_mark)
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
            elif isinstance(event, yaml.ScalarEvent):
                values += 1
            if values > limits.values:
                raise _TooMany()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        if mark is not None and "nesting" in str(getattr(exc, "problem", "")):
            raise _TooDeep(mark) from None  # libyaml's own limit, met first
        raise


def _expanded_size(root: yaml.Node, limit: int) -> int:
    """How many values the document holds once every alias is expanded, counted on the
    node graph (each shared node once, times its uses), so an alias bomb is measured
    without being built. Stops counting past ``limit``; -1 for an alias that contains itself."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise _Cycle()
        open_nodes.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        else:
            children = []
        for child in children:
            total += size(child)
            if total > limit:
                break
        open_nodes.discard(key)
        sizes[key] = total
        return total

    try:
        return size(root)
    except _Cycle:
        return -1


class _Cycle(Exception):
    pass


def load_yaml(text: str, where: str, limits: ProfileLimits) -> tuple[Any, yaml.Node | None]:
    """YAML text as Python data and its node graph, refused in one line (naming ``where``)
    when it nests deeper than ``limits.depth`` or expands past ``limits.values`` values."""
    def at(mark: Any) -> str:  # a file's line; an override is one line anyway
        return where if where.startswith("--set") else f"{where}:{mark.line + 1}"

    loader = None
    try:
        _check_shape(text, limits)
        loader = _Loader(text)
        node = loader.get_single_node()
        if node is None:
            return None, None
        size = _expanded_size(node, limits.values)
        if size < 0:
            raise ProfileError(f"{where}: an alias (*name) refers to the value that contains it; "
                               "a profile must be a tree")
        if size > limits.values:
            raise _TooMany()
        return loader.construct_document(node), node
    except _TooMany:
        raise ProfileError(f"{where}: holds more than {limits.values:,} values, counting what each alias (*name) "
                           "stands for (limits.values in farm.yaml)") from None
    except _TooDeep as deep:
        raise ProfileError(f"{at(deep.mark)}: nested deeper than {limits.depth} levels "
                           "(limits.depth in farm.yaml)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ProfileError(f"{at(mark) if mark else where}: YAML syntax error: {clip(problem, 200)[1:-1]}") from None
    except ValueError as exc:  # a number with more digits than Python converts, and the like
        problem = "a number has too many digits" if "digits" in str(exc) else clip(str(exc), 200)[1:-1]
        raise ProfileError(f"{where}: cannot read a value: {problem}") from None
    finally:
        if loader is not None:
            loader.dispose()


def read_text(path: Path, limits: ProfileLimits) -> str:
    """A profile file's text; one bigger than ``limits.profile_bytes`` is refused unread."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(limits.profile_bytes + 1)
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read profile ({exc.strerror or exc})") from None
    if len(raw) > limits.profile_bytes:
        raise ProfileError(f"{path}: a profile is at most {limits.profile_bytes:,} bytes; this one is bigger "
                           "(limits.profile_bytes in farm.yaml)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProfileError(f"{path}: cannot read profile (not UTF-8 text: {exc.reason} at byte {exc.start})") from None


def _read_layer(path: Path, limits: ProfileLimits) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    data, node = load_yaml(read_text(path, limits), str(path), limits)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ProfileError(f"{path}:1: a profile must be a mapping of keys, got {type(data).__name__}")
    origins: dict[tuple[str, ...], str] = {}

    def walk(current: yaml.Node | None, prefix: tuple[str, ...]) -> None:
        if isinstance(current, yaml.MappingNode):
            for key_node, value_node in current.value:
                key_path = (*prefix, str(key_node.value))
                origins[key_path] = f"{path}:{key_node.start_mark.line + 1}"
                walk(value_node, key_path)

    walk(node, ())
    return data, origins


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _load_layers(path: Path, limits: ProfileLimits,
                 chain: tuple[Path, ...] = ()) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise ProfileError(f"{path}: extends itself in a cycle: {cycle}")
    data, origins = _read_layer(path, limits)
    data.setdefault("name", path.stem)
    parent_ref = data.pop("extends", None)
    if parent_ref is None:
        return data, origins
    if not isinstance(parent_ref, str):
        raise ProfileError(f"{origins.get(('extends',), path)}: extends: expected a profile name or path")
    try:
        parent_path = resolve(parent_ref, relative_to=path.parent)
    except ProfileError as exc:
        raise ProfileError(f"{origins.get(('extends',), path)}: extends: {exc}") from None
    parent_data, parent_origins = _load_layers(parent_path, limits, (*chain, path))
    return _deep_merge(parent_data, data), {**parent_origins, **origins}


def apply_overrides(
    data: dict[str, Any], origins: dict[tuple[str, ...], str], overrides: list[str],
    limits: ProfileLimits | None = None,
) -> None:
    """Apply ``a.b=c`` overrides in place; values are read as YAML scalars or lists."""
    limits = limits or ProfileLimits()
    for item in overrides:
        shown = clip(item)
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ProfileError(f"--set {shown}: expected KEY=VALUE, such as segment.frames=5")
        path = tuple(part for part in key.strip().split("."))
        if any(not part for part in path):
            raise ProfileError(f"--set {shown}: {clip(key)} is not a dotted key path")
        if len(path) > limits.depth:
            raise ProfileError(f"--set {shown}: a key path is at most {limits.depth} keys deep")
        try:
            value, _ = load_yaml(raw, f"--set {shown}", limits) if raw.strip() else ("", None)
        except ProfileError as exc:
            if "YAML syntax error" not in str(exc):
                raise  # too deep, too many values: refused, not taken as text
            value = raw
        target = data
        for depth, part in enumerate(path[:-1]):
            existing = target.get(part)
            if existing is None:
                existing = target[part] = {}
            if not isinstance(existing, dict):
                where = ".".join(path[: depth + 1])
                raise ProfileError(f"--set {shown}: {clip(where)[1:-1]} is a value, not a group of keys")
            target = existing
        target[path[-1]] = value
        origins[path] = f"--set {shown[1:-1]}"


# -- validating -----------------------------------------------------------------------


def _known_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str] | None:
    current: Any = model
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        info = current.model_fields.get(str(part))
        if info is None:
            return None
        current = _model_in(info.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return sorted(current.model_fields)
    return None


def _model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                return arg
    return annotation


def describe_validation_error(
    exc: ValidationError,
    model: type[BaseModel],
    origins: dict[tuple[str, ...], str],
    source: Path | None,
    prefix: tuple[str, ...] = (),
) -> str:
    """One line for the first problem (and a count of the rest)."""
    problems = []
    for error in exc.errors():
        loc = tuple(str(part) for part in error["loc"])
        key_path = (*prefix, *loc)
        where = None
        # A problem with one entry of a mapping (settings.env: LD_PRELOAD: ...) is told
        # where that entry came from, e.g. the --set that added it.
        for deeper, origin in origins.items():
            if len(deeper) == len(key_path) + 1 and deeper[:-1] == key_path and \
                    error["msg"].removeprefix("Value error, ").startswith(f"{deeper[-1]}:"):
                where = origin
                break
        for depth in range(len(key_path), 0, -1):
            if where:
                break
            where = origins.get(key_path[:depth])
            if where:
                break
        if not where:  # a key that only a --set below it brought in (--set video.crf=18)
            where = next((origin for deeper, origin in origins.items()
                          if deeper[:len(key_path)] == key_path and origin.startswith("--set")), None)
        where = where or (str(source) if source else "profile")
        key = clip(".".join(key_path))[1:-1]
        if error["type"] == "extra_forbidden":
            known = _known_keys(model, tuple(error["loc"][:-1]))
            hint = f"; expected one of: {', '.join(known)}" if known else ""
            if where.startswith("--set") and not prefix and len(key_path) == 1 and "settings" in (known or []):
                hint += f" (a processor's settings are under settings., e.g. settings.{where[6:]})"
            message = f"unknown key {loc[-1]!r}{hint}"
        elif error["type"] == "missing":
            message = "required key is missing"
        else:
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] not in ("value_error",) and "input" in error:
                message += f" (got {clip(error['input'])})"
        problems.append(f"{where}: {key}: {message}")
    more = f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})" if len(problems) > 1 else ""
    return problems[0] + more


def _node_allow_env() -> list[str] | None:
    from farm.config import load_config

    try:
        return load_config().node.allow_env
    except FarmError:  # a broken farm.yaml is reported where it is read for itself
        return None


def load_profile(ref: str, plugins: Any, overrides: list[str] | None = None,
                 relative_to: Path | None = None, limits: ProfileLimits | None = None,
                 allow_env: list[str] | None = None) -> LoadedProfile:
    """Find, merge, override and validate a profile, including its processor's settings.

    ``limits`` (farm.yaml's ``limits:``) bound what the files and overrides may hold;
    ``allow_env`` is the node's environment allow-list that a profile's ``env`` is
    checked against (default: ``node.allow_env`` of farm.yaml).
    """
    limits = limits or ProfileLimits()
    source = resolve(ref, relative_to)
    data, origins = _load_layers(source, limits)
    apply_overrides(data, origins, overrides or [], limits)
    try:
        profile = Profile.model_validate(data, context={"limits": limits})
    except ValidationError as exc:
        raise ProfileError(describe_validation_error(exc, Profile, origins, source)) from None
    try:
        processor = plugins.processor(profile.processor)
    except FarmError as exc:
        where = origins.get(("processor",), str(source))
        raise ProfileError(f"{where}: processor: {exc}") from None
    try:
        settings = processor.settings_model.model_validate(
            profile.settings, context={"allow_env": allow_env if allow_env is not None else _node_allow_env()})
    except ValidationError as exc:
        raise ProfileError(
            describe_validation_error(exc, processor.settings_model, origins, source, prefix=("settings",))
        ) from None
    if profile.frames is not None and not processor.frame_based:
        where = origins.get(("frames",), str(source))
        raise ProfileError(
            f"{where}: frames: processor {processor.name!r} does not work on frame ranges; remove the key"
        )
    try:
        processor.check(profile, settings)
    except FarmError as exc:
        raise ProfileError(f"{source}: {exc}") from None
    return LoadedProfile(profile, settings, source, origins)
