"""The daemon's store access: notifications coalesced, unreachability measured."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import pytest

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
