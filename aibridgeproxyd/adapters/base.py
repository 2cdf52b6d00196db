"""What every adapter shares: type defaults as data, path mapping, key injection."""

from __future__ import annotations

from typing import ClassVar

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
    # Copilot: the user's own token is always used, never a central key.
    byok_only: ClassVar[bool] = False

    def problem(self, record: ProviderRecord, upstream: Upstream) -> str | None:
        """Why this row cannot route (status ``error``), or None if it can."""
        if not self.byok_only and not record.keys and not record.allow_byok:
            return "no keys configured and BYOK is off"
        return None

    def inject_key(self, headers: http.Headers, key: str) -> None:
        headers["authorization"] = f"Bearer {key}"

    def rewrite(self, request: http.Request, provider: Provider, key: str | None) -> None:
        """Point the request at the provider's upstream and inject ``key`` (central mode)."""
        upstream = provider.upstream
        assert upstream is not None, "only enabled providers are routed"
        path = map_path(request.path, upstream.path, self.version_prefix)
        request.scheme = upstream.scheme
        request.host = upstream.host
        request.port = upstream.port
        request.path = path
        if key is not None:
            self.inject_key(request.headers, key)
