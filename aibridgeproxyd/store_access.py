"""The daemon's reads of its store, whichever the engine (CONTRACT 7 and 14).

What a running daemon asks of the store besides the admin API's reads and the interception
writer: the routing state of each reload, the change probe that notices management writes
(the store's generation), proxy tokens re-read before one is refused, and its presence report.
``SqliteAccess`` opens the file per read (and probes the generation only when the file changed,
which an inotify watch of its directory tells at once: ``aibridgeproxyd.file_watch``);
``PostgresAccess`` keeps one connection for them and a second that ``LISTEN``s for the
payload-free notification every management write sends, so a write made through any replica
reaches every replica at once; the reload timer stays the fallback for a lost notification.

Both track how long the database has been unreachable (``unreachable_for``): ``/readyz`` turns
503 once that exceeds ``reload_interval`` while routing keeps its last snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Protocol, TypeVar

import asyncpg

from aibridgeproxyd import postgres, store
from aibridgeproxyd.database_url import DatabaseUrl
from aibridgeproxyd.file_watch import FileWatch
from aibridgeproxyd.sealing import Keyring

log = logging.getLogger("aibridgeproxyd.store")

T = TypeVar("T")
# How long the listener waits before connecting again after losing its connection.
LISTEN_RETRY_SECONDS = 1.0
# Notifications within this long are one: anyone who can connect to the database can send
# them, and a flood must not turn into a flood of change probes.
NOTIFY_COALESCE_SECONDS = 0.05
# How often the change probe tries to watch the SQLite files again after their watch ended.
REWATCH_SECONDS = 5.0


class StoreAccess(Protocol):
    """What the daemon reads and reports through (see the module docstring)."""

    async def routing_state(self, cache: store.RecordCache) -> store.RoutingState: ...
    async def generation(self) -> int: ...
    async def token_names(self) -> dict[str, str]: ...
    async def write_presence(
        self, instance: str, generation: int, heartbeat: float, key_ids: Sequence[str]
    ) -> None: ...
    async def remove_presence(self, instance: str) -> None: ...
    async def listen(self, on_change: Callable[[], None]) -> None: ...
    def pushed(self) -> bool: ...
    def unreachable_for(self) -> float: ...
    async def close(self) -> None: ...


class _Reachability:
    """When the current run of failed reads began (monotonic seconds), None while they work."""

    def __init__(self) -> None:
        self._failing_since: float | None = None

    async def track(self, call: Awaitable[T]) -> T:
        try:
            result = await call
        except Exception:
            if self._failing_since is None:
                self._failing_since = time.monotonic()
            raise
        self._failing_since = None
        return result

    def unreachable_for(self) -> float:
        """Seconds since reads began failing; 0 while they succeed."""
        if self._failing_since is None:
            return 0.0
        return time.monotonic() - self._failing_since


def _files_signature(database: Path) -> tuple[tuple[int, int, int], ...]:
    """(mtime, size, inode) of the database and its write-ahead log: any commit changes one of
    them, and so does a file deleted or renamed over the database. The log is where SQLite
    keeps it: next to the file a symlinked database path names."""
    wal = os.path.realpath(database) + "-wal"
    signature = []
    for path in (str(database), wal):
        try:
            st = os.stat(path)
            signature.append((st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            signature.append((0, -1, 0))
    return tuple(signature)


async def _then_checkpoint(db: store.Store, write: Awaitable[None]) -> None:
    """``write`` (this daemon's presence, on ``db``), then the write-ahead log moved into the
    database file and emptied (``Store.checkpoint``, best effort). The heartbeat writes every
    few seconds and an idle daemon nothing else: its frames would stay in ``<db>-wal``, and a
    database renamed over the path (a restore) adopts that log, the old database's pages
    read in place of its own."""
    await write
    await db.checkpoint()


class SqliteAccess(_Reachability):
    """A SQLite file: each read opens it in a worker thread; the generation is read, and this
    daemon's presence written, on one connection kept open for them (reopened when the file
    is deleted or replaced). The generation is read only when the files changed."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self._kept: store.Store | None = None
        # The change probe and the presence report share the connection: one opens it.
        self._opening = asyncio.Lock()
        self._signature: tuple[tuple[int, int, int], ...] = ()
        self._generation: int | None = None
        self._watch: FileWatch | None = None
        self._on_change: Callable[[], None] = lambda: None
        self._rewatch_at = 0.0  # time.monotonic() of the next try at watching again

    async def routing_state(self, cache: store.RecordCache) -> store.RoutingState:
        return await self.track(store.read_routing_state(self.path, cache))

    async def generation(self) -> int:
        """The store's write counter, so a CLI write reaches the daemon within half a second
        instead of one reload interval."""
        if self._watch is not None and not self._watch.active:
            self._watch_again()
        signature = _files_signature(self.path)
        if signature == self._signature and self._generation is not None:
            return self._generation
        generation = await self._on_kept(lambda db: db.generation())
        self._signature, self._generation = signature, generation
        return generation

    async def _on_kept(self, call: Callable[[store.Store], Awaitable[T]]) -> T:
        """``call`` on the kept connection, opened first if need be; a failed call closes it
        (the next opens a new one). Raises ``StoreError`` when the file is missing."""
        async with self._opening:
            if self._kept is not None and self._kept.file_state() != "same":
                # Deleted or replaced: the open connection would keep using the old file.
                await self._drop_kept()
            if self._kept is None:
                self._kept = await store.Store.open(self.path, create=False, migrate=False)
            kept = self._kept
        try:
            return await call(kept)
        except Exception:
            await self._drop_kept(kept)
            raise

    async def _drop_kept(self, failed: store.Store | None = None) -> None:
        """Close the kept connection (only if it is still ``failed``, when given: another
        caller may have replaced it already)."""
        if failed is not None and self._kept is not failed:
            return
        kept, self._kept = self._kept, None
        self._generation = None
        if kept is not None:
            await kept.close()

    async def token_names(self) -> dict[str, str]:
        return await store.read_token_names(self.path)

    async def write_presence(
        self, instance: str, generation: int, heartbeat: float, key_ids: Sequence[str]
    ) -> None:
        await self._on_kept(
            lambda db: _then_checkpoint(
                db, db.write_presence(instance, generation, heartbeat, key_ids)
            )
        )

    async def remove_presence(self, instance: str) -> None:
        await self._on_kept(lambda db: _then_checkpoint(db, db.remove_presence(instance)))

    async def listen(self, on_change: Callable[[], None]) -> None:
        """Watch the database's directory: ``on_change`` when the database or its write-ahead
        log changes (where inotify is not available the change probe polls the files). Not
        through a symlink: the files of a symlinked database are elsewhere, and a symlinked
        directory can be pointed elsewhere while the watch stays where it was. A watch that
        ends (the directory moved or removed: a restore) is set up again by the change probe,
        at most every ``REWATCH_SECONDS``, once the directory is back."""
        if os.path.realpath(self.path) != os.path.abspath(self.path):
            log.debug("%s is reached through a symlink: the change probe polls", self.path)
            return
        self._on_change = on_change
        self._watch = self._new_watch()

    def _new_watch(self) -> FileWatch | None:
        name = self.path.name
        watch = FileWatch(self.path.parent, (name, name + "-wal"), self._on_change)
        return watch if watch.start() else None

    def _watch_again(self) -> None:
        """After the watch ended: watch the directory now at the path (the probe polls till)."""
        now = time.monotonic()
        if now < self._rewatch_at:
            return
        self._rewatch_at = now + REWATCH_SECONDS
        watch = self._new_watch()
        if watch is not None:
            self._watch = watch
            log.info("watching %s for store changes again", self.path.parent)

    def pushed(self) -> bool:
        """Whether the watch of the files is in place."""
        return self._watch is not None and self._watch.active

    async def close(self) -> None:
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.close()
        await self._drop_kept()


class PostgresAccess(_Reachability):
    """A PostgreSQL database shared with other replicas: one store connection for the reads
    (it reconnects by itself after a loss) and one ``LISTEN`` connection, reconnected in the
    background; after each reconnection ``on_change`` is called once, since notifications sent
    meanwhile are lost."""

    def __init__(self, url: DatabaseUrl, keyring: Keyring) -> None:
        super().__init__()
        self.url = url
        self.keyring = keyring
        self._store: store.Store | None = None
        self._open_lock = asyncio.Lock()
        self._listener: asyncpg.Connection | None = None
        self._listen_task: asyncio.Task[None] | None = None
        self._notify_pending = False

    async def _connected(self) -> store.Store:
        async with self._open_lock:
            if self._store is None:
                self._store = await store.Store.open(self.url, migrate=False, keyring=self.keyring)
            return self._store

    async def _read(self, read: Callable[[store.Store], Awaitable[T]]) -> T:
        async def call() -> T:
            return await read(await self._connected())

        return await self.track(call())

    async def routing_state(self, cache: store.RecordCache) -> store.RoutingState:
        return await self._read(lambda db: db.routing_state(cache))

    async def generation(self) -> int:
        """Read on every probe (a primary-key lookup, twice a second): it is also how the
        daemon notices the database going away and coming back."""
        return await self._read(lambda db: db.generation())

    async def token_names(self) -> dict[str, str]:
        return await self._read(lambda db: db.token_names())

    async def write_presence(
        self, instance: str, generation: int, heartbeat: float, key_ids: Sequence[str]
    ) -> None:
        await self._read(lambda db: db.write_presence(instance, generation, heartbeat, key_ids))

    async def remove_presence(self, instance: str) -> None:
        await self._read(lambda db: db.remove_presence(instance))

    async def listen(self, on_change: Callable[[], None]) -> None:
        """Subscribe before the first load (the caller reloads after this returns), then keep
        the subscription in a background task."""
        with contextlib.suppress(*postgres.ERRORS):
            await self._subscribe(on_change)
        self._listen_task = asyncio.create_task(
            self._keep_listening(on_change), name="store-listen"
        )

    async def _subscribe(self, on_change: Callable[[], None]) -> None:
        connection = await postgres.connect(self.url)
        await connection.add_listener(postgres.NOTIFY_CHANNEL, lambda *_: self._notified(on_change))
        self._listener = connection

    def _notified(self, on_change: Callable[[], None]) -> None:
        """A notification: ``on_change`` once ``NOTIFY_COALESCE_SECONDS`` later, however many
        arrive meanwhile."""
        if self._notify_pending:
            return
        self._notify_pending = True

        def fire() -> None:
            self._notify_pending = False
            on_change()

        asyncio.get_running_loop().call_later(NOTIFY_COALESCE_SECONDS, fire)

    async def _keep_listening(self, on_change: Callable[[], None]) -> None:
        while True:
            await asyncio.sleep(LISTEN_RETRY_SECONDS)
            if self._listener is not None and not self._listener.is_closed():
                continue
            try:
                await self._subscribe(on_change)
            except postgres.ERRORS as exc:
                log.debug("cannot listen for store changes yet: %s", postgres.describe(exc))
                continue
            log.info("listening for store changes again")
            on_change()  # whatever was notified while the connection was down

    def pushed(self) -> bool:
        """Whether the ``LISTEN`` connection is up (notifications arrive)."""
        return self._listener is not None and not self._listener.is_closed()

    async def close(self) -> None:
        if self._listen_task is not None:
            self._listen_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listen_task
        if self._listener is not None:
            with contextlib.suppress(*postgres.ERRORS):
                await asyncio.wait_for(self._listener.close(), postgres.CONNECT_TIMEOUT_SECONDS)
        if self._store is not None:
            await self._store.close()


def store_access(url: DatabaseUrl, keyring: Keyring) -> StoreAccess:
    """The access for ``url``'s engine."""
    if url.path is not None:
        return SqliteAccess(url.path)
    return PostgresAccess(url, keyring)
