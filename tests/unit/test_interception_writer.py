"""The interception writer: batches off the request path, drops instead of blocking, purges by
retention with a controlled clock."""

import asyncio
import datetime
import os
import sqlite3
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aibridgeproxyd.interception.writer import (
    InterceptionWriter,
    parse_timestamp,
    rfc3339_ms,
)
from aibridgeproxyd.metrics import Metrics
from aibridgeproxyd.model import InterceptionFilter, InterceptionRecord, ToolCall
from aibridgeproxyd.store import Store
from tests.metric_samples import registry_samples, sample_value

DAY = 86400.0
NOW = 1_800_000_000.0
DROPPED = "coder_aibridgeproxyd_interception_records_dropped_total"


def record(started: float, request_id: str = "r") -> InterceptionRecord:
    return InterceptionRecord(
        request_id=request_id, connect_id="c", initiator="alice", provider="openai", provider_type="openai",
        model="gpt-4o", client="Codex", method="POST", path="/v1/chat/completions", status=200,
        streamed=False, input_tokens=1, output_tokens=2, cache_read_input_tokens=0,
        cache_creation_input_tokens=0, reasoning_output_tokens=None, provider_name="openai",
        user_agent=None, credential_kind="central", credential_hint="sk-\u2026cdef",
        started_at=rfc3339_ms(started),
        ended_at=rfc3339_ms(started + 1),
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


async def test_a_tool_result_queued_in_the_same_flush_as_its_call_joins_its_thread(
    database: Path,
) -> None:
    # Both records reach the queue within one flush interval, so neither is in the database
    # when the batch is written: lineage still resolves, because the batch is written in order.
    writer = InterceptionWriter(database, Metrics(), retention=60 * DAY)
    writer.start()
    call = replace(
        record(NOW, "call"), client_session_id="s1", prompt="list the files",
        tool_calls=(ToolCall("toolu_1", "Bash", '{"command": "ls"}'),),
    )  # fmt: skip
    writer.submit(call)
    result = replace(
        record(NOW + 1, "result"), client_session_id="s1", tool_result_ids=("toolu_1",)
    )
    writer.submit(result)
    await writer.stop()
    async with await Store.open(database) as store:
        second, first = await store.list_interceptions(InterceptionFilter())
    assert (first["session_id"], first["thread_root_id"]) == ("s1", "call")
    assert first["tool_calls"] == [
        {"tool_call_id": "toolu_1", "tool": "Bash", "input": '{"command": "ls"}'}
    ]
    assert (second["thread_parent_id"], second["thread_root_id"]) == ("call", "call")
    assert second["session_id"] == "s1"


async def test_a_full_queue_drops_and_counts_instead_of_blocking(database: Path) -> None:
    metrics = Metrics()
    writer = InterceptionWriter(database, metrics, retention=60 * DAY, queue_limit=3)
    for index in range(5):
        writer.submit(record(NOW, f"r{index}"))  # returns at once: nothing is awaited
    assert dropped(metrics, "queue_full") == 2
    await writer.stop()


async def test_the_queue_is_bounded_in_bytes_of_prompts_tool_calls_and_thoughts(
    database: Path,
) -> None:
    """Ten thousand records of 8 MiB of tool calls each must not queue 80 GiB: past the byte
    budget records are dropped as queue_full, and a written batch frees its share."""
    metrics = Metrics()
    writer = InterceptionWriter(database, metrics, retention=60 * DAY, queue_bytes_limit=300_000)
    heavy = replace(
        record(NOW),
        prompt="p" * 50_000,
        tool_calls=(ToolCall("t", "Bash", "x" * 40_000),) * 2,
        thoughts=("y" * 10_000,),
    )
    accepted = [writer.submit(replace(heavy, request_id=f"r{i}")) for i in range(5)]
    assert accepted == [True, True, False, False, False]  # 141 KiB each
    assert dropped(metrics, "queue_full") == 3
    writer.start()
    await writer.stop()  # writes the two accepted
    store = await Store.open(database)
    try:
        assert len(await store.list_interceptions(InterceptionFilter())) == 2
    finally:
        await store.close()


async def test_a_written_batch_frees_the_queues_bytes(database: Path) -> None:
    metrics = Metrics()
    writer = InterceptionWriter(database, metrics, retention=60 * DAY, queue_bytes_limit=200_000)
    heavy = replace(record(NOW), prompt="p" * 100_000)
    assert writer.submit(replace(heavy, request_id="a"))
    assert not writer.submit(replace(heavy, request_id="b"))
    writer.start()
    for _ in range(200):  # the writer flushes within FLUSH_SECONDS
        if writer.pending == 0:
            break
        await asyncio.sleep(0.05)
    assert writer.pending == 0
    assert writer.submit(replace(heavy, request_id="c"))
    await writer.stop()


def dropped(metrics: Metrics, reason: str) -> float:
    samples = registry_samples(metrics.registry)
    return sample_value(samples, DROPPED, reason=reason) or 0.0  # no series yet: none dropped


async def written(path: Path) -> list[str]:
    async with await Store.open(path) as store:
        found = await store.list_interceptions(InterceptionFilter(limit=10_000))
    return [r["request_id"] for r in found]


async def until(predicate: Callable[[], bool], message: str) -> None:
    """Poll a condition on the loop, with a deadline."""
    for _ in range(400):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(message)


async def test_a_missing_database_drops_the_batch_as_database_missing(tmp_path: Path) -> None:
    metrics = Metrics()
    writer = InterceptionWriter(tmp_path / "missing.db", metrics, retention=60 * DAY)
    writer.start()
    writer.submit(record(NOW))
    await until(lambda: dropped(metrics, "database_missing") == 1, "the batch was not dropped")
    await writer.stop()
    assert not (tmp_path / "missing.db").exists()  # never recreated


async def test_an_unreadable_database_drops_the_batch_as_write_failed(tmp_path: Path) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(b"not a database" * 100)
    metrics = Metrics()
    writer = InterceptionWriter(path, metrics, retention=60 * DAY)
    writer.start()
    writer.submit(record(NOW))
    await until(lambda: dropped(metrics, "write_failed") == 1, "the batch was not dropped")
    writer.submit(record(NOW, "second"))  # and the writer keeps going
    await until(lambda: dropped(metrics, "write_failed") == 2, "the writer stopped writing")
    await writer.stop()


async def test_stop_writes_the_batch_the_writer_is_gathering(database: Path) -> None:
    """Regression: the record the loop had taken and was holding during its flush pause was
    lost on stop (the last record before every SIGTERM)."""
    metrics = Metrics()
    writer = InterceptionWriter(database, metrics, retention=60 * DAY)
    writer.start()
    writer.submit(record(NOW, "last"))
    await until(lambda: bool(writer._in_hand) or not writer._queue, "the loop took the record")
    await writer.stop()
    assert await written(database) == ["last"]
    assert dropped(metrics, "shutdown") == 0


@pytest.mark.parametrize("count", [1, 50, 1201])
async def test_stop_writes_everything_accepted(database: Path, count: int) -> None:
    metrics = Metrics()
    writer = InterceptionWriter(database, metrics, retention=60 * DAY)
    writer.start()
    for index in range(count):
        assert writer.submit(record(NOW + index, f"r{index}"))
        if index == count // 2:
            await asyncio.sleep(0)  # let the loop start its pause with part of them
    await writer.stop()
    assert sorted(await written(database)) == sorted(f"r{i}" for i in range(count))
    assert writer.pending == 0


async def test_a_writer_never_started_still_writes_on_stop(database: Path) -> None:
    writer = InterceptionWriter(database, Metrics(), retention=60 * DAY)
    writer.submit(record(NOW, "early"))
    await writer.stop()
    assert await written(database) == ["early"]


async def test_submit_after_stop_is_counted_as_a_shutdown_drop(database: Path) -> None:
    metrics = Metrics()
    writer = InterceptionWriter(database, metrics, retention=60 * DAY)
    writer.start()
    await writer.stop()
    assert writer.submit(record(NOW)) is False
    assert dropped(metrics, "shutdown") == 1
    assert await written(database) == []


def _try_exclusive(connection: sqlite3.Connection) -> bool:
    try:
        connection.execute("BEGIN EXCLUSIVE")
    except sqlite3.OperationalError:
        return False
    return True


async def test_records_not_written_before_the_stop_deadline_are_counted(database: Path) -> None:
    """A database locked for longer than the stop may wait: the records are reported as
    dropped, never silently lost."""
    metrics = Metrics()
    writer = InterceptionWriter(database, metrics, retention=60 * DAY)
    writer.start()
    await until(lambda: writer._store is not None, "the purge opened the store")
    # No busy wait here: it would block the event loop, and with it the purge that opened the
    # store and may still hold the write lock between two of its statements (a deadlock, then
    # "database is locked"). Retried with the loop free instead.
    locker = sqlite3.connect(database, isolation_level=None, timeout=0)
    await until(lambda: _try_exclusive(locker), "the test's exclusive lock")
    try:
        for index in range(3):
            writer.submit(record(NOW, f"r{index}"))
        await writer.stop(flush_timeout=0.3)
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert dropped(metrics, "shutdown") == 3
    assert await written(database) == []


async def test_a_deleted_database_is_never_written_to_its_unlinked_file(database: Path) -> None:
    metrics = Metrics()
    writer = InterceptionWriter(database, metrics, retention=60 * DAY)
    writer.start()
    writer.submit(record(NOW, "before"))
    await until(lambda: writer.pending == 0 and writer._store is not None, "first batch written")
    database.unlink()
    writer.submit(record(NOW, "while-missing"))
    await until(lambda: dropped(metrics, "database_missing") == 1, "not counted as dropped")
    await (await Store.open(database)).close()  # an operator restores a database
    writer.submit(record(NOW, "after"))
    await writer.stop()
    # "while-missing" went nowhere but the drop counter; "after" reached the restored file.
    assert await written(database) == ["after"]


async def test_a_replaced_database_is_reopened(database: Path, tmp_path: Path) -> None:
    metrics = Metrics()
    writer = InterceptionWriter(database, metrics, retention=60 * DAY)
    writer.start()
    writer.submit(record(NOW, "before"))
    await until(lambda: writer.pending == 0 and writer._store is not None, "first batch written")
    replacement = tmp_path / "replacement.db"
    await (await Store.open(replacement)).close()
    os.rename(replacement, database)
    writer.submit(record(NOW, "after"))
    await writer.stop()
    assert await written(database) == ["after"]  # not into the file that was replaced
    assert dropped(metrics, "write_failed") == dropped(metrics, "database_missing") == 0


async def test_a_replacement_that_is_not_a_current_database_is_not_migrated(
    database: Path, tmp_path: Path
) -> None:
    """A file swapped in is used only if it already is a database of this version: the
    daemon never turns a stray file into an empty provider table."""
    metrics = Metrics()
    writer = InterceptionWriter(database, metrics, retention=60 * DAY)
    writer.start()
    empty = tmp_path / "empty.db"
    empty.touch()
    os.rename(empty, database)
    writer.submit(record(NOW))
    await writer.stop()
    assert dropped(metrics, "write_failed") == 1
    assert database.stat().st_size == 0


async def test_a_record_the_store_refuses_is_dropped_alone_not_its_batch(database: Path) -> None:
    metrics = Metrics()
    writer = InterceptionWriter(database, metrics, retention=60 * DAY)
    bad = replace(record(NOW, "bad"), status=object())  # a bug upstream of the writer
    for request_id in ("a", "b", "c"):
        writer.submit(record(NOW, request_id))
    writer.submit(bad)
    for request_id in ("d", "e"):
        writer.submit(record(NOW, request_id))
    await writer.stop()
    assert sorted(await written(database)) == ["a", "b", "c", "d", "e"]
    assert dropped(metrics, "write_failed") == 1


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


def test_an_unparsable_timestamp_is_told_both_forms_it_may_take() -> None:
    # The dashboard's From field and `--started-after` take a date too (docs/dashboard.md);
    # the message offered only RFC 3339, so a user typing a day never learned it would do.
    with pytest.raises(ValueError) as raised:
        parse_timestamp("last tuesday")
    assert str(raised.value) == (
        "invalid timestamp 'last tuesday': expected RFC 3339 or a date (UTC), "
        "e.g. 2026-11-26T17:33:00Z or 2026-11-26"
    )


def test_records_are_plain_values() -> None:
    assert replace(record(NOW), status=500).status == 500


def _rfc3339_ms_by_datetime(timestamp: float) -> str:
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def test_rfc3339_ms_is_strftime_of_the_moment_whatever_the_second_cached() -> None:
    for timestamp in (0.0, 1764000000.9995, 1764000000.0004, 1764000001.25, -1.5, 4102444800.999):
        assert rfc3339_ms(timestamp) == _rfc3339_ms_by_datetime(timestamp)


@settings(max_examples=3000, deadline=None)
@given(st.floats(min_value=-1e9, max_value=4102444800.0, allow_nan=False))
def test_rfc3339_ms_agrees_with_datetime_on_any_moment(timestamp: float) -> None:
    """Integer arithmetic, same text as ``datetime.fromtimestamp`` (its microsecond rounding
    included) for any moment from 1938 to 2100."""
    assert rfc3339_ms(timestamp) == _rfc3339_ms_by_datetime(timestamp)


@pytest.mark.parametrize(
    "timestamp", [-62_135_596_800.5, 253_402_300_800.0, float("nan"), float("inf"), -1e300]
)
def test_rfc3339_ms_refuses_a_moment_datetime_cannot_hold(timestamp: float) -> None:
    with pytest.raises(ValueError, match="outside the years 1 to 9999"):
        rfc3339_ms(timestamp)


def test_rfc3339_ms_takes_the_first_and_last_moments_datetime_holds() -> None:
    assert rfc3339_ms(-62_135_596_800.0) == "0001-01-01T00:00:00.000Z"
    assert rfc3339_ms(253_402_300_799.5) == "9999-12-31T23:59:59.500Z"
    # Four digits before the year 1000 too (strftime's %Y gives "971"): the text stays sortable.
    assert rfc3339_ms(999.0 * -86_400 * 365).startswith("0971-")


@pytest.mark.parametrize("microsecond", [499.5, 500.5, 999_999.5, 999.4999, 0.5])
def test_rfc3339_ms_rounds_to_the_microsecond_as_datetime_does(microsecond: float) -> None:
    timestamp = 1764000000 + microsecond / 1_000_000
    assert rfc3339_ms(timestamp) == _rfc3339_ms_by_datetime(timestamp)
