"""The recording addon driven through mitmproxy's test flows, behind the route addon as in the
daemon's chain: each request's record reaches the real writer and a real SQLite store."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from aibridgeproxyd.addons.interceptions import RecordInterceptions
from aibridgeproxyd.addons.route import RouteRequests
from mitmproxy import http, websocket
from mitmproxy.test import taddons, tflow

from aibridgeproxyd.failclosed import Role, guard
from aibridgeproxyd.interception.state import ConnectInfo, ConnectionTable, request_context
from aibridgeproxyd.interception.writer import InterceptionWriter
from aibridgeproxyd.metrics import Metrics
from aibridgeproxyd.model import InterceptionFilter, ProviderRecord
from aibridgeproxyd.pricing import ModelPrices, PriceTable
from aibridgeproxyd.providers import evaluate_providers
from aibridgeproxyd.reload import SnapshotHolder
from aibridgeproxyd.snapshot import build_snapshot
from aibridgeproxyd.store import Store
from tests.metric_samples import registry_samples, sample_value
from tests.unit.stream_layer import deliver

KEY = "sk-central-unit-0123456789abcdef"
TOKEN = "proxy-token-0123456789"
CHAT = b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}'
CHAT_USAGE = b'{"model": "gpt-4o-2024", "usage": {"prompt_tokens": 3, "completion_tokens": 5}}'
SSE_USAGE = (
    b'data: {"model": "gpt-4o-2024", "choices": []}\n\n'
    b'data: {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 6}}\n\n'
    b"data: [DONE]\n\n"
)


class Proxy:
    """RouteRequests then RecordInterceptions, as in the daemon's chain, writing to ``database``."""

    def __init__(self, database: Path, name: str = "openai", **provider: Any) -> None:
        self.metrics = Metrics()
        self.writer = InterceptionWriter(database, self.metrics, retention=86400.0)
        self.connections = ConnectionTable()
        holder = SnapshotHolder()
        record = ProviderRecord(name=name, type="openai", **provider)
        holder.current = build_snapshot(evaluate_providers([record]), [])
        self.addons: tuple[Any, ...] = (
            RouteRequests(holder, self.connections, "aibridgeproxyd"),
            RecordInterceptions(self.writer, self.metrics),
        )

    def flow(self, path: str = "/v1/chat/completions", **headers: str) -> http.HTTPFlow:
        flow = tflow.tflow()
        request = flow.request
        request.method, request.host, request.port, request.path = (
            "POST",
            "api.openai.com",
            443,
            path,
        )
        request.headers.update({"user-agent": "codex_cli_rs/0.1", **headers})
        request.content = CHAT
        info = ConnectInfo("api.openai.com", 443, intercept=True, identity="alice")
        info.proxy_token = TOKEN
        self.connections.add(flow.client_conn, info)
        return flow

    def hook(self, name: str, flow: http.HTTPFlow) -> None:
        """Fire hook ``name`` on every addon that has it, in chain order."""
        for addon in self.addons:
            if method := getattr(addon, name, None):  # as mitmproxy does: a falsy one is skipped
                method(flow)

    def exchange(
        self, flow: http.HTTPFlow, upstream: http.Response | None = None, chunks: int = 0
    ) -> None:
        """requestheaders → request → responseheaders → response. ``upstream`` answers what no
        addon answered; with ``chunks``, its body streams to the client in that many chunks."""
        self.hook("requestheaders", flow)
        self.hook("request", flow)
        if flow.response is None:
            assert upstream is not None
            body, upstream.timestamp_end = upstream.content or b"", None
            upstream.stream = bool(chunks)
            flow.response = upstream
        else:
            body = b""
        self.hook("responseheaders", flow)
        response = flow.response
        if chunks and response.stream:
            size = -(-len(body) // chunks)
            self.client_got = deliver(flow, [body[i : i + size] for i in range(0, len(body), size)])
            response.content = None
        self.hook("response", flow)

    async def records(self) -> list[dict[str, Any]]:
        """Every record, once the writer has written what it was given."""
        await self.writer.stop()
        async with await Store.open(self.writer.database) as store:
            return await store.list_interceptions(InterceptionFilter())


@pytest.fixture
async def database(tmp_path: Path) -> AsyncIterator[Path]:
    path = tmp_path / "aibridgeproxyd.db"
    store = await Store.open(path)
    await store.close()
    yield path


def upstream(status: int, body: bytes, **headers: str) -> http.Response:
    return http.Response.make(status, body, {"content-type": "application/json", **headers})


async def test_a_buffered_answer_is_recorded_with_its_usage(database: Path) -> None:
    proxy = Proxy(database, keys=(KEY,))
    proxy.writer.start()
    flow = proxy.flow(authorization=f"Bearer {TOKEN}")
    with taddons.context(*proxy.addons):
        proxy.exchange(flow, upstream(200, CHAT_USAGE))
    ctx = request_context(flow)
    assert ctx is not None and not ctx.recording.dropped
    (record,) = await proxy.records()
    assert record["request_id"] == ctx.request_id and record["initiator"] == "alice"
    assert (record["client"], record["method"], record["path"]) == (
        "Codex",
        "POST",
        "/v1/chat/completions",
    )
    assert (record["status"], record["streamed"], record["error"]) == (200, False, None)
    assert (record["model"], record["input_tokens"], record["output_tokens"]) == (
        "gpt-4o-2024",
        3,
        5,
    )
    assert record["ttfb_ms"] is not None
    tokens = proxy.metrics.registry.get_sample_value(
        "coder_aibridgeproxyd_tokens_total", {"provider": "openai", "type": "input"}
    )
    assert tokens == 3


async def test_reasoning_tokens_reach_the_record_and_the_tokens_counter(
    database: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Whichever parser reads them (usage.py), reasoning tokens go the way of the other counts.
    from aibridgeproxyd.addons import interceptions as addon_module

    from aibridgeproxyd.usage import Usage

    reported = Usage(input_tokens=3, output_tokens=300, reasoning_output_tokens=256, model="o3")
    monkeypatch.setattr(addon_module, "finished_usage", lambda flow, recording: reported)
    proxy = Proxy(database, keys=(KEY,))
    proxy.writer.start()
    flow = proxy.flow(authorization=f"Bearer {TOKEN}")
    with taddons.context(*proxy.addons):
        proxy.exchange(flow, upstream(200, CHAT_USAGE))
    (record,) = await proxy.records()
    assert (record["output_tokens"], record["reasoning_output_tokens"]) == (300, 256)
    tokens = proxy.metrics.registry.get_sample_value
    labels = {"provider": "openai"}
    assert tokens("coder_aibridgeproxyd_tokens_total", {**labels, "type": "output"}) == 300
    assert (
        tokens("coder_aibridgeproxyd_tokens_total", {**labels, "type": "reasoning_output"}) == 256
    )


async def test_a_streamed_answer_is_recorded_with_the_usage_its_chunks_carried(
    database: Path,
) -> None:
    proxy = Proxy(database, keys=(KEY,))
    proxy.writer.start()
    flow = proxy.flow()
    with taddons.context(*proxy.addons):
        proxy.exchange(flow, upstream(200, SSE_USAGE, **{"content-type": "text/event-stream"}), 5)
    assert proxy.client_got == SSE_USAGE
    (record,) = await proxy.records()
    assert (record["streamed"], record["input_tokens"], record["output_tokens"]) == (True, 4, 6)


async def test_a_refusal_is_recorded_with_its_code_and_no_ttfb(database: Path) -> None:
    proxy = Proxy(database, keys=())
    proxy.writer.start()
    flow = proxy.flow()
    with taddons.context(*proxy.addons):
        proxy.exchange(flow)
    (record,) = await proxy.records()
    assert (record["status"], record["error"], record["ttfb_ms"]) == (
        403,
        "no_key_configured",
        None,
    )
    assert (record["model"], record["input_tokens"]) == ("gpt-4o", None)


async def test_an_upstream_error_body_is_logged_with_the_key_it_echoed_redacted(
    database: Path, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = Proxy(database, keys=(KEY,), allow_byok=True)
    flow = proxy.flow(authorization="Bearer sk-users-own-key-42")
    echoed = json.dumps({"error": {"message": "bad key sk-users-own-key-42 / " + TOKEN}})
    with taddons.context(*proxy.addons), caplog.at_level(logging.WARNING):
        proxy.exchange(flow, upstream(400, echoed.encode()))
    (line,) = [r for r in caplog.records if r.name == "aibridgeproxyd.upstream"]
    assert line.levelno == logging.WARNING
    assert line.getMessage().startswith("upstream answered 400: ")
    assert "sk-users-own-key-42" not in line.getMessage() and TOKEN not in line.getMessage()
    await proxy.writer.stop()


async def test_a_failed_exchange_is_recorded_once_with_its_error(database: Path) -> None:
    proxy = Proxy(database, keys=(KEY,))
    proxy.writer.start()
    flow = proxy.flow()
    with taddons.context(*proxy.addons):
        proxy.hook("requestheaders", flow)
        proxy.hook("request", flow)
        flow.error = tflow.terr("connection reset by peer")
        proxy.hook("error", flow)
        proxy.hook("error", flow)
    (record,) = await proxy.records()
    assert (record["status"], record["error"]) == (None, "connection reset by peer")


async def test_a_websocket_session_is_recorded_at_its_end_with_the_summed_usage(
    database: Path,
) -> None:
    proxy = Proxy(database, keys=(KEY,))
    proxy.writer.start()
    flow = proxy.flow("/v1/responses")
    done = json.dumps({"type": "response.completed", "response": {"usage": {"input_tokens": 2, "output_tokens": 3}}}).encode()  # fmt: skip
    with taddons.context(*proxy.addons):
        proxy.hook("requestheaders", flow)
        proxy.hook("request", flow)
        flow.response = upstream(101, b"")
        flow.websocket = websocket.WebSocketData()
        proxy.hook("responseheaders", flow)
        proxy.hook("response", flow)  # the upgrade: not recorded yet
        for content, from_client in ((b'{"type": "response.create"}', True), (done, False), (done, False)):  # fmt: skip
            message = websocket.WebSocketMessage(1, from_client, content)
            flow.websocket.messages.append(message)
            proxy.hook("websocket_message", flow)
        proxy.hook("websocket_end", flow)
    (record,) = await proxy.records()
    assert (record["status"], record["input_tokens"], record["output_tokens"]) == (101, 4, 6)


async def test_a_check_that_fails_on_the_answer_is_recorded_as_the_proxys_refusal(
    database: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A check raising in ``response`` after the upstream's headers were seen: the fail-closed
    guard's 502 is the proxy's own answer (error ``internal_error``, no TTFB), never logged as
    the upstream's (found by a review of the restructuring)."""

    class BrokenCheck:
        def response(self, flow: http.HTTPFlow) -> None:
            raise RuntimeError("bug in a check")

    proxy = Proxy(database, keys=(KEY,))
    route, record = proxy.addons
    proxy.addons = (route, guard(BrokenCheck(), Role.CHECK), record)
    proxy.writer.start()
    flow = proxy.flow()
    with taddons.context(*proxy.addons), caplog.at_level(logging.WARNING):
        proxy.exchange(flow, upstream(200, CHAT_USAGE))
    (row,) = await proxy.records()
    assert (row["status"], row["error"], row["ttfb_ms"]) == (502, "internal_error", None)
    assert not [r for r in caplog.records if r.name == "aibridgeproxyd.upstream"]


async def test_a_response_cut_by_a_failing_check_is_recorded_as_the_proxys_doing(
    database: Path,
) -> None:
    """A check raising in ``responseheaders`` (after the recording addon saw the upstream's
    headers) makes the guard cut the response: the record carries ``internal_error`` and no
    TTFB, and the upstream TTFB histogram does not count it (found by a security review)."""

    class BrokenCheck:
        def responseheaders(self, flow: http.HTTPFlow) -> None:
            raise RuntimeError("bug in a check")

    proxy = Proxy(database, keys=(KEY,))
    route, record = proxy.addons
    proxy.addons = (route, record, guard(BrokenCheck(), Role.CHECK))
    proxy.writer.start()
    flow = proxy.flow()
    with taddons.context(*proxy.addons):
        proxy.hook("requestheaders", flow)
        proxy.hook("request", flow)
        flow.response = upstream(401, b'{"error": {"message": "bad key"}}')
        flow.response.timestamp_end = None
        flow.response.stream = True
        proxy.hook("responseheaders", flow)
        assert flow.error is not None  # killed by the guard
        proxy.hook("error", flow)
    (row,) = await proxy.records()
    assert (row["status"], row["error"], row["ttfb_ms"]) == (401, "internal_error", None)
    samples = registry_samples(proxy.metrics.registry)
    assert not sample_value(samples, "coder_aibridgeproxyd_upstream_ttfb_seconds_count")


async def test_the_record_tells_provider_name_user_agent_and_the_credential_masked(
    database: Path,
) -> None:
    byok_key = "sk-client-own-key-0123456789WXYZ"
    proxy = Proxy(database, name="openai-main", keys=(KEY,))
    proxy.writer.start()
    central = proxy.flow(authorization=f"Bearer {TOKEN}")
    byok = proxy.flow(authorization=f"Bearer {byok_key}")
    with taddons.context(*proxy.addons):
        proxy.exchange(central, upstream(200, CHAT_USAGE))
        proxy.exchange(byok, upstream(200, CHAT_USAGE))
    records = {r["request_id"]: r for r in await proxy.records()}
    ids = [getattr(request_context(flow), "request_id", None) for flow in (central, byok)]
    got = [records[request_id] for request_id in ids]
    assert [(r["provider"], r["provider_name"], r["user_agent"]) for r in got] == [
        ("openai", "openai-main", "codex_cli_rs/0.1")
    ] * 2
    assert [(r["credential_kind"], r["credential_hint"]) for r in got] == [
        ("central", "sk-\u2026cdef"),
        ("byok", "sk-\u2026WXYZ"),
    ]
    stored = json.dumps(got)
    for secret in (KEY, byok_key, TOKEN):
        assert secret[:5] not in stored and secret[-5:] not in stored


async def test_a_refusal_before_routing_has_no_credential_kind(database: Path) -> None:
    proxy = Proxy(database, keys=())
    proxy.writer.start()
    flow = proxy.flow()
    with taddons.context(*proxy.addons):
        proxy.exchange(flow)
    (record,) = await proxy.records()
    assert record["error"] == "no_key_configured"
    assert record["credential_hint"] is None


async def test_a_byok_hint_is_the_clients_key_never_the_proxy_token_sent_beside_it(
    database: Path,
) -> None:
    proxy = Proxy(database, keys=(KEY,))
    proxy.writer.start()
    flow = proxy.flow(authorization=f"Bearer {TOKEN}", **{"api-key": "azure-own-key-00009876"})
    with taddons.context(*proxy.addons):
        proxy.exchange(flow, upstream(200, CHAT_USAGE))
    (record,) = await proxy.records()
    assert (record["credential_kind"], record["credential_hint"]) == ("byok", "azu\u20269876")


async def test_priced_usage_counts_its_cost_and_unpriced_usage_counts_as_unpriced(
    database: Path,
) -> None:
    # CHAT_USAGE names gpt-4o-2024; the override prices it: 3 input, 5 output tokens.
    prices = PriceTable({"gpt-4o-2024": ModelPrices(input=Decimal(2), output=Decimal(10))})
    proxy = Proxy(database, keys=(KEY,))
    proxy.addons = (proxy.addons[0], RecordInterceptions(proxy.writer, proxy.metrics, prices))
    proxy.writer.start()
    unknown = CHAT_USAGE.replace(b"gpt-4o-2024", b"no-such-model-xyz")
    with taddons.context(*proxy.addons):
        proxy.exchange(proxy.flow(authorization=f"Bearer {TOKEN}"), upstream(200, CHAT_USAGE))
        proxy.exchange(proxy.flow(authorization=f"Bearer {TOKEN}"), upstream(200, unknown))
    records = await proxy.records()
    assert sorted((r["model"], r["cost_micros"]) for r in records) == [
        ("gpt-4o-2024", 56), ("no-such-model-xyz", None),
    ]  # fmt: skip
    value = proxy.metrics.registry.get_sample_value
    labels = {"provider": "openai"}
    assert value("coder_aibridgeproxyd_cost_micros_total", labels) == 56
    assert value("coder_aibridgeproxyd_unpriced_token_usage_records_total", labels) == 1


# --- tool calls and thoughts (aibridgeproxyd.response_content) -------------------------------


def _submitted(proxy: Proxy) -> list[Any]:
    """The records the addon hands the writer (tool calls and thoughts are not stored by this
    branch's store: the record object is what carries them)."""
    records: list[Any] = []
    proxy.writer.submit = lambda record: records.append(record) or True  # type: ignore[method-assign,func-returns-value]
    return records


def _tool_answer(stream: bool) -> bytes:
    from tests.fakes import tool_content

    both = tool_content.FakeContent(tool_call=True, thinking=True)
    reply = tool_content.chat_completions({"stream": stream}, 1, both, {"prompt_tokens": 1})
    return b"".join(reply) if isinstance(reply, list) else json.dumps(reply).encode()


@pytest.mark.parametrize("chunks", [0, 7], ids=["buffered", "streamed"])
async def test_the_record_carries_the_answers_tool_calls_and_thoughts(
    database: Path, chunks: int
) -> None:
    from tests.fakes import tool_content

    proxy = Proxy(database, keys=(KEY,))
    records = _submitted(proxy)
    flow = proxy.flow()
    kind = "text/event-stream" if chunks else "application/json"
    with taddons.context(*proxy.addons):
        proxy.exchange(
            flow, upstream(200, _tool_answer(bool(chunks)), **{"content-type": kind}), chunks
        )
    (record,) = records
    assert [(c.tool_call_id, c.tool, c.input) for c in record.tool_calls] == [
        (tool_content.TOOL_CALL_ID, tool_content.TOOL_NAME, tool_content.TOOL_ARGUMENTS)
    ]
    assert record.thoughts == (tool_content.THOUGHT,)


@pytest.mark.parametrize("chunks", [0, 7], ids=["buffered", "streamed"])
async def test_switched_off_tool_calls_and_thoughts_are_not_recorded(
    database: Path, chunks: int
) -> None:
    from aibridgeproxyd.interception.recording import collection_switches
    from aibridgeproxyd.response_content import ContentSwitches

    proxy = Proxy(database, keys=(KEY,))
    switches = ContentSwitches(tool_calls=False, thoughts=False)
    proxy.addons[1].content, proxy.addons[1].collect = switches, collection_switches(switches)
    records = _submitted(proxy)
    flow = proxy.flow()
    kind = "text/event-stream" if chunks else "application/json"
    with taddons.context(*proxy.addons):
        proxy.exchange(
            flow, upstream(200, _tool_answer(bool(chunks)), **{"content-type": kind}), chunks
        )
    (record,) = records
    assert (record.tool_calls, record.thoughts) == ((), ())
    assert request_context(flow).recording.content_tap is None  # type: ignore[union-attr]


async def test_a_websocket_sessions_tool_calls_are_recorded_at_its_end(database: Path) -> None:
    proxy = Proxy(database, keys=(KEY,))
    records = _submitted(proxy)
    flow = proxy.flow("/v1/responses")
    item = {"id": "fc_1", "type": "function_call", "call_id": "call_ws", "name": "shell", "arguments": '{"cmd": "ls"}'}  # fmt: skip
    done = json.dumps({"type": "response.output_item.done", "output_index": 0, "item": item})
    with taddons.context(*proxy.addons):
        proxy.hook("requestheaders", flow)
        proxy.hook("request", flow)
        flow.response = upstream(101, b"")
        flow.websocket = websocket.WebSocketData()
        proxy.hook("responseheaders", flow)
        proxy.hook("response", flow)
        for content, from_client in ((done.encode(), True), (done.encode(), False)):
            flow.websocket.messages.append(websocket.WebSocketMessage(1, from_client, content))
            proxy.hook("websocket_message", flow)
        proxy.hook("websocket_end", flow)
    (record,) = records
    assert [(c.tool_call_id, c.tool, c.input) for c in record.tool_calls] == [
        ("call_ws", "shell", '{"cmd": "ls"}')
    ]
