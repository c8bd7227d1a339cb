"""What a person or a script holds to talk to a controller: a client file.

A client file carries the controller's URL(s), the cluster's CA, the SHA-256
fingerprint of the controller's certificate, and one token with a role; no Dask
certificate, so it cannot join the cluster as a node. The client checks the server's
certificate against that fingerprint (and the controller's name) during the TLS
handshake, before a byte of the request (and so the token) is sent: a certificate from
the same CA, such as a node's, is refused.

Bundles pin the controller too: the controller's own by its certificate, a node bundle
by the fingerprint written into it at ``farm cluster init``. A bundle made before roles
has no fingerprint: then the server must show a certificate of the cluster's CA named as
the controller (``controller.CLUSTER.farm``), which a node's certificate is not. Such a
bundle still works as a client credential (older set-ups).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from farm.errors import UsageError
from farm.security import _write_private

CLIENT_KIND = "farm-client"


def controller_name(cluster: str) -> str:
    """The common name of a cluster's controller certificate (see ``init_cluster``)."""
    return f"controller.{cluster}.farm"


class PinMismatch(ssl.SSLCertVerificationError):
    """The server is not the controller this client was given."""


def pinned_context(ca: str, *, name: str, fingerprint: str | None) -> ssl.SSLContext:
    """TLS that trusts the cluster's CA, and then only the certificate with ``fingerprint``
    (when given) named ``name``. The check runs inside the handshake, so a connection to any
    other server fails before the request is written."""
    context = ssl.create_default_context(cadata=ca)
    context.check_hostname = False  # nodes and people reach the controller by any address; the pin decides
    expected = fingerprint.lower().replace(":", "") if fingerprint else None

    def check(peer: ssl.SSLSocket | ssl.SSLObject) -> None:
        der = peer.getpeercert(binary_form=True) or b""
        seen = hashlib.sha256(der).hexdigest()
        subject = dict(part[0] for part in (peer.getpeercert() or {}).get("subject", ()))
        common = subject.get("commonName", "?")
        if expected is not None and seen != expected:
            raise PinMismatch(f"the server's certificate ({common}, sha256 {seen[:16]}...) is not the controller's "
                              f"(sha256 {expected[:16]}...); the token was not sent")
        if common != name:
            raise PinMismatch(f"the server's certificate is {common!r}, not the controller's {name!r}; "
                              "the token was not sent")

    class PinnedSocket(ssl.SSLSocket):
        def do_handshake(self, block: bool = False) -> None:  # type: ignore[override]
            super().do_handshake(block)
            check(self)

    class PinnedObject(ssl.SSLObject):
        def do_handshake(self) -> None:
            super().do_handshake()
            check(self)

    context.sslsocket_class = PinnedSocket
    context.sslobject_class = PinnedObject
    return context


@dataclass
class ClientFile:
    """A person's or a script's credential (see the module's docstring)."""

    cluster: str
    name: str
    role: str
    token: str
    ca: str
    fingerprint: str
    urls: list[str] = field(default_factory=list)
    path: Path | None = None

    def text(self) -> str:
        return "# A Farm client file: keep it like a password (it holds an API token).\n" + yaml.safe_dump(
            {"kind": CLIENT_KIND, "cluster": self.cluster, "name": self.name, "role": self.role, "urls": self.urls,
             "fingerprint": self.fingerprint, "token": self.token, "ca": self.ca}, sort_keys=False)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_private(path, self.text())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ClientFile:
        path = Path(path).expanduser()
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UsageError(f"client file {path} does not exist; an admin makes one with "
                             "`farm cluster token add NAME --role view|submit|admin`") from None
        except (OSError, yaml.YAMLError) as exc:
            raise UsageError(f"client file {path} cannot be read: {exc}") from None
        if not isinstance(data, dict) or data.get("kind") != CLIENT_KIND:
            raise UsageError(f"{path} is not a Farm client file (kind: {CLIENT_KIND})")
        missing = [k for k in ("cluster", "name", "role", "token", "ca", "fingerprint") if not data.get(k)]
        if missing:
            raise UsageError(f"client file {path} is incomplete: missing {', '.join(missing)}")
        urls = data.get("urls") or []
        if not isinstance(urls, list) or not all(isinstance(url, str) for url in urls):
            raise UsageError(f"client file {path}: urls: expected a list of https:// addresses")
        return cls(data["cluster"], data["name"], data["role"], data["token"], data["ca"], data["fingerprint"],
                   urls, path)

    def client_ssl_context(self) -> ssl.SSLContext:
        return pinned_context(self.ca, name=controller_name(self.cluster), fingerprint=self.fingerprint)


def is_client_file(path: str | os.PathLike[str]) -> bool:
    """A client file or a bundle? Both are YAML; a client file says its kind."""
    try:
        data = yaml.safe_load(Path(path).expanduser().read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and data.get("kind") == CLIENT_KIND


# -- the running quickcluster's client file ------------------------------------------------
#
# `farm quickcluster` writes an admin client file into the config dir and holds an
# exclusive lock on it while it runs; clients on the machine look there first. A file
# whose lock nobody holds was left by a quickcluster that was killed: it is ignored.
# The kernel drops the lock when its holder dies, whatever signal ended it, so a
# recycled process id can never make a dead quickcluster look alive.

QUICKCLUSTER_FILE = "quickcluster.yaml"


def quickcluster_client_path() -> Path:
    from farm.config import config_dir

    return config_dir() / QUICKCLUSTER_FILE


class QuickclusterClientFile:
    """The running quickcluster's side: the locked client file, removed by :meth:`close`."""

    def __init__(self, path: Path | None = None):
        self.path = path or quickcluster_client_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            running = running_quickcluster(self.path)
            where = f" (API {running.urls[0]})" if running and running.urls else ""
            raise UsageError(f"a quickcluster is running on this machine already{where}: use it, or stop it "
                             "first (Ctrl-C in its terminal)") from None

    def write(self, client: ClientFile) -> None:
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, client.text().encode(), 0)

    def close(self) -> None:
        """Remove the file (if it is still this one), then let go of the lock."""
        try:
            if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                self.path.unlink()
        except FileNotFoundError:
            pass
        finally:
            os.close(self._fd)


def running_quickcluster(path: Path | None = None) -> ClientFile | None:
    """The client file of the quickcluster running on this machine, or None."""
    path = path or quickcluster_client_path()
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # held: the quickcluster runs
            pass
        else:
            return None  # left by a quickcluster that was killed
        try:
            return ClientFile.load(path)
        except UsageError:  # being written as we look (it is starting)
            return None
    finally:
        os.close(fd)


__all__ = ["ClientFile", "PinMismatch", "QuickclusterClientFile", "controller_name", "is_client_file",
           "pinned_context", "quickcluster_client_path", "running_quickcluster"]
