"""The routing decision for one intercepted request: which credential mode, which refusal,
which central key, and when to fail over to the next key (docs/providers.md, "Keys, BYOK and the
proxy's own errors").

The decisions are functions of the request's headers and path, the provider, the adapter's
credential modes, the caller's proxy token, the ``central_key_placeholder`` and the
``KeyPool``; they return a ``Refusal`` (the proxy answers) or the way to go on.
``route_request`` applies them to a request and ``fail_over`` to a failed try;
``addons/route.py`` only calls them.

Refusals that no retry can cure are 403, not 5xx: SDKs retry every 5xx, and no retry brings a
key or a permission.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from mitmproxy import http

from aibridgeproxyd.adapters import Adapter
from aibridgeproxyd.adapters.base import RouteRefusal
from aibridgeproxyd.credentials import (
    CredentialMode,
    client_credential_hint,
    credential_mode,
    credential_values,
    remove_all_credentials,
    remove_proxy_credentials,
    scrub_proxy_token,
)
from aibridgeproxyd.errors import error_response
from aibridgeproxyd.header_fields import drop_headers
from aibridgeproxyd.interception.recording import read_request_content, read_request_model
from aibridgeproxyd.interception.state import RequestContext, RoutingState, mark_proxy_answer
from aibridgeproxyd.keypool import FAILOVER_STATUSES, KeyPool, parse_retry_after
from aibridgeproxyd.model import Provider
from aibridgeproxyd.paths import dot_segment_path

# The route addon's logger: these lines read as the routing stage's, wherever the code lives.
log = logging.getLogger("aibridgeproxyd.route")
# Dropped from every routed request: the proxy's own credential, never the upstream's business.
_PROXY_AUTHORIZATION = frozenset({b"proxy-authorization"})


@dataclass(frozen=True)
class Refusal:
    """The proxy's own answer instead of the upstream's: ``status``, ``message`` for people,
    ``code`` for programs (also the interception record's ``error``), and extra response
    headers (``Retry-After``). Answered in the client format's error shape."""

    status: int
    message: str
    code: str
    headers: dict[str, str] = field(default_factory=dict)


def answer_refusal(flow: http.HTTPFlow, ctx: RequestContext, refusal: Refusal) -> None:
    """Answer ``flow`` with ``refusal`` in the client format's error shape (with
    ``X-Should-Retry: false`` when a retry cannot cure it: ``errors.should_retry``), marked as
    the proxy's own answer for the interception record."""
    mark_proxy_answer(flow, refusal.code)
    flow.response = error_response(
        ctx.adapter.error_format(flow.request),
        refusal.status,
        refusal.message,
        refusal.code,
        refusal.headers or None,
    )


@dataclass(frozen=True)
class Route:
    """How a request goes upstream: its credential mode and, in central mode, the index into
    ``provider.keys`` of the key to inject (None otherwise)."""

    credential_mode: CredentialMode
    key_index: int | None = None


def unclaimed_host(pretty_host: str) -> Refusal:
    """No enabled provider claims the host of a MITM'd tunnel any more: 503, retryable on a new
    connection (which is classified afresh, and tunneled)."""
    return Refusal(
        503,
        f"No enabled provider serves {pretty_host} through this proxy any more; "
        "retry on a new connection.",
        "provider_unavailable",
    )


def path_refusal(path: str) -> Refusal | None:
    """A path with a ``.`` or ``..`` segment is refused on the head, before any key is
    injected (``aibridgeproxyd.paths``); None for any other path."""
    if not dot_segment_path(path):
        return None
    return Refusal(
        400,
        "The request path has a '.' or '..' segment (also percent-encoded or with "
        "backslashes); send the path without them.",
        "invalid_path",
    )


def credential_mode_for(
    headers: http.Headers, adapter: Adapter, proxy_token: str | None, placeholder: str
) -> CredentialMode:
    """The request's credential mode: SIGNED when the adapter signs, BYOK when the adapter takes
    only the user's credential or the client sent a key of its own, else CENTRAL (no credential,
    or only the proxy token or the placeholder: ``credentials.credential_mode``)."""
    if adapter.signs_requests:
        return CredentialMode.SIGNED
    if adapter.byok_only:
        return CredentialMode.BYOK
    return credential_mode(headers, proxy_token, placeholder)


def decide_route(
    mode: CredentialMode,
    provider: Provider,
    adapter: Adapter,
    key_pool: KeyPool,
    routing: RoutingState,
    placeholder: str,
) -> Route | Refusal:
    """The route for a request in ``mode``, or why it is refused: ``byok_not_allowed`` (403,
    naming the ``placeholder`` that asks for the central key), ``no_key_configured`` (403), or,
    when every central key is cooling down or was tried, ``all_keys_rate_limited`` /
    ``all_keys_rejected`` (``exhausted``). ``routing`` supplies the keys already tried and
    whether one was rate-limited."""
    if mode is CredentialMode.BYOK and not (provider.allow_byok or adapter.byok_only):
        return Refusal(
            403,
            "This provider does not accept your own API key; to use the central key, send "
            f"'{placeholder}' (or your proxy token) as the API key instead.",
            "byok_not_allowed",
        )
    if mode is not CredentialMode.CENTRAL:
        return Route(mode)
    if not provider.keys:
        return Refusal(
            403,
            f"No API key is configured for provider '{provider.name}'; "
            "send your own key or ask an operator to add one.",
            "no_key_configured",
        )
    index = key_pool.select(provider.name, provider.keys, frozenset(routing.tried_keys))
    if index is None:
        return exhausted(key_pool, provider, routing.saw_rate_limit)
    return Route(mode, index)


def exhausted(key_pool: KeyPool, provider: Provider, saw_rate_limit: bool) -> Refusal:
    """No central key is left for the request: 429 with Retry-After (seconds) when any key was
    rate-limited, else 502."""
    answer = key_pool.exhausted(provider.name, provider.keys, saw_rate_limit)
    if answer.status == 429:
        return Refusal(
            429,
            f"Every API key of provider '{provider.name}' is rate-limited; retry later.",
            "all_keys_rate_limited",
            {"Retry-After": str(answer.retry_after)},
        )
    return Refusal(
        502,
        f"Every API key of provider '{provider.name}' was rejected by the upstream.",
        "all_keys_rejected",
    )


def route_request(
    request: http.Request, ctx: RequestContext, placeholder: str, key_pool: KeyPool
) -> Refusal | None:
    """Decide the route of ``request`` and rewrite it for the upstream; the refusal, or None
    once ``ctx.routing`` (credential mode, central key) and ``ctx.transform`` are set.

    Client credentials are removed as the mode requires (all of them, or in BYOK only those
    carrying the proxy token or the placeholder), the proxy token is scrubbed from every other
    header and query parameter (logged), and the adapter rewrites the request (its
    ``RouteRefusal`` becomes a ``Refusal``). The model asked for is read first, before the
    rewrite (``recording.read_request_model``), and so is what the record keeps of the request
    (``recording.read_request_content``): the rewrite may change the body and drop headers."""
    read_request_model(ctx, request)
    read_request_content(ctx, request)
    provider, adapter, token = ctx.provider, ctx.adapter, ctx.connect.proxy_token
    headers = request.headers
    drop_headers(headers, _PROXY_AUTHORIZATION)
    adapter.normalize_credentials(request)
    mode = ctx.routing.credential_mode = credential_mode_for(headers, adapter, token, placeholder)
    route = decide_route(mode, provider, adapter, key_pool, ctx.routing, placeholder)
    if isinstance(route, Refusal):
        return route
    if mode is CredentialMode.BYOK:
        remove_proxy_credentials(headers, token, placeholder)
    else:
        if mode is CredentialMode.SIGNED:
            # The client's own credentials, dropped here, stay known for redaction. (A central
            # request's are by definition the proxy token or the placeholder: known already.)
            sent = (value for _, value in credential_values(headers))
            ctx.recording.client_credentials = tuple(v for v in sent if v and v != placeholder)
        remove_all_credentials(headers)
    key: str | None = None
    if route.key_index is not None:
        ctx.routing.use_key(route.key_index)
        key = provider.keys[route.key_index]
    if removed := scrub_proxy_token(request, token):
        log.info("proxy token removed from %s", ", ".join(removed), extra=ctx.log_ids())
    if mode is CredentialMode.BYOK:  # the client's key as it goes upstream, proxy token gone
        ctx.routing.byok_hint = client_credential_hint(headers)
    try:
        ctx.transform = adapter.rewrite(request, provider, key)
    except RouteRefusal as refusal:
        return Refusal(refusal.status, refusal.message, refusal.code)
    if log.isEnabledFor(logging.DEBUG):  # spare the hot path the extra dict
        log.debug(
            "routing %s %s to provider %s",
            request.method,
            request.path,
            provider.name,
            extra=ctx.log_ids(),
        )
    return None


def needs_failover(routing: RoutingState, status: int) -> bool:
    """A central key was answered with 401 or 429: the key cools down and the next is tried."""
    return routing.key_index is not None and status in FAILOVER_STATUSES


def next_key(
    key_pool: KeyPool,
    provider: Provider,
    routing: RoutingState,
    status: int,
    retry_after: str | None,
) -> int | None:
    """Cool the failed key down (for the upstream's ``Retry-After`` header value on a 429) and
    move ``routing`` to the next key not tried yet and not cooling down; None when none is
    left, and ``exhausted`` then says what to answer."""
    failed = routing.key_index
    assert failed is not None, "only a request sent with a central key fails over"
    routing.saw_rate_limit |= status == 429
    key_pool.cool_down(provider.name, provider.keys[failed], status, parse_retry_after(retry_after))
    index = key_pool.select(provider.name, provider.keys, frozenset(routing.tried_keys))
    if index is not None:
        routing.use_key(index)
    return index


def fail_over(
    key_pool: KeyPool, ctx: RequestContext, status: int, retry_after: str | None
) -> str | None:
    """The central key answered ``status`` (``needs_failover``): the next key to re-send the
    request with (``next_key``), or None when none is left, once ``ctx.routing.keys_exhausted``
    is set (the upstream's error body is still arriving; the route replaces it with
    ``exhausted``'s answer). Either way logged (warning)."""
    provider, failed = ctx.provider, ctx.routing.key_index
    assert failed is not None, "only a request sent with a central key fails over"
    index = next_key(key_pool, provider, ctx.routing, status, retry_after)
    if index is None:
        log.warning(
            "key %d of provider %s answered %d and no key is left",
            failed + 1,
            provider.name,
            status,
            extra=ctx.log_ids(),
        )
        ctx.routing.keys_exhausted = True
        return None
    log.warning(
        "key %d of provider %s answered %d; failing over to key %d",
        failed + 1,
        provider.name,
        status,
        index + 1,
        extra=ctx.log_ids(),
    )
    return provider.keys[index]
