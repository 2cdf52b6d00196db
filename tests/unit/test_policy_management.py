"""The policies' management layer (``management``'s policies section) on a real store in a
temporary directory, and the Policies page's pure parts (``web.policy_form``): the form read
into a policy, a stored policy shown in it again, reports as spend rows, dollars as text; and
who may read which user's report (``web.api_policies.own_user``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from aibridgeproxyd import management
from aibridgeproxyd.management import Conflict, InvalidInput, NotFound
from aibridgeproxyd.policy import Policy
from aibridgeproxyd.store import CounterDelta, Store
from aibridgeproxyd.web.api_policies import own_user
from aibridgeproxyd.web.auth import Principal
from aibridgeproxyd.web.policy_form import (
    SpendRow,
    dollars,
    form_values,
    policy_from_form,
    spend_rows,
)
from aibridgeproxyd.web.problems import ApiError
from aibridgeproxyd.web.provider_form import FormProblem


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with await Store.open(tmp_path / "db.sqlite") as opened:
        yield opened


# --- management ---------------------------------------------------------------------------------


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


# --- who reads a report --------------------------------------------------------------------------


def test_me_is_the_caller_and_a_proxy_token_may_name_no_one_else() -> None:
    alice = Principal("proxy", "alice")
    assert own_user(alice, "me") == own_user(alice, "alice") == "alice"
    with pytest.raises(ApiError) as refused:
        own_user(alice, "bob")
    assert refused.value.status == 403
    assert own_user(Principal("auditor", "watcher"), "bob") == "bob"


# --- the form --------------------------------------------------------------------------------------


def form(**fields: str) -> dict[str, str]:
    return {"user": "", "provider": "", "period": "", **fields}


def test_empty_user_or_star_is_the_default_and_empty_fields_do_not_limit() -> None:
    for user in ("", "*", "  "):
        policy = policy_from_form(form(user=user, rpm="60"))
        assert (policy.user, policy.provider, policy.rpm, policy.tpm) == (None, None, 60, None)
        assert policy.max_cost_usd is None and policy.models is None


def test_the_form_reads_amounts_counts_and_models_as_people_type_them() -> None:
    policy = policy_from_form(
        form(
            user=" alice ",
            provider="openai",
            max_cost_usd="$1,250.50",
            max_tokens="2 000 000",
            period="month",
            models="gpt-4o*, o3-*\nclaude-*,,",
            tpm="100_000",
            max_parallel="4",
        )
    )
    assert (policy.user, policy.provider, policy.period) == ("alice", "openai", "month")
    assert policy.max_cost_usd == Decimal("1250.50") and policy.max_tokens == 2_000_000
    assert policy.models == ("gpt-4o*", "o3-*", "claude-*")
    assert (policy.tpm, policy.max_parallel) == (100_000, 4)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"max_cost_usd": "ten"}, "max_cost_usd"),
        ({"max_cost_usd": "NaN"}, "max_cost_usd"),
        ({"rpm": "lots"}, "rpm"),
        ({"tpm": "1.5"}, "tpm"),
        ({"max_parallel": "-2"}, "max_parallel"),
        ({"max_tokens": "١٢"}, "max_tokens"),  # digits, but not ASCII ones
        ({"models": "x" * 40_000}, "models"),
    ],
)
def test_a_value_that_is_not_a_number_names_its_field(fields: dict[str, str], field: str) -> None:
    with pytest.raises(FormProblem) as refused:
        policy_from_form(form(**fields))
    assert refused.value.field == field


def test_a_stored_policy_fills_the_form_and_reads_back_the_same() -> None:
    stored = Policy(
        user="alice",
        provider="openai",
        max_cost_usd=Decimal("5.50"),
        period="week",
        models=("gpt-4o*", "o3-*"),
        rpm=1000,
    )
    values = form_values(stored.to_json())
    assert values["models"] == "gpt-4o*, o3-*" and values["max_cost_usd"] == "5.50"
    assert values["tpm"] == "" and values["user"] == "alice"
    assert policy_from_form(values) == stored
    assert form_values(Policy(rpm=1).to_json())["user"] == ""
    assert set(form_values(None).values()) == {""}


# --- the spend table -------------------------------------------------------------------------------


def scope(fraction: float | None, provider: str | None = None) -> dict[str, Any]:
    spend = None if fraction is None else {"fraction_used": fraction}
    return {
        "provider": provider,
        "budget": None if fraction is None else {"period": "day"},
        "spend": spend,
        "models": ["a-*"],
        "rpm": 5,
        "tpm": None,
        "max_parallel": None,
        "sources": {"rpm": "default"},
    }


def test_every_scope_is_a_row_and_a_user_without_one_still_has_a_row() -> None:
    rows = spend_rows(
        [
            {"user": "alice", "scopes": [scope(0.5), scope(None, "openai")]},
            {"user": "bob", "scopes": []},
        ]
    )
    assert [(r.user, r.provider) for r in rows] == [
        ("alice", None),
        ("alice", "openai"),
        ("bob", None),
    ]
    assert rows[0].models == ("a-*",) and rows[1].percent == "" and rows[2].sources == {}


@pytest.mark.parametrize(
    ("fraction", "percent", "level"),
    [
        (0.0, "0%", "ok"),
        (0.004, "<1%", "ok"),
        (0.849, "85%", "ok"),
        (0.85, "85%", "warn"),
        (0.999, "100%", "warn"),
        (1.0, "100%", "over"),
        (1.234, "123%", "over"),
    ],
)
def test_the_share_used_shows_as_a_percentage_and_a_level(
    fraction: float, percent: str, level: str
) -> None:
    (row,) = spend_rows([{"user": "u", "scopes": [scope(fraction)]}])
    assert isinstance(row, SpendRow)
    assert (row.percent, row.level) == (percent, level)


@pytest.mark.parametrize(
    ("amount", "text"),
    [
        ("0", "$0.00"),
        ("0.4", "$0.40"),
        ("0.0042", "$0.0042"),
        ("12.5", "$12.50"),
        ("1250.505", "$1,250.50"),
        (None, ""),
    ],
)
def test_dollars_show_cents_unless_that_hides_a_small_amount(amount: str | None, text: str) -> None:
    assert dollars(amount) == text
