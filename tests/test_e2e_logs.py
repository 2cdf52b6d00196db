"""End to end: debug-level JSON logs of a full scenario carry connect_id/request_id, show
upstream error bodies, and never contain a key or a proxy token; with ``log_interceptions`` each
interception also gives its structured records."""

from __future__ import annotations

import json
from typing import Any

from tests.fakes.upstream import CACHED_INPUT_TOKENS, INPUT_TOKENS, FakeUpstream
from tests.harness import DaemonProcess, basic_auth

CENTRAL_KEYS = ("sk-central-key-number-one", "sk-central-key-number-two")
ANTHROPIC_KEY = "sk-ant-central-secret"
BYOK_KEY = "sk-user-own-secret-key"


def test_debug_logs_of_a_full_scenario_never_contain_secrets() -> None:
    with (
        FakeUpstream() as upstream,
        DaemonProcess(
            {
                "upstream_ca_file": upstream.ca_pem_path,
                "log_level": "debug",
                "log_format": "json",
                "log_interceptions": True,  # its records must hold no secret either
            }
        ) as d,
    ):
        d.edit_provider("openai", upstream.base_url, *CENTRAL_KEYS)
        d.edit_provider("anthropic", upstream.origin, ANTHROPIC_KEY)
        d.reload_and_wait()
        token = d.create_token("alice")
        upstream.fail_key(CENTRAL_KEYS[0], 429, retry_after=30)  # failover
        chat = "https://api.openai.com/v1/chat/completions"
        body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
        with d.httpx_client(token) as client:
            assert (
                client.post(
                    chat, json=body, headers={"authorization": f"Bearer {token}"}
                ).status_code
                == 200
            )
            assert (
                client.post(
                    chat, json=body, headers={"authorization": f"Bearer {BYOK_KEY}"}
                ).status_code
                == 200
            )
            failed = client.post(
                chat,
                json=body,
                headers={"authorization": "Bearer aibridgeproxyd", "x-fake-status": "500"},
            )
            assert failed.status_code == 500
            stream = client.post(
                chat,
                json={**body, "stream": True},
                headers={"authorization": "Bearer aibridgeproxyd"},
            )
            assert stream.status_code == 200
        ant = d.anthropic_client(token, api_key=token)
        ant.messages.create(
            model="claude-haiku-4-5", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
        )
        assert d.raw_connect("api.openai.com:443", basic_auth("wrong-token")).status_code == 407
        d.wait_for(lambda: "upstream answered 500" in d.logs(), message="error body logged")
        d.reload_and_wait()
        logs = d.logs()

    for secret in (token, *CENTRAL_KEYS, ANTHROPIC_KEY, BYOK_KEY):
        assert secret not in logs, f"a secret reached the logs: {secret[:6]}..."
    lines = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    assert lines, "log_format json gives one object per line"
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    routed = [line for line in lines if line["message"].startswith("routing ")]
    assert routed and all(line.get("request_id") and line.get("connect_id") for line in routed)
    failover = [line for line in lines if "failing over" in line["message"]]
    assert failover and failover[0]["request_id"]
    errors = [line for line in lines if line["message"].startswith("upstream answered 500")]
    assert errors and errors[0]["level"] == "error" and errors[0]["request_id"]


def test_log_interceptions_gives_start_end_and_usage_records_without_a_secret() -> None:
    """An OpenAI SDK request, buffered then streamed, through a daemon with
    ``log_interceptions: true``: each gives interception_start, interception_end and token_usage
    lines, one JSON object each, with the record's values and no key or token."""
    with (
        FakeUpstream() as upstream,
        DaemonProcess(
            {
                "upstream_ca_file": upstream.ca_pem_path,
                "log_format": "json",
                "log_interceptions": True,
            }
        ) as d,
    ):
        d.edit_provider("openai", upstream.base_url, CENTRAL_KEYS[0])
        d.reload_and_wait()
        token = d.create_token("alice")
        client = d.openai_client(token)
        messages: Any = [{"role": "user", "content": "hi"}]
        buffered = client.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=messages
        )
        stream = client.chat.completions.create(
            model="gpt-4o",
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        request_id = buffered.headers["x-aibridge-request-id"]

        def records() -> list[dict[str, Any]]:
            return [r for r in d.json_logs() if r["message"] == "interception log"]

        d.wait_for(
            lambda: sum(r["record_type"] == "token_usage" for r in records()) == 2,
            message="both interceptions logged",
        )
        logs = d.logs()
        lines = records()

    for secret in (token, CENTRAL_KEYS[0]):
        assert secret not in logs, f"a secret reached the logs: {secret[:6]}..."
    mine = [line for line in lines if line["interception_id"] == request_id]
    assert [line["record_type"] for line in mine] == [
        "interception_start",
        "interception_end",
        "token_usage",
        "prompt_usage",
    ]
    start, end, usage, prompt = mine
    assert prompt["prompt"] == "hi"
    assert all(line["request_id"] == request_id and line["connect_id"] for line in mine)
    assert start["initiator"] == "alice"
    assert (start["provider"], start["provider_name"]) == ("openai", "openai")
    assert start["model"] == "gpt-4o" and start["path"] == "/v1/chat/completions"
    assert start["client"] and start["user_agent"].startswith("OpenAI/Python")
    assert start["started_at"].endswith("Z")
    assert (end["status"], end["error"], end["streamed"]) == (200, None, False)
    assert end["duration_ms"] >= end["ttfb_ms"] > 0
    assert end["credential_kind"] == "central"
    assert end["credential_hint"] and end["credential_hint"] != CENTRAL_KEYS[0]
    assert (usage["input_tokens"], usage["cache_read_input_tokens"]) == (
        INPUT_TOKENS - CACHED_INPUT_TOKENS,
        CACHED_INPUT_TOKENS,
    )
    assert usage["output_tokens"] == 3 and "cache_creation_input_tokens" not in usage
    streamed_end = [
        line
        for line in lines
        if line["record_type"] == "interception_end" and line["interception_id"] != request_id
    ]
    assert len(streamed_end) == 1 and streamed_end[0]["streamed"] is True
