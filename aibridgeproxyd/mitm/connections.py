"""mitmproxy's handler of a client connection, seen through what the addons need of it.

mitmproxy runs one ``ConnectionHandler`` per client connection (``Proxyserver.connections``,
keyed by client id). Its sockets (``transports``), its activity watchdog and its per-address
connection slots (``max_conns``) are internals with no addon API; this module is the one place
that touches them: writing a refusal before the close, closing a client or one of its upstream
connections, reading when it last saw a byte, the drain after each read skipped when nothing
waits to be written, and the repairs below for sockets and records mitmproxy 12.3 leaves
behind.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools

from mitmproxy import connection
from mitmproxy import ctx as mitmproxy_ctx
from mitmproxy.proxy.server import ConnectionHandler


def connection_handler(client: connection.Connection) -> ConnectionHandler | None:
    """mitmproxy's handler of ``client``'s connection, or None when it has no record of it."""
    master = getattr(mitmproxy_ctx, "master", None)
    proxyserver = master.addons.get("proxyserver") if master is not None else None
    return proxyserver.connections.get(client.id) if proxyserver is not None else None


class ClientConnection:
    """One client connection's handler (``ClientConnection.of(client)``); holding it keeps no
    more alive than mitmproxy's own record of the connection does."""

    __slots__ = ("_handler",)

    def __init__(self, handler: ConnectionHandler) -> None:
        self._handler = handler

    @classmethod
    def of(cls, client: connection.Connection) -> ClientConnection | None:
        """The handler of ``client``, or None when mitmproxy has no record of it (closed, or a
        test without a proxy server)."""
        handler = connection_handler(client)
        return cls(handler) if handler is not None else None

    @property
    def client(self) -> connection.Client:
        return self._handler.client

    def write(self, data: bytes) -> None:
        """Write ``data`` to the client socket now, bypassing the layers (an answer to a
        connection refused before any layer read from it). Best effort: a client that already
        sent its request may see a reset instead."""
        with contextlib.suppress(Exception):
            writer = self._handler.transports[self._handler.client].writer
            if writer is not None:
                writer.write(data)

    def close(self) -> None:
        """Close the client connection (mitmproxy cancels its tasks; the disconnect hooks still
        run), the way a graceful stop does."""
        self._handler.close_connection(self._handler.client)

    def close_upstream(self, server: connection.Server) -> None:
        """Close one upstream connection of this client; the flows on it end like an upstream
        abort."""
        self._handler.close_connection(server)

    def last_activity(self) -> float | None:
        """``time.time()`` of the last event on the connection, bytes either way included, as
        mitmproxy's timeout watchdog recorded it; None if it records none."""
        return getattr(self._handler.timeout_watchdog, "last_activity", None)

    def transport(self, conn: connection.Connection) -> asyncio.BaseTransport | None:
        """The asyncio transport of ``conn`` (the client or one of its upstream connections),
        or None when it has none (closed, not yet open, or not a TCP socket)."""
        io = self._handler.transports.get(conn)
        return getattr(io.writer, "transport", None) if io is not None else None

    def still_sending(self) -> bool:
        """Whether bytes for the client still wait in its socket's write buffer."""
        transport = self.transport(self._handler.client)
        return isinstance(transport, asyncio.WriteTransport) and bool(
            transport.get_write_buffer_size()
        )

    def widen_upstream_slots(self, per_address: int) -> None:
        """Let this client hold up to ``per_address`` upstream connections per upstream address
        at once (mitmproxy: 5). mitmproxy holds a slot for an upstream connection's whole life,
        idle in its pool included."""
        self._handler.max_conns = collections.defaultdict(lambda: asyncio.Semaphore(per_address))

    def drain_only_when_buffered(self) -> None:
        """Have the handler skip its drain after a read when there is nothing to drain
        (``drain_when_buffered``): it runs after every read of every connection."""
        drain = functools.partial(drain_when_buffered, self._handler)
        self._handler.drain_writers = drain  # type: ignore[method-assign]

    def close_leftover_socket(self, conn: connection.Connection) -> None:
        """Close a socket mitmproxy's connection handler left open.

        mitmproxy 12.3 closes a connection by cancelling its reader task; when that task is
        waiting for the handler's event lock at that moment (another task, such as a hook's, is
        delivering an event that closes the connection), the cancellation escapes
        ``handle_connection`` before its ``writer.close()``. The task ends, the disconnect hooks
        run, and the socket stays open until garbage collection: file descriptors pile up under
        a storm of refused requests. Call it from the disconnect hooks."""
        io = self._handler.transports.get(conn)
        if io is None or io.writer is None:
            return
        task = io.handler
        # The hook runs in the finished client task's caller, or inside a server connection's
        # task after its handle_connection returned: either way nobody else closes the socket.
        if task is not None and not task.done() and task is not asyncio.current_task():
            return
        with contextlib.suppress(Exception):
            if not io.writer.is_closing():
                io.writer.close()


async def drain_when_buffered(handler: ConnectionHandler) -> None:
    """mitmproxy's ``ConnectionHandler.drain_writers``, which ``handle_connection`` awaits after
    every read (the handler's drain lock, then each socket's ``StreamWriter.drain``), unless it
    would wait for nothing: every socket's write buffer empty and none closing. ``drain`` returns
    at once then (asyncio pauses a writer only above its buffer's high-water mark, and raises
    only once the connection was lost, which leaves the transport closing). Sockets that are
    not asyncio streams always take mitmproxy's way."""
    for io in handler.transports.values():
        writer = io.writer
        if writer is None:
            continue
        if type(writer) is not asyncio.StreamWriter:
            return await ConnectionHandler.drain_writers(handler)
        transport = writer.transport
        if transport.get_write_buffer_size() or transport.is_closing():
            return await ConnectionHandler.drain_writers(handler)


def close_client(client: connection.Client | None) -> None:
    """Close a client connection from inside a hook (the same call a graceful stop uses);
    nothing happens when mitmproxy has no record of it."""
    if client is None:
        return
    try:
        handle = ClientConnection.of(client)
    except Exception:
        return
    if handle is not None:
        handle.close()


def forget_transport(client: connection.Client, conn: connection.Connection) -> None:
    """Drop the proxy server's record of a dial cancelled before it connected. Its task ends
    without removing the record (mitmproxy 12.3 ``ConnectionHandler.open_connection``), which
    would otherwise stay until the client connection closes."""
    handler = connection_handler(client)
    if handler is not None:
        handler.transports.pop(conn, None)


__all__ = [
    "ClientConnection",
    "close_client",
    "connection_handler",
    "drain_when_buffered",
    "forget_transport",
]
