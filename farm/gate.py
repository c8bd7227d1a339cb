"""The API's front door: an ASGI middleware that settles who is asking, and how much
they send, before a byte of the body is read or parsed.

- Every ``/api`` route needs a principal: the bearer token goes to the controller's one
  check (``authenticate(token) -> principal | None``) first; without one the answer is
  401, whatever the body holds. The principal rides in ``request.state.principal``.
- A body over the limit is refused with 413: at once when Content-Length says so, and
  as soon as a chunked body passes it. A body within the limit is read here and handed
  on, so nothing bigger than the limit is ever buffered.
- Everything else stays public as before: the monitor page and its files (they hold no
  data until given a token), ``/openapi.json`` and ``/docs``.

Errors keep the API's shape, ``{"error": "..."}``.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

UNAUTHORISED = ("missing, wrong or revoked API token: send 'Authorization: Bearer TOKEN' with the token "
                "of your client file")

#: Routes whose bodies are files streamed to disk (segment outputs coming back from nodes
#: without shared storage, see farm.transfer), never buffered here.
STREAMED = ("/api/transfer/attempts/",)

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def guarded(path: str) -> bool:
    return path == "/api" or path.startswith("/api/")


def bearer(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` header, or None."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


async def refuse(send: Send, status: int, message: str, headers: dict[str, str] | None = None,
                 close: bool = True) -> None:
    """Answer ``status`` with ``message``; ``close`` the connection when the request's body
    is left unread (the rest of it is not worth reading)."""
    body = json.dumps({"error": message}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        raw.append((b"connection", b"close"))
    raw += [(key.encode(), value.encode()) for key, value in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _has_body(headers: list[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        name = name.lower()
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() not in (b"0", b"")):
            return True
    return False


class Gate:
    def __init__(self, app: Any, authenticate: Callable[[str | None], Any], max_body: int):
        self.app = app
        self.authenticate = authenticate
        self.max_body = max_body

    def too_large(self) -> str:
        return (f"the request body is larger than {self.max_body:,} bytes, the most this controller takes "
                "(controller.max_request_bytes in farm.yaml)")

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope.get("headers", [])
        if guarded(scope["path"]):
            principal = self.authenticate(bearer(headers))
            if principal is None:  # a request with no body keeps its connection: a new TLS handshake costs more
                await refuse(send, 401, UNAUTHORISED, {"www-authenticate": "Bearer"}, close=_has_body(headers))
                return
            scope.setdefault("state", {})["principal"] = principal
            if scope["path"].startswith(STREAMED):  # files of any size, streamed by their route
                await self.app(scope, receive, send)
                return
        length: str | None = None
        chunked = False
        for name, value in headers:
            name = name.lower()
            if name == b"content-length":
                length = value.decode("latin-1").strip()
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        if length is not None:
            if not length.isdigit():
                await refuse(send, 400, f"Content-Length {length[:40]!r} is not a number of bytes")
                return
            if int(length) > self.max_body:
                await refuse(send, 413, self.too_large())
                return
        if not chunked and (length is None or int(length) == 0):
            await self.app(scope, receive, send)
            return
        # Read the body here, counting: a chunked body says its size only as it comes.
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            part = message.get("body", b"")
            size += len(part)
            if size > self.max_body:
                await refuse(send, 413, self.too_large())
                return
            parts.append(part)
            if not message.get("more_body", False):
                break
        whole: list[Message] = [{"type": "http.request", "body": b"".join(parts), "more_body": False}]

        async def replay() -> Message:
            return whole.pop() if whole else await receive()

        await self.app(scope, replay, send)
