"""GitHub Copilot: always the user's own token, to the Copilot host the client chose."""

from __future__ import annotations

import pytest

from aibridgeproxyd.adapters import ADAPTERS
from aibridgeproxyd.credentials import CredentialMode, remove_proxy_credentials
from aibridgeproxyd.model import ProviderRecord
from aibridgeproxyd.providers import evaluate_providers
from aibridgeproxyd.snapshot import build_snapshot
from tests.unit.test_adapters_common import client_request, header_items, routed

ADAPTER = ADAPTERS["copilot"]
COPILOT_HEADERS = {
    "authorization": "Bearer gho_user_github_token",
    "editor-version": "vscode/1.104.0",
    "editor-plugin-version": "copilot-chat/0.31.0",
    "copilot-integration-id": "vscode-chat",
    "openai-intent": "conversation-panel",
    "x-github-api-version": "2025-05-01",
    "user-agent": "GitHubCopilotChat/0.31.0",
}
CHAT = {"model": "gpt-4.1", "messages": [{"role": "user", "content": "hi"}], "stream": True}


@pytest.mark.parametrize(
    "host",
    [
        "api.individual.githubcopilot.com",
        "api.business.githubcopilot.com",
        "api.enterprise.githubcopilot.com",
    ],
)
def test_requests_go_back_to_the_host_they_were_sent_to_untouched(host: str) -> None:
    request = client_request("POST", f"https://{host}/chat/completions", CHAT, COPILOT_HEADERS)
    before = header_items(request)
    body = request.content
    assert ADAPTER.rewrite(request, routed("copilot"), None) is None
    assert request.url == f"https://{host}/chat/completions"
    assert header_items(request) == before  # Editor-Version, Copilot-Integration-Id, the token
    assert request.content == body


def test_the_proxy_token_is_stripped_and_no_key_is_ever_injected() -> None:
    assert ADAPTER.credential_modes == {CredentialMode.BYOK} and ADAPTER.byok_only
    request = client_request(
        "POST",
        "https://api.business.githubcopilot.com/chat/completions",
        CHAT,
        {**COPILOT_HEADERS, "authorization": "Bearer proxy-token"},
    )
    remove_proxy_credentials(
        request.headers, "proxy-token", "aibridgeproxyd"
    )  # routing.route_request's step
    ADAPTER.rewrite(request, routed("copilot", keys=("never-used",)), None)
    assert "authorization" not in request.headers
    assert "never-used" not in str(header_items(request))


def test_an_explicit_base_url_overrides_same_host_routing() -> None:
    relay = routed("copilot", base_url="https://copilot-relay.internal:8443")
    request = client_request(
        "GET", "https://api.enterprise.githubcopilot.com/models", None, COPILOT_HEADERS
    )
    ADAPTER.rewrite(request, relay, None)
    assert request.url == "https://copilot-relay.internal:8443/models"
    assert request.headers["editor-version"] == "vscode/1.104.0"


def test_all_three_hosts_are_exempt_provider_upstreams() -> None:
    snapshot = build_snapshot(
        evaluate_providers([ProviderRecord(name="copilot", type="copilot")]), []
    )
    assert snapshot.upstream_addresses == {
        ("api.individual.githubcopilot.com", 443),
        ("api.business.githubcopilot.com", 443),
        ("api.enterprise.githubcopilot.com", 443),
    }
    relayed = build_snapshot(
        evaluate_providers(
            [ProviderRecord(name="c", type="copilot", base_url="https://10.1.2.3:8443")]
        ),
        [],
    )
    assert relayed.upstream_addresses == {("10.1.2.3", 8443)}
