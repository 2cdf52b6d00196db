"""End to end: SDK calls through the daemon (streamed and not) leave interception records with
exact token counts, client and initiator; `interceptions list` filters them; metrics count
tokens."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from genai_prices import Usage, calc_price

from aibridgeproxyd.presence import wait_for_daemons
from aibridgeproxyd.pricing import ModelPrices
from aibridgeproxyd.store import Store
from tests.fakes.upstream import (
    CACHE_CREATION_INPUT_TOKENS,
    CACHED_INPUT_TOKENS,
    INPUT_TOKENS,
    FakeUpstream,
)
from tests.harness import DaemonProcess

CLAUDE_CODE_UA = "claude-cli/2.0.67 (external, cli)"
CODEX_UA = "codex_cli_rs/0.87.0 (Mac OS 26.2.0; arm64) ghostty/1.3.0"
FIELDS = {
    "id", "connect_id", "request_id", "initiator", "provider", "provider_type", "model", "client",
    "method", "path", "status", "streamed", "input_tokens", "output_tokens",
    "cache_read_input_tokens", "cache_creation_input_tokens", "reasoning_output_tokens",
    "provider_name", "user_agent", "credential_kind", "credential_hint", "started_at",
    "ended_at", "ttfb_ms", "duration_ms", "error", "cost_micros", "client_session_id",
    "session_id", "thread_parent_id", "thread_root_id", "prompts", "tool_calls", "thoughts",
}  # fmt: skip


@pytest.fixture(scope="module")
def daemon(upstream: FakeUpstream) -> Iterator[DaemonProcess]:
    with DaemonProcess({"upstream_ca_file": upstream.ca_pem_path, "log_level": "debug"}) as d:
        d.edit_provider("openai", upstream.base_url, "sk-openai-central")
        d.edit_provider("anthropic", upstream.origin, "sk-ant-central")
        d.reload_and_wait()
        yield d


def records(daemon: DaemonProcess, *args: str) -> list[dict[str, Any]]:
    return json.loads(daemon.cli("interceptions", "list", *args, check=True).stdout)


def table_cost_micros(provider_id: str, model: str, **tokens: int) -> int:
    price = calc_price(Usage(**tokens), model, provider_id=provider_id).total_price
    return int((price * 1_000_000).to_integral_value(rounding="ROUND_HALF_UP"))


def wait_for_records(daemon: DaemonProcess, count: int) -> list[dict[str, Any]]:
    return daemon.wait_for(
        lambda: (found := records(daemon)) and len(found) >= count and found,
        message=f"{count} records",
    )


def test_sdk_calls_leave_exact_records(daemon: DaemonProcess, upstream: FakeUpstream) -> None:
    token = daemon.create_token("alice")
    oai = daemon.openai_client(token, default_headers={"User-Agent": CODEX_UA})
    oai.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    stream = oai.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-fake-events": "5"},
    )
    assert len(list(stream)) >= 5
    with oai.responses.stream(
        model="gpt-5", input="hi", extra_headers={"x-fake-events": "4"}
    ) as responses:
        responses.get_final_response()
    ant = daemon.anthropic_client(token, default_headers={"User-Agent": CLAUDE_CODE_UA})
    with ant.messages.stream(
        model="claude-sonnet-4-6", max_tokens=64, messages=[{"role": "user", "content": "hi"}],
        extra_headers={"x-fake-events": "6"},
    ) as message_stream:  # fmt: skip
        message_stream.get_final_message()

    found = wait_for_records(daemon, 4)
    anthropic_stream, responses_stream, chat_stream, chat = found[:4]  # newest first
    for record in found[:4]:
        assert set(record) == FIELDS
        assert record["id"] == record["request_id"]  # the id is the request id
        # No session header and no tool result: each request is its own thread and session.
        assert record["thread_parent_id"] is None
        assert record["thread_root_id"] == record["session_id"] == record["id"]
        assert record["initiator"] == "alice"
        assert record["status"] == 200
        assert record["error"] is None
        assert record["started_at"].endswith("Z") and record["started_at"] <= record["ended_at"]
        assert record["duration_ms"] >= record["ttfb_ms"] >= 0

    assert chat["provider"] == "openai" and chat["provider_type"] == "openai"
    assert chat["client"] == "Codex"
    # The proxy token went as the key: central, the injected key masked ("sk-openai-central").
    assert (chat["provider_name"], chat["user_agent"]) == ("openai", CODEX_UA)
    assert (chat["credential_kind"], chat["credential_hint"]) == ("central", "sk-\u2026tral")
    assert token[-5:] not in json.dumps(found)
    assert (chat["method"], chat["path"], chat["model"], chat["streamed"]) == (
        "POST",
        "/v1/chat/completions",
        "gpt-4o",
        False,
    )
    assert chat["input_tokens"] == INPUT_TOKENS - CACHED_INPUT_TOKENS
    assert chat["cache_read_input_tokens"] == CACHED_INPUT_TOKENS
    assert chat["output_tokens"] == 3

    assert chat_stream["streamed"] is True and chat_stream["model"] == "gpt-4o-mini"
    assert (chat_stream["input_tokens"], chat_stream["output_tokens"]) == (
        INPUT_TOKENS - CACHED_INPUT_TOKENS,
        5,
    )

    assert responses_stream["path"] == "/v1/responses" and responses_stream["streamed"] is True
    assert (responses_stream["input_tokens"], responses_stream["output_tokens"]) == (
        INPUT_TOKENS - CACHED_INPUT_TOKENS,
        4,
    )

    assert (
        anthropic_stream["provider"] == "anthropic" and anthropic_stream["client"] == "Claude Code"
    )
    assert anthropic_stream["model"] == "claude-sonnet-4-6"
    assert anthropic_stream["input_tokens"] == INPUT_TOKENS
    assert anthropic_stream["cache_read_input_tokens"] == CACHED_INPUT_TOKENS
    assert anthropic_stream["cache_creation_input_tokens"] == CACHE_CREATION_INPUT_TOKENS
    assert anthropic_stream["output_tokens"] == 6
    assert (anthropic_stream["provider_name"], anthropic_stream["user_agent"]) == (
        "anthropic",
        CLAUDE_CODE_UA,
    )
    assert anthropic_stream["credential_hint"] == "sk-\u2026tral"  # "sk-ant-central"

    # Cost from the same price source (genai-prices, whose input_tokens is the whole prompt).
    assert chat["cost_micros"] == table_cost_micros(
        "openai", "gpt-4o", input_tokens=INPUT_TOKENS, cache_read_tokens=CACHED_INPUT_TOKENS,
        output_tokens=3,
    )  # fmt: skip
    assert anthropic_stream["cost_micros"] == table_cost_micros(
        "anthropic", "claude-sonnet-4-6",
        input_tokens=INPUT_TOKENS + CACHED_INPUT_TOKENS + CACHE_CREATION_INPUT_TOKENS,
        cache_read_tokens=CACHED_INPUT_TOKENS, cache_write_tokens=CACHE_CREATION_INPUT_TOKENS,
        output_tokens=6,
    )  # fmt: skip
    assert daemon.metric("cost_micros_total", provider="openai") >= chat["cost_micros"] > 0

    # Records carry the same request id the client saw, and never the bodies.
    assert all(len(r["request_id"]) == 36 for r in found[:4])

    # Filters.
    assert [r["request_id"] for r in records(daemon, "--provider", "anthropic")] == [
        anthropic_stream["request_id"]
    ]
    assert {r["model"] for r in records(daemon, "--client", "Codex")} >= {
        "gpt-4o",
        "gpt-4o-mini",
        "gpt-5",
    }
    assert records(daemon, "--initiator", "nobody") == []

    assert len(records(daemon, "--limit", "2")) == 2
    assert records(daemon, "--started-after", anthropic_stream["ended_at"]) == []
    assert len(records(daemon, "--started-before", chat_stream["started_at"])) >= 1

    # Token metrics match the records.
    assert daemon.metric("tokens_total", provider="anthropic", type="output") == 6
    assert (
        daemon.metric("tokens_total", provider="anthropic", type="cache_creation")
        == CACHE_CREATION_INPUT_TOKENS
    )
    assert (daemon.metric("upstream_ttfb_seconds_count", provider="openai") or 0) >= 3
    assert (daemon.metric("upstream_duration_seconds_count", provider="anthropic") or 0) >= 1

    # The client's own key goes through (BYOK): its masked form, never the key, is recorded.
    byok_key = "sk-QzJv8pRtXk0123456789WXYZ"
    byok_client = daemon.openai_client(token, api_key=byok_key)
    byok_client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    byok = wait_for_records(daemon, 5)[0]
    assert (byok["credential_kind"], byok["credential_hint"]) == ("byok", "sk-\u2026WXYZ")
    assert byok["user_agent"].startswith("OpenAI/Python")
    assert byok_key[3:8] not in json.dumps(byok) and byok_key[-5:] not in json.dumps(byok)


def test_refused_and_failed_requests_are_recorded_too(
    daemon: DaemonProcess, upstream: FakeUpstream
) -> None:
    with daemon.httpx_client(daemon.create_token("bob")) as client:
        response = client.post(
            "https://api.openai.com/v1/chat/completions",
            json={"model": "gpt-4o", "messages": []},
            headers={"x-fake-status": "400", "authorization": "Bearer aibridgeproxyd"},
        )
    assert response.status_code == 400
    (record,) = daemon.wait_for(
        lambda: records(daemon, "--initiator", "bob"), message="bob's record"
    )
    assert record["status"] == 400 and record["model"] == "gpt-4o"
    assert record["input_tokens"] is None


def test_invalid_timestamp_is_a_clear_error(daemon: DaemonProcess) -> None:
    result = daemon.cli("interceptions", "list", "--started-after", "last tuesday")
    assert result.returncode == 2
    assert result.stderr.startswith("error: --started-after: invalid timestamp 'last tuesday'")
    assert len(result.stderr.strip().splitlines()) == 1


def test_an_unknown_model_is_recorded_unpriced(daemon: DaemonProcess) -> None:
    token = daemon.create_token("unpriced-user")
    oai = daemon.openai_client(token)
    oai.chat.completions.create(
        model="no-such-model-xyz", messages=[{"role": "user", "content": "hi"}]
    )
    (record,) = daemon.wait_for(
        lambda: records(daemon, "--initiator", "unpriced-user") or None, message="the record"
    )
    assert record["model"] == "no-such-model-xyz" and record["input_tokens"] is not None
    assert record["cost_micros"] is None
    assert daemon.metric("unpriced_token_usage_records_total", provider="openai") >= 1


def chat_cost(daemon: DaemonProcess, client: Any, initiator: str, count: int) -> Any:
    """Send one chat completion for ``operator-priced-model``; the ``cost_micros`` of its
    record (the ``count``-th of ``initiator``)."""
    client.chat.completions.create(
        model="operator-priced-model", messages=[{"role": "user", "content": "hi"}]
    )
    found = daemon.wait_for(
        lambda: (r := records(daemon, "--initiator", initiator)) and len(r) >= count and r,
        message=f"{initiator}'s record {count}",
    )
    return found[0]["cost_micros"]


async def set_price_and_time_the_daemon(daemon: DaemonProcess, prices: ModelPrices) -> float:
    """Store a price as ``prices set`` does; seconds until the running daemon applied it."""
    async with await Store.open(daemon.data_dir / "aibridgeproxyd.db", create=False) as db:
        await db.set_model_price("operator-priced-model", prices)
        started = time.monotonic()
        assert await wait_for_daemons(db), "the daemon did not apply the price"
        return time.monotonic() - started


def test_prices_set_on_a_running_daemon_prices_the_next_record(daemon: DaemonProcess) -> None:
    token = daemon.create_token("price-setter")
    oai = daemon.openai_client(token)
    # The fake's chat usage: 11 prompt tokens of which 3 cached, 3 output.
    fresh, cached, output = INPUT_TOKENS - CACHED_INPUT_TOKENS, CACHED_INPUT_TOKENS, 3
    assert chat_cost(daemon, oai, "price-setter", 1) is None  # genai-prices does not know it

    rates = ModelPrices(Decimal(2), Decimal(10), cache_read=Decimal("0.5"))
    assert asyncio.run(set_price_and_time_the_daemon(daemon, rates)) < 1.0
    # 8*2 + 3*0.5 + 3*10 = 47.5 micro-dollars, rounded half up.
    assert (fresh, cached, output) == (8, 3, 3)
    assert chat_cost(daemon, oai, "price-setter", 2) == 48

    # The CLI returns once the daemon applied it: the very next request is priced anew.
    result = daemon.cli(
        "prices", "set", "operator-priced-model", "--input", "1", "--output", "4",
        "--cache-read", "0.25", check=True,
    )  # fmt: skip
    assert result.stderr == ""  # no "did not confirm" note
    # 8*1 + 3*0.25 + 3*4 = 20.75, rounded half up.
    assert chat_cost(daemon, oai, "price-setter", 3) == 21
    daemon.cli("prices", "delete", "operator-priced-model", check=True)
    assert chat_cost(daemon, oai, "price-setter", 4) is None
