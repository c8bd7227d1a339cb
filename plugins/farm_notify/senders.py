"""Delivering one notice to one target: SMTP with the standard library, webhooks with httpx.

Each function raises :class:`SendError` with a short reason on failure; the outbox logs
it. Nothing here logs secrets: reasons come from the server or the network, and the
outbox scrubs the target's secrets from them anyway.
"""

from __future__ import annotations

import smtplib
import ssl
import time
from collections.abc import Callable
from email.message import EmailMessage
from email.utils import formatdate, make_msgid, parseaddr

import httpx

from farm_notify.messages import Notice
from farm_notify.settings import EmailTarget, WebhookTarget

USER_AGENT = "farm-notify/1"
#: Pause before each webhook retry, in seconds (the last value repeats).
RETRY_PAUSES = (0.5, 1.0, 2.0)


class SendError(Exception):
    pass


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def build_email(target: EmailTarget, notice: Notice) -> EmailMessage:
    message = EmailMessage()
    message["Subject"] = notice.subject
    message["From"] = target.from_
    message["To"] = ", ".join(target.to)
    message["Date"] = formatdate(localtime=True)
    # make_msgid's default domain is a DNS lookup of this host, which can hang.
    domain = parseaddr(target.from_)[1].rpartition("@")[2] or "farm.invalid"
    message["Message-ID"] = make_msgid(domain=domain)
    message["X-Farm-Event"] = notice.event
    message.set_content(notice.text)
    return message


def send_email(target: EmailTarget, notice: Notice) -> None:
    message = build_email(target, notice)
    context = ssl.create_default_context(cafile=str(target.ca_file) if target.ca_file else None) \
        if target.tls != "none" else None
    try:
        if target.tls == "ssl":
            client: smtplib.SMTP = smtplib.SMTP_SSL(target.host, target.server_port, timeout=target.timeout,
                                                    context=context)
        else:
            client = smtplib.SMTP(target.host, target.server_port, timeout=target.timeout)
        with client:
            if target.tls == "starttls":
                # Refuses (SMTPNotSupportedError) rather than carrying on in the clear.
                client.starttls(context=context)
            if target.username is not None and target.secret is not None:
                client.login(target.username, target.secret)
            refused = client.send_message(message)
    except smtplib.SMTPRecipientsRefused as exc:
        raise SendError(f"every recipient was refused: {', '.join(exc.recipients)}") from None
    except (smtplib.SMTPException, OSError) as exc:  # ssl.SSLError is an OSError
        raise SendError(_reason(exc)) from None
    if refused:
        raise SendError(f"the server refused {', '.join(refused)} (the others were sent)")


def send_webhook(target: WebhookTarget, notice: Notice, pause: Callable[[float], None] = time.sleep) -> None:
    headers = {"User-Agent": USER_AGENT, **target.request_headers}
    attempts = 1 + target.retries
    problem = ""
    # Redirects are not followed: a POST that is redirected is usually a wrong URL.
    with httpx.Client(timeout=target.timeout, follow_redirects=False) as client:
        for attempt in range(attempts):
            if attempt:
                pause(RETRY_PAUSES[min(attempt - 1, len(RETRY_PAUSES) - 1)])
            try:
                response = client.post(target.url, json=notice.payload, headers=headers)
            except httpx.TransportError as exc:  # refused, reset, timed out, TLS: worth another try
                problem = _reason(exc)
                continue
            except httpx.HTTPError as exc:
                raise SendError(_reason(exc)) from None
            if 200 <= response.status_code < 300:
                return
            problem = f"HTTP {response.status_code} {response.reason_phrase}".strip()
            if response.status_code < 500:  # the receiver said no; asking again will not help
                raise SendError(problem)
    raise SendError(f"{problem} (after {attempts} attempt{'s' if attempts > 1 else ''})")


def send(target: EmailTarget | WebhookTarget, notice: Notice) -> None:
    if isinstance(target, EmailTarget):
        send_email(target, notice)
    else:
        send_webhook(target, notice)
