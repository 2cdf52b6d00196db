"""The zero-copy relay of a fast-path tunnel (``aibridgeproxyd.mitm.splice_relay``): on real
loopback TCP sockets and asyncio transports, with the copying relay's protocols
(``tunnel_relay._Relay``) as the tunnel's fast path sets them up; and when it is not used
(no splice, no pipe, small pipes, no descriptors left), where the copying relay takes over."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import socket
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from aibridgeproxyd.mitm import splice_relay
from aibridgeproxyd.mitm.splice_relay import (
    MIN_PIPE_SIZE,
    SplicePipes,
    SpliceRelay,
    descriptors_wanted,
    open_pipe,
)
from aibridgeproxyd.mitm.tunnel_relay import _Relay

pytestmark = pytest.mark.skipif(not splice_relay.splice_supported(), reason="splice(2) is Linux's")

MiB = 1 << 20


class OldProtocol(asyncio.Protocol):
    """Stands for mitmproxy's StreamReaderProtocol: records what it was told."""

    def __init__(self) -> None:
        self.told: list[str] = []

    def eof_received(self) -> bool:
        self.told.append("eof")
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.told.append(f"lost {type(exc).__name__}" if exc else "lost")


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        outside = socket.create_connection(listener.getsockname())
        inside, _ = listener.accept()
    outside.setblocking(False)
    return outside, inside


@dataclass
class Tunnel:
    """A client and a server (the ``outside`` sockets) with the proxy's two transports between
    them, relayed by ``relay``."""

    client: socket.socket
    server: socket.socket
    client_side: asyncio.Transport
    server_side: asyncio.Transport
    up: _Relay
    down: _Relay
    pipes: SplicePipes
    relay: SpliceRelay
    activity: list[int] = field(default_factory=list)
    loop_errors: list[str] = field(default_factory=list)


async def transport_of(sock: socket.socket) -> asyncio.Transport:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.connect_accepted_socket(OldProtocol, sock)
    return transport


@pytest.fixture
async def tunnel() -> AsyncIterator[Tunnel]:
    loop = asyncio.get_running_loop()
    client, client_inside = tcp_pair()
    server, server_inside = tcp_pair()
    client_side, server_side = await transport_of(client_inside), await transport_of(server_inside)
    activity: list[int] = []
    up = _Relay(client_side.get_protocol(), server_side, lambda: activity.append(1))
    down = _Relay(server_side.get_protocol(), client_side, lambda: activity.append(1))
    up.other, down.other = down, up

    def both_ended() -> None:  # what mitmproxy does then: all done, both connections closed
        up.old.eof_received()
        client_side.close()
        server_side.close()

    up.both_ended = down.both_ended = both_ended
    client_side.set_protocol(up)
    server_side.set_protocol(down)
    pipes = SplicePipes()
    pair = pipes.take()
    assert pair is not None
    relay = SpliceRelay(pipes, pair, up, down)
    up.on_lost = down.on_lost = relay.fall_back
    t = Tunnel(client, server, client_side, server_side, up, down, pipes, relay, activity)
    loop.set_exception_handler(lambda _, context: t.loop_errors.append(context["message"]))
    relay.start()
    yield t
    for transport in (client_side, server_side):
        transport.abort()
    await asyncio.sleep(0)
    pipes.close()
    client.close()
    server.close()
    assert t.loop_errors == []


async def send_and_end(sock: socket.socket, data: bytes) -> None:
    await asyncio.get_running_loop().sock_sendall(sock, data)
    sock.shutdown(socket.SHUT_WR)


async def read_to_end(sock: socket.socket) -> bytes:
    loop, received = asyncio.get_running_loop(), bytearray()
    async with asyncio.timeout(20):
        while chunk := await loop.sock_recv(sock, MiB):
            received += chunk
    return bytes(received)


async def read_exactly(sock: socket.socket, size: int) -> bytes:
    loop, received = asyncio.get_running_loop(), bytearray()
    async with asyncio.timeout(10):
        while len(received) < size and (chunk := await loop.sock_recv(sock, size)):
            received += chunk
    return bytes(received)


async def until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    async with asyncio.timeout(seconds):
        while not condition():
            await asyncio.sleep(0.005)


def told(relay: _Relay) -> list[str]:
    return relay.old.told  # type: ignore[attr-defined, no-any-return]


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


# --- bytes, ends and back-pressure ----------------------------------------------------------


async def test_bytes_cross_both_ways_at_once_intact_and_in_order(tunnel: Tunnel) -> None:
    up_bytes, down_bytes = os.urandom(9 * MiB + 1), os.urandom(7 * MiB + 3)
    _, _, at_server, at_client = await asyncio.gather(
        send_and_end(tunnel.client, up_bytes),
        send_and_end(tunnel.server, down_bytes),
        read_to_end(tunnel.server),
        read_to_end(tunnel.client),
    )
    assert sha(at_server) == sha(up_bytes) and sha(at_client) == sha(down_bytes)
    assert (tunnel.up.bytes, tunnel.down.bytes) == (len(up_bytes), len(down_bytes))
    assert tunnel.activity  # every chunk counts for the idle timeout
    # Both ends passed on: mitmproxy is told on the client's side, and the pipes are closed.
    await until(lambda: told(tunnel.up) == ["eof", "lost"])
    assert tunnel.pipes.open_pipes == 0 and not tunnel.relay.splicing


async def test_an_end_of_stream_half_closes_the_other_side_and_the_answer_still_comes(
    tunnel: Tunnel,
) -> None:
    loop = asyncio.get_running_loop()
    await send_and_end(tunnel.client, b"question")
    assert await read_to_end(tunnel.server) == b"question"  # the server saw our end
    assert told(tunnel.up) == [] and tunnel.relay.splicing
    await loop.sock_sendall(tunnel.server, b"the answer, after the question ended")
    assert await loop.sock_recv(tunnel.client, 100) == b"the answer, after the question ended"
    assert tunnel.relay.splicing


async def test_a_receiver_that_stops_reading_stops_the_sender_with_one_pipe_of_bytes_held(
    tunnel: Tunnel,
) -> None:
    sent, chunk = 0, os.urandom(MiB)
    with contextlib.suppress(BlockingIOError):
        for _ in range(256):  # far more than the socket buffers and the pipe hold
            await asyncio.sleep(0.002)
            sent += tunnel.client.send(chunk)
    assert sent < 256 * MiB, "the sender was never stopped"
    upward = tunnel.relay.directions[0]
    # The server's socket is full, the pipe holds what the relay read and no more comes in.
    await until(lambda: not upward.writable and upward.in_pipe > 0)
    held = upward.in_pipe
    assert held <= upward.pipe.size
    await asyncio.sleep(0.1)
    assert upward.in_pipe == held
    # The receiver reads again: everything arrives.
    tunnel.client.shutdown(socket.SHUT_WR)
    assert len(await read_to_end(tunnel.server)) == sent


# --- losses: passed on as the copying relay passes them -------------------------------------


async def test_a_reset_is_passed_to_mitmproxy_and_the_pipes_are_closed(tunnel: Tunnel) -> None:
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(tunnel.server, b"x" * 1000)
    assert await loop.sock_recv(tunnel.client, 1000)
    tunnel.server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    tunnel.server.close()  # a reset
    await until(lambda: told(tunnel.down) != [])
    assert told(tunnel.down) == ["lost ConnectionResetError"]
    assert tunnel.pipes.open_pipes == 0 and not tunnel.relay.splicing
    assert tunnel.server_side.is_closing() and not tunnel.client_side.is_closing()


async def test_a_transport_mitmproxy_closes_hands_the_rest_to_the_copying_relay(
    tunnel: Tunnel,
) -> None:
    loop = asyncio.get_running_loop()
    tunnel.server_side.close()  # mitmproxy's close (idle timeout, drain)
    await until(lambda: told(tunnel.down) == ["lost"])
    assert tunnel.pipes.open_pipes == 0 and not tunnel.relay.splicing
    # The client's side reads again with the copying relay: its end still reaches mitmproxy.
    tunnel.client.shutdown(socket.SHUT_WR)
    await until(lambda: "eof" in told(tunnel.up))
    assert await loop.sock_recv(tunnel.client, 10) == b""


async def test_bytes_left_in_a_pipe_at_the_fall_back_are_written_on_in_order(
    tunnel: Tunnel,
) -> None:
    payload = os.urandom(32 * MiB)  # more than the sockets' buffers: the server reads nothing yet
    sending = asyncio.ensure_future(send_and_end(tunnel.client, payload))
    upward = tunnel.relay.directions[0]
    await until(lambda: upward.in_pipe > 0 and not upward.writable)
    tunnel.relay.fall_back()
    assert tunnel.pipes.open_pipes == 0
    received = await read_to_end(tunnel.server)
    await sending
    assert sha(received) == sha(payload)


# --- when splice is not used ----------------------------------------------------------------


def test_pipes_are_large_enough_and_closed_when_given_back() -> None:
    pipes = SplicePipes()
    pair = pipes.take()
    assert pair is not None and all(pipe.size >= MIN_PIPE_SIZE for pipe in pair)
    assert (pipes.open_pipes, pipes.spliced) == (2, 1)
    pipes.give_back(pair)
    assert pipes.open_pipes == 0
    for pipe in pair:
        with pytest.raises(OSError):
            os.fstat(pipe.read_fd)


def test_no_descriptor_for_a_pipe_means_the_copying_relay(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def emfile(flags: int) -> tuple[int, int]:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(os, "pipe2", emfile)
    assert SplicePipes().take() is None


def test_a_pipe_that_cannot_grow_is_closed_and_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    # The user's pipe pages are exhausted: F_SETPIPE_SZ is refused and the pipe has one page.
    opened: list[int] = []
    real_pipe2, real_fcntl = os.pipe2, splice_relay.fcntl.fcntl

    def pipe2(flags: int) -> tuple[int, int]:
        fds = real_pipe2(flags)
        opened.extend(fds)
        return fds

    def fcntl(fd: int, command: int, arg: int = 0) -> int:
        if command == splice_relay.F_SETPIPE_SZ:
            raise PermissionError(errno.EPERM, "Operation not permitted")
        return 4096 if command == splice_relay.F_GETPIPE_SZ else int(real_fcntl(fd, command, arg))

    monkeypatch.setattr(os, "pipe2", pipe2)
    monkeypatch.setattr(splice_relay.fcntl, "fcntl", fcntl)
    assert open_pipe() is None and SplicePipes().take() is None
    for fd in opened:
        with pytest.raises(OSError):
            os.fstat(fd)


@pytest.mark.parametrize("missing", ["splice", "platform"])
def test_without_splice_the_pipes_are_disabled(
    monkeypatch: pytest.MonkeyPatch, missing: str
) -> None:
    if missing == "splice":
        monkeypatch.delattr(os, "splice")
    else:
        monkeypatch.setattr(splice_relay.sys, "platform", "darwin")
    pipes = SplicePipes()
    assert not pipes.enabled and pipes.take() is None
    assert not SplicePipes(enabled=False).enabled


def test_pipes_only_use_the_descriptors_max_connections_leaves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Room for exactly one tunnel's two pipes above the sockets' budget.
    soft = descriptors_wanted(100, with_pipes=False) + 4
    monkeypatch.setattr(splice_relay.resource, "getrlimit", lambda _: (soft, soft))
    pipes = SplicePipes(max_connections=100)
    first = pipes.take()
    assert first is not None
    assert pipes.take() is None  # a second tunnel would eat into the sockets' descriptors
    pipes.give_back(first)
    again = pipes.take()
    assert again is not None
    pipes.give_back(again)


async def test_an_unexpected_error_in_the_relay_closes_the_tunnel(
    tunnel: Tunnel, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop = asyncio.get_running_loop()
    upward = tunnel.relay.directions[0]

    def broken_fill() -> bool:
        raise RuntimeError("a bug")

    monkeypatch.setattr(upward, "_fill", broken_fill)
    await loop.sock_sendall(tunnel.client, b"bytes")
    await until(lambda: told(tunnel.up) == ["lost"] and told(tunnel.down) == ["lost"])
    assert tunnel.pipes.open_pipes == 0 and not tunnel.relay.splicing


async def test_a_relay_that_cannot_be_built_gives_its_pipes_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from aibridgeproxyd.mitm import tunnel_relay

    def refuse(*_: object) -> None:
        raise RuntimeError("no relay")

    monkeypatch.setattr(tunnel_relay, "SpliceRelay", refuse)
    (client, client_inside), (server, server_inside) = tcp_pair(), tcp_pair()
    client_side, server_side = await transport_of(client_inside), await transport_of(server_inside)
    up = _Relay(client_side.get_protocol(), server_side, lambda: None)
    down = _Relay(server_side.get_protocol(), client_side, lambda: None)
    pipes = SplicePipes()
    with pytest.raises(RuntimeError):
        tunnel_relay._splice_relay(pipes, up, down)
    assert pipes.open_pipes == 0
    for transport in (client_side, server_side):
        transport.abort()
    client.close()
    server.close()


async def test_sockets_the_epoll_cannot_take_stay_with_the_copying_relay(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loop = asyncio.get_running_loop()
    (client, client_inside), (server, server_inside) = tcp_pair(), tcp_pair()
    client_side, server_side = await transport_of(client_inside), await transport_of(server_inside)
    up = _Relay(client_side.get_protocol(), server_side, lambda: None)
    down = _Relay(server_side.get_protocol(), client_side, lambda: None)
    up.other, down.other = down, up
    client_side.set_protocol(up)
    server_side.set_protocol(down)
    pipes = SplicePipes()
    pair = pipes.take()
    assert pair is not None
    relay = SpliceRelay(pipes, pair, up, down)

    def no_room(fd: int, handler: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(relay.poller, "watch", no_room)
    assert relay.start() is False
    assert pipes.open_pipes == 0 and client_side.is_reading() and server_side.is_reading()
    await loop.sock_sendall(client, b"copied")  # the copying relay carries it
    assert await read_exactly(server, 6) == b"copied"
    for transport in (client_side, server_side):
        transport.abort()
    client.close()
    server.close()
    pipes.close()
