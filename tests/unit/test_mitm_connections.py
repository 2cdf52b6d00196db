"""A client connection's handler seen through aibridgeproxyd.mitm.connections, with a stand-in
for mitmproxy's proxy server."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from mitmproxy.test import taddons, tflow

from aibridgeproxyd.mitm.connections import ClientConnection, close_client, forget_transport
from tests.unit.fake_proxyserver import FakeHandler, FakeIO, FakeProxyserver


@pytest.fixture
def proxyserver() -> Iterator[FakeProxyserver]:
    server = FakeProxyserver()
    with taddons.context(server):
        yield server


class BufferingTransport(asyncio.WriteTransport):
    def __init__(self, buffered: int) -> None:
        super().__init__()
        self.buffered = buffered

    def get_write_buffer_size(self) -> int:
        return self.buffered


def handle(proxyserver: FakeProxyserver) -> tuple[ClientConnection, FakeHandler]:
    client = tflow.tclient_conn()
    handler = proxyserver.connect(client)
    found = ClientConnection.of(client)
    assert found is not None
    return found, handler


def test_a_connection_mitmproxy_does_not_know_has_no_handle(proxyserver: FakeProxyserver) -> None:
    assert ClientConnection.of(tflow.tclient_conn()) is None
    close_client(tflow.tclient_conn())  # nothing to close, nothing raised


def test_bytes_still_in_the_write_buffer_mean_still_sending(
    proxyserver: FakeProxyserver,
) -> None:
    connection, handler = handle(proxyserver)
    writer = handler.transports[handler.client].writer
    assert not connection.still_sending()  # no transport at all
    writer.transport = BufferingTransport(0)
    assert not connection.still_sending()
    writer.transport = BufferingTransport(10)
    assert connection.still_sending()


def test_last_activity_is_what_the_watchdog_recorded(proxyserver: FakeProxyserver) -> None:
    connection, handler = handle(proxyserver)
    handler.timeout_watchdog.last_activity = 1234.5
    assert connection.last_activity() == 1234.5


async def test_a_socket_whose_task_still_runs_is_left_to_that_task(
    proxyserver: FakeProxyserver,
) -> None:
    connection, handler = handle(proxyserver)
    server = tflow.tserver_conn()
    running = asyncio.create_task(asyncio.sleep(10))
    handler.transports[server] = FakeIO(handler=running)
    connection.close_leftover_socket(server)
    assert not handler.transports[server].writer.closed
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    connection.close_leftover_socket(server)
    assert handler.transports[server].writer.closed


def test_close_client_closes_the_client_side(proxyserver: FakeProxyserver) -> None:
    _, handler = handle(proxyserver)
    close_client(handler.client)
    assert handler.closed == [handler.client]


def test_a_cancelled_dial_is_forgotten(proxyserver: FakeProxyserver) -> None:
    _, handler = handle(proxyserver)
    server = tflow.tserver_conn()
    handler.transports[server] = FakeIO()
    forget_transport(handler.client, server)
    assert server not in handler.transports
