"""End to end: the data API's reads (CONTRACT 12) on a running daemon, over real HTTP with
httpx: interceptions, sessions, a session's detail, clients, models and usage, under both
``/api/v2/aibridge/`` and ``/api/v2/ai-gateway/``; every role (admin, auditor, proxy token) and
every error (400 naming the field, 401, 403, 404) in the contract's shape.

Records come from real traffic through the proxy (the official Anthropic and OpenAI SDKs, two
users, a Claude Code tool round) and, for pagination, from records written with the Store.
Admin and auditor tokens are stored as hashes with ``Store.insert_admin_token``.
"""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from aibridgeproxyd.model import InterceptionRecord
from aibridgeproxyd.store import Store
from aibridgeproxyd.tokens import hash_token
from tests.fakes.upstream import FakeUpstream
from tests.harness import DaemonProcess
from tests.test_e2e_sessions import REQUEST_ID_HEADER, ClaudeCode
from tests.test_store import interception

PREFIXES = ("/api/v2/aibridge", "/api/v2/ai-gateway")
CONTRACT_FIELDS = {
    "id", "connect_id", "initiator", "provider", "provider_name", "model", "client",
    "user_agent", "client_session_id", "session_id", "thread_parent_id", "thread_root_id",
    "credential_kind", "credential_hint", "method", "path", "status", "streamed",
    "input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens",
    "reasoning_output_tokens", "cost_micros", "started_at", "ended_at", "ttfb_ms",
    "duration_ms", "error", "prompts", "tool_calls", "thoughts",
}  # fmt: skip
# Records written with the Store for carol, a user with no traffic: 25, one a minute.
CAROL_RECORDS = 25


class Traffic:
    """What the module's traffic produced: tokens by role or user, and request ids."""

    def __init__(self) -> None:
        self.tokens: dict[str, str] = {}
        self.alice_session = str(uuid.uuid4())
        self.alice_ids: list[str] = []
        self.bob_ids: list[str] = []


def store_records(daemon: DaemonProcess, records: list[InterceptionRecord]) -> None:
    async def write() -> None:
        async with await Store.open(daemon.data_dir / "aibridgeproxyd.db") as store:
            await store.insert_interceptions(records)

    asyncio.run(write())


def add_admin_token(daemon: DaemonProcess, name: str, role: str) -> str:
    token = "abp_admin_" + secrets.token_urlsafe(24)

    async def write() -> None:
        async with await Store.open(daemon.data_dir / "aibridgeproxyd.db") as store:
            await store.insert_admin_token(name, hash_token(token), role)

    asyncio.run(write())
    return token


def carol_records() -> list[InterceptionRecord]:
    return [
        interception(
            f"carol-{n:02d}", f"2026-01-01T00:{n:02d}:00.000Z", initiator="carol",
            client="Claude Code", model="claude-haiku-4-5", cost_micros=10 * n,
            client_session_id=f"carol-session-{n // 5}",
        )
        for n in range(CAROL_RECORDS)
    ]  # fmt: skip


@pytest.fixture(scope="module")
def daemon(upstream: FakeUpstream) -> Iterator[DaemonProcess]:
    with DaemonProcess({"upstream_ca_file": upstream.ca_pem_path}) as d:
        d.edit_provider("openai", upstream.base_url, "sk-openai-central")
        d.edit_provider("anthropic", upstream.origin, "sk-ant-central")
        d.reload_and_wait()
        yield d


@pytest.fixture(scope="module")
def traffic(daemon: DaemonProcess) -> Traffic:
    """Alice: a Claude Code tool round (one session, two interceptions) through the Anthropic
    SDK; bob: one chat completion through the OpenAI SDK; carol: records written directly."""
    made = Traffic()
    made.tokens["admin"] = add_admin_token(daemon, "ops-admin", "admin")
    made.tokens["auditor"] = add_admin_token(daemon, "ops-auditor", "auditor")
    made.tokens["alice"] = daemon.create_token("alice", reload=False)
    made.tokens["bob"] = daemon.create_token("bob")
    ids, _, _ = ClaudeCode(
        daemon, made.tokens["alice"], made.alice_session, "Weather <b>in</b> Paris?"
    ).tool_round()
    made.alice_ids = list(ids)
    with daemon.openai_client(made.tokens["bob"]) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hello from bob"}]
        )
        made.bob_ids = [raw.headers[REQUEST_ID_HEADER]]
    store_records(daemon, carol_records())
    wanted = {*made.alice_ids, *made.bob_ids}

    def all_stored() -> bool:
        page = get(daemon, made.tokens["admin"], "/interceptions", limit=1000).json()
        return wanted <= {r["id"] for r in page["results"]}

    daemon.wait_for(all_stored, message="the module's records")
    return made


def get(
    daemon: DaemonProcess,
    token: str | None,
    path: str,
    prefix: str = PREFIXES[0],
    header: str = "bearer",
    **params: Any,
) -> httpx.Response:
    headers = {}
    if token is not None:
        headers = (
            {"Authorization": f"Bearer {token}"}
            if header == "bearer"
            else {"Coder-Session-Token": token}
        )
    with httpx.Client(trust_env=False, timeout=10) as client:
        return client.get(daemon.admin_url + prefix + path, headers=headers, params=params)


def problem(response: httpx.Response, status: int) -> dict[str, Any]:
    """The error body, checked to be in the contract's shape with ``status``."""
    assert response.status_code == status, response.text
    body = response.json()
    assert isinstance(body["message"], str) and body["message"]
    assert isinstance(body["detail"], str)
    for validation in body.get("validations", []):
        assert set(validation) == {"field", "detail"}
    return dict(body)


def fields_at_fault(response: httpx.Response) -> list[str]:
    return [v["field"] for v in problem(response, 400)["validations"]]


# --- authentication -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/interceptions", "/sessions", "/clients", "/models", "/usage"])
def test_every_read_without_a_token_or_with_an_unknown_one_is_401(
    daemon: DaemonProcess, traffic: Traffic, path: str
) -> None:
    for prefix in PREFIXES:
        missing = get(daemon, None, path, prefix)
        problem(missing, 401)
        assert missing.headers["www-authenticate"].startswith("Bearer")
        problem(get(daemon, "abp_unknown", path, prefix), 401)
        problem(get(daemon, "abp_unknown", path, prefix, header="session"), 401)


def test_a_token_works_as_bearer_and_as_coder_session_token(
    daemon: DaemonProcess, traffic: Traffic
) -> None:
    for header in ("bearer", "session"):
        response = get(daemon, traffic.tokens["auditor"], "/interceptions", header=header)
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"


# --- interceptions --------------------------------------------------------------------------------


def test_admin_and_auditor_see_every_users_records_with_the_contract_fields(
    daemon: DaemonProcess, traffic: Traffic
) -> None:
    for role in ("admin", "auditor"):
        page = get(daemon, traffic.tokens[role], "/interceptions", limit=1000).json()
        assert page["count"] == len(page["results"]) == 3 + CAROL_RECORDS
        assert {r["initiator"] for r in page["results"]} == {"alice", "bob", "carol"}
        assert all(set(r) == CONTRACT_FIELDS for r in page["results"])


def test_a_recorded_tool_round_reads_back_with_prompts_tool_calls_and_lineage(
    daemon: DaemonProcess, traffic: Traffic
) -> None:
    page = get(
        daemon, traffic.tokens["admin"], "/interceptions", q=f"session_id:{traffic.alice_session}"
    ).json()
    second, first = page["results"]  # newest first
    assert [first["id"], second["id"]] == traffic.alice_ids
    assert first["prompts"] == ["Weather <b>in</b> Paris?"]  # as recorded, not escaped
    assert [call["tool"] for call in first["tool_calls"]] == ["get_weather"]
    assert (second["thread_parent_id"], second["thread_root_id"]) == (first["id"], first["id"])
    assert (first["provider"], first["client"], first["credential_kind"]) == (
        "anthropic",
        "Claude Code",
        "central",
    )
    assert first["streamed"] is True and first["input_tokens"] is not None


def test_a_proxy_token_sees_only_its_own_records_and_initiator_me_is_implied(
    daemon: DaemonProcess, traffic: Traffic
) -> None:
    token = traffic.tokens["alice"]
    for q in ("", "initiator:me", "initiator:alice"):
        page = get(daemon, token, "/interceptions", q=q).json()
        assert sorted(r["id"] for r in page["results"]) == sorted(traffic.alice_ids), q
        assert page["count"] == 2
    bob = get(daemon, traffic.tokens["bob"], "/interceptions").json()
    assert [r["id"] for r in bob["results"]] == traffic.bob_ids


@pytest.mark.parametrize("path", ["/interceptions", "/sessions", "/usage"])
def test_a_proxy_token_asking_for_another_initiator_is_403(
    daemon: DaemonProcess, traffic: Traffic, path: str
) -> None:
    for prefix in PREFIXES:
        problem(get(daemon, traffic.tokens["alice"], path, prefix, q="initiator:bob"), 403)


def test_a_proxy_token_cannot_page_after_another_users_record(
    daemon: DaemonProcess, traffic: Traffic
) -> None:
    response = get(daemon, traffic.tokens["alice"], "/interceptions", after_id=traffic.bob_ids[0])
    assert fields_at_fault(response) == ["after_id"]


def test_pages_follow_after_id_newest_first_under_both_prefixes(
    daemon: DaemonProcess, traffic: Traffic
) -> None:
    everything = get(daemon, traffic.tokens["admin"], "/interceptions", q="initiator:carol")
    expected = [r["id"] for r in everything.json()["results"]]
    assert expected == [f"carol-{n:02d}" for n in reversed(range(CAROL_RECORDS))]
    for prefix in PREFIXES:
        seen: list[str] = []
        params: dict[str, Any] = {"q": "initiator:carol", "limit": 10}
        while True:
            page = get(daemon, traffic.tokens["auditor"], "/interceptions", prefix, **params)
            body = page.json()
            assert body["count"] == CAROL_RECORDS
            seen += [r["id"] for r in body["results"]]
            if len(body["results"]) < 10:
                break
            params["after_id"] = body["results"][-1]["id"]
        assert seen == expected


@pytest.mark.parametrize(
    ("q", "expected"),
    [
        ("provider:anthropic", {"alice"}),
        ("provider_name:openai", {"bob"}),
        ("model:claude-haiku-4-5", {"carol"}),
        ('client:"Claude Code" initiator:carol', {"carol"}),
        ("started_before:2026-01-01T00:10:00Z", {"carol"}),
        ("started_after:2026-02-01T00:00:00Z", {"alice", "bob"}),
    ],
)
def test_each_filter_key_narrows_the_records(
    daemon: DaemonProcess, traffic: Traffic, q: str, expected: set[str]
) -> None:
    page = get(daemon, traffic.tokens["admin"], "/interceptions", q=q, limit=1000).json()
    assert {r["initiator"] for r in page["results"]} == expected
    assert page["count"] == len(page["results"])


@pytest.mark.parametrize(
    ("params", "field", "words"),
    [
        ({"q": "colour:red"}, "q", "unknown key 'colour'"),
        ({"q": "model"}, "q", "not key:value"),
        ({"q": "model:a model:b"}, "q", "given twice"),
        ({"q": 'client:"Claude Code'}, "q", "quotation"),
        ({"q": "client:Emacs"}, "q", "client 'Emacs'"),
        ({"q": "started_after:yesterday"}, "q", "started_after"),
        ({"limit": 0}, "limit", ""),
        ({"limit": 1001}, "limit", ""),
        ({"limit": "ten"}, "limit", ""),
        ({"after_id": "no-such-record"}, "after_id", "unknown interception"),
    ],
)
def test_bad_interception_parameters_are_400_naming_the_field(
    daemon: DaemonProcess, traffic: Traffic, params: dict[str, Any], field: str, words: str
) -> None:
    response = get(daemon, traffic.tokens["admin"], "/interceptions", **params)
    assert fields_at_fault(response) == [field]
    assert words in response.json()["message"]


# --- sessions ---------------------------------------------------------------------------------------


def test_sessions_list_pages_after_a_session_id(daemon: DaemonProcess, traffic: Traffic) -> None:
    expected = [f"carol-session-{n}" for n in reversed(range(CAROL_RECORDS // 5))]
    for prefix in PREFIXES:
        seen: list[str] = []
        params: dict[str, Any] = {"q": "initiator:carol", "limit": 2}
        while True:
            body = get(daemon, traffic.tokens["admin"], "/sessions", prefix, **params).json()
            assert body["count"] == len(expected)
            seen += [s["id"] for s in body["sessions"]]
            if len(body["sessions"]) < 2:
                break
            params["after_session_id"] = body["sessions"][-1]["id"]
        assert seen == expected
    problem(get(daemon, traffic.tokens["admin"], "/sessions", after_session_id="nope"), 400)


def test_a_session_lists_and_shows_its_thread_with_usage(
    daemon: DaemonProcess, traffic: Traffic
) -> None:
    session_id = traffic.alice_session
    for role in ("admin", "auditor", "alice"):
        listed = get(daemon, traffic.tokens[role], "/sessions", q=f"session_id:{session_id}")
        (summary,) = listed.json()["sessions"]
        assert (summary["id"], summary["initiator"], summary["threads"]) == (session_id, "alice", 1)
        assert summary["last_prompt"] == "Weather <b>in</b> Paris?"
        for prefix in PREFIXES:
            shown = get(daemon, traffic.tokens[role], f"/sessions/{session_id}", prefix).json()
            (thread,) = shown["threads"]
            assert [i["id"] for i in thread["interceptions"]] == traffic.alice_ids
            assert thread["token_usage"]["input_tokens"] is not None
            assert shown["token_usage_summary"] == summary["token_usage_summary"]


def test_another_users_or_an_unknown_session_is_404(
    daemon: DaemonProcess, traffic: Traffic
) -> None:
    session_id = traffic.alice_session
    problem(get(daemon, traffic.tokens["bob"], f"/sessions/{session_id}"), 404)
    problem(get(daemon, traffic.tokens["admin"], "/sessions/no-such-session"), 404)
    listed = get(daemon, traffic.tokens["bob"], "/sessions").json()
    assert [s["initiator"] for s in listed["sessions"]] == ["bob"]


# --- clients, models, usage -------------------------------------------------------------------------


def test_clients_and_models_are_the_distinct_values_the_caller_may_see(
    daemon: DaemonProcess, traffic: Traffic
) -> None:
    for prefix in PREFIXES:
        clients = get(daemon, traffic.tokens["auditor"], "/clients", prefix).json()
        assert clients == ["Claude Code", "Unknown"]
        models = get(daemon, traffic.tokens["admin"], "/models", prefix).json()
        assert set(models) >= {"claude-haiku-4-5", "claude-sonnet-4-6", "gpt-4o-mini"}
        assert get(daemon, traffic.tokens["bob"], "/models", prefix).json() == ["gpt-4o-mini"]
        assert get(daemon, traffic.tokens["alice"], "/clients", prefix).json() == ["Claude Code"]


def test_usage_groups_requests_tokens_and_cost(daemon: DaemonProcess, traffic: Traffic) -> None:
    admin = traffic.tokens["admin"]
    by_user = {g["key"]: g for g in get(daemon, admin, "/usage", group_by="initiator").json()}
    assert {key: g["requests"] for key, g in by_user.items()} == {
        "alice": 2,
        "bob": 1,
        "carol": CAROL_RECORDS,
    }
    assert by_user["carol"]["cost_micros"] == sum(10 * n for n in range(CAROL_RECORDS))
    days = get(daemon, admin, "/usage", PREFIXES[1], group_by="day", q="initiator:carol").json()
    assert [(g["key"], g["requests"]) for g in days] == [("2026-01-01", CAROL_RECORDS)]
    for group_by in ("provider", "provider_name", "model", "client"):
        groups = get(daemon, admin, "/usage", group_by=group_by).json()
        assert sum(g["requests"] for g in groups) == CAROL_RECORDS + 3
        assert all(set(g) == {"key", "requests", "input_tokens", "output_tokens",
                              "cache_read_input_tokens", "cache_creation_input_tokens",
                              "cost_micros"} for g in groups)  # fmt: skip
    (mine,) = get(daemon, traffic.tokens["alice"], "/usage", group_by="initiator").json()
    assert (mine["key"], mine["requests"]) == ("alice", 2)
    response = get(daemon, admin, "/usage", group_by="week")
    assert fields_at_fault(response) == ["group_by"]
