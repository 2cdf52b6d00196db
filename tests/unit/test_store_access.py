"""The daemon's store access: notifications coalesced, unreachability measured."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import pytest

from aibridgeproxyd import store_access
from aibridgeproxyd.database_url import parse_database_url
from aibridgeproxyd.sealing import Keyring
from aibridgeproxyd.store import Store, StoreError, daemon_presences
from aibridgeproxyd.store_access import NOTIFY_COALESCE_SECONDS, PostgresAccess, SqliteAccess


async def test_a_flood_of_notifications_is_one_change_probe() -> None:
    """Attacker review: anyone who can connect may NOTIFY in a loop; each was a probe."""
    url = parse_database_url("postgresql://abp@db.invalid/abp")
    assert url is not None
    access = PostgresAccess(url, Keyring([bytes(32)]))
    changes: list[int] = []
    for _ in range(1000):
        access._notified(lambda: changes.append(1))
    await asyncio.sleep(NOTIFY_COALESCE_SECONDS * 3)
    assert changes == [1]
    access._notified(lambda: changes.append(2))  # a later one is heard again
    await asyncio.sleep(NOTIFY_COALESCE_SECONDS * 3)
    assert changes == [1, 2]


async def test_unreachable_for_counts_from_the_first_failed_read_until_one_works() -> None:
    url = parse_database_url("postgresql://abp@db.invalid/abp")
    assert url is not None
    access = PostgresAccess(url, Keyring([bytes(32)]))

    async def failing() -> int:
        raise OSError("unreachable")

    async def working() -> int:
        return 1

    assert access.unreachable_for() == 0.0
    for _ in range(2):
        with contextlib.suppress(OSError):
            await access.track(failing())
    await asyncio.sleep(0.02)
    assert access.unreachable_for() >= 0.02
    assert await access.track(working()) == 1 and access.unreachable_for() == 0.0


async def test_the_probe_and_the_presence_report_share_one_kept_sqlite_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both open the kept connection when it is missing; at once, only one may, or the other's
    connection (a thread of its own) would be left open for good."""
    path = tmp_path / "aibridgeproxyd.db"
    await (await Store.open(path, create=True, migrate=True)).close()
    opened: list[Store] = []
    real_open = Store.open

    async def counted_open(*args: Any, **kwargs: Any) -> Store:
        opened.append(await real_open(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(Store, "open", counted_open)
    access = SqliteAccess(path)
    generation, _ = await asyncio.gather(
        access.generation(), access.write_presence("one", 1, time.time(), ())
    )
    assert len(opened) == 1
    assert (await daemon_presences(opened[0]))["one"][0] == 1
    assert await access.generation() == generation  # nothing but presence was written
    await access.close()
    assert len(opened) == 1


async def _database_at_generation(path: Path, generation: int) -> None:
    """A new database at ``path`` whose write counter reads ``generation``."""
    db = await Store.open(path, create=True, migrate=True)
    async with db, db._transaction(write=True) as conn:
        await conn.execute("UPDATE meta SET value = ? WHERE key = 'generation'", (str(generation),))


async def test_the_change_probe_and_the_presence_follow_a_replaced_file_and_stop_at_a_deleted_one(
    tmp_path: Path,
) -> None:
    """The probe and the heartbeat run one statement each on the kept connection: never on
    the file a replaced or deleted path named when that connection was opened. The heartbeat
    leaves nothing in the write-ahead log: a database renamed over the path adopts the log
    left behind (``<db>-wal``), and read the old database's meta page (generation 1, the old
    presence rows) instead of its own."""
    path = tmp_path / "aibridgeproxyd.db"
    await _database_at_generation(path, 1)
    access = SqliteAccess(path)
    assert await access.generation() == 1
    await access.write_presence("before", 1, time.time(), ())
    await _database_at_generation(tmp_path / "restored.db", 7)
    (tmp_path / "restored.db").rename(path)  # an operator restores another database
    assert await access.generation() == 7
    await access.write_presence("after", 7, time.time(), ())
    restored = await Store.open(path, create=False, migrate=False)
    async with restored:
        assert set(await daemon_presences(restored)) == {"after"}
    path.unlink()
    with pytest.raises(StoreError):
        await access.generation()
    with pytest.raises(StoreError):
        await access.write_presence("gone", 7, time.time(), ())
    assert not path.exists()
    await access.close()


async def test_a_write_by_another_connection_is_pushed_to_the_sqlite_probe(
    tmp_path: Path,
) -> None:
    """The files are watched (inotify): a management write made elsewhere (the CLI) tells the
    daemon at once, and the change probe need not poll often (``pushed``)."""
    path = tmp_path / "aibridgeproxyd.db"
    await (await Store.open(path, create=True, migrate=True)).close()
    access = SqliteAccess(path)
    changed = asyncio.Event()
    assert not access.pushed()
    await access.listen(changed.set)
    try:
        assert access.pushed()
        before = await access.generation()
        writer = await Store.open(path, create=False, migrate=False)
        try:
            await writer.insert_token("alice", "hash")
        finally:
            await writer.close()
        await asyncio.wait_for(changed.wait(), 5.0)
        assert await access.generation() > before
    finally:
        await access.close()
    assert not access.pushed()


async def _pushed_or_polled(access: SqliteAccess, write_to: Path) -> bool:
    """Whether a write to ``write_to`` by another connection reaches ``access``: pushed by its
    watch within 2 s, or ``access`` does not claim a watch (its probe then polls often)."""
    changed = asyncio.Event()
    await access.listen(changed.set)
    try:
        writer = await Store.open(write_to, create=False, migrate=False)
        try:
            await writer.insert_token("alice", "hash")
        finally:
            await writer.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), 2.0)
        return changed.is_set() or not access.pushed()
    finally:
        await access.close()


async def test_a_database_reached_through_a_symlink_is_not_left_to_the_slow_poll(
    tmp_path: Path,
) -> None:
    """A symlinked database file lives, with its write-ahead log, in another directory than
    the watched one; a symlinked data directory can be pointed elsewhere (a restore, a
    deploy) while the watch stays on the old one: a write must not wait for the 5 s poll."""
    (tmp_path / "real").mkdir()
    real = tmp_path / "real" / "aibridgeproxyd.db"
    await (await Store.open(real, create=True, migrate=True)).close()
    (tmp_path / "linkdir").mkdir()
    linked = tmp_path / "linkdir" / "aibridgeproxyd.db"
    linked.symlink_to(real)
    assert await _pushed_or_polled(SqliteAccess(linked), real)
    (tmp_path / "data").symlink_to(tmp_path / "real")
    access = SqliteAccess(tmp_path / "data" / "aibridgeproxyd.db")
    (tmp_path / "restored").mkdir()
    restored = tmp_path / "restored" / "aibridgeproxyd.db"
    await (await Store.open(restored, create=True, migrate=True)).close()
    (tmp_path / "data-new").symlink_to(tmp_path / "restored")
    listening = asyncio.create_task(_pushed_or_polled(access, restored))
    await asyncio.sleep(0)  # the watch is placed on the old target, then the link moves
    (tmp_path / "data-new").replace(tmp_path / "data")
    assert await listening


async def test_the_change_probe_sees_a_commit_to_a_symlinked_database(tmp_path: Path) -> None:
    """SQLite keeps the write-ahead log next to the file a symlink names, where a commit lands
    (the database file changes only at a checkpoint): the probe must look there."""
    (tmp_path / "real").mkdir()
    real = tmp_path / "real" / "aibridgeproxyd.db"
    await (await Store.open(real, create=True, migrate=True)).close()
    linked = tmp_path / "aibridgeproxyd.db"
    linked.symlink_to(real)
    access = SqliteAccess(linked)
    writer = await Store.open(linked, create=False, migrate=False)
    try:
        before = await access.generation()
        await writer.insert_token("alice", "hash")  # no checkpoint: the commit is in the log
        assert await access.generation() > before
    finally:
        await writer.close()
        await access.close()


async def test_the_watch_is_set_up_again_once_a_restored_directory_is_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restore that moves the data directory aside ends the watch (the daemon polls); the
    change probe watches the directory at the path again once it is back."""
    monkeypatch.setattr(store_access, "REWATCH_SECONDS", 0.0)
    data = tmp_path / "data"
    data.mkdir()
    path = data / "aibridgeproxyd.db"
    await (await Store.open(path, create=True, migrate=True)).close()
    access = SqliteAccess(path)
    changed = asyncio.Event()
    await access.listen(changed.set)
    try:
        await access.generation()
        data.rename(tmp_path / "data.old")
        for _ in range(500):  # the watch hears its directory move
            if not access.pushed():
                break
            await asyncio.sleep(0.01)
        assert not access.pushed()  # polling while the directory is away
        with contextlib.suppress(StoreError):
            await access.generation()
        assert not access.pushed()
        (tmp_path / "data.old").rename(data)
        await access.generation()
        assert access.pushed()
        changed.clear()
        writer = await Store.open(path, create=False, migrate=False)
        try:
            await writer.insert_token("alice", "hash")
        finally:
            await writer.close()
        await asyncio.wait_for(changed.wait(), 5.0)  # the new watch tells
    finally:
        await access.close()
    assert not access.pushed()
