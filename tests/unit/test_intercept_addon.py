"""The intercept addon (MITM or tunnel once a CONNECT is accepted), the listener TLS addon and
the stall watch, one hook at a time with mitmproxy's test flows."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from aibridgeproxyd.addons.intercept import UPSTREAM_CONNECTIONS_PER_CLIENT, Intercept
from aibridgeproxyd.addons.listener_tls import ListenerTls
from aibridgeproxyd.addons.stalls import StallWatch
from mitmproxy import connection, options, tls
from mitmproxy.proxy import layers
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layer import NextLayer
from mitmproxy.proxy.layers import modes
from mitmproxy.proxy.layers.http import HTTPMode
from mitmproxy.proxy.server_hooks import ServerConnectionHookData
from mitmproxy.test import taddons, tflow

from aibridgeproxyd.interception.state import ConnectInfo, ConnectionTable
from aibridgeproxyd.metrics import Metrics
from aibridgeproxyd.mitm.http_layer import UPSTREAM_ALPN, AIBridgeHttpLayer
from aibridgeproxyd.mitm.stream_bounds import StreamBounds
from tests.unit.fake_proxyserver import FakeProxyserver


@pytest.fixture
def proxyserver() -> Iterator[FakeProxyserver]:
    server = FakeProxyserver()
    with taddons.context(server):
        yield server


def connect_flow(connections: ConnectionTable, *, intercept: bool) -> tflow.http.HTTPFlow:
    flow = tflow.tflow()
    flow.request.method = "CONNECT"
    flow.response = None
    connections.add(flow.client_conn, ConnectInfo(host="h.example", port=443, intercept=intercept))
    return flow


def sessions(metrics: Metrics, kind: str) -> float:
    value = metrics.registry.get_sample_value(
        "coder_aibridgeproxyd_connect_sessions_total", {"type": kind}
    )
    return value or 0.0


def test_a_mitm_connect_is_answered_without_dialling_and_a_tunnel_is_not() -> None:
    connections = ConnectionTable()
    addon = Intercept(connections, Metrics())
    mitm, tunnel = (connect_flow(connections, intercept=i) for i in (True, False))
    addon.http_connect(mitm)
    addon.http_connect(tunnel)
    assert mitm.response is not None and mitm.response.status_code == 200
    assert mitm.response.reason == "Connection established" and not mitm.response.headers
    assert tunnel.response is None


def test_an_established_connect_is_counted_by_kind() -> None:
    connections, metrics = ConnectionTable(), Metrics()
    addon = Intercept(connections, metrics)
    mitm, tunnel = (connect_flow(connections, intercept=i) for i in (True, False))
    addon.http_connected(mitm)
    addon.http_connected(tunnel)
    info = connections.get(mitm.client_conn)
    assert info is not None and info.established
    assert (sessions(metrics, "mitm"), sessions(metrics, "tunneled")) == (1, 1)


def test_a_client_may_hold_more_upstream_connections_per_address(
    proxyserver: FakeProxyserver,
) -> None:
    client = tflow.tclient_conn()
    handler = proxyserver.connect(client)
    Intercept(ConnectionTable(), Metrics()).client_connected(client)
    assert handler.max_conns[("api.example", 443)]._value == UPSTREAM_CONNECTIONS_PER_CLIENT


def test_upstream_connections_offer_http1_only() -> None:
    data = ServerConnectionHookData(
        server=connection.Server(address=("api.example", 443)), client=tflow.tclient_conn()
    )
    Intercept(ConnectionTable(), Metrics()).server_connect(data)
    assert data.server.alpn_offers == UPSTREAM_ALPN


def test_a_mitm_host_is_never_dialled_to_mirror_its_tls() -> None:
    connections = ConnectionTable()
    client = tflow.tclient_conn()
    connections.add(client, ConnectInfo(host="h.example", port=443, intercept=True))
    data = tls.ClientHelloData(Context(client, options.Options()), None)  # type: ignore[arg-type]
    data.establish_server_tls_first = True
    Intercept(connections, Metrics()).tls_clienthello(data)
    assert data.establish_server_tls_first is False


def proposed(client: connection.Client, layer_class: type, *args: object) -> NextLayer:
    context = Context(client, options.Options())
    nextlayer = NextLayer(context)
    nextlayer.layer = layer_class(context, *args)
    return nextlayer


def test_inside_a_mitm_tunnel_our_http_layer_replaces_mitmproxys() -> None:
    connections = ConnectionTable()
    client = tflow.tclient_conn()
    info = ConnectInfo(host="h.example", port=443, intercept=True, established=True)
    connections.add(client, info)
    bounds = StreamBounds(http2_max_resets=3)
    nextlayer = proposed(client, layers.HttpLayer, HTTPMode.transparent)
    Intercept(connections, Metrics(), bounds).next_layer(nextlayer)
    http_layer = nextlayer.layer
    assert isinstance(http_layer, AIBridgeHttpLayer) and info.http_layer is http_layer
    assert http_layer.stream_bounds is bounds and http_layer.connect_id == info.connect_id
    assert nextlayer.context.layers == [http_layer]


def test_a_mitm_tunnels_client_tls_starts_without_the_server_tls_layer_above_it() -> None:
    """The CONNECT's own server is never dialled for a MITM'd host: mitmproxy's ServerTLSLayer
    above the client's TLS would only pass every event and command through."""
    connections = ConnectionTable()
    client = tflow.tclient_conn()
    connections.add(
        client, ConnectInfo(host="h.example", port=443, intercept=True, established=True)
    )
    context = Context(client, options.Options())
    nextlayer = NextLayer(context)
    server_tls = layers.ServerTLSLayer(context)
    server_tls.child_layer = client_tls = layers.ClientTLSLayer(context)
    nextlayer.layer = server_tls
    Intercept(connections, Metrics()).next_layer(nextlayer)
    assert nextlayer.layer is client_tls and server_tls not in context.layers
    # A tunnel's layers and layers of a connection not yet established are left alone.
    for info in (
        ConnectInfo(host="h.example", port=443, intercept=True),
        ConnectInfo(host="h.example", port=443, established=True),
    ):
        connections = ConnectionTable()
        connections.add(client, info)
        nextlayer.layer = server_tls
        Intercept(connections, Metrics()).next_layer(nextlayer)
        assert nextlayer.layer is not client_tls


def test_a_tunnel_is_relayed_raw_whatever_mitmproxy_proposed() -> None:
    connections = ConnectionTable()
    client = tflow.tclient_conn()
    connections.add(client, ConnectInfo(host="h.example", port=443, established=True))
    nextlayer = proposed(client, layers.HttpLayer, HTTPMode.transparent)
    Intercept(connections, Metrics()).next_layer(nextlayer)
    # ignore=True: no flow, so no tcp hooks and nothing recorded.
    assert isinstance(nextlayer.layer, layers.TCPLayer) and nextlayer.layer.flow is None


def test_layers_before_the_connect_is_answered_are_left_alone() -> None:
    connections = ConnectionTable()
    client = tflow.tclient_conn()
    connections.add(client, ConnectInfo(host="h.example", port=443, intercept=True))
    nextlayer = proposed(client, layers.HttpLayer, HTTPMode.regular)
    original = nextlayer.layer
    Intercept(connections, Metrics()).next_layer(nextlayer)
    assert nextlayer.layer is original


# --- listener TLS --------------------------------------------------------------------------


@pytest.fixture
def listener_tls(tmp_path: Path) -> ListenerTls:
    leaf = trustme.CA().issue_cert("proxy.example")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    return ListenerTls(cert, key)


def tls_start(*, inside_tunnel: bool) -> tls.TlsData:
    client = tflow.tclient_conn()
    context = Context(client, options.Options())
    modes.HttpProxy(context)
    if inside_tunnel:
        context.server.address = ("api.example", 443)
    return tls.TlsData(client, context)


def test_the_listener_handshake_uses_the_operator_certificate(listener_tls: ListenerTls) -> None:
    data = tls_start(inside_tunnel=False)
    listener_tls.tls_start_client(data)
    assert data.ssl_conn is not None and data.ssl_conn.get_context() is listener_tls.context


def test_a_mitm_tunnel_handshake_is_left_to_the_ca(listener_tls: ListenerTls) -> None:
    data = tls_start(inside_tunnel=True)
    listener_tls.tls_start_client(data)
    assert data.ssl_conn is None


# --- stall watch ---------------------------------------------------------------------------


class StalledLayer(AIBridgeHttpLayer):
    """An HTTP layer whose stream 1 has a response its client stopped reading."""

    def __init__(self, client: connection.Client) -> None:
        super().__init__(Context(client, options.Options()), HTTPMode.transparent)
        self.flow = tflow.tflow(client_conn=client)

    def unread_response_streams(self) -> list[tuple[int, tflow.http.HTTPFlow]]:
        return [(1, self.flow)]


def stalled(connections: ConnectionTable, proxyserver: FakeProxyserver) -> StalledLayer:
    client = tflow.tclient_conn()
    proxyserver.connect(client)
    layer = StalledLayer(client)
    connections.add(client, ConnectInfo(host="h.example", port=443, http_layer=layer))
    return layer


def test_a_stream_unread_for_the_stall_timeout_has_its_upstream_closed(
    proxyserver: FakeProxyserver,
) -> None:
    connections = ConnectionTable()
    layer = stalled(connections, proxyserver)
    watch = StallWatch(connections, stall_timeout=10)
    assert watch.check(now=100.0) == 0
    assert watch.check(now=109.0) == 0
    assert watch.check(now=110.0) == 1
    handler = proxyserver.connections[layer.context.client.id]
    assert handler.closed == [layer.flow.server_conn]


def test_a_stream_that_is_read_again_starts_over(proxyserver: FakeProxyserver) -> None:
    connections = ConnectionTable()
    layer = stalled(connections, proxyserver)
    watch = StallWatch(connections, stall_timeout=10)
    watch.check(now=100.0)
    layer.unread_response_streams = lambda: []  # type: ignore[method-assign]
    watch.check(now=105.0)
    del layer.unread_response_streams
    assert watch.check(now=112.0) == 0
