"""Policies: validation names the bad field, resolution follows the documented precedence
(docs/policies.md), and UTC calendar periods start where the calendar says."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from aibridgeproxyd.policy import (
    Policy,
    PolicyError,
    index_policies,
    model_allowed,
    period_end,
    period_key,
    period_start,
    resolve,
    validate_policy,
)


def _index(*policies: Policy) -> dict[tuple[str, str], Policy]:
    return index_policies(validate_policy(p) for p in policies)


@pytest.mark.parametrize(
    ("policy", "field"),
    [
        (Policy(user="bad name", rpm=1), "user"),
        (Policy(provider="Open AI", rpm=1), "provider"),
        (Policy(max_cost_usd=Decimal("-1"), period="day"), "max_cost_usd"),
        (Policy(max_cost_usd="lots", period="day"), "max_cost_usd"),  # type: ignore[arg-type]
        (Policy(max_cost_usd=Decimal("NaN"), period="day"), "max_cost_usd"),
        (Policy(max_cost_usd=Decimal(5)), "period"),
        (Policy(rpm=5, period="day"), "period"),
        (Policy(max_tokens=5, period="year"), "period"),  # type: ignore[arg-type]
        (Policy(rpm=0), "rpm"),
        (Policy(tpm=True), "tpm"),
        (Policy(max_parallel=1.5), "max_parallel"),  # type: ignore[arg-type]
        (Policy(models=()), "models"),
        (Policy(models=(" gpt-4o",)), "models"),
        (Policy(models="gpt-*"), "models"),  # type: ignore[arg-type]
        (Policy(user="alice"), "policy"),
    ],
)
def test_invalid_policy_is_refused_naming_the_field(policy: Policy, field: str) -> None:
    with pytest.raises(PolicyError) as caught:
        validate_policy(policy)
    assert caught.value.field == field


def test_valid_policy_is_normalised() -> None:
    policy = validate_policy(
        Policy(user="alice", max_cost_usd="2.50", period="week", models=("a*", "a*", "b"))  # type: ignore[arg-type]
    )
    assert policy.max_cost_usd == Decimal("2.50")
    assert policy.models == ("a*", "b")
    assert policy.key == ("alice", "*")
    assert Policy(provider="openai", rpm=1).key == ("*", "openai")


def test_a_user_without_policies_falls_under_the_default() -> None:
    index = _index(Policy(rpm=10, max_cost_usd=Decimal(1), period="day"))
    (scope,) = resolve(index, "bob").scopes
    assert scope.rpm == 10
    assert scope.budget is not None and scope.budget.max_cost_micros == 1_000_000
    assert dict(scope.sources) == {"rpm": "default", "budget": "default"}


def test_a_users_own_value_replaces_the_defaults_even_when_looser() -> None:
    index = _index(Policy(rpm=10, tpm=1000), Policy(user="alice", rpm=100))
    (scope,) = resolve(index, "alice").scopes
    assert (scope.rpm, scope.tpm) == (100, 1000)
    assert dict(scope.sources) == {"rpm": "user", "tpm": "default"}


def test_a_users_budget_replaces_the_default_budget_whole() -> None:
    index = _index(
        Policy(max_cost_usd=Decimal(1), period="day"),
        Policy(user="alice", max_tokens=500, period="month"),
    )
    (scope,) = resolve(index, "alice").scopes
    assert scope.budget is not None
    assert (scope.budget.period, scope.budget.max_cost_micros, scope.budget.max_tokens) == (
        "month",
        None,
        500,
    )


def test_provider_policies_add_a_scope_for_that_provider_only() -> None:
    index = _index(
        Policy(rpm=100),
        Policy(provider="openai", rpm=5, models=("gpt-4o*",)),
        Policy(user="alice", provider="openai", rpm=7),
    )
    everywhere, at_openai = resolve(index, "alice", "openai").scopes
    assert (everywhere.provider, everywhere.rpm) == (None, 100)
    assert (at_openai.provider, at_openai.rpm, at_openai.models) == ("openai", 7, ("gpt-4o*",))
    assert [s.provider for s in resolve(index, "alice", "anthropic").scopes] == [None]


def test_no_policy_means_no_scope() -> None:
    assert resolve({}, "alice", "openai").scopes == ()


def test_a_request_without_a_token_gets_only_the_default() -> None:
    index = _index(Policy(rpm=3), Policy(user="alice", rpm=300))
    (scope,) = resolve(index, "").scopes
    assert scope.rpm == 3


def test_a_model_must_match_every_allow_list_in_force() -> None:
    index = _index(
        Policy(models=("gpt-*", "claude-*")), Policy(provider="openai", models=("gpt-4o*",))
    )
    scopes = resolve(index, "alice", "openai").scopes
    assert model_allowed(scopes, "gpt-4o-mini")
    assert not model_allowed(scopes, "gpt-3.5-turbo")
    assert not model_allowed(scopes, "claude-3")
    assert not model_allowed(scopes, None)
    assert model_allowed(resolve(index, "alice", "anthropic").scopes, "claude-3")
    assert model_allowed((), None)


def test_periods_follow_the_utc_calendar() -> None:
    now = datetime(2026, 12, 31, 23, 59, 30, tzinfo=UTC)  # a Thursday
    assert period_start("minute", now) == datetime(2026, 12, 31, 23, 59, tzinfo=UTC)
    assert period_start("week", now) == datetime(2026, 12, 28, tzinfo=UTC)
    assert period_end("day", now) == datetime(2027, 1, 1, tzinfo=UTC)
    assert period_end("week", now) == datetime(2027, 1, 4, tzinfo=UTC)
    assert period_end("month", now) == datetime(2027, 1, 1, tzinfo=UTC)
    assert period_end("minute", now) == datetime(2027, 1, 1, tzinfo=UTC)
    assert [period_key(p, now) for p in ("minute", "day", "week", "month")] == [
        "minute:2026-12-31T23:59",
        "day:2026-12-31",
        "week:2026-12-28",
        "month:2026-12",
    ]


@pytest.mark.parametrize("typed", ["1.1234567", "1e-7", "0.0000001"])
def test_a_budget_finer_than_a_millionth_of_a_dollar_is_refused(typed: str) -> None:
    """Newcomer review: the CLI and the dashboard took what the API refused."""
    with pytest.raises(PolicyError, match="6 decimal places") as refused:
        validate_policy(Policy(user="bob", max_cost_usd=Decimal(typed), period="day"))
    assert refused.value.field == "max_cost_usd"


def test_a_budget_in_scientific_notation_is_stored_as_plain_decimal_text() -> None:
    checked = validate_policy(Policy(user="bob", max_cost_usd=Decimal("1E+2"), period="day"))
    assert checked.to_json()["max_cost_usd"] == "100"
