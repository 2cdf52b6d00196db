"""When the provider reload runs (``ProviderReloader.start``): on its timer, on ``trigger()``,
and when the store's generation moves."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from decimal import Decimal

import pytest

from aibridgeproxyd.metrics import Metrics
from aibridgeproxyd.model import ProviderRecord
from aibridgeproxyd.pricing import ModelPrices
from aibridgeproxyd.reload import (
    CHANGE_POLL_SECONDS,
    PUSHED_POLL_SECONDS,
    ProviderReloader,
    SnapshotHolder,
)
from aibridgeproxyd.store import RoutingState


class Store:
    """The routing source and change probe of a reloader, counting the reloads."""

    def __init__(self) -> None:
        self.generation = 1
        self.reads = 0
        self.model_prices: dict[str, ModelPrices | None] = {}

    async def source(self) -> RoutingState:
        self.reads += 1
        return RoutingState([ProviderRecord("openai", "openai")], [], dict(self.model_prices))

    async def probe(self) -> int:
        return self.generation


async def _until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def _reloader(store: Store, interval: float) -> ProviderReloader:
    reloader = ProviderReloader(
        store.source, SnapshotHolder(), Metrics(), interval, change_probe=store.probe
    )
    reloader.applied_generation = store.generation
    return reloader


async def test_a_trigger_reloads_at_once() -> None:
    store = Store()
    reloader = _reloader(store, 3600)
    reloader.start()
    try:
        reloader.trigger()
        await _until(lambda: store.reads == 1)
    finally:
        await reloader.stop()


async def test_a_management_write_is_applied_within_a_change_poll() -> None:
    store = Store()
    reloader = _reloader(store, 3600)
    reloader.start()
    try:
        await asyncio.sleep(0.6)  # one change poll with nothing written: no reload
        assert store.reads == 0
        store.generation = 2
        await _until(lambda: reloader.applied_generation == 2)
        assert store.reads == 1
    finally:
        await reloader.stop()


async def test_a_price_write_reaches_the_snapshot_within_a_change_poll() -> None:
    store = Store()
    reloader = _reloader(store, 3600)
    reloader.start()
    try:
        store.model_prices["my-model"] = ModelPrices(Decimal(1), Decimal(2))
        store.generation = 2
        await _until(lambda: reloader.applied_generation == 2, timeout=1.0)
        assert reloader.holder.current.model_prices == store.model_prices
    finally:
        await reloader.stop()


async def test_the_timer_reloads_every_interval() -> None:
    store = Store()
    reloader = _reloader(store, 0.05)
    reloader.start()
    try:
        await _until(lambda: store.reads >= 3)
    finally:
        await reloader.stop()
    reads = store.reads
    await asyncio.sleep(0.1)
    assert store.reads == reads  # stopped


async def test_a_reload_that_raises_after_reading_the_store_waits_for_the_next_interval() -> None:
    """Anything after the guarded store read that raises (here the provider_info metric) must
    not leave the timer due at once: the security review saw 1,451 store reads and logged
    tracebacks in one second."""
    store, metrics = Store(), Metrics()
    reloader = ProviderReloader(store.source, SnapshotHolder(), metrics, 30.0)

    def broken(*_args: object, **_kwargs: object) -> None:
        raise ValueError("metrics broken")

    metrics.set_provider_info = broken  # type: ignore[method-assign]
    reloader.start()
    reloader._next_reload = 0.0  # the timer is due, as after the interval
    await _until(lambda: store.reads >= 1)
    await asyncio.sleep(1.0)
    await reloader.stop()
    assert store.reads == 1


def test_the_presence_is_told_when_the_applied_generation_moves_and_only_then() -> None:
    store = Store()
    reloader = ProviderReloader(store.source, SnapshotHolder(), Metrics(), 30.0)
    calls: list[int | None] = []
    reloader.on_applied = lambda: calls.append(reloader.applied_generation)
    reloader.applied_generation = 3
    reloader.applied_generation = 3
    reloader.applied_generation = 4
    assert calls == [3, 4]


async def test_failing_for_counts_from_the_first_failed_reload_until_a_success(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = Store()
    reloader = _reloader(store, 3600)
    assert await reloader.reload_once() and reloader.failing_for() == 0.0
    working = store.source

    async def broken() -> RoutingState:
        raise RuntimeError("a stored secret was sealed with key id 0123456789abcd")

    reloader.source = broken
    assert not await reloader.reload_once(log_failure=False)
    first = reloader.failing_for()
    await asyncio.sleep(0.05)
    assert not await reloader.reload_once(log_failure=False)
    assert reloader.failing_for() >= first + 0.05  # measured from the first failure
    reloader.source = working
    with caplog.at_level(logging.INFO, logger="aibridgeproxyd.reload"):
        assert await reloader.reload_once() and reloader.failing_for() == 0.0
        assert await reloader.reload_once()
    # The recovery is logged, once: an operator who saw the error sees it end.
    recovered = [r.getMessage() for r in caplog.records if "succeeded again" in r.getMessage()]
    assert len(recovered) == 1 and recovered[0].endswith("s of failures")


class HeldStore(Store):
    """A store whose reads wait for ``release``, one at a time."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.reading = 0  # reads begun
        self.generations_read: list[int] = []

    async def source(self) -> RoutingState:
        self.reading += 1
        generation = self.generation
        await self.release.wait()
        self.release.clear()
        self.generations_read.append(generation)
        return await super().source()


async def test_reload_and_wait_returns_after_a_reload_that_began_after_the_call() -> None:
    """A reload already reading when a write is made read the store before it: the write's
    caller must wait for the next one (the API answering once the daemon applied its write)."""
    store = HeldStore()
    reloader = _reloader(store, 3600)
    reloader.start()
    try:
        reloader.trigger()
        await _until(lambda: store.reading == 1)  # the first reload reads generation 1
        store.generation = 2  # the write, committed
        waiter = asyncio.create_task(reloader.reload_and_wait(5.0))
        await asyncio.sleep(0.05)
        store.release.set()  # the first reload ends
        await _until(lambda: store.reading == 2)  # the second, begun after the call
        assert not waiter.done()
        store.release.set()
        assert await asyncio.wait_for(waiter, 5.0) is True
        assert store.generations_read == [1, 2]
        assert reloader.applied_generation == 2
    finally:
        await reloader.stop()


async def test_reload_and_wait_gives_up_after_its_timeout() -> None:
    store = HeldStore()  # never released: the reload never ends
    reloader = _reloader(store, 3600)
    reloader.start()
    try:
        started = time.monotonic()
        assert await reloader.reload_and_wait(0.3) is False
        assert time.monotonic() - started < 3
    finally:
        await reloader.stop()


async def test_reload_and_wait_does_not_wait_for_a_reloader_that_does_not_run() -> None:
    """An API write while the daemon stops (its reloader stopped, the admin listener not yet
    closed) answers at once instead of waiting out the timeout."""
    store = Store()
    reloader = _reloader(store, 3600)
    reloader.start()
    await reloader.stop()
    started = time.monotonic()
    assert await reloader.reload_and_wait(30.0) is False
    assert time.monotonic() - started < 5
    assert reloader._waiting == []


async def test_a_store_that_pushes_its_changes_is_probed_seldom_and_at_once_when_told() -> None:
    """With a file watch or a LISTEN connection in place (``pushed``) the change probe runs
    every PUSHED_POLL_SECONDS, as a safety net, and at once on ``check_now``; without, every
    CHANGE_POLL_SECONDS."""
    store = Store()
    probes: list[int] = []

    async def probe() -> int:
        probes.append(1)
        return store.generation

    pushed = [True]
    reloader = ProviderReloader(
        store.source,
        SnapshotHolder(),
        Metrics(),
        3600,
        change_probe=probe,
        pushed=lambda: pushed[0],
    )
    assert reloader._poll_seconds() == PUSHED_POLL_SECONDS > CHANGE_POLL_SECONDS
    reloader.start()
    reloader.check_now()  # the first probe now, not after a whole PUSHED_POLL_SECONDS
    try:
        await _until(lambda: store.reads == 1)  # the first reload
        settled = len(probes)
        await asyncio.sleep(CHANGE_POLL_SECONDS * 2.5)
        assert len(probes) == settled  # no polling while pushed
        store.generation += 1
        reloader.check_now()
        await _until(lambda: store.reads == 2)
        pushed[0] = False  # the watch ended: polling again
        reloader.check_now()
        await _until(lambda: len(probes) >= settled + 2)
        store.generation += 1
        await _until(lambda: store.reads == 3, timeout=CHANGE_POLL_SECONDS * 4)
    finally:
        await reloader.stop()
