"""Daemon presence in the store and the CLI's wait for it (aibridgeproxyd.presence)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from aibridgeproxyd import store
from aibridgeproxyd.presence import (
    HEARTBEAT_SECONDS,
    STALE_SECONDS,
    DaemonPresence,
    wait_for_daemons,
)


async def open_store(tmp_path: Path) -> store.Store:
    return await store.Store.open(tmp_path / "aibridgeproxyd.db")


async def test_no_daemon_means_no_wait(tmp_path: Path) -> None:
    db = await open_store(tmp_path)
    try:
        await db.insert_token("alice", "hash")
        assert await wait_for_daemons(db, timeout=0.0)
    finally:
        await db.close()


async def test_a_live_daemon_behind_the_store_is_waited_for(tmp_path: Path) -> None:
    db = await open_store(tmp_path)
    try:
        await db.insert_token("alice", "hash")
        generation = await db.generation()
        await db.write_presence("one", generation - 1, time.time())
        assert not await wait_for_daemons(db, timeout=0.05)
        await db.write_presence("one", generation, time.time())
        assert await wait_for_daemons(db, timeout=0.0)
    finally:
        await db.close()


async def test_a_daemon_with_a_stale_heartbeat_is_not_waited_for(tmp_path: Path) -> None:
    db = await open_store(tmp_path)
    try:
        await db.insert_token("alice", "hash")
        stale = time.time() - STALE_SECONDS - 1
        await db.write_presence("killed", 0, stale)
        assert await wait_for_daemons(db, timeout=0.0)
    finally:
        await db.close()


async def test_presence_reports_the_applied_generation_and_leaves_on_stop(tmp_path: Path) -> None:
    db = await open_store(tmp_path)
    try:
        await db.insert_token("alice", "hash")
        applied = [await db.generation()]
        presence = DaemonPresence(db.path, lambda: applied[0])
        await presence.start()
        deadline = time.monotonic() + 5
        while await store.daemon_presences(db) == {} and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # polling the presence task's first write
        rows = await store.daemon_presences(db)
        assert rows[presence.instance][0] == applied[0]
        assert await wait_for_daemons(db, timeout=0.0)
        await presence.stop()
        assert await store.daemon_presences(db) == {}
    finally:
        await db.close()


async def test_token_names_are_read_fresh(tmp_path: Path) -> None:
    db = await open_store(tmp_path)
    try:
        assert await store.read_token_names(db.path) == {}
        await db.insert_token("alice", "h1")
        assert await store.read_token_names(db.path) == {"h1": "alice"}
    finally:
        await db.close()


async def test_a_daemon_that_stalls_during_the_wait_is_not_reported_as_applied(
    tmp_path: Path,
) -> None:
    """A daemon live when the wait began (then stopped, e.g. SIGSTOP) has not applied the
    write: its heartbeat going stale must not turn the wait into a success."""
    db = await open_store(tmp_path)
    try:
        await db.insert_token("alice", "hash")
        generation = await db.generation()
        await db.write_presence("stuck", generation - 1, time.time())
        now = [time.time()]

        async def stall() -> None:
            await asyncio.sleep(0.02)
            now[0] += STALE_SECONDS + 1  # the heartbeat is stale from here on

        stalling = asyncio.create_task(stall())
        assert not await wait_for_daemons(db, timeout=0.2, clock=lambda: now[0])
        await stalling
    finally:
        await db.close()


async def test_a_new_applied_generation_is_reported_on_wake_not_at_the_next_heartbeat(
    tmp_path: Path,
) -> None:
    db = await open_store(tmp_path)
    try:
        applied = [await db.generation()]
        presence = DaemonPresence(db.path, lambda: applied[0])
        await presence.start()
        applied[0] += 1
        presence.wake()
        deadline = time.monotonic() + HEARTBEAT_SECONDS / 2
        while time.monotonic() < deadline:
            if (await store.daemon_presences(db))[presence.instance][0] == applied[0]:
                break
            await asyncio.sleep(0.01)  # polling the presence task's write
        await presence.stop()
        assert time.monotonic() < deadline
    finally:
        await db.close()
