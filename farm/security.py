"""Cluster identity: a private CA, certificates for the controller and the nodes, and
the one-file bundle a node (or the controller) holds.

Dask's comms run as mutual TLS with these certificates, so a worker without the
bundle, or with another cluster's, is refused; what each certificate may do over Dask is
farm.daskroles's business. The HTTP API is served over TLS with the controller's
certificate and wants a token on every request (tokens and their roles:
:mod:`farm.tokens`; what people hold instead of a bundle: :mod:`farm.credentials`).
Keys are loaded from memory, never from files in a temporary folder.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import re
import secrets
import shutil
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from farm.errors import UsageError

BUNDLE_NAME = "bundle.yaml"
SCHEDULER_BUNDLE = "scheduler.yaml"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def check_cluster_name(name: str) -> str:
    if not _NAME.match(name):
        raise UsageError(f"cluster name {name!r}: use letters, digits, '.', '_' or '-' (at most 63), "
                         "starting with a letter or digit")
    return name


def _write_private(path: Path, data: bytes | str) -> None:
    raw = data.encode() if isinstance(data, str) else data
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(raw)


def _new_key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_cert(cert) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _issue(common_name: str, key, issuer_cert, issuer_key, *, ca: bool, days: int):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject if issuer_cert is not None else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False), critical=True)
    else:
        # Every member both serves (Dask listens on workers too) and connects.
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(common_name), x509.DNSName("localhost")]), critical=False)
    return builder.sign(issuer_key if issuer_key is not None else key, hashes.SHA256())


def fingerprint(cert_pem: bytes | str) -> str:
    """SHA-256 of the certificate (DER), as shown to people and published over zeroconf."""
    pem = cert_pem.decode() if isinstance(cert_pem, bytes) else cert_pem
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest()


@dataclass
class Bundle:
    """What a member of the cluster holds: its certificate, the CA, and the API token."""

    cluster: str
    role: str  # "controller", "node", or "scheduler" (an outside Dask scheduler's, see export_tls)
    token: str
    ca: str
    cert: str
    key: str
    path: Path | None = None
    #: a node bundle's pin of the controller's certificate (SHA-256); bundles made before
    #: roles have none, and then trust the CA and the controller's name
    controller_fingerprint: str | None = None

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cert)

    def save(self, path: Path) -> None:
        pin = {"controller_fingerprint": self.controller_fingerprint} if self.controller_fingerprint else {}
        _write_private(path, yaml.safe_dump({
            "cluster": self.cluster, "role": self.role, "token": self.token,
            "ca": self.ca, "cert": self.cert, "key": self.key, **pin,
        }, sort_keys=False))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Bundle:
        path = Path(path).expanduser()
        if path.is_dir():
            path = path / BUNDLE_NAME
        from farm import sandbox

        for secret in (path, path.parent / "ca.key", path.parent / "controller.yaml", path.parent / "node.yaml",
                       path.parent / SCHEDULER_BUNDLE):
            sandbox.hide(secret)  # no segment's process may read the cluster's keys or token
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UsageError(f"cluster bundle {path} does not exist; create one with `farm cluster init NAME`") from None
        except (OSError, yaml.YAMLError) as exc:
            raise UsageError(f"cluster bundle {path} cannot be read: {exc}") from None
        missing = [k for k in ("cluster", "role", "token", "ca", "cert", "key") if not isinstance(data, dict) or k not in data]
        if missing:
            raise UsageError(f"cluster bundle {path} is incomplete: missing {', '.join(missing)}")
        return cls(**{k: data[k] for k in ("cluster", "role", "token", "ca", "cert", "key")}, path=path,
                   controller_fingerprint=data.get("controller_fingerprint"))

    def dask_security(self):
        """Mutual TLS for every Dask connection this member makes or accepts, with the
        keys kept in memory. Which role may do what is checked by farm.daskroles, which
        this installs (also in a nanny's worker process, which unpickles this object)."""
        return _memory_security_class()(
            tls_ca_file=self.ca,
            tls_client_cert=self.cert, tls_client_key=self.key,
            tls_scheduler_cert=self.cert, tls_scheduler_key=self.key,
            tls_worker_cert=self.cert, tls_worker_key=self.key,
            require_encryption=True,
        )

    @contextlib.contextmanager
    def pem_paths(self):
        """Paths to this member's certificate and key for a library that loads only files
        (uvicorn), valid inside the ``with`` and never on a disk."""
        with memory_file(self.cert) as cert, memory_file(self.key) as key:
            yield {"cert": cert, "key": key}

    def client_ssl_context(self) -> ssl.SSLContext:
        """Trust this cluster's CA, and of its certificates only the controller's: by
        fingerprint (the controller's own bundle, and node bundles made since roles) and by
        name (a node's certificate is not named so). Host names are not checked: nodes
        reach the controller by whatever address zeroconf gives."""
        from farm.credentials import controller_name, pinned_context

        pin = self.fingerprint if self.role == "controller" else self.controller_fingerprint
        return pinned_context(self.ca, name=controller_name(self.cluster), fingerprint=pin)


@contextlib.contextmanager
def memory_file(text: str):
    """A path to ``text`` for OpenSSL's file-only loaders that never reaches a disk:
    an anonymous memory file on Linux, else a private folder removed at once."""
    data = text.encode()
    if hasattr(os, "memfd_create"):
        descriptor = os.memfd_create("farm-pem", os.MFD_CLOEXEC)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(descriptor, view):]
            yield f"/proc/self/fd/{descriptor}"
        finally:
            os.close(descriptor)
        return
    folder = tempfile.mkdtemp(prefix="farm-tls-")
    try:
        _write_private(Path(folder) / "pem", data)
        yield str(Path(folder) / "pem")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def load_cert_chain(context: ssl.SSLContext, cert: str, key: str) -> None:
    with memory_file(cert) as cert_path, memory_file(key) as key_path:
        context.load_cert_chain(cert_path, key_path)


def _memory_security_class():
    if "MemorySecurity" in globals():
        return globals()["MemorySecurity"]
    from distributed import Security

    import farm.daskroles  # noqa: F401  (a process that speaks Dask as a member checks roles)

    class MemorySecurity(Security):
        """Dask's Security with PEM text, loaded without the temporary files Dask writes."""

        def _get_tls_context(self, tls, purpose):
            if not (tls.get("ca_file") and tls.get("cert")):
                return super()._get_tls_context(tls, purpose)
            context = ssl.create_default_context(purpose=purpose, cadata=tls["ca_file"])
            context.minimum_version = self.tls_min_version
            if self.tls_max_version is not None:
                context.maximum_version = self.tls_max_version
            load_cert_chain(context, tls["cert"], tls["key"])
            context.verify_mode = ssl.CERT_REQUIRED  # both ends prove membership
            context.check_hostname = False  # peers are addresses; roles are checked by name in farm.daskroles
            context.verify_flags &= ~ssl.VERIFY_X509_STRICT
            if tls.get("ciphers"):
                context.set_ciphers(tls["ciphers"])
            return context

    MemorySecurity.__qualname__ = "MemorySecurity"
    globals()["MemorySecurity"] = MemorySecurity
    return MemorySecurity


def __getattr__(name: str):
    # Dask is imported only by the processes that use it; a nanny pickles the class into
    # its worker process by this module's name.
    if name == "MemorySecurity":
        return _memory_security_class()
    raise AttributeError(name)


def init_cluster(name: str, folder: Path, days: int = 3650, urls: list[str] | None = None) -> dict[str, Path]:
    """Create the cluster's CA, the controller's and the nodes' bundles, the token table
    (an ``admin`` token and the nodes' ``node`` token, hashed) and the admin's client file,
    in ``folder``."""
    from farm.credentials import ClientFile
    from farm.tokens import TOKENS_NAME, TokenTable

    check_cluster_name(name)
    # Only a new or empty folder: files of another cluster, or anything else, are never
    # mixed with the keys, and a folder Farm did not make keeps its mode (each file is 0600).
    if folder.exists() or folder.is_symlink():
        if not folder.is_dir():
            raise UsageError(f"{folder} exists and is not a folder; choose a new or empty folder with --dir")
        if (folder / "controller.yaml").exists():
            raise UsageError(f"{folder} already holds cluster files; remove them or choose another --dir")
        try:
            holds = any(folder.iterdir())
        except OSError as exc:
            raise UsageError(f"{folder} cannot be read: {exc.strerror or exc}; choose another --dir") from None
        if holds:
            raise UsageError(f"{folder} is not empty; cluster files go into a new or empty folder "
                             "(choose another --dir)")
    else:
        folder.mkdir(parents=True, mode=0o700)
    ca_key = _new_key()
    ca_cert = _issue(f"{name} farm CA", ca_key, None, None, ca=True, days=days)
    table = TokenTable(folder / TOKENS_NAME)
    tokens = {"controller": "", "node": table.add("nodes", "node")}  # the controller holds no API token
    paths = {}
    bundles = {}
    for role in ("controller", "node"):
        key = _new_key()
        cert = _issue(f"{role}.{name}.farm", key, ca_cert, ca_key, ca=False, days=days)
        bundles[role] = Bundle(name, role, tokens[role], _pem_cert(ca_cert).decode(), _pem_cert(cert).decode(),
                               _pem_key(key).decode())
        if role == "node":  # nodes pin the controller the way client files do
            bundles[role].controller_fingerprint = bundles["controller"].fingerprint
        paths[role] = folder / f"{role}.yaml"
        bundles[role].save(paths[role])
    _write_private(folder / "ca.key", _pem_key(ca_key))
    paths["admin"] = folder / "admin.yaml"
    ClientFile(name, "admin", "admin", table.add("admin", "admin"), bundles["controller"].ca,
               bundles["controller"].fingerprint, list(urls or [])).save(paths["admin"])
    paths["tokens"] = table.path
    return paths


#: The PEM files `farm cluster export-tls` writes, and what each holds.
TLS_FILES = {
    "ca.pem": "the cluster's CA certificate (scheduler and workers)",
    "scheduler.pem": "the outside Dask scheduler's certificate",
    "scheduler.key": "the outside Dask scheduler's key",
    "worker.pem": "the workers' certificate (the nodes')",
    "worker.key": "the workers' key (the nodes')",
}


def scheduler_bundle(folder: Path, days: int = 3650) -> Bundle:
    """The outside Dask scheduler's identity, ``scheduler.NAME.farm``, issued by the
    cluster's CA the first time it is asked for and kept as ``scheduler.yaml`` beside
    the other bundles. Over Dask it may do what the controller may (farm.daskroles);
    it cannot serve the controller's API, which clients and nodes pin by fingerprint."""
    path = folder / SCHEDULER_BUNDLE
    if path.exists():
        return Bundle.load(path)
    controller = Bundle.load(folder / "controller.yaml")
    try:
        ca_key_pem = (folder / "ca.key").read_bytes()
    except OSError as exc:
        raise UsageError(f"{folder / 'ca.key'} cannot be read ({exc.strerror or exc}): the scheduler's certificate is "
                         "issued with the cluster's CA key; run this on the controller's machine, with --dir the "
                         "folder `farm cluster init` wrote") from None
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    ca_cert = x509.load_pem_x509_certificate(controller.ca.encode())
    key = _new_key()
    cert = _issue(f"scheduler.{controller.cluster}.farm", key, ca_cert, ca_key, ca=False, days=days)
    bundle = Bundle(controller.cluster, "scheduler", "", controller.ca, _pem_cert(cert).decode(),
                    _pem_key(key).decode(), controller_fingerprint=controller.fingerprint)
    bundle.save(path)
    bundle.path = path
    return bundle


def export_tls(folder: Path, out: Path, *, force: bool = False) -> dict[str, Path]:
    """Write the PEM files an outside ``dask scheduler`` and ``dask worker`` need (TLS_FILES)
    into ``out``: each 0600, ``out`` made 0700. Files already there are kept unless ``force``."""
    if not (folder / "controller.yaml").exists():
        raise UsageError(f"{folder} holds no cluster (no controller.yaml): run this on the controller's machine, "
                         "with --dir the folder `farm cluster init` wrote")
    node = Bundle.load(folder / "node.yaml")
    scheduler = scheduler_bundle(folder)
    texts = {"ca.pem": scheduler.ca, "scheduler.pem": scheduler.cert, "scheduler.key": scheduler.key,
             "worker.pem": node.cert, "worker.key": node.key}
    paths = {name: out / name for name in TLS_FILES}
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a folder; choose a folder for the TLS files")
    there = [name for name, path in paths.items() if path.exists() or path.is_symlink()]
    if there and not force:
        raise UsageError(f"{out} already holds {', '.join(there)}; pass --force to replace them, or choose "
                         "another folder")
    try:
        out.mkdir(parents=True, mode=0o700, exist_ok=True)
        for name, path in paths.items():
            # A new file, renamed over the old one: a replaced file never keeps a looser mode.
            part = out / f".{name}.{secrets.token_hex(4)}.part"
            try:
                _write_private(part, texts[name])
                os.replace(part, path)
            finally:
                part.unlink(missing_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot write the TLS files into {out}: {exc.strerror or exc}; choose a folder you can "
                         "write (--force replaces files there)") from None
    return paths


def allowed_executable(argv0: str, allow: list[str]) -> str | None:
    """The real path that ``argv0`` runs when a node's allow-list permits it, else None.

    An entry is a name looked up on PATH (``ffmpeg`` allows the ffmpeg on PATH, not any
    file called ffmpeg) or an absolute path; symlinks are resolved on both sides.
    """
    resolved = _resolved_executable(argv0)
    if resolved is None:
        return None
    for entry in allow:
        if os.sep in entry:
            if os.path.realpath(entry) == resolved:
                return resolved
        elif os.sep not in argv0 and entry == argv0:
            return resolved
    return None


_RESOLVED: dict[tuple[str, str], str] = {}


def _resolved_executable(argv0: str) -> str | None:
    """The real path of what ``argv0`` runs on PATH. A node looks the same few names up for
    every segment, and a PATH search plus realpath costs more than running ``true``: the
    answer is kept while the file it names is still an executable there."""
    import shutil

    if os.sep in argv0:  # a path, not a name: no PATH search to save, and a relative one moves with the cwd
        found = shutil.which(argv0)
        return os.path.realpath(found) if found else None
    key = (argv0, os.environ.get("PATH", os.defpath))
    known = _RESOLVED.get(key)
    if known is not None and os.access(known, os.X_OK) and os.path.isfile(known):
        return known
    found = shutil.which(argv0)
    if found is None:
        _RESOLVED.pop(key, None)
        return None
    resolved = os.path.realpath(found)
    if len(_RESOLVED) > 256:
        _RESOLVED.clear()
    _RESOLVED[key] = resolved
    return resolved


def token_matches(expected: str, given: str | None) -> bool:
    return given is not None and secrets.compare_digest(expected.encode(), given.encode())


def usable_path(raw: str, what: str) -> Path:
    """A path that came from outside (a request, a command line), refused in one sentence
    when no file system could hold it: a NUL byte, a name longer than the system allows."""
    shown = raw if len(raw) <= 80 else f"{raw[:60]}...({len(raw)} characters)"
    if "\x00" in raw:
        raise UsageError(f"{what} {shown!r} contains a NUL byte; a path cannot")
    try:
        os.fsencode(raw)
    except UnicodeError:  # a lone surrogate (from a JSON body): no file name on this system has it
        raise UsageError(f"{what} {shown!r} holds characters no file name can hold here "
                         f"(lone UTF-16 surrogates); expected a path in UTF-8") from None
    try:
        path = Path(raw).expanduser()
    except RuntimeError:  # "~someone" names a user this machine does not have
        user = raw[1:].split("/", 1)[0]
        raise UsageError(f"{what} {shown!r} starts with ~{user}, but there is no user {user!r} here; "
                         "expected a path, or ~/ for your own home folder") from None
    try:
        path.exists()
    except OSError as exc:  # ENAMETOOLONG and the like: Path.exists() lets these through
        raise UsageError(f"{what} {shown!r} cannot be a path here: {exc.strerror or exc}") from None
    return path
