import base64

import pytest
from mitmproxy import http

from aibridgeproxyd.adapters import map_path
from aibridgeproxyd.config import parse_cidrs
from aibridgeproxyd.credentials import CredentialMode, credential_mode, remove_proxy_credentials
from aibridgeproxyd.destinations import DestinationPolicy
from aibridgeproxyd.errors import error_body
from aibridgeproxyd.model import ApiFormat, ProviderRecord, Status, TokenRecord
from aibridgeproxyd.providers import evaluate_providers
from aibridgeproxyd.proxy_auth import token_from_proxy_authorization
from aibridgeproxyd.snapshot import build_snapshot
from aibridgeproxyd.tokens import hash_token


def basic(text: str, scheme: str = "Basic") -> str:
    return f"{scheme} {base64.b64encode(text.encode()).decode()}"


# --- proxy auth header parsing ---


@pytest.mark.parametrize(
    ("header", "token"),
    [
        (basic("ignored:tok"), "tok"),
        (basic("anything:tok:with:colons"), "tok:with:colons"),
        (basic("user:tok", "bAsIc"), "tok"),
        (basic(":tok"), "tok"),
        (basic("user:"), None),
        (basic("no-colon"), None),
        ("Bearer tok", None),
        ("Basic !!!notbase64", None),
        ("Basic", None),
        ("", None),
        (None, None),
    ],
)
def test_proxy_authorization_token_is_the_basic_password(
    header: str | None, token: str | None
) -> None:
    assert token_from_proxy_authorization(header) == token


# --- destination blocking ---


@pytest.mark.parametrize(
    "address",
    [
        "10.1.2.3",
        "127.0.0.1",
        "169.254.169.254",
        "100.64.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "0.0.0.0",
        "::1",
        "fd00::1",
        "fe80::1",
        "::ffff:10.0.0.1",
        "::ffff:127.0.0.1",
        "64:ff9b::a00:1",
        "2002::1",
        "240.0.0.1",
        "198.18.0.1",
        "::",
    ],
)
def test_private_and_reserved_destinations_are_blocked(address: str) -> None:
    assert DestinationPolicy().is_blocked(address)


@pytest.mark.parametrize(
    "address", ["1.1.1.1", "8.8.8.8", "2606:4700::1111", "::ffff:1.1.1.1", "172.32.0.1"]
)
def test_public_destinations_are_allowed(address: str) -> None:
    assert not DestinationPolicy().is_blocked(address)


def test_allowed_private_cidrs_are_exceptions() -> None:
    policy = DestinationPolicy(parse_cidrs(["127.0.0.0/8", "fd00::/8"]))
    assert not policy.is_blocked("127.0.0.1")
    assert not policy.is_blocked("::ffff:127.0.0.1")
    assert not policy.is_blocked("fd00::5")
    assert policy.is_blocked("10.0.0.1")


# --- path mapping ---


@pytest.mark.parametrize(
    ("path", "base_path", "prefix", "expected"),
    [
        ("/v1/chat/completions", "/v1", "/v1", "/v1/chat/completions"),
        ("/v1/chat/completions?x=1", "/api/v1", "/v1", "/api/v1/chat/completions?x=1"),
        ("/chat/completions", "/api/v1", "/v1", "/api/v1/chat/completions"),
        ("/api/v1/models", "/api/v1", "/v1", "/api/v1/models"),
        ("/v10/things", "/v1", "/v1", "/v1/v10/things"),
        ("/v1/messages", "", "", "/v1/messages"),
        ("/v1/messages", "/anthropic", "", "/anthropic/v1/messages"),
        ("/v1/models", "", "/v1", "/v1/models"),
    ],
)
def test_path_mapping(path: str, base_path: str, prefix: str, expected: str) -> None:
    assert map_path(path, base_path, prefix) == expected


# --- credentials ---


def headers(**values: str) -> http.Headers:
    return http.Headers((), **{k.replace("_", "-"): v for k, v in values.items()})


@pytest.mark.parametrize(
    ("given", "mode"),
    [
        ({}, CredentialMode.CENTRAL),
        ({"authorization": "Bearer PROXYTOKEN"}, CredentialMode.CENTRAL),
        ({"x_api_key": "aibridgeproxyd"}, CredentialMode.CENTRAL),
        (
            {"authorization": "Bearer aibridgeproxyd", "x_api_key": "PROXYTOKEN"},
            CredentialMode.CENTRAL,
        ),
        ({"authorization": "Bearer sk-user"}, CredentialMode.BYOK),
        ({"x_api_key": "sk-ant-user"}, CredentialMode.BYOK),
        ({"api_key": "azure-user"}, CredentialMode.BYOK),
        ({"x_goog_api_key": "g-user"}, CredentialMode.BYOK),
        ({"authorization": "Bearer PROXYTOKEN", "x_api_key": "sk-user"}, CredentialMode.BYOK),
    ],
)
def test_credential_mode(given: dict[str, str], mode: CredentialMode) -> None:
    assert credential_mode(headers(**given), "PROXYTOKEN", "aibridgeproxyd") is mode


def test_proxy_token_is_stripped_even_in_byok() -> None:
    h = headers(authorization="Bearer PROXYTOKEN", x_api_key="sk-user")
    remove_proxy_credentials(h, "PROXYTOKEN", "aibridgeproxyd")
    assert "authorization" not in h
    assert h["x-api-key"] == "sk-user"


# --- status computation ---


def test_statuses_and_duplicate_hosts() -> None:
    providers = evaluate_providers(
        [
            ProviderRecord("openai", "openai"),
            ProviderRecord("b-second", "openai", hosts=("api.openai.com",)),
            ProviderRecord("a-first", "openai", hosts=("api.openai.com",), keys=("k",)),
            ProviderRecord("off", "anthropic", enabled=False),
            ProviderRecord("weird", "nosuchtype"),
            ProviderRecord("nokeys", "anthropic", hosts=("x.example",), allow_byok=False),
            ProviderRecord("badurl", "openai", base_url="ftp://x", hosts=("y.example",)),
            ProviderRecord(
                "compat", "openai", base_url="https://llm.internal:8443/v1", hosts=("z.example",)
            ),
        ]
    )
    by_name = {p.name: p for p in providers}
    assert [p.name for p in providers] == sorted(by_name)
    assert by_name["a-first"].status is Status.ENABLED
    assert by_name["b-second"].status is Status.ERROR
    assert "already claimed by provider 'a-first'" in by_name["b-second"].status_reason
    assert by_name["openai"].status is Status.ERROR  # a-first claimed api.openai.com first
    assert by_name["off"].status is Status.DISABLED
    assert (
        by_name["weird"].status is Status.ERROR
        and "unknown provider type" in by_name["weird"].status_reason
    )
    assert by_name["nokeys"].status is Status.ERROR and "BYOK" in by_name["nokeys"].status_reason
    assert by_name["badurl"].status is Status.ERROR
    assert by_name["compat"].upstream is not None and by_name["compat"].upstream.port == 8443


def test_disabled_provider_does_not_claim_its_host() -> None:
    providers = evaluate_providers(
        [ProviderRecord("a", "openai", enabled=False), ProviderRecord("b", "openai")]
    )
    assert [p.status for p in providers] == [Status.DISABLED, Status.ENABLED]


def test_snapshot_lookup_is_by_host_and_token_hash() -> None:
    providers = evaluate_providers(
        [
            ProviderRecord("openai", "openai"),
            ProviderRecord("anthropic", "anthropic", enabled=False),
        ]
    )
    snapshot = build_snapshot(providers, [TokenRecord("alice", hash_token("tok"))])
    provider = snapshot.provider_for_host("API.OpenAI.com")
    assert provider is not None and provider.name == "openai"
    assert snapshot.provider_for_host("api.anthropic.com") is None
    assert snapshot.identity_for_token("tok") == "alice"
    assert snapshot.identity_for_token("nope") is None
    assert ("api.openai.com", 443) in snapshot.upstream_addresses


# --- error shapes ---


def test_error_shapes() -> None:
    import json

    openai = json.loads(error_body(ApiFormat.OPENAI, 403, "no", "byok_not_allowed"))
    assert openai == {
        "error": {"message": "no", "type": "permission_error", "code": "byok_not_allowed"}
    }
    anthropic = json.loads(error_body(ApiFormat.ANTHROPIC, 403, "no key", "no_key_configured"))
    assert anthropic == {
        "type": "error",
        "error": {"type": "permission_error", "message": "no key"},
    }


# --- reload caches -----------------------------------------------------------------------------


def test_evaluation_cache_reuses_unchanged_records_but_recomputes_claims() -> None:
    from dataclasses import replace as changed

    from aibridgeproxyd.providers import EvaluationCache

    cache = EvaluationCache()
    first = ProviderRecord("a-first", "openai", hosts=("api.openai.com",), keys=("k",))
    second = ProviderRecord("b-second", "openai", hosts=("api.openai.com",), keys=("k",))
    before = evaluate_providers([first, second], cache)
    assert [p.status for p in before] == [Status.ENABLED, Status.ERROR]
    # Only the first row changes; the second comes back as the same object and is not
    # re-evaluated, yet it now owns the host.
    after = evaluate_providers([changed(first, enabled=False), second], cache)
    assert [p.status for p in after] == [Status.DISABLED, Status.ENABLED]
    again = evaluate_providers([changed(first, enabled=False), second], cache)
    assert again[1] is after[1]


def test_record_cache_converts_only_changed_rows() -> None:
    from aibridgeproxyd.store import RecordCache

    key = '[{"id": "a1", "created_at": "t0", "key": "k"}]'
    row = ("openai", "openai", "", "", "[]", 1, 1, key, "{}", "t0", "t0")
    cache = RecordCache()
    (first,) = cache.records([row])
    (same,) = cache.records([row])
    assert same is first
    key2 = '[{"id": "a2", "created_at": "t1", "key": "k2"}]'
    (updated,) = cache.records([(*row[:7], key2, "{}", "t0", "t1")])
    assert updated is not first and updated.keys == ("k2",)
