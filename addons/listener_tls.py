"""Serve the proxy listener itself over TLS (``tls_cert_file``/``tls_key_file``), so clients can
use an ``https://`` proxy URL. MITM and tunnels then run inside that TLS connection.

mitmproxy would otherwise answer a TLS handshake at the listener with a leaf from the MITM CA.
It would also serve a client that speaks cleartext to that listener (an ``http://`` proxy URL
left in place): its proxy token would cross the first hop in the clear, unnoticed. Such a
request is refused with 400 before any other addon reads it (this addon runs first of ours),
and the refusal is logged, so the client is fixed instead.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mitmproxy import http, tls
from OpenSSL import SSL

from aibridgeproxyd.mitm.framing import peer_address
from aibridgeproxyd.mitm.responses import tls_required
from aibridgeproxyd.mitm.tls import is_listener_handshake

log = logging.getLogger("aibridgeproxyd.listener")


class ListenerTlsError(ValueError):
    """The listener's certificate or key file cannot be used; the message names the file."""


def _select_http1(conn: SSL.Connection, offered: list[bytes]) -> Any:
    # CONNECT over HTTP/2 is not supported by mitmproxy; the proxy leg is HTTP/1.1.
    return b"http/1.1" if b"http/1.1" in offered else SSL.NO_OVERLAPPING_PROTOCOLS


def listener_context(cert_file: Path, key_file: Path) -> SSL.Context:
    """A server context with the operator's certificate (chain first-leaf) and key; TLS 1.2+."""
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    try:
        context.use_certificate_chain_file(str(cert_file))
    except (SSL.Error, OSError) as exc:
        raise ListenerTlsError(f"cannot load tls_cert_file {cert_file}: {exc}") from None
    try:
        context.use_privatekey_file(str(key_file))
        context.check_privatekey()
    except (SSL.Error, OSError) as exc:
        raise ListenerTlsError(
            f"cannot load tls_key_file {key_file} or it does not match tls_cert_file: {exc}"
        ) from None
    context.set_alpn_select_callback(_select_http1)
    return context


class ListenerTls:
    """Gives a TLS handshake at the proxy listener the configured certificate instead of a MITM
    leaf (``tls_start_client``), and refuses proxy requests sent in cleartext."""

    def __init__(self, cert_file: Path, key_file: Path) -> None:
        self.context = listener_context(cert_file, key_file)

    def tls_start_client(self, tls_start: tls.TlsData) -> None:
        # Only the TLS in front of the proxy protocol: a MITM'd tunnel's TLS gets a CA leaf.
        if is_listener_handshake(tls_start):
            tls_start.ssl_conn = SSL.Connection(self.context)
            tls_start.ssl_conn.set_accept_state()

    def http_connect(self, flow: http.HTTPFlow) -> None:
        self._refuse_cleartext(flow)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        # A plain-HTTP proxy request; one inside a tunnel came over the listener's TLS.
        self._refuse_cleartext(flow)

    def _refuse_cleartext(self, flow: http.HTTPFlow) -> None:
        if flow.response is None and not flow.client_conn.tls_established:
            log.warning(
                "refused a cleartext proxy request: this listener serves TLS, the client must "
                "use an https:// proxy URL",
                extra={"client": peer_address(flow.client_conn)},
            )
            flow.response = tls_required()
