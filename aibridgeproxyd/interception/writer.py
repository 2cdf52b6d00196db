"""Interception records: written in batches off the request path, purged after ``retention``.

A proxied request must never wait for, or fail because of, the database. ``submit`` only puts
the record on a bounded queue; a background task writes batches. When the queue is full or a
write fails, records are dropped, counted and logged (rate-limited), never retried forever.

What ``submit`` accepted is either written or counted as dropped, never lost silently:

- a graceful stop (``stop``) writes everything accepted so far, the batch being gathered
  included, before the connection is closed;
- before each batch the database path is compared with the file the connection holds. When the
  file was deleted or replaced, the connection is closed (a write would land in an unlinked
  inode that nobody can read) and the path reopened; when nothing is there, the batch is
  dropped as ``database_missing``. A database is never recreated here;
- a PostgreSQL database that cannot be reached (``StoreUnavailable``: a restart, a network
  loss) is waited for: the batch in hand is retried every ``RETRY_SECONDS`` while new records
  queue, within the queue's bounds, and anything past them is counted as ``queue_full``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import functools
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

from aibridgeproxyd.database_url import DatabaseUrl
from aibridgeproxyd.metrics import Metrics
from aibridgeproxyd.model import InterceptionRecord
from aibridgeproxyd.periodic import PeriodicTask
from aibridgeproxyd.store import DatabaseMissing, RecordError, Store, StoreError, StoreUnavailable

log = logging.getLogger("aibridgeproxyd.interceptions")

QUEUE_LIMIT = 10_000
# The queue also holds what records carry besides their fields (prompt, tool calls, thoughts:
# each up to record_max_bytes): past this many bytes of it, records are dropped as queue_full.
QUEUE_BYTES_LIMIT = 256 * 1024 * 1024
# What a record's fixed fields cost in the queue's byte count, roughly.
RECORD_BASE_BYTES = 1024
BATCH_LIMIT = 500
# How long a batch gathers before it is written (unless full first). Each batch costs a
# transaction and a checkpoint (an fsync of the database file): at a modest rate that fixed
# cost, not the rows, is most of the writer's CPU, and it competes with the streams for the
# cores (bench/RESULTS.md, "Recording on, round 4": 0.5 s cost 6% more proxy CPU per SSE
# stream and 14% more added delay per event than 1 s).
FLUSH_SECONDS = 1.0
PURGE_EVERY_SECONDS = 3600.0
DROP_LOG_EVERY_SECONDS = 60.0
# How long a graceful stop may spend writing what is queued before it counts the rest dropped.
STOP_FLUSH_SECONDS = 10.0
# How often a batch is tried again while the database cannot be reached.
RETRY_SECONDS = 1.0


# 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z in Unix seconds: what ``datetime`` can hold.
_FIRST_SECOND = -62_135_596_800
_LAST_SECOND = 253_402_300_799


def rfc3339_ms(timestamp: float) -> str:
    """``2026-11-26T17:33:00.123Z``: fixed width, so stored timestamps sort as text. The
    moment is ``timestamp`` (Unix seconds) rounded to the microsecond as ``datetime`` rounds
    it, then cut to the millisecond; integer arithmetic, since this runs twice per record.
    ValueError for a moment outside years 1-9999 (as ``datetime`` refuses it), or NaN."""
    if not _FIRST_SECOND <= timestamp < _LAST_SECOND + 1:
        raise ValueError(f"timestamp {timestamp!r} is outside the years 1 to 9999")
    # CPython's own steps (``_PyTime_ObjectToTimeval``, round half to even): the fraction
    # first, then its microseconds.
    fraction, whole = math.modf(timestamp)
    seconds, microseconds = int(whole), round(fraction * 1e6)
    if microseconds >= 1_000_000:
        seconds, microseconds = seconds + 1, microseconds - 1_000_000
    elif microseconds < 0:
        seconds, microseconds = seconds - 1, microseconds + 1_000_000
    return _second_text(seconds) + f"{microseconds // 1000:03d}Z"


@functools.lru_cache(maxsize=64)
def _second_text(seconds: int) -> str:
    """``2026-11-26T17:33:00.``: formatted once per second (``strftime`` is most of the
    cost)."""
    moment = time.gmtime(seconds)
    # By hand, not strftime: %Y of a year before 1000 is not padded to four digits by glibc.
    return (
        f"{moment.tm_year:04d}-{moment.tm_mon:02d}-{moment.tm_mday:02d}"
        f"T{moment.tm_hour:02d}:{moment.tm_min:02d}:{moment.tm_sec:02d}."
    )


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
            f"invalid timestamp {text!r}: expected RFC 3339 or a date (UTC), "
            "e.g. 2026-11-26T17:33:00Z or 2026-11-26"
        ) from None
    if moment.tzinfo is None:
        raise ValueError(f"invalid timestamp {text!r}: a time zone is required, e.g. a trailing Z")
    return rfc3339_ms(moment.timestamp())


def record_bytes(record: InterceptionRecord) -> int:
    """What a queued record holds, roughly: a fixed part for its fields plus the characters of
    every text a client or a model chose (prompt, tool calls, thoughts, tool-result ids,
    User-Agent, session id). ``QUEUE_BYTES_LIMIT`` bounds the sum. Characters, not bytes: a
    text with one astral character takes 4 bytes per character in memory."""
    texts = (record.prompt, record.user_agent, record.client_session_id)
    size = RECORD_BASE_BYTES + sum(len(text) for text in texts if text)
    size += sum(len(call.input) + len(call.tool) + 32 for call in record.tool_calls)
    size += sum(len(result_id) for result_id in record.tool_result_ids)
    return size + sum(len(thought) for thought in record.thoughts)


class InterceptionWriter:
    """The background writer of interception records (see the module docstring).

    ``start`` on the running loop, ``submit`` from hooks, ``stop`` once at shutdown. Drops are
    counted in ``interception_records_dropped_total{reason}``: ``queue_full``,
    ``write_failed``, ``database_missing``, ``shutdown`` (submitted after ``stop``, or not
    written within ``STOP_FLUSH_SECONDS`` of it)."""

    def __init__(
        self,
        database: Path | DatabaseUrl,
        metrics: Metrics,
        retention: float,
        clock: Callable[[], float] = time.time,
        queue_limit: int = QUEUE_LIMIT,
        queue_bytes_limit: int = QUEUE_BYTES_LIMIT,
    ) -> None:
        self.database = database
        self.metrics = metrics
        self.retention = retention
        self.clock = clock
        self.queue_limit = queue_limit
        self.queue_bytes_limit = queue_bytes_limit
        self._queued_bytes = 0  # record_bytes of every record on the queue
        self._queue: collections.deque[InterceptionRecord] = collections.deque()
        # Taken off the queue, not yet committed: still owed to the database.
        self._in_hand: list[InterceptionRecord] = []
        self._queued = asyncio.Event()
        self._stopping = asyncio.Event()
        self._stopped = False
        self._store: Store | None = None
        self._writer_task: asyncio.Task[None] | None = None
        self._purges = PeriodicTask(
            "interception-purge", PURGE_EVERY_SECONDS, self.purge_once, log=log, tick_first=True
        )
        self._last_drop_log: dict[str, float] = {}

    @property
    def pending(self) -> int:
        """Records accepted and not yet written (queued, or in the batch being written)."""
        return len(self._queue) + len(self._in_hand)

    # --- request path: never blocks ---

    def submit(self, record: InterceptionRecord) -> bool:
        """Queue a record; False when it had to be dropped (counted and logged)."""
        if self._stopped:
            self._dropped(1, "shutdown", "the writer has stopped")
            return False
        size = record_bytes(record)
        if (
            len(self._queue) >= self.queue_limit
            or self._queued_bytes + size > self.queue_bytes_limit
        ):
            self._dropped(1, "queue_full")
            return False
        self._queue.append(record)
        self._queued_bytes += size
        self._queued.set()
        return True

    def _dropped(self, count: int, reason: str, detail: str = "") -> None:
        self.metrics.interception_records_dropped.labels(reason).inc(count)
        # Rate-limited per reason, so a steady trickle of one kind cannot hide another.
        now = time.monotonic()
        last = self._last_drop_log.get(reason)
        if last is None or now - last >= DROP_LOG_EVERY_SECONDS:
            self._last_drop_log[reason] = now
            log.warning(
                "dropped %d interception record(s): %s%s",
                count,
                reason,
                f" ({detail})" if detail else "",
                extra={"reason": reason, "count": count},
            )

    # --- background ---

    async def _connection(self) -> Store:
        """The open store, after checking that its file is still the one at ``database``."""
        if self._store is not None:
            state = self._store.file_state()
            if state != "same":
                log.warning(
                    "database %s was %s while the daemon had it open; reopening it",
                    self.database,
                    "deleted" if state == "missing" else "replaced",
                )
                await self._reset_connection()
        if self._store is None:
            # No migration: a file put there by someone else is used only if it is already a
            # complete database of this version.
            self._store = await Store.open(self.database, create=False, migrate=False)
        return self._store

    async def _write(self, batch: list[InterceptionRecord]) -> bool:
        """Write ``batch`` (or drop and count what cannot be written); False when the database
        cannot be reached and the batch is still owed (``StoreUnavailable``)."""
        try:
            store = await self._connection()
            await store.insert_interceptions(batch)
            await store.checkpoint()
        except StoreUnavailable as exc:
            self._unavailable(exc)
            return False
        except DatabaseMissing as exc:
            self._dropped(len(batch), "database_missing", str(exc))
        except RecordError as exc:  # a value of one record
            await self._isolate(batch, exc)
        except Exception as exc:  # the database itself (locked, corrupt, full), or a bug
            self._dropped(len(batch), "write_failed", str(exc) or type(exc).__name__)
            await self._reset_connection()
        return True

    async def _write_until_done(self, batch: list[InterceptionRecord]) -> None:
        """``_write``, tried again every ``RETRY_SECONDS`` while the database cannot be
        reached (a stop bounds the wait: see ``stop``)."""
        while not await self._write(batch):
            await asyncio.sleep(RETRY_SECONDS)

    def _unavailable(self, exc: StoreUnavailable) -> None:
        now = time.monotonic()
        last = self._last_drop_log.get("unavailable")
        if last is None or now - last >= DROP_LOG_EVERY_SECONDS:
            self._last_drop_log["unavailable"] = now
            log.warning("cannot write interception records yet (%d waiting): %s", self.pending, exc)

    async def _isolate(self, batch: list[InterceptionRecord], exc: Exception) -> None:
        """A batch failed on a record's data, not on the database (``RecordError``): write its
        halves apart, so only the record at fault is dropped, never the others (bisection:
        about 2 log2(batch) writes per bad record)."""
        if len(batch) == 1:
            self._dropped(1, "write_failed", f"{type(exc).__name__}: {exc}")
            return
        middle = len(batch) // 2
        await self._write_until_done(batch[:middle])
        await self._write_until_done(batch[middle:])

    async def _reset_connection(self) -> None:
        store, self._store = self._store, None
        if store is not None:
            with contextlib.suppress(Exception):
                await store.close()

    def _take_batch(self) -> list[InterceptionRecord]:
        count = min(len(self._queue), BATCH_LIMIT)
        batch = [self._queue.popleft() for _ in range(count)]
        self._queued_bytes -= sum(record_bytes(record) for record in batch)
        return batch

    async def _write_loop(self) -> None:
        """Write batches until ``stop``, then everything still queued, then return."""
        while True:
            if not self._queue:
                if self._stopping.is_set():
                    return
                self._queued.clear()
                await _first(self._queued, self._stopping)
                continue
            if not self._stopping.is_set() and len(self._queue) < BATCH_LIMIT:
                # Let a burst accumulate: one transaction for many records. A full batch goes
                # at once; a stop cuts the wait short, and the records are written either way.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), FLUSH_SECONDS)
            # Held until committed: if a stop runs out of time mid-write, ``pending`` still
            # counts this batch, and it is reported dropped rather than lost.
            self._in_hand = self._take_batch()
            await self._write_until_done(self._in_hand)
            self._in_hand = []

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

    def start(self) -> None:
        self._writer_task = asyncio.create_task(self._write_loop(), name="interception-writer")
        self._purges.start()

    async def stop(self, flush_timeout: float = STOP_FLUSH_SECONDS) -> None:
        """Write every record accepted so far, then close. Records still unwritten after
        ``flush_timeout`` (a database locked for that long) are counted as ``shutdown`` drops.
        Later ``submit`` calls drop and count."""
        await self._purges.stop()
        self._stopping.set()
        writer = self._writer_task
        if writer is None:  # never started: write what was queued in one go
            writer = asyncio.create_task(self._write_loop(), name="interception-writer")
        done, _ = await asyncio.wait([writer], timeout=flush_timeout)
        if not done:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
        elif not writer.cancelled() and (exc := writer.exception()) is not None:
            log.error("interception writer failed: %s", exc)
        self._stopped = True
        if self.pending:
            self._dropped(self.pending, "shutdown", f"not written within {flush_timeout:g}s")
            self._queue.clear()
            self._queued_bytes = 0
            self._in_hand = []
        await self._reset_connection()


async def _first(*events: asyncio.Event) -> None:
    """Return as soon as one of ``events`` is set."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
