"""Responses the addons and the layers share.

Plain refusals (``forbidden``, ``bad_gateway``, ``proxy_auth_required``,
``provider_misconfigured``) carry no internal detail: the destination guard, the classifier and
the HTTP layer all answer with these, so a refusal reads the same whichever of them made it.

The destination refusals that both the classifier (a CONNECT) and the destination guard (a
plain-HTTP proxy request) make (``refuse_port``, ``refuse_misconfigured``) are also logged once
at info and counted in ``blocked_connections_total`` here, so that they read the same from
either addon.
Info, like every other refusal: a client retrying in a loop must not flood the log.
"""

from __future__ import annotations

import logging
import time

from mitmproxy import http
from mitmproxy.net.http import http1

from aibridgeproxyd.adapters import ADAPTERS
from aibridgeproxyd.destinations import DestinationRefusal
from aibridgeproxyd.errors import error_response, reason_phrase
from aibridgeproxyd.metrics import Metrics
from aibridgeproxyd.proxy_auth import CHALLENGE

# The destination guard's logger: a destination refusal reads the same from either addon.
log = logging.getLogger("aibridgeproxyd.destinations")

# The reason in the 503 body of a host claimed by an unreadable provider row.
PROVIDER_MISCONFIGURED = "provider misconfigured"


def connection_established(flow: http.HTTPFlow) -> http.Response:
    """The answer to ``flow``'s CONNECT once the tunnel is open: the same bare 200 mitmproxy
    sends itself (``HttpStream.handle_connect_finish``), with no headers, since some clients
    choke on them."""
    now = time.time()
    return http.Response(
        flow.request.data.http_version,
        200,
        b"Connection established",
        http.Headers(),
        b"",
        None,
        now,
        now,
    )


def forbidden(reason: str) -> http.Response:
    """403 saying why, short and without detail: ``Forbidden: port not allowed``."""
    return http.Response.make(403, f"Forbidden: {reason}".encode(), {"Content-Type": "text/plain"})


def bad_gateway(reason: str | None = None) -> http.Response:
    """502 with no detail: the address and the OS error stay in the log. ``reason``, our own
    text that names no address (a corporate proxy's refusal, ``errors.proxy_refusal``), follows
    ``Bad Gateway: `` when given."""
    body = "Bad Gateway" if reason is None else f"Bad Gateway: {reason}"
    return http.Response.make(502, body.encode(), {"Content-Type": "text/plain"})


def gateway_timeout() -> http.Response:
    """504 with no detail, for a tunnel's dial cut off at ``upstream_connect_timeout``."""
    return http.Response.make(504, b"Gateway Timeout", {"Content-Type": "text/plain"})


def proxy_stopping() -> http.Response:
    """503 for a CONNECT whose tunnel a stopping proxy did not open (its dial was still under
    way when the drain ended): retryable, on another replica or once the proxy is back; the
    connection is closed after it."""
    return http.Response.make(
        503,
        b"Service Unavailable: the proxy is stopping; retry",
        {
            "Content-Type": "text/plain",
            "Retry-After": "1",
            "Proxy-Connection": "close",
            "Connection": "close",
        },
    )


def tls_required() -> http.Response:
    """400 for a proxy request sent in cleartext to a listener that serves TLS
    (``tls_cert_file``); the connection is closed after it."""
    return http.Response.make(
        400,
        b"This proxy listener accepts TLS only: use an https:// proxy URL.",
        {"Content-Type": "text/plain", "Proxy-Connection": "close", "Connection": "close"},
    )


def provider_misconfigured() -> http.Response:
    """503 for a host of a provider row that cannot be read. Short, and naming no provider: the
    client may hold no token."""
    return http.Response.make(
        503,
        f"Service Unavailable: {PROVIDER_MISCONFIGURED}; ask an operator to fix it".encode(),
        {"Content-Type": "text/plain"},
    )


def refuse_port(
    logger: logging.Logger,
    subject: str,
    host: str,
    port: int,
    metrics: Metrics,
    connect_id: str | None = None,
) -> http.Response:
    """``forbidden(port not allowed)`` for a port outside ``allowed_ports``, logged on the
    refusing addon's ``logger`` as "``subject`` refused" (``CONNECT``, ``request``) and counted
    as ``blocked_connections_total{reason="port_not_allowed"}``."""
    reason = DestinationRefusal.PORT_NOT_ALLOWED
    extra: dict[str, str | int] = {} if connect_id is None else {"connect_id": connect_id}
    logger.info("%s refused: %s", subject, reason, extra={**extra, "host": host, "port": port})
    metrics.blocked_connections.labels("port_not_allowed").inc()
    return forbidden(reason)


def refuse_misconfigured(
    host: str, provider_name: str, connect_id: str, metrics: Metrics
) -> http.Response:
    """``provider_misconfigured`` for a host of a provider row that cannot be read
    (``Snapshot.closed_hosts``): the row may be an enabled provider, so its hosts are neither
    tunneled (which would open them without a proxy token) nor routed (its keys and settings are
    unknown). Logged and counted as
    ``blocked_connections_total{reason="provider_misconfigured"}``."""
    # The row's status is already logged once at warning on each change.
    log.info(
        "request to %s refused: provider %r claims it but its row cannot be read; "
        "see `providers list`",
        host,
        provider_name,
        extra={"connect_id": connect_id, "host": host, "provider": provider_name},
    )
    metrics.blocked_connections.labels("provider_misconfigured").inc()
    return provider_misconfigured()


def use_connect(request: http.Request, provider_type: str) -> http.Response:
    """400 in the client format (``provider_type``'s) for a plain-HTTP proxy request to a
    provider host: that host is reached only through CONNECT."""
    host = request.pretty_host
    message = (
        f"{host} is reached through this proxy only as an HTTPS proxy (CONNECT, e.g. "
        f"HTTPS_PROXY), not with plain-HTTP proxy requests; send the request to https://{host}/ "
        "with the proxy configured for HTTPS."
    )
    adapter = ADAPTERS[provider_type]
    return error_response(adapter.error_format(request), 400, message, "use_connect")


def proxy_auth_required() -> http.Response:
    """407 with the Basic challenge; the connection is closed after it (both headers: clients
    read ``Proxy-Connection``, mitmproxy's HTTP/1 layer acts on ``Connection``)."""
    return http.Response.make(
        407,
        b"Proxy Authentication Required",
        {
            "Proxy-Authenticate": CHALLENGE,
            "Content-Type": "text/plain",
            "Proxy-Connection": "close",
            "Connection": "close",
        },
    )


def http1_bytes(response: http.Response) -> bytes:
    """``response`` as a complete HTTP/1.1 answer, with its status's reason phrase, for the
    layers that write it to the client themselves."""
    response.reason = reason_phrase(response.status_code)
    return http1.assemble_response(response)


__all__ = [
    "PROVIDER_MISCONFIGURED",
    "bad_gateway",
    "connection_established",
    "forbidden",
    "http1_bytes",
    "provider_misconfigured",
    "proxy_auth_required",
    "proxy_stopping",
    "refuse_misconfigured",
    "refuse_port",
    "use_connect",
]
