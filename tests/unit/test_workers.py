"""The pure parts of ``workers`` > 1: the restart back-off, the control channel's frames and the
workers' listening sockets."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from aibridgeproxyd.ca import CaFiles
from aibridgeproxyd.config import Config
from aibridgeproxyd.worker import reuse_port_socket
from aibridgeproxyd.worker_channel import ChannelError, read_frame, send_frame
from aibridgeproxyd.workers import MAX_RESTART_DELAY, Supervisor, restart_delay


def test_restart_delay_doubles_per_death_in_a_row_up_to_the_cap() -> None:
    assert [restart_delay(n) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 4.0]
    assert restart_delay(50) == MAX_RESTART_DELAY == 30.0


def read_fed(data: bytes) -> dict[str, object]:
    """``read_frame`` on a reader holding ``data`` and then end of file."""

    async def scenario() -> dict[str, object]:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        return await read_frame(reader)

    return asyncio.run(scenario())


def test_a_frame_round_trips_through_a_socket_pair() -> None:
    async def scenario() -> dict[str, object]:
        left, right = socket.socketpair()
        _, writer = await asyncio.open_connection(sock=left)
        reader, other = await asyncio.open_connection(sock=right)
        await send_frame(writer, {"command": "metrics", "n": [1, "é"]})
        message = await read_frame(reader)
        writer.close()
        other.close()
        return message

    assert asyncio.run(scenario()) == {"command": "metrics", "n": [1, "é"]}


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ((2**31).to_bytes(4, "big"), "over"),
        ((5).to_bytes(4, "big") + b"nope!", "not JSON"),
        ((2).to_bytes(4, "big") + b"[]", "not a JSON object"),
    ],
)
def test_a_bad_frame_is_refused_naming_the_problem(data: bytes, problem: str) -> None:
    with pytest.raises(ChannelError, match=problem):
        read_fed(data)


def test_end_of_file_is_an_incomplete_read() -> None:
    with pytest.raises(asyncio.IncompleteReadError):
        read_fed(b"\x00\x00")


def test_a_workers_listening_socket_gives_connections_without_nagle_delays() -> None:
    """asyncio sets TCP_NODELAY on accepted sockets only when the listening socket says TCP;
    without it, responses waited 40 ms for delayed ACKs."""

    async def scenario() -> int:
        sock = reuse_port_socket("127.0.0.1", 0)
        accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            peer = writer.get_extra_info("socket")
            accepted.set_result(peer.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(handle, sock=sock)
        _, client = await asyncio.open_connection(*sock.getsockname()[:2])
        nodelay = await accepted
        client.close()
        server.close()
        return nodelay

    assert asyncio.run(scenario()) == 1


def test_workers_share_a_port_the_main_process_holds_without_listening() -> None:
    held = reuse_port_socket("127.0.0.1", 0, listen=False)
    port = held.getsockname()[1]
    listeners = [reuse_port_socket("127.0.0.1", port) for _ in range(2)]
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass
    for sock in (held, *listeners):
        sock.close()


def test_a_write_before_any_worker_was_spawned_answers(tmp_path: Path) -> None:
    """The admin listener opens before the first worker is spawned: a write served then has no
    worker to ask (asyncio.wait of nothing raises ValueError, a 500 after the write was
    stored); it answers, and every worker's first load reads the write."""
    supervisor = Supervisor(Config(), CaFiles(tmp_path / "ca-cert.pem", tmp_path / "ca-key.pem"))
    assert not supervisor.workers
    asyncio.run(supervisor._apply_now())
