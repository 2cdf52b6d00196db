"""What only the PostgreSQL store does: it outlives a lost connection, a lock held elsewhere
fails a write after ``lock_timeout`` and leaves the connection usable, the server being down is
``StoreUnavailable`` (which writers retry), and the store's reads stay within one transaction."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import asyncpg
import pytest

from aibridgeproxyd import postgres
from aibridgeproxyd.database_url import DatabaseUrl, parse_database_url
from aibridgeproxyd.store import Store, StoreError, StoreUnavailable
from tests.postgres import PostgresServer
from tests.store_engines import open_store


@pytest.fixture
def url(postgres_url: str) -> DatabaseUrl:
    parsed = parse_database_url(postgres_url)
    assert parsed is not None
    return parsed


@pytest.fixture
async def store(url: DatabaseUrl) -> AsyncIterator[Store]:
    async with await open_store(url) as opened:
        yield opened


async def test_a_lock_held_elsewhere_fails_a_write_and_leaves_the_connection_usable(
    url: DatabaseUrl, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(postgres.SERVER_SETTINGS, "lock_timeout", "200ms")
    async with await open_store(url) as store:
        other = await asyncpg.connect(url.dsn)
        try:
            await other.execute("SELECT pg_advisory_lock($1)", postgres.WRITE_LOCK)
            with pytest.raises(StoreUnavailable, match="lock timeout"):
                await store.insert_token("alice", "hash-a")
            assert await store.list_tokens() == []  # not stuck in an aborted transaction
        finally:
            await other.close()
        await store.insert_token("alice", "hash-a")
        assert [t.name for t in await store.list_tokens()] == ["alice"]


async def test_a_terminated_connection_is_replaced_at_the_next_call(
    store: Store, url: DatabaseUrl
) -> None:
    await store.insert_token("alice", "hash-a")
    admin = await asyncpg.connect(url.dsn)
    try:
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    finally:
        await admin.close()
    # The call that meets the dead connection may fail (StoreUnavailable, never another error)
    # when the termination has not reached asyncpg yet; the store connects again either way.
    with contextlib.suppress(StoreUnavailable):
        await store.list_tokens()
    assert [t.name for t in await store.list_tokens()] == ["alice"]


async def test_a_server_that_is_down_is_unavailable_and_the_store_recovers(
    store: Store, postgres_server: PostgresServer
) -> None:
    with postgres_server.stopped():
        with pytest.raises(StoreUnavailable) as caught:
            await store.generation()
        assert isinstance(caught.value, StoreError)
    assert await store.generation() == 0


async def test_opening_a_database_that_does_not_exist_is_a_store_error_naming_it(
    postgres_server: PostgresServer,
) -> None:
    url = parse_database_url(postgres_server.url("no_such_database"))
    assert url is not None
    with pytest.raises(StoreError, match="no_such_database"):
        await Store.open(url)
