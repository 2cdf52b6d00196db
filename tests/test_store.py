"""The store: migrations, file modes, CRUD, tombstones and the write generation. Seeding is in
test_seeding.py."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import sqlite3
import stat
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from aibridgeproxyd import store as store_module
from aibridgeproxyd.database_url import DatabaseUrl
from aibridgeproxyd.model import (
    INTERCEPTION_FIELDS,
    MAX_KEYS,
    InterceptionFilter,
    InterceptionRecord,
    ProviderRecord,
    Status,
    ToolCall,
)
from aibridgeproxyd.pricing import ModelPrices
from aibridgeproxyd.providers import evaluate_providers
from aibridgeproxyd.store import (
    MIGRATIONS,
    DatabaseMissing,
    RecordError,
    Store,
    StoreError,
    read_routing_state,
    validate_record,
)
from tests.store_engines import open_store

RFC3339_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")


@pytest.fixture
async def store(store_database: Path | DatabaseUrl) -> AsyncIterator[Store]:
    async with await open_store(store_database) as opened:
        yield opened


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """A controllable clock: the store stamps rows with the last value in the list."""
    times = ["2026-01-01T00:00:00Z"]
    monkeypatch.setattr(store_module, "utc_now", lambda: times[-1])
    yield times


def provider(name: str = "corp", type: str = "openai", **fields: Any) -> ProviderRecord:
    return ProviderRecord(name=name, type=type, **fields)


async def must_get(store: Store, name: str) -> ProviderRecord:
    record = await store.get_provider(name)
    assert record is not None, name
    return record


def dump(path: Path) -> list[str]:
    with sqlite3.connect(path) as connection:
        return list(connection.iterdump())


def create_v1_database(path: Path) -> None:
    """A database as the first release left it, written without the Store class."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as connection:
        connection.execute(
            "CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
        )
        for statement in MIGRATIONS[0]:
            connection.execute(statement)
        connection.execute("INSERT INTO schema_version VALUES (1, '2026-01-01T00:00:00Z')")
        connection.execute(
            "INSERT INTO providers (name, type, display_name, base_url, hosts, enabled, "
            "allow_byok, keys, settings, created_at, updated_at) VALUES ('old', 'openai', 'Old', "
            "'', '[]', 1, 1, '[\"sk-old\"]', '{}', '2026-01-01T00:00:00Z', '2026-01-01T00:00:00Z')"
        )


# --- migrations ------------------------------------------------------------------------------


async def test_new_database_is_migrated_to_the_latest_version(store: Store) -> None:
    assert store.is_fresh
    assert await store.schema_version() == len(MIGRATIONS)
    assert await store.list_providers() == []
    assert await store.generation() == 0


async def test_reopening_is_idempotent_and_not_fresh(db_path: Path) -> None:
    async with await Store.open(db_path) as first:
        await first.insert_provider(provider())
    before = dump(db_path)
    async with await Store.open(db_path) as again:
        assert not again.is_fresh
        assert await again.schema_version() == len(MIGRATIONS)
        assert [p.name for p in await again.list_providers()] == ["corp"]
    assert dump(db_path) == before


async def test_version_one_database_upgrades_in_place_keeping_its_rows(db_path: Path) -> None:
    create_v1_database(db_path)
    async with await Store.open(db_path) as opened:
        assert not opened.is_fresh
        assert await opened.schema_version() == len(MIGRATIONS)
        (old,) = await opened.list_providers()
        assert await opened.list_interceptions(InterceptionFilter()) == []
    assert old.keys == ("sk-old",)
    with sqlite3.connect(db_path) as connection:
        versions = connection.execute("SELECT version FROM schema_version ORDER BY version")
        assert [row[0] for row in versions] == list(range(1, len(MIGRATIONS) + 1))


async def test_older_database_upgrades_in_place(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    create_v1_database(db_path)
    migration_next = ("CREATE TABLE extra (id INTEGER PRIMARY KEY)", "INSERT INTO extra VALUES (7)")
    monkeypatch.setattr(store_module, "MIGRATIONS", (*MIGRATIONS, migration_next))
    async with await Store.open(db_path) as opened:
        assert not opened.is_fresh
        assert await opened.schema_version() == len(MIGRATIONS) + 1
        assert [p.name for p in await opened.list_providers()] == ["old"]
    with sqlite3.connect(db_path) as connection:
        assert connection.execute("SELECT id FROM extra").fetchall() == [(7,)]
        versions = connection.execute("SELECT version FROM schema_version ORDER BY version")
        assert [row[0] for row in versions] == list(range(1, len(MIGRATIONS) + 2))


async def test_failed_migration_rolls_back_completely(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    create_v1_database(db_path)
    before = dump(db_path)
    broken = ("CREATE TABLE half (id INTEGER)", "THIS IS NOT SQL")
    monkeypatch.setattr(store_module, "MIGRATIONS", (*MIGRATIONS, broken))
    with pytest.raises(StoreError, match=re.escape(str(db_path))):
        await Store.open(db_path)
    assert dump(db_path) == before


async def test_database_newer_than_the_code_is_refused(db_path: Path) -> None:
    create_v1_database(db_path)
    with sqlite3.connect(db_path) as connection:
        connection.execute("INSERT INTO schema_version VALUES (99, '2030-01-01T00:00:00Z')")
    with pytest.raises(StoreError, match="schema version 99, newer than"):
        await Store.open(db_path)


# --- files -----------------------------------------------------------------------------------


async def test_database_and_wal_files_are_private_whatever_the_umask(db_path: Path) -> None:
    old_umask = os.umask(0)
    try:
        async with await Store.open(db_path) as opened:
            await opened.insert_provider(provider())
            files = [db_path, *(db_path.with_name(db_path.name + s) for s in ("-wal", "-shm"))]
            for path in files:
                assert path.exists(), path
                assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(db_path.parent.stat().st_mode) == 0o700


async def test_database_uses_wal_and_a_busy_timeout(store: Store, db_path: Path) -> None:
    with sqlite3.connect(db_path) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert store_module.BUSY_TIMEOUT_MS >= 1000


async def test_corrupt_database_gives_a_store_error_naming_the_path(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    db_path.write_bytes(b"this is not a sqlite database, " * 100)
    with pytest.raises(StoreError, match=re.escape(str(db_path))):
        await Store.open(db_path)


async def test_unusable_data_dir_gives_a_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError, match="cannot create data directory"):
        await Store.open(blocker / "aibridgeproxyd.db")


async def test_missing_database_is_not_recreated_by_a_reload(db_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        await read_routing_state(db_path)
    assert not db_path.exists()


# --- providers ------------------------------------------------------------------------------


async def test_provider_round_trips_with_normalized_fields(store: Store, clock: list[str]) -> None:
    record = provider(
        base_url="https://llm.example.com/v1/",
        hosts=("API.Example.com.", "api.example.com", "other.example.com"),
        keys=(" sk-1 ", "sk-2"),
        settings={"deployments": {"gpt-4o": "prod"}, "n": 5},
        allow_byok=False,
    )
    stored = await store.insert_provider(record)
    assert await store.get_provider("corp") == stored
    assert stored.base_url == "https://llm.example.com/v1"
    assert stored.hosts == ("api.example.com", "other.example.com")
    assert stored.keys == ("sk-1", "sk-2")
    assert stored.display_name == "corp"
    assert stored.created_at == stored.updated_at == clock[-1]


def test_timestamps_are_rfc3339_utc() -> None:
    assert RFC3339_UTC.match(store_module.utc_now())


async def test_providers_are_listed_by_name(store: Store) -> None:
    for name in ("zeta", "alpha", "mid"):
        await store.insert_provider(provider(name))
    assert [p.name for p in await store.list_providers()] == ["alpha", "mid", "zeta"]
    assert await store.get_provider("missing") is None


async def test_duplicate_provider_is_refused(store: Store) -> None:
    await store.insert_provider(provider())
    generation = await store.generation()
    with pytest.raises(RecordError, match="provider 'corp' already exists"):
        await store.insert_provider(provider(type="anthropic"))
    assert (await must_get(store, "corp")).type == "openai"
    assert await store.generation() == generation


async def test_update_keeps_created_at_and_moves_updated_at(store: Store, clock: list[str]) -> None:
    stored = await store.insert_provider(provider())
    clock.append("2026-02-02T00:00:00Z")
    updated = await store.update_provider(replace(stored, enabled=False, keys=("sk-new",)))
    assert updated.created_at == "2026-01-01T00:00:00Z"
    assert updated.updated_at == "2026-02-02T00:00:00Z"
    assert await store.get_provider("corp") == updated


async def test_updating_a_missing_provider_is_refused(store: Store) -> None:
    with pytest.raises(RecordError, match="provider 'ghost' does not exist"):
        await store.update_provider(provider("ghost"))
    assert await store.list_providers() == []


async def test_deleted_provider_name_is_tombstoned(store: Store) -> None:
    await store.insert_provider(provider())
    assert not await store.was_deleted("corp")
    assert await store.delete_provider("corp")
    assert await store.get_provider("corp") is None
    assert await store.was_deleted("corp")


async def test_deleting_a_missing_provider_writes_nothing(store: Store) -> None:
    generation = await store.generation()
    assert not await store.delete_provider("ghost")
    assert not await store.was_deleted("ghost")
    assert await store.generation() == generation


async def test_every_management_write_bumps_the_generation(store: Store) -> None:
    seen = [await store.generation()]

    async def bumped() -> None:
        seen.append(await store.generation())
        assert seen[-1] == seen[-2] + 1

    stored = await store.insert_provider(provider())
    await bumped()
    await store.update_provider(replace(stored, enabled=False))
    await bumped()
    await store.insert_provider_if_new(provider("seeded"))
    await bumped()
    await store.delete_provider("corp")
    await bumped()
    await store.insert_token("alice", "a" * 64)
    await bumped()
    await store.delete_token("alice")
    await bumped()


async def test_writes_from_another_connection_are_seen(db_path: Path) -> None:
    async with await Store.open(db_path) as daemon, await Store.open(db_path) as cli:
        before = await daemon.generation()
        await cli.insert_provider(provider())
        assert await daemon.generation() == before + 1
        assert [p.name for p in await daemon.list_providers()] == ["corp"]


async def test_concurrent_writers_wait_instead_of_failing(db_path: Path) -> None:
    async with await Store.open(db_path) as first, await Store.open(db_path) as second:

        async def write(opened: Store, prefix: str) -> None:
            for index in range(15):
                await opened.insert_provider(provider(f"{prefix}-{index}"))

        await asyncio.gather(write(first, "a"), write(second, "b"))
        assert len(await first.list_providers()) == 30
        assert await first.generation() == 30


# --- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (provider("Bad_Name"), "invalid provider name 'Bad_Name'"),
        (
            provider(type="nope"),
            "unknown provider type 'nope'; valid types: anthropic, azure, bedrock, copilot, google, openai, openai-compat, openrouter, vercel",
        ),
        (provider(base_url="ftp://example.com"), "must start with http:// or https://"),
        (provider(base_url="https://"), "has no hostname"),
        (provider(hosts=("api.example.com/v1",)), "invalid host 'api.example.com/v1'"),
        (provider(keys=("sk-1", " ")), "a key is empty"),
        (provider(keys=tuple(f"k{i}" for i in range(MAX_KEYS + 1))), f"at most {MAX_KEYS}"),
        (provider(settings={"x": float("nan")}), "plain JSON values"),
    ],
)
async def test_invalid_provider_is_refused_naming_the_value(
    store: Store, record: ProviderRecord, message: str
) -> None:
    with pytest.raises(RecordError, match=re.escape(message)):
        validate_record(record)
    with pytest.raises(RecordError, match=re.escape(message)):
        await store.insert_provider(record)
    assert await store.list_providers() == []


def test_errors_never_contain_keys() -> None:
    keys = tuple(f"sk-secret-{i}" for i in range(MAX_KEYS + 1))
    with pytest.raises(RecordError) as info:
        validate_record(provider(keys=keys))
    assert "sk-secret" not in str(info.value)


# --- tokens ---------------------------------------------------------------------------------


async def test_tokens_store_only_hashes(store: Store, db_path: Path) -> None:
    token_hash = hashlib.sha256(b"abp_secret").hexdigest()
    stored = await store.insert_token("alice", token_hash)
    assert RFC3339_UTC.match(stored.created_at)
    assert await store.list_tokens() == [stored]
    assert "abp_secret" not in "\n".join(dump(db_path))


async def test_duplicate_token_name_is_refused(store: Store) -> None:
    await store.insert_token("alice", "a" * 64)
    with pytest.raises(RecordError, match="token 'alice' already exists"):
        await store.insert_token("alice", "b" * 64)


async def test_invalid_token_name_is_refused(store: Store) -> None:
    with pytest.raises(RecordError, match="invalid token name 'a b'"):
        await store.insert_token("a b", "a" * 64)


async def test_revoked_token_disappears(store: Store) -> None:
    await store.insert_token("alice", "a" * 64)
    assert await store.delete_token("alice")
    assert not await store.delete_token("alice")
    assert await store.list_tokens() == []


# --- rows written by something else than this code ---------------------------------------------


def corrupt(path: Path, name: str, assignment: str) -> None:
    """Change a row behind the store's back, as a hand-run sqlite3 or a broken tool would."""
    with sqlite3.connect(path) as connection:
        connection.execute(f"UPDATE providers SET {assignment} WHERE name = ?", (name,))


@pytest.mark.parametrize(
    ("assignment", "reason"),
    [
        ("keys = '[\"sk-secret-value\"'", "keys is not valid JSON"),
        ('keys = \'{"a": "sk-secret-value"}\'', "keys is not a JSON array"),
        (
            "keys = '[\"sk-secret-value\", 5]'",
            "keys has an entry that is not an object with a key and its id",
        ),
        (
            'keys = \'[{"id": "a", "key": ""}]\'',
            "keys has an entry that is not an object with a key and its id",
        ),
        ("keys = 5", "keys is not a JSON array"),  # stored as the text '5' (column affinity)
        ("keys = x'00ff'", "keys is not text"),
        ('settings = \'{"secret_access_key": "sk-secret-value"\'', "settings is not valid JSON"),
        ("settings = '[]'", "settings is not a JSON object"),
        ("hosts = 'api.openai.com'", "hosts is not valid JSON"),
        ("hosts = '[\"a b\"]'", "hosts has an invalid entry 'a b'"),
        ("hosts = '[5]'", "hosts has an invalid entry '5'"),
        ("enabled = 'yes'", "enabled is not 0 or 1"),
        ("base_url = x'07'", "base_url is not text"),
        ("base_url = 'ftp://x'", "must start with http:// or https://"),
        ("type = 'nonsense'", "unknown provider type 'nonsense'"),
        ("name = 'Bad Name'", "name does not match"),
    ],
)
async def test_a_malformed_row_is_in_error_alone(
    store: Store, db_path: Path, assignment: str, reason: str
) -> None:
    """One unreadable row never fails the read: it evaluates to status error with a reason
    that names the column and never the value; every other row is read as before."""
    await store.insert_provider(provider("alpha", "anthropic", keys=("sk-alpha",)))
    await store.insert_provider(provider("victim", keys=("sk-victim",)))
    await store.insert_provider(provider("zeta", "openai-compat", base_url="https://z.example"))
    corrupt(db_path, "victim", assignment)
    for records in (
        (await read_routing_state(db_path))[0],
        await store.list_providers(),
    ):
        evaluated = {p.name: p for p in evaluate_providers(records)}
        assert evaluated["alpha"].status is Status.ENABLED
        assert evaluated["zeta"].status is Status.ENABLED
        (victim,) = [p for n, p in evaluated.items() if n not in ("alpha", "zeta")]
        assert victim.status is Status.ERROR
        assert reason in victim.status_reason
        assert "sk-secret-value" not in victim.status_reason
        assert "sk-secret-value" not in repr(victim.record.settings)


async def test_get_provider_reads_a_malformed_row_too(store: Store, db_path: Path) -> None:
    await store.insert_provider(provider("victim", keys=("sk-victim",)))
    corrupt(db_path, "victim", "keys = 'not json'")
    record = await must_get(store, "victim")
    assert record.problem.startswith("malformed row: keys is not valid JSON")
    assert record.keys == ()


async def test_a_fixed_row_is_sound_again(store: Store, db_path: Path) -> None:
    await store.insert_provider(provider("victim", keys=("sk-victim",)))
    corrupt(db_path, "victim", "keys = 'not json'")
    broken = await must_get(store, "victim")
    await store.update_provider(replace(broken, keys=("sk-new",), problem=""))
    assert (await must_get(store, "victim")).problem == ""


# --- interception records --------------------------------------------------------------------


def interception(request_id: str, started_at: str, **fields: Any) -> InterceptionRecord:
    values: dict[str, Any] = {
        "request_id": request_id, "connect_id": "c", "initiator": "alice", "provider": "openai",
        "provider_type": "openai", "model": "o3", "client": "Codex", "method": "POST",
        "path": "/v1/responses", "status": 200, "streamed": True, "input_tokens": 10,
        "output_tokens": 300, "cache_read_input_tokens": 0, "cache_creation_input_tokens": None,
        "reasoning_output_tokens": None, "provider_name": "openai-main",
        "user_agent": "codex_cli_rs/0.1", "credential_kind": "byok",
        "credential_hint": "sk-\u2026WXYZ", "started_at": started_at, "ended_at": started_at,
        "ttfb_ms": 1.5, "duration_ms": 2.5, "error": None,
    }  # fmt: skip
    values.update(fields)
    return InterceptionRecord(**values)


def create_v2_database_with_an_interception(path: Path) -> None:
    """A database at schema version 2 (interceptions without reasoning tokens), holding one
    record, written without the Store class."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as connection:
        connection.execute(
            "CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
        )
        for version in (1, 2):
            for statement in MIGRATIONS[version - 1]:
                connection.execute(statement)
            connection.execute(
                "INSERT INTO schema_version VALUES (?, '2026-01-01T00:00:00Z')", (version,)
            )
        connection.execute(
            "INSERT INTO interceptions (request_id, connect_id, initiator, provider, "
            "provider_type, model, client, method, path, status, streamed, input_tokens, "
            "output_tokens, cache_read_input_tokens, cache_creation_input_tokens, started_at, "
            "ended_at, ttfb_ms, duration_ms, error) VALUES ('old-request', 'c', 'bob', 'openai', "
            "'openai', 'gpt-4o', 'Codex', 'POST', '/v1/chat/completions', 200, 0, 5, 7, 3, NULL, "
            "'2026-01-01T00:00:00.000Z', '2026-01-01T00:00:01.000Z', 12.5, 1000.0, NULL)"
        )


async def test_reasoning_output_tokens_round_trip_and_stay_null_when_unreported(
    store: Store,
) -> None:
    await store.insert_interceptions(
        [
            interception("reasoned", "2026-01-01T00:00:02.000Z", reasoning_output_tokens=256),
            interception("unreported", "2026-01-01T00:00:01.000Z"),
            interception("zero", "2026-01-01T00:00:00.000Z", reasoning_output_tokens=0),
        ]
    )
    listed = await store.list_interceptions(InterceptionFilter())
    assert [(r["id"], r["reasoning_output_tokens"]) for r in listed] == [
        ("reasoned", 256),
        ("unreported", None),
        ("zero", 0),
    ]
    assert list(listed[0]) == ["id", *INTERCEPTION_FIELDS, "prompts", "tool_calls", "thoughts"]


async def test_a_version_two_database_gains_reasoning_tokens_keeping_its_records(
    db_path: Path,
) -> None:
    create_v2_database_with_an_interception(db_path)
    async with await Store.open(db_path) as opened:
        assert await opened.schema_version() == len(MIGRATIONS)
        (old,) = await opened.list_interceptions(InterceptionFilter())
        await opened.insert_interceptions(
            [interception("new-request", "2026-01-02T00:00:00.000Z", reasoning_output_tokens=64)]
        )
        new, _ = await opened.list_interceptions(InterceptionFilter())
    # The old record is whole, and its reasoning count is unknown (null), not 0.
    assert old == {
        "id": "old-request", "request_id": "old-request", "connect_id": "c", "initiator": "bob",
        "provider": "openai", "provider_type": "openai", "model": "gpt-4o", "client": "Codex",
        "method": "POST", "path": "/v1/chat/completions", "status": 200, "streamed": False,
        "input_tokens": 5, "output_tokens": 7, "cache_read_input_tokens": 3,
        "cache_creation_input_tokens": None, "reasoning_output_tokens": None,
        "provider_name": "openai", "user_agent": None, "credential_kind": None,
        "credential_hint": None,
        "started_at": "2026-01-01T00:00:00.000Z", "ended_at": "2026-01-01T00:00:01.000Z",
        "ttfb_ms": 12.5, "duration_ms": 1000.0, "error": None, "cost_micros": None,
        # Migration 6: an older record is its own thread and its own session.
        "client_session_id": None, "session_id": "old-request", "thread_parent_id": None,
        "thread_root_id": "old-request", "prompts": [], "tool_calls": [], "thoughts": [],
    }  # fmt: skip
    assert (new["id"], new["reasoning_output_tokens"]) == ("new-request", 64)
    with sqlite3.connect(db_path) as connection:
        versions = connection.execute("SELECT version FROM schema_version ORDER BY version")
        assert [row[0] for row in versions] == list(range(1, len(MIGRATIONS) + 1))


def create_v3_database_with_an_interception(path: Path) -> None:
    """A database at schema version 3, whose ``provider`` column held the provider's name
    ("openai-main", of type "openai"), holding one record, written without the Store class."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as connection:
        connection.execute(
            "CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
        )
        for version in (1, 2, 3):
            for statement in MIGRATIONS[version - 1]:
                connection.execute(statement)
            connection.execute(
                "INSERT INTO schema_version VALUES (?, '2026-01-01T00:00:00Z')", (version,)
            )
        connection.execute(
            "INSERT INTO interceptions (request_id, connect_id, initiator, provider, "
            "provider_type, model, client, method, path, status, streamed, input_tokens, "
            "output_tokens, cache_read_input_tokens, cache_creation_input_tokens, "
            "reasoning_output_tokens, started_at, ended_at, ttfb_ms, duration_ms, error) "
            "VALUES ('old-request', 'c', 'bob', 'openai-main', 'openai', 'o3', 'Codex', 'POST', "
            "'/v1/responses', 200, 1, 5, 7, NULL, NULL, 2, '2026-01-01T00:00:00.000Z', "
            "'2026-01-01T00:00:01.000Z', 12.5, 1000.0, NULL)"
        )


async def test_a_version_three_database_moves_the_provider_name_and_keeps_new_fields_null(
    db_path: Path,
) -> None:
    create_v3_database_with_an_interception(db_path)
    async with await Store.open(db_path) as opened:
        assert await opened.schema_version() == len(MIGRATIONS)
        (old,) = await opened.list_interceptions(InterceptionFilter())
    assert (old["provider"], old["provider_type"], old["provider_name"]) == (
        "openai",
        "openai",
        "openai-main",
    )
    assert (old["user_agent"], old["credential_kind"], old["credential_hint"]) == (None,) * 3
    assert (old["reasoning_output_tokens"], old["input_tokens"], old["model"]) == (2, 5, "o3")


async def test_new_record_fields_round_trip(store: Store) -> None:
    await store.insert_interceptions([interception("r", "2026-01-01T00:00:00.000Z")])
    (listed,) = await store.list_interceptions(InterceptionFilter())
    new_fields = ("provider_name", "user_agent", "credential_kind", "credential_hint")
    assert {field: listed[field] for field in new_fields} == {
        "provider_name": "openai-main",
        "user_agent": "codex_cli_rs/0.1",
        "credential_kind": "byok",
        "credential_hint": "sk-\u2026WXYZ",
    }


async def test_the_provider_filter_matches_a_provider_name_or_type(store: Store) -> None:
    await store.insert_interceptions(
        [
            interception("main", "2026-01-01T00:00:02.000Z"),
            interception(
                "claude", "2026-01-01T00:00:01.000Z", provider="anthropic",
                provider_type="anthropic", provider_name="claude",
            ),
        ]
    )  # fmt: skip

    async def ids(provider: str) -> list[str]:
        listed = await store.list_interceptions(InterceptionFilter(provider=provider))
        return [r["id"] for r in listed]

    assert await ids("openai-main") == ["main"]
    assert await ids("openai") == ["main"]
    assert await ids("claude") == ["claude"]
    assert await ids("anthropic") == ["claude"]
    assert await ids("gemini") == []


async def test_cost_micros_round_trips_and_older_records_stay_unpriced(db_path: Path) -> None:
    create_v2_database_with_an_interception(db_path)
    async with await Store.open(db_path) as opened:
        await opened.insert_interceptions(
            [
                interception("priced", "2026-01-02T00:00:02.000Z", cost_micros=17073),
                interception("unpriced", "2026-01-02T00:00:01.000Z", cost_micros=None),
            ]
        )
        listed = await opened.list_interceptions(InterceptionFilter())
    # Migration 5 adds the column: a record written before it was never priced (null, not 0).
    assert [(r["id"], r["cost_micros"]) for r in listed] == [
        ("priced", 17073), ("unpriced", None), ("old-request", None),
    ]  # fmt: skip
    assert "cost_micros" in INTERCEPTION_FIELDS


# --- sessions and threads (migration 6) ------------------------------------------------------


def create_v5_database_with_an_interception(path: Path) -> None:
    """A database at schema version 5 (before sessions and threads), holding one record,
    written without the Store class."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as connection:
        connection.execute(
            "CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
        )
        for version in range(1, 6):
            for statement in MIGRATIONS[version - 1]:
                connection.execute(statement)
            connection.execute(
                "INSERT INTO schema_version VALUES (?, '2026-01-01T00:00:00Z')", (version,)
            )
        connection.execute(
            "INSERT INTO interceptions (request_id, connect_id, initiator, provider, "
            "provider_type, provider_name, model, client, method, path, status, streamed, "
            "input_tokens, output_tokens, started_at, ended_at, duration_ms, cost_micros) "
            "VALUES ('old-request', 'c', 'bob', 'openai', 'openai', 'openai-main', 'gpt-4o', "
            "'Codex', 'POST', '/v1/responses', 200, 1, 5, 7, '2026-01-01T00:00:00.000Z', "
            "'2026-01-01T00:00:01.000Z', 1000.0, 42)"
        )


async def test_a_version_five_database_gives_each_record_its_own_session_and_thread(
    db_path: Path,
) -> None:
    create_v5_database_with_an_interception(db_path)
    async with await Store.open(db_path) as opened:
        assert await opened.schema_version() == len(MIGRATIONS)
        (old,) = await opened.list_interceptions(InterceptionFilter())
        session = await opened.get_session("old-request")
    assert (old["input_tokens"], old["cost_micros"], old["model"]) == (5, 42, "gpt-4o")
    assert (old["session_id"], old["thread_root_id"]) == ("old-request", "old-request")
    assert (old["client_session_id"], old["thread_parent_id"]) == (None, None)
    assert (old["prompts"], old["tool_calls"], old["thoughts"]) == ([], [], [])
    assert session is not None
    assert [thread["id"] for thread in session["threads"]] == ["old-request"]


def claude_code_turn(session: str | None = "s1") -> list[InterceptionRecord]:
    """A Claude Code turn: the user's prompt answered with a tool call, then the tool's result
    sent back and answered with text."""
    return [
        interception(
            "r1", "2026-01-01T00:00:00.000Z", client="Claude Code", provider="anthropic",
            provider_type="anthropic", provider_name="claude", model="claude-sonnet-4-5",
            path="/v1/messages", client_session_id=session, input_tokens=25, output_tokens=80,
            cache_read_input_tokens=1000, cache_creation_input_tokens=None, cost_micros=900,
            prompt="What is in README.md?",
            tool_calls=(ToolCall("toolu_1", "Read", '{"file_path": "README.md"}'),),
            thoughts=("The user wants the file; read it.",),
        ),
        interception(
            "r2", "2026-01-01T00:00:05.000Z", client="Claude Code", provider="anthropic",
            provider_type="anthropic", provider_name="claude", model="claude-sonnet-4-5",
            path="/v1/messages", client_session_id=session, input_tokens=40, output_tokens=120,
            cache_read_input_tokens=1100, cache_creation_input_tokens=None, cost_micros=None,
            tool_result_ids=("toolu_1",),
        ),
    ]  # fmt: skip


async def test_prompts_tool_calls_and_thoughts_round_trip_in_order(store: Store) -> None:
    calls = (ToolCall("call_a", "grep", '{"q": "x"}'), ToolCall(None, "ls", "{}"))
    await store.insert_interceptions(
        [
            interception(
                "r", "2026-01-01T00:00:00.000Z", prompt="find x", tool_calls=calls,
                thoughts=("first", "second"),
            ),
            interception("bare", "2026-01-01T00:00:01.000Z"),
        ]
    )  # fmt: skip
    bare, listed = await store.list_interceptions(InterceptionFilter())
    assert listed["prompts"] == ["find x"]
    assert listed["tool_calls"] == [
        {"tool_call_id": "call_a", "tool": "grep", "input": '{"q": "x"}'},
        {"tool_call_id": None, "tool": "ls", "input": "{}"},
    ]
    assert listed["thoughts"] == ["first", "second"]
    assert (bare["prompts"], bare["tool_calls"], bare["thoughts"]) == ([], [], [])


async def test_a_claude_code_turn_is_one_session_one_thread_two_interceptions(
    store: Store,
) -> None:
    await store.insert_interceptions(claude_code_turn())  # one batch: r2 sees r1
    r2, r1 = await store.list_interceptions(InterceptionFilter())
    assert (r1["session_id"], r1["thread_parent_id"], r1["thread_root_id"]) == ("s1", None, "r1")
    assert (r2["session_id"], r2["thread_parent_id"], r2["thread_root_id"]) == ("s1", "r1", "r1")
    listed = await store.list_sessions(InterceptionFilter())
    assert listed == {
        "count": 1,
        "sessions": [
            {
                "id": "s1", "client": "Claude Code", "initiator": "alice",
                "providers": ["anthropic"], "provider_names": ["claude"],
                "models": ["claude-sonnet-4-5"],
                "started_at": "2026-01-01T00:00:00.000Z", "ended_at": "2026-01-01T00:00:05.000Z",
                "last_active_at": "2026-01-01T00:00:05.000Z",
                "last_prompt": "What is in README.md?", "threads": 1,
                "token_usage_summary": {
                    "input_tokens": 65, "output_tokens": 200, "cache_read_input_tokens": 2100,
                    "cache_creation_input_tokens": None,
                },
                "cost_micros": 900,
            }
        ],
    }  # fmt: skip
    session = await store.get_session("s1")
    assert session is not None
    # The detail is the summary with ``threads`` the list of threads instead of their count.
    assert {**session, "threads": 1} == listed["sessions"][0]
    assert session["threads"] == [
        {
            "id": "r1", "prompt": "What is in README.md?", "model": "claude-sonnet-4-5",
            "provider": "anthropic", "provider_name": "claude",
            "started_at": "2026-01-01T00:00:00.000Z",
            "ended_at": "2026-01-01T00:00:05.000Z", "credential_kind": "byok",
            "credential_hint": "sk-\u2026WXYZ",
            "token_usage": {
                "input_tokens": 65, "output_tokens": 200, "cache_read_input_tokens": 2100,
                "cache_creation_input_tokens": None,
            },
            "interceptions": [
                {
                    "id": "r1", "model": "claude-sonnet-4-5", "status": 200, "error": None,
                    "tool_calls": [
                        {"tool_call_id": "toolu_1", "tool": "Read",
                         "input": '{"file_path": "README.md"}'},
                    ],
                    "thoughts": ["The user wants the file; read it."],
                    "token_usage": {
                        "input_tokens": 25, "output_tokens": 80,
                        "cache_read_input_tokens": 1000, "cache_creation_input_tokens": None,
                    },
                },
                {
                    "id": "r2", "model": "claude-sonnet-4-5", "status": 200, "error": None,
                    "tool_calls": [],
                    "thoughts": [],
                    "token_usage": {
                        "input_tokens": 40, "output_tokens": 120,
                        "cache_read_input_tokens": 1100, "cache_creation_input_tokens": None,
                    },
                },
            ],
        }
    ]  # fmt: skip


async def test_lineage_resolves_across_batches(store: Store) -> None:
    first, second = claude_code_turn()
    await store.insert_interceptions([first])
    await store.insert_interceptions([second])
    r2, _ = await store.list_interceptions(InterceptionFilter())
    assert (r2["thread_parent_id"], r2["thread_root_id"], r2["session_id"]) == ("r1", "r1", "s1")


async def test_a_thread_without_a_client_session_is_the_session_of_its_root(
    store: Store,
) -> None:
    # Codex-shaped, without its session_id header: call, result, call, result.
    await store.insert_interceptions(
        [
            interception("c1", "2026-01-01T00:00:00.000Z", prompt="fix the test",
                         tool_calls=(ToolCall("call_1", "shell", '{"cmd": ["pytest"]}'),)),
            interception("c2", "2026-01-01T00:00:01.000Z", tool_result_ids=("call_1",),
                         tool_calls=(ToolCall("call_2", "apply_patch", "{}"),)),
        ]
    )  # fmt: skip
    await store.insert_interceptions(
        [interception("c3", "2026-01-01T00:00:02.000Z", tool_result_ids=("call_2",))]
    )
    listed = await store.list_interceptions(InterceptionFilter())
    assert [(r["id"], r["thread_parent_id"], r["thread_root_id"], r["session_id"]) for r in listed] == [
        ("c3", "c2", "c1", "c1"), ("c2", "c1", "c1", "c1"), ("c1", None, "c1", "c1"),
    ]  # fmt: skip
    session = await store.get_session("c1")
    assert session is not None
    assert session["threads"][0]["prompt"] == "fix the test"
    assert [i["id"] for i in session["threads"][0]["interceptions"]] == ["c1", "c2", "c3"]


async def test_lineage_takes_the_most_recently_written_interception_of_a_tool_call(
    store: Store,
) -> None:
    # The same tool-call id recorded twice (a client replaying a turn): the later one wins,
    # and a result for an id nobody recorded starts a thread of its own.
    await store.insert_interceptions(
        [
            interception("old", "2026-01-01T00:00:00.000Z", tool_calls=(ToolCall("x", "t", "{}"),)),
            interception("new", "2026-01-01T00:00:01.000Z", tool_calls=(ToolCall("x", "t", "{}"),)),
        ]
    )  # fmt: skip
    await store.insert_interceptions(
        [
            interception("answer", "2026-01-01T00:00:02.000Z", tool_result_ids=("x",)),
            interception("orphan", "2026-01-01T00:00:03.000Z", tool_result_ids=("unknown",)),
        ]
    )
    by_id = {r["id"]: r for r in await store.list_interceptions(InterceptionFilter())}
    assert (by_id["answer"]["thread_parent_id"], by_id["answer"]["thread_root_id"]) == (
        "new",
        "new",
    )
    assert (by_id["orphan"]["thread_parent_id"], by_id["orphan"]["thread_root_id"]) == (
        None,
        "orphan",
    )


async def test_a_tool_result_never_continues_another_users_thread(store: Store) -> None:
    # Bob answers a tool-call id that Alice's interception recorded (stored, and in his batch).
    call = (ToolCall("call_1", "shell", "{}"),)
    await store.insert_interceptions(
        [interception("alice1", "2026-01-01T00:00:00.000Z", tool_calls=call)]
    )
    await store.insert_interceptions(
        [
            interception("alice2", "2026-01-01T00:00:01.000Z", tool_calls=call),
            interception("bob", "2026-01-01T00:00:02.000Z", initiator="bob",
                         tool_result_ids=("call_1",)),
            interception("alice3", "2026-01-01T00:00:03.000Z", tool_result_ids=("call_1",)),
        ]
    )  # fmt: skip
    by_id = {r["id"]: r for r in await store.list_interceptions(InterceptionFilter())}
    assert [lineage_of(by_id[i]) for i in ("bob", "alice3")] == [
        (None, "bob", "bob"), ("alice2", "alice2", "alice2"),
    ]  # fmt: skip


async def test_a_client_session_id_belongs_to_the_user_who_used_it_first(store: Store) -> None:
    # Bob sends Alice's Claude Code session id (forged or colliding): his records form a
    # session of his own, in a later batch and within the same batch alike.
    await store.insert_interceptions(
        [interception("a1", "2026-01-01T00:00:00.000Z", client_session_id="s1")]
    )
    await store.insert_interceptions(
        [
            interception("b1", "2026-01-01T00:00:01.000Z", initiator="bob",
                         client_session_id="s1"),
            interception("a2", "2026-01-01T00:00:02.000Z", client_session_id="s1"),
            interception("c1", "2026-01-01T00:00:03.000Z", initiator="carol",
                         client_session_id="s2"),
            interception("b2", "2026-01-01T00:00:04.000Z", initiator="bob",
                         client_session_id="s2"),
        ]
    )  # fmt: skip
    by_id = {r["id"]: r for r in await store.list_interceptions(InterceptionFilter())}
    assert {i: by_id[i]["session_id"] for i in by_id} == {
        "a1": "s1", "a2": "s1", "b1": "s1~bob", "c1": "s2", "b2": "s2~bob",
    }  # fmt: skip
    assert by_id["b1"]["client_session_id"] == "s1"  # what the client sent, as it sent it
    alice = await store.get_session("s1")
    assert alice is not None and alice["initiator"] == "alice"
    assert [i["id"] for t in alice["threads"] for i in t["interceptions"]] == ["a1", "a2"]


async def test_a_session_first_used_without_an_initiator_is_owned_by_none_across_batches(
    store: Store,
) -> None:
    # auth: none records own a client session id as no one: alice's same id is hers apart,
    # whatever the batch boundaries.
    await store.insert_interceptions(
        [
            interception("n1", "2026-01-01T00:00:00.000Z", initiator=None, client_session_id="x"),
            interception("a1", "2026-01-01T00:00:01.000Z", client_session_id="x"),
        ]
    )
    await store.insert_interceptions(
        [interception("a2", "2026-01-01T00:00:02.000Z", client_session_id="x")]
    )
    by_id = {r["id"]: r["session_id"] for r in await store.list_interceptions(InterceptionFilter())}
    assert by_id == {"n1": "x", "a1": "x~alice", "a2": "x~alice"}


async def test_a_value_sqlite_cannot_store_never_costs_the_batch(store: Store) -> None:
    # A count past 64 bits (an upstream reporting 1e20 tokens) and lone surrogates (JSON
    # "\ud800" escapes in a tool id, a session id, a thought) are stored as NULL or "?",
    # and the other records of the batch are written.
    odd = interception(
        "odd", "2026-01-01T00:00:00.000Z", input_tokens=10**20, cost_micros=2**70,
        client_session_id="s\ud800", tool_calls=(ToolCall("c\ud800", "t\udfff", "{}"),),
        thoughts=("x\ud800",), prompt="p\ud800",
    )  # fmt: skip
    fine = interception("fine", "2026-01-01T00:00:01.000Z")
    assert await store.insert_interceptions([odd, fine]) == 2
    by_id = {r["id"]: r for r in await store.list_interceptions(InterceptionFilter())}
    assert (by_id["odd"]["input_tokens"], by_id["odd"]["cost_micros"]) == (None, None)
    assert by_id["odd"]["client_session_id"] == "s?"
    assert by_id["odd"]["tool_calls"] == [{"tool_call_id": "c?", "tool": "t?", "input": "{}"}]
    assert (by_id["odd"]["thoughts"], by_id["odd"]["prompts"]) == (["x?"], ["p?"])
    assert by_id["fine"]["input_tokens"] == 10


def lineage_of(record: dict[str, Any]) -> tuple[str | None, str, str]:
    return record["thread_parent_id"], record["thread_root_id"], record["session_id"]


async def test_a_record_is_written_with_the_lineage_the_store_resolves_not_its_own(
    store: Store,
) -> None:
    await store.insert_interceptions(
        [interception("r", "2026-01-01T00:00:00.000Z", session_id="forged",
                      thread_parent_id="forged", thread_root_id="forged")]
    )  # fmt: skip
    (listed,) = await store.list_interceptions(InterceptionFilter())
    assert (listed["session_id"], listed["thread_parent_id"], listed["thread_root_id"]) == (
        "r",
        None,
        "r",
    )


async def test_purge_removes_an_interception_with_all_its_children(
    store: Store, db_path: Path
) -> None:
    first, second = claude_code_turn()
    kept = interception(
        "kept", "2026-02-01T00:00:00.000Z", prompt="later",
        tool_calls=(ToolCall("k", "t", "{}"),), thoughts=("hm",),
    )  # fmt: skip
    await store.insert_interceptions([first, second, kept])
    assert await store.purge_interceptions("2026-01-15T00:00:00.000Z") == 2
    assert [r["id"] for r in await store.list_interceptions(InterceptionFilter())] == ["kept"]
    with sqlite3.connect(db_path) as connection:
        for table in store_module.CHILD_TABLES:
            owners = {row[0] for row in connection.execute(f"SELECT interception_id FROM {table}")}
            assert owners == {"kept"}, table
    assert await store.get_session("s1") is None


async def test_session_filters_select_whole_sessions(store: Store) -> None:
    await store.insert_interceptions(
        [
            *claude_code_turn("s1"),
            interception("b1", "2026-01-02T00:00:00.000Z", initiator="bob", client_session_id="s2"),
            interception("b2", "2026-01-03T00:00:00.000Z", initiator="bob", client_session_id="s2",
                         model="gpt-4o"),
        ]
    )  # fmt: skip

    async def ids(**fields: Any) -> list[str]:
        listed = await store.list_sessions(InterceptionFilter(**fields))
        assert listed["count"] == len(listed["sessions"])
        return [session["id"] for session in listed["sessions"]]

    assert await ids() == ["s2", "s1"]  # most recently active first
    assert await ids(initiator="bob") == ["s2"]
    assert await ids(model="claude-sonnet-4-5") == ["s1"]
    assert await ids(provider="claude") == ["s1"]
    assert await ids(client="Codex") == ["s2"]
    assert await ids(session_id="s1") == ["s1"]
    assert await ids(started_after="2026-01-02T12:00:00.000Z") == ["s2"]
    assert await ids(started_before="2026-01-01T00:00:01.000Z") == ["s1"]
    # A filter picks sessions; each is still summarised whole (both models of s2).
    (s2,) = (await store.list_sessions(InterceptionFilter(model="gpt-4o")))["sessions"]
    assert s2["models"] == ["gpt-4o", "o3"]
    by_session = await store.list_interceptions(InterceptionFilter(session_id="s2"))
    assert [r["id"] for r in by_session] == ["b2", "b1"]


async def test_sessions_page_after_a_session_id_with_the_total_count(store: Store) -> None:
    await store.insert_interceptions(
        [
            interception(f"r{n}", f"2026-01-01T00:00:0{n}.000Z", client_session_id=f"s{n}")
            for n in range(5)
        ]
    )
    first = await store.list_sessions(InterceptionFilter(), limit=2)
    assert (first["count"], [s["id"] for s in first["sessions"]]) == (5, ["s4", "s3"])
    second = await store.list_sessions(InterceptionFilter(), 2, after_session_id="s3")
    assert (second["count"], [s["id"] for s in second["sessions"]]) == (5, ["s2", "s1"])
    last = await store.list_sessions(InterceptionFilter(), 2, after_session_id="s1")
    assert [s["id"] for s in last["sessions"]] == ["s0"]
    with pytest.raises(RecordError, match="unknown session 'nope'"):
        await store.list_sessions(InterceptionFilter(), 2, after_session_id="nope")


async def test_unreported_token_counts_stay_null_in_a_session(store: Store) -> None:
    await store.insert_interceptions(
        [
            interception("a", "2026-01-01T00:00:00.000Z", client_session_id="s",
                         input_tokens=None, output_tokens=None, cache_read_input_tokens=None,
                         cost_micros=None),
        ]
    )  # fmt: skip
    (session,) = (await store.list_sessions(InterceptionFilter()))["sessions"]
    assert session["token_usage_summary"] == dict.fromkeys(
        ("input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")
    )
    assert (session["cost_micros"], session["last_prompt"]) == (None, None)


async def test_an_unknown_session_is_none(store: Store) -> None:
    assert await store.get_session("nope") is None


async def test_session_and_lineage_queries_stay_on_indexes(store: Store, db_path: Path) -> None:
    await store.insert_interceptions(claude_code_turn())
    statements: list[str] = []
    await store._db.set_trace_callback(statements.append)
    await store.insert_interceptions(
        [interception("r3", "2026-01-01T00:00:09.000Z", tool_result_ids=("toolu_1",))]
    )
    await store.list_sessions(InterceptionFilter(initiator="alice"), after_session_id="s1")
    await store.list_interceptions(InterceptionFilter(session_id="s1"))
    await store.get_session("s1")
    await store.purge_interceptions("2026-01-01T00:00:01.000Z")
    await store._db.set_trace_callback(None)
    with sqlite3.connect(db_path) as connection:
        for sql in statements:
            if sql.split()[0].upper() not in ("SELECT", "DELETE"):
                continue
            for *_, detail in connection.execute(f"EXPLAIN QUERY PLAN {sql}"):
                # A SCAN of a table (not of an index, nor of the json_each list of ids) reads
                # every row: none of these queries may.
                assert not re.fullmatch(r"SCAN (\w+)( AS \w+)?", detail), (sql, detail)


# --- operator prices (prices set) --------------------------------------------------------------


async def test_a_set_price_is_listed_exactly_replaced_and_deleted(
    store: Store, db_path: Path, clock: list[str]
) -> None:
    await store.set_model_price("my-model", ModelPrices(Decimal("3"), Decimal("15.5")))
    await store.set_model_price(
        "other", ModelPrices(Decimal("0.1"), Decimal("0.4"), Decimal("0.025"), Decimal("0.125"))
    )
    clock.append("2026-01-02T00:00:00Z")
    replacement = ModelPrices(Decimal("2.5"), Decimal("10"), Decimal("0.25"))
    await store.set_model_price("my-model", replacement)
    assert await store.list_model_prices() == [
        ("my-model", replacement, "2026-01-02T00:00:00Z"),
        ("other", ModelPrices(Decimal("0.1"), Decimal("0.4"), Decimal("0.025"), Decimal("0.125")),
         "2026-01-01T00:00:00Z"),
    ]  # fmt: skip
    assert (await read_routing_state(db_path)).model_prices == {
        "my-model": replacement,
        "other": ModelPrices(Decimal("0.1"), Decimal("0.4"), Decimal("0.025"), Decimal("0.125")),
    }
    assert await store.delete_model_price("my-model")
    assert not await store.delete_model_price("my-model")
    assert [model for model, _, _ in await store.list_model_prices()] == ["other"]


async def test_price_writes_bump_the_generation_and_a_missing_delete_does_not(
    store: Store,
) -> None:
    before = await store.generation()
    await store.set_model_price("m", ModelPrices(Decimal(1), Decimal(2)))
    await store.delete_model_price("m")
    assert await store.generation() == before + 2
    await store.delete_model_price("m")
    assert await store.generation() == before + 2


@pytest.mark.parametrize("model", ["", " padded", "new\nline", "x" * 257])
async def test_a_bad_model_name_is_refused_and_nothing_written(store: Store, model: str) -> None:
    with pytest.raises(RecordError, match="invalid model name"):
        await store.set_model_price(model, ModelPrices(Decimal(1), Decimal(2)))
    assert await store.list_model_prices() == []


async def test_a_price_row_edited_into_nonsense_leaves_that_model_unpriced(
    store: Store, db_path: Path
) -> None:
    await store.set_model_price("bad", ModelPrices(Decimal(1), Decimal(2)))
    await store.set_model_price("good", ModelPrices(Decimal(1), Decimal(2)))
    with sqlite3.connect(db_path) as connection:
        connection.execute("UPDATE model_prices SET output = 'lots' WHERE model = 'bad'")
    assert (await read_routing_state(db_path)).model_prices == {
        "bad": None,
        "good": ModelPrices(Decimal(1), Decimal(2)),
    }


# --- the file under a long-lived connection ---------------------------------------------------


async def test_file_state_tells_a_deleted_or_replaced_file(db_path: Path, tmp_path: Path) -> None:
    async with await Store.open(db_path) as opened:
        assert opened.file_state() == "same"
        other = tmp_path / "other.db"
        await (await Store.open(other)).close()
        os.rename(other, db_path)
        assert opened.file_state() == "replaced"
        db_path.unlink()
        assert opened.file_state() == "missing"


async def test_open_without_migrate_refuses_a_file_of_another_version(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    db_path.touch()
    with pytest.raises(StoreError, match="schema version 0, expected"):
        await Store.open(db_path, create=False, migrate=False)
    assert db_path.stat().st_size == 0  # nothing written, not even the journal mode
    create_v1_database(db_path.with_name("v1.db"))
    with pytest.raises(StoreError, match="schema version 1, expected"):
        await Store.open(db_path.with_name("v1.db"), create=False, migrate=False)


async def test_open_without_create_raises_database_missing(db_path: Path) -> None:
    with pytest.raises(DatabaseMissing, match="does not exist"):
        await Store.open(db_path, create=False)
    assert not db_path.exists()


async def test_checkpoint_empties_the_log_and_never_waits_for_a_reader(db_path: Path) -> None:
    wal = db_path.with_name(db_path.name + "-wal")
    async with await Store.open(db_path) as opened:
        await opened.insert_provider(provider())
        reader = sqlite3.connect(db_path)
        try:
            reader.execute("BEGIN")
            reader.execute("SELECT * FROM providers").fetchall()  # holds a read snapshot
            await asyncio.wait_for(opened.checkpoint(), 2)  # busy: skipped, not waited for
            assert wal.stat().st_size > 0
        finally:
            reader.close()
        await opened.checkpoint()
        assert wal.stat().st_size == 0
        assert [p.name for p in await opened.list_providers()] == ["corp"]


def create_v7_database_with_plain_keys(path: Path) -> None:
    """A database at schema version 7, whose provider keys are a JSON list of strings."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as connection:
        connection.execute(
            "CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
        )
        for version in range(1, 8):
            for statement in MIGRATIONS[version - 1]:
                connection.execute(statement)
            connection.execute(
                "INSERT INTO schema_version VALUES (?, '2026-01-01T00:00:00Z')", (version,)
            )
        connection.execute(
            "INSERT INTO providers (name, type, keys, created_at, updated_at) VALUES "
            "('openai', 'openai', '[\"sk-one\", \"sk-two\"]', '2026-01-01T00:00:00Z', "
            "'2026-01-02T00:00:00Z'), ('broken', 'openai', '[\"sk-x\", 5]', 't', 't')"
        )


async def test_migration_eight_gives_each_plain_key_an_id_and_keeps_a_malformed_row_as_it_was(
    db_path: Path,
) -> None:
    create_v7_database_with_plain_keys(db_path)
    async with await Store.open(db_path) as opened:
        record = await opened.get_provider("openai")
        broken = await opened.get_provider("broken")
    assert record is not None and record.keys == ("sk-one", "sk-two") and not record.problem
    ids = [info.id for info in record.key_info]
    assert len(set(ids)) == 2 and all(len(i) == 12 for i in ids)
    assert {info.created_at for info in record.key_info} == {"2026-01-02T00:00:00Z"}
    assert broken is not None and "keys has an entry" in broken.problem


async def test_a_kept_key_keeps_its_id_and_a_new_key_gets_a_new_one(store: Store) -> None:
    first = await store.insert_provider(
        ProviderRecord(name="openai", type="openai", keys=("sk-one", "sk-two"))
    )
    kept = {key: info.id for key, info in zip(first.keys, first.key_info, strict=True)}
    await store.update_provider(replace(first, keys=("sk-three", "sk-two")))
    updated = await store.get_provider("openai")
    assert updated is not None and updated.keys == ("sk-three", "sk-two")
    assert updated.key_info[1].id == kept["sk-two"]
    assert updated.key_info[0].id not in kept.values()


async def test_admin_tokens_are_stored_as_hashes_with_a_role_and_revoked_by_name(
    store: Store,
) -> None:
    await store.insert_admin_token("ops", "hash-ops", "admin")
    await store.insert_admin_token("audit", "hash-audit", "auditor")
    await store.insert_token("alice", "hash-alice")
    assert await store.token_owner("hash-ops") == ("admin", "ops")
    assert await store.token_owner("hash-audit") == ("auditor", "audit")
    assert await store.token_owner("hash-alice") == ("proxy", "alice")
    assert await store.token_owner("hash-none") is None
    with pytest.raises(RecordError, match="already exists"):
        await store.insert_admin_token("ops", "hash-2", "admin")
    with pytest.raises(RecordError, match="invalid role 'root'"):
        await store.insert_admin_token("x", "hash-3", "root")
    assert [t.name for t in await store.list_admin_tokens()] == ["audit", "ops"]
    assert await store.delete_admin_token("ops") and not await store.delete_admin_token("ops")
    assert await store.token_owner("hash-ops") is None


async def test_a_client_session_id_with_a_tilde_never_names_another_users_session(
    store: Store,
) -> None:
    # The attack review's sequence: alice records "victim~bob" before bob collides on "victim".
    await store.insert_interceptions(
        [
            interception("a1", "2026-01-01T00:00:00.000Z", client_session_id="victim"),
            interception("a2", "2026-01-01T00:00:01.000Z", client_session_id="victim~bob"),
            interception("b1", "2026-01-01T00:00:02.000Z", initiator="bob",
                         client_session_id="victim"),
        ]
    )  # fmt: skip
    by_id = {r["id"]: r for r in await store.list_interceptions(InterceptionFilter())}
    assert by_id["b1"]["session_id"] == "victim~bob"
    assert by_id["a2"]["session_id"] != "victim~bob"  # its own thread's root instead
    session = await store.get_session("victim~bob")
    assert session is not None and session["initiator"] == "bob"


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"keys": ("sk-a", "sk-b", "sk-a")}, "keys", "key #3 repeats key #1"),
        ({"keys": ("k" * 4097,)}, "keys", "key #1 is longer than 4096 characters"),
        ({"display_name": "d" * 4097}, "display_name", "longer than 4096"),
        ({"settings": {"region": "us-east-1\x01"}}, "settings", "control character"),
        ({"settings": {"note": "x" * 4097}}, "settings", "longer than 4096"),
    ],
)
async def test_a_provider_field_too_long_repeated_or_with_control_characters_is_refused(
    store: Store, change: dict[str, Any], field: str, message: str
) -> None:
    with pytest.raises(RecordError, match=message) as refused:
        await store.insert_provider(ProviderRecord(name="p", type="openai", **change))
    assert refused.value.field == field
    assert "sk-a" not in str(refused.value) and "kkkk" not in str(refused.value)


async def test_a_session_detail_carries_its_latest_interceptions_only(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    import aibridgeproxyd.store as store_module

    monkeypatch.setattr(store_module, "MAX_SESSION_INTERCEPTIONS", 3)
    await store.insert_interceptions(
        [
            interception(f"r{i}", f"2026-01-01T00:00:0{i}.000Z", client_session_id="long")
            for i in range(5)
        ]
    )
    session = await store.get_session("long")
    assert session is not None
    shown = [i["id"] for thread in session["threads"] for i in thread["interceptions"]]
    assert sorted(shown) == ["r2", "r3", "r4"]


async def test_a_batch_written_again_is_stored_once_with_its_prompts(store: Store) -> None:
    """Attacker review: a batch retried after its commit's answer was lost (the connection
    dropped during COMMIT) was written twice, or failed on the prompts' primary key."""
    batch = [
        interception("r-1", "2026-01-01T00:00:01.000Z", prompt="hello\x00there"),
        interception("r-2", "2026-01-01T00:00:02.000Z"),
    ]
    assert await store.insert_interceptions(batch) == 2
    again = [*batch, interception("r-3", "2026-01-01T00:00:03.000Z")]
    assert await store.insert_interceptions(again) == 1
    records = await store.list_interceptions(InterceptionFilter())
    assert sorted(r["request_id"] for r in records) == ["r-1", "r-2", "r-3"]
    (first,) = [r for r in records if r["request_id"] == "r-1"]
    assert first["prompts"] == ["hello\ufffdthere"]  # NUL: not storable on PostgreSQL


async def test_junk_or_future_presence_rows_are_not_daemons(store: Store) -> None:
    """Attacker review: a hand-made row with an infinite generation crashed `tokens revoke`,
    one with a heartbeat far ahead made it wait for a daemon that does not exist."""
    import time

    rows = {
        "daemon:evil": '{"generation": Infinity, "heartbeat": 1}',
        "daemon:ahead": '{"generation": 0, "heartbeat": 1e999}',
        "daemon:later": f'{{"generation": 0, "heartbeat": {time.time() + 3600}}}',
    }
    await store.write_presence("real", 3, time.time(), ["k1"])
    async with store._transaction(write=True) as db:
        for key, value in rows.items():
            await db.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (key, value))
    reports = await store_module.daemon_reports(store)
    assert list(reports) == ["real"] and reports["real"].key_ids == ("k1",)


_HOLD_WRITE_LOCK = """
import sqlite3, sys, time
connection = sqlite3.connect(sys.argv[1], isolation_level=None)
connection.execute("BEGIN IMMEDIATE")
print("held", flush=True)
time.sleep(float(sys.argv[2]))
connection.execute("COMMIT")
"""


async def test_presence_writes_wait_for_another_process_holding_the_write_lock(
    store: Store, db_path: Path
) -> None:
    """The heartbeat's statements run in autocommit mode (``Store._statement``): each must
    wait for the write lock within busy_timeout, as BEGIN IMMEDIATE does, not fail at once
    with "database is locked" while a CLI write in another process holds it."""
    import sys
    import time

    for write, present in (
        (lambda: store.write_presence("waiting", 7, time.time(), ["k1"]), True),
        (lambda: store.remove_presence("waiting"), False),
    ):
        holder = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _HOLD_WRITE_LOCK, str(db_path), "0.8",
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert holder.stdout is not None
        assert await holder.stdout.readline() == b"held\n"
        started = time.monotonic()
        await write()
        assert time.monotonic() - started >= 0.5  # it waited for the other process's commit
        assert await holder.wait() == 0
        assert ("waiting" in await store_module.daemon_presences(store)) is present
