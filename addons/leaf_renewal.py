"""Periodically evict MITM leaf certificates that are about to expire (see
``aibridgeproxyd.mitm.leaf_certs``)."""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable

from aibridgeproxyd.mitm.leaf_certs import evict_expiring, running_cert_store
from aibridgeproxyd.periodic import PeriodicTask

log = logging.getLogger("aibridgeproxyd.certs")

SWEEP_INTERVAL_SECONDS = 3600.0


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class LeafRenewal:
    """From ``running`` until ``done``, evicts cached MITM leaf certificates close to expiry, so the
    next handshake gets a fresh one."""

    def __init__(
        self,
        clock: Callable[[], datetime.datetime] = utc_now,
        interval: float = SWEEP_INTERVAL_SECONDS,
    ) -> None:
        self.clock = clock
        self.interval = interval
        self._sweeps = PeriodicTask("leaf-renewal", interval, self.sweep, log=log)

    def sweep(self) -> int:
        store = running_cert_store()
        if store is None:
            return 0
        evicted = evict_expiring(store, self.clock())
        if evicted:
            log.info("renewing %d MITM leaf certificate(s) close to expiry", evicted)
        return evicted

    def running(self) -> None:
        self._sweeps.start()

    async def done(self) -> None:
        await self._sweeps.stop()
