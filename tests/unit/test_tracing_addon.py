"""Span attributes (``aibridgeproxyd.tracing``) and the tracing addon on its own: mitmproxy's
test flows through the hooks, spans read back from the SDK's in-memory exporter."""

from __future__ import annotations

from aibridgeproxyd.addons.tracing import TraceRequests
from mitmproxy import http
from mitmproxy.test import tflow
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import StatusCode

from aibridgeproxyd.adapters import ADAPTERS
from aibridgeproxyd.credentials import CredentialMode
from aibridgeproxyd.interception.state import (
    METADATA_KEY,
    ConnectInfo,
    ConnectionTable,
    RequestContext,
)
from aibridgeproxyd.tracing import (
    connect_attributes,
    intercept_attributes,
    intercept_error,
    intercept_result_attributes,
    route_attributes,
    tracing_with,
    upstream_result_attributes,
)
from aibridgeproxyd.usage import ApiKind, Usage
from tests.unit.test_adapters_common import routed
from tests.unit.test_tracing import tracer_and_exporter

CALLER_TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER_PARENT = f"00-{CALLER_TRACE}-b7ad6b7169203331-01"


def make_ctx(**fields: object) -> RequestContext:
    info = ConnectInfo("api.openai.com", 443, intercept=True, identity="alice")
    ctx = RequestContext(
        request_id="req-1", connect=info, provider=routed("openai"), adapter=ADAPTERS["openai"]
    )
    for name, value in fields.items():
        group = ctx.routing if hasattr(ctx.routing, name) else ctx.recording
        setattr(group, name, value)
    return ctx


# --- attributes ------------------------------------------------------------------------------


def test_connect_attributes_name_the_target_and_what_classification_recorded() -> None:
    assert connect_attributes("example.com", 443, None) == {
        "server.address": "example.com",
        "server.port": 443,
    }
    info = ConnectInfo("api.openai.com", 443, provider_name="openai", identity="alice")
    assert connect_attributes("api.openai.com", 443, info) == {
        "server.address": "api.openai.com",
        "server.port": 443,
        "aibridgeproxyd.connect_id": info.connect_id,
        "aibridgeproxyd.provider": "openai",
        "aibridgeproxyd.initiator": "alice",
    }


def test_intercept_attributes_never_carry_the_query_string() -> None:
    attributes = intercept_attributes(make_ctx(), "POST", "/v1beta/models/m:generate?key=secret")
    assert attributes["url.path"] == "/v1beta/models/m:generate"
    assert attributes["http.request.method"] == "POST"
    assert attributes["aibridgeproxyd.initiator"] == "alice"
    assert attributes["aibridgeproxyd.provider_type"] == "openai"
    recorded = intercept_attributes(make_ctx(method="GET", path="/v1/models"), "POST", "/x?y")
    assert (recorded["http.request.method"], recorded["url.path"]) == ("GET", "/v1/models")


def test_route_attributes_carry_the_credential_mode_once_decided() -> None:
    assert route_attributes(make_ctx(), "up.example") == {
        "aibridgeproxyd.provider": "openai",
        "server.address": "up.example",
    }
    byok = route_attributes(make_ctx(credential_mode=CredentialMode.BYOK), "up.example")
    assert byok["aibridgeproxyd.credential_mode"] == "byok"


def test_result_attributes_carry_status_timing_model_and_tokens() -> None:
    ctx = make_ctx(ttfb=0.0123456, tried_keys={0, 1}, usage=Usage(10, 20, 5, None, ""))
    ctx.recording.request_model = "gpt-4o"
    assert upstream_result_attributes(ctx, 200) == {
        "http.response.status_code": 200,
        "aibridgeproxyd.ttfb_ms": 12.346,
        "aibridgeproxyd.key_attempts": 2,
    }
    assert intercept_result_attributes(ctx, 200, True) == {
        "http.response.status_code": 200,
        "aibridgeproxyd.streamed": True,
        "aibridgeproxyd.usage.input_tokens": 10,
        "aibridgeproxyd.usage.output_tokens": 20,
        "aibridgeproxyd.usage.cache_read_input_tokens": 5,
    }
    assert intercept_result_attributes(make_ctx(), None, False) == {
        "aibridgeproxyd.streamed": False
    }
    assert upstream_result_attributes(make_ctx(), None) == {"aibridgeproxyd.key_attempts": 0}


def test_result_attributes_carry_reasoning_tokens_when_reported() -> None:
    usage = Usage(output_tokens=300, reasoning_output_tokens=256)
    attributes = intercept_result_attributes(make_ctx(usage=usage), 200, False)
    assert attributes["aibridgeproxyd.usage.reasoning_output_tokens"] == 256
    unreported = intercept_result_attributes(make_ctx(usage=Usage(output_tokens=5)), 200, False)
    assert "aibridgeproxyd.usage.reasoning_output_tokens" not in unreported


def test_only_errors_and_5xx_fail_the_intercept_span() -> None:
    assert intercept_error("connection reset", 200) == "connection reset"
    assert intercept_error(None, 502) == "http_502"
    assert intercept_error(None, 502, "keys_exhausted") == "keys_exhausted"
    assert intercept_error(None, 403, "no_key_configured") is None
    assert intercept_error(None, 429) is None
    assert intercept_error(None, None) is None


# --- the addon -------------------------------------------------------------------------------


def spans_by_name(exporter) -> dict[str, ReadableSpan]:  # type: ignore[no-untyped-def]
    return {span.name: span for span in exporter.get_finished_spans()}


def test_a_connect_span_ends_with_the_connect_type() -> None:
    tracing, exporter = tracer_and_exporter()
    connections = ConnectionTable()
    flow = tflow.tflow()
    flow.request.method, flow.request.host = "CONNECT", "api.openai.com"
    connections.add(flow.client_conn, ConnectInfo("api.openai.com", 443, intercept=True))
    addon = TraceRequests(tracing, connections)
    addon.http_connect(flow)
    addon.http_connected(flow)
    (span,) = exporter.get_finished_spans()
    assert span.name == "Connect"
    assert span.attributes is not None
    assert span.attributes["aibridgeproxyd.connect.type"] == "mitm"
    assert span.attributes["server.address"] == "api.openai.com"


def test_a_routed_request_gets_its_spans_and_passes_our_traceparent_upstream() -> None:
    tracing, exporter = tracer_and_exporter()
    addon = TraceRequests(tracing, ConnectionTable())
    flow = tflow.tflow()
    flow.request.headers["traceparent"] = CALLER_PARENT
    flow.request.headers["tracestate"] = "vendor=1"
    flow.metadata[METADATA_KEY] = ctx = make_ctx(
        credential_mode="central", tried_keys={0}, api_kind=ApiKind.OPENAI_CHAT_COMPLETIONS
    )
    addon.requestheaders(flow)
    addon.request(flow)
    flow.response = http.Response.make(200, b"{}")
    ctx.recording.usage = Usage(1, 2, None, None, "gpt-4o-2024")
    addon.response(flow)
    spans = spans_by_name(exporter)
    assert set(spans) == {
        "Intercept",
        "Intercept.Route",
        "Intercept.Upstream",
        "Intercept.RecordInterception",
    }
    intercept, upstream = spans["Intercept"], spans["Intercept.Upstream"]
    assert format(intercept.context.trace_id, "032x") == CALLER_TRACE
    assert intercept.attributes is not None
    assert intercept.attributes["gen_ai.response.model"] == "gpt-4o-2024"
    assert intercept.status.status_code is StatusCode.UNSET
    assert spans["Intercept.Route"].attributes == {
        "aibridgeproxyd.provider": "openai",
        "aibridgeproxyd.credential_mode": "central",
        "server.address": flow.request.host,
    }
    # The upstream sees our span as its parent, and the caller's tracestate is not forwarded.
    assert flow.request.headers["traceparent"].split("-")[2] == format(
        upstream.context.span_id, "016x"
    )
    assert "tracestate" not in flow.request.headers


def test_a_request_the_proxy_refused_has_no_upstream_span() -> None:
    tracing, exporter = tracer_and_exporter()
    addon = TraceRequests(tracing, ConnectionTable())
    flow = tflow.tflow()
    flow.metadata[METADATA_KEY] = make_ctx()
    addon.requestheaders(flow)
    flow.response = http.Response.make(403, b"{}")
    addon.request(flow)
    addon.response(flow)
    assert "Intercept.Upstream" not in spans_by_name(exporter)
    assert "traceparent" not in flow.request.headers


def test_a_failed_exchange_marks_both_spans_as_errors() -> None:
    tracing, exporter = tracer_and_exporter()
    addon = TraceRequests(tracing, ConnectionTable())
    flow = tflow.tflow(err=True)
    flow.metadata[METADATA_KEY] = make_ctx()
    addon.requestheaders(flow)
    addon.request(flow)
    addon.error(flow)
    spans = spans_by_name(exporter)
    for name in ("Intercept", "Intercept.Upstream"):
        assert spans[name].status.status_code is StatusCode.ERROR
        attributes = spans[name].attributes
        assert attributes is not None and attributes["error.type"] == "error"


def test_tracing_none_opens_no_span() -> None:
    tracing = tracing_with(None)
    addon = TraceRequests(tracing, ConnectionTable())
    flow = tflow.tflow()
    flow.metadata[METADATA_KEY] = make_ctx()
    addon.http_connect(flow)
    addon.requestheaders(flow)
    addon.request(flow)
    assert "traceparent" not in flow.request.headers
