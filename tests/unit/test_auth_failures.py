"""Per-source failure counting and the shared token re-read (aibridgeproxyd.auth_failures,
aibridgeproxyd.token_refresh)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import pytest

from aibridgeproxyd.auth_failures import AuthFailureTracker
from aibridgeproxyd.store import StoreError
from aibridgeproxyd.token_refresh import TokenRefresher
from aibridgeproxyd.tokens import hash_token


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def tracker(clock: Clock, **overrides: float) -> AuthFailureTracker:
    settings = {"limit": 3, "window": 60.0, "cooldown": 30.0, "log_interval": 10.0}
    settings.update(overrides)
    return AuthFailureTracker(clock=clock, **settings)  # type: ignore[arg-type]


def test_a_source_cools_down_after_limit_failures_within_the_window() -> None:
    clock = Clock()
    failures = tracker(clock)
    notes = [failures.record_failure("10.0.0.1", "invalid_credentials") for _ in range(3)]
    assert [n.cooldown_started for n in notes] == [False, False, True]
    assert failures.cooldown_remaining("10.0.0.1") == 30.0
    assert failures.cooldown_remaining("10.0.0.2") == 0.0
    clock.now += 30
    assert failures.cooldown_remaining("10.0.0.1") == 0.0


def test_failures_spread_beyond_the_window_never_cool_down() -> None:
    clock = Clock()
    failures = tracker(clock)
    for _ in range(10):
        assert not failures.record_failure("10.0.0.1", "invalid_credentials").cooldown_started
        clock.now += 31  # two per window at most
    assert failures.cooldown_remaining("10.0.0.1") == 0.0


def test_missing_credentials_are_logged_but_never_counted() -> None:
    failures = tracker(Clock())
    for _ in range(10):
        failures.record_failure("10.0.0.1", "missing_credentials", counts=False)
    assert failures.cooldown_remaining("10.0.0.1") == 0.0


def test_logging_is_one_line_per_source_per_interval_with_the_count() -> None:
    clock = Clock()
    failures = tracker(clock, limit=1000)
    notes = []
    for _ in range(25):
        notes.append(failures.record_failure("10.0.0.1", "invalid_credentials"))
        clock.now += 1
    logged = [n.failures for n in notes if n.log]
    # The first failure at once, then one line every 10 s carrying what happened since.
    assert logged == [1, 10, 10]
    # Another source is logged on its own schedule.
    assert failures.record_failure("10.0.0.2", "invalid_credentials").log


def test_the_per_source_table_is_bounded() -> None:
    failures = tracker(Clock(), limit=1000)
    failures.max_sources = 100
    for index in range(10_000):
        failures.record_failure(f"10.0.{index // 256}.{index % 256}", "invalid_credentials")
    assert len(failures) == 100


# --- the shared re-read --------------------------------------------------------------------------


class CountingSource:
    def __init__(self, tokens: Mapping[str, str]) -> None:
        self.tokens = dict(tokens)
        self.reads = 0
        self.release = asyncio.Event()
        self.release.set()

    async def __call__(self) -> Mapping[str, str]:
        self.reads += 1
        seen = dict(self.tokens)  # what a read sees is fixed when it starts (one transaction)
        await self.release.wait()
        return seen


async def test_a_token_created_after_the_snapshot_is_found() -> None:
    source = CountingSource({hash_token("new"): "bob"})
    refresher = TokenRefresher(source, min_interval=0.0)
    assert await refresher.identity_for_token("new") == "bob"
    assert await refresher.identity_for_token("unknown") is None


async def test_concurrent_lookups_share_one_read() -> None:
    source = CountingSource({hash_token("good"): "bob"})
    source.release.clear()
    refresher = TokenRefresher(source, min_interval=0.0)
    waiters = [asyncio.create_task(refresher.identity_for_token(f"bad-{i}")) for i in range(200)]
    waiters.append(asyncio.create_task(refresher.identity_for_token("good")))
    await asyncio.sleep(0)  # let every waiter register before the read returns
    source.release.set()
    results = await asyncio.gather(*waiters)
    assert results[-1] == "bob" and set(results[:-1]) == {None}
    assert source.reads <= 2


async def test_a_read_that_started_before_a_lookup_does_not_decide_it() -> None:
    source = CountingSource({})
    source.release.clear()
    refresher = TokenRefresher(source, min_interval=0.0)
    early = asyncio.create_task(refresher.identity_for_token("t"))
    while source.reads == 0:  # until the first read is in flight, without the token
        await asyncio.sleep(0)
    source.tokens[hash_token("t")] = "carol"  # committed while that read runs
    late = asyncio.create_task(refresher.identity_for_token("t"))
    await asyncio.sleep(0)
    source.release.set()
    assert await early is None
    assert await late == "carol"  # decided by a read that started after it
    assert source.reads == 2


async def test_reads_are_rate_limited() -> None:
    clock_now = [0.0]
    source = CountingSource({})
    refresher = TokenRefresher(source, min_interval=0.05, clock=lambda: clock_now[0])
    await refresher.identity_for_token("a")
    # Within min_interval of the last read, the next read waits; callers meanwhile share it.
    waiters = [asyncio.create_task(refresher.identity_for_token(f"b{i}")) for i in range(50)]
    await asyncio.gather(*waiters)
    assert source.reads == 2


async def test_a_failed_read_reaches_every_waiter() -> None:
    async def broken() -> Mapping[str, str]:
        raise StoreError("database is locked")

    refresher = TokenRefresher(broken, min_interval=0.0)
    results = await asyncio.gather(
        *(refresher.identity_for_token("x") for _ in range(3)), return_exceptions=True
    )
    assert all(isinstance(r, StoreError) for r in results)
    with pytest.raises(StoreError):
        await refresher.identity_for_token("x")
