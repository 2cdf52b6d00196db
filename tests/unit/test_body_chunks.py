"""``aibridgeproxyd.mitm.body_chunks``: the chunks an upstream's read holds go on as one piece."""

from __future__ import annotations

import h11
import pytest
from h11._readers import ChunkedReader, ContentLengthReader
from h11._receivebuffer import ReceiveBuffer
from hypothesis import given
from hypothesis import strategies as st
from mitmproxy import options
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers.http import Http1Client
from mitmproxy.test import tflow

from aibridgeproxyd.mitm.body_chunks import CoalescingChunkedReader, coalesce_chunks


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


def client_reading(reader: object) -> Http1Client:
    client = Http1Client(Context(tflow.tclient_conn(), options.Options()))
    client.body_reader = reader  # type: ignore[assignment]
    client.state = client.read_body
    return client


class Wrapper:
    """Stands for the TLS and HttpClient layers above an Http1Client."""

    def __init__(self, child: object) -> None:
        self.child_layer = child


def test_installed_on_the_http1_client_under_the_connection_layers_reading_a_chunked_body() -> None:
    client = client_reading(ChunkedReader())
    coalesce_chunks(Wrapper(Wrapper(client)))  # type: ignore[arg-type]
    assert isinstance(client.body_reader, CoalescingChunkedReader)
    installed = client.body_reader
    coalesce_chunks(Wrapper(client))  # type: ignore[arg-type]
    assert client.body_reader is installed  # once


def test_not_installed_for_a_length_a_head_or_another_layer() -> None:
    with_length = client_reading(ContentLengthReader(10))
    coalesce_chunks(with_length)
    assert isinstance(with_length.body_reader, ContentLengthReader)
    reading_head = client_reading(ChunkedReader())
    reading_head.state = reading_head.read_headers
    coalesce_chunks(reading_head)
    assert type(reading_head.body_reader) is ChunkedReader
    coalesce_chunks(Wrapper(None))  # type: ignore[arg-type]  # no HTTP/1 client below: no-op
