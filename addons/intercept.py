"""MITM or tunnel, once the CONNECT is accepted.

For a MITM'd host the CONNECT is answered without dialling the original host: the adapter
decides the upstream per request, so the original host is never contacted. Tunnels are relayed
byte for byte, whatever they carry (TLS or not), and are never decrypted; once both sockets are
quiet they move to the fast path (``aibridgeproxyd.mitm.tunnel_relay``), logged at debug with
the relay used: ``splice`` (zero-copy, ``aibridgeproxyd.mitm.splice_relay``) or ``copy``.
"""

from __future__ import annotations

import functools
import logging

from mitmproxy import connection, http, tls

from aibridgeproxyd.interception.state import ConnectionTable
from aibridgeproxyd.metrics import Metrics
from aibridgeproxyd.mitm.connections import ClientConnection
from aibridgeproxyd.mitm.hooks import NextLayer, ServerConnectionHookData
from aibridgeproxyd.mitm.http_layer import UPSTREAM_ALPN, as_http1
from aibridgeproxyd.mitm.layers import (
    install_mitm_http_layer,
    install_tunnel_relay,
    skip_server_tls,
)
from aibridgeproxyd.mitm.responses import connection_established
from aibridgeproxyd.mitm.splice_relay import SplicePipes
from aibridgeproxyd.mitm.stream_bounds import DEFAULT_BOUNDS, StreamBounds

log = logging.getLogger("aibridgeproxyd.connect")

# Concurrent upstream connections one client connection may hold per upstream address.
UPSTREAM_CONNECTIONS_PER_CLIENT = 64


class Intercept:
    """Answers a MITM'd CONNECT itself (``http_connect``), installs our HTTP layer or a raw relay
    (``next_layer``), and counts established CONNECTs (``http_connected``)."""

    def __init__(
        self,
        connections: ConnectionTable,
        metrics: Metrics,
        stream_bounds: StreamBounds = DEFAULT_BOUNDS,
        pipes: SplicePipes | None = None,
    ) -> None:
        self.connections = connections
        self.metrics = metrics
        self.stream_bounds = stream_bounds
        self.pipes = pipes  # for tunnels relayed with splice; None: the copying relay

    def http_connect(self, flow: http.HTTPFlow) -> None:
        info = self.connections.get(flow.client_conn)
        if flow.response is None and info is not None and info.intercept:
            # Answering here skips mitmproxy's eager dial of the CONNECT target.
            flow.response = connection_established(flow)

    def http_connected(self, flow: http.HTTPFlow) -> None:
        info = self.connections.get(flow.client_conn)
        if info is None:
            return
        info.established = True
        kind = "mitm" if info.intercept else "tunneled"
        self.metrics.connect_sessions.labels(kind).inc()
        log.debug(
            "CONNECT %s:%s %s",
            info.host,
            info.port,
            kind,
            extra={"connect_id": info.connect_id, "provider": info.provider_name or ""},
        )

    def client_connected(self, client: connection.Client) -> None:
        # mitmproxy holds one of 5 slots per upstream address for each upstream connection's
        # whole life. Pooled idle HTTP/1.1 connections would then starve an HTTP/2 client's
        # sixth concurrent stream until an idle connection times out.
        # Every read is followed by a drain of the connection's sockets: skipped when nothing
        # waits to be written (most reads), a fifth of mitmproxy's calls for a streamed event.
        handle = ClientConnection.of(client)
        if handle is not None:
            handle.widen_upstream_slots(UPSTREAM_CONNECTIONS_PER_CLIENT)
            handle.drain_only_when_buffered()

    def server_connect(self, data: ServerConnectionHookData) -> None:
        if not data.server.alpn_offers:
            data.server.alpn_offers = UPSTREAM_ALPN

    def request(self, flow: http.HTTPFlow) -> None:
        info = self.connections.get(flow.client_conn)
        if info is not None and info.intercept:
            as_http1(flow.request)

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        info = self.connections.get(data.context.client)
        if info is not None and info.intercept:
            # mitmproxy's eager strategy would dial the original host to mirror its TLS before
            # answering the client; a MITM'd host must never be dialled.
            data.establish_server_tls_first = False

    def next_layer(self, nextlayer: NextLayer) -> None:
        # Runs after mitmproxy's own next_layer and overrides its decision.
        info = self.connections.get(nextlayer.context.client)
        if info is None or not info.established:
            return
        if not info.intercept:
            # A tunnel is a raw relay, whatever it carries; on the fast path once it can.
            on_handover = functools.partial(_fast_path_log, info.connect_id)
            install_tunnel_relay(nextlayer, on_handover, self.pipes)
            return
        skip_server_tls(nextlayer)
        http_layer = install_mitm_http_layer(nextlayer, self.stream_bounds, info.connect_id)
        if http_layer is not None:
            info.http_layer = http_layer


def _fast_path_log(connect_id: str, relay: str) -> None:
    log.debug("tunnel relayed on the fast path (%s)", relay, extra={"connect_id": connect_id})
