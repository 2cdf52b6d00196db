"""One body piece per read of an upstream's chunked answer, not one per HTTP chunk.

An upstream that streams Server-Sent Events over HTTP/1.1 usually sends each event as its own
chunk (``Transfer-Encoding: chunked``, RFC 9112 section 7.1), and under load several of them
arrive in one read. mitmproxy's ``Http1Client`` reads its body with h11's ``ChunkedReader``,
which returns one ``Data`` per chunk, and each becomes a ``ResponseData`` that travels the whole
layer stack: the stream, the recording's taps, the client's HTTP/1 or HTTP/2 framing, TLS, one
socket write. ``CoalescingChunkedReader`` returns every chunk the read buffer already holds as
one ``Data`` instead, so a read of 30 events costs one trip, not 30. Nothing waits for more
bytes: what is coalesced has arrived; the client gets the same bytes, in fewer, larger chunks
(chunk boundaries carry no meaning in HTTP, and every reader of the body, the taps and the
adapters' stream transforms included, takes any chunking).

``coalesce_chunks`` installs it on the ``Http1Client`` of an upstream connection's layers once
that client reads a chunked body; the first read of an answer (its head and first chunks) is
read chunk by chunk, as mitmproxy does, the later ones are coalesced.
"""

from __future__ import annotations

from typing import Any, Protocol

import h11
from mitmproxy.proxy import layer
from mitmproxy.proxy.layers.http import Http1Client
from mitmproxy.proxy.layers.http._http1 import make_body_reader

# h11's ChunkedReader: the reader mitmproxy makes for a body without a length.
_CHUNKED_READER = type(make_body_reader(None))


class _BodyReader(Protocol):
    """An h11 body reader: ``reader(buf)`` with h11's ReceiveBuffer; ``read_eof`` at the end."""

    def __call__(self, buf: Any) -> h11.Data | h11.EndOfMessage | None: ...

    def read_eof(self) -> h11.EndOfMessage: ...


class CoalescingChunkedReader:
    """h11's ``ChunkedReader``, with the data of consecutive chunks returned as one ``Data``.
    Same interface as the reader it wraps: ``reader(buf)`` gives ``Data``, ``EndOfMessage`` or
    None (more bytes needed) and raises h11's ``ProtocolError`` for a broken chunk; the event or
    error that ends a run of chunks comes on the next call, after the run's data."""

    __slots__ = ("_inner", "_next")

    def __init__(self, inner: _BodyReader) -> None:
        self._inner = inner
        self._next: h11.EndOfMessage | h11.ProtocolError | None = None

    def __call__(self, buf: Any) -> h11.Data | h11.EndOfMessage | None:
        held, self._next = self._next, None
        if isinstance(held, h11.ProtocolError):
            raise held
        if held is not None:
            return held
        pieces: list[bytes] = []
        try:
            event = self._inner(buf)
            while isinstance(event, h11.Data):
                pieces.append(event.data)
                event = self._inner(buf)
        except h11.ProtocolError as error:
            if not pieces:
                raise
            self._next = error  # the data before the broken chunk goes first
            return h11.Data(data=b"".join(pieces))
        if not pieces:
            return event
        self._next = event
        return h11.Data(data=b"".join(pieces))

    def read_eof(self) -> h11.EndOfMessage:
        """What the wrapped reader says when the connection ends (h11's raises: a chunked body
        cut short)."""
        return self._inner.read_eof()


def coalesce_chunks(connection_layer: layer.Layer) -> None:
    """If ``connection_layer`` (an upstream connection's layers in an ``HttpLayer``: TLS, then
    mitmproxy's ``HttpClient``, then the HTTP/1 client) reads a chunked body with h11's own
    reader, make it read with ``CoalescingChunkedReader``. Cheap: called for each read."""
    client: object = connection_layer
    while not isinstance(client, Http1Client):
        client = getattr(client, "child_layer", None)
        if client is None:
            return
    reader = getattr(client, "body_reader", None)  # set once the client read an answer's head
    if type(reader) is _CHUNKED_READER and client.state == client.read_body:
        # mitmproxy types body_reader as one of h11's readers; it only ever calls it and its
        # read_eof, which this wrapper has.
        client.body_reader = CoalescingChunkedReader(reader)  # type: ignore[assignment]
