"""The pure parts of ``workers`` > 1: the restart back-off and the control channel's frames."""

from __future__ import annotations

import asyncio
import socket

import pytest

from aibridgeproxyd.worker_channel import ChannelError, read_frame, send_frame
from aibridgeproxyd.workers import MAX_RESTART_DELAY, restart_delay


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
