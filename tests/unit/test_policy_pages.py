"""The Policies page's pure parts (``web.policy_form``): the form read into a policy, a stored
policy shown in it again, reports as spend rows, dollars as text; and who may read which
user's report (``web.api_policies.own_user``). The management functions under them run on both
store engines in tests/test_management_policies.py."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from aibridgeproxyd.policy import Policy
from aibridgeproxyd.web.api_policies import own_user
from aibridgeproxyd.web.auth import Principal
from aibridgeproxyd.web.pages import TEMPLATES
from aibridgeproxyd.web.policy_form import (
    LABELS,
    SpendRow,
    dollars,
    form_values,
    policy_from_form,
    spend_rows,
)
from aibridgeproxyd.web.policy_pages import describe
from aibridgeproxyd.web.problems import ApiError
from aibridgeproxyd.web.provider_form import FormProblem

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


# --- the template ----------------------------------------------------------------------------------


def rendered(reports: list[dict[str, Any]], policies: list[dict[str, Any]], admin: bool) -> str:
    """The Policies page's HTML as ``policy_pages`` renders it (no request needed)."""
    return TEMPLATES.get_template("policies.html").render(
        principal=Principal("admin" if admin else "auditor", "ops"),
        csrf_field="csrf_token",
        csrf_token="t",
        navigation=[],
        flash={"notice": "", "warnings": []},
        rows=spend_rows(reports),
        policies=policies,
        providers=["openai"],
        values=form_values(None),
        labels=LABELS,
        invalid="",
        error="",
        dollars=dollars,
        describe=describe,
        query=lambda p: "user=x",
    )


def test_a_budget_of_cost_and_tokens_shows_both_spent_and_both_left() -> None:
    budget = {"period": "day", "max_cost_usd": "10", "max_tokens": 50000}
    spend = {
        "fraction_used": 0.25,
        "cost_usd": "2.5",
        "tokens": 12000,
        "remaining_cost_usd": "7.5",
        "remaining_tokens": 38000,
        "period_end": "2026-12-01T00:00:00Z",
    }
    report = {"user": "alice", "scopes": [{**scope(0.25), "budget": budget, "spend": spend}]}
    html = rendered([report], [], admin=False)
    assert "$2.50 and 12,000 tokens" in html and "$7.50 and 38,000 tokens left" in html
    assert "$10.00 and 50,000 tokens per day" in html
    assert 'id="set-policy"' not in html  # an auditor gets no form


def test_the_requests_without_a_token_have_a_row_of_their_own() -> None:
    html = rendered([{"user": "", "scopes": [scope(None)]}], [], admin=True)
    assert "<em>no proxy token</em>" in html


def test_markup_in_a_model_pattern_is_text_on_the_page() -> None:
    hostile = '<img src=x onerror="alert(1)">'
    policy = Policy(user="alice", models=(hostile,)).to_json()
    report = {"user": "alice", "scopes": [{**scope(None), "models": [hostile]}]}
    html = rendered([report], [policy], admin=True)
    assert hostile not in html and "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in html
    assert 'id="set-policy"' in html
