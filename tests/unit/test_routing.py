"""The routing decision, without a proxy: credential mode, every refusal, the central key, the
proxy token scrubbed, and key failover with a controlled clock."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from mitmproxy import http

from aibridgeproxyd.adapters import ADAPTERS
from aibridgeproxyd.credentials import CredentialMode
from aibridgeproxyd.interception.routing import (
    Refusal,
    Route,
    credential_mode_for,
    decide_route,
    exhausted,
    fail_over,
    needs_failover,
    next_key,
    path_refusal,
    route_request,
    unclaimed_host,
)
from aibridgeproxyd.interception.state import ConnectInfo, RequestContext, RoutingState
from aibridgeproxyd.keypool import UNAUTHORIZED_SECONDS, KeyPool
from aibridgeproxyd.model import Provider
from tests.unit.test_adapters_common import client_request, routed

TOKEN = "proxy-token-0123456789"
PLACEHOLDER = "aibridgeproxyd"
KEYS = ("sk-central-one", "sk-central-two")
AWS_SETTINGS = {
    "region": "us-east-1",
    "access_key_id": "AKIDUNITEXAMPLE",
    "secret_access_key": "unit/secret+key/abcdef012345",
    "model": "m",
}
CHAT_URL = "https://api.openai.com/v1/chat/completions"
CHAT = {"model": "gpt-4o", "messages": []}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_ctx(provider: Provider) -> RequestContext:
    connect = ConnectInfo("api.openai.com", 443, intercept=True, identity="alice")
    connect.proxy_token = TOKEN
    return RequestContext("r-1", connect, provider, ADAPTERS[provider.type])


def route(
    provider: Provider,
    headers: dict[str, str] | None = None,
    url: str = CHAT_URL,
    pool: KeyPool | None = None,
    body: Any = CHAT,
) -> tuple[http.Request, RequestContext, Refusal | None]:
    request = client_request("POST", url, body, headers)
    ctx = make_ctx(provider)
    refusal = route_request(request, ctx, PLACEHOLDER, pool or KeyPool())
    return request, ctx, refusal


# --- credential mode -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("provider_type", "headers", "mode"),
    [
        ("openai", {}, CredentialMode.CENTRAL),
        ("openai", {"authorization": f"Bearer {TOKEN}"}, CredentialMode.CENTRAL),
        ("openai", {"authorization": f"Bearer {PLACEHOLDER}"}, CredentialMode.CENTRAL),
        ("openai", {"authorization": "Bearer sk-users-own"}, CredentialMode.BYOK),
        ("copilot", {}, CredentialMode.BYOK),  # always the user's own credential
        ("bedrock", {"x-api-key": "sk-users-own"}, CredentialMode.SIGNED),
    ],
)
def test_the_credential_mode_follows_the_adapter_and_the_headers(
    provider_type: str, headers: dict[str, str], mode: CredentialMode
) -> None:
    request = client_request("POST", CHAT_URL, CHAT, headers)
    assert credential_mode_for(request.headers, ADAPTERS[provider_type], TOKEN, PLACEHOLDER) is mode


def test_the_credential_modes_keep_the_values_records_and_traces_carry() -> None:
    assert [str(mode) for mode in CredentialMode] == ["central", "byok", "signed"]


def test_each_adapter_declares_its_credential_modes() -> None:
    assert ADAPTERS["openai"].credential_modes == {CredentialMode.CENTRAL, CredentialMode.BYOK}
    assert ADAPTERS["copilot"].byok_only and not ADAPTERS["copilot"].signs_requests
    assert ADAPTERS["bedrock"].signs_requests and not ADAPTERS["bedrock"].byok_only


# --- refusals --------------------------------------------------------------------------------


def test_a_dot_segment_path_is_refused_as_invalid_path() -> None:
    refusal = path_refusal("/v1/%2e%2e/admin")
    assert refusal is not None and (refusal.status, refusal.code) == (400, "invalid_path")
    assert path_refusal("/v1/chat/completions") is None


def test_an_unclaimed_host_is_refused_as_provider_unavailable() -> None:
    refusal = unclaimed_host("api.openai.com")
    assert (refusal.status, refusal.code) == (503, "provider_unavailable")
    assert "api.openai.com" in refusal.message


def test_byok_is_refused_when_the_provider_does_not_allow_it() -> None:
    _, ctx, refusal = route(
        routed("openai", keys=KEYS, allow_byok=False), {"authorization": "Bearer sk-users-own"}
    )
    assert refusal == Refusal(
        403,
        "This provider does not accept your own API key; to use the central key, send "
        f"'{PLACEHOLDER}' (or your proxy token) as the API key instead.",
        "byok_not_allowed",
    )
    assert ctx.routing.credential_mode is CredentialMode.BYOK and ctx.routing.key_index is None


def test_the_model_asked_for_is_recorded_before_the_route_is_decided() -> None:
    """Read before the rewrite (and before a refusal), so a refused request's record names it."""
    _, ctx, refusal = route(
        routed("openai", keys=KEYS, allow_byok=False), {"authorization": "Bearer sk-users-own"}
    )
    assert refusal is not None and ctx.recording.request_model == "gpt-4o"


def test_central_mode_without_keys_is_refused_as_no_key_configured() -> None:
    _, ctx, refusal = route(routed("openai", keys=(), allow_byok=True))
    assert refusal is not None and (refusal.status, refusal.code) == (403, "no_key_configured")
    assert ctx.routing.credential_mode is CredentialMode.CENTRAL


def test_every_key_rate_limited_is_refused_429_with_retry_after() -> None:
    clock = Clock()
    pool = KeyPool(clock)
    for key in KEYS:
        pool.cool_down("openai", key, 429, 7.0)
    clock.now += 2.5
    _, _, refusal = route(routed("openai", keys=KEYS), pool=pool)
    assert refusal is not None
    assert (refusal.status, refusal.code) == (429, "all_keys_rate_limited")
    assert refusal.headers == {"Retry-After": "5"}  # 4.5 s left, rounded up


def test_every_key_rejected_is_refused_502() -> None:
    pool = KeyPool(Clock())
    for key in KEYS:
        pool.cool_down("openai", key, 401, None)
    _, _, refusal = route(routed("openai", keys=KEYS), pool=pool)
    assert refusal is not None
    assert (refusal.status, refusal.code, refusal.headers) == (502, "all_keys_rejected", {})


def test_an_adapters_route_refusal_becomes_a_refusal() -> None:
    provider = routed("bedrock", settings=AWS_SETTINGS)
    _, ctx, refusal = route(provider, url="https://api.anthropic.com/v1/models", body=None)
    assert refusal is not None and (refusal.status, refusal.code) == (404, "unsupported_endpoint")
    assert ctx.transform is None


# --- routes ----------------------------------------------------------------------------------


def test_central_mode_injects_the_first_usable_key_and_drops_the_proxy_token() -> None:
    request, ctx, refusal = route(
        routed("openai", keys=KEYS), {"authorization": f"Bearer {TOKEN}", "x-api-key": TOKEN}
    )
    assert refusal is None
    assert request.headers["authorization"] == f"Bearer {KEYS[0]}"
    assert "x-api-key" not in request.headers
    assert (ctx.routing.credential_mode, ctx.routing.key_index) == (CredentialMode.CENTRAL, 0)
    assert ctx.routing.tried_keys == {0}


def test_central_mode_skips_a_key_cooling_down() -> None:
    pool = KeyPool(Clock())
    pool.cool_down("openai", KEYS[0], 429, None)
    request, ctx, refusal = route(routed("openai", keys=KEYS), pool=pool)
    assert refusal is None and ctx.routing.key_index == 1
    assert request.headers["authorization"] == f"Bearer {KEYS[1]}"


def test_byok_passes_the_users_key_and_drops_only_the_proxys_credentials() -> None:
    request, ctx, refusal = route(
        routed("openai", keys=KEYS, allow_byok=True),
        {"authorization": "Bearer sk-users-own", "x-api-key": TOKEN},
    )
    assert refusal is None and ctx.routing.credential_mode is CredentialMode.BYOK
    assert request.headers["authorization"] == "Bearer sk-users-own"
    assert "x-api-key" not in request.headers and ctx.routing.key_index is None


def test_signed_mode_removes_every_client_credential() -> None:
    request, ctx, refusal = route(
        routed("bedrock", settings=AWS_SETTINGS),
        {"x-api-key": "sk-users-own"},
        url="https://api.anthropic.com/v1/messages",
        body={"model": "claude", "max_tokens": 1, "messages": []},
    )
    assert refusal is None and ctx.routing.credential_mode is CredentialMode.SIGNED
    assert "x-api-key" not in request.headers
    assert request.headers["authorization"].startswith("AWS4-HMAC-SHA256 ")


def test_the_proxy_token_is_scrubbed_from_other_headers_and_the_query(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level("INFO", logger="aibridgeproxyd.route"):
        request, _, refusal = route(
            routed("openai", keys=KEYS),
            {"x-custom": f"token={TOKEN}", "proxy-authorization": "Basic xyz"},
            url=f"{CHAT_URL}?t={TOKEN}&keep=1",
        )
    assert refusal is None
    assert "x-custom" not in request.headers and "proxy-authorization" not in request.headers
    assert request.query.get("t") is None and request.query["keep"] == "1"
    assert TOKEN not in str(request.headers) + request.path
    (line,) = [r.getMessage() for r in caplog.records if "proxy token removed" in r.getMessage()]
    assert line == "proxy token removed from header x-custom, query parameter t"


def test_a_credential_in_the_query_is_judged_like_a_header() -> None:
    """Gemini's ?key=: the proxy token there means the central key, and never goes upstream."""
    provider = routed("google", keys=KEYS)
    url = f"https://generativelanguage.googleapis.com/v1beta/models/g:generateContent?key={TOKEN}"
    request, ctx, refusal = route(provider, url=url)
    assert refusal is None and ctx.routing.credential_mode is CredentialMode.CENTRAL
    assert TOKEN not in request.path and request.headers["x-goog-api-key"] == KEYS[0]


def test_decide_route_is_a_value_for_byok_only_adapters_even_without_allow_byok() -> None:
    provider = routed("copilot")
    decision = decide_route(
        CredentialMode.BYOK, provider, ADAPTERS["copilot"], KeyPool(), RoutingState(), PLACEHOLDER
    )
    assert decision == Route(CredentialMode.BYOK)


# --- failover --------------------------------------------------------------------------------


def test_only_a_central_key_answered_401_or_429_fails_over() -> None:
    routing = RoutingState()
    assert not needs_failover(routing, 401)  # BYOK or signed: the client's own answer
    routing.use_key(0)
    assert needs_failover(routing, 401) and needs_failover(routing, 429)
    assert not needs_failover(routing, 403) and not needs_failover(routing, 500)


def test_a_rate_limited_key_cools_down_for_retry_after_and_the_next_key_is_used() -> None:
    clock, provider = Clock(), routed("openai", keys=KEYS)
    pool, routing = KeyPool(clock), RoutingState()
    routing.use_key(0)
    assert next_key(pool, provider, routing, 429, "20") == 1
    assert (routing.key_index, routing.tried_keys, routing.saw_rate_limit) == (1, {0, 1}, True)
    assert pool.select("openai", KEYS) == 1  # key 0 rests
    clock.now += 20
    assert pool.select("openai", KEYS) == 0


def test_a_rejected_key_rests_for_the_unauthorized_cool_down() -> None:
    clock, provider = Clock(), routed("openai", keys=KEYS)
    pool, routing = KeyPool(clock), RoutingState()
    routing.use_key(0)
    assert next_key(pool, provider, routing, 401, "1") == 1  # Retry-After counts for 429 only
    assert not routing.saw_rate_limit
    clock.now += UNAUTHORIZED_SECONDS - 1
    assert pool.select("openai", KEYS) == 1
    clock.now += 1
    assert pool.select("openai", KEYS) == 0


def test_the_last_key_failing_exhausts_429_after_a_rate_limit_else_502() -> None:
    provider = routed("openai", keys=KEYS)
    pool, routing = KeyPool(Clock()), RoutingState()
    routing.use_key(0)
    assert next_key(pool, provider, routing, 401, None) == 1
    assert next_key(pool, provider, routing, 401, None) is None
    assert exhausted(pool, provider, routing.saw_rate_limit).code == "all_keys_rejected"

    pool, routing = KeyPool(Clock()), RoutingState()
    routing.use_key(0)
    assert next_key(pool, provider, routing, 401, None) == 1
    assert next_key(pool, provider, routing, 429, "3") is None
    refusal = exhausted(pool, provider, routing.saw_rate_limit)
    assert (refusal.status, refusal.code, refusal.headers) == (
        429,
        "all_keys_rate_limited",
        {"Retry-After": "3"},
    )


def test_a_key_tried_for_this_request_is_not_tried_again_even_once_rested() -> None:
    clock, provider = Clock(), routed("openai", keys=KEYS)
    pool, routing = KeyPool(clock), RoutingState()
    routing.use_key(0)
    assert next_key(pool, provider, routing, 429, "1") == 1
    clock.now += 5  # key 0 has rested, but this request already had it refused
    assert next_key(pool, provider, routing, 429, "1") is None


def test_failing_over_gives_the_next_key_then_marks_the_keys_exhausted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    provider = routed("openai", keys=KEYS)
    ctx, pool = make_ctx(provider), KeyPool(Clock())
    ctx.routing.use_key(0)
    with caplog.at_level(logging.WARNING, "aibridgeproxyd.route"):
        assert fail_over(pool, ctx, 429, "5") == KEYS[1]
        assert not ctx.routing.keys_exhausted
        assert fail_over(pool, ctx, 401, None) is None
    assert ctx.routing.keys_exhausted and ctx.routing.saw_rate_limit
    assert [r.getMessage() for r in caplog.records] == [
        "key 1 of provider openai answered 429; failing over to key 2",
        "key 2 of provider openai answered 401 and no key is left",
    ]
