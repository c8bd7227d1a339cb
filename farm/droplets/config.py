"""A droplet's configuration: the ``droplets:`` list of ``farm.yaml``, or ``farm watch``'s options.

Checked when the configuration is read: a destination inside a watched folder, two
droplets on one folder, or a folder nested in another recursive droplet's folder are
refused before anything watches. This module imports nothing heavy (``farm.config``
imports it).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

#: Names of copies still being written; such a file is ignored until it is renamed.
PARTIAL_SUFFIXES = (".part", ".partial", ".crdownload", ".download", ".tmp", ".temp", ".!qb")
PARTIAL_PREFIXES = (".", "~$")


def _seconds(value: Any) -> Any:
    """``2``, ``2.5``, ``"2s"``, ``"500ms"`` as seconds."""
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s)?\s*", value)
        if not match:
            raise ValueError(f"expected seconds such as 2, 2.5, 2s or 500ms, got {value!r}")
        number = float(match.group(1))
        return number / 1000 if match.group(2) == "ms" else number
    return value


Seconds = Annotated[float, BeforeValidator(_seconds)]


def _overrides(value: Any) -> Any:
    """``set:`` as a list of ``KEY=VALUE`` or a mapping ``{KEY: VALUE}``."""
    if isinstance(value, dict):
        import json

        return [f"{key}={item if isinstance(item, str) else json.dumps(item)}" for key, item in value.items()]
    return value


def is_partial_name(name: str) -> bool:
    """A name that a copy in progress has: dotfiles, ``~$`` files, ``.part``, ``.crdownload``, ``.tmp``..."""
    return name.startswith(PARTIAL_PREFIXES) or name.lower().endswith(PARTIAL_SUFFIXES)


def folder_key(folder: str | os.PathLike[str]) -> str:
    """The ledger's key for a watched folder: its absolute path (symlinks resolved)."""
    return str(Path(folder).expanduser().resolve())


def lock_name(key: str) -> str:
    return hashlib.sha1(key.encode()).hexdigest()[:16] + ".lock"


class DropletConfig(BaseModel):
    """One watched folder bound to a profile and a destination."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str | None = Field(default=None, description="how it is shown (default: the folder's path)")
    folder: Path = Field(description="the watched folder")
    profile: str = Field(min_length=1, description="profile name or path")
    overrides: Annotated[list[str], BeforeValidator(_overrides)] = Field(
        default_factory=list, alias="set", description="profile overrides, KEY=VALUE by dotted path")
    destination: Path = Field(description="where outputs go; never inside a watched folder")
    include: list[str] = Field(default_factory=lambda: ["*"], description="name patterns to take")
    exclude: list[str] = Field(default_factory=list, description="name patterns to leave alone")
    recursive: bool = False
    settle: Seconds = Field(default=2.0, ge=0, description="seconds a file's size and mtime must stay unchanged")
    after: Literal["leave", "move", "delete"] = Field(default="move", description="what happens to a processed file")
    done: Path | None = Field(default=None, description="where processed files go (default: FOLDER/done)")
    failed: Path | None = Field(default=None, description="where failed files go (default: FOLDER/failed)")
    observer: Literal["auto", "native", "polling"] = "auto"
    poll_interval: Seconds = Field(default=1.0, gt=0, description="seconds between polls (polling observer)")
    rescan: Seconds = Field(default=60.0, ge=0, description="seconds between safety rescans of the folder (0: never)")
    enabled: bool = True

    @field_validator("folder", "destination", "done", "failed", mode="after")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        return None if value is None else Path(os.path.abspath(value.expanduser()))

    @field_validator("overrides")
    @classmethod
    def _check_overrides(cls, value: list[str]) -> list[str]:
        for item in value:
            if "=" not in item or not item.partition("=")[0].strip():
                raise ValueError(f"expected KEY=VALUE, such as frames=1-10, got {item!r}")
        return value

    @model_validator(mode="after")
    def _outputs_outside(self) -> DropletConfig:
        if inside(real(self.destination), real(self.folder)):
            raise PydanticCustomError(
                "droplet", "destination {dest} is inside the watched folder {folder}: outputs must never land "
                           "in a watched folder; choose a destination outside it",
                {"dest": str(self.destination), "folder": str(self.folder)})
        if real(self.destination) in (real(self.done_folder), real(self.failed_folder)):
            raise PydanticCustomError("droplet", "destination {dest} is the droplet's done or failed folder",
                                      {"dest": str(self.destination)})
        return self

    @property
    def label(self) -> str:
        return self.name or str(self.folder)

    @property
    def key(self) -> str:
        return folder_key(self.folder)

    @property
    def done_folder(self) -> Path:
        return self.done or self.folder / "done"

    @property
    def failed_folder(self) -> Path:
        return self.failed or self.folder / "failed"


def real(path: Path) -> Path:
    """The path with symlinks resolved as far as it exists."""
    return Path(os.path.realpath(path))


def inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_droplets(droplets: list[DropletConfig]) -> list[DropletConfig]:
    """Refuse droplets that would feed each other or fight over one folder."""
    for i, one in enumerate(droplets):
        for j, other in enumerate(droplets):
            if i == j or not other.enabled or not one.enabled:
                continue
            if inside(real(one.destination), real(other.folder)):
                raise PydanticCustomError(
                    "droplet", "droplet {one}: destination {dest} is inside the folder watched by droplet {other}; "
                               "outputs must never land in a watched folder",
                    {"one": one.label, "dest": str(one.destination), "other": other.label})
            if i < j and real(one.folder) == real(other.folder):
                raise PydanticCustomError(
                    "droplet", "droplets {one} and {other} watch the same folder {folder}; use one droplet per folder",
                    {"one": one.label, "other": other.label, "folder": str(one.folder)})
            if other.recursive and real(one.folder) != real(other.folder) and inside(real(one.folder), real(other.folder)):
                raise PydanticCustomError(
                    "droplet", "droplet {one} watches {folder}, inside the folder of recursive droplet {other}",
                    {"one": one.label, "folder": str(one.folder), "other": other.label})
    return droplets


#: The type of ``FarmConfig.droplets``: the list, checked as a whole.
DropletList = Annotated[list[DropletConfig], AfterValidator(check_droplets)]

__all__ = ["DropletConfig", "DropletList", "check_droplets", "folder_key", "is_partial_name"]
