"""The interception writer: batches off the request path, drops instead of blocking, purges by
retention with a controlled clock."""

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest

from aibridgeproxyd.interceptions import (
    InterceptionWriter,
    parse_timestamp,
    request_model,
    rfc3339_ms,
)
from aibridgeproxyd.metrics import Metrics
from aibridgeproxyd.model import InterceptionFilter, InterceptionRecord
from aibridgeproxyd.store import Store

DAY = 86400.0
NOW = 1_800_000_000.0


def record(started: float, request_id: str = "r") -> InterceptionRecord:
    return InterceptionRecord(
        request_id=request_id, connect_id="c", initiator="alice", provider="openai", provider_type="openai",
        model="gpt-4o", client="Codex", method="POST", path="/v1/chat/completions", status=200,
        streamed=False, input_tokens=1, output_tokens=2, cache_read_input_tokens=0,
        cache_creation_input_tokens=0, started_at=rfc3339_ms(started), ended_at=rfc3339_ms(started + 1),
        ttfb_ms=5.0, duration_ms=1000.0,
    )  # fmt: skip


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def database(tmp_path: Path) -> Path:
    path = tmp_path / "aibridgeproxyd.db"
    store = await Store.open(path)
    await store.close()
    return path


async def test_retention_purge_with_a_controlled_clock(database: Path) -> None:
    clock = Clock(NOW)
    metrics = Metrics()
    writer = InterceptionWriter(database, metrics, retention=60 * DAY, clock=clock)
    async with await Store.open(database) as store:
        await store.insert_interceptions(
            [record(NOW - 61 * DAY, "old"), record(NOW - 59 * DAY, "recent"), record(NOW, "new")]
        )
    assert await writer.purge_once() == 1
    clock.now += 2 * DAY  # "recent" is now 61 days old
    assert await writer.purge_once() == 1
    await writer.stop()
    async with await Store.open(database) as store:
        left = await store.list_interceptions(InterceptionFilter())
    assert [r["request_id"] for r in left] == ["new"]


async def test_records_are_written_in_batches_in_the_background(database: Path) -> None:
    writer = InterceptionWriter(database, Metrics(), retention=60 * DAY)
    writer.start()
    for index in range(50):
        writer.submit(record(NOW + index, f"r{index}"))
    await writer.stop()  # flushes what is queued
    async with await Store.open(database) as store:
        written = await store.list_interceptions(InterceptionFilter(limit=1000))
    assert [r["request_id"] for r in written] == [f"r{i}" for i in reversed(range(50))]


async def test_a_full_queue_drops_and_counts_instead_of_blocking(database: Path) -> None:
    metrics = Metrics()
    writer = InterceptionWriter(database, metrics, retention=60 * DAY, queue_limit=3)
    for index in range(5):
        writer.submit(record(NOW, f"r{index}"))  # returns at once: nothing is awaited
    assert metrics.interception_records_dropped.labels("queue_full")._value.get() == 2
    await writer.stop()


async def test_a_failing_database_drops_the_batch_and_keeps_going(tmp_path: Path) -> None:
    metrics = Metrics()
    writer = InterceptionWriter(tmp_path / "missing.db", metrics, retention=60 * DAY)
    writer.start()
    writer.submit(record(NOW))
    for _ in range(100):
        if metrics.interception_records_dropped.labels("write_failed")._value.get() == 1:
            break
        await asyncio.sleep(0.05)
    assert metrics.interception_records_dropped.labels("write_failed")._value.get() == 1
    await writer.stop()


@pytest.mark.parametrize(
    ("text", "stored"),
    [
        ("2026-11-26T17:33:00Z", "2026-11-26T17:33:00.000Z"),
        ("2026-11-26T18:33:00.5+01:00", "2026-11-26T17:33:00.500Z"),
        ("2026-11-26", "2026-11-26T00:00:00.000Z"),
    ],
)
def test_parse_timestamp(text: str, stored: str) -> None:
    assert parse_timestamp(text) == stored


@pytest.mark.parametrize("text", ["yesterday", "2026-11-26T17:33:00", "2026-13-01", ""])
def test_parse_timestamp_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid timestamp"):
        parse_timestamp(text)


def test_request_model_reads_the_top_level_key_cheaply() -> None:
    assert request_model(b'{"model": "gpt-4o", "messages": []}') == "gpt-4o"
    assert (
        request_model(b'{"messages": [{"content": "say \\"model\\": \\"x\\""}], "model":"claude"}')
        == "claude"
    )
    assert request_model(b"") is None
    assert request_model(b'{"messages": []}') is None


def test_records_are_plain_values() -> None:
    assert replace(record(NOW), status=500).status == 500
