"""Background work that runs every so often until the daemon stops: the provider reload, the
daemon presence report, the interception purge, memory housekeeping, the stall watch and leaf
renewal all tick through one ``PeriodicTask``.

A tick that raises is logged with its traceback and the loop carries on: a sweep or a report
that fails once (a locked database, a bug hit by one odd connection) must not stop every later
one for the rest of the process. The wait after a failed tick is at least
``FAILURE_BACKOFF_SECONDS``, so a tick that fails every time never spins the CPU, floods the log
or hammers the store, whatever interval its caller computes.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Callable

# Sync or async; what it returns (or its awaitable returns) is ignored.
Tick = Callable[[], object]

FAILURE_BACKOFF_SECONDS = 1.0
# Waits of at least this long end on a grid of the loop's clock with this step (seconds), so
# the tasks of an idle daemon wake it together instead of each on its own: a wakeup after a
# pause costs more than most ticks' work. Such a wait ends up to half a step early or late.
GRID_SECONDS = 0.5


class PeriodicTask:
    """Calls ``tick`` (sync or async) in a task named ``name``, from ``start`` until ``stop``.

    ``interval``: seconds from the end of one tick to the start of the next, or a function
    returning them, asked before each wait (so a caller can shorten the wait as a deadline
    nears); from ``GRID_SECONDS`` up, the wait ends on the nearest point of that grid. With
    ``tick_first`` the first tick runs at ``start``, else after one interval.
    ``wake`` cuts the current wait short. An exception from ``tick`` is logged on ``log`` as
    ``failure`` (default ``"<name> failed"``) with its traceback, and the next tick still comes,
    after at least ``FAILURE_BACKOFF_SECONDS`` (a wake does not cut that wait short).
    """

    def __init__(
        self,
        name: str,
        interval: float | Callable[[], float],
        tick: Tick,
        *,
        log: logging.Logger,
        failure: str | None = None,
        tick_first: bool = False,
    ) -> None:
        self.name = name
        self._interval = interval
        self._tick = tick
        self._log = log
        self._failure = failure or f"{name} failed"
        self._tick_first = tick_first
        self._woken = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start ticking, in a task of the running loop; nothing happens if already running."""
        if not self.running:
            self._task = asyncio.create_task(self._run(), name=self.name)

    def wake(self) -> None:
        """Tick now instead of at the end of the current wait (or at once after the running
        tick). Safe to call before ``start``: the first wait is then cut short."""
        self._woken.set()

    async def stop(self) -> None:
        """Cancel the task and wait until it has ended; a tick in progress is cancelled where it
        awaits. Nothing happens if it is not running."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            # The task's own cancellation ends here; a cancellation of the caller goes on.
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise

    async def _run(self) -> None:
        failed = await self._tick_once() if self._tick_first else False
        while True:
            if failed:
                await asyncio.sleep(FAILURE_BACKOFF_SECONDS)
            interval = self._interval() if callable(self._interval) else self._interval
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(
                    wait_end(asyncio.get_running_loop().time(), interval)
                ):
                    await self._woken.wait()
            # Cleared before the tick: a wake during the tick makes the next one come at once.
            self._woken.clear()
            failed = await self._tick_once()

    async def _tick_once(self) -> bool:
        """Run one tick; True when it raised (logged here)."""
        try:
            result = self._tick()
            if inspect.isawaitable(result):
                await result
        except Exception:
            self._log.exception(self._failure)
            return True
        return False


def wait_end(now: float, interval: float) -> float:
    """When a wait of ``interval`` seconds from ``now`` (the loop's clock) ends: on the nearest
    point of the ``GRID_SECONDS`` grid for an interval that long, else exactly."""
    end = now + max(0.0, interval)
    if interval < GRID_SECONDS:
        return end
    return round(end / GRID_SECONDS) * GRID_SECONDS
