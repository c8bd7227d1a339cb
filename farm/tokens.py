"""API tokens with roles, kept hashed in the cluster folder (``tokens.yaml``, next to
the controller's bundle) and read again by the controller whenever the file changes,
so that ``farm cluster token add`` and ``revoke`` take effect on the next request
without a restart.

Roles:

- ``admin``: everything, including profiles named by path and any override;
- ``submit``: submit batches with profiles the controller knows by name, set only the
  keys a profile exposes, write only under ``controller.destinations``, and steer
  (cancel, retry, pause, resume, reprioritise) the jobs it submitted;
- ``view``: read;
- ``node``: the node bundle's token; reads only ``/api/cluster`` (where the Dask
  scheduler is), nothing else.

A token is 32 random bytes; the file keeps only its SHA-256 (a salt adds nothing to a
secret with that much entropy). A cluster made before roles existed has no
``tokens.yaml``: its one token (in every bundle) is then ``admin``, named ``cluster``,
until an admin adds a token; the first ``token add`` copies it into the file, where it
can be revoked like any other.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import secrets
import threading
import time
from contextlib import contextmanager
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from farm.errors import UsageError

log = logging.getLogger("farm.tokens")
TOKENS_NAME = "tokens.yaml"
ROLES = ("admin", "submit", "view", "node")
PERSON_ROLES = ("admin", "submit", "view")  # what a client file carries
LEGACY_NAME = "cluster"  # the single token of a cluster made before roles


@dataclass(frozen=True)
class Principal:
    """Who a request comes from: a token's name, its role, and a stable id that batches
    are recorded under (a name may be revoked and given again; the id is not)."""

    name: str
    role: str
    id: str

    @property
    def origin(self) -> str:
        """How batches submitted by this principal are recorded in the store."""
        return f"api:{self.name}:{self.id}"

    def owns(self, origin: str | None) -> bool:
        return origin == self.origin

    def may(self, *roles: str) -> bool:
        return self.role in roles

    def refusal(self, doing: str, *roles: str) -> str:
        allowed = " or ".join(roles)
        return f"token {self.name!r} has role {self.role}; {doing} needs {allowed}"


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_token_name(name: str) -> str:
    import re

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,62}", name or ""):
        raise UsageError(f"token name {name!r}: use letters, digits, '.', '_', '@' or '-' (at most 63), "
                         "starting with a letter or digit")
    return name


class TokenTable:
    """The token file of one cluster folder. The controller calls :meth:`authenticate` on
    every request; the file is parsed again only when its identity (inode, size, mtime)
    changed, which every write does, since writes replace the file."""

    def __init__(self, path: Path, legacy_token: str = ""):
        self.path = Path(path)
        self.legacy_token = legacy_token
        self._seen: tuple[int, int, int] | None = None
        self._by_digest: dict[str, Principal] = {}
        self._lock = threading.Lock()

    # -- reading (the controller) ---------------------------------------------------------

    def authenticate(self, token: str | None) -> Principal | None:
        if not token:
            return None
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            if self.legacy_token and secrets.compare_digest(self.legacy_token.encode(), token.encode()):
                return Principal(LEGACY_NAME, "admin", "bundle")
            return None
        identity = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if identity != self._seen:
                try:
                    entries = self._entries()
                except UsageError as exc:  # a hand-edited file gone wrong: refuse every token, say why
                    log.error("%s; every API token is refused until it is fixed", exc)
                    entries = []
                self._by_digest = {entry["sha256"]: Principal(entry["name"], entry["role"], entry["id"])
                                   for entry in entries}
                self._seen = identity
            return self._by_digest.get(digest(token))

    def _entries(self) -> list[dict[str, Any]]:
        try:
            data = yaml.safe_load(self.path.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            return []
        except (OSError, yaml.YAMLError) as exc:
            raise UsageError(f"token file {self.path} cannot be read: {exc}") from None
        entries = data.get("tokens") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            raise UsageError(f"token file {self.path}: expected a list under 'tokens'")
        good = []
        for entry in entries:
            if (isinstance(entry, dict) and entry.get("role") in ROLES
                    and all(isinstance(entry.get(key), str) for key in ("name", "id", "sha256"))):
                good.append(entry)
        return good

    def list(self) -> list[dict[str, Any]]:
        if not self.path.exists() and self.legacy_token:
            return [{"name": LEGACY_NAME, "role": "admin", "id": "bundle", "created": None,
                     "note": "the cluster's original token, in every bundle (no tokens.yaml yet)"}]
        return [{key: value for key, value in entry.items() if key != "sha256"} for entry in self._entries()]

    # -- writing (`farm cluster token ...`, on the controller's machine) -----------------

    @contextmanager
    def _writing(self) -> Iterator[list[dict[str, Any]]]:
        """The entries, to change in place; written back atomically under a lock, so two
        commands at once lose nothing and the controller never reads half a file."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(f".{self.path.name}.lock")
        descriptor = os.open(lock_path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            fresh = not self.path.exists()
            entries = self._entries()
            if fresh and self.legacy_token:
                entries.append(_entry(LEGACY_NAME, "admin", self.legacy_token, ident="bundle"))
            yield entries
            temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            descriptor_tmp = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(descriptor_tmp, "w", encoding="utf-8") as handle:
                handle.write("# API tokens of this cluster (SHA-256 only). Change with `farm cluster token`.\n")
                yaml.safe_dump({"tokens": entries}, handle, sort_keys=False)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self.path)
        finally:
            os.close(descriptor)

    def add(self, name: str, role: str) -> str:
        """A new token for ``name`` with ``role``; the token itself is returned once, never stored."""
        check_token_name(name)
        if role not in ROLES:
            raise UsageError(f"role {role!r}: expected one of {', '.join(ROLES)}")
        token = secrets.token_urlsafe(32)
        with self._writing() as entries:
            if any(entry["name"] == name for entry in entries):
                raise UsageError(f"a token named {name!r} exists already; revoke it first or choose another name")
            entries.append(_entry(name, role, token))
        return token

    def revoke(self, name: str) -> dict[str, Any]:
        with self._writing() as entries:
            found = [entry for entry in entries if entry["name"] == name]
            if not found:
                known = ", ".join(entry["name"] for entry in entries) or "none"
                raise UsageError(f"no token named {name!r} in {self.path}; known: {known}")
            entries.remove(found[0])
        return found[0]


def _entry(name: str, role: str, token: str, ident: str | None = None) -> dict[str, Any]:
    return {"name": name, "role": role, "id": ident or secrets.token_hex(6), "sha256": digest(token),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


__all__ = ["PERSON_ROLES", "Principal", "ROLES", "TOKENS_NAME", "TokenTable", "digest"]
