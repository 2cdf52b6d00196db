"""``aibridgeproxyd.mitm.body_chunks``: the chunks an upstream's read holds go on as one piece."""

from __future__ import annotations

import itertools

import h11
import pytest
from h11._readers import ChunkedReader, ContentLengthReader
from h11._receivebuffer import ReceiveBuffer
from hypothesis import given
from hypothesis import strategies as st
from mitmproxy import options
from mitmproxy.proxy import events
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers.http import (
    Http1Client,
    HttpClient,
    RequestEndOfMessage,
    RequestHeaders,
    ResponseData,
    ResponseEndOfMessage,
    ResponseHeaders,
    ResponseProtocolError,
)
from mitmproxy.proxy.layers.http._base import HttpConnection, ReceiveHttp
from mitmproxy.test import tflow

from aibridgeproxyd.mitm.body_chunks import (
    MAX_CHUNK_LINES,
    MAX_INFORMATIONAL,
    MAX_RESPONSE_HEAD,
    CoalescingChunkedReader,
    CoalescingHttp1Client,
    coalesce_chunks,
)


def chunked(*chunks: bytes) -> bytes:
    """``chunks`` in HTTP/1.1 chunked coding (RFC 9112 section 7.1), with the last chunk."""
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"


def read_all(reader: object, buf: ReceiveBuffer) -> list[object]:
    events = []
    while (event := reader(buf)) is not None:  # type: ignore[operator]
        events.append(event)
        if isinstance(event, h11.EndOfMessage):
            break
    return events


def test_the_chunks_of_one_read_come_as_one_piece_then_the_end() -> None:
    buf = ReceiveBuffer()
    buf += chunked(b"data: 1\n\n", b"data: 2\n\n", b"data: 3\n\n")
    events = read_all(CoalescingChunkedReader(ChunkedReader()), buf)
    assert len(events) == 2
    data, end = events
    assert isinstance(data, h11.Data) and data.data == b"data: 1\n\ndata: 2\n\ndata: 3\n\n"
    assert isinstance(end, h11.EndOfMessage)


def test_a_chunk_cut_by_the_read_goes_on_with_what_arrived_and_nothing_waits() -> None:
    buf = ReceiveBuffer()
    whole = chunked(b"data: 1\n\n", b"data: 2\n\n")
    buf += whole[:20]  # the first chunk and part of the second
    reader = CoalescingChunkedReader(ChunkedReader())
    first = reader(buf)
    assert isinstance(first, h11.Data) and first.data == b"data: 1\n\ndat"
    assert reader(buf) is None  # nothing more has arrived: nothing is held back
    buf += whole[20:]
    rest = read_all(reader, buf)
    assert isinstance(rest[0], h11.Data) and rest[0].data == b"a: 2\n\n"
    assert isinstance(rest[1], h11.EndOfMessage)


def test_the_data_before_a_broken_chunk_goes_first_then_the_error() -> None:
    buf = ReceiveBuffer()
    buf += b"9\r\ndata: 1\n\n\r\nzz\r\n"
    reader = CoalescingChunkedReader(ChunkedReader())
    data = reader(buf)
    assert isinstance(data, h11.Data) and data.data == b"data: 1\n\n"
    with pytest.raises(h11.ProtocolError):
        reader(buf)


def test_a_body_cut_short_is_reported_as_h11_reports_it() -> None:
    with pytest.raises(h11.ProtocolError):
        CoalescingChunkedReader(ChunkedReader()).read_eof()


@given(
    st.lists(st.binary(min_size=1, max_size=40), min_size=1, max_size=30),
    st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=40),
)
def test_any_chunking_and_reads_give_the_same_bytes_and_one_end(
    chunks: list[bytes], reads: list[int]
) -> None:
    wire = chunked(*chunks)
    buf, reader, got, ends, at = (
        ReceiveBuffer(),
        CoalescingChunkedReader(ChunkedReader()),
        b"",
        0,
        0,
    )
    for size in [*reads, len(wire)]:
        buf += wire[at : at + size]
        at += size
        for event in read_all(reader, buf):
            if isinstance(event, h11.Data):
                assert event.data  # never an empty piece
                got += event.data
            else:
                ends += 1
        if at >= len(wire):
            break
    assert got == b"".join(chunks) and ends == 1


def test_trailer_fields_are_discarded_not_passed_to_mitmproxy() -> None:
    """mitmproxy's HTTP/1 layer raises NotImplementedError for an EndOfMessage with headers."""
    buf = ReceiveBuffer()
    buf += chunked(b"data: 1\n\n")[:-2] + b"X-Checksum: abc\r\n\r\nNEXT"
    events = read_all(CoalescingChunkedReader(ChunkedReader()), buf)
    assert [type(e) for e in events] == [h11.Data, h11.EndOfMessage]
    assert events[1].headers == []  # type: ignore[attr-defined]
    buf2 = ReceiveBuffer()
    buf2 += b"0\r\nX-Checksum: abc\r\n\r\n"
    (end,) = read_all(CoalescingChunkedReader(ChunkedReader()), buf2)
    assert isinstance(end, h11.EndOfMessage) and end.headers == []
    assert bytes(buf) == b"NEXT"  # what follows the answer is left for the next head


@pytest.mark.parametrize(
    "endless",
    [
        b"f" * (MAX_CHUNK_LINES + 1),
        b"1;ext=" + b"x" * MAX_CHUNK_LINES,
        b"0\r\nX: " + b"y" * MAX_CHUNK_LINES,
    ],
    ids=["size", "extension", "trailer"],
)
def test_a_chunk_size_line_or_trailer_section_that_never_ends_is_a_protocol_error(
    endless: bytes,
) -> None:
    buf = ReceiveBuffer()
    buf += chunked(b"data: 1\n\n")[:-5]
    reader = CoalescingChunkedReader(ChunkedReader())
    assert isinstance(reader(buf), h11.Data)
    buf += endless[: MAX_CHUNK_LINES // 2]
    assert reader(buf) is None  # a long line may still end
    buf += endless[MAX_CHUNK_LINES // 2 :]
    with pytest.raises(h11.ProtocolError):
        reader(buf)


def http1_client() -> Http1Client:
    return Http1Client(Context(tflow.tclient_conn(), options.Options()))


class Wrapper:
    """Stands for the TLS and HttpClient layers above an Http1Client."""

    def __init__(self, child: object) -> None:
        self.child_layer = child


def test_the_http1_client_under_the_connection_layers_wraps_each_chunked_reader_it_sets() -> None:
    client = http1_client()
    coalesce_chunks(Wrapper(Wrapper(client)))  # type: ignore[arg-type]
    assert isinstance(client, CoalescingHttp1Client) and isinstance(client, Http1Client)
    client.body_reader = ChunkedReader()  # as mitmproxy's read_headers sets it
    assert isinstance(client.body_reader, CoalescingChunkedReader)
    installed = client.body_reader
    coalesce_chunks(Wrapper(client))  # type: ignore[arg-type]
    assert client.body_reader is installed  # once
    client.body_reader = ContentLengthReader(10)  # the next answer has a length: kept as is
    assert isinstance(client.body_reader, ContentLengthReader)


def test_a_reader_set_before_is_wrapped_and_another_layer_is_left_alone() -> None:
    client = http1_client()
    client.body_reader = ChunkedReader()
    coalesce_chunks(client)
    assert isinstance(client.body_reader, CoalescingChunkedReader)
    coalesce_chunks(Wrapper(None))  # type: ignore[arg-type]  # no HTTP/1 client below: no-op


def test_the_client_is_wrapped_once_the_connection_opened_and_not_before() -> None:
    """Before its connection opens, mitmproxy's HttpClient has no HTTP/1 client: nothing to
    wrap. ``BoundedHttpLayer.register_connection`` calls it once the client is there."""
    http_client = HttpClient(Context(tflow.tclient_conn(), options.Options()))
    unopened = Wrapper(http_client)  # the connection is not open: HttpClient has no child yet
    coalesce_chunks(unopened)  # type: ignore[arg-type]
    http_client.child_layer = client = http1_client()  # as HttpClient sets it once open
    assert not isinstance(client, CoalescingHttp1Client)
    coalesce_chunks(unopened)  # type: ignore[arg-type]
    assert isinstance(client, CoalescingHttp1Client)
    context = Context(tflow.tclient_conn(), options.Options())
    http2 = HttpConnection(context, context.client)  # Http2Client's base class
    coalesce_chunks(Wrapper(http2))  # type: ignore[arg-type]
    assert type(http2) is HttpConnection


# --- informational (1xx) heads before the answer --------------------------------------------

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
EARLY_HINTS = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\n"
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


def waiting_client() -> Http1Client:
    """An upstream connection's HTTP/1 client that sent a request and awaits its answer."""
    context = Context(tflow.tclient_conn(), options.Options())
    context.server = tflow.tserver_conn()
    client = Http1Client(context)
    list(client.handle_event(events.Start()))
    coalesce_chunks(client)  # after Start, as on a real connection: its state was bound before
    list(client.handle_event(RequestHeaders(1, tflow.treq(), True)))
    list(client.handle_event(RequestEndOfMessage(1)))
    return client


def answer_events(client: Http1Client, reads: list[bytes]) -> list[object]:
    commands = []
    for data in reads:
        commands += client.handle_event(events.DataReceived(client.conn, data))
    return [command.event for command in commands if isinstance(command, ReceiveHttp)]


def cut_at(wire: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(wire), *(c % (len(wire) + 1) for c in cuts)})
    return [wire[a:b] for a, b in itertools.pairwise(points)]


@given(st.integers(0, 5), st.lists(st.integers(0, 10_000), max_size=12))
def test_informational_heads_before_the_answer_are_passed_over_in_any_reads(
    heads: int, cuts: list[int]
) -> None:
    wire = (CONTINUE + EARLY_HINTS) * heads + ANSWER
    events_ = answer_events(waiting_client(), cut_at(wire, cuts))
    assert [type(e) for e in events_][:1] == [ResponseHeaders]
    head = events_[0]
    assert isinstance(head, ResponseHeaders) and head.response.status_code == 200
    data = b"".join(e.data for e in events_ if isinstance(e, ResponseData))
    assert data == b"hello" and isinstance(events_[-1], ResponseEndOfMessage)


@pytest.mark.parametrize("read_size", [1, 7, 4096])
def test_more_informational_heads_than_the_bound_break_the_answer_off(read_size: int) -> None:
    """Whatever reads cut them (a read ending inside a 1xx head must not restart the count)."""
    wire = CONTINUE * (MAX_INFORMATIONAL + 1) + ANSWER
    reads = [wire[at : at + read_size] for at in range(0, len(wire), read_size)]
    events_ = answer_events(waiting_client(), reads)
    assert len(events_) == 1
    (error,) = events_
    assert isinstance(error, ResponseProtocolError) and "informational" in error.message
    wire = CONTINUE * MAX_INFORMATIONAL + ANSWER  # the bound itself still answers
    events_ = answer_events(waiting_client(), [wire])
    assert isinstance(events_[0], ResponseHeaders) and events_[0].response.status_code == 200


def test_switching_protocols_and_the_final_answer_are_not_passed_over() -> None:
    client = waiting_client()
    head = answer_events(client, [b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n"])[0]
    assert isinstance(head, ResponseHeaders) and head.response.status_code == 101


def test_an_unfinished_response_head_over_the_bound_breaks_the_answer_off() -> None:
    """mitmproxy buffers a head until it ends: one that has not ended past MAX_RESPONSE_HEAD
    ends the answer (a 502 for the client) and is not held, nor quoted in the error."""
    head = b"HTTP/1.1 200 OK\r\nX: "
    client = waiting_client()
    assert answer_events(client, [head + b"z" * (MAX_RESPONSE_HEAD - len(head))]) == []
    (error,) = answer_events(client, [b"z"])  # a head that long might still have ended
    assert isinstance(error, ResponseProtocolError) and "head over" in error.message
    assert len(error.message) < 100 and len(client.buf) == 0
    assert answer_events(client, [b"z" * 10]) == []  # nothing more is read
    # A whole head followed by more body than the bound, in one read, is an answer.
    body = b"b" * (MAX_RESPONSE_HEAD * 2)
    wire = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    events_ = answer_events(waiting_client(), [wire])
    assert isinstance(events_[0], ResponseHeaders) and isinstance(events_[-1], ResponseEndOfMessage)
