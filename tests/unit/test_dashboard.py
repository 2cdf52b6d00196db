"""The dashboard's pure parts: CSRF tokens and the cross-site check (dashboard_session), the
provider form of each type and what a submitted form asks (provider_form), the session filter
of the Sessions page (record_pages) and the Usage charts (charts). The pages themselves run in
a real browser in tests/test_e2e_dashboard.py."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from starlette.requests import Request

from aibridgeproxyd import providers
from aibridgeproxyd.management import KeyChange
from aibridgeproxyd.model import NAME_PATTERN
from aibridgeproxyd.web import charts, dashboard_session, flash, pages, provider_form, record_pages
from aibridgeproxyd.web.auth import Principal
from aibridgeproxyd.web.problems import ApiError
from aibridgeproxyd.web.provider_form import FormProblem


def request(headers: dict[str, str], scheme: str = "http") -> Request:
    raw = [(name.lower().encode(), value.encode()) for name, value in headers.items()]
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/tokens",
        "headers": raw,
        "scheme": scheme,
        "server": ("127.0.0.1", 8889),
        "query_string": b"",
    }
    return Request(scope)


# --- CSRF and origin ----------------------------------------------------------------------------


def test_the_csrf_token_is_bound_to_the_session_token() -> None:
    token = dashboard_session.csrf_token("abp_one")
    assert len(token) == 64 and token == dashboard_session.csrf_token("abp_one")
    assert dashboard_session.csrf_matches("abp_one", token)
    assert not dashboard_session.csrf_matches("abp_two", token)
    assert not dashboard_session.csrf_matches("abp_one", None)
    assert not dashboard_session.csrf_matches("abp_one", "")


@pytest.mark.parametrize(
    ("headers", "cross"),
    [
        ({"host": "127.0.0.1:8889"}, False),
        ({"host": "127.0.0.1:8889", "origin": "http://127.0.0.1:8889"}, False),
        ({"host": "127.0.0.1:8889", "sec-fetch-site": "same-origin"}, False),
        ({"host": "127.0.0.1:8889", "origin": "https://evil.example"}, True),
        ({"host": "127.0.0.1:8889", "origin": "null"}, True),
        ({"host": "127.0.0.1:8889", "sec-fetch-site": "cross-site"}, True),
        ({"host": "127.0.0.1:8889", "sec-fetch-site": "same-site"}, True),
        # Our own form under Referrer-Policy: no-referrer: Origin null, Sec-Fetch-Site says.
        ({"host": "127.0.0.1:8889", "origin": "null", "sec-fetch-site": "same-origin"}, False),
        (
            {
                "host": "127.0.0.1:8889",
                "origin": "http://127.0.0.1:8889",
                "sec-fetch-site": "cross-site",
            },
            True,
        ),
    ],
)
def test_a_request_from_another_origin_is_cross_site(headers: dict[str, str], cross: bool) -> None:
    assert dashboard_session.cross_site(request(headers)) is cross


def test_the_session_cookie_is_secure_only_under_tls() -> None:
    plain = dashboard_session.cookie_settings(request({"host": "a"}))
    tls = dashboard_session.cookie_settings(request({"host": "a"}, scheme="https"))
    assert (plain["httponly"], plain["samesite"], plain["secure"]) == (True, "strict", False)
    assert tls["secure"] is True


# --- provider forms ----------------------------------------------------------------------------


def test_bedrock_shows_its_credential_settings_and_no_base_url_or_keys() -> None:
    form = provider_form.type_form("bedrock")
    names = [field.name for field in form.settings]
    assert names[:5] == ["region", "access_key_id", "secret_access_key", "session_token", "model"]
    assert "small_fast_model" in names
    kinds = {field.name: field.kind for field in form.settings}
    assert (
        kinds["secret_access_key"] == kinds["session_token"] == kinds["access_key_id"] == "secret"
    )
    assert kinds["region"] == kinds["model"] == "text"
    assert (form.base_url, form.keys) == (False, False)


def test_azure_needs_a_base_url_and_takes_keys_api_version_and_deployments() -> None:
    form = provider_form.type_form("azure")
    assert (form.base_url, form.base_url_required, form.keys) == (True, True, True)
    assert [(f.name, f.kind) for f in form.settings] == [
        ("api_version", "text"),
        ("deployments", "json"),
    ]


def test_an_openai_form_has_its_default_base_url_and_hosts_and_no_settings() -> None:
    form = provider_form.type_form("openai")
    assert (form.base_url_required, form.keys, form.settings) == (False, True, ())
    assert form.default_base_url.startswith("https://")
    assert form.default_hosts == ("api.openai.com",)


def test_an_unknown_type_is_a_form_problem_naming_the_field() -> None:
    with pytest.raises(FormProblem) as raised:
        provider_form.type_form("nope")
    assert raised.value.field == "type"


def test_a_wildcard_host_is_refused_in_words_the_dashboard_can_show() -> None:
    # The dashboard, the API and the configuration seed show this message too: no CLI flag.
    with pytest.raises(ValueError, match="wildcards are not supported") as refused:
        providers.normalize_host("*.corp.example")
    assert "--host" not in str(refused.value) and "api.example.com" in str(refused.value)


def test_a_new_provider_takes_the_typed_fields_and_one_key() -> None:
    record = provider_form.new_record(
        {
            "type": "azure",
            "name": "corp",
            "base_url": " https://corp.openai.azure.com ",
            "hosts": "corp.openai.azure.com\napi.openai.com",
            "enabled": "on",
            "new_api_key": "k-1",
            "setting_api_version": "2024-10-21",
            "setting_deployments": '{"gpt-4o": "prod"}',
        }
    )
    assert (record.name, record.base_url, record.keys) == (
        "corp",
        "https://corp.openai.azure.com",
        ("k-1",),
    )
    assert record.hosts == ("corp.openai.azure.com", "api.openai.com")
    assert (record.enabled, record.allow_byok) == (True, False)
    assert record.settings == {"api_version": "2024-10-21", "deployments": {"gpt-4o": "prod"}}


def test_a_setting_that_is_not_json_names_its_field() -> None:
    with pytest.raises(FormProblem) as raised:
        provider_form.new_record({"type": "azure", "name": "x", "setting_deployments": "{nope"})
    assert raised.value.field == "setting_deployments"


def view(**fields: Any) -> dict[str, Any]:
    base = {
        "name": "p",
        "type": "openai",
        "base_url": "https://api.openai.com/v1",
        "hosts": ["api.openai.com"],
        "api_keys": [{"id": "a1"}, {"id": "b2"}],
        "settings": {},
    }
    return {**base, **fields}


def test_an_edit_keeps_unticked_keys_by_id_and_adds_a_typed_one() -> None:
    form = {
        "remove_key_b2": "on",
        "new_api_key": "sk-new",
        "base_url": "https://api.openai.com/v1",
        "hosts": "api.openai.com",
    }
    patch = provider_form.provider_patch(form, view())
    assert patch.api_keys == [KeyChange(id="a1"), KeyChange(api_key="sk-new")]
    # Unchanged base_url and hosts are not sent: the type's defaults stay defaults.
    assert (patch.base_url, patch.hosts) == (None, None)


def test_an_edit_replaces_a_secret_only_when_typed_and_removes_an_emptied_setting() -> None:
    current = view(
        type="bedrock", api_keys=[], settings={"region": "us-east-1", "secret_access_key": "***"}
    )
    untouched = provider_form.provider_patch({"setting_region": ""}, current)
    assert untouched.settings is not None
    assert "secret_access_key" not in untouched.settings
    assert untouched.settings["region"] is None
    assert untouched.api_keys is None
    typed = provider_form.provider_patch({"setting_secret_access_key": "new"}, current)
    assert typed.settings is not None and typed.settings["secret_access_key"] == "new"


# --- sessions filter ---------------------------------------------------------------------------


def test_the_page_filter_is_read_by_the_data_apis_q_parser() -> None:
    admin = Principal("admin", "ops")
    query, shown = record_pages.record_query(
        {"initiator": " alice ", "started_after": "2026-11-29", "model": "", "client": "Codex"},
        admin,
    )
    assert (query.initiator, query.model, query.client) == ("alice", None, "Codex")
    assert query.started_after is not None and query.started_after.startswith("2026-11-29T00:00")
    assert shown["initiator"] == "alice"
    with pytest.raises(ApiError) as raised:
        record_pages.record_query({"started_before": "yesterday"}, admin)
    assert "started_before" in raised.value.validations[0][1]


def test_a_refused_filter_is_named_by_its_label() -> None:
    # The page's fields are labelled From and To; the message named started_after, a word the
    # page never shows.
    admin = Principal("admin", "ops")
    with pytest.raises(ApiError) as raised:
        record_pages.record_query({"started_after": "yesterday"}, admin)
    text = record_pages.problem_text(raised.value)
    assert text.startswith("From: invalid timestamp 'yesterday'") and "started_after" not in text


def test_a_value_with_spaces_and_quotes_stays_one_value() -> None:
    query, _ = record_pages.record_query(
        {"client": "Claude Code", "model": 'it\'s "odd" model'}, Principal("auditor", "a")
    )
    assert (query.client, query.model) == ("Claude Code", 'it\'s "odd" model')


# --- charts -------------------------------------------------------------------------------------


def test_bars_are_sorted_largest_first_and_scaled_to_the_largest() -> None:
    rows = [{"key": "small", "n": 10}, {"key": "big", "n": 40}, {"key": None, "n": 0}]
    chart = charts.bar_chart("t", rows, lambda row: row["n"], str)
    assert [bar.label for bar in chart.bars] == ["big", "small", "(none)"]
    big, small, none = chart.bars
    assert small.width == pytest.approx(big.width / 4)
    assert none.width == 0
    assert not chart.empty and chart.height > 0


def test_columns_keep_the_time_order() -> None:
    rows = [{"key": f"2026-11-{day:02d}", "n": day} for day in range(1, 4)]
    chart = charts.bar_chart("t", rows, lambda row: row["n"], str, vertical=True)
    assert [bar.label for bar in chart.bars] == ["2026-11-01", "2026-11-02", "2026-11-03"]
    assert chart.bars[0].x < chart.bars[1].x < chart.bars[2].x
    assert chart.bars[2].height > chart.bars[0].height


def test_many_names_are_capped_with_the_rest_summed_as_other() -> None:
    rows = [{"key": f"m{i}", "n": 100 - i} for i in range(40)]
    chart = charts.bar_chart("t", rows, lambda row: row["n"], str)
    assert len(chart.bars) == charts.MAX_BARS
    assert chart.bars[-1].label == "other"
    assert chart.bars[-1].value_text == str(sum(100 - i for i in range(charts.MAX_BARS - 1, 40)))


def test_an_empty_chart_is_empty() -> None:
    assert charts.bar_chart("t", [], lambda row: 0, str).empty


def test_usage_tokens_count_cache_reads_and_writes_as_budgets_do() -> None:
    # A Claude Code day: most of the prompt is read from the cache. A chart of input + output
    # alone showed 1,500 tokens where a max_tokens budget counted 95,500.
    row = {
        "key": "2026-11-30",
        "input_tokens": 1_000,
        "output_tokens": 500,
        "cache_read_input_tokens": 90_000,
        "cache_creation_input_tokens": 4_000,
        "cost_micros": 7,
    }
    made = record_pages.usage_charts({"day": [row], "model": [{**row, "key": "claude"}]})
    by_title = {chart.title: chart for chart in made}
    assert by_title["Tokens per day"].bars[0].value_text == "95.5k"
    assert by_title["Tokens by model"].bars[0].value_text == "95.5k"
    assert by_title["Cost per day"].bars[0].value_text == charts.cost_text(7)


def test_an_unpriced_group_costs_unknown_not_zero() -> None:
    # A model with no known price (cost_micros null in GET /usage) was charted "$0.0000", as if
    # its requests were free; the Sessions page shows such a cost as a dash.
    priced = {"key": "gpt-4o", "input_tokens": 8, "cost_micros": 54}
    unpriced = {"key": "llama3.2", "input_tokens": 8, "cost_micros": None}
    made = record_pages.usage_charts({"day": [{**unpriced, "key": "2026-11-30"}],
                                      "model": [priced, unpriced]})  # fmt: skip
    by_title = {chart.title: chart for chart in made}
    day, by_model = by_title["Cost per day"], by_title["Cost by model"]
    assert [bar.value_text for bar in day.bars] == [charts.UNKNOWN_TEXT]
    assert day.bars[0].height == 0
    texts = {bar.label: bar.value_text for bar in by_model.bars}
    assert texts == {"gpt-4o": charts.cost_text(54), "llama3.2": charts.UNKNOWN_TEXT}
    free = record_pages.usage_charts({"model": [{**priced, "cost_micros": 0}]})
    (free_by_model,) = (chart for chart in free if chart.title == "Cost by model")
    assert [bar.value_text for bar in free_by_model.bars] == ["$0.0000"]  # priced at 0: $0


def test_other_sums_what_is_known() -> None:
    rows = [{"key": f"m{i}", "n": None if i % 2 else 1} for i in range(40)]
    chart = charts.bar_chart("t", rows, lambda row: row["n"], str)
    assert chart.bars[-1].label == "other" and chart.bars[-1].value_text == "6"
    unknown = charts.bar_chart("t", [{"key": f"m{i}", "n": None} for i in range(40)],
                               lambda row: row["n"], str)  # fmt: skip
    assert unknown.bars[-1].value_text == charts.UNKNOWN_TEXT


def test_amounts_are_shown_short() -> None:
    assert [charts.tokens_text(n) for n in (950, 12_345, 4_500_000)] == ["950", "12.3k", "4.5M"]
    assert [charts.cost_text(n) for n in (4_200, 12_340_000)] == ["$0.0042", "$12.34"]


def test_a_cost_under_a_hundredth_of_a_cent_is_not_shown_as_zero() -> None:
    # A session of a few requests to a cheap model (17 micro-dollars) read "$0.0000", like a
    # free one; the Sessions pages and the charts now write it the same way, "<$0.0001".
    assert [charts.cost_text(n) for n in (0, 1, 17, 99, 100)] == [
        "$0.0000", "<$0.0001", "<$0.0001", "<$0.0001", "$0.0001"
    ]  # fmt: skip
    macros = pages.TEMPLATES.get_template("macros.html").module
    shown = {n: str(macros.cost(n)) for n in (17, 4_200, 12_340_000)}
    assert shown == {17: "&lt;$0.0001", 4_200: "$0.0042", 12_340_000: "$12.34"}
    assert charts.UNKNOWN_TEXT in str(macros.cost(None))


# --- packaging ----------------------------------------------------------------------------------


def test_every_template_and_static_file_is_package_data() -> None:
    """A non-editable install carries the dashboard's files only if pyproject.toml lists them."""
    root = Path(__file__).resolve().parents[2]
    pyproject = tomllib.loads((root / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["aibridgeproxyd.web"]
    web = root / "aibridgeproxyd" / "web"
    files = [p.relative_to(web) for d in ("templates", "static") for p in (web / d).rglob("*")]
    missing = [str(f) for f in files if not any(f.match(pattern) for pattern in patterns)]
    assert files and missing == []


# --- a refused form, labels, the name rule -------------------------------------------------------


def test_a_refused_form_keeps_every_field_exactly_as_typed_but_never_a_secret() -> None:
    typed = {
        "type": "azure",
        "name": "az3",
        "base_url": " https://res3.openai.azure.com ",
        "hosts": "res3.openai.azure.com,  api.openai.com",
        "setting_deployments": "{not json",
        "setting_api_version": "2024-10-21 ",
        "new_api_key": "sk-typed-secret",
        "csrf_token": "c" * 64,
        "enabled": "off",
    }
    shown = provider_form.typed_values(typed, provider_form.type_form("azure"))
    assert shown["setting_deployments"] == "{not json"  # not JSON-quoted: '"{not json"'
    for field in ("name", "base_url", "hosts", "setting_api_version", "enabled"):
        assert shown[field] == typed[field]
    assert "new_api_key" not in shown and "csrf_token" not in shown
    bedrock = provider_form.typed_values(
        {"setting_secret_access_key": "s3cret", "setting_region": "eu-west-1"},
        provider_form.type_form("bedrock"),
    )
    assert bedrock == {"setting_region": "eu-west-1"}


def test_the_edit_form_shows_a_json_setting_as_json_and_no_secret() -> None:
    fields = provider_form.type_form("azure")
    stored = view(type="azure", settings={"deployments": {"gpt-4o": "prod"}}, enabled=True)
    shown = provider_form.stored_values(stored, fields)
    assert shown["setting_deployments"] == '{"gpt-4o": "prod"}'
    assert (shown["hosts"], shown["enabled"], shown["allow_byok"]) == (
        "api.openai.com",
        "on",
        "off",
    )
    bedrock = view(type="bedrock", settings={"secret_access_key": "***", "region": "us-east-1"})
    shown = provider_form.stored_values(bedrock, provider_form.type_form("bedrock"))
    assert "setting_secret_access_key" not in shown and shown["setting_region"] == "us-east-1"


@pytest.mark.parametrize(
    ("field", "label"),
    [
        ("setting_deployments", "Deployments"),
        ("settings.deployments", "Deployments"),
        ("settings.region", "AWS region"),
        ("base_url", "Base URL"),
        ("api_keys[0].api_key", "API keys"),
        ("name", "Name"),
    ],
)
def test_a_problem_names_the_field_by_its_label(field: str, label: str) -> None:
    assert provider_form.field_label(field) == label


@pytest.mark.parametrize("name", ["openai", "openai-eu", "a1-b2-c3", "x", "a_b", "-a", "a-", "A"])
def test_the_forms_name_pattern_is_the_servers(name: str) -> None:
    browser = re.fullmatch(provider_form.NAME_INPUT_PATTERN, name) is not None
    assert browser == (NAME_PATTERN.match(name) is not None)


# --- flash messages ------------------------------------------------------------------------------


def test_a_flash_message_survives_its_cookie_and_a_malformed_one_is_ignored() -> None:
    value = flash.encoded("Provider <x> added", ["Provider openai is in status error: taken"])
    assert flash.decoded(value) == {
        "notice": "Provider <x> added",
        "warnings": ["Provider openai is in status error: taken"],
    }
    for bad in ("", "!!!", "bm90IGpzb24", flash.encoded("x", [])[:-3] + "~~~", "x" * 5000):
        assert flash.decoded(bad) == flash.EMPTY


def test_many_warnings_are_cut_to_the_cookie_bound_and_counted() -> None:
    warnings = [f"Provider p{n} is in status error: {'r' * 80}" for n in range(200)]
    value = flash.encoded("Provider conflict added", warnings)
    assert len(value) <= flash.MAX_BYTES
    shown = flash.decoded(value)["warnings"]
    assert 1 < len(shown) < 200 and shown[-1] == f"and {201 - len(shown)} more"


# --- pages ---------------------------------------------------------------------------------------


def test_the_sessions_pager_steps_back_through_the_pages_before() -> None:
    first = record_pages.pager_links({"initiator": "alice"}, "", [], "s25")
    assert (first["first_link"], first["previous_link"]) == ("", "")
    assert first["next_link"] == "/sessions?initiator=alice&after=s25&back="
    second = record_pages.pager_links({"initiator": "alice"}, "s25", [""], "s50")
    assert second["previous_link"] == "/sessions?initiator=alice"
    assert second["first_link"] == "/sessions?initiator=alice"
    assert second["next_link"] == "/sessions?initiator=alice&after=s50&back=&back=s25"
    third = record_pages.pager_links({}, "s50", ["", "s25"], None)
    assert third["previous_link"] == "/sessions?after=s25&back="
    assert third["next_link"] == ""
    deep = record_pages.pager_links({}, "s9", [f"s{n}" for n in range(100)], "s10")
    assert deep["next_link"].count("back=") == record_pages.MAX_PAGE_TRAIL


def test_null_token_counts_show_a_dash_not_zero() -> None:
    template = pages.TEMPLATES.from_string('{% import "macros.html" as m %}{{ m.tokens(usage) }}')
    nothing = dict.fromkeys(
        (
            "input_tokens",
            "output_tokens",
            "cache_read_input_tokens",
            "cache_creation_input_tokens",
        )
    )
    assert "0 in" not in template.render(usage=nothing)
    assert "\u2013" in template.render(usage=nothing)  # an en dash
    counted = template.render(usage={**nothing, "input_tokens": 12, "output_tokens": 0})
    assert "12 in / 0 out" in counted
    assert "12 in / \u2013 out" in template.render(usage={**nothing, "input_tokens": 12})
