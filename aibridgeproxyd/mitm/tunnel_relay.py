"""The fast path of a tunnel: bytes go socket to socket, outside mitmproxy's layers.

mitmproxy relays an ignored tunnel through its layers: its connection handler reads at most
64 KiB per ``reader.read()``, and each chunk becomes an event, a ``SendData`` command and a
drain of every writer of the connection (about 2 ms of CPU per MiB, bench/RESULTS.md). Once a
tunnel's CONNECT has been answered (destination checked and pinned, proxy auth passed), its two
sockets are handed to a pair of asyncio protocols (``_Relay``) that write each chunk the
transport read (up to 256 KiB) straight to the other transport, with the transports' own flow
control: a full write buffer on one side pauses reading on the other.

The handover changes nothing else mitmproxy sees. ``FastTunnelLayer`` stays the connection's
layer and keeps relaying like ``TCPLayer(ignore=True)`` until both connections are quiet: both
reader tasks wait in ``reader.read()`` with nothing buffered (``StreamReader._waiter`` set,
``_buffer`` empty), so every byte mitmproxy read has been written on. Only then are the
transports' protocols swapped, synchronously, so no byte can overtake another. After it:

- each chunk records activity on mitmproxy's timeout watchdog, which the idle timeout reads;
- an end of stream half-closes the other side at once; once both sides ended, the end of
  stream is passed on to both old stream reader protocols, and a lost connection to its own,
  so mitmproxy's reader tasks see them as they would have, and the layer closes the connections
  as ``TCPLayer`` does (client and server disconnect hooks, connection counts and the drain are
  unchanged);
- pausing and resuming writes are passed on too, so a ``writer.drain()`` never waits forever.

Then the bytes themselves: where Linux offers ``splice(2)``, a ``SpliceRelay``
(``aibridgeproxyd.mitm.splice_relay``) moves them socket -> pipe -> socket without copying them
to user space (about half the CPU per MiB), with the ``_Relay`` protocols still the transports'
protocols: it ends each direction through their ``eof_received`` and they report a lost
connection, so everything above holds. The copying ``_Relay`` moves them otherwise (splice
unavailable or off, no pipes within the descriptor budget, bytes still in a transport's write
buffer at the handover) and takes over from a splice relay when a connection is lost or a splice
fails. ``on_handover`` is told which: ``"splice"`` or ``"copy"``.

Ends of stream, before and after the handover. ``TCPLayer`` answers one side's end of stream
with ``CloseTcpConnection(other, half_close=True)``, but in a CONNECT tunnel mitmproxy's
``HttpStream.passthrough`` turns that into a full close of the other connection ("always full
close for now"): a client that sends its request and half-closes before the handover would
lose the whole answer, a server that answers and half-closes first the rest of the request.
So ``FastTunnelLayer`` carries the half-close out itself on the connection handler
(``close_connection(other, half_close=True)``, what mitmproxy does with the command outside
HTTP): the other direction carries on until its own end. A side that was reset (its reader
holds the error) is not an end of stream: the other side is reset too (``SO_LINGER`` 0) and
closed. Bare mitmproxy (``ignore_hosts``) has the same fault, on every tunnel and not only
before a handover.

The swap is skipped, and the layer keeps relaying as ``TCPLayer``, when either side carries TLS
that mitmproxy terminates (a TLS listener), when the server connection goes through a corporate
proxy, or when the transports are not asyncio socket transports.

Private attributes used: ``StreamReader._waiter`` and ``_buffer`` (whether a reader task waits
with nothing buffered) and the connection handler's ``transports``, ``timeout_watchdog`` and
``close_connection`` (``aibridgeproxyd.mitm.connections``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import struct
from collections.abc import Callable

from mitmproxy import connection
from mitmproxy.proxy import commands, events, layer, layers
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.server import ConnectionHandler

from aibridgeproxyd.mitm.connections import connection_handler
from aibridgeproxyd.mitm.splice_relay import SplicePipes, SpliceRelay

log = logging.getLogger("aibridgeproxyd.tunnel")


class _Relay(asyncio.Protocol):
    """The protocol of one side's transport after the handover: what it reads is written to
    ``peer``. Its end of stream half-closes ``peer`` (the other direction carries on); once both
    sides ended (``both_ended``), or as soon as one is lost, mitmproxy is told through ``old``,
    the ``StreamReaderProtocol`` its reader task listens to, and closes the tunnel as it
    would."""

    def __init__(
        self,
        old: asyncio.BaseProtocol,
        peer: asyncio.Transport,
        activity: Callable[[], None],
    ) -> None:
        self.old = old
        self.peer = peer
        self.activity = activity
        self.other: _Relay | None = None  # the peer's relay, set once both exist
        self.both_ended: Callable[[], object] = lambda: None
        self.ended = False
        self.bytes = 0
        # A splice relay's error on this side, passed on when the transport reports the loss.
        self.error: Exception | None = None
        self.on_lost: Callable[[], None] = lambda: None  # a splice relay falls back

    def data_received(self, data: bytes) -> None:
        self.bytes += len(data)
        self.activity()
        if not self.peer.is_closing():
            self.peer.write(data)

    def eof_received(self) -> bool:
        self.ended = True
        if self.other is not None and self.other.ended:
            self.both_ended()
        elif not self.peer.is_closing() and self.peer.can_write_eof():
            self.peer.write_eof()
        return True  # keep this side open for the bytes still coming the other way

    def connection_lost(self, exc: Exception | None) -> None:
        self.ended = True
        self.on_lost()  # the socket is still open here: the splice relay leaves it first
        self.old.connection_lost(exc or self.error)

    # This side's write buffer is full: stop reading the side that fills it.
    def pause_writing(self) -> None:
        self.peer.pause_reading()
        self.old.pause_writing()

    def resume_writing(self) -> None:
        self.peer.resume_reading()
        self.old.resume_writing()


def _quiet(handler: ConnectionHandler, conn: connection.Connection) -> asyncio.Transport | None:
    """The transport of ``conn`` if its reader task waits for bytes with none buffered (every
    byte read so far was handed to the layers), else None."""
    io = handler.transports.get(conn)
    reader, writer = (io.reader, io.writer) if io is not None else (None, None)
    if not isinstance(reader, asyncio.StreamReader) or not isinstance(writer, asyncio.StreamWriter):
        return None
    # StreamReader keeps both private: its waiter is set only while read() waits on an empty
    # buffer.
    waiter: object = getattr(reader, "_waiter", None)
    buffered: object = getattr(reader, "_buffer", b"?")
    if waiter is None or buffered:
        return None
    if reader.at_eof():
        return None
    transport = writer.transport
    if not isinstance(transport, asyncio.Transport) or transport.is_closing():
        return None
    return transport


class FastTunnelLayer(layers.TCPLayer):
    """``TCPLayer(ignore=True)`` that hands its two sockets to ``_Relay`` protocols as soon as
    both are quiet (see the module docstring). ``on_handover`` is called once, after the swap."""

    def __init__(
        self,
        context: Context,
        on_handover: Callable[[str], None] | None = None,
        pipes: SplicePipes | None = None,
    ) -> None:
        super().__init__(context, ignore=True)
        self.on_handover = on_handover
        self.pipes = pipes
        self.relays: tuple[_Relay, _Relay] | None = None
        self.splice: SpliceRelay | None = None
        self._eligible = _eligible(context)
        # The sockets carry the tunnel's bytes as they are: a half-close on them is one on the
        # tunnel (not so under a TLS layer of mitmproxy's or through a corporate proxy).
        self._raw_sockets = self._eligible
        self._check_pending = False

    def handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        for command in super().handle_event(event):
            to = _half_closed(command) if self._raw_sockets else None
            if to is not None:
                yield from self._end_of_stream_to(to)
            else:
                yield command
        if self._eligible and self.relays is None and not self._check_pending:
            # After this event the reader task goes back to reader.read(): check then.
            self._check_pending = True
            asyncio.get_running_loop().call_soon(self._try_handover)

    def _end_of_stream_to(self, conn: connection.Connection) -> layer.CommandGenerator[None]:
        """The other side of ``conn`` ended its stream: half-close ``conn`` on the connection
        handler (the ``CloseTcpConnection`` would become a full close, see the module
        docstring). That side was reset: reset ``conn`` and close it; closed by mitmproxy (the
        idle timeout, the drain): close ``conn`` too."""
        handler = connection_handler(self.context.client)
        if handler is None:  # no handler to act on: mitmproxy's own handling
            yield commands.CloseTcpConnection(conn, half_close=True)
            return
        source = self.context.server if conn is self.context.client else self.context.client
        reset = _was_reset(handler, source)
        if source.state is connection.ConnectionState.CAN_WRITE and not reset:
            handler.close_connection(conn, half_close=True)
            return
        if reset:
            _reset(_transport(handler, conn))
        yield commands.CloseConnection(conn)

    def _try_handover(self) -> None:
        # A loop callback, not a hook: no fail-closed guard sees it, so it fails closed itself.
        # A failed swap may have left one socket with each owner: the tunnel is closed.
        self._check_pending = False
        try:
            self._handover_if_quiet()
        except Exception:
            log.exception("tunnel fast path handover failed; closing the tunnel")
            self._eligible = False
            handler = connection_handler(self.context.client)
            if handler is not None:
                handler.close_connection(self.context.client)

    def _handover_if_quiet(self) -> None:
        client, server = self.context.client, self.context.server
        if client.state is not connection.ConnectionState.OPEN:
            self._eligible = False
            return
        if server.state is not connection.ConnectionState.OPEN:
            self._eligible = False
            return
        handler = connection_handler(client)
        if handler is None:
            return
        client_side, server_side = _quiet(handler, client), _quiet(handler, server)
        if client_side is None or server_side is None:
            return  # bytes in flight: the next event checks again
        self._swap(handler, client_side, server_side)

    def _swap(
        self,
        handler: ConnectionHandler,
        client_side: asyncio.Transport,
        server_side: asyncio.Transport,
    ) -> None:
        activity = handler.timeout_watchdog.register_activity
        up = _Relay(client_side.get_protocol(), server_side, activity)
        down = _Relay(server_side.get_protocol(), client_side, activity)
        up.other, down.other = down, up
        # Both directions done: mitmproxy sees both ends of stream and closes the tunnel.
        up.both_ended = down.both_ended = functools.partial(_tell_both_ended, up, down)
        client_side.set_protocol(up)
        server_side.set_protocol(down)
        self.relays = (up, down)
        self.splice = _splice_relay(self.pipes, up, down)
        if self.splice is not None:
            up.on_lost = down.on_lost = self.splice.fall_back
            if not self.splice.start():
                self.splice = None
        if self.splice is None:
            _copy_flow_control(client_side, server_side)
        if self.on_handover is not None:
            self.on_handover("splice" if self.splice is not None else "copy")


def _tell_both_ended(up: _Relay, down: _Relay) -> None:
    """Pass both ends of stream on to mitmproxy's reader tasks, client first."""
    for relay in (up, down):
        eof_received = getattr(relay.old, "eof_received", None)
        if eof_received is not None:
            eof_received()


def _half_closed(command: commands.Command) -> connection.Connection | None:
    """The connection ``command`` half-closes, if it is ``CloseTcpConnection(half_close=True)``."""
    if isinstance(command, commands.CloseTcpConnection) and command.half_close:
        return command.connection
    return None


def _transport(handler: ConnectionHandler, conn: connection.Connection) -> asyncio.Transport | None:
    """The asyncio transport of ``conn``, or None (none open, or not a socket)."""
    io = handler.transports.get(conn)
    transport = getattr(io.writer, "transport", None) if io is not None else None
    return transport if isinstance(transport, asyncio.Transport) else None


def _was_reset(handler: ConnectionHandler, conn: connection.Connection) -> bool:
    """Whether ``conn``'s reader ended with an error (a reset, a lost connection: the error
    ``connection_lost`` gave it) rather than an end of stream. mitmproxy's reader task ends the
    same way on both, so its ``ConnectionClosed`` does not tell."""
    io = handler.transports.get(conn)
    reader = io.reader if io is not None else None
    return isinstance(reader, asyncio.StreamReader) and reader.exception() is not None


def _reset(transport: asyncio.Transport | None) -> None:
    """Close ``transport``'s socket with a reset: ``SO_LINGER`` 0, then ``abort`` (which alone
    would send a FIN); its unsent bytes are dropped, as a reset drops them."""
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def _copy_flow_control(client_side: asyncio.Transport, server_side: asyncio.Transport) -> None:
    """Start the copying relay: each side reads unless the other's write buffer is full."""
    for reading, writing in ((client_side, server_side), (server_side, client_side)):
        if writing.get_write_buffer_size() > writing.get_write_buffer_limits()[1]:
            reading.pause_reading()
        else:
            reading.resume_reading()


def _splice_relay(pipes: SplicePipes | None, up: _Relay, down: _Relay) -> SpliceRelay | None:
    """A splice relay for the tunnel (not started), or None when it takes the copying relay:
    no pipes to give, or bytes still waiting in a transport's write buffer (spliced bytes would
    overtake them)."""
    if pipes is None or not pipes.enabled:
        return None
    if up.peer.get_write_buffer_size() or down.peer.get_write_buffer_size():
        return None
    pair = pipes.take()
    if pair is None:
        return None
    try:
        return SpliceRelay(pipes, pair, up, down)
    except BaseException:
        pipes.give_back(pair)  # the handover fails closed: its pipes must not outlive it
        raise


def _eligible(context: Context) -> bool:
    """Whether the tunnel's bytes are the sockets' bytes: no TLS layer of mitmproxy's on the
    stack (a TLS listener), no corporate proxy in between. (The ``tls`` flags of the connections
    do not tell: the TLS layers mitmproxy proposed and we replaced have set them.)"""
    tls_layers = (layers.ClientTLSLayer, layers.ServerTLSLayer)
    on_stack = any(isinstance(each, tls_layers) for each in context.layers)
    return not on_stack and context.server.via is None


__all__ = ["FastTunnelLayer"]
