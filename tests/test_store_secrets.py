"""Secrets at rest in the store (CONTRACT section 13): provider keys and secret settings are sealed
when written and opened when read, by Store methods and by the reload's read_routing_state. The
database file, its WAL and its SHM never hold a plaintext secret: after an add, an update, a
rotation, and after a plain-text database is opened (the sealing step after the migrations).
A value sealed with a key we do not have refuses the read naming the key id; an altered value
puts its provider in status error naming the field."""

from __future__ import annotations

import base64
import json
import sqlite3
import stat
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from aibridgeproxyd.database_url import DatabaseUrl
from aibridgeproxyd.model import ProviderRecord, Status
from aibridgeproxyd.providers import evaluate_providers
from aibridgeproxyd.sealing import KEY_FILE_NAME, Keyring, key_id
from aibridgeproxyd.store import MIGRATIONS, RecordCache, Store, StoreError, read_routing_state
from tests.store_engines import open_store

KEY_ONE = bytes(range(32))
KEY_TWO = bytes(range(100, 132))
SECRET_KEY = "sk-live-PLAINTEXT-key-0123456789"
NEW_KEY = "sk-live-REPLACEMENT-key-9876543210"
AWS_SECRET = "aws-SECRET-ACCESS-plaintext/0123"
SESSION = "aws-SESSION-TOKEN-plaintext-4567"


@pytest.fixture
async def store(store_database: Path | DatabaseUrl) -> AsyncIterator[Store]:
    async with await open_store(store_database, keyring=Keyring([KEY_ONE])) as opened:
        yield opened


def on_disk(db_path: Path) -> bytes:
    """What ``strings`` would search: the database file and its -wal and -shm companions."""
    return b"".join(
        path.read_bytes()
        for path in (db_path, db_path.with_name(db_path.name + "-wal"),
                     db_path.with_name(db_path.name + "-shm"))
        if path.exists()
    )  # fmt: skip


def assert_no_plaintext(db_path: Path, *secrets: str) -> None:
    data = on_disk(db_path)
    for secret in secrets:
        assert secret.encode() not in data, f"{secret!r} is in the database files"


def raw_columns(db_path: Path, name: str) -> tuple[str, str]:
    with sqlite3.connect(db_path) as connection:
        row = connection.execute(
            "SELECT keys, settings FROM providers WHERE name = ?", (name,)
        ).fetchone()
    return row[0], row[1]


def bedrock(name: str = "aws") -> ProviderRecord:
    return ProviderRecord(
        name=name,
        type="bedrock",
        keys=(),
        settings={
            "region": "us-east-1",
            "access_key_id": "AKIDEXAMPLE",
            "secret_access_key": AWS_SECRET,
            "session_token": SESSION,
        },
    )


async def test_keys_and_secret_settings_round_trip_sealed_on_disk(
    store: Store, db_path: Path
) -> None:
    added = await store.insert_provider(
        ProviderRecord(name="corp", type="openai", keys=(SECRET_KEY,))
    )
    await store.insert_provider(bedrock())
    corp = await store.get_provider("corp")
    aws = await store.get_provider("aws")
    assert corp is not None and aws is not None
    assert corp.keys == (SECRET_KEY,) and corp.key_info == added.key_info
    assert aws.settings == bedrock().settings
    keys, _ = raw_columns(db_path, "corp")
    (entry,) = json.loads(keys)
    assert entry["id"] == added.key_info[0].id
    assert entry["key"].startswith(f"enc:v1:{key_id(KEY_ONE)}:")
    _, settings = raw_columns(db_path, "aws")
    stored = json.loads(settings)
    assert stored["region"] == "us-east-1"  # not a secret: readable as it was
    assert stored["secret_access_key"].startswith("enc:v1:")
    assert stored["session_token"].startswith("enc:v1:")
    assert_no_plaintext(db_path, SECRET_KEY, AWS_SECRET, SESSION)


async def test_no_plaintext_after_add_update_and_rotate(db_path: Path) -> None:
    async with await Store.open(db_path, keyring=Keyring([KEY_ONE])) as store:
        await store.insert_provider(ProviderRecord(name="corp", type="openai", keys=(SECRET_KEY,)))
        await store.insert_provider(bedrock())
        assert_no_plaintext(db_path, SECRET_KEY, AWS_SECRET, SESSION)  # WAL open
        corp = await store.get_provider("corp")
        assert corp is not None
        await store.update_provider(replace(corp, keys=(SECRET_KEY, NEW_KEY)))
        assert_no_plaintext(db_path, SECRET_KEY, NEW_KEY, AWS_SECRET, SESSION)
    async with await Store.open(db_path, keyring=Keyring([KEY_TWO, KEY_ONE])) as store:
        # Two keys, and three Bedrock settings (access_key_id looks secret too).
        assert await store.rotate_keys() == (key_id(KEY_TWO), 5)
        assert_no_plaintext(db_path, SECRET_KEY, NEW_KEY, AWS_SECRET, SESSION)
        # Nothing is left sealed with the old key, in the rows or in free pages.
        assert f"enc:v1:{key_id(KEY_ONE)}".encode() not in on_disk(db_path)
        assert await store.rotate_keys() == (key_id(KEY_TWO), 0)  # idempotent
    assert_no_plaintext(db_path, SECRET_KEY, NEW_KEY, AWS_SECRET, SESSION)
    # The old key can go: the new one alone reads everything.
    async with await Store.open(db_path, keyring=Keyring([KEY_TWO])) as store:
        corp = await store.get_provider("corp")
        assert corp is not None and corp.keys == (SECRET_KEY, NEW_KEY)
        aws = await store.get_provider("aws")
        assert aws is not None and aws.settings["secret_access_key"] == AWS_SECRET


async def test_a_key_we_do_not_have_refuses_every_provider_read_naming_its_id(
    db_path: Path,
) -> None:
    async with await Store.open(db_path, keyring=Keyring([KEY_ONE])) as store:
        await store.insert_provider(ProviderRecord(name="corp", type="openai", keys=(SECRET_KEY,)))
    missing = key_id(KEY_ONE)
    # Opening (and its sealing step) works: the refusal comes with the first provider read.
    async with await Store.open(db_path, keyring=Keyring([KEY_TWO])) as store:
        with pytest.raises(StoreError, match=f"key id {missing}"):
            await store.list_providers()
        with pytest.raises(StoreError, match=f"key id {missing}"):
            await store.get_provider("corp")
        with pytest.raises(StoreError, match=f"key id {missing}"):
            await store.rotate_keys()
        assert (await store.list_tokens()) == []  # what holds no secret still reads
    with pytest.raises(StoreError, match=f"key id {missing}"):
        await read_routing_state(db_path, RecordCache(Keyring([KEY_TWO])))
    # Without encryption_keys the key file next to the database is used: there is none.
    with pytest.raises(StoreError, match=f"key id {missing}.*{KEY_FILE_NAME}"):
        await read_routing_state(db_path)


async def test_a_value_copied_from_another_provider_puts_only_that_provider_in_error(
    store: Store, db_path: Path
) -> None:
    await store.insert_provider(ProviderRecord(name="corp", type="openai", keys=(SECRET_KEY,)))
    await store.insert_provider(ProviderRecord(name="other", type="openai", keys=(NEW_KEY,)))
    await store.insert_provider(bedrock())
    stolen, _ = raw_columns(db_path, "other")
    _, settings = raw_columns(db_path, "aws")
    altered = json.loads(settings)
    altered["session_token"] = altered["session_token"][:-8] + "AAAAAAA="
    with sqlite3.connect(db_path) as connection:
        connection.execute("UPDATE providers SET keys = ? WHERE name = 'corp'", (stolen,))
        connection.execute(
            "UPDATE providers SET settings = ? WHERE name = 'aws'", (json.dumps(altered),)
        )
    with pytest.raises(
        StoreError, match=r"provider '(aws|corp)': the stored .* cannot be decrypted"
    ):
        await store.rotate_keys()  # nothing to re-encrypt, but every value is checked
    records = {record.name: record for record in await store.list_providers()}
    assert records["corp"].keys == () and "provider 'corp'" in records["corp"].problem
    assert "stored keys cannot be decrypted" in records["corp"].problem
    assert "settings.session_token" in records["aws"].problem
    assert records["other"].keys == (NEW_KEY,) and not records["other"].problem
    statuses = {p.name: p.status for p in evaluate_providers(records.values())}
    assert statuses["corp"] is Status.ERROR and statuses["aws"] is Status.ERROR
    for record in records.values():
        assert NEW_KEY not in record.problem and SESSION not in record.problem


async def test_the_reload_opens_only_changed_rows(store: Store, db_path: Path) -> None:
    await store.insert_provider(ProviderRecord(name="corp", type="openai", keys=(SECRET_KEY,)))
    await store.insert_provider(ProviderRecord(name="other", type="openai", keys=(NEW_KEY,)))
    cache = RecordCache(Keyring([KEY_ONE]))
    first = {r.name: r for r in (await read_routing_state(db_path, cache)).providers}
    assert first["corp"].keys == (SECRET_KEY,)
    other = await store.get_provider("other")
    assert other is not None
    await store.update_provider(replace(other, display_name="Other"))
    second = {r.name: r for r in (await read_routing_state(db_path, cache)).providers}
    assert second["corp"] is first["corp"]
    assert second["other"] is not first["other"] and second["other"].keys == (NEW_KEY,)


async def test_the_key_file_is_generated_beside_the_database_when_a_secret_is_first_stored(
    db_path: Path,
) -> None:
    async with await Store.open(db_path) as store:
        await store.insert_provider(ProviderRecord(name="plain", type="openai"))
        assert not (db_path.parent / KEY_FILE_NAME).exists()
        await store.insert_provider(ProviderRecord(name="corp", type="openai", keys=(SECRET_KEY,)))
    key_file = db_path.parent / KEY_FILE_NAME
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = base64.b64decode(key_file.read_text())
    keys, _ = raw_columns(db_path, "corp")
    assert json.loads(keys)[0]["key"].startswith(f"enc:v1:{key_id(key)}:")
    assert (await read_routing_state(db_path)).providers[0].keys == (SECRET_KEY,)


# --- a plain-text database is sealed when opened ---------------------------------------------


def create_plain_v8_database(path: Path) -> None:
    """A database as migration 8 left it, before secrets were encrypted: keys as objects with
    the key in clear, Bedrock's secret settings in clear. Written without the Store class, in
    WAL mode, with an update that leaves an earlier key in the file's free space."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as connection:
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute(
            "CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
        )
        for version, statements in enumerate(MIGRATIONS, start=1):
            for statement in statements:
                connection.execute(statement)
            connection.execute(
                "INSERT INTO schema_version VALUES (?, '2026-01-01T00:00:00Z')", (version,)
            )
        columns = (
            "name, type, display_name, base_url, hosts, enabled, allow_byok, keys, settings, "
            "created_at, updated_at"
        )
        entry = {"id": "a1b2c3d4e5f6", "created_at": "2026-01-01T00:00:00Z", "key": NEW_KEY}
        connection.execute(
            f"INSERT INTO providers ({columns}) VALUES ('corp', 'openai', 'Corp', '', '[]', 1, 1, "
            "?, '{}', '2026-01-01T00:00:00Z', '2026-01-01T00:00:00Z')",
            (json.dumps([entry]),),
        )
        connection.commit()
        connection.execute(
            "UPDATE providers SET keys = ? WHERE name = 'corp'",
            (json.dumps([{**entry, "key": SECRET_KEY}]),),
        )
        connection.execute(
            f"INSERT INTO providers ({columns}) VALUES ('aws', 'bedrock', 'AWS', '', '[]', 1, 1, "
            "'[]', ?, '2026-01-01T00:00:00Z', '2026-01-01T00:00:00Z')",
            (json.dumps(bedrock().settings),),
        )
    assert SECRET_KEY.encode() in on_disk(path) and NEW_KEY.encode() in on_disk(path)


async def test_a_plain_text_database_is_sealed_when_opened(db_path: Path) -> None:
    create_plain_v8_database(db_path)
    async with await Store.open(db_path, keyring=Keyring([KEY_ONE])) as store:
        assert_no_plaintext(db_path, SECRET_KEY, NEW_KEY, AWS_SECRET, SESSION)
        corp = await store.get_provider("corp")
        aws = await store.get_provider("aws")
        generation = await store.generation()
    assert corp is not None and aws is not None
    assert corp.keys == (SECRET_KEY,) and corp.key_info[0].id == "a1b2c3d4e5f6"
    assert aws.settings == bedrock().settings
    assert_no_plaintext(db_path, SECRET_KEY, NEW_KEY, AWS_SECRET, SESSION)
    # Idempotent: opening again changes nothing.
    before = raw_columns(db_path, "corp"), raw_columns(db_path, "aws")
    async with await Store.open(db_path, keyring=Keyring([KEY_ONE])) as store:
        assert await store.generation() == generation
    assert (raw_columns(db_path, "corp"), raw_columns(db_path, "aws")) == before


async def test_a_row_left_in_plain_text_by_hand_is_still_read_and_sealed_at_the_next_open(
    store: Store, db_path: Path
) -> None:
    await store.insert_provider(ProviderRecord(name="corp", type="openai", keys=(NEW_KEY,)))
    entry = {"id": "a1b2c3d4e5f6", "created_at": "2026-01-01T00:00:00Z", "key": SECRET_KEY}
    with sqlite3.connect(db_path) as connection:
        connection.execute(
            "UPDATE providers SET keys = ? WHERE name = 'corp'", (json.dumps([entry]),)
        )
    corp = await store.get_provider("corp")
    assert corp is not None and corp.keys == (SECRET_KEY,)
    async with await Store.open(db_path, keyring=Keyring([KEY_ONE])):
        pass
    assert_no_plaintext(db_path, SECRET_KEY)


async def test_a_malformed_keys_column_is_left_alone_by_the_sealing_step(
    store: Store, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.insert_provider(ProviderRecord(name="corp", type="openai"))
    with sqlite3.connect(db_path) as connection:
        connection.execute("UPDATE providers SET keys = '[{\"id\": \"x\"}]' WHERE name = 'corp'")
    generation = await store.generation()
    rewrites: list[bool] = []

    async def reseal(self: Store, rotate: bool) -> int:
        rewrites.append(rotate)
        return 0

    monkeypatch.setattr(Store, "_reseal", reseal)
    async with await Store.open(db_path, keyring=Keyring([KEY_ONE])) as again:
        assert await again.generation() == generation
        corp = await again.get_provider("corp")
        assert corp is not None and "keys has an entry" in corp.problem
    assert rewrites == []  # no rewrite (and no VACUUM) on every open
