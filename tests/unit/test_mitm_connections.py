"""A client connection's handler seen through aibridgeproxyd.mitm.connections, with a stand-in
for mitmproxy's proxy server."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest
from mitmproxy.proxy.server import ConnectionIO
from mitmproxy.test import taddons, tflow

from aibridgeproxyd.mitm.connections import (
    ClientConnection,
    close_client,
    drain_when_buffered,
    forget_transport,
)
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


class _DrainingHandler:
    """What mitmproxy's ``ConnectionHandler.drain_writers`` uses of a handler: its sockets'
    streams and its drain lock."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        io = ConnectionIO()
        io.writer = writer
        self.transports = {tflow.tclient_conn(): io, tflow.tserver_conn(): ConnectionIO()}
        self._drain_lock = asyncio.Lock()


async def _stream_pair() -> tuple[asyncio.StreamWriter, asyncio.StreamReader, object]:
    """A writer, and the reader at the other end (with its writer: a writer that is collected
    closes its socket)."""
    near, far = socket.socketpair()
    _, writer = await asyncio.open_connection(sock=near)
    reader, far_writer = await asyncio.open_connection(sock=far)
    return writer, reader, far_writer


async def test_the_drain_after_a_read_is_skipped_only_when_nothing_waits_to_be_written() -> None:
    writer, peer, _far = await _stream_pair()
    handler = _DrainingHandler(writer)
    await handler._drain_lock.acquire()  # mitmproxy's drain would wait for the lock
    await asyncio.wait_for(drain_when_buffered(handler), 1)  # type: ignore[arg-type]
    writer.write(b"x" * (8 << 20))  # the peer reads nothing yet: most of it stays buffered
    assert writer.transport.get_write_buffer_size() > 0
    drained = asyncio.create_task(drain_when_buffered(handler))  # type: ignore[arg-type]
    await asyncio.sleep(0.05)
    assert not drained.done()  # mitmproxy's way: the lock first
    handler._drain_lock.release()
    await asyncio.sleep(0.05)
    assert not drained.done()  # then the drain, above the high-water mark
    await peer.readexactly(8 << 20)
    await asyncio.wait_for(drained, 5)
    writer.close()


async def test_a_closing_socket_takes_mitmproxys_drain() -> None:
    writer, _peer, _far = await _stream_pair()
    handler = _DrainingHandler(writer)
    writer.close()
    await handler._drain_lock.acquire()
    drained = asyncio.create_task(drain_when_buffered(handler))  # type: ignore[arg-type]
    await asyncio.sleep(0.05)
    assert not drained.done()  # waits for the lock: the closing socket's error is mitmproxy's
    handler._drain_lock.release()
    await asyncio.wait_for(drained, 5)  # its OSError cancels nothing here (no handler task)
