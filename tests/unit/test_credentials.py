"""The proxy token in every spelling a client may send it inside a MITM'd tunnel."""

from __future__ import annotations

import base64

import pytest
from mitmproxy import http
from mitmproxy.test import tutils

from aibridgeproxyd.credentials import (
    CredentialMode,
    credential_mode,
    credential_values,
    remove_all_credentials,
    remove_proxy_credentials,
    scrub_proxy_token,
)

TOKEN = "abp_PROXYTOKEN"
PLACEHOLDER = "aibridgeproxyd"


def basic(text: str) -> str:
    return "Basic " + base64.b64encode(text.encode()).decode()


@pytest.mark.parametrize(
    "authorization",
    [
        basic(f"user:{TOKEN}"),  # the tester's exact input
        basic(f":{TOKEN}"),
        basic(TOKEN),
        basic(f"anyone:{PLACEHOLDER}"),
        "basic\t" + base64.b64encode(f"u:{TOKEN}".encode()).decode(),
        f"bearer {TOKEN}",
    ],
)
def test_a_basic_or_bearer_proxy_token_is_central_and_removed(authorization: str) -> None:
    headers = http.Headers(authorization=authorization)
    assert credential_mode(headers, TOKEN, PLACEHOLDER) is CredentialMode.CENTRAL
    remove_proxy_credentials(headers, TOKEN, PLACEHOLDER)
    assert "authorization" not in headers


@pytest.mark.parametrize(
    "authorization",
    [basic("user:sk-user-key"), basic("user:"), "Basic !!!not-base64", basic(f"{TOKEN}x:y")],
)
def test_any_other_basic_value_is_the_users_own(authorization: str) -> None:
    headers = http.Headers(authorization=authorization)
    assert credential_mode(headers, TOKEN, PLACEHOLDER) is CredentialMode.BYOK
    remove_proxy_credentials(headers, TOKEN, PLACEHOLDER)
    assert headers["authorization"] == authorization


def test_a_basic_password_is_a_credential_value() -> None:
    headers = http.Headers(authorization=basic("user:sk-user-key"))
    assert list(credential_values(headers)) == [
        ("authorization", "sk-user-key"),
        ("authorization", "user:sk-user-key"),
    ]


def test_a_token_mixed_with_a_users_key_is_byok_and_the_token_is_dropped() -> None:
    headers = http.Headers(authorization=basic(f"u:{TOKEN}"), x_api_key="sk-user")
    assert credential_mode(headers, TOKEN, PLACEHOLDER) is CredentialMode.BYOK
    remove_proxy_credentials(headers, TOKEN, PLACEHOLDER)
    assert list(headers.items()) == [("x-api-key", "sk-user")]


def test_the_token_is_scrubbed_from_every_other_header_and_the_query() -> None:
    request = tutils.treq(path=f"/v1/models?key={TOKEN}&api_key=a{TOKEN}b&limit=5".encode())
    request.headers["X-Custom-Auth"] = f"Token {TOKEN}"
    request.headers["Cookie"] = f"session={TOKEN}"
    request.headers["X-Forward-Auth"] = basic(f"u:{TOKEN}")
    request.headers["X-Other"] = "fine"
    removed = scrub_proxy_token(request, TOKEN)
    assert sorted(removed) == [
        "header cookie",
        "header x-custom-auth",
        "header x-forward-auth",
        "query parameter api_key",
        "query parameter key",
    ]
    assert TOKEN not in str(request.headers) and TOKEN not in request.path
    assert request.query["limit"] == "5" and request.headers["x-other"] == "fine"


def test_scrubbing_without_a_token_changes_nothing() -> None:
    request = tutils.treq(path=b"/v1/models?key=abc")
    assert scrub_proxy_token(request, None) == [] and request.path == "/v1/models?key=abc"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.mark.parametrize(
    "authorization",
    [
        "Basic " + b64(f"u:{TOKEN}").rstrip("="),  # padding dropped (the second tester's find)
        "Basic " + b64(f"uu:{TOKEN}").rstrip("="),
        "Basic " + b64(f"u:{TOKEN}")[:8] + " " + b64(f"u:{TOKEN}")[8:],  # a space inside
        "Basic " + base64.urlsafe_b64encode(f"u:{TOKEN}".encode()).decode().rstrip("="),
    ],
)
def test_a_basic_proxy_token_in_lenient_base64_is_central_and_removed(authorization: str) -> None:
    headers = http.Headers(authorization=authorization)
    assert credential_mode(headers, TOKEN, PLACEHOLDER) is CredentialMode.CENTRAL
    remove_proxy_credentials(headers, TOKEN, PLACEHOLDER)
    assert "authorization" not in headers


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("authorization", "Bearer " + b64(TOKEN).rstrip("=")),
        ("x-api-key", "Basic " + b64(f"u:{TOKEN}").rstrip("=")),
        ("x-custom", b64(f"u:{TOKEN}").rstrip("=")),
    ],
)
def test_a_proxy_token_hidden_in_base64_never_goes_upstream(name: str, value: str) -> None:
    request = tutils.treq(path=b"/v1/models")
    request.headers[name] = value
    scrub_proxy_token(request, TOKEN)
    assert name not in request.headers


def test_credentials_are_read_in_header_order_then_request_order_in_one_pass() -> None:
    headers = http.Headers(
        [
            (b"X-Api-Key", b"first-key"),
            (b"Authorization", b"Bearer one"),
            (b"accept", b"*/*"),
            (b"x-api-key", b"second-key"),
            (b"AUTHORIZATION", b"Bearer two"),
        ]
    )
    assert [(n, v) for n, v in credential_values(headers)] == [
        ("authorization", "one"),
        ("authorization", "two"),
        ("x-api-key", "first-key"),
        ("x-api-key", "second-key"),
    ]


def test_removing_all_credentials_drops_every_spelling_and_keeps_the_rest() -> None:
    headers = http.Headers(
        [
            (b"Authorization", b"Bearer k"),
            (b"accept", b"*/*"),
            (b"API-KEY", b"a"),
            (b"X-Goog-Api-Key", b"g"),
        ]
    )
    remove_all_credentials(headers)
    assert headers.fields == ((b"accept", b"*/*"),)
    remove_all_credentials(headers)  # nothing left to drop
    assert headers.fields == ((b"accept", b"*/*"),)
