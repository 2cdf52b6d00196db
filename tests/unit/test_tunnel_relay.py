"""The fast-path relay protocol of a tunnel (``aibridgeproxyd.mitm.tunnel_relay._Relay``), on
in-memory transports: what it reads goes to the peer, an end of stream half-closes the peer,
both ends (or a lost side) go to mitmproxy's protocol, and flow control reaches the side that
fills a full buffer."""

from __future__ import annotations

import asyncio
import functools

from aibridgeproxyd.mitm.tunnel_relay import _Relay, _tell_both_ended


class MemoryTransport(asyncio.Transport):
    """Records writes, half-closes and reading pauses."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.eof_written = False
        self.reading = True
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.eof_written, "write after write_eof"
        self.written += data

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


class OldProtocol(asyncio.Protocol):
    """Stands for mitmproxy's StreamReaderProtocol: records what it was told."""

    def __init__(self) -> None:
        self.told: list[str] = []

    def eof_received(self) -> bool:
        self.told.append("eof")
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.told.append(f"lost {exc!r}")

    def pause_writing(self) -> None:
        self.told.append("pause")

    def resume_writing(self) -> None:
        self.told.append("resume")


def pair() -> tuple[_Relay, _Relay, MemoryTransport, MemoryTransport, list[int]]:
    client, server = MemoryTransport(), MemoryTransport()
    activity: list[int] = []
    up = _Relay(OldProtocol(), server, lambda: activity.append(1))
    down = _Relay(OldProtocol(), client, lambda: activity.append(1))
    up.other, down.other = down, up
    up.both_ended = down.both_ended = functools.partial(_tell_both_ended, up, down)
    return up, down, client, server, activity


def test_bytes_read_on_one_side_are_written_to_the_other_and_count_as_activity() -> None:
    up, down, client, server, activity = pair()
    up.data_received(b"hello ")
    up.data_received(b"server")
    down.data_received(b"hi client")
    assert bytes(server.written) == b"hello server"
    assert bytes(client.written) == b"hi client"
    assert (up.bytes, down.bytes, len(activity)) == (12, 9, 3)


def test_an_end_of_stream_half_closes_the_peer_and_the_other_way_carries_on() -> None:
    up, down, client, server, _ = pair()
    assert up.eof_received() is True  # the client's side stays open for the answer
    assert server.eof_written and not client.eof_written
    down.data_received(b"the answer")
    assert bytes(client.written) == b"the answer"
    assert up.old.told == [] and down.old.told == []  # mitmproxy not told yet


def test_once_both_sides_ended_mitmproxy_is_told_on_both_sides() -> None:
    # Both of its reader tasks see their end of stream, as without the fast path, so it
    # closes the tunnel (neither end alone closes it: a half-close is not the end).
    up, down, *_ = pair()
    down.eof_received()
    assert up.old.told == [] and down.old.told == []  # type: ignore[attr-defined]
    up.eof_received()
    assert up.old.told == ["eof"]  # type: ignore[attr-defined]
    assert down.old.told == ["eof"]  # type: ignore[attr-defined]


def test_a_lost_side_is_passed_to_mitmproxy_at_once() -> None:
    _, down, *_ = pair()
    error = ConnectionResetError("reset")
    down.connection_lost(error)
    assert down.old.told == [f"lost {error!r}"]  # type: ignore[attr-defined]


def test_nothing_is_written_to_a_closing_peer() -> None:
    up, _, _, server, _ = pair()
    server.closing = True
    up.data_received(b"late bytes")
    assert server.written == b""


def test_a_full_write_buffer_pauses_the_side_that_fills_it_until_it_drains() -> None:
    up, _, client, server, _ = pair()
    # The client's write buffer is full (its transport tells its protocol, ``up``): stop
    # reading from the server, which fills it.
    up.pause_writing()
    assert not server.reading and client.reading
    up.resume_writing()
    assert server.reading
    assert up.old.told == ["pause", "resume"]  # type: ignore[attr-defined]
