"""MITM or tunnel, once the CONNECT is accepted.

For a MITM'd host the CONNECT is answered without dialling the original host: the adapter
decides the upstream per request, so the original host is never contacted. Tunnels are relayed
byte for byte, whatever they carry (TLS or not), and are never decrypted.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time

from mitmproxy import connection, ctx, http, tls
from mitmproxy.proxy import layer, layers, server_hooks

from aibridgeproxyd.interception.state import ConnectionTable
from aibridgeproxyd.metrics import Metrics
from aibridgeproxyd.mitm.http_layer import UPSTREAM_ALPN, AIBridgeHttpLayer, as_http1
from aibridgeproxyd.mitm.stream_bounds import DEFAULT_BOUNDS, StreamBounds

log = logging.getLogger("aibridgeproxyd.connect")

# Concurrent upstream connections one client connection may hold per upstream address.
UPSTREAM_CONNECTIONS_PER_CLIENT = 64


def connection_established(flow: http.HTTPFlow) -> http.Response:
    # The same bare 200 mitmproxy sends itself (no headers: some clients choke on them).
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


class Intercept:
    def __init__(
        self,
        connections: ConnectionTable,
        metrics: Metrics,
        stream_bounds: StreamBounds = DEFAULT_BOUNDS,
    ) -> None:
        self.connections = connections
        self.metrics = metrics
        self.stream_bounds = stream_bounds

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
        handler = ctx.master.addons.get("proxyserver").connections.get(client.id)
        if handler is not None:
            handler.max_conns = collections.defaultdict(
                lambda: asyncio.Semaphore(UPSTREAM_CONNECTIONS_PER_CLIENT)
            )

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
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

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        # Runs after mitmproxy's own next_layer and overrides its decision.
        info = self.connections.get(nextlayer.context.client)
        if info is None or not info.established:
            return
        if info.intercept:
            if type(nextlayer.layer) is layers.HttpLayer:
                mode = nextlayer.layer.mode
                http_layer = AIBridgeHttpLayer(_detached(nextlayer), mode)
                http_layer.stream_bounds = self.stream_bounds
                http_layer.connect_id = info.connect_id
                nextlayer.layer = info.http_layer = http_layer
        else:
            # A tunnel is a raw relay, whatever it carries.
            nextlayer.layer = layers.TCPLayer(_detached(nextlayer), ignore=True)


def _detached(nextlayer: layer.NextLayer):  # type: ignore[no-untyped-def]
    """The context with the layers mitmproxy proposed taken off its stack again."""
    proposed = nextlayer.layer
    while proposed is not None:
        if proposed in nextlayer.context.layers:
            nextlayer.context.layers.remove(proposed)
        proposed = getattr(proposed, "child_layer", None)
    return nextlayer.context
