"""End to end: central keys fail over in order on 401/429, exhausted keys give 429 with
Retry-After or 502, and errors the proxy originates use the provider's JSON shape."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.fakes.tls import TunnelTarget
from tests.fakes.upstream import FakeUpstream
from tests.harness import DaemonProcess

CHAT = "https://api.openai.com/v1/chat/completions"
BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
CENTRAL = {"authorization": "Bearer aibridgeproxyd"}


# A new daemon per test (cooling-down keys live in it) and a clean upstream.
pytestmark = pytest.mark.usefixtures("clean_upstream")


@pytest.fixture
def daemon(upstream: FakeUpstream) -> Iterator[DaemonProcess]:
    config = {"upstream_ca_file": upstream.ca_pem_path, "auth": "none"}
    with DaemonProcess(config) as d:
        d.edit_provider("openai", upstream.base_url, "k1", "k2", "k3")
        d.edit_provider("anthropic", upstream.origin, "a1", "a2")
        d.reload_and_wait()
        yield d


def keys_seen(upstream: FakeUpstream) -> list[str]:
    return [
        r.headers.get("authorization") or r.headers.get("x-api-key", "") for r in upstream.requests
    ]


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "h2"])
def test_rate_limited_key_fails_over_to_the_next_and_cools_down(
    daemon: DaemonProcess, upstream: FakeUpstream, http2: bool
) -> None:
    upstream.fail_key("k1", 429, retry_after=60)
    with daemon.httpx_client(http2=http2) as client:
        first = client.post(CHAT, json=BODY, headers=CENTRAL)
        assert first.status_code == 200, first.text
        assert first.json()["choices"]
        assert keys_seen(upstream) == ["Bearer k1", "Bearer k2"]
        # k1 is cooling down: the next request goes straight to k2.
        upstream.reset()
        assert client.post(CHAT, json=BODY, headers=CENTRAL).status_code == 200
        assert keys_seen(upstream) == ["Bearer k2"]
    assert daemon.metric("mitm_responses_total", provider="openai", code="429") is None
    assert daemon.metric("inflight_mitm_requests", provider="openai") == 0


def test_unauthorized_key_fails_over_and_a_stream_still_arrives_incrementally(
    daemon: DaemonProcess, upstream: FakeUpstream
) -> None:
    upstream.fail_key("k1", 401)
    upstream.fail_key("k2", 429)
    state = upstream.gate("after-failover")
    with (
        daemon.httpx_client() as client,
        client.stream(
            "POST",
            CHAT,
            json={**BODY, "stream": True},
            headers={**CENTRAL, "x-fake-stream-id": "after-failover", "x-fake-events": "4"},
        ) as response,
    ):
        assert response.status_code == 200
        state.release()
        seen = 0
        for line in response.iter_lines():
            if line.startswith("data:"):
                seen += 1
                state.release()  # event k+1 leaves the upstream only after the client saw k
    assert seen >= 4
    assert keys_seen(upstream) == ["Bearer k1", "Bearer k2", "Bearer k3"]


def test_all_keys_rate_limited_gives_429_with_retry_after(
    daemon: DaemonProcess, upstream: FakeUpstream
) -> None:
    for key in ("k1", "k2", "k3"):
        upstream.fail_key(key, 429, retry_after=20)
    with daemon.httpx_client() as client:
        response = client.post(CHAT, json=BODY, headers=CENTRAL)
        assert response.status_code == 429
        assert 1 <= int(response.headers["retry-after"]) <= 20
        assert response.json()["error"]["code"] == "all_keys_rate_limited"
        assert "x-aibridge-request-id" in response.headers
        assert len(upstream.requests) == 3
        # While every key cools down, the proxy answers without bothering the upstream.
        again = client.post(CHAT, json=BODY, headers=CENTRAL)
        assert again.status_code == 429
        assert len(upstream.requests) == 3


def test_all_keys_rejected_gives_502_in_the_anthropic_shape(
    daemon: DaemonProcess, upstream: FakeUpstream
) -> None:
    upstream.fail_key("a1", 401)
    upstream.fail_key("a2", 401)
    with daemon.httpx_client() as client:
        response = client.post(
            "https://api.anthropic.com/v1/messages",
            json={
                "model": "claude-haiku-4-5",
                "max_tokens": 8,
                "messages": [{"role": "user", "content": "hi"}],
            },
            headers={"x-api-key": "aibridgeproxyd", "anthropic-version": "2023-06-01"},
        )
    assert response.status_code == 502
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] == "api_error"
    assert keys_seen(upstream) == ["a1", "a2"]


def test_other_upstream_errors_are_returned_unchanged(
    daemon: DaemonProcess, upstream: FakeUpstream
) -> None:
    with daemon.httpx_client() as client:
        response = client.post(CHAT, json=BODY, headers={**CENTRAL, "x-fake-status": "500"})
    assert response.status_code == 500
    assert keys_seen(upstream) == ["Bearer k1"]


def test_byok_requests_never_fail_over(daemon: DaemonProcess, upstream: FakeUpstream) -> None:
    upstream.fail_key("sk-user", 429)
    with daemon.httpx_client() as client:
        response = client.post(CHAT, json=BODY, headers={"authorization": "Bearer sk-user"})
    assert response.status_code == 429
    assert keys_seen(upstream) == ["Bearer sk-user"]


def test_unreachable_upstream_gives_502_in_the_provider_shape() -> None:
    with TunnelTarget() as gone:
        port = gone.port  # nothing listens here once the target has stopped
    with DaemonProcess({"auth": "none"}) as d:
        d.edit_provider("openai", f"https://127.0.0.1:{port}/v1", "k")
        d.edit_provider("anthropic", f"https://127.0.0.1:{port}", "k")
        d.reload_and_wait()
        with d.httpx_client() as client:
            openai_error = client.post(CHAT, json=BODY, headers=CENTRAL)
            anthropic_error = client.post(
                "https://api.anthropic.com/v1/messages",
                json={"model": "m", "max_tokens": 1, "messages": []},
                headers={"anthropic-version": "2023-06-01"},
            )
        assert openai_error.status_code == 502
        assert openai_error.json()["error"]["code"] == "upstream_unreachable"
        assert "127.0.0.1" not in openai_error.text and "Errno" not in openai_error.text
        assert "x-aibridge-request-id" in openai_error.headers
        assert anthropic_error.status_code == 502
        assert anthropic_error.json()["type"] == "error"
        assert d.metric("mitm_responses_total", provider="openai", code="502") == 1
        assert d.metric("inflight_mitm_requests", provider="openai") == 0


def test_failover_key_swap_reaches_an_h2_upstream_on_a_fresh_stream(
    daemon: DaemonProcess, upstream: FakeUpstream
) -> None:
    """Several requests on one h2 connection, each failing over once."""
    with daemon.httpx_client(http2=True) as client:
        for round_number in range(3):
            upstream.reset()
            upstream.fail_key("k1", 401)
            # Cooldowns are per daemon: only the first round sees k1.
            response = client.post(CHAT, json=BODY, headers=CENTRAL)
            assert response.status_code == 200, (round_number, response.text)
    assert isinstance(response, httpx.Response)
