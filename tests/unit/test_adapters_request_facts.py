"""What each adapter reads off a client request before rewriting it: the model the client
asked for (recorded, and used by Azure and Bedrock to route) and the API whose response reports
usage. The inputs are the ones the parsers these methods replaced handled."""

from __future__ import annotations

import json
import tracemalloc

import pytest
from mitmproxy import http
from mitmproxy.net import encoding as mitmproxy_encoding

from aibridgeproxyd.adapters import ADAPTERS, RouteRefusal
from aibridgeproxyd.adapters import base as adapters_base
from aibridgeproxyd.adapters.base import scanned_body_model
from aibridgeproxyd.model import ProviderRecord
from aibridgeproxyd.seeding import DEFAULT_PROVIDERS, ENVIRONMENT_SUFFIXES
from aibridgeproxyd.usage import ApiKind
from tests.unit.test_adapters_common import client_request, routed

CHAT = ApiKind.OPENAI_CHAT_COMPLETIONS
RESPONSES = ApiKind.OPENAI_RESPONSES
MESSAGES = ApiKind.ANTHROPIC_MESSAGES
GEMINI = ApiKind.GEMINI_GENERATE_CONTENT
OPENAI_STYLE = ("openai", "anthropic", "copilot", "openrouter", "vercel", "openai-compat")


def head_of(request: http.Request) -> http.Request:
    """The request as the requestheaders hook sees it: no body has arrived yet."""
    request.data.content = None
    return request


# --- the body scan the OpenAI-style adapters use -------------------------------------------


def test_the_body_scan_reads_the_top_level_key_cheaply() -> None:
    assert scanned_body_model(b'{"model": "gpt-4o", "messages": []}') == "gpt-4o"
    assert (
        scanned_body_model(
            b'{"messages": [{"content": "say \\"model\\": \\"x\\""}], "model":"claude"}'
        )
        == "claude"
    )
    assert scanned_body_model(b"") is None
    assert scanned_body_model(None) is None
    assert scanned_body_model(b'{"messages": []}') is None
    assert scanned_body_model(b'{"model": "\xe9"}') is None


def test_the_body_scan_reads_only_the_first_64_kib() -> None:
    late = b'{"messages": "' + b"x" * (64 * 1024) + b'", "model": "gpt-4o"}'
    assert scanned_body_model(late) is None


@pytest.mark.parametrize("provider_type", OPENAI_STYLE)
def test_openai_style_types_take_the_model_from_the_body(provider_type: str) -> None:
    adapter = ADAPTERS[provider_type]
    request = client_request("POST", "https://h.example/v1/chat/completions", {"model": "m-1"})
    assert adapter.request_model(request) == "m-1"
    # No content-type needed: the scan reads the raw bytes.
    raw = client_request("POST", "https://h.example/v1/chat/completions", b'{"model": "m-2"}')
    assert adapter.request_model(raw) == "m-2"


@pytest.mark.parametrize("provider_type", OPENAI_STYLE)
def test_openai_style_types_ignore_model_shaped_paths(provider_type: str) -> None:
    request = client_request("GET", "https://h.example/v1/models/ft:gpt-4o:org:1")
    assert ADAPTERS[provider_type].request_model(request) is None


@pytest.mark.parametrize("provider_type", sorted(ADAPTERS))
def test_no_type_finds_a_model_in_a_head_without_one(provider_type: str) -> None:
    request = head_of(client_request("POST", "https://h.example/v1/chat/completions"))
    assert ADAPTERS[provider_type].request_model(request) is None


# --- Google: the path names the model ------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "model"),
    [
        ("/v1beta/models/gemini-2.5-flash:generateContent", "gemini-2.5-flash"),
        ("/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse", "gemini-2.5-pro"),
        ("/v1/models/text-embedding-004:embedContent", "text-embedding-004"),
        ("/v1beta/models/gemini-2.5-flash", None),
        ("/v1beta/models", None),
    ],
)
def test_google_reads_the_model_from_a_native_path_at_the_head(
    path: str, model: str | None
) -> None:
    request = head_of(client_request("POST", "https://generativelanguage.googleapis.com" + path))
    assert ADAPTERS["google"].request_model(request) == model


def test_google_prefers_the_path_and_falls_back_to_the_body() -> None:
    google = ADAPTERS["google"]
    host = "https://generativelanguage.googleapis.com"
    native = client_request(
        "POST", host + "/v1beta/models/gemini-2.5-flash:generateContent", {"model": "other"}
    )
    assert google.request_model(native) == "gemini-2.5-flash"
    compatible = client_request(
        "POST", host + "/v1beta/openai/chat/completions", {"model": "gemini-2.5-pro"}
    )
    assert google.request_model(compatible) == "gemini-2.5-pro"


# --- Azure and Bedrock: parsed whole, since the model routes the request --------------------


def test_azure_reads_the_model_only_from_a_body_declared_json() -> None:
    azure = ADAPTERS["azure"]
    url = "https://res.openai.azure.com/v1/chat/completions"
    assert azure.request_model(client_request("POST", url, {"model": "gpt-4o"})) == "gpt-4o"
    plain = client_request("POST", url, b'{"model": "gpt-4o"}', {"content-type": "text/plain"})
    assert azure.request_model(plain) is None
    assert azure.request_model(client_request("POST", url, {"model": 4})) is None
    broken = client_request("POST", url, b"[{", {"content-type": "application/json"})
    assert azure.request_model(broken) is None


def test_azure_and_bedrock_find_a_model_beyond_the_scan_window() -> None:
    body = {"messages": [{"role": "user", "content": "x" * (70 * 1024)}], "model": "m-late"}
    for provider_type in ("azure", "bedrock"):
        request = client_request("POST", "https://h.example/v1/messages", body)
        assert ADAPTERS[provider_type].request_model(request) == "m-late"


@pytest.mark.parametrize(
    ("body", "model"),
    [
        (json.dumps({"model": "claude-3-5-haiku", "messages": []}).encode(), "claude-3-5-haiku"),
        (json.dumps({"messages": [], "metadata": {"model": "x"}}).encode(), None),
        (b'{"model": 5}', None),
        (b"[]", None),
        (b"", None),
        (b"{" * 100_000, None),
    ],
)
def test_bedrock_reads_the_top_level_model_of_the_body(body: bytes, model: str | None) -> None:
    request = client_request("POST", "https://api.anthropic.com/v1/messages", body)
    assert ADAPTERS["bedrock"].request_model(request) == model


# --- compressed request bodies: read decoded, within a bound ----------------------------------

ALL_TYPES = (*OPENAI_STYLE, "azure", "bedrock", "google")
CODINGS = ("gzip", "deflate", "br", "zstd")


def url_for(provider_type: str) -> str:
    if provider_type == "google":  # its OpenAI-compatible API: the model is in the body
        return "https://generativelanguage.googleapis.com/v1beta/openai/chat/completions"
    if provider_type == "bedrock":
        return "https://api.anthropic.com/v1/messages"
    return "https://h.example/v1/chat/completions"


def sent_as(request: http.Request, coding: str, encoded: bytes) -> http.Request:
    """``request`` carrying ``encoded`` as it came off the wire (``make`` would encode again)."""
    request.headers["content-encoding"] = coding
    request.raw_content = encoded
    return request


def compressed_request(provider_type: str, body: bytes, coding: str) -> http.Request:
    request = client_request("POST", url_for(provider_type), {})
    return sent_as(request, coding, mitmproxy_encoding.encode(body, coding))


@pytest.mark.parametrize("coding", CODINGS)
@pytest.mark.parametrize("provider_type", ALL_TYPES)
def test_every_type_reads_the_model_of_a_compressed_body(provider_type: str, coding: str) -> None:
    body = json.dumps({"model": "m-zipped", "messages": [{"role": "user", "content": "hi"}]})
    request = compressed_request(provider_type, body.encode(), coding)
    assert ADAPTERS[provider_type].request_model(request) == "m-zipped"


@pytest.mark.parametrize("coding", CODINGS)
def test_azure_and_bedrock_parse_a_compressed_body_past_the_scan_window(coding: str) -> None:
    late = {"messages": [{"role": "user", "content": "x" * (70 * 1024)}], "model": "m-late"}
    for provider_type in ("azure", "bedrock"):
        request = compressed_request(provider_type, json.dumps(late).encode(), coding)
        assert ADAPTERS[provider_type].request_model(request) == "m-late"


def test_a_body_that_does_not_decode_as_declared_names_no_model() -> None:
    for provider_type in ALL_TYPES:
        request = sent_as(
            client_request("POST", url_for(provider_type), {}), "gzip", b'{"model": "m-1"}'
        )
        assert ADAPTERS[provider_type].request_model(request) is None, provider_type


@pytest.fixture(scope="module")
def bomb_bodies() -> dict[str, bytes]:
    """JSON whose model comes after 128 MiB of padding, compressed to kilobytes."""
    body = b'{"messages": "' + b"x" * (128 * 1024 * 1024) + b'", "model": "m-bomb"}'
    return {coding: mitmproxy_encoding.encode(body, coding) for coding in CODINGS}


@pytest.mark.parametrize("coding", CODINGS)
def test_a_decompression_bomb_is_read_only_up_to_the_bound(
    bomb_bodies: dict[str, bytes], coding: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(adapters_base, "MAX_DECODED_REQUEST_BODY", 1024 * 1024)
    for provider_type in ALL_TYPES:
        request = sent_as(
            client_request("POST", url_for(provider_type), {}), coding, bomb_bodies[coding]
        )
        tracemalloc.start()
        try:
            model = ADAPTERS[provider_type].request_model(request)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert model is None, provider_type  # beyond what is read: unknown, never a guess
        assert peak < 8 * 1024 * 1024, provider_type  # never the 128 MiB the body decodes to


def test_bedrock_refuses_a_body_that_decodes_beyond_the_bound_with_413(
    bomb_bodies: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(adapters_base, "MAX_DECODED_REQUEST_BODY", 1024 * 1024)
    request = client_request("POST", "https://api.anthropic.com/v1/messages", {})
    sent_as(request, "zstd", bomb_bodies["zstd"])
    provider = routed(
        "bedrock",
        settings={
            "region": "us-east-1",
            "model": "m",
            "access_key_id": "AKIDEXAMPLE",
            "secret_access_key": "secret",
        },
    )
    with pytest.raises(RouteRefusal) as refusal:
        ADAPTERS["bedrock"].rewrite(request, provider, None)
    assert (refusal.value.status, refusal.value.code) == (413, "request_too_large")
    assert "1048576 bytes" in refusal.value.message


# --- which requests report usage -------------------------------------------------------------


@pytest.mark.parametrize(
    ("provider_type", "method", "path", "kind"),
    [
        ("openai", "POST", "/v1/chat/completions", CHAT),
        ("openai", "post", "/v1/chat/completions?foo=1", CHAT),
        ("openai", "POST", "/v1/completions", ApiKind.OPENAI_COMPLETIONS),
        ("openai", "POST", "/v1/responses", RESPONSES),
        ("openai", "POST", "/v1/embeddings", ApiKind.OPENAI_EMBEDDINGS),
        ("openai", "GET", "/v1/responses/resp_123", None),
        ("openai", "POST", "/v1/responses/resp_123/cancel", None),
        ("openai", "GET", "/v1/models", None),
        ("openai", "POST", "/v1/threads/thread_1/messages", None),
        ("openai", "POST", "/v1/messages", MESSAGES),
        ("copilot", "POST", "/chat/completions", CHAT),
        ("copilot", "POST", "/responses", RESPONSES),
        ("azure", "POST", "/openai/deployments/prod/chat/completions?api-version=2024-10-21", CHAT),
        ("openrouter", "POST", "/api/v1/chat/completions", CHAT),
        ("vercel", "POST", "/v1/chat/completions", CHAT),
        ("openai-compat", "POST", "/v1/chat/completions", CHAT),
        ("openai-compat", "POST", "/v1beta/models/m:generateContent", GEMINI),
        ("anthropic", "POST", "/v1/messages", MESSAGES),
        ("anthropic", "POST", "/v1/messages?beta=true", MESSAGES),
        ("anthropic", "POST", "/v1/messages/", MESSAGES),
        ("anthropic", "POST", "/v1/messages/count_tokens", None),
        ("anthropic", "GET", "/v1/models", None),
        ("anthropic", "POST", "/v1/chat/completions", None),
        ("anthropic", "POST", "/v1beta/models/m:generateContent", None),
        ("bedrock", "POST", "/v1/messages", MESSAGES),
        ("bedrock", "POST", "/v1/chat/completions", None),
        ("google", "POST", "/v1beta/models/gemini-2.5-flash:generateContent", GEMINI),
        ("google", "POST", "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse", GEMINI),
        ("google", "POST", "/v1beta/models/gemini-2.5-flash:countTokens", None),
        ("google", "POST", "/v1beta/models/text-embedding-004:embedContent", None),
        ("google", "POST", "/v1beta/openai/chat/completions", CHAT),
        ("google", "POST", "/v1beta/openai/embeddings", ApiKind.OPENAI_EMBEDDINGS),
        ("google", "GET", "/v1beta/models/gemini-2.5-flash:generateContent", None),
    ],
)
def test_each_type_knows_which_requests_report_usage(
    provider_type: str, method: str, path: str, kind: ApiKind | None
) -> None:
    assert ADAPTERS[provider_type].api_kind(method, path) == kind


# --- what seeding learns from the adapters ----------------------------------------------------


def test_seeding_takes_its_per_type_defaults_from_the_adapters() -> None:
    defaults = DEFAULT_PROVIDERS
    assert defaults == (
        ProviderRecord(name="openai", type="openai", display_name="OpenAI"),
        ProviderRecord(name="anthropic", type="anthropic", display_name="Anthropic"),
    )
    suffixes = ENVIRONMENT_SUFFIXES
    assert suffixes == (
        "TYPE",
        "NAME",
        "KEY",
        "KEYS",
        "BASE_URL",
        "BEDROCK_REGION",
        "BEDROCK_ACCESS_KEY",
        "BEDROCK_ACCESS_KEY_SECRET",
        "BEDROCK_MODEL",
        "BEDROCK_SMALL_FAST_MODEL",
    )
