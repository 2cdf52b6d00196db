"""Periodically evict MITM leaf certificates that are about to expire (see
``aibridgeproxyd.mitm.leaf_certs``)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
from collections.abc import Callable

from mitmproxy import ctx

from aibridgeproxyd.mitm.leaf_certs import evict_expiring

log = logging.getLogger("aibridgeproxyd.certs")

SWEEP_INTERVAL_SECONDS = 3600.0


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class LeafRenewal:
    def __init__(
        self,
        clock: Callable[[], datetime.datetime] = utc_now,
        interval: float = SWEEP_INTERVAL_SECONDS,
    ) -> None:
        self.clock = clock
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    def sweep(self) -> int:
        tlsconfig = ctx.master.addons.get("tlsconfig")
        if tlsconfig is None or tlsconfig.certstore is None:
            return 0
        evicted = evict_expiring(tlsconfig.certstore, self.clock())
        if evicted:
            log.info("renewing %d MITM leaf certificate(s) close to expiry", evicted)
        return evicted

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.sweep()

    def running(self) -> None:
        self._task = asyncio.create_task(self._run(), name="leaf-renewal")

    async def done(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
