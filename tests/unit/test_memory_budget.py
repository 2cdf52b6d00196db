"""Unit tests of the memory budget pieces (aibridgeproxyd.mitm.memory_budget) and their config keys.
The end-to-end storms are in tests/security/test_bounds_memory.py."""

from __future__ import annotations

import asyncio
import collections
import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aibridgeproxyd.addons import housekeeping

from aibridgeproxyd.config import ConfigError, load_config
from aibridgeproxyd.mitm import memory_budget
from aibridgeproxyd.mitm.memory_budget import (
    CONNECTION_UNSENT_HIGH,
    MIB,
    STREAM_UNSENT_HIGH,
    STREAM_UNSENT_LOW,
    BufferBudget,
    ConnectionBytes,
    Reservation,
    ResponseBackpressure,
    unsent_bytes,
)


def test_budget_refuses_what_would_cross_the_limit() -> None:
    budget = BufferBudget(100)
    assert budget.take(60)
    assert not budget.take(41)
    assert budget.take(40)
    assert budget.exhausted
    budget.give_back(100)
    assert (budget.used, budget.released) == (0, 100)


def test_reservation_names_the_bound_that_refused_and_releases_once() -> None:
    budget, connection = BufferBudget(100), ConnectionBytes()
    first, second = Reservation(budget, connection), Reservation(budget, connection)
    assert first.grow(30, connection_limit=50) is None
    assert second.grow(30, connection_limit=50) == "connection"
    assert second.grow(20, connection_limit=50) is None
    other = Reservation(budget, ConnectionBytes())
    assert other.grow(60, connection_limit=1000) == "max_buffered_bytes"
    first.release()
    first.release()
    second.release()
    assert (budget.used, connection.used) == (0, 0)


def test_a_reservation_is_released_when_its_owner_is_freed() -> None:
    class Owner:
        pass

    budget, connection = BufferBudget(100), ConnectionBytes()
    owner = Owner()
    reservation = Reservation(budget, connection)
    reservation.attach(owner)
    assert reservation.grow(50, connection_limit=100) is None
    del owner
    gc.collect()
    assert (budget.used, connection.used) == (0, 0)


@dataclass
class Chunk:
    data: bytes


class FakeH2:
    def __init__(self) -> None:
        self.stream_buffers: collections.defaultdict[int, collections.deque[Chunk]] = (
            collections.defaultdict(collections.deque)
        )

    def hold(self, stream_id: int, size: int) -> None:
        self.stream_buffers[stream_id].clear()
        if size:
            self.stream_buffers[stream_id].append(Chunk(b"x" * size))


class FakeTransport:
    def __init__(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


@pytest.fixture
def transports(monkeypatch: pytest.MonkeyPatch) -> dict[Any, FakeTransport]:
    found: dict[Any, FakeTransport] = collections.defaultdict(FakeTransport)
    monkeypatch.setattr(memory_budget, "_transport", lambda client, conn: found[conn])
    return found


def test_unsent_bytes_sums_each_streams_buffer() -> None:
    h2 = FakeH2()
    h2.hold(1, 10)
    h2.stream_buffers[1].append(Chunk(b"y" * 5))
    h2.hold(3, 0)
    assert unsent_bytes(h2) == {1: 15}


def test_backpressure_pauses_over_the_high_mark_and_resumes_below_the_low(
    transports: dict[Any, FakeTransport],
) -> None:
    budget = BufferBudget(1 << 40)
    backpressure = ResponseBackpressure(object(), budget)  # type: ignore[arg-type]
    h2, up = FakeH2(), "upstream-1"
    h2.hold(1, STREAM_UNSENT_HIGH)
    backpressure.update(h2, {1: up})  # type: ignore[dict-item]
    assert transports[up].reading and budget.used == STREAM_UNSENT_HIGH
    h2.hold(1, STREAM_UNSENT_HIGH + 1)
    backpressure.update(h2, {1: up})  # type: ignore[dict-item]
    assert not transports[up].reading
    # asyncio's StreamReader may resume it on its own: paused again at the next event.
    transports[up].reading = True
    backpressure.update(h2, {1: up})  # type: ignore[dict-item]
    assert not transports[up].reading
    h2.hold(1, STREAM_UNSENT_LOW + 1)
    backpressure.update(h2, {1: up})  # type: ignore[dict-item]
    assert not transports[up].reading  # between the marks: stays paused
    h2.hold(1, STREAM_UNSENT_LOW)
    backpressure.update(h2, {1: up})  # type: ignore[dict-item]
    assert transports[up].reading
    assert budget.used == STREAM_UNSENT_LOW


def test_backpressure_bounds_the_connection_and_obeys_the_process_budget(
    transports: dict[Any, FakeTransport],
) -> None:
    budget = BufferBudget(1 << 40)
    backpressure = ResponseBackpressure(object(), budget)  # type: ignore[arg-type]
    h2 = FakeH2()
    per_stream = STREAM_UNSENT_HIGH  # each under its own mark
    count = CONNECTION_UNSENT_HIGH // per_stream + 1
    streams = {2 * i + 1: f"up-{i}" for i in range(count)}
    for stream_id in streams:
        h2.hold(stream_id, per_stream)
    backpressure.update(h2, streams)  # type: ignore[arg-type]
    assert not any(transports[up].reading for up in streams.values())
    # A stream that stops reading a response (None) is always resumed.
    backpressure.update(h2, dict.fromkeys(streams))
    assert all(transports[up].reading for up in streams.values())
    # With the process budget spent, any unsent byte pauses.
    small = BufferBudget(10)
    other = ResponseBackpressure(object(), small)  # type: ignore[arg-type]
    h2 = FakeH2()
    h2.hold(1, 100)
    other.update(h2, {1: "up-x"})  # type: ignore[dict-item]
    assert not transports["up-x"].reading
    other.close()
    assert transports["up-x"].reading and small.used == 0


def test_close_gives_the_budget_back(transports: dict[Any, FakeTransport]) -> None:
    budget = BufferBudget(1 << 40)
    backpressure = ResponseBackpressure(object(), budget)  # type: ignore[arg-type]
    h2 = FakeH2()
    h2.hold(1, 2 * MIB)
    backpressure.update(h2, {1: "up"})  # type: ignore[dict-item]
    backpressure.close()
    backpressure.close()
    assert budget.used == 0 and transports["up"].reading


def test_config_keys(tmp_path: Path) -> None:
    defaults = load_config(environ={})
    assert defaults.max_buffered_bytes == 1024 * MIB
    assert defaults.max_connections_per_address == 1024
    path = tmp_path / "config.yaml"
    path.write_text("max_buffered_bytes: 256MiB\nmax_connections_per_address: 64\n")
    config = load_config(path, environ={})
    assert (config.max_buffered_bytes, config.max_connections_per_address) == (256 * MIB, 64)
    path.write_text("max_buffered_bytes: lots\n")
    with pytest.raises(ConfigError, match="max_buffered_bytes"):
        load_config(path, environ={})
    path.write_text("max_connections_per_address: 0\n")
    with pytest.raises(ConfigError, match="max_connections_per_address"):
        load_config(path, environ={})


def test_housekeeping_sweeps_after_large_releases(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not only after 100 closed connections: a few large bodies given back also return their
    memory to the system."""
    monkeypatch.setattr(housekeeping, "CHECK_SECONDS", 0.01)
    monkeypatch.setattr(housekeeping, "MIN_SECONDS_BETWEEN_SWEEPS", 0.0)
    keeper = housekeeping.MemoryHousekeeping()
    swept: list[int] = []

    async def sweep() -> None:
        swept.append(memory_budget.BUDGET.released)
        memory_budget.BUDGET.released = 0

    monkeypatch.setattr(keeper, "sweep", sweep)

    async def scenario() -> None:
        keeper._checks.start()
        memory_budget.BUDGET.released = memory_budget.SWEEP_AFTER_RELEASED - 1
        await asyncio.sleep(0.05)  # several checks: below the threshold, no sweep
        assert swept == []
        memory_budget.BUDGET.released += 1
        for _ in range(500):
            if swept:
                break
            await asyncio.sleep(0.01)
        await keeper._checks.stop()

    asyncio.run(scenario())
    assert swept == [memory_budget.SWEEP_AFTER_RELEASED]


def test_housekeeping_wakes_at_once_when_enough_connections_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An idle daemon checks only every CHECK_SECONDS, but the connection that completes a burst
    wakes the check: the sweep does not wait for the next one."""
    monkeypatch.setattr(housekeeping, "CHECK_SECONDS", 3600.0)
    monkeypatch.setattr(housekeeping, "MIN_SECONDS_BETWEEN_SWEEPS", 0.0)
    keeper = housekeeping.MemoryHousekeeping(min_closed=3)
    swept: list[int] = []

    async def sweep() -> None:
        swept.append(keeper.closed_since_sweep)
        keeper.closed_since_sweep = 0

    monkeypatch.setattr(keeper, "sweep", sweep)

    async def scenario() -> None:
        keeper._checks.start()
        await asyncio.sleep(0.05)
        for _ in range(2):
            keeper.client_disconnected(None)  # type: ignore[arg-type]
        await asyncio.sleep(0.05)
        assert swept == []
        keeper.client_disconnected(None)  # type: ignore[arg-type]
        for _ in range(200):
            if swept:
                break
            await asyncio.sleep(0.01)
        await keeper._checks.stop()

    asyncio.run(scenario())
    assert swept == [3]
