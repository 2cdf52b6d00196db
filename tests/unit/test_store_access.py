"""The daemon's store access: notifications coalesced, unreachability measured."""

from __future__ import annotations

import asyncio
import contextlib

from aibridgeproxyd.database_url import parse_database_url
from aibridgeproxyd.sealing import Keyring
from aibridgeproxyd.store_access import NOTIFY_COALESCE_SECONDS, PostgresAccess


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
