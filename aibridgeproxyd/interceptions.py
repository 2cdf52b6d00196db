"""Interception records: written in batches off the request path, purged after ``retention``.

A proxied request must never wait for, or fail because of, the database. ``submit`` only puts
the record on a bounded queue; a background task writes batches. When the queue is full or a
write fails, records are dropped, counted and logged (rate-limited), never retried forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path

from aibridgeproxyd.metrics import Metrics
from aibridgeproxyd.model import InterceptionRecord
from aibridgeproxyd.store import Store, StoreError

log = logging.getLogger("aibridgeproxyd.interceptions")

QUEUE_LIMIT = 10_000
BATCH_LIMIT = 500
FLUSH_SECONDS = 0.5
PURGE_EVERY_SECONDS = 3600.0
DROP_LOG_EVERY_SECONDS = 60.0


def rfc3339_ms(timestamp: float) -> str:
    """``2026-11-26T17:33:00.123Z``: fixed width, so stored timestamps sort as text."""
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def parse_timestamp(text: str) -> str:
    """An RFC 3339 timestamp (or a bare date) from the CLI, as stored text. ValueError if not."""
    value = text.strip()
    try:
        if len(value) == 10:
            moment = datetime.datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=datetime.UTC)
        else:
            moment = datetime.datetime.fromisoformat(value.replace("z", "Z"))
    except ValueError:
        raise ValueError(
            f"invalid timestamp {text!r}: expected RFC 3339, e.g. 2026-11-26T17:33:00Z"
        ) from None
    if moment.tzinfo is None:
        raise ValueError(f"invalid timestamp {text!r}: a time zone is required, e.g. a trailing Z")
    return rfc3339_ms(moment.timestamp())


class InterceptionWriter:
    def __init__(
        self,
        database: Path,
        metrics: Metrics,
        retention: float,
        clock: Callable[[], float] = time.time,
        queue_limit: int = QUEUE_LIMIT,
    ) -> None:
        self.database = database
        self.metrics = metrics
        self.retention = retention
        self.clock = clock
        self.queue: asyncio.Queue[InterceptionRecord] = asyncio.Queue(queue_limit)
        self._store: Store | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._last_drop_log = 0.0

    # --- request path: never blocks ---

    def submit(self, record: InterceptionRecord) -> bool:
        """Queue a record; False when it had to be dropped."""
        try:
            self.queue.put_nowait(record)
        except asyncio.QueueFull:
            self._dropped(1, "queue_full")
            return False
        return True

    def _dropped(self, count: int, reason: str, detail: str = "") -> None:
        self.metrics.interception_records_dropped.labels(reason).inc(count)
        now = time.monotonic()
        if now - self._last_drop_log >= DROP_LOG_EVERY_SECONDS:
            self._last_drop_log = now
            log.warning("dropped %d interception record(s): %s %s", count, reason, detail)

    # --- background ---

    async def _connection(self) -> Store:
        if self._store is None:
            self._store = await Store.open(self.database, create=False)
        return self._store

    async def _write(self, batch: list[InterceptionRecord]) -> None:
        try:
            store = await self._connection()
            await store.insert_interceptions(batch)
        except (StoreError, OSError) as exc:
            self._dropped(len(batch), "write_failed", str(exc))
            await self._reset_connection()

    async def _reset_connection(self) -> None:
        store, self._store = self._store, None
        if store is not None:
            with contextlib.suppress(Exception):
                await store.close()

    def _take_batch(self, first: InterceptionRecord) -> list[InterceptionRecord]:
        batch = [first]
        while len(batch) < BATCH_LIMIT:
            try:
                batch.append(self.queue.get_nowait())
            except asyncio.QueueEmpty:
                break
        return batch

    async def _write_loop(self) -> None:
        while True:
            first = await self.queue.get()
            # Let a burst accumulate: one transaction for many records.
            await asyncio.sleep(FLUSH_SECONDS)
            await self._write(self._take_batch(first))

    async def purge_once(self) -> int:
        cutoff = rfc3339_ms(self.clock() - self.retention)
        try:
            store = await self._connection()
            purged = await store.purge_interceptions(cutoff)
        except (StoreError, OSError) as exc:
            log.warning("interception purge failed: %s", exc)
            await self._reset_connection()
            return 0
        if purged:
            log.info("purged %d interception record(s) started before %s", purged, cutoff)
        return purged

    async def _purge_loop(self) -> None:
        while True:
            await self.purge_once()
            await asyncio.sleep(PURGE_EVERY_SECONDS)

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._write_loop(), name="interception-writer"),
            asyncio.create_task(self._purge_loop(), name="interception-purge"),
        ]

    async def stop(self, flush_timeout: float = 5.0) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        pending: list[InterceptionRecord] = []
        while not self.queue.empty():
            pending.append(self.queue.get_nowait())
        if pending:
            try:
                await asyncio.wait_for(self._write(pending), flush_timeout)
            except TimeoutError:
                self._dropped(len(pending), "shutdown")
        await self._reset_connection()


_MODEL_SCAN_BYTES = 64 * 1024


def request_model(body: bytes | None) -> str | None:
    """The ``model`` of a JSON request body, read cheaply from its first 64 KiB.

    Inside a JSON string every quote is escaped, so ``"model":`` can only be a key; the first
    one is the top-level key in every provider's request format."""
    if not body:
        return None
    match = _MODEL_KEY.search(body, 0, _MODEL_SCAN_BYTES)
    if match is None:
        return None
    try:
        return match.group(1).decode("utf-8")
    except UnicodeDecodeError:
        return None


_MODEL_KEY = re.compile(rb'"model"\s*:\s*"((?:[^"\\]|\\.){1,200})"')
