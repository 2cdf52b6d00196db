"""Google Gemini: native paths with x-goog-api-key, OpenAI-compatible paths with Bearer."""

from __future__ import annotations

import pytest
from mitmproxy import http

from aibridgeproxyd.adapters import ADAPTERS
from aibridgeproxyd.credentials import CredentialMode, credential_mode
from aibridgeproxyd.errors import error_body
from aibridgeproxyd.model import ApiFormat, Provider
from tests.unit.test_adapters_common import client_request, header_items, routed

ADAPTER = ADAPTERS["google"]
HOST = "https://generativelanguage.googleapis.com"
GENERATE = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
PROXY_TOKEN = "proxy-token-of-alice"
PLACEHOLDER = "aibridgeproxyd"


def google(base_url: str = "") -> Provider:
    return routed("google", base_url=base_url, keys=("AIza-central",))


@pytest.mark.parametrize(
    "path",
    [
        "/v1beta/models/gemini-2.5-flash:generateContent",
        "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
        "/v1/models/gemini-2.5-pro:countTokens",
        "/upload/v1beta/files?uploadType=resumable",
    ],
)
def test_native_paths_are_kept_and_get_x_goog_api_key(path: str) -> None:
    request = client_request("POST", HOST + path, GENERATE, {"user-agent": "google-genai-sdk/1.0"})
    assert ADAPTER.rewrite(request, google(), "AIza-central") is None
    assert request.url == HOST + path
    assert header_items(request)[-1] == ("x-goog-api-key", "AIza-central")
    assert "authorization" not in request.headers
    assert ADAPTER.error_format(request) is ApiFormat.GEMINI


@pytest.mark.parametrize(
    "path",
    ["/v1beta/openai/chat/completions", "/v1beta/openai/embeddings", "/v1beta/openai/models"],
)
def test_openai_compatible_paths_get_bearer_and_openai_errors(path: str) -> None:
    request = client_request("POST", HOST + path, {"model": "gemini-2.5-flash", "messages": []})
    ADAPTER.rewrite(request, google(), "AIza-central")
    assert request.url == HOST + path
    assert request.headers["authorization"] == "Bearer AIza-central"
    assert "x-goog-api-key" not in request.headers
    assert ADAPTER.error_format(request) is ApiFormat.OPENAI


def test_a_base_url_elsewhere_keeps_the_path_and_the_format() -> None:
    request = client_request("POST", HOST + "/v1beta/openai/chat/completions", {"model": "m"})
    ADAPTER.rewrite(request, google("https://gemini-relay.internal:9443/gemini"), "AIza-central")
    assert request.url == "https://gemini-relay.internal:9443/gemini/v1beta/openai/chat/completions"
    assert request.headers["authorization"] == "Bearer AIza-central"
    assert ADAPTER.error_format(request) is ApiFormat.OPENAI


@pytest.mark.parametrize("query_key", [PROXY_TOKEN, PLACEHOLDER])
def test_a_query_key_that_asks_for_the_central_key_never_reaches_the_upstream(
    query_key: str,
) -> None:
    request = client_request(
        "POST", f"{HOST}/v1beta/models/m:streamGenerateContent?alt=sse&key={query_key}", GENERATE
    )
    ADAPTER.normalize_credentials(request)
    assert credential_mode(request.headers, PROXY_TOKEN, PLACEHOLDER) is CredentialMode.CENTRAL
    del request.headers["x-goog-api-key"]  # what routing.route_request does in central mode
    ADAPTER.rewrite(request, google(), "AIza-central")
    assert request.path == "/v1beta/models/m:streamGenerateContent?alt=sse"
    assert request.headers["x-goog-api-key"] == "AIza-central"
    assert query_key not in request.url


def test_a_users_own_query_key_is_byok_and_travels_as_the_header() -> None:
    request = client_request(
        "POST", f"{HOST}/v1beta/models/m:generateContent?key=AIza-user", GENERATE
    )
    ADAPTER.normalize_credentials(request)
    assert credential_mode(request.headers, PROXY_TOKEN, PLACEHOLDER) is CredentialMode.BYOK
    ADAPTER.rewrite(request, google(), None)
    assert request.path == "/v1beta/models/m:generateContent"
    assert request.headers["x-goog-api-key"] == "AIza-user"


def test_a_header_key_wins_over_a_query_key() -> None:
    request = client_request(
        "POST",
        f"{HOST}/v1beta/models/m:generateContent?key=other",
        GENERATE,
        {"x-goog-api-key": "AIza-user"},
    )
    ADAPTER.normalize_credentials(request)
    assert request.headers.get_all("x-goog-api-key") == ["AIza-user"]
    assert "key" not in request.query


def test_gemini_errors_have_googles_shape() -> None:
    request = http.Request.make("GET", f"{HOST}/v1beta/models")
    body = error_body(ADAPTER.error_format(request), 403, "no", "byok_not_allowed")
    assert body == b'{"error": {"code": 403, "message": "no", "status": "PERMISSION_DENIED"}}'


@pytest.mark.parametrize(
    ("path", "header", "value"),
    [
        ("/v1beta/models/m:generateContent", "x-goog-api-key", "AIza-second"),
        ("/v1beta/openai/chat/completions", "authorization", "Bearer AIza-second"),
    ],
)
def test_a_failover_key_swap_keeps_the_header_style_of_the_path(
    path: str, header: str, value: str
) -> None:
    request = client_request("POST", HOST + path, GENERATE)
    ADAPTER.rewrite(request, google(), "AIza-first")
    ADAPTER.inject_key(request.headers, "AIza-second")
    credentials = [
        (n, v) for n, v in header_items(request) if n in ("x-goog-api-key", "authorization")
    ]
    assert credentials == [(header, value)]
