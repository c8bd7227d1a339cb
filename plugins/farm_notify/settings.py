"""The ``plugins.notify`` section of farm.yaml, validated before Farm starts.

Secrets (SMTP passwords, header values) are resolved from the environment here, once,
so that a missing variable stops the start instead of failing silently at 3 a.m. when
the batch finishes.
"""

from __future__ import annotations

import os
import re
from email.utils import parseaddr
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

Event = Literal["batch_done", "job_failed"]
EVENTS: tuple[Event, ...] = ("batch_done", "job_failed")

# RFC 9110 token characters: anything else in a header name is refused by HTTP clients
# mid-send, which would surface as a confusing failure long after the start.
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Keys whose values must never be echoed back in an error message.
_SECRET_KEYS = {"password", "headers"}


def _one_or_many(value: Any) -> Any:
    """Let a single target (or address) stand for a list of one, as people write it."""
    return [value] if isinstance(value, (dict, str)) else value


def _from_env(variable: str, what: str) -> str:
    if not _ENV_NAME.match(variable):
        raise ValueError(f"{what}: {variable!r} is not an environment variable name")
    value = os.environ.get(variable)
    if value is None:
        raise ValueError(f"{what}: environment variable {variable} is not set")
    return value


def _address(value: str, what: str) -> str:
    _, addr = parseaddr(value)
    if "@" not in addr or addr.startswith("@") or addr.endswith("@") or any(c.isspace() for c in addr):
        raise ValueError(f"{what}: {value!r} is not an email address (e.g. farm@example.com)")
    return value


class Target(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    #: Which events this target receives.
    events: list[Event] = Field(default_factory=lambda: list(EVENTS), min_length=1)
    #: How logs refer to this target (default: its server or site).
    name: str | None = None

    def wants(self, event: str) -> bool:
        return event in self.events

    def describe(self) -> str:
        raise NotImplementedError

    def secrets(self) -> list[str]:
        """Values that must be scrubbed from anything logged about this target."""
        return []


class EmailTarget(Target):
    host: str = Field(min_length=1)
    port: int | None = Field(default=None, ge=1, le=65535)
    tls: Literal["starttls", "ssl", "none"] = "starttls"
    username: str | None = None
    password: SecretStr | None = None
    password_env: str | None = None
    from_: str = Field(alias="from")
    to: list[str] = Field(min_length=1)
    #: A private CA (PEM) to trust instead of the system's CAs.
    ca_file: Path | None = None
    timeout: float = Field(default=10.0, gt=0)

    _password: str | None = PrivateAttr(default=None)

    _to_list = field_validator("to", mode="before")(_one_or_many)

    @field_validator("to")
    @classmethod
    def _check_to(cls, value: list[str]) -> list[str]:
        return [_address(item, "to") for item in value]

    @field_validator("from_")
    @classmethod
    def _check_from(cls, value: str) -> str:
        return _address(value, "from")

    @model_validator(mode="after")
    def _check_login(self) -> EmailTarget:
        if self.password is not None and self.password_env is not None:
            raise ValueError("give password or password_env, not both (password_env is better: it keeps "
                             "the password out of farm.yaml)")
        if self.password_env is not None:
            self._password = _from_env(self.password_env, "password_env")
        elif self.password is not None:
            self._password = self.password.get_secret_value()
        if self.username is None and self._password is not None:
            raise ValueError("a password needs a username")
        if self.username is not None and self._password is None:
            raise ValueError(f"username {self.username!r} needs password_env: VARIABLE (or password)")
        if self.ca_file is not None:
            if self.tls == "none":
                raise ValueError("ca_file needs tls: starttls or tls: ssl")
            self.ca_file = self.ca_file.expanduser()
            if not self.ca_file.is_file():
                raise ValueError(f"ca_file: {self.ca_file} is not a file")
        return self

    @property
    def secret(self) -> str | None:
        return self._password

    @property
    def server_port(self) -> int:
        if self.port is not None:
            return self.port
        return {"starttls": 587, "ssl": 465, "none": 25}[self.tls]

    def describe(self) -> str:
        label = f"{self.name}: " if self.name else ""
        return f"email {label}smtp {self.host}:{self.server_port} to {', '.join(self.to)}"

    def secrets(self) -> list[str]:
        return [self._password] if self._password else []


class WebhookTarget(Target):
    url: str
    #: Extra request headers, e.g. an Authorization bearer token.
    headers: dict[str, str] = Field(default_factory=dict)
    #: Headers whose values come from environment variables: {header name: VARIABLE}.
    headers_env: dict[str, str] = Field(default_factory=dict)
    timeout: float = Field(default=10.0, gt=0)
    #: Further attempts after a connection error or a 5xx answer.
    retries: int = Field(default=2, ge=0, le=10)

    _headers: dict[str, str] = PrivateAttr(default_factory=dict)

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{value!r} is not an http:// or https:// URL")
        return value

    @model_validator(mode="after")
    def _check_headers(self) -> WebhookTarget:
        resolved = dict(self.headers)
        for header, variable in self.headers_env.items():
            if header in resolved:
                raise ValueError(f"header {header!r} is in both headers and headers_env")
            resolved[header] = _from_env(variable, f"headers_env.{header}")
        for header, value in resolved.items():
            if not _HEADER_NAME.match(header):
                raise ValueError(f"{header!r} is not a valid HTTP header name")
            # The value itself is never quoted: it is usually a token.
            if any(c in value for c in "\r\n\0"):
                raise ValueError(f"the value of header {header!r} contains a line break or NUL")
        self._headers = resolved
        return self

    @property
    def request_headers(self) -> dict[str, str]:
        return dict(self._headers)

    def describe(self) -> str:
        # Only the origin: webhook paths and queries often carry the secret (Slack, Teams).
        parts = urlsplit(self.url)
        port = f":{parts.port}" if parts.port else ""
        label = f"{self.name}: " if self.name else ""
        return f"webhook {label}{parts.scheme}://{parts.hostname}{port}"

    def secrets(self) -> list[str]:
        parts = urlsplit(self.url)
        found = [value for value in self._headers.values() if value]
        found += [piece for piece in (parts.password, parts.query) if piece]
        return found


class NotifySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    email: list[EmailTarget] = Field(default_factory=list)
    webhooks: list[WebhookTarget] = Field(default_factory=list)
    #: Seconds a finishing process (``farm run``) waits for notices still being sent.
    exit_wait: float = Field(default=5.0, ge=0, le=300)

    _email_list = field_validator("email", mode="before")(_one_or_many)

    @field_validator("webhooks", mode="before")
    @classmethod
    def _webhook_urls(cls, value: Any) -> Any:
        # A bare URL is the common case; let it stand for {url: ...}.
        value = _one_or_many(value)
        if isinstance(value, list):
            return [{"url": item} if isinstance(item, str) else item for item in value]
        return value

    @property
    def targets(self) -> list[Target]:
        return [*self.email, *self.webhooks]


def _key_path(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


def _known_keys(model: type[BaseModel]) -> list[str]:
    # A target's own keys first: the shared ones (events, name) are rarely the one meant.
    shared = Target.model_fields.keys() if model is not Target else set()
    names = sorted(model.model_fields, key=lambda name: name in shared)
    return [model.model_fields[name].alias or name for name in names]


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model that owns the key at ``loc`` (for listing the keys it would accept)."""
    keys = [part for part in loc if not isinstance(part, int)]
    if len(keys) == 1:
        return NotifySettings
    return {"email": EmailTarget, "webhooks": WebhookTarget}.get(str(keys[0]))


def describe_error(exc: ValidationError) -> str:
    """The first problem in one line, naming the key, and how many more there are."""
    problems = []
    # An unknown key is usually a misspelt one, and the cause of a "missing" next to it.
    errors = sorted(exc.errors(), key=lambda error: error["type"] != "extra_forbidden")
    for error in errors:
        loc = tuple(error["loc"])
        key = _key_path(loc)
        if error["type"] == "extra_forbidden":
            owner = _model_at(loc)
            known = f"; expected one of: {', '.join(_known_keys(owner))}" if owner else ""
            problem = f"unknown key {loc[-1]!r}{known}"
            key = _key_path(loc[:-1])  # the key is named in the message; say where it sits
        elif error["type"] == "missing":
            problem = "required key is missing"
        else:
            problem = error["msg"].removeprefix("Value error, ")
            secret = any(part in _SECRET_KEYS for part in loc)
            if error["type"] != "value_error" and "input" in error and not secret:
                problem += f" (got {error['input']!r})"
        problems.append(f"{key}: {problem}" if key else problem)
    more = len(problems) - 1
    return problems[0] + (f" (and {more} more problem{'s' if more > 1 else ''})" if more else "")


def parse_settings(raw: Any) -> NotifySettings:
    """Validate the section; a bad one raises ValueError with a one-line message."""
    if not isinstance(raw, dict):
        raise ValueError(f"expected a mapping with email: and/or webhooks:, got {type(raw).__name__}")
    try:
        return NotifySettings.model_validate(raw)
    except ValidationError as exc:
        raise ValueError(describe_error(exc)) from None
