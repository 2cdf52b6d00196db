"""What every adapter shares: type defaults as data, path mapping, key injection."""

from __future__ import annotations

from typing import ClassVar, Protocol

from mitmproxy import http

from aibridgeproxyd.model import ApiFormat, Provider, ProviderRecord, Upstream


def map_path(request_path: str, base_path: str, version_prefix: str) -> str:
    """Map a client path (with query) onto the upstream's base path (section 6.2).

    A path that already starts with the base path is kept. Otherwise the client format's version
    prefix (``/v1`` for OpenAI) is stripped and the rest is joined to the base path. The query
    string is kept either way.
    """
    path, sep, query = request_path.partition("?")
    if not _has_segment_prefix(path, base_path):
        if version_prefix and _has_segment_prefix(path, version_prefix):
            path = path[len(version_prefix) :]
        path = base_path + (path if path.startswith("/") else "/" + path)
    return path + sep + query


def _has_segment_prefix(path: str, prefix: str) -> bool:
    """``/v1/chat`` starts with ``/v1``; ``/v10/chat`` does not."""
    if not prefix:
        return True
    return path == prefix or path.startswith(prefix + "/")


class ResponseTransform(Protocol):
    """Rewrites one streamed response on its way to the client (Bedrock: AWS event-stream in,
    Anthropic SSE out). Called synchronously in the proxy core, chunk by chunk, so it must be
    cheap and must never block."""

    def start(self, response: http.Response) -> None:
        """Adjust status and headers before they are sent."""

    def feed(self, chunk: bytes) -> bytes:
        """Transform the next chunk; ``b""`` marks the end of the stream."""
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
    credential_policy: ClassVar[str] = CredentialPolicy.KEYS

    @property
    def byok_only(self) -> bool:
        return self.credential_policy == CredentialPolicy.BYOK_ONLY

    def base_url_default(self, record: ProviderRecord) -> str | None:
        """The base_url used when the row names none (Bedrock derives it from the region)."""
        return self.default_base_url

    def problem(self, record: ProviderRecord, upstream: Upstream) -> str | None:
        """Why this row cannot route (status ``error``), or None if it can."""
        if self.credential_policy == CredentialPolicy.KEYS and not record.keys and not record.allow_byok:
            return "no keys configured and BYOK is off"
        return None

    def error_format(self, request: http.Request) -> ApiFormat:
        """The shape of errors the proxy returns for this request (Gemini serves two formats)."""
        return self.client_format

    def inject_key(self, headers: http.Headers, key: str) -> None:
        headers["authorization"] = f"Bearer {key}"

    def rewrite(self, request: http.Request, provider: Provider, key: str | None) -> ResponseTransform | None:
        """Point the request at the provider's upstream and inject ``key`` (central mode).
        Returns a transform for the response when the upstream speaks another wire format."""
        upstream = provider.upstream
        assert upstream is not None, "only enabled providers are routed"
        path = map_path(request.path, upstream.path, self.version_prefix)
        request.scheme = upstream.scheme
        request.host = upstream.host
        request.port = upstream.port
        request.path = path
        if key is not None:
            self.inject_key(request.headers, key)
        return None
