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

``coalesce_chunks`` makes the ``Http1Client`` of an upstream connection's layers (a MITM'd
upstream's, or a plain-HTTP proxy request's destination's) a ``CoalescingHttp1Client`` once the
connection opened and before its first answer arrives (``BoundedHttpLayer.register_connection``):
every chunked body reader it then makes is wrapped, so every read of every answer on that
connection is coalesced, the first read (head and first chunks) included.

Trailer fields (RFC 9112 section 7.1.2) are discarded, which that section allows a recipient
removing the chunked coding: mitmproxy's HTTP/1 layer raises ``NotImplementedError`` for an
answer with trailers, and that error would end the whole client connection (every HTTP/2 stream
on it) with a traceback, at an upstream's word. A chunk-size line or trailer section longer
than ``MAX_CHUNK_LINES`` breaks the answer off (h11's ``RemoteProtocolError``, as a broken chunk
does) instead of growing the buffer without bound, and a response head that has not ended after
``MAX_RESPONSE_HEAD`` bytes breaks the answer off (a 502) instead of being buffered until it
ends, as mitmproxy's ``read_headers`` would.

Informational answers (1xx other than 101, RFC 9110 section 15.2: ``100 Continue``, ``103 Early
Hints``) before an upstream's answer are passed over, as mitmproxy's HTTP/2 client does: its
HTTP/1 client took the first 1xx head for the answer, so the client got a lone 1xx and then
waited for an answer that never came. mitmproxy answers a client's ``Expect: 100-continue``
itself and drops the expectation, so no 1xx is ours to forward. More than ``MAX_INFORMATIONAL``
before one answer break it off (a 502), as a broken answer does.
"""

from __future__ import annotations

import re
from typing import Any, Protocol

import h11
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.layers.http import ErrorCode, Http1Client, ResponseProtocolError
from mitmproxy.proxy.layers.http._base import ReceiveHttp
from mitmproxy.proxy.layers.http._http1 import make_body_reader

# h11's ChunkedReader: the reader mitmproxy makes for a body without a length.
_CHUNKED_READER = type(make_body_reader(None))
# Bytes: the longest chunk-size line (extensions included) or trailer section taken from an
# upstream. h11 buffers either until it ends, and mitmproxy sets no bound: an upstream sending
# one that never ends would grow the proxy's memory without limit.
MAX_CHUNK_LINES = 64 * 1024
# Bytes: the longest response head taken from an upstream, checked at each read (so at most
# one read more is held): mitmproxy's Http1Client buffers a head until it ends.
MAX_RESPONSE_HEAD = 256 * 1024
# Informational (1xx) heads passed over before one answer; one more breaks the answer off.
MAX_INFORMATIONAL = 100
# The status line of an informational head other than 101 Switching Protocols (RFC 9112 4).
_INFORMATIONAL = re.compile(rb"HTTP/1\.[01] 1(?!01)[0-9]{2}[ \r]")
_STATUS_LINE_START = 13  # bytes that _INFORMATIONAL reads


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
        if self._next is not None:
            held, self._next = self._next, None
            if isinstance(held, h11.ProtocolError):
                raise held
            return held
        # ReceiveBuffer._data (h11, private, pinned): what len(buf) measures, without the two
        # Python calls of ReceiveBuffer.__bool__ and __len__ (this runs twice for every read).
        if not buf._data:
            return None  # what h11's reader says of an empty buffer, in any state: not asked
        pieces: list[h11.Data] = []
        try:
            # type(), not isinstance(): h11's events are ABCs, and this runs for every read.
            event = self._inner(buf)
            while type(event) is h11.Data:
                pieces.append(event)
                event = self._inner(buf) if buf._data else None
            if event is not None or len(buf._data) > MAX_CHUNK_LINES:
                event = self._run_end(event, buf)
        except h11.ProtocolError as error:
            if not pieces:
                raise
            self._next = error  # the data before the broken chunk goes first
            return _joined(pieces)
        if not pieces:
            return event
        self._next = event  # a paced stream's read: one chunk, then None
        return pieces[0] if len(pieces) == 1 else _joined(pieces)

    @staticmethod
    def _run_end(event: h11.Data | h11.EndOfMessage | None, buf: Any) -> h11.EndOfMessage | None:
        """What ends a run of chunks: the end of the body (its trailer fields discarded), or
        None when more bytes are needed. Raises h11's ``ProtocolError`` for a chunk-size line
        or trailer section over ``MAX_CHUNK_LINES`` bytes (h11 would buffer one until it
        ends)."""
        if event is None:
            if len(buf._data) > MAX_CHUNK_LINES:
                raise h11.RemoteProtocolError(
                    f"chunk-size line or trailer section over {MAX_CHUNK_LINES} bytes"
                )
            return None
        assert isinstance(event, h11.EndOfMessage)  # all an h11 body reader gives besides
        if event.headers:
            return h11.EndOfMessage()  # the trailer fields are discarded (see the module)
        return event

    def read_eof(self) -> h11.EndOfMessage:
        """What the wrapped reader says when the connection ends (h11's raises: a chunked body
        cut short)."""
        return self._inner.read_eof()


def _joined(pieces: list[h11.Data]) -> h11.Data:
    """One ``Data`` with the data of all ``pieces``."""
    return h11.Data(data=b"".join([piece.data for piece in pieces]))


class _CoalescingReaderSlot:
    """``CoalescingHttp1Client.body_reader``: a data descriptor without ``__get__``, so that
    only setting the attribute passes here (a chunked reader is wrapped in a
    ``CoalescingChunkedReader``, any other kept as it is) while reading it, twice per read, stays
    a plain lookup in the instance's dict (Python's attribute lookup: a data descriptor that
    has no ``__get__`` gives way to the instance's own value)."""

    def __set__(self, client: object, reader: object) -> None:
        if type(reader) is _CHUNKED_READER:
            reader = CoalescingChunkedReader(reader)
        client.__dict__["body_reader"] = reader


class CoalescingHttp1Client(Http1Client):
    """mitmproxy's ``Http1Client``, whose chunked body readers are each wrapped in a
    ``CoalescingChunkedReader`` as mitmproxy sets them (``read_headers``); any other reader is
    kept as it is (``_CoalescingReaderSlot``). ``read_headers`` passes over informational heads
    first and bounds the head (see the module docstring); it runs only while a head is read."""

    # The stream whose answer is awaited, and the 1xx heads passed over before it.
    informational: tuple[int | None, int] = (None, 0)

    body_reader = _CoalescingReaderSlot()  # type: ignore[assignment]  # read: the instance's

    def read_headers(self, event: events.ConnectionEvent) -> layer.CommandGenerator[None]:
        awaited = type(event) is events.DataReceived and self.stream_id is not None
        if awaited and not self._pass_over_informational():
            yield from self._break_off(f"more than {MAX_INFORMATIONAL} informational responses")
            return
        yield from super().read_headers(event)
        if (
            self.stream_id is not None
            and self.state == self.read_headers
            and len(self.buf) > MAX_RESPONSE_HEAD
        ):
            # mitmproxy buffers a head until it ends ("FIXME: protect against header size DoS").
            yield from self._break_off(f"upstream response head over {MAX_RESPONSE_HEAD} bytes")

    def _break_off(self, problem: str) -> layer.CommandGenerator[None]:
        """End the awaited answer with ``problem`` (a 502 for the client, in its provider's
        shape) and close the connection: nothing more is read from it, nothing held."""
        stream_id = self.stream_id
        assert stream_id is not None
        self.state = self.done
        self.buf.maybe_extract_at_most(len(self.buf))
        yield commands.CloseConnection(self.conn)
        yield ReceiveHttp(ResponseProtocolError(stream_id, problem, ErrorCode.GENERIC_SERVER_ERROR))

    def _pass_over_informational(self) -> bool:
        """Drop the whole 1xx heads at the start of the buffer; False past
        ``MAX_INFORMATIONAL`` of them before one answer. Each read costs what it adds: the
        status line is matched on the buffer's first bytes, and h11's ``maybe_extract_lines``
        (which mitmproxy's own ``read_headers`` uses) searches only bytes it has not yet."""
        stream, count = self.informational
        count = count if stream == self.stream_id else 0
        passed = False
        # ReceiveBuffer._data (h11, private, pinned): no public way to look without a copy.
        while _INFORMATIONAL.match(self.buf._data[:_STATUS_LINE_START]):
            if self.buf.maybe_extract_lines() is None:
                break  # the rest of the head has not arrived
            passed, count = True, count + 1
            if count > MAX_INFORMATIONAL:
                return False
        if passed:
            self.informational = (self.stream_id, count)
        return True


def coalesce_chunks(connection_layer: layer.Layer) -> None:
    """If ``connection_layer`` (an upstream connection's layers in an ``HttpLayer``: TLS, then
    mitmproxy's ``HttpClient``, then the HTTP/1 client) holds mitmproxy's ``Http1Client``, make
    it a ``CoalescingHttp1Client``. Called once the connection opened (mitmproxy's
    ``HttpClient`` has made its client then) and before the client reads its first answer.
    Nothing happens while there is no HTTP/1 client, or for another protocol's, and for a
    client that is ours already."""
    client: object = connection_layer
    while not isinstance(client, Http1Client):
        client = getattr(client, "child_layer", None)
        if client is None:
            return
    if type(client) is Http1Client:
        # The same object, its body_reader now set through the slot: mitmproxy's
        # HttpClient makes its child itself, so there is no other place to choose the class.
        client.__class__ = CoalescingHttp1Client
        if getattr(client.state, "__func__", None) is Http1Client.read_headers:
            client.state = client.read_headers  # bound before: now the subclass's
        reader = client.__dict__.get("body_reader")
        if reader is not None:
            client.body_reader = reader  # a reader set before (plain HTTP, answer in flight)
