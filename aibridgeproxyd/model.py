"""Plain values shared by the store, the reload, the adapters and the CLI.

Nothing here does IO. A ``ProviderRecord`` is a row as stored; a ``Provider`` is a record after
evaluation: defaults applied, status computed, ready to route.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

NAME_PATTERN = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
# A DNS name (or IPv4 address) as it appears in a CONNECT: lower-case labels of letters, digits,
# '-' and '_', separated by dots. Anything else (a space, '*', a non-ASCII letter) never matches
# a client's request, so a host or base_url carrying it is refused rather than stored.
HOSTNAME_PATTERN = re.compile(
    r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*"
)
MAX_KEYS = 5


class Status(StrEnum):
    """A provider's status: enabled (routed), disabled by an operator, or error (its configuration
    cannot be used; the status reason says why)."""

    ENABLED = "enabled"
    DISABLED = "disabled"
    ERROR = "error"


class ApiFormat(StrEnum):
    """The wire format a client speaks; it decides the shape of errors the proxy returns."""

    OPENAI = "openai"
    ANTHROPIC = "anthropic"
    GEMINI = "gemini"


@dataclass(frozen=True)
class KeyInfo:
    """What the store keeps beside a provider key: its public ``id`` (12 hex digits, random,
    shown by the API and used by PATCH to keep a key), when it was added (RFC 3339 UTC), and the
    key's SHA-256 hex ``digest``, which only matches a key to its info in memory (never stored,
    never returned)."""

    id: str
    created_at: str
    digest: str


@dataclass(frozen=True)
class ProviderRecord:
    """One row of the providers table. Empty ``base_url``/``hosts`` mean "the type's default"."""

    name: str
    type: str
    display_name: str = ""
    base_url: str = ""
    hosts: tuple[str, ...] = ()
    enabled: bool = True
    allow_byok: bool = True
    keys: tuple[str, ...] = ()
    settings: Mapping[str, Any] = field(default_factory=dict)
    created_at: str = ""
    updated_at: str = ""
    # key_info[i] describes keys[i] once the record went through ``store.validate_record`` or
    # was read from the store; a record built in code may leave it empty or stale: validation
    # matches infos to keys by digest and gives a key it does not know a new id.
    key_info: tuple[KeyInfo, ...] = ()
    # Why the stored row could not be read as it is (a column that is not valid JSON, ...);
    # such a record evaluates to status ``error`` with this reason. Empty for a sound row.
    problem: str = ""


@dataclass(frozen=True)
class Upstream:
    """Where a provider's requests go: the parsed base_url."""

    scheme: str
    host: str
    port: int
    path: str  # no trailing slash; "" for the root

    @classmethod
    def parse(cls, base_url: str) -> Upstream:
        return _parse_upstream(base_url)

    @classmethod
    def _parse(cls, base_url: str) -> Upstream:
        try:
            parts = urlsplit(base_url)
        except ValueError:  # e.g. a bracketed host that is not an IPv6 address
            shown = re.sub(r"//[^@/?#]*@", "//***@", base_url)
            raise ValueError(f"base_url {shown!r} is not a valid URL") from None
        # Credentials first: every later message echoes the URL.
        if parts.username or parts.password:
            raise ValueError("base_url must not carry credentials; use --key")
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"base_url {base_url!r} must start with http:// or https://")
        if not parts.hostname:
            raise ValueError(f"base_url {base_url!r} has no hostname")
        if any(c.isspace() or not c.isprintable() for c in base_url):
            raise ValueError(f"base_url {base_url!r} must not contain spaces or control characters")
        if not (
            HOSTNAME_PATTERN.fullmatch(parts.hostname.lower()) or _is_ip_literal(parts.hostname)
        ):
            raise ValueError(
                f"base_url {base_url!r} has an invalid hostname {parts.hostname!r}: expected "
                "letters, digits, '-' and '.' (IDNA names in their xn-- form), or an IP address"
            )
        if parts.query or parts.fragment:
            raise ValueError(f"base_url {base_url!r} must not have a query or fragment")
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"base_url {base_url!r} has an invalid port") from None
        if port == 0:  # not "the default port": a typo that must not turn silently into 443
            raise ValueError(f"base_url {base_url!r} has an invalid port 0")
        if port is None:
            port = 443 if parts.scheme == "https" else 80
        return cls(parts.scheme, parts.hostname.lower(), port, parts.path.rstrip("/"))

    @property
    def origin(self) -> str:
        default_port = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}" + ("" if self.port == default_port else f":{self.port}")


def _is_ip_literal(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


# A reload evaluates every row again; most share a handful of base URLs.
@functools.lru_cache(maxsize=4096)
def _parse_upstream(base_url: str) -> Upstream:
    return Upstream._parse(base_url)


@dataclass(frozen=True)
class Provider:
    """A provider after evaluation. Only ``status == ENABLED`` providers are routed."""

    record: ProviderRecord
    base_url: str
    hosts: tuple[str, ...]
    status: Status
    status_reason: str = ""
    upstream: Upstream | None = None
    # The row cannot be evaluated: a malformed column (``record.problem``), or, enabled, an
    # unknown type or an unusable base_url. Such a row may be a provider meant to be enabled,
    # so its hosts are closed rather than tunneled (``snapshot.closed_hosts``, fail closed).
    unreadable: bool = False

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def type(self) -> str:
        return self.record.type

    @property
    def keys(self) -> tuple[str, ...]:
        return self.record.keys

    @property
    def settings(self) -> Mapping[str, Any]:
        return self.record.settings

    @property
    def allow_byok(self) -> bool:
        return self.record.allow_byok


@dataclass(frozen=True)
class TokenRecord:
    """A proxy token as stored: never the token itself, only its hash."""

    name: str
    token_hash: str
    created_at: str = ""


ADMIN_ROLES = ("admin", "auditor")


@dataclass(frozen=True)
class AdminTokenRecord:
    """An admin token of the HTTP API as stored (CONTRACT section 12): its name, the SHA-256
    hex of the token (never the token), its role (one of ``ADMIN_ROLES``) and when it was made."""

    name: str
    token_hash: str
    role: str
    created_at: str = ""


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One tool call of a response, as recorded (docs/monitoring.md#interception-records):
    OpenAI chat ``tool_calls``, Responses ``function_call`` items, Anthropic ``tool_use``
    blocks, Gemini ``functionCall`` parts."""

    tool_call_id: str | None  # the provider's id for the call; Gemini may give none
    tool: str  # the tool's name
    input: str  # the arguments as JSON text, assembled from streamed deltas, cut at the limit


@dataclass(frozen=True)
class InterceptionRecord:
    """One MITM'd request, as recorded (docs/monitoring.md#interception-records). Model output
    text is never part of it; the last user prompt, tool calls and thoughts are, each cut at
    ``record_max_bytes`` and each switchable off (``record_prompts`` ...)."""

    request_id: str
    connect_id: str
    initiator: str | None
    provider: str
    provider_type: str
    model: str | None
    client: str
    method: str
    path: str
    status: int | None
    streamed: bool
    input_tokens: int | None
    output_tokens: int | None
    cache_read_input_tokens: int | None
    cache_creation_input_tokens: int | None
    # Of output_tokens, those the model spent reasoning (a part, not an addition).
    reasoning_output_tokens: int | None
    # ``provider`` is the provider's type, ``provider_name`` its row's name (CONTRACT 10.1).
    provider_name: str
    user_agent: str | None  # cut at recording.USER_AGENT_LIMIT characters
    credential_kind: str | None  # central, byok or signed; None when refused before routing
    # The credential sent upstream, masked (credentials.mask_secret); never the proxy token.
    credential_hint: str | None
    started_at: str  # RFC 3339 UTC, millisecond precision, fixed width: sorts as text
    ended_at: str
    ttfb_ms: float | None
    duration_ms: float
    error: str | None = None
    # Millionths of a US dollar (aibridgeproxyd.pricing); None when unpriced or unreported.
    cost_micros: int | None = None
    # The client's own session id (a header or body field, per client: aibridgeproxyd.clients).
    client_session_id: str | None = None
    # Thread lineage and session, resolved when the record is written (off the request path):
    # a request answering a recorded tool call continues that interception's thread.
    session_id: str | None = None
    thread_parent_id: str | None = None
    thread_root_id: str | None = None
    # The last user message's text; the response's tool calls; the model's thoughts (thinking
    # blocks, reasoning summaries). Empty when not recorded or switched off.
    prompt: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    thoughts: tuple[str, ...] = ()
    # The tool-call ids whose results the request's last message carries (thread lineage);
    # not stored as such.
    tool_result_ids: tuple[str, ...] = ()


INTERCEPTION_FIELDS = (
    "request_id",
    "connect_id",
    "initiator",
    "provider",
    "provider_type",
    "model",
    "client",
    "method",
    "path",
    "status",
    "streamed",
    "input_tokens",
    "output_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
    "reasoning_output_tokens",
    "provider_name",
    "user_agent",
    "credential_kind",
    "credential_hint",
    "started_at",
    "ended_at",
    "ttfb_ms",
    "duration_ms",
    "error",
    "cost_micros",
    # Sessions and threads (store migration 6): the store resolves the last three when it
    # writes the record (Store.insert_interceptions), whatever the record carries.
    "client_session_id",
    "session_id",
    "thread_parent_id",
    "thread_root_id",
)


@dataclass(frozen=True)
class InterceptionFilter:
    """Which interception records ``interceptions list`` and its export return; None matches any."""

    provider: str | None = None
    model: str | None = None
    initiator: str | None = None
    client: str | None = None
    started_after: str | None = None  # same text format as started_at
    started_before: str | None = None
    limit: int = 100
    session_id: str | None = None
    # The data API's exact filters (CONTRACT 12): ``provider`` there is the type only, and
    # ``provider_name`` the name only; ``provider`` above (the CLI's) matches either.
    provider_type: str | None = None
    provider_name: str | None = None
