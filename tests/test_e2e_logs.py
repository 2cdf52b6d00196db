"""End to end: debug-level JSON logs of a full scenario carry connect_id/request_id, show
upstream error bodies, and never contain a key or a proxy token."""

from __future__ import annotations

import json

from tests.fakes.upstream import FakeUpstream
from tests.harness import DaemonProcess, basic_auth

CENTRAL_KEYS = ("sk-central-key-number-one", "sk-central-key-number-two")
ANTHROPIC_KEY = "sk-ant-central-secret"
BYOK_KEY = "sk-user-own-secret-key"


def test_debug_logs_of_a_full_scenario_never_contain_secrets() -> None:
    with (
        FakeUpstream() as upstream,
        DaemonProcess(
            {"upstream_ca_file": upstream.ca_pem_path, "log_level": "debug", "log_format": "json"}
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
