"""The bundled notify plugin, end to end: real `farm run` processes mailing a real SMTP
server (aiosmtpd, plain with AUTH, STARTTLS and implicit TLS with a CA made here) and
posting to a real HTTP receiver."""

from __future__ import annotations

import datetime
import email
import email.policy
import ipaddress
import json
import socket
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.cluster_helpers import free_port
from tests.conftest import write_profile

# -- a real SMTP server ------------------------------------------------------------------


class Inbox:
    """An aiosmtpd handler that keeps every message it accepts."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.logins: list[tuple[str, bool]] = []

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 (aiosmtpd's name)
        self.messages.append({
            "mail_from": envelope.mail_from,
            "rcpt_tos": list(envelope.rcpt_tos),
            "message": email.message_from_bytes(envelope.content, policy=email.policy.default),
            "authenticated": bool(session.authenticated),
            "tls": server.transport.get_extra_info("ssl_object") is not None,
        })
        return "250 OK"

    def authenticate(self, server, session, envelope, mechanism, auth_data) -> AuthResult:
        ok = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == (b"farm", b"s3cret-pw")
        self.logins.append((auth_data.login.decode() if isinstance(auth_data, LoginPassword) else "?", ok))
        return AuthResult(success=ok, handled=False)

    def subjects(self) -> list[str]:
        return [m["message"]["Subject"] for m in self.messages]

    @staticmethod
    def body(message: dict[str, Any]) -> str:
        return message["message"].get_content()


@pytest.fixture
def smtp_server():
    """Start aiosmtpd servers on 127.0.0.1; each call returns (inbox, port)."""
    started: list[Controller] = []

    def start(**options: Any) -> tuple[Inbox, int]:
        inbox = Inbox()
        if options.pop("auth", False):
            options.update(authenticator=inbox.authenticate, auth_require_tls=False)
        port = free_port()
        controller = Controller(inbox, hostname="127.0.0.1", port=port, **options)
        controller.start()
        started.append(controller)
        return inbox, port

    yield start
    for controller in started:
        controller.stop()


# -- a real HTTP receiver ----------------------------------------------------------------


class Receiver:
    """An HTTP server that records each POSTed JSON body; answers with ``statuses`` first."""

    def __init__(self, statuses: list[int] | None = None, delay: float = 0.0) -> None:
        self.requests: list[dict[str, Any]] = []
        self.statuses = list(statuses or [])
        self.delay = delay
        self.release = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.requests.append({"path": self.path, "headers": dict(self.headers), "json": json.loads(body)})
                if outer.delay:
                    outer.release.wait(outer.delay)
                status = outer.statuses.pop(0) if outer.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/farm-hook"

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    made: list[Receiver] = []

    def start(**options: Any) -> Receiver:
        made.append(Receiver(**options))
        return made[-1]

    yield start
    for item in made:
        item.close()


# -- a private CA and a server certificate for 127.0.0.1 ---------------------------------


def make_certificates(folder: Path) -> dict[str, Path]:
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "farm notify test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca": folder / "ca.pem", "cert": folder / "server.pem", "key": folder / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return paths


# -- farm.yaml and profiles --------------------------------------------------------------


def notify_config(farm_env: dict[str, Path], notify: dict[str, Any]) -> Path:
    """farm.yaml for the run: the test's node section plus plugins.notify."""
    data = yaml.safe_load(farm_env["config"].read_text())
    data["plugins"] = {"notify": notify}
    path = farm_env["tmp"] / "notify-farm.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# Fails for an input whose name holds "bad"; otherwise writes one file per frame.
SCRIPT = (
    "import pathlib, sys\n"
    "source, out, frame = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), int(sys.argv[3])\n"
    "if 'bad' in source.name:\n"
    "    print('no licence for ' + source.name); sys.exit(7)\n"
    "(out / ('%s_%03d.txt' % (source.stem, frame))).write_text('x')\n"  # braces would be template tokens
)


def profile_and_inputs(farm_env: dict[str, Path], *names: str) -> tuple[Path, list[Path]]:
    profile = write_profile(farm_env["tmp"], "notes", {
        "processor": "command", "frames": "1-4", "segment": {"frames": 2}, "retries": 0,
        "settings": {"command": [sys.executable, "-c", SCRIPT, "{input}", "{output_dir}", "{start}"]},
    })
    inputs = []
    for name in names:
        inputs.append(farm_env["tmp"] / name)
        inputs[-1].write_text("source")
    return profile, inputs


def email_target(port: int, **extra: Any) -> dict[str, Any]:
    return {"host": "127.0.0.1", "port": port, "tls": "none", "from": "Farm <farm@example.com>",
            "to": ["render-team@example.com"], **extra}


# -- the tests ---------------------------------------------------------------------------


def test_a_finished_batch_is_mailed_once_and_posted(farm, farm_env, smtp_server, receiver, monkeypatch):
    inbox, port = smtp_server(auth=True)
    hook = receiver(statuses=[503])  # the first post fails: the plugin tries again
    monkeypatch.setenv("FARMTEST_SMTP_PASSWORD", "s3cret-pw")
    monkeypatch.setenv("FARMTEST_WRONG_PASSWORD", "wrong-pw-123")
    monkeypatch.setenv("FARMTEST_HOOK_TOKEN", "Bearer tok-9876")
    config = notify_config(farm_env, {
        "email": [
            email_target(port, username="farm", password_env="FARMTEST_SMTP_PASSWORD"),
            email_target(port, username="farm", password_env="FARMTEST_WRONG_PASSWORD", to="boss@example.com"),
        ],
        "webhooks": [{"url": hook.url, "headers_env": {"Authorization": "FARMTEST_HOOK_TOKEN"},
                      "headers": {"X-Studio": "north"}, "events": ["batch_done"]}],
    })
    profile, inputs = profile_and_inputs(farm_env, "shot1.txt", "shot2.txt")
    result = farm("--config", config, "run", profile, *inputs, "-o", farm_env["tmp"] / "out", "--json")
    assert result.returncode == 0, result.stderr
    report = result.json()
    batch = report["batch"]

    # Exactly one email: the target with the wrong password was refused and logged.
    assert len(inbox.messages) == 1, inbox.subjects()
    [mail] = inbox.messages
    assert mail["authenticated"] and ("farm", True) in inbox.logins and ("farm", False) in inbox.logins
    assert mail["rcpt_tos"] == ["render-team@example.com"] and mail["mail_from"] == "farm@example.com"
    assert mail["message"]["Subject"] == f"[farm] batch {batch} done: 2 of 2 jobs done"
    body = Inbox.body(mail)
    assert f"Batch {batch} has finished" in body and "2 done, 0 failed, 0 cancelled (2 jobs)" in body
    assert all(job["id"] in body for job in report["jobs"])
    assert str(farm_env["tmp"] / "out" / "shot1_001.txt") in body and "shot2_003.txt" in body

    assert "could not send the batch_done notice by email smtp 127.0.0.1:" in result.stderr
    assert "to boss@example.com" in result.stderr and "SMTPAuthenticationError" in result.stderr

    # The webhook: one 503, then the same payload again, accepted.
    assert len(hook.requests) == 2
    assert hook.requests[0]["json"] == hook.requests[1]["json"]
    post = hook.requests[1]
    assert post["path"] == "/farm-hook"
    assert post["headers"]["Authorization"] == "Bearer tok-9876" and post["headers"]["X-Studio"] == "north"
    assert post["headers"]["Content-Type"] == "application/json"
    payload = post["json"]
    assert payload["event"] == "batch_done" and payload["batch"] == batch
    assert payload["counts"] == {"done": 2, "failed": 0, "cancelled": 0, "total": 2}
    assert sorted((job["id"], job["state"], job["output_count"]) for job in payload["jobs"]) == \
        sorted((job["id"], "done", 2) for job in report["jobs"])

    # Secrets never reach the log.
    for secret in ("s3cret-pw", "wrong-pw-123", "tok-9876", "north"):
        assert secret not in result.stderr


def test_a_failed_job_is_mailed_and_posted_with_its_reason(farm, farm_env, smtp_server, receiver):
    inbox, port = smtp_server()
    hook = receiver()
    config = notify_config(farm_env, {
        "email": email_target(port),  # both events (the default)
        "webhooks": [{"url": hook.url, "events": ["job_failed"]}],
    })
    profile, inputs = profile_and_inputs(farm_env, "good.txt", "bad.txt")
    result = farm("--config", config, "run", profile, *inputs, "-o", farm_env["tmp"] / "out", "--json")
    assert result.returncode == 1, result.stderr
    report = result.json()
    failed = next(job for job in report["jobs"] if job["state"] == "failed")
    assert "exit status 7" in failed["error"]

    subjects = inbox.subjects()
    assert len(subjects) == 2, subjects
    [job_mail] = [m for m in inbox.messages if m["message"]["X-Farm-Event"] == "job_failed"]
    [batch_mail] = [m for m in inbox.messages if m["message"]["X-Farm-Event"] == "batch_done"]
    assert job_mail["message"]["Subject"] == f"[farm] job {failed['id']} failed: bad.txt (profile notes)"
    body = Inbox.body(job_mail)
    assert f"reason:      {failed['error']}" in body and "no licence for bad.txt" in body
    assert str(inputs[1]) in body and "profile:     notes" in body and f"batch {report['batch']}" in body

    assert batch_mail["message"]["Subject"] == f"[farm] batch {report['batch']} finished: 1 done, 1 failed, 0 cancelled"
    body = Inbox.body(batch_mail)
    assert body.index("Failed:") < body.index("Done:")  # what needs attention comes first
    assert f"reason: {failed['error']}" in body

    [post] = hook.requests  # this target wants job_failed only
    assert post["json"] == {
        "event": "job_failed", "host": socket.gethostname(),
        "job": {"id": failed["id"], "batch": report["batch"], "input": str(inputs[1]), "profile": "notes",
                "destination": str(farm_env["tmp"] / "out")},
        "reason": failed["error"], "text": post["json"]["text"],
    }
    assert failed["id"] in post["json"]["text"]


@pytest.mark.slow
def test_starttls_and_implicit_tls_trust_a_private_ca(farm, farm_env, smtp_server):
    certs = make_certificates(farm_env["tmp"])
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(certs["cert"], certs["key"])
    starttls, starttls_port = smtp_server(tls_context=server_context, require_starttls=True)
    implicit, implicit_port = smtp_server(ssl_context=server_context)
    config = notify_config(farm_env, {"email": [
        email_target(starttls_port, tls="starttls", ca_file=str(certs["ca"])),
        email_target(implicit_port, tls="ssl", ca_file=str(certs["ca"])),
        # Without the CA the server's certificate is not trusted: nothing is sent in the clear.
        email_target(starttls_port, tls="starttls", to=["untrusted@example.com"], name="no-ca"),
    ]})
    profile, inputs = profile_and_inputs(farm_env, "shot.txt")
    result = farm("--config", config, "run", profile, *inputs, "-o", farm_env["tmp"] / "out", "--json")
    assert result.returncode == 0, result.stderr
    batch = result.json()["batch"]

    for inbox in (starttls, implicit):
        [mail] = inbox.messages
        assert mail["tls"] and mail["message"]["Subject"] == f"[farm] batch {batch} done: 1 of 1 job done"
    assert [m["rcpt_tos"] for m in starttls.messages] == [["render-team@example.com"]]
    assert f"by email no-ca: smtp 127.0.0.1:{starttls_port} to untrusted@example.com" in result.stderr
    assert "CERTIFICATE_VERIFY_FAILED" in result.stderr


@pytest.mark.parametrize(("notify", "message"), [
    ({"email": {"host": "h", "from": "farm@example.com", "tos": "a@example.com"}},
     "plugins.notify: email[0]: unknown key 'tos'; expected one of: host, port, tls, username"),
    ({"email": {"host": "h", "from": "farm@example.com"}}, "plugins.notify: email[0].to: required key is missing"),
    ({"email": {"host": "h", "from": "farm@example.com", "to": "a@example.com", "tls": "maybe"}},
     "plugins.notify: email[0].tls: Input should be 'starttls', 'ssl' or 'none'"),
    ({"email": {"host": "h", "from": "farm@example.com", "to": "a@example.com", "username": "u",
                "password_env": "FARMTEST_NOT_SET"}},
     "plugins.notify: email[0]: password_env: environment variable FARMTEST_NOT_SET is not set"),
    ({"webhooks": [{"url": "ftp://example.com/x"}]}, "plugins.notify: webhooks[0].url: 'ftp://example.com/x' is not"),
    ({"webhook": "https://example.com/x"}, "plugins.notify: unknown key 'webhook'; expected one of: email, webhooks, exit_wait"),
    ({"email": {"host": "h", "from": "farm@example.com", "to": "a@example.com", "events": ["batch_finished"]}},
     "plugins.notify: email[0].events[0]: Input should be 'batch_done' or 'job_failed'"),
])
def test_bad_notify_settings_stop_farm_run_with_a_clear_message(farm, farm_env, notify, message):
    config = notify_config(farm_env, notify)
    profile, inputs = profile_and_inputs(farm_env, "shot.txt")
    result = farm("--config", config, "run", profile, *inputs, "-o", farm_env["tmp"] / "out")
    assert result.returncode == 2
    assert f"farm: error: farm.yaml: {message}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (farm_env["tmp"] / "out").exists() or not any((farm_env["tmp"] / "out").iterdir())


@pytest.mark.slow
def test_unreachable_servers_do_not_fail_the_batch(farm, farm_env):
    smtp_port, web_port = free_port(), free_port()
    config = notify_config(farm_env, {
        "email": email_target(smtp_port),
        "webhooks": [f"http://127.0.0.1:{web_port}/hook/SECRET-PATH?token=SECRET-QUERY"],
    })
    profile, inputs = profile_and_inputs(farm_env, "shot.txt")
    started = time.monotonic()
    result = farm("--config", config, "run", profile, *inputs, "-o", farm_env["tmp"] / "out", "--json")
    assert result.returncode == 0, result.stderr
    assert result.json()["jobs"][0]["state"] == "done"
    assert time.monotonic() - started < 45  # no server answers: the batch's end is not held up by them
    assert f"could not send the batch_done notice by email smtp 127.0.0.1:{smtp_port} to render-team@example.com" \
        in result.stderr
    assert f"could not send the batch_done notice by webhook http://127.0.0.1:{web_port}: ConnectError" in result.stderr
    assert "(after 3 attempts)" in result.stderr
    assert "SECRET" not in result.stderr  # webhook paths and queries often are the credential
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_a_hanging_webhook_delays_exit_only_by_exit_wait(farm, farm_env, receiver):
    hook = receiver(delay=60)
    config = notify_config(farm_env, {"exit_wait": 1, "webhooks": [{"url": hook.url, "timeout": 30}]})
    profile, inputs = profile_and_inputs(farm_env, "shot.txt")
    started = time.monotonic()
    result = farm("--config", config, "run", profile, *inputs, "-o", farm_env["tmp"] / "out", "--json")
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert len(hook.requests) == 1 and hook.requests[0]["json"]["event"] == "batch_done"
    assert elapsed < 45  # it did not wait for the hook's 60 s answer (exit_wait is 1 s)
    assert "gave up after 1 s at exit with 1 notice(s) unsent: batch_done by webhook http://127.0.0.1:" in result.stderr


def test_without_a_notify_section_nothing_is_sent_or_started():
    import farm_notify

    farm_notify.farm_configure({"someone_else": {"x": 1}})
    farm_notify.farm_batch_finished("b1", [{"id": "j1", "input": None, "profile": "p", "state": "done",
                                            "error": None, "outputs": []}])
    assert farm_notify.notifier.outbox.pending() == []
    assert not any(thread.name == "farm-notify" for thread in threading.enumerate())


@pytest.mark.slow
def test_long_batches_are_summarised_not_dumped():
    from farm_notify.messages import batch_done, job_failed

    jobs = [{"id": f"j{i}", "input": f"/in/{i}.mov", "profile": "p", "state": "done", "error": None,
             "outputs": [f"/out/{i}_{frame:04d}.png" for frame in range(50)]} for i in range(2)]
    notice = batch_done("b7", jobs)
    assert notice.text.count("/out/0_") == 3 and "... and 47 more output(s)" in notice.text
    assert len(notice.payload["jobs"][0]["outputs"]) == 20 and notice.payload["jobs"][0]["output_count"] == 50
    # A file name may hold a line break; a mail header may not.
    job = SimpleNamespace(id="j9", batch_id="b9", input=Path("/in/a\nb.mov"), profile=SimpleNamespace(name="p"),
                          destination=Path("/out"))
    notice = job_failed(job, "it broke")
    assert notice.subject == "[farm] job j9 failed: a b.mov (profile p)"
    assert notice.payload["job"]["input"] == "/in/a\nb.mov" and notice.payload["reason"] == "it broke"


def test_the_documented_example_is_valid(monkeypatch):
    import re

    from farm_notify.settings import parse_settings
    from tests.conftest import ROOT

    page = (ROOT / "docs" / "notify.md").read_text()
    example = yaml.safe_load(re.search(r"```yaml\n(.*?)```", page, re.S).group(1))
    monkeypatch.setenv("FARM_SMTP_PASSWORD", "x")
    monkeypatch.setenv("FARM_HOOK_TOKEN", "Bearer y")
    settings = parse_settings(example["plugins"]["notify"])
    assert [target.describe() for target in settings.targets] == [
        "email smtp smtp.example.com:587 to render-team@example.com, producer@example.com",
        "webhook https://hooks.example.com",
        "webhook https://chat.example.com",
    ]
    assert settings.webhooks[0].request_headers == {"Authorization": "Bearer y"}
    assert settings.webhooks[1].events == ["batch_done", "job_failed"]
