"""Responses the addons and the layers share.

Plain refusals (``forbidden``, ``bad_gateway``, ``proxy_auth_required``) carry no internal
detail: the destination guard, the classifier and the HTTP layer all answer with these, so a
refusal reads the same whichever of them made it.
"""

from __future__ import annotations

import time

from mitmproxy import http
from mitmproxy.net.http import http1

from aibridgeproxyd.errors import reason_phrase
from aibridgeproxyd.proxy_auth import CHALLENGE


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


def bad_gateway() -> http.Response:
    """502 with no detail: the address and the OS error stay in the log."""
    return http.Response.make(502, b"Bad Gateway", {"Content-Type": "text/plain"})


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
    "bad_gateway",
    "connection_established",
    "forbidden",
    "http1_bytes",
    "proxy_auth_required",
]
