"""End to end: the policies API (``/api/v2/ai/policies``, CONTRACT 15, docs/policies.md#api)
and the usage API's budgets (``/api/v2/aibridge/usage/budgets``) on the real daemon's admin
listener, on SQLite and on PostgreSQL (the module runs once per engine), called with httpx: create, read, replace, change and delete; each caller as its role
allows (an auditor reads, a proxy token sees only its own report); every refused input names
its field; a write reloads the daemon at once; spend and remaining budget as the shared
counters hold them.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest

from aibridgeproxyd.database_url import parse_database_url
from aibridgeproxyd.policy import period_key
from aibridgeproxyd.policy_counters import utc_now
from aibridgeproxyd.sealing import Keyring
from aibridgeproxyd.store import CounterDelta, Store
from tests.fakes.upstream import FakeUpstream
from tests.harness import DaemonProcess
from tests.postgres import PostgresServer
from tests.store_engines import ENGINES

POLICIES = "/api/v2/ai/policies"
# The PostgreSQL daemon's key (a PostgreSQL store has no key file beside it).
ENCRYPTION_KEY = base64.b64encode(bytes(range(40, 72))).decode()
BUDGETS = "/api/v2/aibridge/usage/budgets"
_names = itertools.count(1)


def unique(prefix: str) -> str:
    return f"{prefix}-{next(_names)}"


@dataclass(frozen=True)
class Tokens:
    admin: str
    auditor: str
    alice: str
    bob: str


@pytest.fixture(scope="module", params=ENGINES)
def database(request: pytest.FixtureRequest) -> str:
    """The module's database: ``""`` for the daemon's own SQLite file, else a PostgreSQL URL."""
    if request.param == "sqlite":
        return ""
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.create_database()


@pytest.fixture(scope="module")
def daemon(upstream: FakeUpstream, database: str) -> Iterator[DaemonProcess]:
    # Long, so that a reload within a second of a write is the API's doing.
    config = {"reload_interval": "60s", "upstream_ca_file": upstream.ca_pem_path}
    if database:
        config["database_url"] = database
    env = {"AIBRIDGEPROXYD_ENCRYPTION_KEYS": ENCRYPTION_KEY} if database else {}
    with DaemonProcess(config, env=env) as d:
        d.edit_provider("openai", upstream.base_url, "sk-openai-central")
        d.cli("prices", "set", "gpt-4o", "--input", "3", "--output", "15", check=True)
        d.reload_and_wait()
        yield d


@pytest.fixture(scope="module")
def tokens(daemon: DaemonProcess) -> Tokens:
    def admin_token(name: str, role: str) -> str:
        return daemon.cli("admin-tokens", "create", name, "--role", role, check=True).stdout.strip()

    return Tokens(
        admin=admin_token("root", "admin"),
        auditor=admin_token("watcher", "auditor"),
        alice=daemon.create_token("alice"),
        bob=daemon.create_token("bob"),
    )


@pytest.fixture(scope="module")
def http(daemon: DaemonProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=daemon.admin_url, trust_env=False, timeout=10.0) as client:
        yield client


Api = Callable[..., httpx.Response]


def as_caller(http: httpx.Client, token: str) -> Api:
    def call(method: str, path: str, **kwargs: Any) -> httpx.Response:
        return http.request(method, path, headers={"Authorization": f"Bearer {token}"}, **kwargs)

    return call


@pytest.fixture(scope="module")
def api(http: httpx.Client, tokens: Tokens) -> Api:
    """``api(method, path, json=...)`` as the admin."""
    return as_caller(http, tokens.admin)


def add_spend(
    daemon: DaemonProcess, database: str, user: str, scope: str, tokens: int, cost_micros: int
) -> None:
    """Add to ``user``'s shared counters of today, this week and this month, as a replica's
    reconciliation does (``Store.add_policy_counts``)."""
    now = utc_now()
    deltas = [
        CounterDelta(user, scope, period_key(period, now), 0, tokens, cost_micros, "9999")
        for period in ("day", "week", "month")
    ]
    url = parse_database_url(database) if database else None
    keyring = Keyring([base64.b64decode(ENCRYPTION_KEY)]) if url else None

    async def write() -> None:
        where = url or daemon.data_dir / "aibridgeproxyd.db"
        async with await Store.open(where, keyring=keyring) as store:
            await store.add_policy_counts(deltas)

    asyncio.run(write())


# --- create, read, replace, change, delete ------------------------------------------------------


def test_an_admin_puts_reads_patches_and_deletes_a_users_policy(api: Api) -> None:
    user = unique("carol")
    created = api("PUT", f"{POLICIES}/{user}", json={"max_cost_usd": 25, "period": "month"})
    assert created.status_code == 201, created.text
    view = created.json()
    assert (view["user"], view["provider"], view["max_cost_usd"], view["period"]) == (
        user,
        None,
        "25",
        "month",
    )
    assert view["rpm"] is None and view["models"] is None and view["created_at"]

    replaced = api("PUT", f"{POLICIES}/{user}", json={"rpm": 30, "models": ["claude-*"]})
    assert replaced.status_code == 200
    assert replaced.json()["max_cost_usd"] is None  # replaced whole
    assert replaced.json()["created_at"] == view["created_at"]

    patched = api("PATCH", f"{POLICIES}/{user}", json={"tpm": 1000, "models": None})
    assert patched.status_code == 200, patched.text
    assert (patched.json()["rpm"], patched.json()["tpm"], patched.json()["models"]) == (
        30,
        1000,
        None,
    )
    assert api("GET", f"{POLICIES}/{user}").json() == patched.json()
    assert user in {p["user"] for p in api("GET", POLICIES).json()}

    assert api("DELETE", f"{POLICIES}/{user}").status_code == 204
    gone = api("GET", f"{POLICIES}/{user}")
    assert gone.status_code == 404 and user in gone.json()["message"]
    assert api("DELETE", f"{POLICIES}/{user}").status_code == 404
    assert api("PATCH", f"{POLICIES}/{user}", json={"rpm": 1}).status_code == 404


def test_the_default_and_per_provider_policies_have_their_own_paths(api: Api) -> None:
    default = api("PUT", f"{POLICIES}/*", json={"rpm": 600})
    assert default.status_code in (200, 201), default.text
    assert default.json()["user"] is None
    at_openai = api(
        "PUT",
        f"{POLICIES}/*/providers/openai",
        json={"max_tokens": 1_000_000, "period": "day", "models": ["gpt-4o*"]},
    )
    assert at_openai.status_code == 201, at_openai.text
    assert (at_openai.json()["user"], at_openai.json()["provider"]) == (None, "openai")
    listed = api("GET", POLICIES).json()
    assert listed[0]["user"] is None  # the defaults first
    assert {(p["user"], p["provider"]) for p in listed} >= {(None, None), (None, "openai")}
    assert api("GET", f"{POLICIES}/*/providers/openai").json() == at_openai.json()
    assert api("GET", f"{POLICIES}/*/providers/anthropic").status_code == 404
    assert api("DELETE", f"{POLICIES}/*/providers/openai").status_code == 204
    assert api("DELETE", f"{POLICIES}/*").status_code == 204


def test_post_creates_once_and_a_second_post_is_a_conflict(api: Api) -> None:
    user = unique("dave")
    body = {"user": user, "provider": "anthropic", "max_parallel": 2}
    created = api("POST", POLICIES, json=body)
    assert created.status_code == 201, created.text
    assert created.json()["max_parallel"] == 2
    again = api("POST", POLICIES, json={**body, "max_parallel": 3})
    assert again.status_code == 409
    assert user in again.json()["message"]
    assert api("GET", f"{POLICIES}/{user}/providers/anthropic").json()["max_parallel"] == 2
    assert api("DELETE", f"{POLICIES}/{user}/providers/anthropic").status_code == 204


def test_a_cost_is_exact_as_a_decimal_string_or_a_json_number(api: Api) -> None:
    user = unique("erin")
    for sent, kept in (("12.50", "12.50"), (0.1, "0.1"), (3, "3")):
        body = {"max_cost_usd": sent, "period": "day"}
        response = api("PUT", f"{POLICIES}/{user}", json=body)
        assert response.status_code in (200, 201), response.text
        assert response.json()["max_cost_usd"] == kept
    api("DELETE", f"{POLICIES}/{user}")


# --- refused input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "policy"),
        ({"rpm": 0}, "rpm"),
        ({"rpm": "5"}, "rpm"),  # no coercion
        ({"tpm": 1.5}, "tpm"),
        ({"max_parallel": True}, "max_parallel"),
        ({"max_cost_usd": "ten", "period": "day"}, "max_cost_usd"),
        ({"max_cost_usd": -1, "period": "day"}, "max_cost_usd"),
        ({"max_cost_usd": "0.0000001", "period": "day"}, "max_cost_usd"),
        ({"max_cost_usd": 5}, "period"),  # a budget needs a period
        ({"period": "day"}, "period"),  # and a period a budget
        ({"max_tokens": 10, "period": "year"}, "period"),
        ({"models": []}, "models"),
        ({"models": "claude-*"}, "models"),
        ({"models": [" claude-*"]}, "models"),
        ({"rpm": 5, "colour": "red"}, "colour"),
        ({"rpm": 5, "user": "someone"}, "user"),  # the path names the user
    ],
)
def test_a_refused_body_names_its_field(api: Api, body: dict[str, Any], field: str) -> None:
    response = api("PUT", f"{POLICIES}/{unique('frank')}", json=body)
    assert response.status_code == 400, response.text
    problem = response.json()
    assert field in {v["field"] for v in problem["validations"]}, problem
    assert problem["message"]


@pytest.mark.parametrize(
    ("method", "path", "field"),
    [
        ("PUT", POLICIES + "/bad name", "user"),
        ("PUT", POLICIES + "/-dash", "user"),
        ("PUT", POLICIES + "/alice/providers/Not_A_Provider", "provider"),
        ("GET", POLICIES + "/%2A%2A/effective", "user"),
    ],
)
def test_a_refused_path_names_its_field(api: Api, method: str, path: str, field: str) -> None:
    response = api(method, path, json={"rpm": 5})
    assert response.status_code == 400, response.text
    assert field in {v["field"] for v in response.json()["validations"]}


def test_a_patch_leaving_no_limit_or_naming_an_unknown_one_is_refused(api: Api) -> None:
    user = unique("gina")
    assert api("PUT", f"{POLICIES}/{user}", json={"rpm": 5}).status_code == 201
    emptied = api("PATCH", f"{POLICIES}/{user}", json={"rpm": None})
    assert emptied.status_code == 400
    assert emptied.json()["validations"][0]["field"] == "policy"
    assert api("GET", f"{POLICIES}/{user}").json()["rpm"] == 5  # nothing written
    malformed = api("PATCH", f"{POLICIES}/{user}", content=b"{not json")
    assert malformed.status_code == 400
    assert malformed.json()["validations"][0]["field"] == "body"
    api("DELETE", f"{POLICIES}/{user}")


# --- who may do what -----------------------------------------------------------------------------


def test_an_auditor_reads_policies_and_reports_but_writes_nothing(
    http: httpx.Client, api: Api, tokens: Tokens
) -> None:
    user = unique("hank")
    assert api("PUT", f"{POLICIES}/{user}", json={"rpm": 9}).status_code == 201
    auditor = as_caller(http, tokens.auditor)
    assert auditor("GET", POLICIES).status_code == 200
    assert auditor("GET", f"{POLICIES}/{user}").json()["rpm"] == 9
    assert auditor("GET", f"{POLICIES}/alice/effective").status_code == 200
    assert auditor("GET", BUDGETS).status_code == 200
    for method, path, body in (
        ("POST", POLICIES, {"user": unique("ivy"), "rpm": 1}),
        ("PUT", f"{POLICIES}/{user}", {"rpm": 1}),
        ("PATCH", f"{POLICIES}/{user}", {"rpm": 1}),
        ("DELETE", f"{POLICIES}/{user}", None),
        ("PUT", f"{POLICIES}/{user}/providers/openai", {"rpm": 1}),
    ):
        refused = auditor(method, path, json=body)
        assert refused.status_code == 403, (method, path)
        assert "admin token is required" in refused.json()["message"]
    assert api("GET", f"{POLICIES}/{user}").json()["rpm"] == 9


def test_a_proxy_token_reads_its_own_report_only(
    http: httpx.Client, api: Api, tokens: Tokens
) -> None:
    assert api("PUT", f"{POLICIES}/bob", json={"rpm": 7}).status_code in (200, 201)
    alice = as_caller(http, tokens.alice)
    mine = alice("GET", f"{POLICIES}/me/effective")
    assert mine.status_code == 200, mine.text
    assert mine.json()["user"] == "alice"
    assert alice("GET", f"{POLICIES}/alice/effective").json()["user"] == "alice"
    for path in (f"{POLICIES}/bob/effective", POLICIES, f"{POLICIES}/bob", f"{POLICIES}/*"):
        assert alice("GET", path).status_code == 403, path
    assert alice("PUT", f"{POLICIES}/alice", json={"rpm": 1000}).status_code == 403
    assert [report["user"] for report in alice("GET", BUDGETS).json()] == ["alice"]
    bob = as_caller(http, tokens.bob)
    (report,) = bob("GET", "/api/v2/ai-gateway/usage/budgets").json()
    assert report["user"] == "bob" and report["scopes"][0]["rpm"] == 7
    for caller in ({}, {"Authorization": "Bearer abp_nobody"}):
        assert http.get(f"{POLICIES}/me/effective", headers=caller).status_code == 401
    assert api("DELETE", f"{POLICIES}/bob").status_code == 204


# --- effective limits, spend and remaining budget -------------------------------------------------


def test_the_report_shows_limits_by_source_spend_and_what_remains(
    daemon: DaemonProcess, database: str, api: Api, tokens: Tokens
) -> None:
    user = unique("judy")
    daemon.create_token(user)
    assert api("PUT", f"{POLICIES}/*", json={"rpm": 60, "max_parallel": 4}).status_code in (
        200,
        201,
    )
    own = {"max_cost_usd": "10", "max_tokens": 50_000, "period": "day", "rpm": 120}
    assert api("PUT", f"{POLICIES}/{user}", json=own).status_code == 201
    at_openai = {"max_cost_usd": "2", "period": "week", "models": ["gpt-4o*"]}
    assert api("PUT", f"{POLICIES}/{user}/providers/openai", json=at_openai).status_code == 201
    add_spend(daemon, database, user, "*", tokens=12_000, cost_micros=2_500_000)
    add_spend(daemon, database, user, "openai", tokens=100, cost_micros=3_000_000)  # past it

    report = api("GET", f"{POLICIES}/{user}/effective").json()
    everywhere, openai = report["scopes"]
    assert everywhere["provider"] is None
    assert (everywhere["rpm"], everywhere["max_parallel"]) == (120, 4)
    assert everywhere["sources"] == {"budget": "user", "rpm": "user", "max_parallel": "default"}
    spend = everywhere["spend"]
    assert (spend["period"], spend["cost_usd"], spend["tokens"]) == ("day", "2.5", 12_000)
    assert (spend["remaining_cost_usd"], spend["remaining_tokens"]) == ("7.5", 38_000)
    assert spend["fraction_used"] == pytest.approx(0.25)
    assert spend["period_start"].endswith("T00:00:00Z")
    assert openai["provider"] == "openai" and openai["models"] == ["gpt-4o*"]
    assert openai["spend"]["remaining_cost_usd"] == "0"  # never below zero
    assert openai["spend"]["remaining_tokens"] is None and openai["spend"]["fraction_used"] > 1

    by_user = {r["user"]: r for r in api("GET", BUDGETS).json()}
    assert by_user[user] == report
    assert {"alice", "bob"} <= set(by_user)  # every user with a token
    assert by_user["alice"]["scopes"][0]["spend"] is None  # the default has no budget
    for path in (f"{POLICIES}/{user}/providers/openai", f"{POLICIES}/{user}", f"{POLICIES}/*"):
        assert api("DELETE", path).status_code == 204


def test_a_user_without_any_policy_has_no_scope(api: Api) -> None:
    report = api("GET", f"{POLICIES}/nobody-at-all/effective")
    assert report.status_code == 200
    assert report.json() == {"user": "nobody-at-all", "scopes": []}


def test_a_proxy_token_sees_the_spend_of_its_real_requests_and_what_remains(
    daemon: DaemonProcess, http: httpx.Client, api: Api
) -> None:
    """Spend counted by the proxy itself: an OpenAI SDK request through the proxy, priced,
    counted after its response, reconciled into the shared counters and read back by the
    user with their own token; the budget then refuses the next request."""
    user = unique("spender")
    token = daemon.create_token(user)
    budget = {"max_cost_usd": "0.00005", "period": "day"}  # less than one request's cost
    assert api("PUT", f"{POLICIES}/{user}", json=budget).status_code == 201
    # In force within a second (the write asks for a reload); a request admitted before that
    # counts under no policy. Wait for a reload after the write, as a loaded CI box may not.
    daemon.reload_and_wait()
    client = daemon.openai_client(token)
    messages: Any = [{"role": "user", "content": "hi"}]
    client.chat.completions.create(model="gpt-4o", messages=messages)
    me = as_caller(http, token)

    def spent() -> dict[str, Any] | None:
        spend = me("GET", f"{POLICIES}/me/effective").json()["scopes"][0]["spend"]
        return spend if spend["tokens"] else None

    spend = daemon.wait_for(spent, timeout=5.0, message="the request's spend reported")
    assert Decimal(spend["cost_usd"]) > Decimal("0.00005") and spend["fraction_used"] > 1
    assert spend["remaining_cost_usd"] == "0" and spend["remaining_tokens"] is None
    with pytest.raises(openai.PermissionDeniedError) as refused:
        client.chat.completions.create(model="gpt-4o", messages=messages)
    assert refused.value.code == "budget_exceeded"
    assert api("DELETE", f"{POLICIES}/{user}").status_code == 204


# --- a write reloads at once ---------------------------------------------------------------------


def test_every_policy_write_reloads_the_daemon_within_a_second(
    daemon: DaemonProcess, api: Api
) -> None:
    user = unique("kim")
    reloads = "providers_last_reload_success_timestamp_seconds"
    for method, path, body in (
        ("POST", POLICIES, {"user": user, "rpm": 5}),
        ("PUT", f"{POLICIES}/{user}", {"rpm": 6}),
        ("PATCH", f"{POLICIES}/{user}", {"tpm": 600}),
        ("DELETE", f"{POLICIES}/{user}", None),
    ):
        before = daemon.metric(reloads) or 0.0
        sent = time.monotonic()
        assert api(method, path, json=body).status_code < 300, (method, path)
        daemon.wait_for(lambda b=before: (daemon.metric(reloads) or 0.0) > b, timeout=1.0)
        assert time.monotonic() - sent < 1.0, (method, path)


def test_without_proxy_tokens_the_budgets_report_the_requests_without_a_token(
    upstream: FakeUpstream,
) -> None:
    """``auth: none``: every request is the user ``""``, which the default policies limit; the
    budgets list it last, with what its requests spent."""
    config = {"auth": "none", "upstream_ca_file": upstream.ca_pem_path}
    with DaemonProcess(config) as d, httpx.Client(base_url=d.admin_url, trust_env=False) as http:
        d.edit_provider("openai", upstream.base_url, "sk-openai-central")
        d.reload_and_wait()
        admin = as_caller(
            http,
            d.cli("admin-tokens", "create", "ops", "--role", "admin", check=True).stdout.strip(),
        )
        budget = {"max_tokens": 1_000_000, "period": "month"}
        assert admin("PUT", f"{POLICIES}/*", json=budget).status_code == 201
        messages: Any = [{"role": "user", "content": "hi"}]
        d.openai_client().chat.completions.create(model="gpt-4o", messages=messages)

        def anonymous_spend() -> dict[str, Any] | None:
            reports = admin("GET", BUDGETS).json()
            spend = reports[-1]["scopes"][0]["spend"] if reports[-1]["user"] == "" else None
            return spend if spend and spend["tokens"] else None

        spend = d.wait_for(anonymous_spend, timeout=5.0, message="the tokenless request counted")
        assert spend["period"] == "month" and spend["remaining_tokens"] < 1_000_000
