"""The request's content on its interception record, through the chain the daemon builds
(``build_chain``, mitmproxy's hook dispatch): the config's ``record_prompts`` and
``record_max_bytes`` reach the read, which happens before the adapter's rewrite (Bedrock drops
the client's headers and writes a new body), and ``build_record`` copies prompt, tool-result
ids and client session onto the record."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from mitmproxy import http
from mitmproxy.proxy.layers.http import (
    HttpRequestHeadersHook,
    HttpRequestHook,
    HttpResponseHeadersHook,
    HttpResponseHook,
)
from mitmproxy.test import taddons, tflow

from aibridgeproxyd.failclosed import guard_chain
from aibridgeproxyd.interception import recording
from aibridgeproxyd.interception.state import ConnectInfo, request_context
from aibridgeproxyd.model import InterceptionRecord, ProviderRecord
from aibridgeproxyd.providers import evaluate_providers
from aibridgeproxyd.snapshot import build_snapshot
from tests.unit.test_adapters_bedrock import SETTINGS as BEDROCK_SETTINGS
from tests.unit.test_chain_order import Parts, _config
from tests.unit.test_request_content import (
    CLAUDE_FIRST_TURN,
    CLAUDE_TOOL_RESULTS,
    CLAUDE_TOOL_USE,
    SESSION,
    claude_code,
)

HEADER_SESSION = "0f9e8d7c-header-session"
PROMPT = "Fix the failing test in tests/test_x.py"
ANSWER = b'{"type":"message","usage":{"input_tokens":3,"output_tokens":4}}'


def chain_for(tmp_path: Path, provider: ProviderRecord, **keys: str) -> tuple[Parts, Any]:
    """The daemon's chain (our addons), configured with ``keys``, routing ``provider``."""
    parts = Parts(_config(tmp_path, auth="none", **keys))
    parts.holder.current = build_snapshot(evaluate_providers([provider]), [])
    ours = [a for a in parts.chain() if not type(a).__module__.startswith("mitmproxy.")]
    return parts, ours


def claude_code_flow(
    parts: Parts, body: dict[str, Any], path: str = "/v1/messages?beta=true", **headers: str
) -> http.HTTPFlow:
    flow = tflow.tflow()
    request = flow.request
    request.method, request.path = "POST", path
    request.host, request.port = "api.anthropic.com", 443
    request.headers.update(
        {
            "user-agent": "claude-cli/2.0.14 (external, cli)",
            "anthropic-version": "2023-06-01",
            "content-type": "application/json",
            **headers,
        }
    )
    request.content = json.dumps(body).encode()
    info = ConnectInfo(host="api.anthropic.com", port=443, intercept=True)
    info.provider_name = info.provider_type = parts.holder.current.providers[0].type
    info.identity = "alice"
    parts.connections.add(flow.client_conn, info)
    return flow


async def exchange(ours: list[object], parts: Parts, flow: http.HTTPFlow) -> InterceptionRecord:
    """The request's hooks, the upstream's answer (unless the proxy answered), its record."""
    with taddons.context() as context:
        context.master.addons.add(*ours)
        guard_chain(context.master, parts.metrics.hook_failures)
        addons = context.master.addons
        await addons.handle_lifecycle(HttpRequestHeadersHook(flow))
        await addons.handle_lifecycle(HttpRequestHook(flow))
        if flow.response is None:
            flow.response = http.Response(
                b"HTTP/1.1", 200, b"", http.Headers(content_type="application/json"),
                ANSWER, None, time.time(), time.time(),
            )  # fmt: skip
            flow.response.timestamp_end = None  # an upstream's answer, its body still to come
        await addons.handle_lifecycle(HttpResponseHeadersHook(flow))
        await addons.handle_lifecycle(HttpResponseHook(flow))
    (record,) = parts.writer.records
    return record


ANTHROPIC = ProviderRecord("anthropic", "anthropic", keys=("sk-ant-central-0123456789",))
BEDROCK = ProviderRecord("bedrock", "bedrock", settings=BEDROCK_SETTINGS)
TOOL_TURN = claude_code(CLAUDE_FIRST_TURN, CLAUDE_TOOL_USE, CLAUDE_TOOL_RESULTS)


async def test_a_claude_code_tool_turn_records_its_prompt_tool_results_and_session(
    tmp_path: Path,
) -> None:
    parts, ours = chain_for(tmp_path, ANTHROPIC)
    flow = claude_code_flow(parts, TOOL_TURN, **{"X-Claude-Code-Session-Id": HEADER_SESSION})
    record = await exchange(ours, parts, flow)
    assert record.client == "Claude Code" and record.status == 200
    assert record.prompt == PROMPT
    assert record.tool_result_ids == ("toolu_01A", "toolu_01B")
    # The header wins over metadata.user_id's session.
    assert record.client_session_id == HEADER_SESSION


async def test_claude_codes_body_session_is_recorded_when_no_header_carries_one(
    tmp_path: Path,
) -> None:
    parts, ours = chain_for(tmp_path, ANTHROPIC)
    record = await exchange(ours, parts, claude_code_flow(parts, TOOL_TURN))
    assert record.client_session_id == SESSION


async def test_record_prompts_false_records_no_prompt_but_still_the_thread_and_session(
    tmp_path: Path,
) -> None:
    parts, ours = chain_for(tmp_path, ANTHROPIC, record_prompts="false")
    record = await exchange(ours, parts, claude_code_flow(parts, TOOL_TURN))
    assert record.prompt is None
    assert record.tool_result_ids == ("toolu_01A", "toolu_01B")
    assert record.client_session_id == SESSION


async def test_record_max_bytes_from_the_config_cuts_the_prompt(tmp_path: Path) -> None:
    parts, ours = chain_for(tmp_path, ANTHROPIC, record_max_bytes="10")
    record = await exchange(ours, parts, claude_code_flow(parts, TOOL_TURN))
    assert record.prompt == PROMPT[:10]


async def test_a_bedrock_request_is_read_before_the_rewrite_drops_its_headers(
    tmp_path: Path,
) -> None:
    parts, ours = chain_for(tmp_path, BEDROCK)
    flow = claude_code_flow(parts, TOOL_TURN, **{"X-Claude-Code-Session-Id": HEADER_SESSION})
    record = await exchange(ours, parts, flow)
    # Sent to Bedrock: a new body, without the client's headers.
    assert flow.request.path.endswith("/invoke-with-response-stream")
    assert "x-claude-code-session-id" not in flow.request.headers
    assert (record.prompt, record.client_session_id) == (PROMPT, HEADER_SESSION)
    assert record.tool_result_ids == ("toolu_01A", "toolu_01B")


async def test_a_request_refused_on_its_head_keeps_its_header_session(tmp_path: Path) -> None:
    parts, ours = chain_for(tmp_path, ANTHROPIC)
    flow = claude_code_flow(
        parts, TOOL_TURN, "/v1/./messages", **{"X-Claude-Code-Session-Id": HEADER_SESSION}
    )
    record = await exchange(ours, parts, flow)
    assert (record.status, record.error) == (400, "invalid_path")
    assert record.client_session_id == HEADER_SESSION
    assert record.prompt is None  # the body was never read


async def test_a_fault_in_the_reader_is_logged_and_the_request_still_goes_upstream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"bug quoting the body: {PROMPT}")

    monkeypatch.setattr(recording, "request_content", broken)
    parts, ours = chain_for(tmp_path, ANTHROPIC)
    flow = claude_code_flow(parts, TOOL_TURN, **{"X-Claude-Code-Session-Id": HEADER_SESSION})
    with caplog.at_level(logging.WARNING, "aibridgeproxyd.interceptions"):
        record = await exchange(ours, parts, flow)
    assert record.status == 200 and record.error is None
    ctx = request_context(flow)
    assert ctx is not None and ctx.proxy_answer_code is None
    assert (record.prompt, record.tool_result_ids) == (None, ())
    assert record.client_session_id == HEADER_SESSION
    (line,) = [r for r in caplog.records if "request content not recorded" in r.getMessage()]
    assert line.getMessage() == "request content not recorded: TypeError"  # never the body


@pytest.mark.parametrize("max_bytes", ["1000", "30"])
async def test_a_key_pasted_into_a_prompt_is_redacted_before_the_cut(
    tmp_path: Path, max_bytes: str
) -> None:
    # The central key in the prompt: stored as ***, and no part of it is left where
    # record_max_bytes cuts (30 bytes end inside the key).
    key = ANTHROPIC.keys[0]
    turn = {"role": "user", "content": f"Why is my key {key} refused?"}
    parts, ours = chain_for(tmp_path, ANTHROPIC, record_max_bytes=max_bytes)
    record = await exchange(ours, parts, claude_code_flow(parts, claude_code(turn)))
    assert record.prompt == "Why is my key *** refused?"[: int(max_bytes)]
    assert "sk-ant" not in (record.prompt or "")


async def test_a_key_sent_in_the_user_agent_or_session_header_is_not_stored(
    tmp_path: Path,
) -> None:
    key = ANTHROPIC.keys[0]
    parts, ours = chain_for(tmp_path, ANTHROPIC)
    flow = claude_code_flow(
        parts,
        TOOL_TURN,
        **{"User-Agent": f"claude-cli/2.0.14 {key}", "X-Claude-Code-Session-Id": key},
    )
    record = await exchange(ours, parts, flow)
    assert (record.user_agent, record.client_session_id) == ("claude-cli/2.0.14 ***", "***")


async def test_a_clients_own_key_removed_by_a_signed_route_is_still_redacted(
    tmp_path: Path,
) -> None:
    # Bedrock signs with the operator's AWS keys and drops what the client sent (Claude Code's
    # own x-api-key): that key is still known when the record is built.
    own = "sk-ant-api03-client-own-key-0123456789"
    turn = {"role": "user", "content": f"my key {own} works?"}
    parts, ours = chain_for(tmp_path, BEDROCK)
    flow = claude_code_flow(parts, claude_code(turn), **{"x-api-key": own})
    record = await exchange(ours, parts, flow)
    assert "x-api-key" not in flow.request.headers
    assert record.prompt == "my key *** works?"


async def test_a_byok_key_pasted_into_the_prompt_is_redacted(tmp_path: Path) -> None:
    own = "sk-ant-api03-byok-user-key-0123456789"
    turn = {"role": "user", "content": f"is {own} mine?"}
    parts, ours = chain_for(tmp_path, ANTHROPIC)
    flow = claude_code_flow(parts, claude_code(turn), **{"x-api-key": own})
    record = await exchange(ours, parts, flow)
    assert record.credential_kind == "byok"
    assert record.prompt == "is *** mine?"
