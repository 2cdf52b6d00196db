"""Structured interception logs (``log_interceptions``): the record builder
(``interception.log_records``) on its own, how the records read in each log format, and the
recording addon emitting them for a routed request without a secret in them."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aibridgeproxyd.addons.interceptions import RecordInterceptions
from mitmproxy import http
from mitmproxy.flow import Error

from aibridgeproxyd.adapters import ADAPTERS
from aibridgeproxyd.errors import SecretRedactor
from aibridgeproxyd.interception.log_records import (
    MESSAGE,
    emit_records,
    finish_records,
    start_record,
)
from aibridgeproxyd.interception.state import ConnectInfo, RequestContext
from aibridgeproxyd.logs import JsonFormatter, TextFormatter
from aibridgeproxyd.model import InterceptionRecord, ToolCall
from aibridgeproxyd.store import Store
from tests.unit.test_adapters_common import routed
from tests.unit.test_interceptions_addon import (
    CHAT_USAGE,
    KEY,
    SSE_USAGE,
    TOKEN,
    Proxy,
)

RECORD = InterceptionRecord(
    request_id="6f1c7a52-0000-4000-8000-000000000001",
    connect_id="c-1",
    initiator="alice",
    provider="anthropic",
    provider_type="anthropic",
    model="claude-sonnet-4-5",
    client="Claude Code",
    method="POST",
    path="/v1/messages",
    status=200,
    streamed=True,
    input_tokens=12,
    output_tokens=40,
    cache_read_input_tokens=1000,
    cache_creation_input_tokens=None,
    reasoning_output_tokens=None,
    provider_name="anthropic-prod",
    user_agent="claude-cli/2.1.90",
    credential_kind="central",
    credential_hint="sk-…WXYZ",
    started_at="2026-11-29T18:00:00.000Z",
    ended_at="2026-11-29T18:00:01.500Z",
    ttfb_ms=300.0,
    duration_ms=1500.0,
    cost_micros=4200,
    client_session_id="session-7",
    prompt="list the files\nplease",
    tool_calls=(
        ToolCall("toolu_01", "Bash", '{"command": "ls"}'),
        ToolCall(None, "Read", '{"path": "a.txt"}'),
    ),
    thoughts=("I should list them.", "Then read a.txt."),
)


def by_type(records: list[tuple[str, dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = {}
    for record_type, fields in records:
        grouped.setdefault(record_type, []).append(fields)
    return grouped


# --- the builder -----------------------------------------------------------------------------


def test_interception_start_names_who_which_provider_model_and_client() -> None:
    info = ConnectInfo("api.anthropic.com", 443, intercept=True, identity="alice")
    ctx = RequestContext(
        request_id="r-1", connect=info, provider=routed("anthropic"), adapter=ADAPTERS["anthropic"]
    )
    ctx.started = 1_800_000_000.25
    recording = ctx.recording
    recording.request_model, recording.client = "claude-haiku-4-5", "Claude Code"
    recording.user_agent, recording.method, recording.path = "claude-cli/2", "POST", "/v1/messages"
    record_type, fields = start_record(ctx)
    assert record_type == "interception_start"
    assert fields == {
        "interception_id": "r-1",
        "initiator": "alice",
        "provider": "anthropic",
        "provider_name": ctx.provider.name,
        "model": "claude-haiku-4-5",
        "client": "Claude Code",
        "user_agent": "claude-cli/2",
        "method": "POST",
        "path": "/v1/messages",
        "started_at": "2027-01-15T08:00:00.250Z",
    }
    recording.client_session_id = "session-7"
    assert start_record(ctx)[1]["client_session_id"] == "session-7"


def test_a_finished_interception_gives_end_usage_prompt_each_tool_call_and_thought() -> None:
    records = finish_records(RECORD)
    assert [record_type for record_type, _ in records] == [
        "interception_end",
        "token_usage",
        "prompt_usage",
        "tool_usage",
        "tool_usage",
        "model_thought",
        "model_thought",
    ]
    grouped = by_type(records)
    interception_id = RECORD.request_id
    assert all(f["interception_id"] == interception_id for _, f in records)
    assert grouped["interception_end"] == [
        {
            "interception_id": interception_id,
            "status": 200,
            "error": None,
            "model": "claude-sonnet-4-5",
            "ended_at": "2026-11-29T18:00:01.500Z",
            "duration_ms": 1500.0,
            "ttfb_ms": 300.0,
            "streamed": True,
            "cost_micros": 4200,
            "credential_kind": "central",
            "credential_hint": "sk-…WXYZ",
            "client_session_id": "session-7",
        }
    ]
    assert grouped["prompt_usage"] == [
        {"interception_id": interception_id, "prompt": "list the files\nplease"}
    ]
    assert grouped["tool_usage"] == [
        {
            "interception_id": interception_id,
            "tool_call_id": "toolu_01",
            "tool": "Bash",
            "input": '{"command": "ls"}',
        },
        {
            "interception_id": interception_id,
            "tool_call_id": None,
            "tool": "Read",
            "input": '{"path": "a.txt"}',
        },
    ]
    assert [f["content"] for f in grouped["model_thought"]] == list(RECORD.thoughts)


def test_token_usage_carries_only_the_counts_reported_and_none_when_nothing_was() -> None:
    (usage,) = by_type(finish_records(RECORD))["token_usage"]
    assert usage == {
        "interception_id": RECORD.request_id,
        "model": "claude-sonnet-4-5",
        "input_tokens": 12,
        "output_tokens": 40,
        "cache_read_input_tokens": 1000,
    }
    unreported = dataclasses.replace(
        RECORD, input_tokens=None, output_tokens=None, cache_read_input_tokens=None
    )
    assert "token_usage" not in by_type(finish_records(unreported))
    zero = dataclasses.replace(unreported, output_tokens=0)
    assert by_type(finish_records(zero))["token_usage"][0]["output_tokens"] == 0


def test_nothing_recorded_besides_usage_gives_no_prompt_tool_or_thought_record() -> None:
    bare = dataclasses.replace(RECORD, prompt=None, tool_calls=(), thoughts=())
    assert set(by_type(finish_records(bare))) == {"interception_end", "token_usage"}


# --- as logged -------------------------------------------------------------------------------


def logged(caplog: pytest.LogCaptureFixture, formatter: logging.Formatter) -> list[str]:
    return [formatter.format(r) for r in caplog.records if r.name == "aibridgeproxyd.interceptions"]


def test_each_record_is_one_json_object_with_its_type_ids_and_fields(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ids = {"connect_id": "c-1", "request_id": RECORD.request_id}
    with caplog.at_level(logging.INFO):
        emit_records(finish_records(RECORD), ids, SecretRedactor([]))
    lines = [json.loads(line) for line in logged(caplog, JsonFormatter())]
    assert len(lines) == 7
    for line in lines:
        assert line["message"] == MESSAGE and line["level"] == "info"
        assert line["connect_id"] == "c-1" and line["request_id"] == RECORD.request_id
        assert line["interception_id"] == RECORD.request_id
    end = lines[0]
    assert end["record_type"] == "interception_end" and end["cost_micros"] == 4200
    assert end["error"] is None and end["credential_hint"] == "sk-…WXYZ"
    assert lines[2] == lines[2] | {"record_type": "prompt_usage", "prompt": RECORD.prompt}


def test_in_text_format_a_record_stays_on_one_readable_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO):
        emit_records(finish_records(RECORD), {"request_id": "r"}, SecretRedactor([]))
    lines = logged(caplog, TextFormatter())
    assert all("\n" not in line for line in lines)
    prompt = next(line for line in lines if "record_type=prompt_usage" in line)
    assert 'prompt="list the files\\nplease"' in prompt
    tool = next(line for line in lines if "record_type=tool_usage" in line)
    assert 'tool=Bash input="{\\"command\\": \\"ls\\"}"' in tool


def test_text_format_writes_values_as_json_does_so_null_reads_apart_from_a_string(
    caplog: pytest.LogCaptureFixture,
) -> None:
    odd = dataclasses.replace(RECORD, error=None, streamed=True, model="None")
    with caplog.at_level(logging.INFO):
        emit_records(finish_records(odd), {"request_id": "r"}, SecretRedactor([]))
    end = next(line for line in logged(caplog, TextFormatter()) if "interception_end" in line)
    assert "error=null" in end and "streamed=true" in end
    assert "model=None" in end  # the string None: a plain word, apart from null


def test_string_fields_pass_through_the_requests_redaction(
    caplog: pytest.LogCaptureFixture,
) -> None:
    echoed = dataclasses.replace(RECORD, prompt=f"my key is {KEY}", thoughts=(f"{TOKEN}?",))
    with caplog.at_level(logging.INFO):
        emit_records(finish_records(echoed), {}, SecretRedactor([KEY, TOKEN]))
    text = "\n".join(logged(caplog, JsonFormatter()))
    assert KEY not in text and TOKEN not in text
    assert "my key is ***" in text


def test_nothing_is_built_when_info_lines_are_not_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="aibridgeproxyd.interceptions"):
        emit_records(finish_records(RECORD), {}, SecretRedactor([]))
    assert not [r for r in caplog.records if r.name == "aibridgeproxyd.interceptions"]


# --- through the recording addon -------------------------------------------------------------


@pytest.fixture
async def database(tmp_path: Path) -> AsyncIterator[Path]:
    path = tmp_path / "aibridgeproxyd.db"
    store = await Store.open(path)
    await store.close()
    yield path


def logging_proxy(
    database: Path, log_interceptions: bool = True, keys: tuple[str, ...] = (KEY,)
) -> Proxy:
    proxy = Proxy(database, keys=keys)
    proxy.addons = (
        proxy.addons[0],
        RecordInterceptions(proxy.writer, proxy.metrics, log_interceptions=log_interceptions),
    )
    proxy.writer.start()
    return proxy


def interception_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [json.loads(line) for line in logged(caplog, JsonFormatter())]


async def test_a_routed_request_logs_start_end_and_usage_without_a_secret(
    database: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    proxy = logging_proxy(database)
    flow = proxy.flow(authorization=f"Bearer {TOKEN}")
    with caplog.at_level(logging.INFO):
        proxy.exchange(
            flow, http.Response.make(200, CHAT_USAGE, {"content-type": "application/json"})
        )
    (record,) = await proxy.records()
    lines = interception_lines(caplog)
    assert [line["record_type"] for line in lines] == [
        "interception_start",
        "interception_end",
        "token_usage",
        "prompt_usage",
    ]
    start, end, usage, prompt = lines
    assert prompt["interception_id"] == record["id"] and prompt["prompt"]
    assert start["interception_id"] == record["id"] == start["request_id"]
    assert start["connect_id"] == record["connect_id"]
    assert start | {"initiator": "alice", "provider": "openai", "provider_name": "openai"} == start
    assert start["model"] == "gpt-4o" and start["client"] == "Codex"
    assert start["path"] == "/v1/chat/completions"
    assert end["status"] == 200 and end["streamed"] is False
    assert (
        end["credential_kind"] == "central" and end["credential_hint"] == record["credential_hint"]
    )
    assert end["ended_at"] == record["ended_at"] and end["duration_ms"] == record["duration_ms"]
    assert (usage["input_tokens"], usage["output_tokens"]) == (3, 5)
    assert "cache_read_input_tokens" not in usage
    text = repr([r.__dict__ for r in caplog.records])
    assert KEY not in text and TOKEN not in text


async def test_a_refused_request_logs_its_start_and_its_refusal(
    database: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    proxy = logging_proxy(database, keys=())
    flow = proxy.flow(authorization=f"Bearer {TOKEN}")
    with caplog.at_level(logging.INFO):
        proxy.exchange(flow)
    await proxy.records()  # stops the writer
    lines = interception_lines(caplog)
    # The prompt was read before the refusal, and is kept: who tried to send what.
    assert [line["record_type"] for line in lines] == [
        "interception_start",
        "interception_end",
        "prompt_usage",
    ]
    assert (lines[1]["status"], lines[1]["error"]) == (403, "no_key_configured")
    assert lines[1]["ttfb_ms"] is None and lines[1]["credential_hint"] is None
    assert TOKEN not in repr([r.__dict__ for r in caplog.records])


async def test_a_streamed_answer_logs_its_usage_once_the_stream_ends(
    database: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    proxy = logging_proxy(database)
    flow = proxy.flow(authorization=f"Bearer {TOKEN}")
    response = http.Response.make(200, SSE_USAGE, {"content-type": "text/event-stream"})
    with caplog.at_level(logging.INFO):
        proxy.exchange(flow, response, chunks=3)
    await proxy.records()
    lines = interception_lines(caplog)
    end = next(line for line in lines if line["record_type"] == "interception_end")
    usage = next(line for line in lines if line["record_type"] == "token_usage")
    assert end["streamed"] is True and end["model"] == "gpt-4o-2024"
    assert (usage["input_tokens"], usage["output_tokens"]) == (4, 6)


async def test_off_by_default_no_interception_record_is_logged(
    database: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    proxy = logging_proxy(database, log_interceptions=False)
    flow = proxy.flow(authorization=f"Bearer {TOKEN}")
    with caplog.at_level(logging.DEBUG):
        proxy.exchange(flow, http.Response.make(200, CHAT_USAGE))
    await proxy.records()
    assert not interception_lines(caplog)
    assert "aibridgeproxyd.interception_start_logged" not in flow.metadata


async def test_a_request_cut_short_before_routing_logs_its_start_with_its_end(
    database: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    proxy = logging_proxy(database)
    flow = proxy.flow(authorization=f"Bearer {TOKEN}")
    with caplog.at_level(logging.INFO):
        proxy.hook("requestheaders", flow)
        flow.error = Error("client disconnected")
        proxy.hook("error", flow)
    await proxy.records()
    lines = interception_lines(caplog)
    assert [line["record_type"] for line in lines] == ["interception_start", "interception_end"]
    assert lines[1]["error"] == "client disconnected" and lines[1]["status"] is None
