"""The OpenTelemetry GenAI semantic-convention attributes of the ``Intercept`` span, and
``trace_logs`` (log lines as span events): the attribute functions alone, then the tracing addon
with mitmproxy's test flows and the SDK's in-memory exporter.

Attribute names checked against open-telemetry/semantic-conventions-genai
(docs/gen-ai/client-inference.md and docs/registry/attributes/gen-ai.md)."""

from __future__ import annotations

import logging
import time

import pytest
from aibridgeproxyd.addons.tracing import TraceRequests
from mitmproxy import http
from mitmproxy.test import tflow
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import StatusCode

from aibridgeproxyd.adapters import ADAPTERS
from aibridgeproxyd.interception.state import (
    METADATA_KEY,
    ConnectInfo,
    ConnectionTable,
    RequestContext,
)
from aibridgeproxyd.tracing import (
    GENAI_OPERATIONS,
    MAX_LOG_EVENTS,
    SpanLogEvents,
    genai_result_attributes,
    genai_usage_attributes,
    intercept_attributes,
    tracing_with,
)
from aibridgeproxyd.usage import ApiKind, Usage
from tests.unit.test_adapters_common import routed
from tests.unit.test_tracing import tracer_and_exporter

log = logging.getLogger("aibridgeproxyd.test")

WELL_KNOWN_PROVIDERS = {
    "openai": "openai",
    "anthropic": "anthropic",
    "bedrock": "aws.bedrock",
    "azure": "azure.ai.openai",
    "google": "gcp.gemini",
}


def make_ctx(provider_type: str = "openai", api_kind: ApiKind | None = None) -> RequestContext:
    info = ConnectInfo("api.openai.com", 443, intercept=True, identity="alice")
    ctx = RequestContext(
        request_id="req-1",
        connect=info,
        provider=routed("anthropic" if provider_type == "anthropic" else "openai"),
        adapter=ADAPTERS[provider_type],
    )
    ctx.recording.api_kind = api_kind
    return ctx


# --- attributes ------------------------------------------------------------------------------


def test_input_tokens_include_cached_input_as_the_convention_counts_them() -> None:
    usage = Usage(
        input_tokens=15,
        output_tokens=12,
        cache_read_input_tokens=64,
        cache_creation_input_tokens=10017,
        reasoning_output_tokens=8,
    )
    assert genai_usage_attributes(usage) == {
        "gen_ai.usage.input_tokens": 15 + 64 + 10017,
        "gen_ai.usage.output_tokens": 12,
        "gen_ai.usage.cache_read.input_tokens": 64,
        "gen_ai.usage.cache_write.input_tokens": 10017,
        "gen_ai.usage.cache_creation.input_tokens": 10017,
        "gen_ai.usage.reasoning.output_tokens": 8,
    }


def test_unreported_counts_are_absent_and_a_reported_zero_is_kept() -> None:
    assert genai_usage_attributes(Usage()) == {}
    assert genai_usage_attributes(Usage(output_tokens=0)) == {"gen_ai.usage.output_tokens": 0}
    only_fresh = genai_usage_attributes(Usage(input_tokens=7))
    assert only_fresh == {"gen_ai.usage.input_tokens": 7}


def test_every_api_kind_has_an_operation_name() -> None:
    assert set(GENAI_OPERATIONS) == set(ApiKind)
    assert GENAI_OPERATIONS[ApiKind.OPENAI_CHAT_COMPLETIONS] == "chat"
    assert GENAI_OPERATIONS[ApiKind.OPENAI_COMPLETIONS] == "text_completion"
    assert GENAI_OPERATIONS[ApiKind.OPENAI_EMBEDDINGS] == "embeddings"
    assert GENAI_OPERATIONS[ApiKind.ANTHROPIC_MESSAGES] == "chat"
    assert GENAI_OPERATIONS[ApiKind.GEMINI_GENERATE_CONTENT] == "generate_content"


@pytest.mark.parametrize("provider_type", sorted(ADAPTERS))
def test_the_provider_name_comes_from_the_adapter(provider_type: str) -> None:
    attributes = intercept_attributes(make_ctx(provider_type), "POST", "/v1/x")
    name = attributes["gen_ai.provider.name"]
    assert name == ADAPTERS[provider_type].genai_provider_name
    assert name == WELL_KNOWN_PROVIDERS.get(provider_type, name)
    assert str(name) == str(name).lower().strip() and " " not in str(name)


def test_a_request_of_no_genai_api_gets_no_operation_and_no_result_attributes() -> None:
    ctx = make_ctx()  # GET /v1/models, say: api_kind None
    assert "gen_ai.operation.name" not in intercept_attributes(ctx, "GET", "/v1/models")
    assert genai_result_attributes(ctx, False, None) == {}


def test_result_attributes_name_both_models_streaming_and_time_to_first_chunk() -> None:
    ctx = make_ctx(api_kind=ApiKind.OPENAI_CHAT_COMPLETIONS)
    ctx.recording.request_model = "gpt-4o"
    ctx.recording.sent_upstream = 100.0
    ctx.recording.usage = Usage(3, 5, None, None, "gpt-4o-2024-08-06")
    assert genai_result_attributes(ctx, True, 100.25) == {
        "gen_ai.request.stream": True,
        "gen_ai.request.model": "gpt-4o",
        "gen_ai.response.model": "gpt-4o-2024-08-06",
        "gen_ai.response.time_to_first_chunk": 0.25,
        "gen_ai.usage.input_tokens": 3,
        "gen_ai.usage.output_tokens": 5,
    }
    buffered = genai_result_attributes(ctx, False, 100.25)
    assert buffered["gen_ai.request.stream"] is False
    assert "gen_ai.response.time_to_first_chunk" not in buffered
    ctx.proxy_answer_code = "keys_exhausted"  # the proxy's answer: no upstream timing
    assert "gen_ai.response.time_to_first_chunk" not in genai_result_attributes(ctx, True, 101.0)


# --- the addon -------------------------------------------------------------------------------


def intercept_span(exporter) -> ReadableSpan:  # type: ignore[no-untyped-def]
    (span,) = [s for s in exporter.get_finished_spans() if s.name == "Intercept"]
    return span


def run(addon: TraceRequests, flow: http.HTTPFlow, body: bytes, stream: bool) -> None:
    """The hooks of one exchange; a streamed body passes through the stream function."""
    addon.requestheaders(flow)
    flow.request.host, flow.request.port = "upstream.example", 8443  # the adapter's rewrite
    addon.request(flow)
    flow.response = http.Response.make(200, b"" if stream else body)
    flow.response.stream = stream
    addon.responseheaders(flow)
    if stream:
        feed = flow.response.stream
        assert callable(feed)
        time.sleep(0.01)  # the first chunk arrives after the request left
        for piece in (body[:5], body[5:], b""):
            feed(piece)
    addon.response(flow)


@pytest.mark.parametrize("streamed", [False, True])
def test_the_intercept_span_carries_the_genai_attributes(streamed: bool) -> None:
    tracing, exporter = tracer_and_exporter()
    addon = TraceRequests(tracing, ConnectionTable())
    flow = tflow.tflow()
    flow.metadata[METADATA_KEY] = ctx = make_ctx("anthropic", api_kind=ApiKind.ANTHROPIC_MESSAGES)
    ctx.recording.request_model = "claude-sonnet-4-5"
    ctx.recording.sent_upstream = time.time()
    ctx.recording.usage = Usage(10, 20, 1000, 500, "claude-sonnet-4-5-20250929")
    run(addon, flow, b"data: {}\n\ndata: {}\n\n", streamed)
    attributes = dict(intercept_span(exporter).attributes or {})
    expected = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "anthropic",
        "gen_ai.request.model": "claude-sonnet-4-5",
        "gen_ai.response.model": "claude-sonnet-4-5-20250929",
        "gen_ai.request.stream": streamed,
        "gen_ai.usage.input_tokens": 1510,
        "gen_ai.usage.output_tokens": 20,
        "gen_ai.usage.cache_read.input_tokens": 1000,
        "gen_ai.usage.cache_write.input_tokens": 500,
        "gen_ai.usage.cache_creation.input_tokens": 500,
        "server.address": "upstream.example",
        "server.port": 8443,
        # The record's own counts stay as the record has them (fresh input only).
        "aibridgeproxyd.usage.input_tokens": 10,
    }
    assert attributes | expected == attributes
    assert "gen_ai.usage.reasoning.output_tokens" not in attributes
    assert "error.type" not in attributes
    first_chunk = attributes.get("gen_ai.response.time_to_first_chunk")
    if streamed:
        assert isinstance(first_chunk, float) and 0.005 < first_chunk < 5
    else:
        assert first_chunk is None


def test_a_failed_exchange_carries_error_type_and_no_usage() -> None:
    tracing, exporter = tracer_and_exporter()
    addon = TraceRequests(tracing, ConnectionTable())
    flow = tflow.tflow(err=True)
    flow.metadata[METADATA_KEY] = make_ctx(api_kind=ApiKind.OPENAI_CHAT_COMPLETIONS)
    addon.requestheaders(flow)
    addon.request(flow)
    addon.error(flow)
    span = intercept_span(exporter)
    attributes = dict(span.attributes or {})
    assert span.status.status_code is StatusCode.ERROR
    assert attributes["error.type"] == "error"
    assert attributes["gen_ai.operation.name"] == "chat"
    assert not [name for name in attributes if name.startswith("gen_ai.usage.")]


# --- trace_logs ------------------------------------------------------------------------------


@pytest.fixture
def traced_logs():  # type: ignore[no-untyped-def]
    tracing, exporter = tracer_and_exporter()
    handler = SpanLogEvents()
    tracing.log_events = handler
    root = logging.getLogger()
    root.addHandler(handler)
    level = root.level
    root.setLevel(logging.DEBUG)
    yield tracing, exporter
    root.removeHandler(handler)
    root.setLevel(level)


def test_log_lines_about_a_request_become_events_of_its_span(traced_logs) -> None:  # type: ignore[no-untyped-def]
    tracing, exporter = traced_logs
    addon = TraceRequests(tracing, ConnectionTable())
    flow = tflow.tflow()
    flow.metadata[METADATA_KEY] = ctx = make_ctx(api_kind=ApiKind.OPENAI_CHAT_COMPLETIONS)
    addon.requestheaders(flow)
    log.warning("failing over to key %d", 2, extra={**ctx.log_ids(), "status": 429, "none": None})
    log.info("about another request", extra={"request_id": "req-other"})
    log.info("about no request")
    addon.request(flow)
    flow.response = http.Response.make(200, b"{}")
    addon.response(flow)
    log.info("after the span ended", extra=ctx.log_ids())
    (event,) = intercept_span(exporter).events
    assert event.name == "failing over to key 2"
    assert dict(event.attributes or {}) == {
        "level": "warning",
        "logger": "aibridgeproxyd.test",
        "connect_id": ctx.connect.connect_id,
        "request_id": "req-1",
        "provider": ctx.provider.name,
        **({"initiator": ctx.connect.identity} if ctx.connect.identity else {}),
        "status": 429,
    }


def test_a_span_takes_a_bounded_number_of_log_events(traced_logs) -> None:  # type: ignore[no-untyped-def]
    tracing, exporter = traced_logs
    addon = TraceRequests(tracing, ConnectionTable())
    flow = tflow.tflow()
    flow.metadata[METADATA_KEY] = ctx = make_ctx()
    addon.requestheaders(flow)
    for index in range(MAX_LOG_EVENTS + 5):
        log.info("line %d %s", index, "x" * 5000, extra={"request_id": ctx.request_id})
    addon.request(flow)
    flow.response = http.Response.make(200, b"{}")
    addon.response(flow)
    span = intercept_span(exporter)
    assert len(span.events) == MAX_LOG_EVENTS
    assert all(len(event.name) <= 1024 for event in span.events)
    assert (span.attributes or {})["aibridgeproxyd.log_events.dropped"] == 5


def test_trace_logs_installs_its_handler_only_while_spans_are_exported() -> None:
    root = logging.getLogger()
    assert tracing_with(None, trace_logs=True).log_events is None
    _, exporter = tracer_and_exporter()
    tracing = tracing_with(exporter, trace_logs=True)
    assert tracing.log_events in root.handlers
    tracing.shutdown()
    assert tracing.log_events not in root.handlers
    assert tracing_with(exporter).log_events is None
