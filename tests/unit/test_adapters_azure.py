"""Azure OpenAI: api-key auth, the v1 and deployment URL styles, api-version."""

from __future__ import annotations

import json
from typing import Any

import pytest
from mitmproxy.net import encoding as mitmproxy_encoding

from aibridgeproxyd.adapters import ADAPTERS
from aibridgeproxyd.model import Status
from tests.unit.test_adapters_common import client_request, evaluated, header_items, routed

ADAPTER = ADAPTERS["azure"]
RESOURCE = "https://contoso.openai.azure.com"
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
OPENAI_SDK_HEADERS = {"user-agent": "OpenAI/Python 1.99.0", "x-stainless-lang": "python"}


def azure(base_url: str = f"{RESOURCE}/openai/v1", **settings: Any) -> Any:
    return routed("azure", base_url=base_url, keys=("azure-key-1",), settings=settings)


def rewrite(url: str, body: Any = CHAT, key: str | None = "azure-key-1", **settings: Any) -> Any:
    request = client_request("POST", url, body, OPENAI_SDK_HEADERS)
    ADAPTER.rewrite(request, azure(**settings), key)
    return request


@pytest.mark.parametrize("base_url", [RESOURCE, f"{RESOURCE}/openai", f"{RESOURCE}/openai/v1"])
def test_without_deployments_the_v1_style_is_used(base_url: str) -> None:
    request = rewrite("https://api.openai.com/v1/chat/completions", base_url=base_url)
    assert request.method == "POST"
    assert request.url == f"{RESOURCE}/openai/v1/chat/completions"
    assert header_items(request) == [
        ("host", "contoso.openai.azure.com"),
        ("content-type", "application/json"),
        ("user-agent", "OpenAI/Python 1.99.0"),
        ("x-stainless-lang", "python"),
        ("content-length", str(len(json.dumps(CHAT)))),
        ("api-key", "azure-key-1"),
    ]
    assert json.loads(request.content or b"") == CHAT


def test_the_central_key_replaces_any_authorization_header() -> None:
    request = client_request(
        "GET", "https://api.openai.com/v1/models", None, {"authorization": "Bearer x"}
    )
    ADAPTER.rewrite(request, azure(), "azure-key-1")
    assert "authorization" not in request.headers
    assert request.headers["api-key"] == "azure-key-1"
    assert request.url == f"{RESOURCE}/openai/v1/models"


def test_api_version_is_added_as_a_query_parameter_next_to_the_clients_own() -> None:
    request = rewrite("https://api.openai.com/v1/chat/completions?foo=1", api_version="preview")
    assert request.path == "/openai/v1/chat/completions?foo=1&api-version=preview"
    assert request.query["api-version"] == "preview"


def test_a_client_api_version_is_kept() -> None:
    request = rewrite(
        f"{RESOURCE}/openai/v1/chat/completions?api-version=2025-04-01-preview",
        api_version="preview",
    )
    assert request.path == "/openai/v1/chat/completions?api-version=2025-04-01-preview"


@pytest.mark.parametrize("base_url", [RESOURCE, f"{RESOURCE}/openai/v1"])
@pytest.mark.parametrize(
    ("operation", "body"),
    [
        ("/chat/completions", CHAT),
        ("/embeddings", {"model": "gpt-4o", "input": "hello"}),
        ("/completions", {"model": "gpt-4o", "prompt": "hello"}),
    ],
)
def test_a_mapped_model_goes_to_its_deployment_with_an_api_version(
    base_url: str, operation: str, body: Any
) -> None:
    request = rewrite(
        f"https://api.openai.com/v1{operation}",
        body,
        base_url=base_url,
        deployments={"gpt-4o": "prod-4o"},
    )
    assert request.url == f"{RESOURCE}/openai/deployments/prod-4o{operation}?api-version=2024-10-21"
    assert json.loads(request.content or b"") == body  # the body is not touched


def test_the_configured_api_version_wins_over_the_default_on_deployment_urls() -> None:
    request = rewrite(
        "https://api.openai.com/v1/chat/completions",
        deployments={"gpt-4o": "prod 4o/x"},
        api_version="2025-01-01-preview",
    )
    assert (
        request.path
        == "/openai/deployments/prod%204o%2Fx/chat/completions?api-version=2025-01-01-preview"
    )


def test_an_unmapped_model_falls_through_to_the_v1_style_unchanged() -> None:
    request = rewrite(
        "https://api.openai.com/v1/chat/completions",
        {**CHAT, "model": "gpt-4.1"},
        deployments={"gpt-4o": "prod-4o"},
    )
    assert request.url == f"{RESOURCE}/openai/v1/chat/completions"
    assert json.loads(request.content or b"")["model"] == "gpt-4.1"


def test_v1_only_operations_carry_the_deployment_as_the_model() -> None:
    body = {"model": "gpt-4o", "input": "hi", "stream": True}
    request = rewrite(
        "https://api.openai.com/v1/responses", body, deployments={"gpt-4o": "prod-4o"}
    )
    assert request.url == f"{RESOURCE}/openai/v1/responses"
    assert json.loads(request.content or b"") == {**body, "model": "prod-4o"}
    assert request.headers["content-length"] == str(len(request.raw_content or b""))


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", "zstd"])
def test_a_compressed_body_is_routed_by_its_model_and_stays_compressed(coding: str) -> None:
    body = {"model": "gpt-4o", "input": "hi"}
    request = client_request("POST", "https://api.openai.com/v1/responses", {}, OPENAI_SDK_HEADERS)
    request.headers["content-encoding"] = coding
    request.raw_content = mitmproxy_encoding.encode(json.dumps(body).encode(), coding)
    ADAPTER.rewrite(request, azure(deployments={"gpt-4o": "prod-4o"}), "azure-key-1")
    assert request.headers["content-encoding"] == coding
    decoded = mitmproxy_encoding.decode(request.raw_content or b"", coding)
    assert json.loads(decoded) == {**body, "model": "prod-4o"}
    chat = client_request("POST", "https://api.openai.com/v1/chat/completions", {})
    chat.headers["content-encoding"] = coding
    chat.raw_content = mitmproxy_encoding.encode(json.dumps(CHAT).encode(), coding)
    ADAPTER.rewrite(chat, azure(deployments={"gpt-4o": "prod-4o"}), "azure-key-1")
    assert chat.path == "/openai/deployments/prod-4o/chat/completions?api-version=2024-10-21"


def test_requests_already_in_azure_shape_are_kept() -> None:
    url = f"{RESOURCE}/openai/deployments/legacy/chat/completions?api-version=2024-06-01"
    request = rewrite(url, deployments={"gpt-4o": "prod-4o"}, base_url=RESOURCE)
    assert request.url == url


def test_a_custom_gateway_prefix_stays_in_front_of_openai() -> None:
    request = rewrite(
        "https://api.openai.com/v1/chat/completions",
        base_url="https://apim.contoso.com/ai/openai/v1",
        deployments={"gpt-4o": "prod-4o"},
    )
    assert (
        request.url
        == "https://apim.contoso.com/ai/openai/deployments/prod-4o/chat/completions?api-version=2024-10-21"
    )


@pytest.mark.parametrize(
    ("authorization", "expected"),
    [
        ("Bearer user-azure-key", [("api-key", "user-azure-key")]),
        (
            "Bearer eyJhbGciOi.eyJzdWIiOi.c2lnbmF0dXJl",
            [("authorization", "Bearer eyJhbGciOi.eyJzdWIiOi.c2lnbmF0dXJl")],
        ),
    ],
    ids=["api-key", "entra-token"],
)
def test_byok_bearer_keys_move_to_api_key_but_entra_tokens_stay(
    authorization: str, expected: list[tuple[str, str]]
) -> None:
    request = client_request(
        "POST", "https://api.openai.com/v1/chat/completions", CHAT, {"authorization": authorization}
    )
    ADAPTER.rewrite(request, azure(), None)
    assert [
        (n, v) for n, v in header_items(request) if n in ("api-key", "authorization")
    ] == expected


def test_byok_api_key_header_passes_through() -> None:
    request = client_request(
        "POST", "https://api.openai.com/v1/chat/completions", CHAT, {"api-key": "user-key"}
    )
    ADAPTER.rewrite(request, azure(), None)
    assert request.headers.get_all("api-key") == ["user-key"]


@pytest.mark.parametrize(
    ("settings", "reason"),
    [
        ({"deployments": ["gpt-4o"]}, "azure setting deployments must map model names"),
        ({"deployments": {"gpt-4o": 3}}, "azure setting deployments must map model names"),
        ({"api_version": 2024}, "azure setting api_version must be a string"),
    ],
)
def test_malformed_settings_are_status_error(settings: dict[str, Any], reason: str) -> None:
    result = evaluated("azure", base_url=RESOURCE, keys=("k",), settings=settings)
    assert result.status is Status.ERROR
    assert result.status_reason.startswith(reason)
    # Shown by the dashboard and the API too: no CLI syntax in the reason.
    assert "--set" not in result.status_reason and "<" not in result.status_reason


def test_the_default_host_is_the_resource_host() -> None:
    assert azure().hosts == ("contoso.openai.azure.com",)


def test_a_failover_key_swap_replaces_the_api_key() -> None:
    request = rewrite("https://api.openai.com/v1/chat/completions")
    ADAPTER.inject_key(request.headers, "azure-key-2")
    assert request.headers.get_all("api-key") == ["azure-key-2"]


def test_clients_pointed_at_the_v1_url_get_deployments_too() -> None:
    request = rewrite(f"{RESOURCE}/openai/v1/chat/completions", deployments={"gpt-4o": "prod-4o"})
    assert (
        request.url
        == f"{RESOURCE}/openai/deployments/prod-4o/chat/completions?api-version=2024-10-21"
    )
    unmapped = rewrite(f"{RESOURCE}/openai/v1/models", None, deployments={"gpt-4o": "prod-4o"})
    assert unmapped.url == f"{RESOURCE}/openai/v1/models"
