"""The client limits addon, one hook at a time: connection caps, the bounded layers it installs
and the head/idle deadlines, with a stand-in for mitmproxy's proxy server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from aibridgeproxyd.addons import client_limits
from aibridgeproxyd.addons.client_limits import ClientLimits
from mitmproxy import options
from mitmproxy.proxy import layers
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layer import NextLayer
from mitmproxy.proxy.layers import modes
from mitmproxy.proxy.layers.http import HTTPMode
from mitmproxy.test import taddons, tflow

from aibridgeproxyd.adapters import ADAPTERS
from aibridgeproxyd.interception.state import ConnectInfo, ConnectionTable
from aibridgeproxyd.metrics import Metrics
from aibridgeproxyd.mitm.client_bounds import BoundedClientTLSLayer, BoundedHttpLayer
from aibridgeproxyd.reload import SnapshotHolder
from aibridgeproxyd.snapshot import build_snapshot
from tests.unit.fake_proxyserver import FakeProxyserver
from tests.unit.test_adapters_common import routed


@pytest.fixture
def proxyserver() -> Iterator[FakeProxyserver]:
    server = FakeProxyserver()
    with taddons.context(server):
        yield server


def limits(metrics: Metrics, **kwargs: float) -> ClientLimits:
    settings: dict[str, float] = {
        "max_connections": 2,
        "request_head_timeout": 30.0,
        "idle_timeout": 30.0,
    }
    settings.update(kwargs)
    return ClientLimits(
        SnapshotHolder(),
        ConnectionTable(),
        metrics,
        max_connections=int(settings.pop("max_connections")),
        max_connections_per_address=int(settings.pop("max_connections_per_address", 0)) or None,
        **settings,
    )


def closed_for(metrics: Metrics, reason: str) -> float:
    value = metrics.registry.get_sample_value(
        "coder_aibridgeproxyd_client_connections_closed_total", {"reason": reason}
    )
    return value or 0.0


def client_from(address: str) -> tflow.connection.Client:
    client = tflow.tclient_conn()
    client.peername = (address, 40000)
    return client


async def test_a_connection_beyond_max_connections_gets_503_and_is_refused(
    proxyserver: FakeProxyserver,
) -> None:
    metrics = Metrics()
    addon = limits(metrics, max_connections=1)
    first, second = client_from("10.0.0.1"), client_from("10.0.0.2")
    proxyserver.connect(first)
    refused = proxyserver.connect(second)
    addon.client_connected(first)
    addon.client_connected(second)
    assert first.error is None
    assert second.error == "too many connections (max_connections)"
    assert bytes(refused.transports[second].writer.written).startswith(b"HTTP/1.1 503 ")
    assert closed_for(metrics, "max_connections") == 1


async def test_one_address_cannot_take_every_slot(proxyserver: FakeProxyserver) -> None:
    metrics = Metrics()
    addon = limits(metrics, max_connections=10, max_connections_per_address=1)
    first, same, other = client_from("10.0.0.1"), client_from("10.0.0.1"), client_from("10.0.0.2")
    for client in (first, same, other):
        proxyserver.connect(client)
        addon.client_connected(client)
    assert (first.error, other.error) == (None, None)
    assert same.error == "too many connections (max_connections_per_address)"
    assert closed_for(metrics, "max_connections_per_address") == 1


async def test_a_closed_connection_frees_its_slot_and_its_leftover_socket(
    proxyserver: FakeProxyserver,
) -> None:
    addon = limits(Metrics(), max_connections=1)
    first, second = client_from("10.0.0.1"), client_from("10.0.0.1")
    handler = proxyserver.connect(first)
    addon.client_connected(first)
    addon.client_disconnected(first)
    assert handler.transports[first].writer.closed
    proxyserver.connect(second)
    addon.client_connected(second)
    assert second.error is None


async def test_on_a_plain_tls_listener_the_refusal_writes_nothing(
    proxyserver: FakeProxyserver,
) -> None:
    addon = limits(Metrics(), max_connections=0)
    addon.plain_listener = False
    client = client_from("10.0.0.1")
    handler = proxyserver.connect(client)
    addon.client_connected(client)
    assert client.error is not None and not handler.transports[client].writer.written


async def test_a_head_that_never_completes_is_cut_off_at_the_deadline(
    proxyserver: FakeProxyserver,
) -> None:
    metrics = Metrics()
    addon = limits(metrics, request_head_timeout=0.05)
    client = client_from("10.0.0.1")
    handler = proxyserver.connect(client)
    addon.client_connected(client)
    deadline = time.monotonic() + 5
    while not handler.closed and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert handler.closed == [client]
    assert closed_for(metrics, "request_head_timeout") == 1
    addon.client_disconnected(client)


async def test_no_deadline_runs_while_a_request_is_in_flight(
    proxyserver: FakeProxyserver,
) -> None:
    addon = limits(Metrics(), request_head_timeout=0.05)
    flow = tflow.tflow()
    handler = proxyserver.connect(flow.client_conn)
    addon.client_connected(flow.client_conn)
    addon.requestheaders(flow)
    watch = addon.watches[flow.client_conn.id]
    deadline = time.monotonic() + 5
    while watch.timer is not None and time.monotonic() < deadline:  # the head timer fires
        await asyncio.sleep(0.01)
    assert watch.timer is None and handler.closed == []
    addon.client_disconnected(flow.client_conn)


def test_listener_layers_are_swapped_for_bounded_ones() -> None:
    context = Context(tflow.tclient_conn(), options.Options())
    proxy_mode = modes.HttpProxy(context)
    nextlayer = NextLayer(context)
    tls_layer = layers.ClientTLSLayer(context)
    tls_layer.child_layer = layers.HttpLayer(context, HTTPMode.regular)
    nextlayer.layer = tls_layer
    limits(Metrics()).next_layer(nextlayer)
    assert type(nextlayer.layer) is BoundedClientTLSLayer
    child = nextlayer.layer.child_layer
    assert type(child) is BoundedHttpLayer and child.mode is HTTPMode.regular
    assert context.layers == [proxy_mode, nextlayer.layer, child]


def test_a_mitm_layer_answers_its_refusals_in_the_provider_format() -> None:
    holder = SnapshotHolder()
    holder.current = build_snapshot([routed("anthropic", keys=("k",))], [])
    connections = ConnectionTable()
    client = tflow.tclient_conn()
    connections.add(client, ConnectInfo(host="api.anthropic.com", port=443, intercept=True))
    addon = ClientLimits(
        holder, connections, Metrics(), max_connections=1, request_head_timeout=1, idle_timeout=1
    )
    context = Context(client, options.Options())
    nextlayer = NextLayer(context)
    nextlayer.layer = mitm_layer = BoundedHttpLayer(context, HTTPMode.transparent)
    addon.next_layer(nextlayer)
    assert mitm_layer.error_format == ADAPTERS["anthropic"].client_format


async def test_a_timeout_check_that_raises_closes_the_connection(
    proxyserver: FakeProxyserver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The head/idle timer runs outside every hook, so the fail-closed guard never sees it: a
    check that raises there closes the connection instead of leaving it without a deadline (a
    slowloris client would otherwise keep its slot; found by a security review)."""

    def broken(*_args: object) -> None:
        raise RuntimeError("bug in the timeout rules")

    monkeypatch.setattr(client_limits, "on_timer", broken)
    addon = limits(Metrics(), request_head_timeout=0.05)
    client = client_from("10.0.0.1")
    handler = proxyserver.connect(client)
    addon.client_connected(client)
    deadline = time.monotonic() + 5
    while not handler.closed and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert handler.closed == [client]
    addon.client_disconnected(client)
