"""Spans for CONNECTs and MITM'd requests (section 10):

    Connect
    Intercept  (child of the caller's W3C traceparent, if any)
    ├── Intercept.Route
    ├── Intercept.Upstream
    └── Intercept.RecordInterception

Attributes carry ids, provider, model, status and token counts; never keys, tokens, headers,
query strings or bodies. Runs after the routing and recording addons, so it reads what they
decided from the request context.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from mitmproxy import http
from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from aibridgeproxyd.interception.state import ConnectionTable, RequestContext, request_context
from aibridgeproxyd.tracing import Tracing

TRACE_KEY = "aibridgeproxyd.trace"
CONNECT_SPAN_KEY = "aibridgeproxyd.connect_span"
_PROPAGATOR = TraceContextTextMapPropagator()


def _ns(timestamp: float | None) -> int:
    return int((timestamp or time.time()) * 1e9)


@dataclass
class _RequestSpans:
    intercept: Span
    route: Span | None = None
    upstream: Span | None = None


class TraceRequests:
    def __init__(self, tracing: Tracing, connections: ConnectionTable) -> None:
        self.tracing = tracing
        self.tracer = tracing.tracer
        self.connections = connections

    # --- CONNECT ---

    def http_connect(self, flow: http.HTTPFlow) -> None:
        if not self.tracing.enabled:
            return
        info = self.connections.get(flow.client_conn)
        span = self.tracer.start_span("Connect", start_time=_ns(flow.request.timestamp_start))
        span.set_attribute("server.address", flow.request.host)
        span.set_attribute("server.port", flow.request.port)
        if info is not None:
            span.set_attribute("aibridgeproxyd.connect_id", info.connect_id)
            if info.provider_name:
                span.set_attribute("aibridgeproxyd.provider", info.provider_name)
            if info.identity:
                span.set_attribute("aibridgeproxyd.initiator", info.identity)
        flow.metadata[CONNECT_SPAN_KEY] = span

    def _end_connect(self, flow: http.HTTPFlow, kind: str) -> None:
        span: Span | None = flow.metadata.pop(CONNECT_SPAN_KEY, None)
        if span is None:
            return
        span.set_attribute("aibridgeproxyd.connect.type", kind)
        if flow.response is not None:
            span.set_attribute("http.response.status_code", flow.response.status_code)
        span.end()

    def http_connected(self, flow: http.HTTPFlow) -> None:
        if self.tracing.enabled:
            info = self.connections.get(flow.client_conn)
            self._end_connect(flow, "mitm" if info is not None and info.intercept else "tunneled")

    def http_connect_error(self, flow: http.HTTPFlow) -> None:
        if self.tracing.enabled:
            self._end_connect(flow, "refused")

    # --- MITM'd requests ---

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        ctx = request_context(flow)
        if not self.tracing.enabled or ctx is None:
            return
        parent = _PROPAGATOR.extract({"traceparent": flow.request.headers.get("traceparent", "")})
        start = _ns(ctx.started)
        intercept = self.tracer.start_span("Intercept", context=parent, start_time=start)
        for name, value in (
            ("aibridgeproxyd.request_id", ctx.request_id),
            ("aibridgeproxyd.connect_id", ctx.connect.connect_id),
            ("aibridgeproxyd.provider", ctx.provider.name),
            ("aibridgeproxyd.provider_type", ctx.provider.type),
            ("aibridgeproxyd.initiator", ctx.connect.identity or ""),
            ("aibridgeproxyd.client", ctx.recording.client),
            ("http.request.method", ctx.recording.method or flow.request.method),
            ("url.path", ctx.recording.path or flow.request.path.split("?", 1)[0]),
        ):
            intercept.set_attribute(name, value)
        spans = _RequestSpans(intercept)
        spans.route = self.tracer.start_span(
            "Intercept.Route", context=trace.set_span_in_context(intercept), start_time=start
        )
        flow.metadata[TRACE_KEY] = spans

    def request(self, flow: http.HTTPFlow) -> None:
        spans: _RequestSpans | None = flow.metadata.get(TRACE_KEY)
        ctx = request_context(flow)
        if spans is None or ctx is None or spans.route is None:
            return
        spans.route.set_attribute("aibridgeproxyd.provider", ctx.provider.name)
        if ctx.routing.credential_mode:
            spans.route.set_attribute("aibridgeproxyd.credential_mode", ctx.routing.credential_mode)
        spans.route.set_attribute("server.address", flow.request.host)
        spans.route.end()
        if flow.response is not None:
            return  # refused by the proxy: no upstream exchange
        upstream = self.tracer.start_span(
            "Intercept.Upstream", context=trace.set_span_in_context(spans.intercept)
        )
        upstream.set_attribute("server.address", flow.request.host)
        upstream.set_attribute("server.port", flow.request.port)
        spans.upstream = upstream
        # The upstream joins the trace as a child of our span, not of the caller's.
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(upstream))
        flow.request.headers["traceparent"] = carrier["traceparent"]
        flow.request.headers.pop("tracestate", None)

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.websocket is None:
            self._finish(flow, None)

    def error(self, flow: http.HTTPFlow) -> None:
        self._finish(flow, flow.error.msg if flow.error else "error")

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        self._finish(flow, None)

    def _finish(self, flow: http.HTTPFlow, error: str | None) -> None:
        spans: _RequestSpans | None = flow.metadata.pop(TRACE_KEY, None)
        ctx = request_context(flow)
        if spans is None or ctx is None:
            return
        status = flow.response.status_code if flow.response is not None else None
        if spans.upstream is not None:
            if status is not None:
                spans.upstream.set_attribute("http.response.status_code", status)
            if ctx.recording.ttfb is not None:
                spans.upstream.set_attribute(
                    "aibridgeproxyd.ttfb_ms", round(ctx.recording.ttfb * 1000, 3)
                )
            spans.upstream.set_attribute("aibridgeproxyd.key_attempts", len(ctx.routing.tried_keys))
            _fail(spans.upstream, error)
            spans.upstream.end()
        self._record_span(spans.intercept, ctx)
        intercept = spans.intercept
        if status is not None:
            intercept.set_attribute("http.response.status_code", status)
        intercept.set_attribute(
            "aibridgeproxyd.streamed", bool(flow.response is not None and flow.response.stream)
        )
        usage = ctx.recording.usage
        if usage is not None:
            if usage.model or ctx.recording.request_model:
                intercept.set_attribute(
                    "gen_ai.response.model", usage.model or ctx.recording.request_model or ""
                )
            for name, count in (
                ("input_tokens", usage.input_tokens),
                ("output_tokens", usage.output_tokens),
                ("cache_read_input_tokens", usage.cache_read_input_tokens),
                ("cache_creation_input_tokens", usage.cache_creation_input_tokens),
            ):
                if count is not None:
                    intercept.set_attribute(f"aibridgeproxyd.usage.{name}", count)
        _fail(
            intercept,
            error
            if error
            else (f"http_{status}" if status is not None and status >= 500 else None),
        )
        intercept.end()

    def _record_span(self, parent: Span, ctx: RequestContext) -> None:
        span = self.tracer.start_span(
            "Intercept.RecordInterception",
            context=trace.set_span_in_context(parent),
            start_time=_ns(ctx.recording.submitted_at),
        )
        span.set_attribute("aibridgeproxyd.request_id", ctx.request_id)
        span.set_attribute("aibridgeproxyd.record.dropped", ctx.recording.dropped)
        span.end(end_time=_ns(ctx.recording.submitted_at) + 1000)


def _fail(span: Span, error: str | None) -> None:
    if error:
        span.set_attribute("error.type", error[:200])
        span.set_status(Status(StatusCode.ERROR, error[:200]))
