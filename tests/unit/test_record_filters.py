"""The data API's ``q`` filter: terms read into an ``InterceptionFilter``, errors naming the
term, and a proxy token held to its own records."""

from __future__ import annotations

import pytest

from aibridgeproxyd.model import InterceptionFilter
from aibridgeproxyd.web.auth import Principal
from aibridgeproxyd.web.problems import ApiError
from aibridgeproxyd.web.record_filters import MAX_QUERY_LENGTH, parse_terms, record_filter

ADMIN = Principal("admin", "ops")
ALICE = Principal("proxy", "alice")


def test_every_key_sets_its_filter_field_and_provider_is_the_type() -> None:
    q = (
        'initiator:bob provider:openai provider_name:corp model:o3 client:"Claude Code" '
        "session_id:s1 started_after:2026-01-01 started_before:2026-01-02T10:00:00+02:00"
    )
    assert record_filter(q, ADMIN, 7) == InterceptionFilter(
        initiator="bob", provider_type="openai", provider_name="corp", model="o3",
        client="Claude Code", session_id="s1", started_after="2026-01-01T00:00:00.000Z",
        started_before="2026-01-02T08:00:00.000Z", limit=7,
    )  # fmt: skip


def test_initiator_me_is_the_caller() -> None:
    assert record_filter("initiator:me", ADMIN).initiator == "ops"
    assert record_filter("initiator:me", ALICE).initiator == "alice"


def test_a_proxy_token_is_held_to_its_own_records() -> None:
    assert record_filter("", ALICE).initiator == "alice"
    assert record_filter("initiator:alice model:o3", ALICE).initiator == "alice"
    with pytest.raises(ApiError) as refused:
        record_filter("initiator:bob", ALICE)
    assert refused.value.status == 403
    assert record_filter("", Principal("auditor", "audit")).initiator is None


@pytest.mark.parametrize(
    ("q", "words"),
    [
        ("colour:red", "unknown key 'colour'"),
        ("model", "term 'model' is not key:value"),
        ("model:a model:b", "key 'model' is given twice"),
        ("model:", "model: the value is empty"),
        ('client:"Claude Code', "quotation"),
        ("client:Emacs", "client 'Emacs' is not one of"),
        ("started_after:yesterday", "started_after: invalid timestamp 'yesterday'"),
        ("started_before:2026-01-01T00:00:00", "a time zone is required"),
        ("started_after:0001-01-01T00:00:00+14:00", "started_after:"),
        ("x" * (MAX_QUERY_LENGTH + 1), "longer than"),
    ],
)
def test_a_bad_term_is_a_400_naming_q_and_the_term(q: str, words: str) -> None:
    with pytest.raises(ApiError) as refused:
        parse_terms(q)
    assert refused.value.status == 400
    assert words in refused.value.message
    assert [field for field, _ in refused.value.validations] == ["q"]
