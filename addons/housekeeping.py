"""Give memory back after bursts of connections.

mitmproxy's per-connection objects sit in reference cycles, so they are freed only by a full
garbage collection, and glibc keeps freed memory in its arenas. After a burst of connections the
daemon's RSS would stay at its peak. When many connections have closed since the last pass, or
many buffered bytes were given back (large request bodies, HTTP/2 response buffers: see
``aibridgeproxyd.mitm.memory_budget``), a full collection and ``malloc_trim`` return that memory to
the system.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import logging

from mitmproxy import connection

from aibridgeproxyd.mitm.memory_budget import BUDGET, SWEEP_AFTER_RELEASED
from aibridgeproxyd.periodic import PeriodicTask

log = logging.getLogger("aibridgeproxyd.memory")

# An idle daemon wakes for this check only every CHECK_SECONDS (each wake costs CPU); a burst of
# closed connections wakes it at once.
CHECK_SECONDS = 5.0
MIN_SECONDS_BETWEEN_SWEEPS = 10.0
MIN_CLOSED_CONNECTIONS = 100


def _malloc_trim() -> None:
    name = ctypes.util.find_library("c")
    if name is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(name).malloc_trim(0)


class MemoryHousekeeping:
    """Counts closed connections (``client_disconnected``) and, from ``running``, periodically runs
    a full collection and ``malloc_trim`` after a burst."""

    def __init__(self, min_closed: int = MIN_CLOSED_CONNECTIONS) -> None:
        self.min_closed = min_closed
        self.closed_since_sweep = 0
        self._last_sweep = 0.0
        self._checks = PeriodicTask("memory-housekeeping", CHECK_SECONDS, self._check, log=log)

    def client_disconnected(self, client: connection.Client) -> None:
        self.closed_since_sweep += 1
        if self.closed_since_sweep == self.min_closed:
            self._checks.wake()

    async def sweep(self) -> None:
        self.closed_since_sweep = 0
        BUDGET.released = 0
        collected = gc.collect()
        await asyncio.to_thread(_malloc_trim)
        log.debug("memory housekeeping: %d objects collected", collected)

    async def _check(self) -> None:
        now = asyncio.get_running_loop().time()
        if (
            self.closed_since_sweep >= self.min_closed or BUDGET.released >= SWEEP_AFTER_RELEASED
        ) and now - self._last_sweep >= MIN_SECONDS_BETWEEN_SWEEPS:
            self._last_sweep = now
            await self.sweep()

    def running(self) -> None:
        # Objects alive after start-up (modules, config, the CA) never become garbage: keep them
        # out of every future collection.
        gc.collect()
        gc.freeze()
        self._checks.start()

    async def done(self) -> None:
        await self._checks.stop()
