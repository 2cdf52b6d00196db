"""What every adapter shares: type defaults as data, path mapping, key injection."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from aibridgeproxyd.content_coding import UndecodableBody, decode_bounded
from aibridgeproxyd.credentials import CredentialMode
from aibridgeproxyd.header_fields import header
from aibridgeproxyd.model import ApiFormat, Provider, ProviderRecord, Upstream
from aibridgeproxyd.usage import ApiKind, api_kind_for, websocket_api_kind_for

_MODEL_SCAN_BYTES = 64 * 1024
# The most a compressed request body may decode to when it is read whole (a JSON parse). The
# default max_request_body: a body the proxy takes uncompressed is taken compressed too, while a
# decompression bomb (kilobytes that decode to gigabytes) is stopped at this size.
MAX_DECODED_REQUEST_BODY = 64 * 1024 * 1024
_MODEL_KEY = re.compile(rb'"model"\s*:\s*"((?:[^"\\]|\\.){1,200})"')

if TYPE_CHECKING:
    from mitmproxy import http


def map_path(request_path: str, base_path: str, version_prefix: str) -> str:
    """Map a client path (with query) onto the upstream's base path
    (docs/providers.md#hosts-and-base_url, "Path mapping").

    A path that already starts with the base path is kept. Otherwise the client format's version
    prefix (``/v1`` for OpenAI) is stripped and the rest is joined to the base path. The query
    string is kept either way.
    """
    path, sep, query = request_path.partition("?")
    if not has_segment_prefix(path, base_path):
        path = base_path + strip_segment_prefix(path, version_prefix)
    return path + sep + query


def has_segment_prefix(path: str, prefix: str) -> bool:
    """``/v1/chat`` starts with ``/v1``; ``/v10/chat`` does not."""
    if not prefix:
        return True
    return path == prefix or path.startswith(prefix + "/")


def strip_segment_prefix(path: str, prefix: str) -> str:
    """``/v1/chat/completions`` without ``/v1`` is ``/chat/completions``; always a leading slash."""
    if prefix and has_segment_prefix(path, prefix):
        path = path[len(prefix) :]
    return path if path.startswith("/") else "/" + path


class DecodedBodyTooLarge(UndecodableBody):
    """A compressed request body decodes to more than ``limit`` bytes."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the decoded request body exceeds {limit} bytes")
        self.limit = limit


def decoded_request_body(request: http.Request) -> bytes:
    """The request body with its ``Content-Encoding`` undone (gzip, deflate, br, zstd), never
    more than ``MAX_DECODED_REQUEST_BODY`` bytes decoded (``content_coding``): mitmproxy's
    ``get_content()`` has no such bound. Raises ``DecodedBodyTooLarge``, or ``UndecodableBody``
    for a coding that cannot be undone."""
    limit = MAX_DECODED_REQUEST_BODY
    decoded = decode_bounded(
        request.raw_content or b"", header(request.headers, "content-encoding"), limit
    )
    if not decoded.complete:
        raise DecodedBodyTooLarge(limit)
    return decoded.data


def request_body_prefix(request: http.Request, limit: int = _MODEL_SCAN_BYTES) -> bytes:
    """The first ``limit`` bytes of the decoded request body; empty when there is no body yet
    (on the head) or it cannot be decoded."""
    try:
        return decode_bounded(
            request.raw_content or b"", header(request.headers, "content-encoding"), limit
        ).data
    except UndecodableBody:
        return b""


def scanned_body_model(body: bytes | None) -> str | None:
    """The ``model`` of a JSON request body, read cheaply from its first 64 KiB.

    Inside a JSON string every quote is escaped, so ``"model":`` can only be a key; the first
    one is the top-level key in every provider's request format."""
    if not body:
        return None
    match = _MODEL_KEY.search(body, 0, _MODEL_SCAN_BYTES)
    if match is None:
        return None
    try:
        return match.group(1).decode("utf-8")
    except UnicodeDecodeError:
        return None


def query_model(request: http.Request) -> str | None:
    """The ``?model=`` of a request's URL: how an OpenAI Realtime WebSocket upgrade
    (``/v1/realtime?model=gpt-realtime``) names its model, having no body."""
    if "?" not in request.path:
        return None  # no query string: spare mitmproxy's parse of the whole URL
    model = request.query.get("model")
    return model[:200] if model else None


def parsed_body_model(request: http.Request) -> str | None:
    """The top-level ``model`` of the request body parsed whole (content-encoding undone, within
    ``MAX_DECODED_REQUEST_BODY``); None when the body is not a JSON object, cannot be decoded
    within that bound, or its model is not a string. For adapters that route on the model, where
    a cheap scan's guess is not good enough."""
    try:
        body = json.loads(decoded_request_body(request) or b"")
    except (ValueError, RecursionError):  # RecursionError: nested deeper than json can parse
        # (UndecodableBody is a ValueError.)
        return None
    model = body.get("model") if isinstance(body, dict) else None
    return model if isinstance(model, str) else None


def point_at(request: http.Request, upstream: Upstream, path: str) -> None:
    """Send ``request`` to ``upstream`` with ``path`` (query included). mitmproxy keeps the Host
    header and the h2 authority in step with scheme, host and port."""
    request.scheme = upstream.scheme
    request.host = upstream.host
    request.port = upstream.port
    request.path = path


def setting_text(settings: Mapping[str, Any], name: str) -> str:
    """A string setting, stripped; "" when absent or not a string (``--set`` parses JSON)."""
    value = settings.get(name)
    return value.strip() if isinstance(value, str) else ""


class RouteRefusal(Exception):
    """Raised by ``Adapter.rewrite`` when the provider cannot serve a request at all (Bedrock has
    no ``/v1/models``). The request never goes upstream: ``interception.routing.route_request``
    turns it into a refusal, answered with ``status`` in the client format's error shape, with
    ``message`` for people and ``code`` for programs."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


class ResponseTransform(Protocol):
    """Rewrites one streamed response on its way to the client (Bedrock: AWS event-stream in,
    Anthropic SSE out). Called synchronously in the proxy core, chunk by chunk, so it must be
    cheap and must never block."""

    def start(self, response: http.Response) -> None:
        """Adjust status and headers before they are sent."""

    def feed(self, chunk: bytes) -> bytes:
        """Transform the next chunk; ``b""`` marks the end of the stream."""
        ...


class UpstreamErrorAnswer(Protocol):
    """Turns an upstream's error answer (status >= 400) into the client format's error, when the
    upstream speaks another format than the client (Bedrock behind Anthropic clients)."""

    status: int  # the status the client gets, decided from the upstream's status and headers

    def body(self, payload: bytes) -> bytes:
        """The client's error body for the upstream's whole (bounded) body."""
        ...


# The credential modes of most types: central keys from the row, or the client's own key
# (BYOK) when the row allows it.
KEYS_OR_BYOK = frozenset({CredentialMode.CENTRAL, CredentialMode.BYOK})


class Adapter:
    """Base adapter: an OpenAI-style provider with a Bearer key. Subclasses change the data
    below, and override methods only where their wire protocol really differs."""

    type_name: ClassVar[str]
    client_format: ClassVar[ApiFormat] = ApiFormat.OPENAI
    # Hosts intercepted when the row names none; empty means "the host of base_url".
    default_hosts: ClassVar[tuple[str, ...]] = ()
    # None means base_url is required.
    default_base_url: ClassVar[str | None] = None
    # Stripped from client paths that do not already start with the base_url path.
    version_prefix: ClassVar[str] = "/v1"
    # Setting names whose values are secrets: masked in every listing.
    secret_settings: ClassVar[frozenset[str]] = frozenset()
    # Every setting the type reads; ``providers add/edit --set`` refuses any other name.
    known_settings: ClassVar[frozenset[str]] = frozenset()
    # How requests of this type may be authenticated upstream: {CENTRAL, BYOK} (BYOK only when
    # the row allows it), {BYOK} (always the user's own credential: Copilot) or {SIGNED} (the
    # adapter signs with credentials from the settings, no BYOK: Bedrock).
    credential_modes: ClassVar[frozenset[CredentialMode]] = KEYS_OR_BYOK
    # Why a type that is not KEYS takes no keys, for the messages that refuse them.
    no_keys_because: ClassVar[str] = ""
    # The wire formats whose usage-reporting endpoints this type's clients may call.
    usage_formats: ClassVar[frozenset[ApiFormat]] = frozenset(ApiFormat)
    # Seeding: ``CODER_AI_GATEWAY_PROVIDER_<N>_<SUFFIX>`` suffix -> the setting it fills.
    environment_settings: ClassVar[Mapping[str, str]] = {}
    # Settings that hold credentials: a hint names the variable holding one, never its value.
    credential_settings: ClassVar[frozenset[str]] = frozenset()
    # Set: a fresh database with no seeds gets one provider of this type, named after it and
    # shown with this name.
    default_display_name: ClassVar[str] = ""
    # ``gen_ai.provider.name`` on spans (OpenTelemetry GenAI semantic conventions, the
    # registry's well-known values: openai, anthropic, aws.bedrock, azure.ai.openai,
    # gcp.gemini, ...; a custom value where none applies). The base adapter speaks OpenAI's API.
    genai_provider_name: ClassVar[str] = "openai"

    @property
    def byok_only(self) -> bool:
        """Every request carries the user's own credential; rows hold no keys."""
        return self.credential_modes == {CredentialMode.BYOK}

    @property
    def signs_requests(self) -> bool:
        """The adapter signs every request itself; client credentials are all removed."""
        return CredentialMode.SIGNED in self.credential_modes

    # -- evaluation (providers.py) ------------------------------------------------------------

    @property
    def requires_base_url(self) -> bool:
        """A row of this type is refused without a base_url (there is nothing to default to)."""
        return self.default_base_url is None

    def base_url_default(self, record: ProviderRecord) -> str | None:
        """The base_url used when the row names none (Bedrock derives it from the region)."""
        return self.default_base_url

    def base_url_problem(self, record: ProviderRecord) -> str:
        """The status reason when the row has no base_url and the type cannot default one."""
        return f"base_url is required for type {record.type!r}"

    def problem(self, record: ProviderRecord, upstream: Upstream) -> str | None:
        """Why this row cannot route (status ``error``), or None if it can."""
        if (
            CredentialMode.CENTRAL in self.credential_modes
            and not record.keys
            and not record.allow_byok
        ):
            return "no keys configured and BYOK is off"
        return None

    def upstream_addresses(self, provider: Provider) -> Iterable[tuple[str, int]]:
        """(host, port) pairs this provider dials: operator configuration, so exempt from the
        private-destination block list (docs/providers.md#hosts-and-base_url)."""
        if provider.upstream is not None:
            yield provider.upstream.host, provider.upstream.port

    # -- per request (addons/route.py, addons/interceptions.py) --------------------------------

    def request_model(self, request: http.Request) -> str | None:
        """The model the client asked for, from what has arrived of ``request``: called at its
        head (path and headers only) and again once the body is in, before ``rewrite`` (which
        may move the model out of the body). None when nothing names one. A compressed body is
        read decoded, its first 64 KiB only."""
        return scanned_body_model(request_body_prefix(request)) or query_model(request)

    def api_kind(self, method: str, path: str, *, websocket: bool = False) -> ApiKind | None:
        """The API of a request whose response reports usage, or None; ``path`` as the client
        sent it, classified by its segments (``usage.api_kind_for``). ``websocket``: the request
        upgrades to a WebSocket session, whose messages report usage in the shape of their API
        (``usage.websocket_api_kind_for``)."""
        if websocket:
            return websocket_api_kind_for(path, self.usage_formats)
        return api_kind_for(method, path, self.usage_formats)

    def error_format(self, request: http.Request) -> ApiFormat:
        """The shape of errors the proxy returns for this request (Gemini serves two formats)."""
        return self.client_format

    def normalize_credentials(self, request: http.Request) -> None:
        """Move a client credential carried outside the credential headers (Gemini's ``?key=``)
        into one, before ``interception.routing.credential_mode_for`` decides between central
        key and BYOK. Headers are the one place credentials are checked, so the proxy token
        cannot slip upstream another way."""

    def inject_key(self, headers: http.Headers, key: str) -> None:
        """Set the upstream credential. Also called again on key failover, with the request's
        headers as ``rewrite`` left them."""
        headers["authorization"] = f"Bearer {key}"

    def secrets(self, provider: Provider) -> tuple[str, ...]:
        """Every configured secret of the provider: its keys and its secret settings. Redacted
        from upstream error bodies before a client or a log sees them."""
        return (
            *provider.keys,
            *(setting_text(provider.settings, name) for name in sorted(self.secret_settings)),
        )

    def upstream_error(self, status: int, headers: http.Headers) -> UpstreamErrorAnswer | None:
        """How an upstream error answer (status >= 400) reaches the client; None: unchanged
        (the upstream already speaks the client's format)."""
        return None

    def upstream_for(self, request: http.Request, provider: Provider) -> Upstream:
        upstream = provider.upstream
        assert upstream is not None, "only enabled providers are routed"
        return upstream

    def upstream_path(self, request: http.Request, provider: Provider, upstream: Upstream) -> str:
        """The path (with query) the upstream receives."""
        return map_path(request.path, upstream.path, self.version_prefix)

    def rewrite(
        self, request: http.Request, provider: Provider, key: str | None
    ) -> ResponseTransform | None:
        """Point the request at the provider's upstream and inject ``key`` (central mode).
        Returns a transform for the response when the upstream speaks another wire format.
        Raises ``RouteRefusal`` for a request the provider cannot serve."""
        upstream = self.upstream_for(request, provider)
        point_at(request, upstream, self.upstream_path(request, provider, upstream))
        if key is not None:
            self.inject_key(request.headers, key)
        return None
