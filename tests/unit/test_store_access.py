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
from aibridgeproxyd.store import Store, daemon_presences
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
