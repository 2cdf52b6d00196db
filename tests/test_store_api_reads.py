"""The store's reads for the data API and the dashboard (CONTRACT 12): a page of interceptions
with its count and cursor, the distinct clients and models, usage grouped by day, provider,
model, initiator or client, and the session cursor kept inside the filter."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from aibridgeproxyd.database_url import DatabaseUrl
from aibridgeproxyd.model import InterceptionFilter, ToolCall
from aibridgeproxyd.store import RECORD_FIELDS, USAGE_GROUPS, RecordError, Store
from tests.store_engines import open_store
from tests.test_store import interception

# CONTRACT 10.1, in its order of mention; the API returns exactly these, plus the children.
CONTRACT_FIELDS = {
    "id", "connect_id", "initiator", "provider", "provider_name", "model", "client",
    "user_agent", "client_session_id", "session_id", "thread_parent_id", "thread_root_id",
    "credential_kind", "credential_hint", "method", "path", "status", "streamed",
    "input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens",
    "reasoning_output_tokens", "cost_micros", "started_at", "ended_at", "ttfb_ms",
    "duration_ms", "error",
}  # fmt: skip


@pytest.fixture
async def store(store_database: Path | DatabaseUrl) -> AsyncIterator[Store]:
    async with await open_store(store_database) as opened:
        yield opened


def at(second: int) -> str:
    return f"2026-01-0{1 + second // 86400}T00:00:{second % 60:02d}.000Z"


async def mixed(store: Store) -> None:
    """Five records: two users, two providers of two types, two clients, three models, two
    days; one unpriced, one with no model (refused before routing)."""
    await store.insert_interceptions(
        [
            interception("a1", "2026-01-01T10:00:00.000Z", cost_micros=100,
                         prompt="first", tool_calls=(ToolCall("c1", "grep", "{}"),),
                         thoughts=("hm",)),
            interception("a2", "2026-01-01T11:00:00.000Z", cost_micros=200, model="gpt-4o"),
            interception("b1", "2026-01-02T10:00:00.000Z", initiator="bob", cost_micros=None,
                         provider="anthropic", provider_type="anthropic", provider_name="claude",
                         client="Claude Code", model="claude-sonnet-4-5", input_tokens=5,
                         output_tokens=None, cache_read_input_tokens=None),
            interception("b2", "2026-01-02T11:00:00.000Z", initiator="bob", cost_micros=50,
                         provider="anthropic", provider_type="anthropic", provider_name="claude",
                         client="Claude Code", model="claude-sonnet-4-5",
                         cache_creation_input_tokens=7),
            interception("b3", "2026-01-02T12:00:00.000Z", initiator="bob", model=None,
                         status=401, input_tokens=None, output_tokens=None,
                         cache_read_input_tokens=None),
        ]
    )  # fmt: skip


# --- interceptions: page, count, cursor --------------------------------------------------------


async def test_a_page_has_exactly_the_contract_fields_and_the_children(store: Store) -> None:
    await mixed(store)
    page = await store.page_interceptions(InterceptionFilter(limit=10))
    assert page["count"] == 5
    assert [r["id"] for r in page["results"]] == ["b3", "b2", "b1", "a2", "a1"]
    first = page["results"][-1]
    assert set(RECORD_FIELDS) == CONTRACT_FIELDS
    assert set(first) == CONTRACT_FIELDS | {"prompts", "tool_calls", "thoughts"}
    assert (first["prompts"], first["thoughts"]) == (["first"], ["hm"])
    assert first["tool_calls"] == [{"tool_call_id": "c1", "tool": "grep", "input": "{}"}]
    assert first["streamed"] is True and first["provider"] == "openai"


async def test_pages_continue_after_the_cursor_with_the_total_count(store: Store) -> None:
    # Two records in the same millisecond: the order written breaks the tie.
    await store.insert_interceptions([interception(f"r{n}", at(n // 2)) for n in range(7)])
    seen: list[str] = []
    after = None
    while True:
        page = await store.page_interceptions(InterceptionFilter(limit=3), after)
        assert page["count"] == 7
        seen += [r["id"] for r in page["results"]]
        if len(page["results"]) < 3:
            break
        after = page["results"][-1]["id"]
    assert seen == ["r6", "r5", "r4", "r3", "r2", "r1", "r0"]


async def test_a_cursor_outside_the_filter_is_unknown(store: Store) -> None:
    await mixed(store)
    alice = InterceptionFilter(initiator="alice")
    assert [r["id"] for r in (await store.page_interceptions(alice, "a2"))["results"]] == ["a1"]
    with pytest.raises(RecordError, match="unknown interception 'b2'"):
        await store.page_interceptions(alice, "b2")
    with pytest.raises(RecordError, match="unknown interception 'nope'"):
        await store.page_interceptions(InterceptionFilter(), "nope")


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"initiator": "bob"}, ["b3", "b2", "b1"]),
        ({"provider_type": "anthropic"}, ["b2", "b1"]),
        ({"provider_type": "claude"}, []),  # a name is not a type
        ({"provider_name": "claude"}, ["b2", "b1"]),
        ({"provider_name": "anthropic"}, []),
        ({"model": "gpt-4o"}, ["a2"]),
        ({"client": "Claude Code"}, ["b2", "b1"]),
        ({"session_id": "a1"}, ["a1"]),
        ({"started_after": "2026-01-02T10:00:00.000Z"}, ["b3", "b2"]),
        ({"started_before": "2026-01-01T11:00:00.000Z"}, ["a1"]),
    ],
)
async def test_each_filter_narrows_the_page_and_its_count(
    store: Store, fields: dict[str, Any], expected: list[str]
) -> None:
    await mixed(store)
    page = await store.page_interceptions(InterceptionFilter(**fields))
    assert ([r["id"] for r in page["results"]], page["count"]) == (expected, len(expected))


# --- clients, models, usage ------------------------------------------------------------------


async def test_distinct_clients_and_models_sorted_without_null(store: Store) -> None:
    await mixed(store)
    assert await store.list_clients(InterceptionFilter()) == ["Claude Code", "Codex"]
    assert await store.list_models(InterceptionFilter()) == ["claude-sonnet-4-5", "gpt-4o", "o3"]
    assert await store.list_models(InterceptionFilter(initiator="alice")) == ["gpt-4o", "o3"]
    assert await store.list_clients(InterceptionFilter(initiator="carol")) == []


async def test_usage_by_day_sums_each_count_and_keeps_unreported_null(store: Store) -> None:
    await mixed(store)
    assert await store.usage("day", InterceptionFilter()) == [
        {"key": "2026-01-01", "requests": 2, "input_tokens": 20, "output_tokens": 600,
         "cache_read_input_tokens": 0, "cache_creation_input_tokens": None, "cost_micros": 300},
        {"key": "2026-01-02", "requests": 3, "input_tokens": 15, "output_tokens": 300,
         "cache_read_input_tokens": 0, "cache_creation_input_tokens": 7, "cost_micros": 50},
    ]  # fmt: skip
    # The newest days are kept when there are more than the limit.
    assert [g["key"] for g in await store.usage("day", InterceptionFilter(), 1)] == ["2026-01-02"]


@pytest.mark.parametrize(
    ("group_by", "expected"),
    [
        ("provider", [("openai", 3), ("anthropic", 2)]),
        ("provider_name", [("openai-main", 3), ("claude", 2)]),
        ("model", [("claude-sonnet-4-5", 2), (None, 1), ("gpt-4o", 1), ("o3", 1)]),
        ("initiator", [("bob", 3), ("alice", 2)]),
        ("client", [("Codex", 3), ("Claude Code", 2)]),
    ],
)
async def test_usage_groups_by_requests_most_first(
    store: Store, group_by: str, expected: list[tuple[str | None, int]]
) -> None:
    await mixed(store)
    groups = await store.usage(group_by, InterceptionFilter())
    assert [(g["key"], g["requests"]) for g in groups] == expected


async def test_usage_takes_the_filters_and_refuses_an_unknown_group(store: Store) -> None:
    await mixed(store)
    (bob,) = await store.usage("initiator", InterceptionFilter(initiator="bob"))
    assert (bob["requests"], bob["input_tokens"], bob["cost_micros"]) == (3, 15, 50)
    assert set(USAGE_GROUPS) >= {"day", "provider", "model", "initiator", "client"}
    with pytest.raises(RecordError, match="unknown group_by 'week'"):
        await store.usage("week", InterceptionFilter())


async def test_a_session_cursor_outside_the_filter_is_unknown(store: Store) -> None:
    await mixed(store)  # every record its own session (no client session id)
    alice = InterceptionFilter(initiator="alice")
    listed = await store.list_sessions(alice, 10, after_session_id="a2")
    assert [s["id"] for s in listed["sessions"]] == ["a1"]
    with pytest.raises(RecordError, match="unknown session 'b1'"):
        await store.list_sessions(alice, 10, after_session_id="b1")


# --- query plans -------------------------------------------------------------------------------


async def test_filtered_reads_stay_on_indexes(store: Store, db_path: Path) -> None:
    await mixed(store)
    statements: list[str] = []
    await store._db.set_trace_callback(statements.append)
    for fields in (
        {"initiator": "bob"},
        {"model": "o3"},
        {"client": "Codex"},
        {"provider_type": "openai"},
        {"provider_name": "claude"},
        {"session_id": "b1"},
        {"started_after": "2026-01-02T00:00:00.000Z"},
    ):
        query = InterceptionFilter(**fields)
        await store.page_interceptions(query)
        await store.list_clients(query)
        await store.list_models(query)
        for group_by in USAGE_GROUPS:
            await store.usage(group_by, query)
    await store.page_interceptions(InterceptionFilter(initiator="bob"), "b2")
    await store.page_interceptions(InterceptionFilter(), "b2")
    await store.list_sessions(InterceptionFilter(initiator="bob"), 10, "b2")
    # Unfiltered: the page and the distinct lists walk an index, never the table.
    await store.page_interceptions(InterceptionFilter())
    await store.list_clients(InterceptionFilter())
    await store.list_models(InterceptionFilter())
    await store._db.set_trace_callback(None)
    with sqlite3.connect(db_path) as connection:
        for sql in statements:
            if not sql.lstrip().upper().startswith("SELECT"):
                continue
            for *_, detail in connection.execute(f"EXPLAIN QUERY PLAN {sql}"):
                assert not re.fullmatch(r"SCAN (\w+)( AS \w+)?", detail), (sql, detail)
