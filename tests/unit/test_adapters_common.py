"""What every adapter shares, and the helpers the per-type adapter tests use: a provider row
evaluated exactly as the reload does it, and a client request as mitmproxy hands it over."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import pytest
from mitmproxy import http

from aibridgeproxyd.adapters import ADAPTERS
from aibridgeproxyd.model import ApiFormat, Provider, ProviderRecord, Status
from aibridgeproxyd.providers import evaluate_providers
from aibridgeproxyd.snapshot import build_snapshot


def evaluated(provider_type: str, **fields: Any) -> Provider:
    (provider,) = evaluate_providers(
        [ProviderRecord(name=provider_type, type=provider_type, **fields)]
    )
    return provider


def routed(provider_type: str, **fields: Any) -> Provider:
    provider = evaluated(provider_type, **fields)
    assert provider.status is Status.ENABLED, provider.status_reason
    return provider


def client_request(
    method: str,
    url: str,
    body: Mapping[str, Any] | bytes | None = None,
    headers: Mapping[str, str] | None = None,
) -> http.Request:
    """A request as it arrives inside a MITM'd tunnel: relative form, Host header set."""
    content = json.dumps(body).encode() if isinstance(body, Mapping) else (body or b"")
    all_headers: dict[str | bytes, str | bytes] = {
        "host": url.split("/")[2],
        **({"content-type": "application/json"} if isinstance(body, Mapping) else {}),
    }
    all_headers.update(headers or {})
    return http.Request.make(method, url, content, all_headers)


def header_items(request: http.Request) -> list[tuple[str, str]]:
    return [(name.lower(), value) for name, value in request.headers.items(multi=True)]


# --- behaviour shared by every type ----------------------------------------------------------


def test_every_contract_type_is_registered() -> None:
    assert set(ADAPTERS) == {
        "openai",
        "anthropic",
        "bedrock",
        "copilot",
        "azure",
        "google",
        "openrouter",
        "vercel",
        "openai-compat",
    }


@pytest.mark.parametrize(
    ("provider_type", "base_url", "hosts"),
    [
        ("openai", "https://api.openai.com/v1", ("api.openai.com",)),
        ("anthropic", "https://api.anthropic.com", ("api.anthropic.com",)),
        (
            "google",
            "https://generativelanguage.googleapis.com",
            ("generativelanguage.googleapis.com",),
        ),
        ("openrouter", "https://openrouter.ai/api/v1", ("openrouter.ai",)),
        ("vercel", "https://ai-gateway.vercel.sh/v1", ("ai-gateway.vercel.sh",)),
        (
            "copilot",
            "https://api.individual.githubcopilot.com",
            (
                "api.individual.githubcopilot.com",
                "api.business.githubcopilot.com",
                "api.enterprise.githubcopilot.com",
            ),
        ),
    ],
)
def test_defaults_come_from_the_type(
    provider_type: str, base_url: str, hosts: tuple[str, ...]
) -> None:
    provider = routed(provider_type)
    assert (provider.base_url, provider.hosts) == (base_url, hosts)


@pytest.mark.parametrize("provider_type", ["azure", "openai-compat"])
def test_types_without_a_default_base_url_need_one_and_intercept_its_host(
    provider_type: str,
) -> None:
    missing = evaluated(provider_type)
    assert missing.status is Status.ERROR
    assert missing.status_reason == f"base_url is required for type {provider_type!r}"
    provider = routed(provider_type, base_url="https://llm.internal.example:8443/v1")
    assert provider.hosts == ("llm.internal.example",)
    assert ADAPTERS[provider_type].requires_base_url


@pytest.mark.parametrize(
    ("provider_type", "api_format"),
    [
        ("openai", ApiFormat.OPENAI),
        ("anthropic", ApiFormat.ANTHROPIC),
        ("bedrock", ApiFormat.ANTHROPIC),
        ("copilot", ApiFormat.OPENAI),
        ("azure", ApiFormat.OPENAI),
        ("openrouter", ApiFormat.OPENAI),
        ("vercel", ApiFormat.OPENAI),
        ("openai-compat", ApiFormat.OPENAI),
    ],
)
def test_error_format_is_the_client_format(provider_type: str, api_format: ApiFormat) -> None:
    request = client_request("POST", "https://example.test/v1/anything", {})
    assert ADAPTERS[provider_type].error_format(request) is api_format


def test_upstream_addresses_are_the_base_urls_by_default() -> None:
    snapshot = build_snapshot(
        evaluate_providers(
            [
                ProviderRecord(name="a", type="openai-compat", base_url="http://10.0.0.5:8000/v1"),
                ProviderRecord(name="b", type="openrouter"),
            ]
        ),
        [],
    )
    assert snapshot.upstream_addresses == {("10.0.0.5", 8000), ("openrouter.ai", 443)}


def test_adapter_for_a_type_is_its_adapter_and_none_for_no_or_an_unknown_type() -> None:
    from aibridgeproxyd.adapters import ADAPTERS, adapter_for

    assert adapter_for("anthropic") is ADAPTERS["anthropic"]
    assert adapter_for(None) is None
    assert adapter_for("no-such-type") is None
