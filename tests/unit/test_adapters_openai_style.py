"""OpenRouter, Vercel AI Gateway and any OpenAI-compatible server: OpenAI format, Bearer key."""

from __future__ import annotations

import json

import pytest

from aibridgeproxyd.adapters import ADAPTERS
from aibridgeproxyd.model import ProviderRecord, Status
from aibridgeproxyd.providers import evaluate_providers
from tests.unit.test_adapters_common import client_request, header_items, routed

CASES = [
    ("openrouter", "", "https://openrouter.ai/api/v1"),
    ("vercel", "", "https://ai-gateway.vercel.sh/v1"),
    (
        "openai-compat",
        "https://llm.internal.example:8000/v1",
        "https://llm.internal.example:8000/v1",
    ),
]
BODY = {"model": "anthropic/claude-sonnet-4.5", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(("provider_type", "base_url", "upstream"), CASES)
@pytest.mark.parametrize(
    ("client_url", "operation"),
    [
        ("https://api.openai.com/v1/chat/completions", "/chat/completions"),
        ("https://api.openai.com/v1/responses?include=usage", "/responses?include=usage"),
    ],
)
def test_openai_sdk_paths_map_onto_the_base_url_with_a_bearer_key(
    provider_type: str, base_url: str, upstream: str, client_url: str, operation: str
) -> None:
    provider = routed(provider_type, base_url=base_url, keys=("sk-central",))
    request = client_request("POST", client_url, BODY, {"user-agent": "OpenAI/Python 1.99.0"})
    assert ADAPTERS[provider_type].rewrite(request, provider, "sk-central") is None
    assert request.method == "POST"
    assert request.url == upstream + operation
    assert header_items(request)[-1] == ("authorization", "Bearer sk-central")
    # Slash model ids are the provider's own naming: never touched.
    assert json.loads(request.content or b"")["model"] == "anthropic/claude-sonnet-4.5"


@pytest.mark.parametrize(("provider_type", "base_url", "upstream"), CASES)
def test_paths_already_under_the_base_path_are_kept_and_byok_passes(
    provider_type: str, base_url: str, upstream: str
) -> None:
    provider = routed(provider_type, base_url=base_url)
    path = upstream.split("/", 3)[3]
    request = client_request(
        "GET",
        f"https://{provider.hosts[0]}/{path}/models",
        None,
        {"authorization": "Bearer user-key"},
    )
    ADAPTERS[provider_type].rewrite(request, provider, None)
    assert request.url == f"{upstream}/models"
    assert request.headers["authorization"] == "Bearer user-key"


@pytest.mark.parametrize("provider_type", ["openrouter", "vercel", "openai-compat"])
def test_any_of_them_can_take_over_api_openai_com(provider_type: str) -> None:
    base_url = "https://llm.internal.example/v1" if provider_type == "openai-compat" else ""
    providers = evaluate_providers(
        [
            ProviderRecord(
                name="a-takeover", type=provider_type, base_url=base_url, hosts=("api.openai.com",)
            ),
            ProviderRecord(name="openai", type="openai", enabled=False),
        ]
    )
    assert [p.status for p in providers] == [Status.ENABLED, Status.DISABLED]
    assert providers[0].hosts == ("api.openai.com",)
