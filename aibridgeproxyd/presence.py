"""Which store generation each running daemon has applied, so ``tokens revoke`` returns only
once no running daemon accepts the revoked token for new connections
(docs/security.md#token-changes-apply-when-the-command-returns).

A daemon writes ``meta['daemon:<instance>'] = {generation, heartbeat}`` when its snapshot moves
to a newer store generation and every ``HEARTBEAT_SECONDS`` otherwise. After a write, the CLI
reads the new generation and waits (at most ``WAIT_SECONDS``) until every daemon with a recent
heartbeat reports at least that generation. With no live daemon it does not wait; a daemon
that starts later reads the store afresh anyway. A daemon on this machine whose process has
ended (``kill -9``) is not waited for (``aibridgeproxyd.liveness``), however recent its
heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from aibridgeproxyd import store
from aibridgeproxyd.periodic import GRID_SECONDS, PeriodicTask
from aibridgeproxyd.store_access import SqliteAccess, StoreAccess

log = logging.getLogger("aibridgeproxyd.presence")

# Each beat is a write (and a checkpoint): an idle daemon's main cost, so not often. A daemon
# killed without cleaning up is told gone at once on its own machine (its pid), and elsewhere
# once its heartbeat is older than STALE_SECONDS.
HEARTBEAT_SECONDS = 10.0
STALE_SECONDS = 3 * HEARTBEAT_SECONDS
# Only a stuck or failing daemon makes the CLI wait this long; a healthy one confirms in well
# under a second (the file watch or LISTEN wakes its change probe, the reload, this report).
WAIT_SECONDS = 5.0
# A heartbeat tick may come this much early (its wait ends on the periodic tasks' grid, and the
# loop's timers round): it still reports.
_HEARTBEAT_SLACK = 0.1 + GRID_SECONDS / 2


class DaemonPresence:
    """The daemon side: reports ``applied()`` (the store generation its snapshot reflects, or
    None before it knows) for as long as it runs: every ``HEARTBEAT_SECONDS``, and at once on
    ``wake()``, which the daemon calls when its applied generation moves (no polling between)."""

    def __init__(
        self,
        database: Path | StoreAccess,
        applied: Callable[[], int | None],
        key_ids: Callable[[], Sequence[str]] = tuple,
    ) -> None:
        self.key_ids = key_ids  # the encryption keys this daemon holds (keys rotate checks)
        # A SQLite file (its path), or the daemon's access to either engine.
        self.access = SqliteAccess(database) if isinstance(database, Path) else database
        self.applied = applied
        self.instance = uuid.uuid4().hex
        self._checks = PeriodicTask("daemon-presence", HEARTBEAT_SECONDS, self._check, log=log)
        self._reported: int | None = None
        self._reported_at = float("-inf")

    async def _check(self) -> None:
        """Report at once when the applied generation moved, else every ``HEARTBEAT_SECONDS``.
        A failed write is retried at the next heartbeat."""
        generation = self.applied()
        if generation is not None and (
            generation != self._reported
            or time.monotonic() - self._reported_at >= HEARTBEAT_SECONDS - _HEARTBEAT_SLACK
        ):
            await self._report(generation)

    def wake(self) -> None:
        """The applied generation moved: report it now, not at the next heartbeat."""
        self._checks.wake()

    async def _report(self, generation: int) -> None:
        try:
            await self.access.write_presence(self.instance, generation, time.time(), self.key_ids())
            self._reported = generation
        except store.StoreError as exc:
            # The reload reports database trouble; retry at the next heartbeat.
            log.debug("cannot report daemon presence: %s", exc)
        self._reported_at = time.monotonic()

    async def start(self) -> None:
        """Report once now, before the listener opens (so a ``tokens revoke`` right after
        start-up waits for this daemon), then keep reporting in a task."""
        generation = self.applied()
        if generation is not None:
            await self._report(generation)
        self._checks.start()

    async def stop(self) -> None:
        await self._checks.stop()
        with contextlib.suppress(store.StoreError):
            await self.access.remove_presence(self.instance)


async def daemons_without_key(
    db: store.Store, key_id: str, clock: Callable[[], float] = time.time
) -> list[str]:
    """The running daemons (a recent heartbeat) that do not hold encryption key ``key_id``,
    each as ``pid N``: ``keys rotate`` refuses while there is one, since everything it seals
    with that key would be unreadable to them (their reloads would fail, and a token revoked
    meanwhile would keep working on them)."""
    now = clock()
    return [
        f"pid {report.pid}" if report.pid is not None else f"instance {instance}"
        for instance, report in (await store.daemon_reports(db)).items()
        if now - report.heartbeat < STALE_SECONDS
        and not report.gone()
        and (report.key_ids is None or key_id not in report.key_ids)
    ]


async def wait_for_daemons(
    db: store.Store, timeout: float = WAIT_SECONDS, clock: Callable[[], float] = time.time
) -> bool:
    """The CLI side, right after a write: wait until every live daemon has applied the store's
    current generation. True when they all have (or none runs), False after ``timeout``."""
    target = await db.generation()
    deadline = time.monotonic() + timeout
    # A daemon live and behind when the wait began stays awaited even if its heartbeat goes
    # stale meanwhile (a stopped or stuck process): it has not applied the write, so the CLI
    # must not say it has.
    awaited: set[str] | None = None
    while True:
        now = clock()
        behind = {
            instance
            for instance, report in (await store.daemon_reports(db)).items()
            if report.generation < target
            and (
                now - report.heartbeat < STALE_SECONDS
                or (awaited is not None and instance in awaited)
            )
            and not report.gone()
        }
        if awaited is None:
            awaited = behind
        if not behind:
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.02)  # polling a row another process updates
