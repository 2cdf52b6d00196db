"""The policies' management layer (``management``'s policies section, which the API, the
dashboard and the CLI share) on a real store, on SQLite and on PostgreSQL
(``tests/store_engines.py``): create-or-replace, conflicts, PATCH semantics, errors naming the
field, and the users' reports with the shared counters read back."""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from aibridgeproxyd import management
from aibridgeproxyd.database_url import DatabaseUrl
from aibridgeproxyd.management import Conflict, InvalidInput, NotFound
from aibridgeproxyd.policy import Policy
from aibridgeproxyd.store import CounterDelta, Store
from tests.store_engines import open_store


@pytest.fixture
async def store(store_database: Path | DatabaseUrl) -> AsyncIterator[Store]:
    async with await open_store(store_database) as opened:
        yield opened


async def test_put_creates_then_replaces_whole_and_says_which(store: Store) -> None:
    view, created = await management.put_policy(store, Policy(user="alice", rpm=5, tpm=900))
    assert created and (view["rpm"], view["tpm"]) == (5, 900)
    view, created = await management.put_policy(store, Policy(user="alice", rpm=7))
    assert not created and (view["rpm"], view["tpm"]) == (7, None)
    assert await management.list_policies(store) == [view]


async def test_create_refuses_an_existing_policy_as_a_conflict(store: Store) -> None:
    await management.create_policy(store, Policy(provider="openai", models=("gpt-4o*",)))
    with pytest.raises(Conflict, match="default policy at provider 'openai'"):
        await management.create_policy(store, Policy(provider="openai", rpm=1))
    assert (await management.get_policy(store, None, "openai"))["rpm"] is None


async def test_update_changes_named_limits_clears_nulls_and_keeps_the_rest(store: Store) -> None:
    budget = Policy(user="bob", max_cost_usd=Decimal(10), period="day", rpm=5)
    await management.put_policy(store, budget)
    view = await management.update_policy(store, "bob", None, {"rpm": None, "models": ["c-*"]})
    assert (view["max_cost_usd"], view["period"], view["rpm"], view["models"]) == (
        "10",
        "day",
        None,
        ["c-*"],
    )


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"max_tokens": None}, "period"),  # the period would be left without a budget
        ({"rpm": 0}, "rpm"),
        ({"user": "mallory"}, "user"),  # not a limit: the key is not changed by a PATCH
        ({"colour": "red"}, "colour"),
    ],
)
async def test_an_update_refused_names_the_field_and_writes_nothing(
    store: Store, changes: dict[str, Any], field: str
) -> None:
    await management.put_policy(store, Policy(user="bob", max_tokens=10, period="week"))
    with pytest.raises(InvalidInput) as refused:
        await management.update_policy(store, "bob", None, changes)
    assert refused.value.field == field
    assert (await management.get_policy(store, "bob", None))["max_tokens"] == 10


async def test_missing_policies_are_not_found_by_their_key(store: Store) -> None:
    for action in (
        management.get_policy(store, "carol", None),
        management.delete_policy(store, None, "anthropic"),
        management.update_policy(store, "carol", "openai", {"rpm": 1}),
    ):
        with pytest.raises(NotFound):
            await action


async def test_reports_cover_every_token_and_policy_user_with_spend_read_once(
    store: Store,
) -> None:
    await store.insert_token("alice", "hash-a")
    await management.put_policy(store, Policy(rpm=60))
    own = Policy(user="zed", max_cost_usd=Decimal(2), period="month")
    await management.put_policy(store, own)
    reports = await management.budget_reports(store)
    assert [r["user"] for r in reports] == ["alice", "zed"]
    assert reports[0]["scopes"][0]["sources"] == {"rpm": "default"}
    (spend,) = [s["spend"] for s in reports[1]["scopes"]]
    assert (spend["cost_usd"], spend["remaining_cost_usd"]) == ("0", "2")


async def test_a_report_for_a_name_no_token_can_have_is_refused_naming_user(
    store: Store,
) -> None:
    with pytest.raises(InvalidInput) as refused:
        await management.user_report(store, "<b>x</b>")
    assert refused.value.field == "user" and "invalid user" in str(refused.value)


async def test_a_users_report_counts_the_shared_counters(store: Store) -> None:
    await management.put_policy(store, Policy(user="amy", max_tokens=1000, period="day"))
    report = await management.user_report(store, "amy")
    period = report["scopes"][0]["spend"]
    key = "day:" + period["period_start"][:10]
    await store.add_policy_counts([CounterDelta("amy", "*", key, 1, 400, 0, "9999")])
    spend = (await management.user_report(store, "amy"))["scopes"][0]["spend"]
    assert (spend["tokens"], spend["remaining_tokens"], spend["fraction_used"]) == (400, 600, 0.4)


async def test_the_requests_without_a_token_are_reported_last_when_asked(store: Store) -> None:
    await store.insert_token("alice", "hash-a")
    await management.put_policy(store, Policy(max_tokens=500, period="week"))
    reports = await management.budget_reports(store, anonymous=True)
    assert [r["user"] for r in reports] == ["alice", ""]
    assert reports[1]["scopes"][0]["sources"] == {"budget": "default"}
    assert [r["user"] for r in await management.budget_reports(store)] == ["alice"]
