"""End to end: the dashboard (CONTRACT section 12, Dashboard; issue 11 section 3) in a real
browser, Debian's Chromium driven by ``playwright``, against the real daemon.

Covered: sign-in (a bad or proxy token refused; the cookie ``HttpOnly`` and ``SameSite=Strict``;
the token never in a URL); a Bedrock provider added through the form and listed with its
status; its secret key masked on the edit page and replaced only when typed anew; the Enable
switch; delete with a confirmation; a proxy token created (shown once) and revoked; a session
recorded from real traffic (the Anthropic SDK through the proxy to the fake upstream) with its
prompt, tool call, tokens and cost; a prompt with markup shown as text; the Usage charts. Every
page answers with the Content-Security-Policy, and the browser reports no CSP violation.

Screenshots of each page go to ``<basetemp>/screenshots/``. The tests skip, saying why, only
when no Chromium binary is installed (``.ci/run`` installs Debian's ``chromium``; the binary is
``chromium`` on PATH, or the path in ``AIBRIDGEPROXYD_CHROMIUM``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from aibridgeproxyd.model import ProviderRecord
from aibridgeproxyd.policy import period_key
from aibridgeproxyd.policy_counters import utc_now
from aibridgeproxyd.store import CounterDelta, Store
from tests.fakes import tool_content
from tests.fakes.upstream import FakeUpstream
from tests.harness import DaemonProcess

CHROMIUM = os.environ.get("AIBRIDGEPROXYD_CHROMIUM") or shutil.which("chromium") or ""
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
pytestmark = pytest.mark.skipif(
    not CHROMIUM,
    reason="no chromium binary on PATH (Debian: apt-get install chromium); "
    "the dashboard's browser tests need it",
)

CLAUDE_MODEL = "claude-sonnet-4-6"
CLAUDE_CODE_UA = "claude-cli/2.0.67 (external, cli)"
MARKUP_PROMPT = "Explain <script>window.__pwned = 1</script> and <b>bold</b> & <i>tags</i>"


# --- fixtures ------------------------------------------------------------------------------------


def _store_call(daemon: DaemonProcess, action: Any) -> Any:
    """Run ``action(store)`` on the daemon's database (as the CLI would, from outside), in a
    thread of its own: playwright's sync API keeps an event loop running in this one."""

    async def run() -> Any:
        async with await Store.open(daemon.data_dir / "aibridgeproxyd.db") as store:
            return await action(store)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, run()).result(timeout=30)


def stored_provider(daemon: DaemonProcess, name: str) -> ProviderRecord | None:
    async def get(store: Store) -> ProviderRecord | None:
        return await store.get_provider(name)

    result: ProviderRecord | None = _store_call(daemon, get)
    return result


@pytest.fixture(scope="module")
def daemon(upstream: FakeUpstream) -> Iterator[DaemonProcess]:
    with DaemonProcess({"upstream_ca_file": upstream.ca_pem_path}) as d:
        d.edit_provider("anthropic", upstream.origin, "sk-ant-central")
        d.cli("prices", "set", CLAUDE_MODEL, "--input", "3", "--output", "15", check=True)
        d.reload_and_wait()
        yield d


def _admin_token(daemon: DaemonProcess, name: str, role: str) -> str:
    result = daemon.cli("admin-tokens", "create", name, "--role", role, check=True)
    return result.stdout.strip()


@pytest.fixture(scope="module")
def admin_token(daemon: DaemonProcess) -> str:
    return _admin_token(daemon, "ops", "admin")


@pytest.fixture(scope="module")
def auditor_token(daemon: DaemonProcess) -> str:
    return _admin_token(daemon, "audit", "auditor")


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.getbasetemp() / "screenshots"
    folder.mkdir(exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


class Watched:
    """A browser page with what the browser reported: console messages, page errors, and
    every response of the admin listener (to check its headers)."""

    def __init__(self, page: Any, screenshots: Path) -> None:
        self.page = page
        self.screenshots = screenshots
        self.console: list[str] = []
        self.errors: list[str] = []
        self.responses: list[Any] = []
        page.on("console", lambda message: self.console.append(message.text))
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.on("response", lambda response: self.responses.append(response))

    def shot(self, name: str) -> None:
        self.page.screenshot(path=str(self.screenshots / f"{name}.png"), full_page=True)

    def csp_violations(self) -> list[str]:
        return [text for text in self.console if "Content Security Policy" in text]


@pytest.fixture
def anonymous(browser: Any, daemon: DaemonProcess, screenshots: Path) -> Iterator[Watched]:
    context = browser.new_context(
        base_url=daemon.admin_url, viewport={"width": 1280, "height": 800}
    )
    watched = Watched(context.new_page(), screenshots)
    yield watched
    context.close()
    assert watched.csp_violations() == []
    assert watched.errors == []


def sign_in(watched: Watched, token: str) -> None:
    page = watched.page
    page.goto("/sign-in")
    page.fill("#token", token)
    page.click("button[type=submit]")


@pytest.fixture
def admin(anonymous: Watched, admin_token: str) -> Watched:
    sign_in(anonymous, admin_token)
    anonymous.page.wait_for_url("**/providers")
    return anonymous


def csrf_of(html: str) -> str:
    """The CSRF token a dashboard page's forms carry."""
    marker = 'name="csrf_token" value="'
    return html[html.index(marker) + len(marker) :].split('"', 1)[0]


def provider_row(watched: Watched, name: str) -> Any:
    return watched.page.locator(f'tr[data-provider="{name}"]')


# --- sign-in and security ------------------------------------------------------------------------


def test_signing_in_keeps_the_token_in_a_strict_http_only_cookie_never_in_a_url(
    anonymous: Watched, admin_token: str, token: str
) -> None:
    page = anonymous.page
    page.goto("/")
    assert page.url.endswith("/sign-in")
    anonymous.shot("sign-in")

    sign_in(anonymous, "abp_not-a-token")
    assert "unknown token" in page.locator(".error").inner_text()
    sign_in(anonymous, token)  # a proxy token
    assert "proxy token may not sign in" in page.locator(".error").inner_text()

    sign_in(anonymous, admin_token)
    page.wait_for_url("**/providers")
    (cookie,) = page.context.cookies()
    assert (cookie["httpOnly"], cookie["sameSite"]) == (True, "Strict")
    assert cookie["value"] == admin_token
    assert all(admin_token not in response.url for response in anonymous.responses)
    assert "ops" in page.locator(".who").inner_text()

    page.click("text=Sign out")
    page.wait_for_url("**/sign-in")
    assert page.context.cookies() == []
    page.goto("/providers")
    assert page.url.endswith("/sign-in")


def test_every_page_answers_with_the_security_headers(admin: Watched) -> None:
    page = admin.page
    pages = ("/providers", "/providers/new?type=bedrock", "/tokens", "/sessions", "/usage")
    for path in (*pages, "/policies"):
        response = page.goto(path)
        assert response is not None and response.status == 200, path
        headers = response.headers
        assert "script-src 'self'" in headers["content-security-policy"]
        assert "frame-ancestors 'none'" in headers["content-security-policy"]
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["referrer-policy"] == "no-referrer"
        assert headers["cache-control"] == "no-store"


def test_a_form_post_without_the_csrf_token_or_from_another_site_is_refused(
    daemon: DaemonProcess, admin_token: str
) -> None:
    cookies = {"aibridgeproxyd_session": admin_token}
    with httpx.Client(base_url=daemon.admin_url, cookies=cookies, trust_env=False) as client:
        csrf = csrf_of(client.get("/tokens").text)
        forged = client.post("/tokens", data={"name": "mallory"})
        cross_site = client.post(
            "/tokens",
            data={"name": "mallory", "csrf_token": csrf},
            headers={"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"},
        )
        api_write = client.post("/api/v2/ai/proxy-tokens", json={"name": "mallory"})
        assert (forged.status_code, cross_site.status_code, api_write.status_code) == (
            403,
            403,
            403,
        )
        assert "mallory" not in client.get("/tokens").text


def test_the_api_serves_a_signed_in_browser_and_a_cookie_write_needs_the_csrf_header(
    daemon: DaemonProcess, admin_token: str
) -> None:
    cookies = {"aibridgeproxyd_session": admin_token}
    with httpx.Client(base_url=daemon.admin_url, cookies=cookies, trust_env=False) as client:
        listed = client.get("/api/v2/ai/providers")
        assert listed.status_code == 200
        assert "anthropic" in {provider["name"] for provider in listed.json()}
        csrf = csrf_of(client.get("/tokens").text)
        created = client.post(
            "/api/v2/ai/proxy-tokens", json={"name": "carol"}, headers={"X-CSRF-Token": csrf}
        )
        assert created.status_code == 201
        revoked = client.delete("/api/v2/ai/proxy-tokens/carol")  # no CSRF header
        assert revoked.status_code == 403
        revoked = client.delete("/api/v2/ai/proxy-tokens/carol", headers={"X-CSRF-Token": csrf})
        assert revoked.status_code == 204


def test_the_browser_refuses_inline_script_and_reports_the_violation(admin: Watched) -> None:
    """The CSP is enforced, and a violation is what the fixtures watch for on every page."""
    page = admin.page
    page.goto("/providers")
    with contextlib.suppress(Exception):  # playwright may raise as the browser refuses it
        page.add_script_tag(content="window.__inline = 1")
    assert page.evaluate("window.__inline") is None
    assert admin.csp_violations() != []
    admin.console.clear()


def test_an_auditor_reads_but_cannot_change_anything(
    daemon: DaemonProcess, auditor_token: str
) -> None:
    cookies = {"aibridgeproxyd_session": auditor_token}
    with httpx.Client(base_url=daemon.admin_url, cookies=cookies, trust_env=False) as client:
        listing = client.get("/providers")
        assert listing.status_code == 200
        assert "Add provider" not in listing.text
        csrf = csrf_of(listing.text)
        refused = client.post(
            "/providers/anthropic/enabled", data={"enabled": "off", "csrf_token": csrf}
        )
        assert refused.status_code == 403
        assert "may only read" in refused.text
    record = stored_provider(daemon, "anthropic")
    assert record is not None and record.enabled


# --- providers -----------------------------------------------------------------------------------


def test_a_bedrock_provider_is_added_edited_switched_and_deleted_through_the_forms(
    admin: Watched, daemon: DaemonProcess
) -> None:
    page = admin.page
    page.click("text=Add provider")
    page.wait_for_url("**/providers/new")
    page.wait_for_load_state()  # the script is listening
    page.select_option("#type-choice", "bedrock")  # the script shows Bedrock's fields
    page.wait_for_url(re.compile(r"/providers/new\?type=bedrock$"))
    for field in (
        "setting_region",
        "setting_access_key_id",
        "setting_secret_access_key",
        "setting_model",
        "setting_small_fast_model",
    ):
        assert page.locator(f"#{field}").count() == 1, field
    assert page.locator("#new_api_key").count() == 0  # Bedrock signs: no API keys
    page.fill("#name", "bedrock-east")
    page.fill("#display_name", "Claude on Bedrock <east>")
    page.fill("#hosts", "claude.bedrock.test")
    page.fill("#setting_region", "us-east-1")
    page.fill("#setting_access_key_id", "AKIAEXAMPLEOLD")
    page.fill("#setting_secret_access_key", "old-secret-Xq7")
    page.fill("#setting_model", "anthropic.claude-sonnet-4-6")
    page.fill("#setting_small_fast_model", "anthropic.claude-haiku-4-5")
    admin.shot("provider-add-bedrock")
    page.click("button:has-text('Add provider')")
    page.wait_for_url("**/providers")
    row = provider_row(admin, "bedrock-east")
    assert row.locator(".badge").inner_text() == "enabled"
    assert "Claude on Bedrock <east>" in row.inner_text()  # the name is text, not markup
    admin.shot("providers")

    # Edit: the secret is masked, never in the page; typed anew, it replaces the stored one.
    row.locator("text=Edit").click()
    page.wait_for_url("**/providers/bedrock-east/edit")
    for secret in ("access_key_id", "secret_access_key"):
        assert page.input_value(f"#setting_{secret}") == ""
        assert page.locator(f'[data-setting="{secret}"]').inner_text() == "***"
    assert "old-secret-Xq7" not in page.content()
    assert "AKIAEXAMPLEOLD" not in page.content()
    assert page.input_value("#setting_region") == "us-east-1"
    admin.shot("provider-edit")
    page.fill("#setting_access_key_id", "AKIAEXAMPLENEW")
    page.fill("#setting_secret_access_key", "new-secret-Zr9")
    page.click("button:has-text('Save')")
    page.wait_for_url("**/providers")
    record = stored_provider(daemon, "bedrock-east")
    assert record is not None
    assert (record.settings["access_key_id"], record.settings["secret_access_key"]) == (
        "AKIAEXAMPLENEW",
        "new-secret-Zr9",
    )
    # Saved again without typing the secret: it stays.
    page.goto("/providers/bedrock-east/edit")
    page.click("button:has-text('Save')")
    page.wait_for_url("**/providers")
    record = stored_provider(daemon, "bedrock-east")
    assert record is not None and record.settings["secret_access_key"] == "new-secret-Zr9"

    # The Enable switch, off and on again.
    provider_row(admin, "bedrock-east").locator("button.switch").click()
    page.wait_for_load_state()
    assert provider_row(admin, "bedrock-east").locator(".badge").inner_text() == "disabled"
    assert (
        provider_row(admin, "bedrock-east").locator("button.switch").get_attribute("aria-checked")
        == "false"
    )
    provider_row(admin, "bedrock-east").locator("button.switch").click()
    page.wait_for_load_state()
    assert provider_row(admin, "bedrock-east").locator(".badge").inner_text() == "enabled"

    # Delete: the confirmation page first; Cancel keeps it, the button deletes it.
    provider_row(admin, "bedrock-east").locator("text=Delete").click()
    page.wait_for_url("**/providers/bedrock-east/delete")
    admin.shot("provider-delete-confirm")
    page.click("text=Cancel")
    page.wait_for_url("**/providers")
    assert provider_row(admin, "bedrock-east").count() == 1
    provider_row(admin, "bedrock-east").locator("text=Delete").click()
    page.click("button:has-text('Delete provider')")
    page.wait_for_url("**/providers")
    assert provider_row(admin, "bedrock-east").count() == 0
    assert stored_provider(daemon, "bedrock-east") is None


def test_a_refused_provider_form_names_the_field_and_a_status_reason_is_listed(
    admin: Watched,
) -> None:
    page = admin.page
    page.goto("/providers/new?type=openai-compat")
    page.fill("#name", "zz-shadow")
    page.fill("#base_url", "not a url")
    page.click("button:has-text('Add provider')")
    assert "base_url" in page.locator(".error").inner_text()
    admin.shot("provider-add-refused")

    page.fill("#base_url", "https://llm.internal.test/v1")
    page.fill("#hosts", "api.anthropic.com")  # claimed by "anthropic", earlier by name
    page.fill("#new_api_key", "sk-shadow-key-0001")
    page.click("button:has-text('Add provider')")
    page.wait_for_url("**/providers")
    row = provider_row(admin, "zz-shadow")
    assert row.locator(".badge").inner_text() == "error"
    assert "anthropic" in row.locator(".reason").inner_text()
    assert "sk-shadow-key-0001" not in page.content()
    row.locator("text=Delete").click()
    page.click("button:has-text('Delete provider')")
    page.wait_for_url("**/providers")


def test_an_api_key_is_shown_masked_and_replaced_only_when_typed_anew(
    admin: Watched, daemon: DaemonProcess
) -> None:
    page = admin.page
    page.goto("/providers/anthropic/edit")
    masked = page.locator("code.masked").all_inner_texts()
    assert len(masked) == 1 and "sk-ant-central" not in page.content()
    assert masked[0].startswith("sk-") and masked[0] != "sk-ant-central"
    page.click("button:has-text('Save')")  # nothing typed: the key stays
    page.wait_for_url("**/providers")
    record = stored_provider(daemon, "anthropic")
    assert record is not None and record.keys == ("sk-ant-central",)

    page.goto("/providers/anthropic/edit")
    page.locator("input[name^=remove_key_]").check()
    page.fill("#new_api_key", "sk-ant-rotated")
    page.click("button:has-text('Save')")
    page.wait_for_url("**/providers")
    record = stored_provider(daemon, "anthropic")
    assert record is not None and record.keys == ("sk-ant-rotated",)
    page.goto("/providers/anthropic/edit")
    page.locator("input[name^=remove_key_]").check()
    page.fill("#new_api_key", "sk-ant-central")  # back, for the traffic of later tests
    page.click("button:has-text('Save')")
    page.wait_for_url("**/providers")
    record = stored_provider(daemon, "anthropic")
    assert record is not None and record.keys == ("sk-ant-central",)


# --- proxy tokens --------------------------------------------------------------------------------


def test_a_proxy_token_is_created_shown_once_and_revoked(admin: Watched) -> None:
    page = admin.page
    page.click("nav >> text=Proxy tokens")
    page.fill("#token-name", "bob")
    page.click("button:has-text('Create token')")
    created = page.locator("#new-token").inner_text()
    assert created.startswith("abp_")
    assert all(created not in response.url for response in admin.responses)
    admin.shot("tokens-created")
    assert page.locator('tr[data-token="bob"]').count() == 1

    page.goto("/tokens")
    assert created not in page.content()  # shown once only
    page.locator('tr[data-token="bob"] >> text=Revoke').click()
    page.click("button:has-text('Revoke token')")
    page.wait_for_url("**/tokens")
    assert page.locator('tr[data-token="bob"]').count() == 0
    # Revoked (or never there): no confirmation page for a token that does not exist.
    for gone in ("bob", "%00"):
        assert page.goto(f"/tokens/{gone}/revoke").status == 404


# --- sessions and usage --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def recorded_session(daemon: DaemonProcess, token: str) -> str:
    """A Claude Code-like request with a tool call and a prompt full of markup, through the
    proxy to the fake upstream; returns its session id once the record is stored."""
    session_id = str(uuid.uuid4())
    client = daemon.anthropic_client(token, default_headers={"User-Agent": CLAUDE_CODE_UA})
    message = client.messages.create(
        model=CLAUDE_MODEL,
        max_tokens=256,
        messages=[{"role": "user", "content": MARKUP_PROMPT}],
        tools=[{"name": tool_content.TOOL_NAME, "input_schema": {"type": "object"}}],
        extra_headers={"X-Claude-Code-Session-Id": session_id, tool_content.HEADER_TOOL_CALL: "1"},
    )
    assert message.content

    def stored() -> bool:
        out = daemon.cli("sessions", "list", "--session-id", session_id, check=True).stdout
        return bool(json.loads(out)["count"])

    daemon.wait_for(stored, message=f"session {session_id} recorded")
    return session_id


def test_a_session_recorded_from_real_traffic_shows_its_prompt_as_text_and_its_tool_call(
    admin: Watched, recorded_session: str
) -> None:
    page = admin.page
    page.click("nav >> text=Sessions")
    page.fill("input[name=initiator]", "alice")
    page.click("button:has-text('Filter')")
    admin.shot("sessions")
    assert "<script>" in page.locator("td.prompt").first.inner_text()
    page.click(f'a[href="/sessions/{recorded_session}"]')
    page.wait_for_url(f"**/sessions/{recorded_session}")
    admin.shot("session")
    prompt = page.locator("pre.prompt").first
    assert prompt.inner_text() == MARKUP_PROMPT
    assert prompt.locator("script, b, i").count() == 0
    assert page.evaluate("window.__pwned") is None
    assert tool_content.TOOL_NAME in page.locator(".tool-call summary").first.inner_text()
    # Priced: a dollar amount, not the unpriced dash; a few fake tokens cost more than $0.
    cost = page.locator("dd.cost").inner_text()
    assert re.fullmatch(r"<?\$[\d,]+\.\d+", cost) and cost != "$0.0000", cost


def test_the_sessions_list_filters_and_refuses_a_malformed_time(
    admin: Watched, recorded_session: str
) -> None:
    page = admin.page
    page.goto("/sessions?initiator=nobody-here")
    assert "No session matches" in page.inner_text("table")
    response = page.goto("/sessions?started_after=yesterday")
    assert response is not None and response.status == 400
    assert page.locator(".error").inner_text().startswith("From: invalid timestamp 'yesterday'")
    assert "correct the filter" in page.inner_text("table")  # not "No session matches"


def test_the_usage_page_draws_its_charts(admin: Watched, recorded_session: str) -> None:
    page = admin.page
    page.click("nav >> text=Usage")
    page.wait_for_url("**/usage")
    admin.shot("usage")
    charts = page.locator("figure.chart")
    assert charts.count() >= 6
    assert page.locator("svg.chart-svg rect").count() >= 6
    by_model = page.locator("figure.chart", has_text="Tokens by model")
    assert CLAUDE_MODEL in by_model.locator("svg").inner_html()
    by_name = page.locator("figure.chart", has_text="Tokens by provider").first
    assert "anthropic" in by_name.locator("svg").inner_html()  # by name, then by type
    assert page.locator("figure.chart", has_text="Tokens by provider type").count() == 1


# --- what a newcomer saw: refused forms, feedback, roles, narrow windows, stray URLs -------------


def test_a_refused_form_comes_back_exactly_as_typed_with_its_problem_said_once(
    admin: Watched, daemon: DaemonProcess
) -> None:
    page = admin.page
    page.goto("/providers/new?type=azure")
    page.fill("#name", "az3")
    page.fill("#base_url", "https://res3.openai.azure.com")
    page.fill("#hosts", "res3.openai.azure.com,  api-res3.test")
    page.fill("#setting_api_version", "2024-10-21")
    page.fill("#setting_deployments", "{not json")
    page.fill("#new_api_key", "sk-az3-secret-0001")
    page.click("button:has-text('Add provider')")
    error = page.locator(".error")
    text = error.inner_text()
    admin.shot("provider-add-refused-json")
    assert "Deployments" in text and "setting_deployments" not in text
    assert text.count("not valid JSON") == 1  # said once, not banner + list item
    assert page.locator("#setting_deployments").get_attribute("aria-invalid") == "true"
    assert page.input_value("#setting_deployments") == "{not json"  # not '"{not json"'
    assert page.input_value("#hosts") == "res3.openai.azure.com,  api-res3.test"
    assert page.input_value("#name") == "az3"
    assert page.input_value("#new_api_key") == ""  # a secret is never sent back
    assert "sk-az3-secret-0001" not in page.content()

    page.click("button:has-text('Add provider')")  # sent again unchanged: refused again
    assert page.input_value("#setting_deployments") == "{not json"
    assert stored_provider(daemon, "az3") is None


def test_a_refused_edit_keeps_what_was_typed_not_what_is_stored(admin: Watched) -> None:
    page = admin.page
    page.goto("/providers/anthropic/edit")
    page.fill("#display_name", "Typed, not stored")
    page.fill("#base_url", "not a url")
    page.click("button:has-text('Save')")
    assert "Base URL" in page.locator(".error").inner_text()
    assert page.input_value("#display_name") == "Typed, not stored"
    assert page.input_value("#base_url") == "not a url"


def test_each_change_says_so_and_names_every_provider_it_left_in_error(admin: Watched) -> None:
    page = admin.page
    page.goto("/providers/new?type=openai-compat")
    page.fill("#name", "conflict")
    page.fill("#base_url", "https://llm.conflict.test/v1")
    page.fill("#hosts", "api.openai.com")  # "conflict" sorts first: it takes openai's host
    page.fill("#new_api_key", "sk-conflict-0001")
    page.click("button:has-text('Add provider')")
    page.wait_for_url("**/providers")
    assert page.locator(".notice.flash").inner_text() == "Provider conflict added"
    warning = page.locator(".warning.flash").inner_text()
    assert "openai" in warning and "already claimed by provider 'conflict'" in warning
    assert "/providers?" not in page.url and "conflict" not in page.url  # nothing in the URL
    admin.shot("provider-added-with-warning")
    page.reload()  # shown once
    assert page.locator(".flash").count() == 0

    provider_row(admin, "conflict").locator("button.switch").click()
    page.wait_for_load_state()
    assert page.locator(".notice.flash").inner_text() == "Provider conflict disabled"
    assert page.locator(".warning.flash").count() == 0  # openai is well again
    page.goto("/providers/conflict/edit")
    page.click("button:has-text('Save')")
    page.wait_for_url("**/providers")
    assert page.locator(".notice.flash").inner_text() == "Provider conflict saved"
    provider_row(admin, "conflict").locator("text=Delete").click()
    page.click("button:has-text('Delete provider')")
    page.wait_for_url("**/providers")
    assert page.locator(".notice.flash").inner_text() == "Provider conflict deleted"


def test_an_auditor_sees_no_proxy_tokens_page_as_the_api_refuses_them(
    browser: Any, daemon: DaemonProcess, auditor_token: str, screenshots: Path
) -> None:
    context = browser.new_context(base_url=daemon.admin_url)
    watched = Watched(context.new_page(), screenshots)
    sign_in(watched, auditor_token)
    watched.page.wait_for_url("**/providers")
    nav = watched.page.locator("header nav").inner_text()
    assert "Providers" in nav and "Sessions" in nav and "Proxy tokens" not in nav
    response = watched.page.goto("/tokens")
    assert response is not None and response.status == 403
    watched.shot("auditor-tokens-refused")
    context.close()
    headers = {"Authorization": f"Bearer {auditor_token}"}
    with httpx.Client(base_url=daemon.admin_url, headers=headers, trust_env=False) as client:
        assert client.get("/api/v2/ai/proxy-tokens").status_code == 403
        assert client.get("/api/v2/ai/providers").status_code == 200


@pytest.mark.parametrize(
    "path", ["/providers", "/providers/new?type=bedrock", "/sessions", "/policies"]
)
def test_a_narrow_window_wraps_the_header_and_scrolls_tables_inside_their_box(
    browser: Any, daemon: DaemonProcess, admin_token: str, screenshots: Path, path: str
) -> None:
    context = browser.new_context(base_url=daemon.admin_url, viewport={"width": 420, "height": 800})
    watched = Watched(context.new_page(), screenshots)
    sign_in(watched, admin_token)
    watched.page.wait_for_url("**/providers")
    page = watched.page
    page.goto(path)
    watched.shot("narrow-" + path.strip("/").replace("/", "-").replace("?type=", "-"))
    assert page.evaluate("document.documentElement.scrollWidth") <= 420  # the page never widens
    header = page.locator("header.top").bounding_box()
    assert header is not None and header["width"] >= 420
    for link in page.locator("header.top nav a").all():  # every link on the dark header
        box = link.bounding_box()
        assert box is not None and box["y"] + box["height"] <= header["y"] + header["height"]
        assert box["x"] + box["width"] <= 420
    context.close()
    assert watched.errors == [] and watched.csp_violations() == []


def test_an_unknown_page_is_an_html_404_and_an_unknown_api_path_stays_json(
    admin: Watched, daemon: DaemonProcess
) -> None:
    page = admin.page
    response = page.goto("/no-such-page")
    assert response is not None and response.status == 404
    assert response.headers["content-type"].startswith("text/html")
    assert page.locator("h1").inner_text() == "Page not found"
    assert "script-src 'self'" in response.headers["content-security-policy"]
    admin.shot("not-found")
    with httpx.Client(base_url=daemon.admin_url, trust_env=False) as client:
        api = client.get("/api/v2/no-such-thing")
        assert api.status_code == 404 and api.json()["message"]


def test_the_name_field_follows_the_servers_rule_and_reads_as_text_when_fixed(
    admin: Watched,
) -> None:
    page = admin.page
    page.goto("/providers/new?type=openai-compat")
    valid = "document.getElementById('name').checkValidity()"
    for name, ok in (("my_provider", False), ("my-provider", True), ("a--b", False)):
        page.fill("#name", name)
        assert page.evaluate(valid) is ok, name
    page.goto("/providers/anthropic/edit")
    name = page.locator("#name")
    assert name.get_attribute("readonly") is not None
    style = "getComputedStyle(document.getElementById('name'))"
    assert page.evaluate(f"{style}.backgroundColor") == "rgba(0, 0, 0, 0)"
    assert page.evaluate(f"{style}.borderTopColor") == "rgba(0, 0, 0, 0)"


# --- policies ------------------------------------------------------------------------------------

POLICIES_API = "/api/v2/ai/policies"
HOSTILE_MODEL = '<img src=x onerror="window.__pwned=1">claude-*'


def policies_api(daemon: DaemonProcess, admin_token: str) -> httpx.Client:
    headers = {"Authorization": f"Bearer {admin_token}"}
    return httpx.Client(base_url=daemon.admin_url, headers=headers, trust_env=False)


def add_spend(daemon: DaemonProcess, user: str, scope: str, cost_micros: int) -> None:
    """Add to ``user``'s shared counters of today, this week and this month, as a replica's
    reconciliation does (``Store.add_policy_counts``)."""
    now = utc_now()
    deltas = [
        CounterDelta(user, scope, period_key(period, now), 0, 1000, cost_micros, "9999")
        for period in ("day", "week", "month")
    ]

    async def add(store: Store) -> None:
        await store.add_policy_counts(deltas)

    _store_call(daemon, add)


@pytest.fixture(scope="module")
def budgeted(daemon: DaemonProcess, admin_token: str) -> Iterator[str]:
    """User ``budgeted``: $10 a day everywhere (86 % spent) and $1 a week at anthropic (spent
    past it), under a default of 600 requests a minute."""
    daemon.create_token("budgeted")
    with policies_api(daemon, admin_token) as api:
        assert api.put(f"{POLICIES_API}/*", json={"rpm": 600}).status_code == 201
        own = {"max_cost_usd": "10", "period": "day", "models": [HOSTILE_MODEL]}
        assert api.put(f"{POLICIES_API}/budgeted", json=own).status_code == 201
        weekly = {"max_cost_usd": 1, "period": "week"}
        at_anthropic = f"{POLICIES_API}/budgeted/providers/anthropic"
        assert api.put(at_anthropic, json=weekly).status_code == 201
        add_spend(daemon, "budgeted", "*", 8_600_000)
        add_spend(daemon, "budgeted", "anthropic", 1_200_000)
        yield "budgeted"
        for path in (at_anthropic, f"{POLICIES_API}/budgeted", f"{POLICIES_API}/*"):
            api.delete(path)


def spend_row(watched: Watched, user: str, scope: str) -> Any:
    return watched.page.locator(f'table.spend tr[data-user="{user}"][data-scope="{scope}"]')


def test_the_policies_page_shows_each_users_spend_against_budget_and_the_limits_in_force(
    admin: Watched, budgeted: str, token: str
) -> None:
    page = admin.page
    page.click("nav >> text=Policies")
    page.wait_for_url("**/policies")
    admin.shot("policies")
    everywhere = spend_row(admin, budgeted, "*")
    assert everywhere.locator(".percent").inner_text() == "86%"
    assert everywhere.locator("meter").get_attribute("value") == "0.8600"
    assert everywhere.locator("td.used").get_attribute("class") == "used level-warn"
    spent = everywhere.locator("td.spent").inner_text()
    assert "$8.60" in spent and "$1.40 left" in spent
    assert "$10.00 per day" in everywhere.inner_text()
    assert "600/min" in everywhere.inner_text()  # the default's rate limit ...
    assert everywhere.locator(".source").inner_text() == "default"  # ... marked as such
    anthropic = spend_row(admin, budgeted, "anthropic")
    assert anthropic.locator(".percent").inner_text() == "120%"
    assert "level-over" in (anthropic.locator("td.used").get_attribute("class") or "")
    assert "$0.00 left" in anthropic.inner_text()
    # Every user with a token is listed; alice has only the default's limit.
    assert "600/min" in spend_row(admin, "alice", "*").inner_text()
    # A model pattern full of markup is text.
    models = everywhere.locator("td.models")
    assert HOSTILE_MODEL in models.inner_text()
    assert models.locator("img").count() == 0
    assert page.evaluate("window.__pwned") is None


def test_an_admin_sets_edits_and_deletes_a_policy_through_the_form(
    admin: Watched, daemon: DaemonProcess, admin_token: str
) -> None:
    page = admin.page
    page.goto("/policies")
    user = "q+a@corp.example"  # a + in a link's query must stay a +
    page.fill("#policy-user", user)
    page.select_option("#policy-provider", "openai")
    page.fill("#policy-max_cost_usd", "$5.50")
    page.select_option("#policy-period", "week")
    page.fill("#policy-models", "gpt-4o*, o3-*")
    page.fill("#policy-rpm", "1,000")
    admin.shot("policy-set")
    page.click("button:has-text('Save policy')")
    page.wait_for_url("**/policies")
    assert page.locator(".notice.flash").inner_text() == f"Added {user}'s policy at openai"
    path = f"{POLICIES_API}/{quote(user)}/providers/openai"
    with policies_api(daemon, admin_token) as api:
        stored = api.get(path).json()
    assert (stored["max_cost_usd"], stored["period"], stored["rpm"]) == ("5.50", "week", 1000)
    assert stored["models"] == ["gpt-4o*", "o3-*"]

    row = page.locator(f'table.policies tr[data-policy="{user}/openai"]')
    row.locator("text=Edit").click()
    assert page.input_value("#policy-user") == user
    assert page.input_value("#policy-max_cost_usd") == "5.50"
    assert page.input_value("#policy-models") == "gpt-4o*, o3-*"
    page.fill("#policy-rpm", "")
    page.fill("#policy-max_parallel", "3")
    page.click("button:has-text('Save policy')")
    page.wait_for_url("**/policies")
    assert page.locator(".notice.flash").inner_text() == f"Saved {user}'s policy at openai"
    with policies_api(daemon, admin_token) as api:
        stored = api.get(path).json()
    assert (stored["rpm"], stored["max_parallel"]) == (None, 3)

    row.locator("text=Delete").click()
    page.wait_for_url("**/policies/delete?*")
    page.click("button:has-text('Delete policy')")
    page.wait_for_url("**/policies")
    assert page.locator(".notice.flash").inner_text() == f"Deleted {user}'s policy at openai"
    assert row.count() == 0
    with policies_api(daemon, admin_token) as api:
        assert api.get(path).status_code == 404


def test_a_refused_policy_form_shows_a_hostile_name_as_text_and_keeps_what_was_typed(
    admin: Watched, daemon: DaemonProcess, admin_token: str
) -> None:
    page = admin.page
    page.goto("/policies")
    hostile = '"><script>window.__pwned = 1</script><b>x</b>'
    page.fill("#policy-user", hostile)
    page.fill("#policy-rpm", "10")
    page.click("button:has-text('Save policy')")
    error = page.locator("#set-policy .error")
    assert "User" in error.inner_text() and "<script>" in error.inner_text()
    assert error.locator("script, b").count() == 0
    assert page.evaluate("window.__pwned") is None
    assert page.input_value("#policy-user") == hostile
    assert page.locator("#policy-user").get_attribute("aria-invalid") == "true"
    admin.shot("policy-refused")

    page.fill("#policy-user", "lots-of-requests")
    page.fill("#policy-rpm", "lots")
    page.click("button:has-text('Save policy')")
    assert "Requests per minute" in page.locator("#set-policy .error").inner_text()
    assert page.locator("#policy-rpm").get_attribute("aria-invalid") == "true"
    assert page.input_value("#policy-rpm") == "lots"
    with policies_api(daemon, admin_token) as api:
        assert api.get(f"{POLICIES_API}/lots-of-requests").status_code == 404


def test_an_auditor_sees_spend_and_policies_but_no_form_and_cannot_change_one(
    browser: Any, daemon: DaemonProcess, auditor_token: str, budgeted: str, screenshots: Path
) -> None:
    context = browser.new_context(base_url=daemon.admin_url)
    watched = Watched(context.new_page(), screenshots)
    sign_in(watched, auditor_token)
    watched.page.wait_for_url("**/providers")
    page = watched.page
    page.click("nav >> text=Policies")
    page.wait_for_url("**/policies")
    assert spend_row(watched, budgeted, "*").locator(".percent").inner_text() == "86%"
    assert page.locator("#set-policy").count() == 0
    assert page.locator("form[action='/policies']").count() == 0
    assert page.locator("table.policies a").count() == 0  # no Edit, no Delete
    response = page.goto("/policies/delete?user=budgeted")
    assert response is not None and response.status == 403
    context.close()
    assert watched.errors == [] and watched.csp_violations() == []
    cookies = {"aibridgeproxyd_session": auditor_token}
    with httpx.Client(base_url=daemon.admin_url, cookies=cookies, trust_env=False) as client:
        csrf = csrf_of(client.get("/policies").text)
        refused = client.post("/policies", data={"user": "x", "rpm": "1", "csrf_token": csrf})
        assert refused.status_code == 403
        deleted = client.post("/policies/delete?user=budgeted", data={"csrf_token": csrf})
        assert deleted.status_code == 403
    with policies_api(daemon, auditor_token) as api:
        assert api.get(f"{POLICIES_API}/budgeted").status_code == 200  # still there
