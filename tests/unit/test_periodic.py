"""The periodic background-task helper (``aibridgeproxyd.periodic``)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import pytest

from aibridgeproxyd.periodic import GRID_SECONDS, PeriodicTask, wait_end

log = logging.getLogger("tests.periodic")


async def _until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


async def test_ticks_every_interval_until_stopped() -> None:
    ticks: list[float] = []

    async def tick() -> None:
        ticks.append(time.monotonic())

    task = PeriodicTask("test-ticks", 0.01, tick, log=log)
    task.start()
    assert task.running
    await _until(lambda: len(ticks) >= 3)
    await task.stop()
    assert not task.running
    after_stop = len(ticks)
    await asyncio.sleep(0.05)  # several intervals: no tick comes after stop
    assert len(ticks) == after_stop


async def test_a_tick_that_raises_is_logged_and_the_next_tick_still_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls = []

    def tick() -> None:  # a sync tick
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")

    task = PeriodicTask("test-raises", 0.01, tick, log=log, failure="sweep failed")
    with caplog.at_level(logging.ERROR, "tests.periodic"):
        task.start()
        await _until(lambda: len(calls) >= 2)
        await task.stop()
    (record,) = [r for r in caplog.records if r.name == "tests.periodic"]
    assert record.getMessage() == "sweep failed"
    assert record.exc_info is not None and "boom" in str(record.exc_info[1])


async def test_the_default_failure_message_names_the_task(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def tick() -> None:
        raise ValueError("bad")

    task = PeriodicTask("test-named", 60, tick, log=log, tick_first=True)
    with caplog.at_level(logging.ERROR, "tests.periodic"):
        task.start()
        await _until(lambda: any(r.name == "tests.periodic" for r in caplog.records))
        await task.stop()
    assert caplog.records[0].getMessage() == "test-named failed"


async def test_tick_first_ticks_at_start_then_waits_a_whole_interval() -> None:
    calls: list[int] = []
    task = PeriodicTask("test-first", 60, lambda: calls.append(1), log=log, tick_first=True)
    task.start()
    await _until(lambda: calls == [1])
    await asyncio.sleep(0.02)
    assert calls == [1]
    await task.stop()


async def test_without_tick_first_the_first_tick_waits_an_interval() -> None:
    calls: list[int] = []
    task = PeriodicTask("test-wait", 60, lambda: calls.append(1), log=log)
    task.start()
    await asyncio.sleep(0.02)
    assert calls == []
    await task.stop()


async def test_wake_cuts_the_wait_short() -> None:
    calls: list[int] = []
    task = PeriodicTask("test-wake", 60, lambda: calls.append(1), log=log)
    task.start()
    task.wake()
    await _until(lambda: calls == [1])
    await task.stop()


async def test_a_wake_during_a_tick_brings_the_next_tick_at_once() -> None:
    calls: list[int] = []
    task: PeriodicTask

    def tick() -> None:
        calls.append(1)
        if len(calls) == 1:
            task.wake()

    task = PeriodicTask("test-wake-during", 60, tick, log=log, tick_first=True)
    task.start()
    await _until(lambda: len(calls) == 2)
    await task.stop()


async def test_the_interval_function_is_asked_before_each_wait() -> None:
    asked: list[int] = []
    calls: list[int] = []

    def interval() -> float:
        asked.append(1)
        return 0.0 if len(asked) < 3 else 60.0

    task = PeriodicTask("test-interval", interval, lambda: calls.append(1), log=log)
    task.start()
    await _until(lambda: len(calls) == 2 and len(asked) == 3)
    await asyncio.sleep(0.02)
    assert len(calls) == 2  # the third wait is 60 s
    await task.stop()


async def test_stop_cancels_a_tick_in_progress_and_ends_the_task() -> None:
    entered = asyncio.Event()
    cancelled: list[bool] = []

    async def tick() -> None:
        entered.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    task = PeriodicTask("test-stop", 60, tick, log=log, tick_first=True)
    task.start()
    await asyncio.wait_for(entered.wait(), 5)
    await task.stop()
    assert cancelled == [True] and not task.running


async def test_stop_before_start_and_start_twice_are_harmless() -> None:
    calls: list[int] = []
    task = PeriodicTask("test-idempotent", 60, lambda: calls.append(1), log=log, tick_first=True)
    await task.stop()
    task.start()
    task.start()  # still one task: one first tick
    await _until(lambda: calls == [1])
    await asyncio.sleep(0.02)
    assert calls == [1]
    await task.stop()
    await task.stop()


async def test_a_tick_that_fails_every_time_waits_between_failures() -> None:
    """Whatever interval the caller computes (here 0: a deadline already past), a failing tick
    is retried only after FAILURE_BACKOFF_SECONDS: no CPU spin, no log flood (found by the
    security review on the provider reload)."""
    calls = 0

    def failing() -> None:
        nonlocal calls
        calls += 1
        raise ValueError("broken")

    task = PeriodicTask("failing", 0.0, failing, log=logging.getLogger("test.periodic"))
    task.start()
    await asyncio.sleep(0.5)
    await task.stop()
    assert 1 <= calls <= 2


@pytest.mark.parametrize(
    ("now", "interval", "end"),
    [
        (10.013, GRID_SECONDS, 10.5),  # a tick that ended just after a grid point
        (10.013, 2 * GRID_SECONDS, 11.0),
        (10.2, 4 * GRID_SECONDS, 12.0),  # nearest point: up to half a step early
        (10.3, GRID_SECONDS, 11.0),  # or late
        (10.013, 0.07, 10.083),  # a short wait is not moved
        (10.013, 0.0, 10.013),
    ],
)
def test_a_long_wait_ends_on_the_nearest_grid_point(
    now: float, interval: float, end: float
) -> None:
    assert wait_end(now, interval) == pytest.approx(end)


async def test_tasks_started_between_grid_points_tick_on_them() -> None:
    """Two tasks with intervals of one and two steps, started midway between grid points of
    the loop's clock, tick on grid points (give or take the timers' lateness), so an idle
    loop wakes for them together."""
    loop = asyncio.get_running_loop()
    ticks: list[float] = []
    await asyncio.sleep(GRID_SECONDS * 1.5 - loop.time() % GRID_SECONDS)  # midway
    tasks = [
        PeriodicTask(f"test-{n}", n * GRID_SECONDS, lambda: ticks.append(loop.time()), log=log)
        for n in (1, 2)
    ]
    for task in tasks:
        task.start()
    await _until(lambda: len(ticks) >= 4)
    for task in tasks:
        await task.stop()
    for at in ticks:
        off_grid = at % GRID_SECONDS
        assert min(off_grid, GRID_SECONDS - off_grid) < GRID_SECONDS / 4, (at, off_grid)
