"""What every adapter shares: type defaults as data, path mapping, key injection."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from aibridgeproxyd.model import ApiFormat, Provider, ProviderRecord, Upstream

if TYPE_CHECKING:
    from mitmproxy import http


def map_path(request_path: str, base_path: str, version_prefix: str) -> str:
    """Map a client path (with query) onto the upstream's base path (section 6.2).

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
    no ``/v1/models``). The request never goes upstream: route.py answers ``status`` in the
    client format's error shape, with ``message`` for people and ``code`` for programs."""

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


class CredentialPolicy:
    KEYS = "keys"  # central keys from the row, or the client's own key (BYOK) if allowed
    BYOK_ONLY = "byok_only"  # always the user's own credential (Copilot)
    SIGNED = "signed"  # the adapter signs with credentials from settings (Bedrock); no BYOK


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
    credential_policy: ClassVar[str] = CredentialPolicy.KEYS

    @property
    def byok_only(self) -> bool:
        return self.credential_policy == CredentialPolicy.BYOK_ONLY

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
            self.credential_policy == CredentialPolicy.KEYS
            and not record.keys
            and not record.allow_byok
        ):
            return "no keys configured and BYOK is off"
        return None

    def upstream_addresses(self, provider: Provider) -> Iterable[tuple[str, int]]:
        """(host, port) pairs this provider dials: operator configuration, so exempt from the
        private-destination block list (section 8)."""
        if provider.upstream is not None:
            yield provider.upstream.host, provider.upstream.port

    # -- per request (addons/route.py) --------------------------------------------------------

    def error_format(self, request: http.Request) -> ApiFormat:
        """The shape of errors the proxy returns for this request (Gemini serves two formats)."""
        return self.client_format

    def normalize_credentials(self, request: http.Request) -> None:
        """Move a client credential carried outside the credential headers (Gemini's ``?key=``)
        into one, before route.py decides between central key and BYOK. Headers are the one
        place credentials are checked, so the proxy token cannot slip upstream another way."""

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
