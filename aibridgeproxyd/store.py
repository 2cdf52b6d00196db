"""The provider, token, price and interception store: the only module that speaks SQL.

One SQLite file (``<data_dir>/aibridgeproxyd.db``) in WAL mode, shared by the daemon and the CLI
at the same time, or a PostgreSQL database shared by several replicas (``database_url``,
CONTRACT 14; the engine's plumbing is ``aibridgeproxyd.postgres``). The SQL here is written once
for both: ``?`` parameters, ``INSERT ... ON CONFLICT``, JSON lists through ``json_each(?)``.
The schema is versioned: ``MIGRATIONS`` is applied in order, each inside a transaction, so an
older database upgrades in place and a failed step leaves it as it was.

Every management write bumps ``meta.generation`` in the same transaction, so a reader can tell
cheaply that something changed. Rows are validated before they are written (``validate_record``)
so that neither the CLI nor seeding can store a row the rest of the code cannot parse. A row
changed behind the store's back (by hand, with sqlite3) is still read: if it cannot be, it comes
back as a record with ``problem`` set, in status ``error``, and never fails the other rows.

Long-lived connections check ``Store.file_state`` before use: a database file deleted or
replaced under them would otherwise swallow writes into an unlinked inode.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import operator
import os
import re
import secrets
import sqlite3
import stat
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any, Literal, NamedTuple, Self

import aiosqlite

from aibridgeproxyd import postgres
from aibridgeproxyd.adapters import ADAPTERS
from aibridgeproxyd.database_url import DatabaseUrl
from aibridgeproxyd.liveness import host_identity, process_gone
from aibridgeproxyd.model import (
    ADMIN_ROLES,
    INTERCEPTION_FIELDS,
    MAX_KEYS,
    NAME_PATTERN,
    AdminTokenRecord,
    InterceptionFilter,
    InterceptionRecord,
    KeyInfo,
    ProviderRecord,
    TokenRecord,
    ToolCall,
    Upstream,
)
from aibridgeproxyd.policy import (
    EVERYONE,
    PERIODS,
    Policy,
    PolicyError,
    period_end,
    period_key,
    period_start,
    validate_policy,
)
from aibridgeproxyd.postgres import PgConnection
from aibridgeproxyd.pricing import ModelPrices, StoredPrices, override_rates, parse_rate
from aibridgeproxyd.providers import check_name, normalize_host
from aibridgeproxyd.sealing import (
    PREFIX as SEALED_PREFIX,
)
from aibridgeproxyd.sealing import (
    Keyring,
    SealingError,
    TamperedValueError,
    has_plaintext_secret,
    is_sealed,
    seal_settings,
    unseal_settings,
    walk_secret_settings,
)
from aibridgeproxyd.sessions import (
    Children,
    SessionAggregate,
    SessionInterception,
    session_summary,
    session_threads,
)

log = logging.getLogger("aibridgeproxyd.store")

# An open connection of either engine (PgConnection speaks aiosqlite's execute/executemany).
Connection = aiosqlite.Connection | PgConnection
_INTEGRITY_ERRORS: tuple[type[BaseException], ...] = (
    sqlite3.IntegrityError,
    *postgres.INTEGRITY_ERRORS,
)

DATABASE_FILE_MODE = 0o600
DATA_DIR_MODE = 0o700
# The CLI and the daemon write the same file; a writer waits this long for the other's lock
# instead of failing with "database is locked".
BUSY_TIMEOUT_MS = 5000

# Migration N is MIGRATIONS[N - 1]: a tuple of SQL statements applied in one transaction.
# Never edit a released migration; append a new one. (Statements, not one script, because
# sqlite3's executescript() commits first and would break the all-or-nothing guarantee.)
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        # hosts, keys and settings are JSON text. Empty base_url/hosts mean the type's default.
        """
        CREATE TABLE providers (
            name TEXT PRIMARY KEY,
            type TEXT NOT NULL,
            display_name TEXT NOT NULL DEFAULT '',
            base_url TEXT NOT NULL DEFAULT '',
            hosts TEXT NOT NULL DEFAULT '[]',
            enabled INTEGER NOT NULL DEFAULT 1,
            allow_byok INTEGER NOT NULL DEFAULT 1,
            keys TEXT NOT NULL DEFAULT '[]',
            settings TEXT NOT NULL DEFAULT '{}',
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        )
        """,
        # Tombstones: one-time seeding must never bring back a provider an operator deleted.
        "CREATE TABLE deleted_providers (name TEXT PRIMARY KEY, deleted_at TEXT NOT NULL)",
        # Only hashes: a token is shown once, at creation, and cannot be recovered from here.
        """
        CREATE TABLE tokens (
            name TEXT PRIMARY KEY,
            token_hash TEXT UNIQUE NOT NULL,
            created_at TEXT NOT NULL
        )
        """,
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value)",
        "INSERT INTO meta (key, value) VALUES ('generation', 0)",
    ),
    (
        # Interception records (docs/monitoring.md#interception-records). Written in batches by
        # the daemon, off the request path; never bodies. Timestamps are fixed-width RFC 3339
        # text, so they sort as text.
        """
        CREATE TABLE interceptions (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            request_id TEXT NOT NULL,
            connect_id TEXT NOT NULL,
            initiator TEXT,
            provider TEXT NOT NULL,
            provider_type TEXT NOT NULL,
            model TEXT,
            client TEXT NOT NULL,
            method TEXT NOT NULL,
            path TEXT NOT NULL,
            status INTEGER,
            streamed INTEGER NOT NULL,
            input_tokens INTEGER,
            output_tokens INTEGER,
            cache_read_input_tokens INTEGER,
            cache_creation_input_tokens INTEGER,
            started_at TEXT NOT NULL,
            ended_at TEXT NOT NULL,
            ttfb_ms REAL,
            duration_ms REAL NOT NULL,
            error TEXT
        )
        """,
        "CREATE INDEX interceptions_started_at ON interceptions (started_at)",
        "CREATE INDEX interceptions_provider ON interceptions (provider, started_at)",
        "CREATE INDEX interceptions_initiator ON interceptions (initiator, started_at)",
    ),
    (
        # Reasoning tokens (a part of output_tokens), where the provider reports them. Records
        # written before this version did not read them: NULL, "not reported", never 0.
        "ALTER TABLE interceptions ADD COLUMN reasoning_output_tokens INTEGER",
    ),
    (
        # CONTRACT 10.1: ``provider`` is the provider's type and ``provider_name`` its name.
        # Before this version ``provider`` held the name (and ``provider_type`` the type), so
        # older records move the name over: both are known exactly. What older records did
        # not read (user agent, credential) stays NULL.
        "ALTER TABLE interceptions ADD COLUMN provider_name TEXT",
        "ALTER TABLE interceptions ADD COLUMN user_agent TEXT",
        "ALTER TABLE interceptions ADD COLUMN credential_kind TEXT",
        "ALTER TABLE interceptions ADD COLUMN credential_hint TEXT",
        "UPDATE interceptions SET provider_name = provider, provider = provider_type",
        "CREATE INDEX interceptions_provider_name ON interceptions (provider_name, started_at)",
    ),
    (
        # Cost in millionths of a US dollar (aibridgeproxyd.pricing). NULL for unpriced usage
        # and for records written before this version, which were never priced.
        "ALTER TABLE interceptions ADD COLUMN cost_micros INTEGER",
    ),
    (
        # Sessions and threads (docs/monitoring.md#sessions-and-threads), resolved when a record
        # is written (insert_interceptions). Records written before this version had neither a
        # client session id nor thread lineage: each is its own thread and its own session, so
        # thread_root_id and session_id take its own request_id (the contract's fallback).
        "ALTER TABLE interceptions ADD COLUMN client_session_id TEXT",
        "ALTER TABLE interceptions ADD COLUMN session_id TEXT",
        "ALTER TABLE interceptions ADD COLUMN thread_parent_id TEXT",
        "ALTER TABLE interceptions ADD COLUMN thread_root_id TEXT",
        "UPDATE interceptions SET session_id = request_id, thread_root_id = request_id",
        # Child rows reference the interception's public id, its request_id (a UUID); retention
        # deletes them with it (purge_interceptions). Each text is cut at record_max_bytes
        # before it gets here; none of them carries a credential.
        """
        CREATE TABLE interception_prompts (
            interception_id TEXT NOT NULL,
            position INTEGER NOT NULL,
            prompt TEXT NOT NULL,
            PRIMARY KEY (interception_id, position)
        )
        """,
        """
        CREATE TABLE interception_tool_calls (
            interception_id TEXT NOT NULL,
            position INTEGER NOT NULL,
            tool_call_id TEXT,
            tool TEXT NOT NULL,
            input TEXT NOT NULL,
            PRIMARY KEY (interception_id, position)
        )
        """,
        """
        CREATE TABLE interception_thoughts (
            interception_id TEXT NOT NULL,
            position INTEGER NOT NULL,
            thought TEXT NOT NULL,
            PRIMARY KEY (interception_id, position)
        )
        """,
        # Not UNIQUE: a database written before this version is not checked for duplicates,
        # and a migration must not fail on one.
        "CREATE INDEX interceptions_request_id ON interceptions (request_id)",
        "CREATE INDEX interceptions_session ON interceptions (session_id, started_at)",
        "CREATE INDEX interceptions_thread_root ON interceptions (thread_root_id)",
        # Thread lineage: which interception made the tool call a request answers.
        "CREATE INDEX interception_tool_calls_id ON interception_tool_calls (tool_call_id)",
    ),
    (
        # Migration 7: operator prices, ``aibridgeproxyd prices set`` (aibridgeproxyd.pricing).
        # Rates are decimal text in USD per million tokens, so they come back exactly as set;
        # NULL cache rates mean "the input rate". Read by each reload into the snapshot.
        """
        CREATE TABLE model_prices (
            model TEXT PRIMARY KEY,
            input TEXT NOT NULL,
            output TEXT NOT NULL,
            cache_read TEXT,
            cache_creation TEXT,
            updated_at TEXT NOT NULL
        )
        """,
    ),
    (
        # Migration 8: admin tokens for the HTTP API and the dashboard (section 12; hashes only),
        # and provider keys as objects {id, created_at, key}: the API names a key by its id.
        """
        CREATE TABLE admin_tokens (
            name TEXT PRIMARY KEY,
            token_hash TEXT UNIQUE NOT NULL,
            role TEXT NOT NULL,
            created_at TEXT NOT NULL
        )
        """,
        """
        UPDATE providers SET keys = (
            SELECT json_group_array(json_object(
                'id', lower(hex(randomblob(6))), 'created_at', providers.updated_at,
                'key', entry.value))
            FROM json_each(providers.keys) AS entry
        )
        WHERE json_valid(keys) AND json_type(keys) = 'array' AND json_array_length(keys) > 0
            AND NOT EXISTS (SELECT 1 FROM json_each(providers.keys) WHERE type != 'text')
        """,
    ),
    (
        # Migration 9: the data API's filters and lists (CONTRACT 12). ``model`` and ``client``
        # filter a page, a count or a usage total, and the distinct models and clients fill the
        # dashboard's filter menus: each an index range (or a skip over one), never every row.
        "CREATE INDEX interceptions_model ON interceptions (model, started_at)",
        "CREATE INDEX interceptions_client ON interceptions (client, started_at)",
    ),
    (
        # Migration 10: policies (aibridgeproxyd.policy, docs/policies.md). subject and provider
        # are '*' for "every user" / "every provider"; max_cost_usd is decimal text (exact);
        # models a JSON array of glob patterns, NULL for "any model".
        """
        CREATE TABLE policies (
            subject TEXT NOT NULL,
            provider TEXT NOT NULL,
            max_cost_usd TEXT,
            max_tokens BIGINT,
            period TEXT,
            models TEXT,
            rpm BIGINT,
            tpm BIGINT,
            max_parallel BIGINT,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            PRIMARY KEY (subject, provider)
        )
        """,
        # The shared policy counters (aibridgeproxyd.policy_counters): what every replica
        # counted per user, scope ('*' or a provider name) and period key ('minute:...',
        # 'day:...', 'week:...', 'month:...'), added atomically (add_policy_counts). Rows past
        # expires_at are purged.
        """
        CREATE TABLE policy_counters (
            subject TEXT NOT NULL,
            scope TEXT NOT NULL,
            period TEXT NOT NULL,
            requests BIGINT NOT NULL DEFAULT 0,
            tokens BIGINT NOT NULL DEFAULT 0,
            cost_micros BIGINT NOT NULL DEFAULT 0,
            expires_at TEXT NOT NULL,
            PRIMARY KEY (subject, scope, period)
        )
        """,
        "CREATE INDEX policy_counters_period ON policy_counters (period)",
        "CREATE INDEX policy_counters_expires_at ON policy_counters (expires_at)",
    ),
)

# Bounds on what one read returns: model names and initiators are open-ended.
MAX_USAGE_GROUPS = 1000
MAX_DISTINCT_VALUES = 1000

_PROVIDER_COLUMNS = (
    "name, type, display_name, base_url, hosts, enabled, allow_byok, keys, settings, "
    "created_at, updated_at"
)


class StoreError(Exception):
    """The database cannot be opened, read or written. The message names the file."""


class DatabaseMissing(StoreError):
    """The database file is not there (never created, or deleted under a running daemon).
    Nothing recreates it silently: only ``run`` and the CLI create a database, and say so."""


class StoreUnavailable(StoreError):
    """The database cannot be reached right now (a PostgreSQL server down or restarting, the
    network gone): a later attempt may succeed, so writers keep what they hold and retry."""


class RecordError(StoreError):
    """A write was refused because of its input: an invalid field, a duplicate or a missing
    name. Nothing was written. Messages never contain key values. ``field`` names the record
    field at fault (``name``, ``type``, ``base_url``, ``hosts``, ``keys``, ``settings``, ...),
    or is empty when no single field is."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


class DuplicateRecord(RecordError):
    """An insert named a provider, token or admin token that already exists."""


class MissingRecord(RecordError):
    """An update named a row that does not exist."""


FileIdentity = tuple[int, int]
FileState = Literal["same", "missing", "replaced"]


def file_identity(path: Path) -> FileIdentity | None:
    """``(st_dev, st_ino)`` of the regular file at ``path``, None when there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return st.st_dev, st.st_ino


# Token names identify a user in logs and interception records (the "initiator"): usernames and
# e-mail addresses fit, whitespace and control characters do not.
TOKEN_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}$")


def utc_now() -> str:
    """RFC 3339 UTC with second precision, e.g. ``2026-11-26T17:33:00Z``."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def validate_record(record: ProviderRecord) -> ProviderRecord:
    """Check a provider row before it is written and return it normalized (hosts lower-cased
    and de-duplicated, keys stripped, base_url without a trailing slash, display_name
    defaulting to the name). Raises ``RecordError`` naming the bad value, never a key.

    Type-level problems that an operator may fix later (no keys with BYOK off, a missing Bedrock
    region) are not refused here: they show up as status ``error`` (docs/providers.md#statuses).
    """
    try:
        check_name(record.name)
    except ValueError as exc:
        raise RecordError(str(exc), "name") from None
    adapter = ADAPTERS.get(record.type)
    if adapter is None:
        raise RecordError(
            f"unknown provider type {record.type!r}; valid types: {', '.join(sorted(ADAPTERS))}",
            "type",
        )

    for char in record.display_name:
        # Printed raw by `providers list`: an escape sequence would rewrite the terminal.
        if not char.isprintable():
            raise RecordError(
                f"display name {record.display_name!r} has a control or invisible character "
                f"({char!a}); use printable text",
                "display_name",
            )

    base_url = record.base_url.strip().rstrip("/")
    if base_url:
        try:
            Upstream.parse(base_url)
        except ValueError as exc:
            raise RecordError(str(exc), "base_url") from None
    elif adapter.requires_base_url:
        raise RecordError(
            f"provider type {record.type!r} has no default base_url; set one", "base_url"
        )

    hosts: list[str] = []
    for host in record.hosts:
        try:
            normalized = normalize_host(str(host))
        except ValueError as exc:
            raise RecordError(str(exc), "hosts") from None
        if normalized not in hosts:
            hosts.append(normalized)

    if not all(isinstance(key, str) for key in record.keys):
        raise RecordError(f"provider {record.name!r}: every key must be a string", "keys")
    keys = tuple(key.strip() for key in record.keys)
    if any(not key for key in keys):
        raise RecordError(f"provider {record.name!r}: a key is empty", "keys")
    for position, key in enumerate(keys, start=1):
        # A key travels in an HTTP header: anything but visible ASCII would be mangled or
        # refused there, far from this command. The message gives the position, never the key.
        if not key.isascii() or not key.isprintable() or any(c.isspace() for c in key):
            raise RecordError(
                f"provider {record.name!r}: key #{position} has a character an HTTP header "
                "cannot carry (expected visible ASCII: no spaces, control or non-ASCII characters)",
                "keys",
            )
    if len(keys) > MAX_KEYS:
        raise RecordError(
            f"provider {record.name!r} has {len(keys)} keys; at most {MAX_KEYS} are allowed",
            "keys",
        )
    _check_key_sizes(record.name, keys)
    if len(record.display_name) > MAX_FIELD_TEXT:
        raise RecordError(
            f"provider {record.name!r}: display name longer than {MAX_FIELD_TEXT} characters",
            "display_name",
        )

    if not isinstance(record.settings, Mapping) or not all(
        isinstance(name, str) for name in record.settings
    ):
        raise RecordError(
            f"provider {record.name!r}: settings must be an object with string keys", "settings"
        )
    settings = dict(record.settings)
    problem = settings_problem(settings)
    if problem:
        raise RecordError(f"provider {record.name!r}: {problem}", "settings")
    try:
        json.dumps(settings, allow_nan=False)
    except (TypeError, ValueError):
        raise RecordError(
            f"provider {record.name!r}: settings must be plain JSON values", "settings"
        ) from None

    return replace(
        record,
        display_name=record.display_name.strip() or record.name,
        base_url=base_url,
        hosts=tuple(hosts),
        keys=keys,
        key_info=key_infos(keys, record.key_info),
        settings=settings,
        enabled=bool(record.enabled),
        allow_byok=bool(record.allow_byok),
    )


# Deeper settings serve no adapter (the deepest, Azure's deployments, is 2 levels) and would
# exhaust the recursion of every reader that walks them (masking, JSON encoding).
MAX_SETTINGS_DEPTH = 16


# The most interceptions a session's detail (API and dashboard) carries: its latest ones.
MAX_SESSION_INTERCEPTIONS = 1000

# The longest display name, key or setting text a provider may hold: every provider list (API,
# dashboard, CLI) carries them, so one provider must not make every list megabytes long.
MAX_FIELD_TEXT = 4096


def _check_key_sizes(provider: str, keys: Sequence[str]) -> None:
    """Refuse a key longer than ``MAX_FIELD_TEXT`` or listed twice (by position, never the
    key): a repeated key would get two ids and no more capacity."""
    seen: dict[str, int] = {}
    for position, key in enumerate(keys, start=1):
        if len(key) > MAX_FIELD_TEXT:
            raise RecordError(
                f"provider {provider!r}: key #{position} is longer than {MAX_FIELD_TEXT} "
                "characters",
                "keys",
            )
        if key in seen:
            raise RecordError(
                f"provider {provider!r}: key #{position} repeats key #{seen[key]}", "keys"
            )
        seen[key] = position


def settings_problem(settings: Mapping[str, Any]) -> str | None:
    """What makes settings unstorable beyond JSON itself, or None: nesting deeper than
    ``MAX_SETTINGS_DEPTH``, or text that UTF-8 cannot carry (a lone surrogate, which a JSON
    ``\\ud800`` escape gives). Walked without recursion, so any depth is answered."""
    pending: list[tuple[Any, int]] = [(settings, 1)]
    while pending:
        value, depth = pending.pop()
        if depth > MAX_SETTINGS_DEPTH:
            return f"settings are nested deeper than {MAX_SETTINGS_DEPTH} levels"
        if isinstance(value, Mapping):
            pending.extend((name, depth) for name in value)
            pending.extend((item, depth + 1) for item in value.values())
        elif isinstance(value, list):
            pending.extend((item, depth + 1) for item in value)
        elif isinstance(value, str):
            if not _is_utf8_text(value):
                return "settings hold text that is not valid UTF-8 (a lone surrogate)"
            if len(value) > MAX_FIELD_TEXT:
                return f"settings hold a text longer than {MAX_FIELD_TEXT} characters"
            if any(ord(char) < 32 and char not in "\t\n\r" for char in value):
                return "settings hold a control character (only tab and line breaks are allowed)"
    return None


def _is_utf8_text(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def key_digest(key: str) -> str:
    """A key's SHA-256, hex: matches a key to its ``KeyInfo`` in memory; never stored."""
    return hashlib.sha256(key.encode()).hexdigest()


def key_infos(keys: Sequence[str], known: Iterable[KeyInfo]) -> tuple[KeyInfo, ...]:
    """One ``KeyInfo`` per key, in order: the known info of the same key (by digest) where
    there is one, else a new random id added now. A key listed twice gets two ids."""
    by_digest = {info.digest: info for info in known}
    infos: list[KeyInfo] = []
    for key in keys:
        digest = key_digest(key)
        info = by_digest.pop(digest, None)
        infos.append(info or KeyInfo(id=secrets.token_hex(6), created_at=utc_now(), digest=digest))
    return tuple(infos)


# The API's name for the caller (``/api/v2/ai/policies/me/effective``): no token may have it.
RESERVED_TOKEN_NAMES = frozenset({"me"})


def validate_token_name(name: str) -> None:
    """``RecordError`` (field ``name``) for a name no proxy or admin token may have."""
    if name in RESERVED_TOKEN_NAMES:
        raise RecordError(
            f"invalid token name {name!r}: it is reserved (the API's name for the caller)", "name"
        )
    if not TOKEN_NAME_PATTERN.fullmatch(name):
        raise RecordError(
            f"invalid token name {name!r}: use letters, digits and . _ @ + - "
            "(starting with a letter or digit, at most 128 characters)",
            "name",
        )


class Store:
    """An open database. Use ``await Store.open(path)`` (or ``seeding.prepare_store``), and
    close it, or use it as ``async with``. Calls from several tasks are serialized on one
    connection, so a transaction never sees another task's half-done write."""

    def __init__(
        self,
        connection: aiosqlite.Connection | PgConnection,
        path: Path | DatabaseUrl,
        identity: FileIdentity | None = None,
        keyring: Keyring | None = None,
    ) -> None:
        self._db = connection
        self._url = path if isinstance(path, DatabaseUrl) else DatabaseUrl.sqlite(path)
        # The SQLite file; for PostgreSQL, the redacted URL (for messages only).
        # The SQLite file, and how messages name the database (a PostgreSQL URL without its
        # password).
        self._path = self._url.path or Path()
        self._name = self._url.redacted()
        # Seals provider keys and secret settings (aibridgeproxyd.sealing); by default the key
        # file next to a SQLite database (a PostgreSQL store is always given the configured one).
        self._keyring = keyring or (
            Keyring.beside(self._path) if self._url.path is not None else Keyring()
        )
        self._lock = asyncio.Lock()
        self._fresh = False
        # The schema version this open migrated from; None when it found the latest.
        self.migrated_from: int | None = None
        # The (st_dev, st_ino) of the file this connection opened: see ``file_state``.
        self._identity = identity

    # --- lifecycle ---------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        path: Path | str | DatabaseUrl,
        create: bool = True,
        migrate: bool = True,
        keyring: Keyring | None = None,
    ) -> Store:
        """Open and migrate the database at ``path``, creating it (mode 0600) if needed, or with
        ``create=False`` raising ``DatabaseMissing`` when it is missing. ``keyring`` seals and
        opens secrets (default: ``<directory of path>/encryption.key``); migrating also seals
        any secret still stored in plain text (``_seal_plaintext``).

        ``migrate=False`` (the daemon's long-lived connections) never writes a schema: a file
        that is not at the latest schema version is a ``StoreError``. A file swapped in under a
        running daemon is then never turned into an empty, valid provider table.

        ``path`` may be a ``DatabaseUrl``: a PostgreSQL one connects (``create`` does not apply:
        the database must exist; its schema is created by migrating)."""
        if isinstance(path, DatabaseUrl):
            if path.path is None:
                return await cls._open_postgres(path, migrate, keyring)
            path = path.path
        path = Path(path)
        if create:
            _create_private_file(path)
        before = file_identity(path)
        if before is None:
            raise DatabaseMissing(f"database {path} does not exist")
        try:
            connection = await aiosqlite.connect(path, isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open database {path}: {exc}") from None
        store = cls(connection, path, before, keyring)
        try:
            if not migrate:
                # Checked before anything is written, even the journal mode.
                await store._set_busy_timeout()
                await store._require_latest()
            await store._configure()
            if migrate:
                await store._migrate()
                await store._seal_plaintext()
            # SQLite opened the path between the two stats: the same inode both times means the
            # connection holds that file, not one renamed over it meanwhile.
            if file_identity(path) != before:
                raise StoreError(f"database {path} was replaced while it was being opened")
        except BaseException:
            await connection.close()
            raise
        return store

    @classmethod
    async def _open_postgres(
        cls, url: DatabaseUrl, migrate: bool, keyring: Keyring | None
    ) -> Store:
        try:
            connection = await postgres.connect(url)
        except postgres.ERRORS as exc:
            kind = StoreUnavailable if postgres.is_unavailable(exc) else StoreError
            raise kind(f"cannot open database {url}: {postgres.describe(exc)}") from None
        store = cls(PgConnection(connection), url, None, keyring)
        try:
            if migrate:
                await store._migrate()
                await store._seal_plaintext()
            else:
                await store._require_latest()
        except BaseException:
            await connection.close()
            raise
        return store

    @property
    def name(self) -> str:
        """How messages name the database: the SQLite path, or the URL without its password."""
        return self._name

    @property
    def is_postgres(self) -> bool:
        return isinstance(self._db, PgConnection)

    @property
    def url(self) -> DatabaseUrl:
        return self._url

    def file_state(self) -> FileState:
        """Whether ``path`` still names the file this connection opened: ``"same"``,
        ``"missing"`` (deleted) or ``"replaced"`` (another file renamed over it). Writes on a
        connection whose file is gone land in an unlinked inode and are lost, so long-lived
        connections check this before each use and reopen (one ``stat``, no query). A
        PostgreSQL store has no file: always ``"same"``."""
        if self._url.path is None:
            return "same"
        current = file_identity(self._path)
        if current is None:
            return "missing"
        if self._identity is not None and current != self._identity:
            return "replaced"
        return "same"

    async def close(self) -> None:
        if isinstance(self._db, PgConnection):
            with contextlib.suppress(*postgres.ERRORS):
                await asyncio.wait_for(
                    self._db.connection.close(), postgres.CONNECT_TIMEOUT_SECONDS
                )
            return
        await self._db.close()

    def is_connected(self) -> bool:
        """False once a PostgreSQL connection was lost (the server restarted, the network
        dropped): the owner opens a new store. A SQLite store is always connected."""
        return not isinstance(self._db, PgConnection) or not self._db.connection.is_closed()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def path(self) -> Path:
        return self._path

    @property
    def is_fresh(self) -> bool:
        """True when this ``open`` created the schema: the database was new (or empty)."""
        return self._fresh

    async def _set_busy_timeout(self) -> None:
        try:
            await self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open database {self._name}: {exc}") from None

    async def _configure(self) -> None:
        try:
            # busy_timeout first: switching to WAL itself may have to wait for another process.
            await self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            await self._db.execute("PRAGMA journal_mode = WAL")
            # NORMAL is durable across application crashes in WAL mode, and cheaper than FULL.
            await self._db.execute("PRAGMA synchronous = NORMAL")
            # Deleted and overwritten content is zeroed, so a replaced key leaves no old copy
            # (plaintext before the sealing step, or sealed with a retired key) in free space.
            await self._db.execute("PRAGMA secure_delete = ON")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open database {self._name}: {exc}") from None
        _restrict_companions(self._path)

    async def _require_latest(self) -> None:
        current = await self.schema_version()
        if current != len(MIGRATIONS):
            raise StoreError(
                f"database {self._name} is at schema version {current}, expected {len(MIGRATIONS)}"
            )

    async def _migrate(self) -> None:
        latest = len(MIGRATIONS)
        # Cheap read first, so opening an up-to-date database never takes the write lock.
        current = await self.schema_version()
        if current == latest:
            return
        async with self._transaction(write=True) as db:
            if isinstance(db, PgConnection):
                # Replicas starting together: the first migrates, the others wait here.
                await db.execute("SELECT pg_advisory_xact_lock(?)", (postgres.MIGRATION_LOCK,))
            await db.execute(
                "CREATE TABLE IF NOT EXISTS schema_version ("
                "version BIGINT PRIMARY KEY, applied_at TEXT NOT NULL)"
            )
            # Re-read under the write lock: another process may have migrated meanwhile.
            current = await _fetch_version(db)
            if current > latest:
                raise StoreError(
                    f"database {self._name} has schema version {current}, newer than this "
                    f"aibridgeproxyd supports ({latest}); upgrade aibridgeproxyd"
                )
            for version, statements in _pending_migrations(db, current, latest):
                for statement in statements:
                    await db.execute(statement)
                await db.execute(
                    "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
                    (version, utc_now()),
                )
            self._fresh = current == 0
            self.migrated_from = current if current != latest else None
        if current != latest:
            log.info(
                "database %s migrated from schema version %d to %d", self._name, current, latest
            )

    # --- secrets at rest (aibridgeproxyd.sealing) -----------------------------------------

    async def _seal_plaintext(self) -> None:
        """Seal the provider keys and secret settings still stored in plain text (a database
        written before secrets were encrypted, or a row edited by hand): one write transaction,
        then VACUUM and an emptied log, so neither the file nor its log keeps the plain text.
        Idempotent: a database with nothing to seal is only read."""
        async with self._transaction(write=False) as db:
            rows = await _secret_rows(db)
        if any(_has_plaintext(row) for row in rows):
            count = await self._reseal(rotate=False)
            log.info("encrypted %d secrets stored in plain text in %s", count, self._name)

    async def rotate_keys(self) -> tuple[str, int]:
        """``keys rotate``: seal every provider key and secret setting with the first encryption
        key. Returns ``(first key id, values sealed again)``; values already sealed with it are
        left as they are. A value sealed with a key not configured (``StoreError`` naming the
        key id) or failing authentication (naming provider and field) changes nothing."""
        count = await self._reseal(rotate=True)
        count += await self._reseal_shared_ca()
        return _sealing(lambda keyring: keyring.first_key_id(), self._keyring), count

    def sealing_key_id(self) -> str:
        """The id of the key that seals new values (``StoreError`` when it cannot be had)."""
        return _sealing(lambda keyring: keyring.first_key_id(), self._keyring)

    # --- the replicas' shared MITM CA (CONTRACT 14) ---------------------------------------

    async def shared_ca(self) -> tuple[str, str] | None:
        """``(certificate PEM, private key PEM)`` of the CA the replicas share, or None before
        one was stored. ``StoreError`` when its key cannot be opened (naming the key id)."""
        async with self._transaction(write=False) as db:
            row = await (await db.execute(_SELECT_META, (SHARED_CA_META,))).fetchone()
        return None if row is None else self._opened_ca(row[0])

    async def shared_ca_certificate(self) -> str | None:
        """The shared CA's certificate PEM alone (its key stays sealed), or None."""
        async with self._transaction(write=False) as db:
            row = await (await db.execute(_SELECT_META, (SHARED_CA_META,))).fetchone()
        try:
            return None if row is None else str(json.loads(row[0])["cert"])
        except (TypeError, ValueError, KeyError):
            raise StoreError(f"database {self._name}: the stored MITM CA is malformed") from None

    async def create_shared_ca(self, cert_pem: str, key_pem: str) -> tuple[str, str]:
        """Store this CA unless one is stored already, and return the stored one: replicas
        starting together each offer theirs, and the first write wins (the write lock). The
        key is sealed like provider keys."""
        sealed = _sealing(lambda keys: keys.seal(key_pem, SHARED_CA_OWNER, "key"), self._keyring)
        value = json.dumps({"cert": cert_pem, "key": sealed})
        async with self._transaction(write=True) as db:
            await db.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING",
                (SHARED_CA_META, value),
            )
            row = await (await db.execute(_SELECT_META, (SHARED_CA_META,))).fetchone()
        assert row is not None
        return self._opened_ca(row[0])

    def _opened_ca(self, value: Any) -> tuple[str, str]:
        try:
            stored = json.loads(value)
            cert, sealed = str(stored["cert"]), str(stored["key"])
        except (TypeError, ValueError, KeyError):
            raise StoreError(f"database {self._name}: the stored MITM CA is malformed") from None
        key = _sealing(lambda keys: keys.unseal(sealed, SHARED_CA_OWNER, "key"), self._keyring)
        return cert, key

    async def _reseal_shared_ca(self) -> int:
        """``keys rotate`` for the shared CA's key: 1 when it was sealed again, else 0."""
        async with self._transaction(write=True) as db:
            row = await (await db.execute(_SELECT_META, (SHARED_CA_META,))).fetchone()
            if row is None:
                return 0
            cert, key = self._opened_ca(row[0])
            first = _sealing(lambda keys: keys.first_key_id(), self._keyring)
            if str(json.loads(row[0])["key"]).startswith(f"{SEALED_PREFIX}{first}:"):
                return 0
            sealed = _sealing(lambda keys: keys.seal(key, SHARED_CA_OWNER, "key"), self._keyring)
            value = json.dumps({"cert": cert, "key": sealed})
            await db.execute(_UPSERT_META, (SHARED_CA_META, value))
        return 1

    async def _reseal(self, rotate: bool) -> int:
        async with self._transaction(write=True) as db:
            rows = await _secret_rows(db)
            updates, count = _sealing(
                lambda keyring: _resealed(rows, keyring, rotate), self._keyring
            )
            await db.executemany(
                "UPDATE providers SET keys = ?, settings = ? WHERE name = ?", updates
            )
            if updates:
                await self._bump_generation(db)
        await self._scrub()
        return count

    async def _scrub(self) -> None:
        """VACUUM (free pages written before ``secure_delete`` may hold old plaintext), then
        empty the log. Best effort: another process holding the database only delays it.
        (PostgreSQL: the old row versions go at its next autovacuum of ``providers``.)"""
        if self.is_postgres:
            return
        async with self._lock:
            try:
                await self._db.execute("VACUUM")
            except sqlite3.Error as exc:
                log.warning("VACUUM of %s after encrypting secrets skipped: %s", self._name, exc)
        await self.checkpoint()

    # --- plumbing ------------------------------------------------------------------------

    @asynccontextmanager
    async def _transaction(self, write: bool) -> AsyncIterator[Any]:
        """One transaction under the connection lock. Writers take the database write lock up
        front (BEGIN IMMEDIATE): upgrading a read lock later can fail with SQLITE_BUSY at once,
        without honouring busy_timeout. (PostgreSQL: ``_pg_transaction``.)"""
        if isinstance(self._db, PgConnection):
            async with self._pg_transaction(self._db, write) as pg:
                yield pg
            return
        async with self._lock:
            try:
                await self._db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    yield self._db
                except BaseException:
                    if self._db.in_transaction:
                        await self._db.execute("ROLLBACK")
                    raise
                await self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StoreError(f"database {self._name}: {exc}") from None

    async def _statement(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """The rows of one statement run as its own transaction (none for a write), under the
        connection lock. On SQLite it runs in autocommit mode, in one trip to the connection's
        thread where ``_transaction`` takes three or four: a single statement is atomic, and
        a write statement takes the write lock as it starts, waiting for it within
        ``busy_timeout`` as BEGIN IMMEDIATE does. The idle daemon's change probe and presence
        heartbeat use it. PostgreSQL: a transaction of its own, without the writers' lock.
        Raises ``StoreError``."""
        if isinstance(self._db, PgConnection):
            async with self._transaction(write=False) as pg:
                cursor = await pg.execute(sql, params)
                return list(await cursor.fetchall())
        async with self._lock:
            try:
                return list(await self._db.execute_fetchall(sql, params))
            except sqlite3.Error as exc:
                raise StoreError(f"database {self._name}: {exc}") from None

    @asynccontextmanager
    async def _pg_transaction(self, db: PgConnection, write: bool) -> AsyncIterator[PgConnection]:
        """A PostgreSQL transaction under the connection lock. A writer first takes the
        write advisory lock, so writers of every replica run one at a time, as on SQLite (a
        check-then-insert such as seeding stays atomic). Errors of the server or the
        connection are ``StoreError``; errors raised by the body pass unchanged."""
        async with self._lock:
            try:
                if db.connection.is_closed():  # lost earlier (a restart): connect again
                    db.connection = await postgres.connect(self._url)
                elif db.connection.is_in_transaction():
                    # Left inside a transaction by a failure we could not roll back: never
                    # build on it (every later statement would fail); start afresh.
                    db.connection.terminate()
                    db.connection = await postgres.connect(self._url)
                transaction = db.connection.transaction()
                await transaction.start()
            except postgres.ERRORS as exc:
                raise self._pg_error(exc) from None
            try:
                if write:
                    await db.execute("SELECT pg_advisory_xact_lock(?)", (postgres.WRITE_LOCK,))
                yield db
            except BaseException as exc:
                with contextlib.suppress(*postgres.ERRORS):
                    await transaction.rollback()
                if isinstance(exc, postgres.ERRORS):
                    raise self._pg_error(exc) from None
                raise
            try:
                await transaction.commit()
            except postgres.ERRORS as exc:
                raise self._pg_error(exc) from None

    def _pg_error(self, exc: BaseException) -> StoreError:
        """A PostgreSQL failure as a ``StoreError`` (``StoreUnavailable`` when the server
        cannot be reached: the caller may retry later, on a new connection, since this one may
        be in any state)."""
        if postgres.is_unavailable(exc) and isinstance(self._db, PgConnection):
            self._db.connection.terminate()  # the next call connects again
        kind = StoreUnavailable if postgres.is_unavailable(exc) else StoreError
        return kind(f"database {self._name}: {postgres.describe(exc)}")

    async def _bump_generation(self, db: Any) -> None:
        """A management write: the generation moves (and on PostgreSQL every replica is told,
        by a payload-free notification delivered at commit)."""
        await db.execute(
            "UPDATE meta SET value = CAST(CAST(value AS BIGINT) + 1 AS TEXT) "
            "WHERE key = 'generation'"
        )
        if isinstance(db, PgConnection):
            await db.execute("SELECT pg_notify(?, '')", (postgres.NOTIFY_CHANNEL,))

    # --- reads -------------------------------------------------------------------------

    async def schema_version(self) -> int:
        async with self._transaction(write=False) as db:
            return await _fetch_version(db)

    async def generation(self) -> int:
        """A counter bumped by every management write: poll it to notice changes cheaply."""
        rows = await self._statement("SELECT value FROM meta WHERE key = 'generation'")
        return int(rows[0][0]) if rows else 0

    async def routing_state(self, cache: RecordCache) -> RoutingState:
        """What one reload reads (``read_routing_state``), on this store's connection: the
        PostgreSQL reload's path. Rows become records in a worker thread."""
        async with self._transaction(write=False) as db:
            await self._require_version(db)
            providers = await (await db.execute(_ROUTING_PROVIDERS)).fetchall()
            tokens = await (await db.execute(_ROUTING_TOKENS)).fetchall()
            prices = await (await db.execute(_ROUTING_PRICES)).fetchall()
            policies = await (await db.execute(_ROUTING_POLICIES)).fetchall()
        return await asyncio.to_thread(
            _routing_state,
            providers,
            tokens,
            prices,
            policies,
            cache,
            cache.keyring or self._keyring,
        )

    async def _require_version(self, db: Connection) -> None:
        version = await _fetch_version(db)
        if version != len(MIGRATIONS):
            raise StoreError(
                f"database {self._name} is at schema version {version}, expected {len(MIGRATIONS)}"
            )

    async def token_names(self) -> dict[str, str]:
        """``{token hash: token name}`` of every stored proxy token (``read_token_names``)."""
        async with self._transaction(write=False) as db:
            rows = await (await db.execute("SELECT name, token_hash FROM tokens")).fetchall()
        return {str(token_hash): str(name) for name, token_hash in rows}

    async def write_presence(
        self, instance: str, generation: int, heartbeat: float, key_ids: Sequence[str] = ()
    ) -> None:
        """Record that daemon ``instance`` (a process-unique id) serves a snapshot reflecting
        store generation ``generation``, as of ``heartbeat`` (Unix seconds), holding encryption
        keys ``key_ids``. Not a management write: the generation does not move."""
        # Not under the writers' lock of PostgreSQL: the row is the daemon's own.
        await self._statement(_UPSERT_META, _presence_row(instance, generation, heartbeat, key_ids))

    async def remove_presence(self, instance: str) -> None:
        """Forget daemon ``instance`` (on a clean stop)."""
        await self._statement(
            "DELETE FROM meta WHERE key = ?", (DAEMON_PRESENCE_PREFIX + instance,)
        )

    async def list_providers(self) -> list[ProviderRecord]:
        async with self._transaction(write=False) as db:
            return await _fetch_providers(db, self._keyring)

    async def get_provider(self, name: str) -> ProviderRecord | None:
        async with self._transaction(write=False) as db:
            cursor = await db.execute(
                f"SELECT {_PROVIDER_COLUMNS} FROM providers WHERE name = ?", (name,)
            )
            row = await cursor.fetchone()
        return _provider_from_row(row, self._keyring) if row else None

    async def was_deleted(self, name: str) -> bool:
        async with self._transaction(write=False) as db:
            cursor = await db.execute("SELECT 1 FROM deleted_providers WHERE name = ?", (name,))
            return await cursor.fetchone() is not None

    async def list_tokens(self) -> list[TokenRecord]:
        async with self._transaction(write=False) as db:
            return await _fetch_tokens(db)

    async def list_token_uses(self) -> list[tuple[str, str, str | None]]:
        """``(name, created_at, last_used_at)`` of every proxy token, by name. ``last_used_at``
        is the ``started_at`` of the newest interception record it initiated (None if none):
        derived from the records, so the proxy's request path writes nothing for it. One
        index lookup per token (``interceptions_initiator``)."""
        async with self._transaction(write=False) as db:
            cursor = await db.execute(
                "SELECT name, created_at, (SELECT MAX(started_at) FROM interceptions "
                "WHERE initiator = tokens.name) FROM tokens ORDER BY name"
            )
            return [(str(row[0]), str(row[1]), row[2]) for row in await cursor.fetchall()]

    # --- provider writes -----------------------------------------------------------------

    async def insert_provider(self, record: ProviderRecord) -> ProviderRecord:
        """Insert a new provider and return it as stored. A duplicate name is a ``RecordError``."""
        record = validate_record(record)
        now = utc_now()
        stored = replace(record, created_at=now, updated_at=now)
        async with self._transaction(write=True) as db:
            try:
                await db.execute(
                    f"INSERT INTO providers ({_PROVIDER_COLUMNS}) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    _row_from_record(stored, self._keyring),
                )
            except _INTEGRITY_ERRORS:
                raise DuplicateRecord(f"provider {record.name!r} already exists", "name") from None
            await self._bump_generation(db)
        return stored

    async def insert_provider_if_new(self, record: ProviderRecord) -> bool:
        """Seeding: insert only if no row of that name exists and none was ever deleted.
        The check and the insert share one write transaction, so two starting processes
        cannot both insert."""
        record = validate_record(record)
        now = utc_now()
        async with self._transaction(write=True) as db:
            cursor = await db.execute(
                "SELECT 1 FROM providers WHERE name = ? "
                "UNION ALL SELECT 1 FROM deleted_providers WHERE name = ?",
                (record.name, record.name),
            )
            if await cursor.fetchone() is not None:
                return False
            await db.execute(
                f"INSERT INTO providers ({_PROVIDER_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                _row_from_record(replace(record, created_at=now, updated_at=now), self._keyring),
            )
            await self._bump_generation(db)
        return True

    async def update_provider(self, record: ProviderRecord) -> ProviderRecord:
        """Replace every field of an existing provider except ``created_at``; return it as
        stored. A missing name is a ``RecordError``."""
        record = validate_record(record)
        now = utc_now()
        async with self._transaction(write=True) as db:
            cursor = await db.execute(
                "SELECT created_at FROM providers WHERE name = ?", (record.name,)
            )
            row = await cursor.fetchone()
            if row is None:
                raise MissingRecord(f"provider {record.name!r} does not exist", "name")
            stored = replace(record, created_at=row[0], updated_at=now)
            await db.execute(
                "UPDATE providers SET type = ?, display_name = ?, base_url = ?, hosts = ?, "
                "enabled = ?, allow_byok = ?, keys = ?, settings = ?, updated_at = ? "
                "WHERE name = ?",
                (*_row_from_record(stored, self._keyring)[1:9], now, record.name),
            )
            await self._bump_generation(db)
        return stored

    async def delete_provider(self, name: str) -> bool:
        """Delete a provider and leave a tombstone. False (and no write) if it did not exist."""
        async with self._transaction(write=True) as db:
            cursor = await db.execute("DELETE FROM providers WHERE name = ?", (name,))
            if cursor.rowcount == 0:
                return False
            await db.execute(
                "INSERT INTO deleted_providers (name, deleted_at) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET deleted_at = excluded.deleted_at",
                (name, utc_now()),
            )
            await self._bump_generation(db)
        return True

    # --- token writes --------------------------------------------------------------------

    async def insert_token(self, name: str, token_hash: str) -> TokenRecord:
        """Store a token's hash under ``name``. A duplicate name is a ``RecordError``."""
        validate_token_name(name)
        stored = TokenRecord(name=name, token_hash=token_hash, created_at=utc_now())
        async with self._transaction(write=True) as db:
            try:
                await db.execute(
                    "INSERT INTO tokens (name, token_hash, created_at) VALUES (?, ?, ?)",
                    (stored.name, stored.token_hash, stored.created_at),
                )
            except _INTEGRITY_ERRORS as exc:
                if "tokens.name" in str(exc) or "tokens_pkey" in str(exc):
                    raise DuplicateRecord(f"token {name!r} already exists", "name") from None
                raise RecordError(f"token {name!r}: this token hash is already stored") from None
            await self._bump_generation(db)
        return stored

    async def delete_token(self, name: str) -> bool:
        """Revoke a token. False (and no write) if no token has that name."""
        async with self._transaction(write=True) as db:
            cursor = await db.execute("DELETE FROM tokens WHERE name = ?", (name,))
            if cursor.rowcount == 0:
                return False
            await self._bump_generation(db)
        return True

    # --- admin tokens (the HTTP API's; not part of routing, so no generation bump) -------

    async def insert_admin_token(self, name: str, token_hash: str, role: str) -> AdminTokenRecord:
        """Store an admin token's hash under ``name`` with ``role`` (``admin`` or ``auditor``).
        A bad name or role, or a duplicate name, is a ``RecordError``."""
        validate_token_name(name)
        if role not in ADMIN_ROLES:
            raise RecordError(f"invalid role {role!r}: use one of {', '.join(ADMIN_ROLES)}", "role")
        stored = AdminTokenRecord(name=name, token_hash=token_hash, role=role, created_at=utc_now())
        async with self._transaction(write=True) as db:
            try:
                await db.execute(
                    "INSERT INTO admin_tokens (name, token_hash, role, created_at) "
                    "VALUES (?, ?, ?, ?)",
                    (stored.name, stored.token_hash, stored.role, stored.created_at),
                )
            except _INTEGRITY_ERRORS:
                raise DuplicateRecord(f"admin token {name!r} already exists", "name") from None
        return stored

    async def list_admin_tokens(self) -> list[AdminTokenRecord]:
        """Every admin token, by name (hashes included: callers never print them)."""
        async with self._transaction(write=False) as db:
            cursor = await db.execute(
                "SELECT name, token_hash, role, created_at FROM admin_tokens ORDER BY name"
            )
            return [AdminTokenRecord(*row) for row in await cursor.fetchall()]

    async def delete_admin_token(self, name: str) -> bool:
        """Revoke an admin token. False (and no write) if no admin token has that name."""
        async with self._transaction(write=True) as db:
            cursor = await db.execute("DELETE FROM admin_tokens WHERE name = ?", (name,))
            return bool(cursor.rowcount)

    async def token_owner(self, token_hash: str) -> tuple[str, str] | None:
        """Who a token is, by its hash: ``(role, name)`` with role ``admin`` or ``auditor`` for
        an admin token and ``proxy`` for a proxy token; None for an unknown token."""
        async with self._transaction(write=False) as db:
            cursor = await db.execute(
                "SELECT role, name FROM admin_tokens WHERE token_hash = ? "
                "UNION ALL SELECT 'proxy', name FROM tokens WHERE token_hash = ? LIMIT 1",
                (token_hash, token_hash),
            )
            row = await cursor.fetchone()
        return None if row is None else (str(row[0]), str(row[1]))

    # --- reads for the reload ------------------------------------------------------------------

    # --- interception records -------------------------------------------------------------

    async def set_model_price(self, model: str, prices: ModelPrices) -> None:
        """Store (or replace) the operator's price of ``model``: a management write, so a
        running daemon reloads it within a second. ``RecordError`` for a bad model name."""
        validate_price_model(model)
        rates = override_rates(prices)
        async with self._transaction(write=True) as db:
            await db.execute(
                "INSERT INTO model_prices "
                "(model, input, output, cache_read, cache_creation, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (model) DO UPDATE SET "
                "input = excluded.input, output = excluded.output, "
                "cache_read = excluded.cache_read, cache_creation = excluded.cache_creation, "
                "updated_at = excluded.updated_at",
                (model, *(rates[name] for name in _PRICE_COLUMNS), utc_now()),
            )
            await self._bump_generation(db)

    async def delete_model_price(self, model: str) -> bool:
        """Remove the stored price of ``model``; False when there was none."""
        async with self._transaction(write=True) as db:
            cursor = await db.execute("DELETE FROM model_prices WHERE model = ?", (model,))
            if cursor.rowcount == 0:
                return False
            await self._bump_generation(db)
        return True

    async def list_model_prices(self) -> list[tuple[str, ModelPrices | None, str]]:
        """``(model, rates, updated_at)`` of every stored price, by model; rates None for a row
        changed by hand that cannot be read."""
        async with self._transaction(write=False) as db:
            cursor = await db.execute(
                f"SELECT {_PRICE_SELECT}, updated_at FROM model_prices ORDER BY model"
            )
            rows = await cursor.fetchall()
        return [(row[0], model_prices_from_row(row), row[-1]) for row in rows]

    # --- policies (aibridgeproxyd.policy; docs/policies.md) -----------------------------------

    async def list_policies(self) -> list[Policy]:
        """Every policy, the defaults first (subject ``*``), then by user and provider."""
        async with self._transaction(write=False) as db:
            return await _fetch_policies(db)

    async def get_policy(self, user: str | None, provider: str | None = None) -> Policy | None:
        """The policy of ``user`` (None: the default) at ``provider`` (None: every provider)."""
        async with self._transaction(write=False) as db:
            cursor = await db.execute(
                f"SELECT {_POLICY_COLUMNS} FROM policies WHERE subject = ? AND provider = ?",
                (user or EVERYONE, provider or EVERYONE),
            )
            row = await cursor.fetchone()
        return None if row is None else _policy_from_row(row)

    async def set_policy(self, policy: Policy) -> Policy:
        """Create or replace the policy of ``(policy.user, policy.provider)`` whole and return it
        as stored (``created_at`` kept on a replace). A management write: running daemons
        apply it within a second. ``RecordError`` (with ``field``) for an invalid policy."""
        try:
            policy = validate_policy(policy)
        except PolicyError as exc:
            raise RecordError(str(exc), exc.field) from None
        now = utc_now()
        async with self._transaction(write=True) as db:
            await db.execute(
                f"INSERT INTO policies ({_POLICY_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (subject, provider) DO UPDATE SET max_cost_usd = "
                "excluded.max_cost_usd, max_tokens = excluded.max_tokens, period = "
                "excluded.period, models = excluded.models, rpm = excluded.rpm, tpm = "
                "excluded.tpm, max_parallel = excluded.max_parallel, updated_at = "
                "excluded.updated_at",
                _policy_row(policy, now),
            )
            if policy.has_budget:
                await _count_recorded_spend(db, policy)
            await self._bump_generation(db)
        stored = await self.get_policy(policy.user, policy.provider)
        assert stored is not None, "just written"
        return stored

    async def delete_policy(self, user: str | None, provider: str | None = None) -> bool:
        """Remove the policy of ``user`` (None: the default) at ``provider``; False if none."""
        async with self._transaction(write=True) as db:
            cursor = await db.execute(
                "DELETE FROM policies WHERE subject = ? AND provider = ?",
                (user or EVERYONE, provider or EVERYONE),
            )
            if cursor.rowcount == 0:
                return False
            await self._bump_generation(db)
        return True

    async def seed_policy(self, policy: Policy) -> bool:
        """Store ``policy`` from the configuration's one-time seed: only if no policy of its user
        and provider exists and that seed entry was never applied before (a ``meta`` marker),
        so a policy an operator deleted or changed is never brought back. True if stored."""
        policy = validate_policy(policy)
        marker = "policy_seeded:{}/{}".format(*policy.key)
        now = utc_now()
        async with self._transaction(write=True) as db:
            cursor = await db.execute("SELECT 1 FROM meta WHERE key = ?", (marker,))
            if await cursor.fetchone() is not None:
                return False
            await db.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (marker, now))
            cursor = await db.execute(
                f"INSERT INTO policies ({_POLICY_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (subject, provider) DO NOTHING",
                _policy_row(policy, now),
            )
            if cursor.rowcount == 0:
                return False
            await self._bump_generation(db)
        return True

    async def add_policy_counts(self, deltas: Sequence[CounterDelta]) -> list[CounterRow]:
        """Add each delta to its shared counter atomically, in one transaction, and return the
        totals after the additions (every replica's), in order. Not a management write: no
        generation bump."""
        totals = []
        async with self._transaction(write=True) as db:
            for delta in deltas:
                cursor = await db.execute(
                    "INSERT INTO policy_counters (subject, scope, period, requests, tokens, "
                    "cost_micros, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (subject, scope, period) DO UPDATE SET "
                    f"requests = {_capped_sum('requests')}, "
                    f"tokens = {_capped_sum('tokens')}, "
                    f"cost_micros = {_capped_sum('cost_micros')} "
                    "RETURNING subject, scope, period, requests, tokens, cost_micros",
                    _capped_delta(delta),
                )
                row = await cursor.fetchone()
                assert row is not None, "an upsert with RETURNING returns its row"
                totals.append(CounterRow(*row))
        return totals

    async def read_policy_counters(self, periods: Sequence[str]) -> list[CounterRow]:
        """The shared counters of the given period keys (``policy.period_key``), every user and
        scope: what the replicas counted together. At most ``MAX_COUNTER_ROWS``."""
        if not periods:
            return []
        marks = ", ".join("?" for _ in periods)
        async with self._transaction(write=False) as db:
            cursor = await db.execute(
                "SELECT subject, scope, period, requests, tokens, cost_micros "
                f"FROM policy_counters WHERE period IN ({marks}) LIMIT {MAX_COUNTER_ROWS}",
                tuple(periods),
            )
            return [CounterRow(*row) for row in await cursor.fetchall()]

    async def purge_policy_counters(self, now: str) -> int:
        """Delete the counters whose period ended before ``now`` (RFC 3339 UTC text)."""
        async with self._transaction(write=True) as db:
            cursor = await db.execute("DELETE FROM policy_counters WHERE expires_at < ?", (now,))
            return cursor.rowcount

    async def insert_interceptions(self, records: Iterable[InterceptionRecord]) -> int:
        """Insert a batch in one transaction, in order, each record with its prompt, tool calls
        and thoughts. Not a management write: no generation bump.

        Thread lineage and the session are resolved here, when the record is written and off
        the request path, whatever the record carries (docs/monitoring.md#sessions-and-threads):
        ``thread_parent_id`` is the interception of the same initiator that recorded a tool call
        whose id is in the record's ``tool_result_ids`` (the most recently written one if several),
        ``thread_root_id`` that interception's root, else the record's own ``request_id``;
        ``session_id`` is ``client_session_id`` (``<id>~<initiator>`` when another initiator
        used that id first: a session belongs to one user), else ``thread_root_id``. A record
        sees every record written before it: in earlier batches, and earlier in its own batch.
        A value SQLite cannot store (an integer past 64 bits, a lone surrogate) is stored as
        NULL or replaced, never failing the batch; any other value it refuses raises
        ``RecordError`` (the writer then isolates the record)."""
        batch = [_storable_record(record) for record in records]
        if not batch:
            return 0
        async with self._transaction(write=True) as db:
            try:
                # Idempotent by request id: a batch retried after its commit's answer was lost
                # (the connection dropped during COMMIT) is not written twice.
                stored = await _stored_request_ids(db, batch)
                batch = [record for record in batch if record.request_id not in stored]
                if not batch:
                    return 0
                recorded = await _recorded_tool_calls(db, batch)
                owners = await _session_owners(db, batch)
                rows = _interception_rows(batch, recorded, owners)
                # Batched: one lookup and one bulk insert per table, whatever the batch size
                # (PostgreSQL: COPY; SQLite: executemany of one prepared statement).
                tables: list[tuple[str, Sequence[str], Sequence[Sequence[Any]]]] = [
                    ("interceptions", INTERCEPTION_FIELDS, rows),
                    *_child_rows(batch),
                ]
                for table, columns, table_rows in tables:
                    if table_rows:
                        await _insert_rows(db, table, columns, table_rows)
            except _DATA_ERRORS as exc:  # a value of a record, not the database
                raise RecordError(f"an interception record cannot be stored: {exc}") from None
        return len(batch)

    async def checkpoint(self) -> None:
        """Move the write-ahead log into the database file and truncate it (best effort: a
        busy database is left as it is). Nothing to do on PostgreSQL.

        SQLite finds a database's log by path (``<db>-wal``). If the database file is deleted
        or replaced while a connection holds it, that connection's log stays behind and the
        next file at that path adopts its pages. Kept empty, the log cannot mix one
        database's rows into another's."""
        if isinstance(self._db, PgConnection):
            return
        restore = f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}"
        async with self._lock:
            try:
                # Never wait for a reader or writer that holds the log: try again next time (a
                # busy checkpoint reports it in its row, not as an error). One script, so one
                # trip to the connection's thread: the idle daemon's heartbeat runs this.
                await self._db.executescript(
                    f"PRAGMA busy_timeout = 0; PRAGMA wal_checkpoint(TRUNCATE); {restore};"
                )
            except sqlite3.Error as exc:
                log.debug("checkpoint of %s skipped: %s", self._name, exc)
                with contextlib.suppress(sqlite3.Error):
                    await self._db.execute(restore)  # the script stopped before it

    async def list_interceptions(self, query: InterceptionFilter) -> list[dict[str, Any]]:
        """Newest first, as plain dicts with the contract's field names: the record's fields,
        then ``prompts`` (a list of text), ``tool_calls`` (a list of ``{tool_call_id, tool,
        input}``) and ``thoughts`` (a list of text), in the order they were recorded. The
        children of the whole page come in one query per child table."""
        where, params = _interception_where(query)
        columns = "id, " + ", ".join(INTERCEPTION_FIELDS)
        sql = (
            f"SELECT {columns} FROM interceptions {where} ORDER BY started_at DESC, id DESC LIMIT ?"
        )
        async with self._transaction(write=False) as db:
            cursor = await db.execute(sql, (*params, query.limit))
            rows = await cursor.fetchall()
            children = await _fetch_children(db, [row[1] for row in rows])
        names = ("id", *INTERCEPTION_FIELDS)
        result = []
        for row in rows:
            item = dict(zip(names, row, strict=True))
            # The record's public id is its request id (a UUID, the same value as
            # X-AIBridge-Request-Id: docs/monitoring.md#interception-records); the row number
            # stays internal.
            item["id"] = item["request_id"]
            item["streamed"] = bool(item["streamed"])
            item.update(children.of(item["id"]))
            result.append(item)
        return result

    async def purge_interceptions(self, started_before: str) -> int:
        """Delete every interception started before ``started_before`` (stored timestamp text)
        together with its prompts, tool calls and thoughts, in one transaction: a reader never
        sees an interception without its children, nor children left behind. Returns the number
        of interceptions deleted."""
        async with self._transaction(write=True) as db:
            for table in CHILD_TABLES:
                await db.execute(
                    f"DELETE FROM {table} WHERE interception_id IN "
                    "(SELECT request_id FROM interceptions WHERE started_at < ?)",
                    (started_before,),
                )
            cursor = await db.execute(
                "DELETE FROM interceptions WHERE started_at < ?", (started_before,)
            )
            return cursor.rowcount

    # --- sessions (CONTRACT 12; the CLI and the data API call these) -------------------------

    async def list_sessions(
        self, query: InterceptionFilter, limit: int = 100, after_session_id: str | None = None
    ) -> dict[str, Any]:
        """``{count, sessions}``: the sessions with at least one interception matching
        ``query`` (its ``limit`` is not used), most recently active first, at most ``limit``,
        continuing after session ``after_session_id``; ``count`` is every matching session.
        Each summarises the whole session (``sessions.session_summary``). An unknown
        ``after_session_id`` is a ``RecordError``.

        Sessions are ordered by their last request's start (``last_active_at``), read from the
        ``(session_id, started_at)`` index alone; only the page's sessions are summarised."""
        where, params = _interception_where(query)
        scope = f"WHERE session_id IN (SELECT session_id FROM interceptions {where})"
        scope = scope if where else ""
        async with self._transaction(write=False) as db:
            cursor = await db.execute(
                f"SELECT COUNT(DISTINCT session_id) FROM interceptions {scope}", params
            )
            count = int((await cursor.fetchone() or (0,))[0])
            having, cursor_params = await _after_session(db, after_session_id, where, params)
            cursor = await db.execute(
                f"SELECT session_id FROM interceptions {scope} GROUP BY session_id {having} "
                "ORDER BY MAX(started_at) DESC, session_id DESC LIMIT ?",
                (*params, *cursor_params, limit),
            )
            page = [row[0] for row in await cursor.fetchall()]
            summaries = await _session_summaries(db, page)
        return {"count": count, "sessions": [summaries[session] for session in page]}

    async def get_session(self, session_id: str) -> dict[str, Any] | None:
        """The session's summary plus its ``threads`` (``sessions.session_threads``), or None
        when no interception has that ``session_id``. The threads hold the session's latest
        ``MAX_SESSION_INTERCEPTIONS`` interceptions (the summary counts them all; the
        interceptions API pages through every one with ``q=session_id:<id>``), so one long
        agent session cannot make an answer of unbounded size."""
        async with self._transaction(write=False) as db:
            summaries = await _session_summaries(db, [session_id])
            if session_id not in summaries:
                return None
            cursor = await db.execute(
                f"SELECT {_SESSION_INTERCEPTION_COLUMNS} FROM interceptions "
                "WHERE session_id = ? ORDER BY started_at DESC, id DESC LIMIT ?",
                (session_id, MAX_SESSION_INTERCEPTIONS),
            )
            rows = [SessionInterception(*row) for row in reversed(list(await cursor.fetchall()))]
            children = await _fetch_children(db, [row.id for row in rows])
        # A long session is thousands of interceptions: threads built off the event loop.
        threads = await asyncio.to_thread(session_threads, rows, children)
        return {**summaries[session_id], "threads": threads}

    # --- the data API's reads (CONTRACT 12; the API and the dashboard call these) ---------------

    async def page_interceptions(
        self, query: InterceptionFilter, after_id: str | None = None
    ) -> dict[str, Any]:
        """``{count, results}``: at most ``query.limit`` records matching ``query``, newest
        first (``started_at``, then the order written), continuing after the record whose
        ``id`` is ``after_id``; ``count`` is every matching record. Each result has the
        fields of CONTRACT 10.1 (``RECORD_FIELDS``) then ``prompts``, ``tool_calls`` and
        ``thoughts`` as ``list_interceptions`` gives them. ``after_id`` must name a record
        that matches ``query`` (one of an earlier page), else ``RecordError``.

        Keyset pagination on ``(started_at, row)``: a page is an index range, as fast deep
        in the list as at its start."""
        where, params = _interception_where(query)
        columns = ", ".join(_RECORD_COLUMNS)
        async with self._transaction(write=False) as db:
            count = await _count_interceptions(db, where, params)
            after, after_params = await _after_interception(db, where, params, after_id)
            cursor = await db.execute(
                f"SELECT {columns} FROM interceptions {_and_where(where, after)} "
                "ORDER BY started_at DESC, id DESC LIMIT ?",
                (*params, *after_params, query.limit),
            )
            rows = await cursor.fetchall()
            children = await _fetch_children(db, [row[0] for row in rows])
        return {"count": count, "results": await asyncio.to_thread(_records, rows, children)}

    async def list_clients(self, query: InterceptionFilter) -> list[str]:
        """The distinct ``client`` values of the records matching ``query``, sorted; at most
        ``MAX_DISTINCT_VALUES``."""
        return await self._distinct("client", query)

    async def list_models(self, query: InterceptionFilter) -> list[str]:
        """The distinct non-null ``model`` values of the records matching ``query``, sorted; at
        most ``MAX_DISTINCT_VALUES`` (a model name is whatever a client sent)."""
        return await self._distinct("model", query)

    async def _distinct(self, column: str, query: InterceptionFilter) -> list[str]:
        where, params = _interception_where(query)
        async with self._transaction(write=False) as db:
            cursor = await db.execute(
                f"SELECT DISTINCT {column} FROM interceptions "
                f"{_and_where(where, f'{column} IS NOT NULL')} ORDER BY {column} LIMIT ?",
                (*params, MAX_DISTINCT_VALUES),
            )
            return [str(row[0]) for row in await cursor.fetchall()]

    async def usage(
        self, group_by: str, query: InterceptionFilter, limit: int = MAX_USAGE_GROUPS
    ) -> list[dict[str, Any]]:
        """Usage of the records matching ``query`` grouped by ``group_by`` (one of
        ``USAGE_GROUPS``: ``day`` (UTC, ``YYYY-MM-DD``), ``provider`` (type),
        ``provider_name``, ``model``, ``initiator``, ``client``): ``[{key, requests,
        input_tokens, output_tokens, cache_read_input_tokens, cache_creation_input_tokens,
        cost_micros}]``. Sums are null where no record of the group reported that count (or was
        priced); ``key`` is null for records without that value (a refused request's model).
        Days come oldest first (the newest ``limit``); other groups by ``requests``, most
        first (the first ``limit``). ``RecordError`` for an unknown ``group_by``."""
        key = USAGE_GROUPS.get(group_by)
        if key is None:
            raise RecordError(
                f"unknown group_by {group_by!r}; use one of {', '.join(USAGE_GROUPS)}"
            )
        where, params = _interception_where(query)
        # NULLS FIRST: SQLite's order, spelled out for PostgreSQL (which sorts nulls last).
        order = "key DESC" if group_by == "day" else "requests DESC, key NULLS FIRST"
        async with self._transaction(write=False) as db:
            cursor = await db.execute(
                f"SELECT {key} AS key, COUNT(*) AS requests, {_USAGE_SUMS} FROM interceptions "
                f"{where} GROUP BY key ORDER BY {order} LIMIT ?",
                (*params, limit),
            )
            rows = await cursor.fetchall()
        groups = [dict(zip(USAGE_FIELDS, row, strict=True)) for row in rows]
        return groups[::-1] if group_by == "day" else groups


# --- interception queries ----------------------------------------------------------------------

# A record as the data API returns it (CONTRACT 10.1): ``id`` is the request id (a UUID, the
# X-AIBridge-Request-Id); the row number and the duplicate ``provider_type`` stay internal.
RECORD_FIELDS = (
    "id",
    *(f for f in INTERCEPTION_FIELDS if f not in ("request_id", "provider_type")),
)
_RECORD_COLUMNS = ("request_id", *RECORD_FIELDS[1:])
# Usage groups (CONTRACT 12, ``GET /api/v2/aibridge/usage?group_by=``): name -> SQL expression.
# The unary + (a no-op on the value) keeps SQLite from grouping by walking that column's index,
# which reads the rows out of order: one pass over the rows and a sort is about 2.5 times faster
# (60 ms against 150 ms for 100,000 records grouped by initiator). A filter still uses indexes.
USAGE_GROUPS = {
    "day": "substr(started_at, 1, 10)",
    "provider": "+provider",
    "provider_name": "+provider_name",
    "model": "+model",
    "initiator": "+initiator",
    "client": "+client",
}
USAGE_FIELDS = (
    "key",
    "requests",
    "input_tokens",
    "output_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
    "cost_micros",
)
_USAGE_SUMS = ", ".join(f"SUM({field})" for field in USAGE_FIELDS[2:])

# Child tables of ``interceptions``, keyed by the interception's request_id.
CHILD_TABLES = ("interception_prompts", "interception_tool_calls", "interception_thoughts")
# In the order of sessions.SessionAggregate's fields.
_SESSION_AGGREGATES = (
    "session_id, MIN(started_at), MAX(started_at), MAX(ended_at), COUNT(DISTINCT thread_root_id), "
    "SUM(input_tokens), SUM(output_tokens), SUM(cache_read_input_tokens), "
    "SUM(cache_creation_input_tokens), SUM(cost_micros), "
    "json_group_array(DISTINCT provider), json_group_array(DISTINCT model), "
    "json_group_array(DISTINCT provider_name)"
)
# In the order of sessions.SessionInterception's fields (its id is the request_id).
_SESSION_INTERCEPTION_COLUMNS = (
    "request_id, thread_root_id, model, provider, provider_name, status, error, started_at, "
    "ended_at, "
    "credential_kind, credential_hint, input_tokens, output_tokens, cache_read_input_tokens, "
    "cache_creation_input_tokens"
)
_RECORD_VALUES = operator.attrgetter(*INTERCEPTION_FIELDS)
_SESSION_AT = INTERCEPTION_FIELDS.index("session_id")
_PARENT_AT = INTERCEPTION_FIELDS.index("thread_parent_id")
_ROOT_AT = INTERCEPTION_FIELDS.index("thread_root_id")

# Where a tool call was recorded: (recency, request_id, thread_root_id). Recency orders rows
# already stored (0, rowid) before records of the batch being written (1, position).
ToolCallOrigin = tuple[tuple[int, int], str, str]


# A recorded tool call's key: (initiator, tool_call_id). A thread never crosses users: a tool
# result only continues a call that the same initiator's interception recorded, so an id that
# two users' calls share (or one user copies from another) never joins their threads.
ToolCallKey = tuple[str | None, str]


async def _stored_request_ids(db: Connection, batch: list[InterceptionRecord]) -> set[str]:
    """The request ids of the batch already stored (one probe of the request_id index each)."""
    wanted = json.dumps(sorted({record.request_id for record in batch}))
    cursor = await db.execute(
        "SELECT request_id FROM interceptions WHERE request_id IN (SELECT value FROM json_each(?))",
        (wanted,),
    )
    return {str(row[0]) for row in await cursor.fetchall()}


async def _recorded_tool_calls(
    db: Connection, batch: list[InterceptionRecord]
) -> dict[ToolCallKey, ToolCallOrigin]:
    """The stored interceptions that made the tool calls the batch's records answer, by
    ``(initiator, tool call id)``, the most recently written one where an id was recorded
    twice. One query."""
    wanted = sorted({tool_call_id for r in batch for tool_call_id in r.tool_result_ids})
    if not wanted:
        return {}
    cursor = await db.execute(
        "SELECT i.initiator, calls.tool_call_id, i.id, i.request_id, i.thread_root_id "
        "FROM interception_tool_calls AS calls "
        "JOIN interceptions AS i ON i.request_id = calls.interception_id "
        "WHERE calls.tool_call_id IN (SELECT value FROM json_each(?))",
        (json.dumps(wanted),),
    )
    found: dict[ToolCallKey, ToolCallOrigin] = {}
    for initiator, tool_call_id, rowid, request_id, root in await cursor.fetchall():
        origin = ((0, rowid), request_id, root or request_id)
        key = (initiator, tool_call_id)
        if key not in found or found[key] < origin:
            found[key] = origin
    return found


def _interception_rows(
    batch: list[InterceptionRecord],
    recorded: dict[ToolCallKey, ToolCallOrigin],
    owners: dict[str, str | None],
) -> list[list[Any]]:
    """The batch's rows, lineage resolved in order: each record sees the stored tool calls
    (``recorded``) and those of the records before it in the batch, its initiator's only.
    ``owners``: the initiator each client session id already belongs to (``_session_owners``);
    updated as records of the batch claim new ones."""
    origins = dict(recorded)
    rows = []
    for position, record in enumerate(batch):
        keys = ((record.initiator, i) for i in record.tool_result_ids)
        parent = max((origins[key] for key in keys if key in origins), default=None)
        root = parent[2] if parent is not None else record.request_id
        row = list(_RECORD_VALUES(record))
        row[_PARENT_AT] = parent[1] if parent is not None else None
        row[_ROOT_AT] = root
        row[_SESSION_AT] = _session_of(record, root, owners)
        rows.append(row)
        for call in record.tool_calls:
            if call.tool_call_id:
                key = (record.initiator, call.tool_call_id)
                origins[key] = ((1, position), record.request_id, root)
    return rows


def _session_of(record: InterceptionRecord, root: str, owners: dict[str, str | None]) -> str:
    """The record's session: its client session id, else its thread's root. A session belongs
    to one user: a client session id another initiator used first gives
    ``<client session id>~<initiator>``, so no user's records join another's session."""
    client_session = record.client_session_id
    if not client_session or "~" in client_session:
        # "~" is ours (clients.clean_session_id refuses it): a record that carries it anyway
        # (written past the proxy) must not name another user's namespaced session.
        return root
    owner = owners.setdefault(client_session, record.initiator)
    if owner == record.initiator:
        return client_session
    return f"{client_session}~{record.initiator or '-'}"


async def _session_owners(db: Connection, batch: list[InterceptionRecord]) -> dict[str, str | None]:
    """client session id -> the initiator of its first stored record, for the batch's client
    session ids already in the store. One query, one index probe per id."""
    wanted = sorted({r.client_session_id for r in batch if r.client_session_id})
    if not wanted:
        return {}
    # A record of no initiator (auth: none) owns as '' (no token is named ''); no record: NULL.
    cursor = await db.execute(
        "SELECT ids.value, (SELECT coalesce(initiator, '') FROM interceptions "
        "WHERE session_id = ids.value ORDER BY started_at, id LIMIT 1) FROM json_each(?) AS ids",
        (json.dumps(wanted),),
    )
    return {
        session: owner or None for session, owner in await cursor.fetchall() if owner is not None
    }


# What the engines raise about a value they were given, rather than about the database.
_DATA_ERRORS: tuple[type[BaseException], ...] = (
    *postgres.DATA_ERRORS,
    sqlite3.ProgrammingError,
    sqlite3.InterfaceError,
    sqlite3.IntegrityError,
    sqlite3.DataError,
    OverflowError,
    UnicodeError,
)
# SQLite's INTEGER is a signed 64-bit number.
_INT64 = range(-(2**63), 2**63)


def _storable_record(record: InterceptionRecord) -> InterceptionRecord:
    """The record as SQLite can store and read it back, whatever reached it: an integer outside
    64 bits becomes None (no count or cost is that large), and text loses lone surrogates (a
    JSON ``\\ud800`` escape), which UTF-8 cannot carry. So one bad value never fails its
    batch. The record itself when nothing needs it (the common case: one pass, no copy)."""
    changes: dict[str, Any] = {}
    for name, value in zip(INTERCEPTION_FIELDS, _RECORD_VALUES(record), strict=True):
        if (storable := _storable(value)) is not value:
            changes[name] = storable
    texts = (record.prompt, *record.thoughts, *record.tool_result_ids)
    calls = [
        text for call in record.tool_calls for text in (call.tool_call_id, call.tool, call.input)
    ]
    if any(_storable(text) is not text for text in (*texts, *calls)):
        changes["prompt"] = _storable(record.prompt)
        changes["thoughts"] = tuple(map(_storable, record.thoughts))
        changes["tool_result_ids"] = tuple(map(_storable, record.tool_result_ids))
        changes["tool_calls"] = tuple(
            ToolCall(_storable(c.tool_call_id), _storable(c.tool), _storable(c.input))
            for c in record.tool_calls
        )
    return dataclasses.replace(record, **changes) if changes else record


def _storable(value: Any) -> Any:
    """``value`` itself when SQLite stores it as it is; else its storable form (see
    ``_storable_record``)."""
    if isinstance(value, str):
        if "\x00" in value:
            # PostgreSQL's text cannot hold NUL (SQLite's can): one form for both engines.
            value = value.replace("\x00", "\ufffd")
        if value.isascii():
            return value
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "replace").decode("utf-8")
        return value
    if isinstance(value, int) and not isinstance(value, bool) and value not in _INT64:
        return None
    return value


async def _insert_rows(
    db: Connection, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]
) -> None:
    """Insert ``rows`` into ``table``: one COPY on PostgreSQL, one executemany on SQLite."""
    if isinstance(db, PgConnection):
        await db.copy_rows(table, columns, rows)
        return
    marks = ", ".join("?" for _ in columns)
    await db.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", rows)


def _child_rows(
    batch: list[InterceptionRecord],
) -> list[tuple[str, Sequence[str], list[tuple[Any, ...]]]]:
    prompts = [(r.request_id, 0, r.prompt) for r in batch if r.prompt]
    tool_calls = [
        (r.request_id, position, call.tool_call_id, call.tool, call.input)
        for r in batch
        for position, call in enumerate(r.tool_calls)
    ]
    thoughts = [
        (r.request_id, position, thought)
        for r in batch
        for position, thought in enumerate(r.thoughts)
    ]
    return [
        ("interception_prompts", ("interception_id", "position", "prompt"), prompts),
        (
            "interception_tool_calls",
            ("interception_id", "position", "tool_call_id", "tool", "input"),
            tool_calls,
        ),
        ("interception_thoughts", ("interception_id", "position", "thought"), thoughts),
    ]


def _interception_where(query: InterceptionFilter) -> tuple[str, list[str]]:
    """``WHERE ...`` (or "") and its parameters for the filter's conditions, ``limit`` aside."""
    clauses: list[str] = []
    params: list[str] = []
    if query.provider is not None:
        # A provider by name or by type: ``--provider openai`` finds the provider named
        # openai and every provider of type openai.
        clauses.append("(provider_name = ? OR provider = ?)")
        params.extend((query.provider, query.provider))
    if query.provider_type is not None:
        clauses.append("provider = ?")  # the column holds the type (CONTRACT 10.1)
        params.append(query.provider_type)
    for column in ("model", "initiator", "client", "session_id", "provider_name"):
        value = getattr(query, column)
        if value is not None:
            clauses.append(f"{column} = ?")
            params.append(value)
    if query.started_after is not None:
        clauses.append("started_at > ?")
        params.append(query.started_after)
    if query.started_before is not None:
        clauses.append("started_at < ?")
        params.append(query.started_before)
    return (f"WHERE {' AND '.join(clauses)}" if clauses else ""), params


async def _fetch_children(db: Connection, interception_ids: list[str]) -> Children:
    """The prompts, tool calls and thoughts of these interceptions: one query per child table
    (the ids travel as one JSON array, so a page of any size is one statement)."""
    if not interception_ids:
        return Children()
    ids = json.dumps(interception_ids)
    tables = []
    for sql in (
        "SELECT interception_id, prompt FROM interception_prompts",
        "SELECT interception_id, tool_call_id, tool, input FROM interception_tool_calls",
        "SELECT interception_id, thought FROM interception_thoughts",
    ):
        cursor = await db.execute(
            f"{sql} WHERE interception_id IN (SELECT value FROM json_each(?)) "
            "ORDER BY interception_id, position",
            (ids,),
        )
        tables.append(await cursor.fetchall())
    # Thousands of rows for a page of 1,000: grouped in a worker thread, off the event loop
    # that the proxy's streams share.
    return await asyncio.to_thread(_grouped_children, *tables)


def _grouped_children(
    prompts: Iterable[Any], tool_calls: Iterable[Any], thoughts: Iterable[Any]
) -> Children:
    children = Children()
    for target, rows in (
        (children.prompts, prompts),
        (children.tool_calls, tool_calls),
        (children.thoughts, thoughts),
    ):
        for interception_id, *values in rows:
            target.setdefault(interception_id, []).append(values)
    return children


def _records(rows: Iterable[Any], children: Children) -> list[dict[str, Any]]:
    """Rows of ``_RECORD_COLUMNS`` as the data API's records, with their children."""
    results = []
    for row in rows:
        record = dict(zip(RECORD_FIELDS, row, strict=True))
        record["streamed"] = bool(record["streamed"])
        record.update(children.of(record["id"]))
        results.append(record)
    return results


def _and_where(where: str, condition: str) -> str:
    """``where`` (a ``WHERE ...`` clause or "") with ``condition`` added ("" adds nothing)."""
    if not condition:
        return where
    return f"{where} AND {condition}" if where else f"WHERE {condition}"


async def _count_interceptions(db: Connection, where: str, params: list[str]) -> int:
    cursor = await db.execute(f"SELECT COUNT(*) FROM interceptions {where}", params)
    row = await cursor.fetchone()
    return int(row[0]) if row else 0


async def _after_interception(
    db: Connection, where: str, params: list[str], after_id: str | None
) -> tuple[str, tuple[Any, ...]]:
    """The condition and parameters that continue a page after record ``after_id`` (keyset on
    ``(started_at, id)``); RecordError when no record matching the filter has that id, so a
    cursor never reveals a record the filter (a user's own records) does not show."""
    if after_id is None:
        return "", ()
    cursor = await db.execute(
        f"SELECT started_at, id FROM interceptions {_and_where(where, 'request_id = ?')} "
        "ORDER BY id DESC LIMIT 1",
        (*params, after_id),
    )
    row = await cursor.fetchone()
    if row is None:
        raise RecordError(f"unknown interception {after_id!r}")
    return "(started_at, id) < (?, ?)", (row[0], row[1])


async def _after_session(
    db: Connection, after_session_id: str | None, where: str, params: list[str]
) -> tuple[str, tuple[str, ...]]:
    """The ``HAVING`` clause and parameters that continue a session list after this session
    (keyset pagination on ``(last_active_at, id)``). RecordError for a session with no record
    matching the filter (``where``, ``params``): a cursor never reveals a session the filter
    (a user's own records) does not show."""
    if after_session_id is None:
        return "", ()
    cursor = await db.execute(
        "SELECT MAX(started_at) FROM interceptions WHERE session_id = ? AND EXISTS "
        f"(SELECT 1 FROM interceptions {_and_where(where, 'session_id = ?')})",
        (after_session_id, *params, after_session_id),
    )
    row = await cursor.fetchone()
    if row is None or row[0] is None:
        raise RecordError(f"unknown session {after_session_id!r}")
    return (
        "HAVING (MAX(started_at), session_id) < (?, ?)",
        (row[0], after_session_id),
    )


async def _session_summaries(db: Connection, session_ids: list[str]) -> dict[str, dict[str, Any]]:
    """``session_summary`` of each of these sessions that exists, by id: two queries."""
    if not session_ids:
        return {}
    ids = json.dumps(session_ids)
    cursor = await db.execute(
        f"SELECT {_SESSION_AGGREGATES} FROM interceptions "
        "WHERE session_id IN (SELECT value FROM json_each(?)) GROUP BY session_id",
        (ids,),
    )
    aggregates = await cursor.fetchall()
    # The latest interception's client and initiator, and the latest prompt recorded: each a
    # descent of the (session_id, started_at) index that stops at the first row.
    cursor = await db.execute(
        "SELECT page.value, "
        "(SELECT json_array(client, initiator) FROM interceptions WHERE session_id = page.value "
        " ORDER BY started_at DESC, id DESC LIMIT 1), "
        "(SELECT p.prompt FROM interceptions AS i "
        " JOIN interception_prompts AS p ON p.interception_id = i.request_id "
        " WHERE i.session_id = page.value "
        " ORDER BY i.started_at DESC, i.id DESC, p.position DESC LIMIT 1) "
        "FROM json_each(?) AS page",
        (ids,),
    )
    latest = await cursor.fetchall()
    return await asyncio.to_thread(_summaries, aggregates, latest)


def _summaries(aggregates: Iterable[Any], latest: Iterable[Any]) -> dict[str, dict[str, Any]]:
    """The rows of ``_session_summaries``' two queries as summaries (in a worker thread: a
    page of 1,000 sessions is milliseconds of JSON parsing)."""
    by_session = {row[0]: row[1:] for row in latest}
    return {
        row[0]: session_summary(SessionAggregate(*row), *by_session[row[0]]) for row in aggregates
    }


class RecordCache:
    """Rows already turned into records, by name: a reload converts only rows that changed,
    and hands back the very same record objects for the others (which EvaluationCache uses)."""

    def __init__(self, keyring: Keyring | None = None) -> None:
        self._rows: dict[str, tuple[tuple[Any, ...], ProviderRecord]] = {}
        # Opens the sealed secrets of changed rows; None: the key file next to the database.
        self.keyring = keyring
        # A row sealed with a key this process lacks fails the whole read while ``strict`` (the
        # daemon's start: a configuration mistake, refused naming the key id); once running,
        # only that provider goes to status error, so tokens (and their revocations) and every
        # other provider still load. The daemon clears it after its first load.
        self.strict = True

    def records(
        self, rows: Iterable[tuple[Any, ...]], keyring: Keyring | None = None
    ) -> list[ProviderRecord]:
        keyring = keyring or self.keyring
        fresh: dict[str, tuple[tuple[Any, ...], ProviderRecord]] = {}
        records = []
        for row in rows:
            cached = self._rows.get(row[0])
            if cached is not None and cached[0] == row:
                record = cached[1]
            else:
                record = _provider_from_row(row, keyring, self.strict)
            fresh[row[0]] = (row, record)
            records.append(record)
        self._rows = fresh
        return records


class RoutingState(NamedTuple):
    """What one reload reads: provider rows, proxy tokens, and the stored model prices."""

    providers: list[ProviderRecord]
    tokens: list[TokenRecord]
    model_prices: StoredPrices
    policies: tuple[Policy, ...] = ()


async def read_routing_state(path: Path, cache: RecordCache | None = None) -> RoutingState:
    """One reload: open the existing database, read providers, tokens and stored prices in one
    transaction, close. A missing file is an error, never silently recreated empty: the reload
    then keeps its previous snapshot instead of dropping every provider.

    All of it (SQLite, turning rows into records, opening sealed secrets) runs in a worker
    thread: with thousands of providers it takes long enough to hold up streams if it ran on the
    event loop. The cache's keyring opens the secrets (default: the key file next to ``path``);
    a secret sealed with a key it does not have is a ``StoreError`` naming the key id."""
    return await asyncio.to_thread(_read_routing_state, Path(path), cache or RecordCache())


def _read_routing_state(path: Path, cache: RecordCache) -> RoutingState:
    if not path.is_file():
        raise DatabaseMissing(f"database {path} does not exist")
    try:
        # mode=rw: never create the file; a reader takes no write lock.
        db = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
        try:
            db.execute("BEGIN")
            has_versions = db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
            ).fetchone()
            version = (
                db.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0]
                if has_versions
                else 0
            )
            if version != len(MIGRATIONS):
                raise StoreError(
                    f"database {path} is at schema version {version}, expected {len(MIGRATIONS)}"
                )
            state = _routing_state(
                db.execute(_ROUTING_PROVIDERS),
                db.execute(_ROUTING_TOKENS),
                db.execute(_ROUTING_PRICES),
                db.execute(_ROUTING_POLICIES).fetchall(),
                cache,
                cache.keyring or Keyring.beside(path),
            )
            db.execute("COMMIT")
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise StoreError(f"database {path}: {exc}") from None
    return state


_ROUTING_PROVIDERS = f"SELECT {_PROVIDER_COLUMNS} FROM providers ORDER BY name"
_ROUTING_TOKENS = "SELECT name, token_hash, created_at FROM tokens ORDER BY name"


def _routing_state(
    providers: Iterable[Any],
    tokens: Iterable[Any],
    prices: Iterable[Any],
    policies: Iterable[Any],
    cache: RecordCache,
    keyring: Keyring,
) -> RoutingState:
    records = cache.records(providers, keyring)
    token_records = [
        TokenRecord(name=row[0], token_hash=row[1], created_at=row[2]) for row in tokens
    ]
    stored = {row[0]: model_prices_from_row(row) for row in prices}
    policy_records = tuple(_policy_from_row(row) for row in policies)
    return RoutingState(records, token_records, MappingProxyType(stored), policy_records)


# --- policies ---------------------------------------------------------------------------------

_POLICY_COLUMNS = (
    "subject, provider, max_cost_usd, max_tokens, period, models, rpm, tpm, max_parallel, "
    "created_at, updated_at"
)
_POLICY_ORDER = "ORDER BY CASE WHEN subject = '*' THEN 0 ELSE 1 END, subject, provider"
_ROUTING_POLICIES = f"SELECT {_POLICY_COLUMNS} FROM policies {_POLICY_ORDER}"
# Bounds what one read of the shared counters holds: users are token names, so their number is
# the token table's; this only caps a table filled by hand.
MAX_COUNTER_ROWS = 100_000


class CounterDelta(NamedTuple):
    """What a replica adds to one shared counter: ``(subject, scope, period)`` names it,
    ``expires_at`` (RFC 3339 UTC) is when its period ended, for the purge."""

    subject: str
    scope: str
    period: str
    requests: int
    tokens: int
    cost_micros: int
    expires_at: str


# A shared policy counter stops here rather than overflow 64 bits: absurd usage an upstream
# reports (10**12 tokens a response, priced) would, after some thousands of requests, and the
# overflow would fail every replica's sync. Two capped values add up within 64 bits.
COUNTER_CAP = 2**62 - 1


def _capped_delta(delta: CounterDelta) -> CounterDelta:
    subject, scope, period, requests, tokens, cost_micros, expires_at = delta
    return CounterDelta(
        subject,
        scope,
        period,
        min(requests, COUNTER_CAP),
        min(tokens, COUNTER_CAP),
        min(cost_micros, COUNTER_CAP),
        expires_at,
    )


def _capped_sum(column: str) -> str:
    """SQL for ``column`` plus the delta's, at most ``COUNTER_CAP`` (both engines)."""
    total = f"policy_counters.{column} + excluded.{column}"
    return f"CASE WHEN {total} > {COUNTER_CAP} THEN {COUNTER_CAP} ELSE {total} END"


class CounterRow(NamedTuple):
    """One shared counter's totals over every replica."""

    subject: str
    scope: str
    period: str
    requests: int
    tokens: int
    cost_micros: int


async def _fetch_policies(db: Connection) -> list[Policy]:
    cursor = await db.execute(f"SELECT {_POLICY_COLUMNS} FROM policies {_POLICY_ORDER}")
    return [_policy_from_row(row) for row in await cursor.fetchall()]


# The spend a budget counts, from the interception records of one user (or all), since a
# period began: every token (as aibridgeproxyd.policy_counters.tokens_of) and the cost.
_RECORDED_SPEND = (
    "INSERT INTO policy_counters (subject, scope, period, requests, tokens, cost_micros, "
    "expires_at) SELECT initiator, ?, ?, 0, COALESCE(SUM(COALESCE(input_tokens, 0) + "
    "COALESCE(output_tokens, 0) + COALESCE(cache_read_input_tokens, 0) + "
    "COALESCE(cache_creation_input_tokens, 0)), 0), COALESCE(SUM(cost_micros), 0), ? "
    "FROM interceptions WHERE initiator IS NOT NULL AND started_at >= ? {user} {provider} "
    "GROUP BY initiator ON CONFLICT (subject, scope, period) DO UPDATE SET "
    "tokens = CASE WHEN excluded.tokens > policy_counters.tokens "
    "THEN excluded.tokens ELSE policy_counters.tokens END, "
    "cost_micros = CASE WHEN excluded.cost_micros > policy_counters.cost_micros "
    "THEN excluded.cost_micros ELSE policy_counters.cost_micros END"
)


async def _count_recorded_spend(db: Connection, policy: Policy) -> None:
    """Bring the shared budget counters of the current day, week and month up to the
    interception records, so a budget set in the middle of a period counts what was spent
    since it began. A counter that exists keeps the larger of its count and the records': it
    may have started later in the period (an earlier rate-only policy began counting), or be
    ahead of records not yet written."""
    now = datetime.now(UTC)
    user = "AND initiator = ?" if policy.user else ""
    provider = "AND provider_name = ?" if policy.provider else ""
    sql = _RECORDED_SPEND.format(user=user, provider=provider)
    for period in PERIODS:
        params: list[Any] = [
            policy.provider or EVERYONE,
            period_key(period, now),
            f"{period_end(period, now) + timedelta(days=1):%Y-%m-%dT%H:%M:%SZ}",
            # Without the zone letter: a record at the very start (``...00.000Z``) sorts after.
            f"{period_start(period, now):%Y-%m-%dT%H:%M:%S}",
        ]
        params += [value for value in (policy.user, policy.provider) if value]
        await db.execute(sql, tuple(params))


def _policy_row(policy: Policy, now: str) -> tuple[Any, ...]:
    subject, provider = policy.key
    return (
        subject,
        provider,
        None if policy.max_cost_usd is None else str(policy.max_cost_usd),
        policy.max_tokens,
        policy.period,
        None if policy.models is None else json.dumps(list(policy.models)),
        policy.rpm,
        policy.tpm,
        policy.max_parallel,
        now,
        now,
    )


def _policy_from_row(row: Sequence[Any]) -> Policy:
    """A stored row as a validated ``Policy``. A row changed by hand that does not validate is a
    ``StoreError``: a reload then keeps the policies it had, rather than drop a limit."""
    subject, provider = str(row[0]), str(row[1])
    try:
        models = None if row[5] is None else tuple(json.loads(row[5]))
        return validate_policy(
            Policy(
                user=None if subject == EVERYONE else subject,
                provider=None if provider == EVERYONE else provider,
                max_cost_usd=None if row[2] is None else Decimal(str(row[2])),
                max_tokens=row[3],
                period=row[4],
                models=models,
                rpm=row[6],
                tpm=row[7],
                max_parallel=row[8],
                created_at=str(row[9]),
                updated_at=str(row[10]),
            )
        )
    except (PolicyError, ValueError, TypeError, ArithmeticError) as exc:
        raise StoreError(f"policy ({subject}, {provider}) cannot be read: {exc}") from None


# --- operator prices (``prices set``) --------------------------------------------------------

_PRICE_COLUMNS = ("input", "output", "cache_read", "cache_creation")
_PRICE_SELECT = "model, " + ", ".join(_PRICE_COLUMNS)
_ROUTING_PRICES = f"SELECT {_PRICE_SELECT} FROM model_prices"
MAX_PRICE_MODEL_LENGTH = 256


def validate_price_model(model: str) -> None:
    """A model name as a record carries it: printable, no surrounding spaces, not empty."""
    if (
        not model
        or model != model.strip()
        or not model.isprintable()
        or len(model) > MAX_PRICE_MODEL_LENGTH
    ):
        raise RecordError(
            f"invalid model name {model[:MAX_PRICE_MODEL_LENGTH]!r}: use the model name as the "
            f"provider reports it (printable, no surrounding spaces, "
            f"at most {MAX_PRICE_MODEL_LENGTH} characters)"
        )


def model_prices_from_row(row: Sequence[Any]) -> ModelPrices | None:
    """``(model, input, output, cache_read, cache_creation)`` as rates; None when a rate does
    not parse (a row edited by hand): that model stays unpriced rather than priced wrong."""
    try:
        rates = [None if text is None else parse_rate(text) for text in row[1:5]]
    except ValueError:
        return None
    if rates[0] is None or rates[1] is None:
        return None
    return ModelPrices(rates[0], rates[1], rates[2], rates[3])


# --- helpers -------------------------------------------------------------------------------


def _pending_migrations(
    db: Connection, current: int, latest: int
) -> list[tuple[int, Sequence[str]]]:
    """``(version, statements)`` that take a database from ``current`` to ``latest``. A new
    PostgreSQL database starts with ``postgres.BASELINE`` as version ``BASELINE_VERSION`` (it
    records the versions before as applied too: each is in it); one between 1 and the baseline
    cannot exist, and is refused rather than guessed at."""
    versions = range(current + 1, latest + 1)
    if not isinstance(db, PgConnection):
        return [(version, MIGRATIONS[version - 1]) for version in versions]
    if 0 < current < postgres.BASELINE_VERSION:
        raise StoreError(
            f"the PostgreSQL database reports schema version {current}, which no PostgreSQL "
            "database of aibridgeproxyd ever had"
        )
    steps: list[tuple[int, Sequence[str]]] = []
    for version in versions:
        if version < postgres.BASELINE_VERSION:
            steps.append((version, ()))
        elif version == postgres.BASELINE_VERSION:
            steps.append((version, postgres.BASELINE))
        else:
            steps.append((version, MIGRATIONS[version - 1]))
    return steps


def _create_private_file(path: Path) -> None:
    """Create the data directory (0700) and an empty database file (0600) before SQLite sees
    it: SQLite would create it with the process umask, typically world-readable, and the file
    holds provider keys. SQLite gives the -wal/-shm companions the main file's mode."""
    try:
        path.parent.mkdir(mode=DATA_DIR_MODE, parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(
            f"cannot create data directory {path.parent}: {exc.strerror or exc}"
        ) from None
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, DATABASE_FILE_MODE)
    except FileExistsError:
        return
    except OSError as exc:
        raise StoreError(f"cannot create database {path}: {exc.strerror or exc}") from None
    os.close(fd)


def _restrict_companions(path: Path) -> None:
    """Belt and braces for the WAL companions: SQLite matches them to the database file's mode,
    but a companion left by an older process may be wider."""
    for suffix in ("-wal", "-shm"):
        companion = path.with_name(path.name + suffix)
        try:
            if companion.stat().st_mode & 0o077:
                companion.chmod(DATABASE_FILE_MODE)
        except OSError:
            pass  # absent, or not ours to change: SQLite will still open it


async def _fetch_version(db: Connection) -> int:
    cursor = await db.execute(
        "SELECT 1 FROM information_schema.tables WHERE table_schema = current_schema() "
        "AND table_name = 'schema_version'"
        if isinstance(db, PgConnection)
        else "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
    )
    if await cursor.fetchone() is None:
        return 0
    cursor = await db.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version")
    row = await cursor.fetchone()
    return int(row[0]) if row else 0


async def _fetch_providers(db: Connection, keyring: Keyring) -> list[ProviderRecord]:
    cursor = await db.execute(f"SELECT {_PROVIDER_COLUMNS} FROM providers ORDER BY name")
    return [_provider_from_row(row, keyring) for row in await cursor.fetchall()]


async def _fetch_tokens(db: Connection) -> list[TokenRecord]:
    cursor = await db.execute("SELECT name, token_hash, created_at FROM tokens ORDER BY name")
    return [
        TokenRecord(name=row[0], token_hash=row[1], created_at=row[2])
        for row in await cursor.fetchall()
    ]


def _row_from_record(record: ProviderRecord, keyring: Keyring) -> tuple[Any, ...]:
    """The row of a record, its provider keys and secret settings sealed."""
    return (
        record.name,
        record.type,
        record.display_name,
        record.base_url,
        json.dumps(list(record.hosts)),
        int(record.enabled),
        int(record.allow_byok),
        _sealing(lambda keys: _keys_column(record, keys), keyring),
        json.dumps(_sealing(lambda keys: _sealed_settings(record, keys), keyring), sort_keys=True),
        record.created_at,
        record.updated_at,
    )


def _keys_column(record: ProviderRecord, keyring: Keyring) -> str:
    infos = key_infos(record.keys, record.key_info)
    return json.dumps(
        [
            {
                "id": info.id,
                "created_at": info.created_at,
                "key": keyring.seal(key, record.name, "keys"),
            }
            for key, info in zip(record.keys, infos, strict=True)
        ]
    )


def _stored_keys(problems: list[str], entries: list[Any]) -> tuple[list[str], list[KeyInfo]]:
    """The ``keys`` column's objects as keys and their infos; a problem (never a key) if one
    is not ``{"id": str, "created_at": str, "key": non-empty str}``."""
    keys: list[str] = []
    infos: list[KeyInfo] = []
    for entry in entries:
        key = entry.get("key") if type(entry) is dict else None
        key_id = entry.get("id") if type(entry) is dict else None
        created_at = entry.get("created_at", "") if type(entry) is dict else None
        if not (type(key) is str and key.strip() and type(key_id) is str) or (
            type(created_at) is not str
        ):
            problems.append("keys has an entry that is not an object with a key and its id")
            return [], []
        keys.append(key)
        infos.append(KeyInfo(id=key_id, created_at=created_at, digest=key_digest(key)))
    return keys, infos


def _record_from_row(row: Iterable[Any]) -> ProviderRecord:
    """A stored row as a record. Never raises: a row this code cannot read (a column that is
    not the JSON it should be, a value of the wrong type, written by hand or by a broken tool)
    comes back with ``problem`` set, and evaluates to status ``error`` with that reason. One bad
    row must not fail every reload, nor crash ``providers list``.

    ``problem`` names the column and what is wrong with it, never the value: ``keys`` and
    ``settings`` hold secrets. (Written for speed: a reload of 10,000 new rows runs this for
    each, and sound rows take the shortest path.)"""
    (
        name,
        type_,
        display_name,
        base_url,
        hosts,
        enabled,
        allow_byok,
        keys,
        settings,
        created_at,
        updated_at,
    ) = row
    problems: list[str] = []
    if not (
        type(name) is str
        and type(type_) is str
        and type(display_name) is str
        and type(base_url) is str
    ):
        name = _text_column(problems, "name", name)
        type_ = _text_column(problems, "type", type_)
        display_name = _text_column(problems, "display_name", display_name)
        base_url = _text_column(problems, "base_url", base_url)
    if not problems and not NAME_PATTERN.fullmatch(name):
        problems.append("name does not match ^[a-z0-9]+(-[a-z0-9]+)*$")
    if enabled not in (0, 1) or allow_byok not in (0, 1):  # True and False included
        for column, value in (("enabled", enabled), ("allow_byok", allow_byok)):
            if value not in (0, 1):
                problems.append(f"{column} is not 0 or 1")
        enabled = allow_byok = False
    host_list = _json_list_column(problems, "hosts", hosts)
    if host_list:
        host_list = _normalized_hosts(problems, host_list)
    key_list = _json_list_column(problems, "keys", keys)
    info_list: list[KeyInfo] = []
    if key_list:
        key_list, info_list = _stored_keys(problems, key_list)
        if len(key_list) > MAX_KEYS:
            problems.append(f"keys has {len(key_list)} entries; at most {MAX_KEYS} are allowed")
    if settings == "{}":
        settings_map: dict[str, Any] = {}
    else:
        try:
            settings_map = _json_column(settings, dict)
        except ValueError as exc:
            problems.append(_json_problem("settings", exc))
            settings_map = {}
    record = ProviderRecord(
        name=name,
        type=type_,
        display_name=display_name,
        base_url=base_url,
        hosts=tuple(host_list),
        enabled=bool(enabled),
        allow_byok=bool(allow_byok),
        keys=tuple(key_list),
        key_info=tuple(info_list),
        settings=settings_map,
        created_at=created_at if type(created_at) is str else "",
        updated_at=updated_at if type(updated_at) is str else "",
    )
    if problems:
        record = replace(record, problem="malformed row: " + "; ".join(problems))
    return record


def _text_column(problems: list[str], column: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    problems.append(f"{column} is not text")
    return "" if value is None else str(value)


def _json_list_column(problems: list[str], column: str, text: Any) -> list[Any]:
    if text == "[]":
        return []
    try:
        return list(_json_column(text, list))
    except ValueError as exc:
        problems.append(_json_problem(column, exc))
        return []


def _json_problem(column: str, exc: ValueError) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"{column} is not valid JSON ({exc.msg}, character {exc.pos})"
    return f"{column} is not {exc}"


def _normalized_hosts(problems: list[str], hosts: list[Any]) -> list[str]:
    normalized = []
    for host in hosts:
        try:
            if type(host) is not str:
                raise ValueError
            normalized.append(normalize_host(host))
        except ValueError:
            problems.append(f"hosts has an invalid entry {str(host)[:100]!r}")
            return []
    return normalized


def _json_column(text: Any, kind: type[list[Any]] | type[dict[str, Any]]) -> Any:
    """The JSON value of a column. ValueError saying what it is not: text, valid JSON (a
    ``json.JSONDecodeError``), or a JSON value of ``kind``."""
    if type(text) is not str:
        raise ValueError("text")
    value = json.loads(text)
    if not isinstance(value, kind):
        raise ValueError(f"a JSON {'array' if kind is list else 'object'}")
    return value


# --- secrets at rest: sealed on write, opened on read (aibridgeproxyd.sealing) -------------


def _sealing[T](action: Callable[[Keyring], T], keyring: Keyring) -> T:
    """``action(keyring)``, a sealing failure (unknown key id, key file) as a ``StoreError``."""
    try:
        return action(keyring)
    except SealingError as exc:
        raise StoreError(str(exc)) from None


def _sealed_settings(record: ProviderRecord, keyring: Keyring) -> dict[str, Any]:
    return seal_settings(keyring, record.name, record.type, record.settings)


def _provider_from_row(
    row: Iterable[Any], keyring: Keyring | None, strict: bool = True
) -> ProviderRecord:
    """``_record_from_row`` with its sealed secrets opened. A value failing authentication
    (altered, or copied from another row) leaves the record without keys or settings, with a
    ``problem`` naming provider and field (status error; the other rows load). A value sealed
    with a key we do not have is a ``StoreError`` naming the key id (a configuration mistake
    that concerns every row, so the read refuses), or with ``strict=False`` that record's
    ``problem``."""
    record = _record_from_row(row)
    if not record.keys and not record.settings:
        return record
    try:
        return _unsealed(record, keyring or Keyring())
    except TamperedValueError as exc:
        problem = "; ".join(text for text in (record.problem, str(exc)) if text)
        return replace(record, keys=(), key_info=(), settings={}, problem=problem)
    except SealingError as exc:
        if strict:
            raise StoreError(str(exc)) from None
        problem = "; ".join(text for text in (record.problem, str(exc)) if text)
        return replace(record, keys=(), key_info=(), settings={}, problem=problem)


def _unsealed(record: ProviderRecord, keyring: Keyring) -> ProviderRecord:
    keys = tuple(
        keyring.unseal(key, record.name, "keys") if is_sealed(key) else key for key in record.keys
    )
    infos = tuple(
        replace(info, digest=key_digest(key))
        for info, key in zip(record.key_info, keys, strict=True)
    )
    settings = unseal_settings(keyring, record.name, record.settings)
    return replace(record, keys=keys, key_info=infos, settings=settings)


SecretRow = tuple[Any, Any, Any, Any]  # name, type, keys, settings as stored


async def _secret_rows(db: Connection) -> list[SecretRow]:
    cursor = await db.execute(
        "SELECT name, type, keys, settings FROM providers WHERE keys != '[]' OR settings != '{}' "
        "ORDER BY name"
    )
    return [tuple(row) for row in await cursor.fetchall()]


def _stored_json(text: Any, kind: type[list[Any]] | type[dict[str, Any]]) -> Any:
    """A JSON column's value, None when it is not JSON of ``kind`` (such a row is reported by
    ``_record_from_row``; sealing leaves it as it is)."""
    try:
        return _json_column(text, kind)
    except ValueError:
        return None


def _has_plaintext(row: SecretRow) -> bool:
    _, type_, keys, settings = row
    entries = _stored_json(keys, list) or []
    for entry in entries:
        key = entry.get("key") if type(entry) is dict else None
        if type(key) is str and key and not is_sealed(key):
            return True
    settings_map = _stored_json(settings, dict)
    return bool(settings_map) and has_plaintext_secret(str(type_), settings_map)


def _resealed(
    rows: list[SecretRow], keyring: Keyring, rotate: bool
) -> tuple[list[tuple[Any, Any, Any]], int]:
    """``(keys, settings, name)`` of each row whose secrets changed, and how many values did:
    plaintext sealed, and with ``rotate`` values of another key sealed with the first."""
    updates = []
    total = 0
    for row in rows:
        update, count = _resealed_row(row, keyring, rotate)
        if count:
            updates.append(update)
            total += count
    return updates, total


def _resealed_row(
    row: SecretRow, keyring: Keyring, rotate: bool
) -> tuple[tuple[Any, Any, Any], int]:
    name, type_, keys, settings = row
    count = 0

    def reseal(field: str, value: Any, as_json: bool = True) -> Any:
        nonlocal count
        sealed = keyring.reseal(value, str(name), field, rotate=rotate, as_json=as_json)
        count += sealed is not None
        return value if sealed is None else sealed

    entries = _stored_json(keys, list) or []
    for entry in entries:
        if type(entry) is dict and type(entry.get("key")) is str and entry["key"]:
            entry["key"] = reseal("keys", entry["key"], as_json=False)
    settings_map = _stored_json(settings, dict)
    if settings_map:
        settings_map = walk_secret_settings(str(type_), settings_map, reseal)
    new_keys = json.dumps(entries) if entries else keys
    new_settings = json.dumps(settings_map, sort_keys=True) if settings_map else settings
    return (new_keys, new_settings, name), count


# --- token re-reads and daemon presence (docs/security.md, token changes) ----------------------
#
# Kept apart from the reload's reads: a token the snapshot does not know is re-read on its own
# (``token_refresh``), and each running daemon reports in ``meta`` which store generation its
# snapshot reflects, so ``tokens revoke`` can wait until every live daemon refuses the token.

DAEMON_PRESENCE_PREFIX = "daemon:"


def _open_existing(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise StoreError(f"database {path} does not exist")
    # mode=rw: never create the file.
    return sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=BUSY_TIMEOUT_MS / 1000)


async def read_token_names(path: Path) -> dict[str, str]:
    """``{token hash: token name}`` of every stored token, read now in a worker thread.
    Raises ``StoreError`` when the database is missing or unreadable."""
    return await asyncio.to_thread(_read_token_names, Path(path))


def _read_token_names(path: Path) -> dict[str, str]:
    try:
        db = _open_existing(path)
        try:
            return {str(h): str(n) for n, h in db.execute("SELECT name, token_hash FROM tokens")}
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise StoreError(f"database {path}: {exc}") from None


# The shared CA's row in ``meta`` and the name its key is sealed under (sealing binds the
# ciphertext to an owner and a field, like a provider's key).
SHARED_CA_META = "mitm_ca"
SHARED_CA_OWNER = "(MITM CA)"
_SELECT_META = "SELECT value FROM meta WHERE key = ?"
_UPSERT_META = (
    "INSERT INTO meta (key, value) VALUES (?, ?) "
    "ON CONFLICT (key) DO UPDATE SET value = excluded.value"
)


def _presence_row(
    instance: str, generation: int, heartbeat: float, key_ids: Sequence[str]
) -> tuple[str, str]:
    """The meta row of a presence report: its generation, heartbeat (Unix seconds), pid and
    host (``aibridgeproxyd.liveness``), and the ids of the encryption keys it holds (``keys
    rotate`` checks them)."""
    value = json.dumps(
        {
            "generation": generation,
            "heartbeat": heartbeat,
            "pid": os.getpid(),
            "host": host_identity(),
            "key_ids": list(key_ids),
        }
    )
    return DAEMON_PRESENCE_PREFIX + instance, value


# A heartbeat further ahead of this clock than this is junk (a hand-edited row), not a daemon.
STALE_FUTURE = 60.0


class DaemonReport(NamedTuple):
    """One daemon's presence report: the generation it applied, its heartbeat (Unix seconds),
    its pid, the ids of the encryption keys it holds (None from a daemon that predates
    reporting them), and its host (``aibridgeproxyd.liveness.host_identity``; None when not
    known)."""

    generation: int
    heartbeat: float
    pid: int | None
    key_ids: tuple[str, ...] | None
    host: str | None = None

    def gone(self) -> bool:
        """Whether its process is known to have ended (on this machine: ``kill -9``)."""
        return process_gone(self.pid, self.host)


async def daemon_reports(store: Store) -> dict[str, DaemonReport]:
    """``{instance: report}`` of every daemon that reported itself; rows that do not parse are
    skipped (a daemon rewrites its row every few seconds)."""
    async with store._transaction(write=False) as db:
        cursor = await db.execute(
            "SELECT key, value FROM meta WHERE key LIKE ?", (DAEMON_PRESENCE_PREFIX + "%",)
        )
        rows = await cursor.fetchall()
    reports: dict[str, DaemonReport] = {}
    for key, value in rows:
        try:
            data = json.loads(value)
            keys = data.get("key_ids")
            report = DaemonReport(
                int(data["generation"]),
                float(data["heartbeat"]),
                int(data["pid"]) if isinstance(data.get("pid"), int) else None,
                tuple(str(k) for k in keys) if isinstance(keys, list) else None,
                data["host"] if isinstance(data.get("host"), str) else None,
            )
        except (TypeError, ValueError, KeyError, AttributeError, OverflowError):
            continue
        if math.isfinite(report.heartbeat) and report.heartbeat <= time.time() + STALE_FUTURE:
            reports[str(key)[len(DAEMON_PRESENCE_PREFIX) :]] = report
    return reports


async def daemon_presences(store: Store) -> dict[str, tuple[int, float]]:
    """``{instance: (applied generation, heartbeat)}`` of every daemon that reported itself."""
    return {
        instance: (report.generation, report.heartbeat)
        for instance, report in (await daemon_reports(store)).items()
    }
