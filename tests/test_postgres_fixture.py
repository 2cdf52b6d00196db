"""The PostgreSQL fixtures of tests/postgres.py: a real server, a fresh database per test, and a
server a test can take down and bring back on the same address."""

from __future__ import annotations

import asyncpg
import pytest

from tests.postgres import PostgresServer


async def _select_one(url: str) -> int:
    connection = await asyncpg.connect(url, timeout=10)
    try:
        return int(await connection.fetchval("SELECT 1"))
    finally:
        await connection.close()


async def test_a_test_database_answers_queries_over_loopback(postgres_url: str) -> None:
    assert postgres_url.startswith("postgresql://postgres@127.0.0.1:")
    assert await _select_one(postgres_url) == 1


async def test_each_test_database_starts_empty(postgres_url: str) -> None:
    connection = await asyncpg.connect(postgres_url, timeout=10)
    try:
        tables = await connection.fetchval(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        )
        await connection.execute("CREATE TABLE leftover (id integer)")  # the next test's is new
    finally:
        await connection.close()
    assert tables == 0


def test_created_databases_are_distinct_and_dropped(postgres_server: PostgresServer) -> None:
    first = postgres_server.create_database()
    second = postgres_server.create_database()
    assert first != second
    name = first.rsplit("/", 1)[1]
    assert postgres_server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{name}'").strip()
    postgres_server.drop_database(name)
    assert not postgres_server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{name}'").strip()
    postgres_server.drop_database(second.rsplit("/", 1)[1])


def test_a_database_name_that_is_not_an_identifier_is_refused(
    postgres_server: PostgresServer,
) -> None:
    with pytest.raises(ValueError, match="not a plain database name"):
        postgres_server.create_database('x"; DROP DATABASE postgres; --')


async def test_data_survives_a_restart_on_the_same_port(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    connection = await asyncpg.connect(postgres_url, timeout=10)
    await connection.execute("CREATE TABLE kept (id integer); INSERT INTO kept VALUES (7)")
    port = postgres_server.port
    postgres_server.restart(downtime_seconds=0.2)
    assert connection.is_closed() or not await _still_usable(connection)
    assert postgres_server.port == port
    again = await asyncpg.connect(postgres_url, timeout=10)
    try:
        assert await again.fetchval("SELECT id FROM kept") == 7
    finally:
        await again.close()


async def _still_usable(connection: asyncpg.Connection) -> bool:
    try:
        await connection.fetchval("SELECT 1")
    except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError):
        return False
    return True


async def test_connections_are_refused_while_stopped_and_accepted_after(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    with postgres_server.stopped():
        assert not postgres_server.running
        with pytest.raises((OSError, asyncpg.CannotConnectNowError)):
            await asyncpg.connect(postgres_url, timeout=5)
    assert postgres_server.running
    assert await _select_one(postgres_url) == 1
