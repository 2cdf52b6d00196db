"""The store's policies and shared policy counters, on both engines (SQLite and a real
PostgreSQL: ``tests/store_engines.py``): create-or-replace, validation errors naming the field,
the generation bump, the one-time seed, the counters' atomic upserts from two connections, the
purge, and the policies a reload reads."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from aibridgeproxyd.database_url import DatabaseUrl
from aibridgeproxyd.model import InterceptionRecord
from aibridgeproxyd.policy import Policy, period_key
from aibridgeproxyd.store import COUNTER_CAP, CounterDelta, RecordCache, RecordError, Store
from tests.store_engines import open_store


@pytest.fixture
async def store(store_database: Path | DatabaseUrl) -> AsyncIterator[Store]:
    async with await open_store(store_database) as opened:
        yield opened


async def test_set_policy_creates_and_replaces_whole_and_bumps_the_generation(
    store: Store,
) -> None:
    generation = await store.generation()
    created = await store.set_policy(
        Policy(user="alice", max_cost_usd=Decimal("2.50"), period="day", models=("gpt-*",))
    )
    assert created.max_cost_usd == Decimal("2.50") and created.created_at
    assert await store.generation() == generation + 1
    replaced = await store.set_policy(Policy(user="alice", rpm=10))
    assert (replaced.max_cost_usd, replaced.models, replaced.rpm) == (None, None, 10)
    assert replaced.created_at == created.created_at
    await store.set_policy(Policy(provider="openai", max_parallel=2))
    assert [p.key for p in await store.list_policies()] == [("*", "openai"), ("alice", "*")]
    assert await store.get_policy(None, "openai") is not None
    assert await store.get_policy("bob") is None


async def test_an_invalid_policy_is_a_record_error_naming_the_field(store: Store) -> None:
    with pytest.raises(RecordError) as refused:
        await store.set_policy(Policy(user="alice", rpm=0))
    assert refused.value.field == "rpm"
    assert await store.list_policies() == []


async def test_delete_policy_says_whether_there_was_one(store: Store) -> None:
    await store.set_policy(Policy(rpm=1))
    generation = await store.generation()
    assert await store.delete_policy(None)
    assert not await store.delete_policy(None)
    assert await store.generation() == generation + 1


async def test_a_seeded_policy_is_stored_once_and_never_brought_back(store: Store) -> None:
    seed = Policy(user="alice", rpm=5)
    assert await store.seed_policy(seed)
    await store.delete_policy("alice")
    assert not await store.seed_policy(seed)
    assert await store.get_policy("alice") is None
    await store.set_policy(Policy(user="bob", rpm=1))
    assert not await store.seed_policy(Policy(user="bob", rpm=99))  # an operator's stays
    stored = await store.get_policy("bob")
    assert stored is not None and stored.rpm == 1


def _delta(requests: int, cost: int, period: str = "day:2026-11-29") -> CounterDelta:
    return CounterDelta("alice", "*", period, requests, 10 * requests, cost, "2026-12-01T00:00:00Z")


async def test_counter_additions_from_two_connections_are_atomic(
    store: Store, store_database: Path | DatabaseUrl
) -> None:
    async with await open_store(store_database) as other:
        await asyncio.gather(
            *(s.add_policy_counts([_delta(1, 100)]) for _ in range(10) for s in (store, other))
        )
    (row,) = await store.read_policy_counters(["day:2026-11-29"])
    assert (row.requests, row.tokens, row.cost_micros) == (20, 200, 2000)
    (after,) = await store.add_policy_counts([_delta(1, 1)])
    assert (after.requests, after.cost_micros) == (21, 2001)  # RETURNING: the total after


async def test_expired_counters_are_purged(store: Store) -> None:
    await store.add_policy_counts([_delta(1, 1), _delta(1, 1, "minute:2026-11-29T10:00")])
    assert await store.purge_policy_counters("2026-12-01T00:00:01Z") == 2
    assert await store.read_policy_counters(["day:2026-11-29"]) == []


async def test_a_reload_reads_the_policies(store: Store) -> None:
    await store.set_policy(Policy(rpm=3))
    state = await store.routing_state(RecordCache())
    assert [p.rpm for p in state.policies] == [3]


async def test_a_budget_set_mid_period_counts_the_recorded_spend_since_it_began(
    store: Store,
) -> None:
    now = datetime.now(UTC)
    today, long_ago = f"{now:%Y-%m-%dT%H:%M:%S.000Z}", "2001-01-01T00:00:00.000Z"
    await store.insert_interceptions(
        [
            interception("r1", today, cost_micros=1500),
            interception("r2", today, cost_micros=500, provider_name="other"),
            interception("r3", long_ago, cost_micros=9999),
            interception("r4", today, initiator="bob", cost_micros=7),
        ]
    )
    await store.set_policy(Policy(user="alice", max_cost_usd=Decimal(1), period="day"))
    await store.set_policy(Policy(provider="other", max_tokens=10**6, period="month"))
    rows = await store.read_policy_counters([period_key("day", now), period_key("month", now)])
    counted = {(r.subject, r.scope, r.period[:3]): (r.tokens, r.cost_micros) for r in rows}
    assert counted[("alice", "*", "day")] == (620, 2000)  # r1 and r2, every provider
    assert counted[("alice", "other", "mon")] == (310, 500)  # the default for provider other
    assert ("bob", "*", "day") not in counted  # alice's budget counts alice only
    # Counted already: a later change of the policy does not count the records again.
    await store.set_policy(Policy(user="alice", max_cost_usd=Decimal(2), period="day"))
    rows = await store.read_policy_counters([period_key("day", now)])
    alice = [(r.tokens, r.cost_micros) for r in rows if (r.subject, r.scope) == ("alice", "*")]
    assert alice == [(620, 2000)]


async def test_a_budget_after_a_rate_only_policy_still_counts_the_spend_before_it(
    store: Store,
) -> None:
    """Attacker review: counters started by an earlier policy (counting only from then on)
    kept a later budget from counting the spend recorded before them."""
    now = datetime.now(UTC)
    today = f"{now:%Y-%m-%dT%H:%M:%S.000Z}"
    await store.insert_interceptions([interception("r1", today, cost_micros=1500)])
    # Counting began after r1 (a rate-only policy): the replicas counted one later request.
    await store.add_policy_counts([_delta(1, 250, period_key("day", now))])
    await store.set_policy(Policy(user="alice", max_cost_usd=Decimal(1), period="day"))
    rows = await store.read_policy_counters([period_key("day", now)])
    (alice,) = [r for r in rows if (r.subject, r.scope) == ("alice", "*")]
    assert alice.cost_micros == 1500  # the larger: the records cover the whole day


def interception(request_id: str, started_at: str, **fields: Any) -> InterceptionRecord:
    values: dict[str, Any] = {
        "request_id": request_id, "connect_id": "c", "initiator": "alice", "provider": "openai",
        "provider_type": "openai", "model": "o3", "client": "Codex", "method": "POST",
        "path": "/v1/responses", "status": 200, "streamed": False, "input_tokens": 10,
        "output_tokens": 300, "cache_read_input_tokens": 0, "cache_creation_input_tokens": None,
        "reasoning_output_tokens": None, "provider_name": "openai-main", "user_agent": "t",
        "credential_kind": "central", "credential_hint": None, "started_at": started_at,
        "ended_at": started_at, "ttfb_ms": 1.5, "duration_ms": 2.5, "error": None,
    }  # fmt: skip
    values.update(fields)
    return InterceptionRecord(**values)


async def test_a_counter_saturates_instead_of_overflowing_64_bits(store: Store) -> None:
    """An upstream that reports absurd usage (10**12 tokens, ``usage.MAX_TOKEN_COUNT``, priced
    at o1-pro's rate: 1.05e15 micros a request) overflows a 64-bit sum after ~9,000 requests.
    PostgreSQL then failed the sync of every user's deltas ("bigint out of range"), on every
    sync after it; SQLite turned the counter into a float. It stays at its cap instead."""
    huge = CounterDelta(
        "alice", "*", "day:2026-11-29", 1, 2**63 - 1, 2**63 - 1, "2026-12-01T00:00:00Z"
    )
    (first,) = await store.add_policy_counts([huge])
    other = CounterDelta("bob", "*", "day:2026-11-29", 1, 10, 5, "2026-12-01T00:00:00Z")
    second, bobs = await store.add_policy_counts([huge, other])
    assert second.tokens == second.cost_micros == first.tokens == COUNTER_CAP
    assert isinstance(second.tokens, int) and second.requests == 2
    assert (bobs.requests, bobs.cost_micros) == (1, 5)
    totals = await store.read_policy_counters(["day:2026-11-29"])
    assert sorted(r.tokens for r in totals) == [10, COUNTER_CAP]
