"""Spans for CONNECTs and MITM'd requests (docs/monitoring.md#spans):

    Connect
    Intercept  (child of the caller's W3C traceparent, if any)
    ├── Intercept.Route
    ├── Intercept.Upstream
    └── Intercept.RecordInterception

The attributes are decided in ``aibridgeproxyd.tracing``. Runs after the routing and recording
addons, so it reads what they decided from the request context.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from mitmproxy import http
from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from aibridgeproxyd.interception.state import ConnectionTable, RequestContext, request_context
from aibridgeproxyd.tracing import (
    MAX_ERROR_CHARS,
    Tracing,
    connect_attributes,
    genai_result_attributes,
    intercept_attributes,
    intercept_error,
    intercept_result_attributes,
    route_attributes,
    upstream_result_attributes,
)

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
    first_chunk: float | None = None  # epoch seconds the first chunk of a streamed 2xx arrived


class TraceRequests:
    """Opens and ends the Connect span (``http_connect`` ... ``http_connected``) and the Intercept
    spans of each MITM'd request (``requestheaders`` ... ``response``/``error``)."""

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
        span.set_attributes(connect_attributes(flow.request.host, flow.request.port, info))
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
        intercept.set_attributes(intercept_attributes(ctx, flow.request.method, flow.request.path))
        route = self.tracer.start_span(
            "Intercept.Route", context=trace.set_span_in_context(intercept), start_time=start
        )
        flow.metadata[TRACE_KEY] = _RequestSpans(intercept, route)
        if self.tracing.log_events is not None:
            self.tracing.log_events.attach(ctx.request_id, intercept)

    def request(self, flow: http.HTTPFlow) -> None:
        spans: _RequestSpans | None = flow.metadata.get(TRACE_KEY)
        ctx = request_context(flow)
        if spans is None or ctx is None or spans.route is None:
            return
        spans.route.set_attributes(route_attributes(ctx, flow.request.host))
        spans.route.end()
        if flow.response is not None:
            return  # refused by the proxy: no upstream exchange
        self._start_upstream(spans, flow)

    def _start_upstream(self, spans: _RequestSpans, flow: http.HTTPFlow) -> None:
        spans.upstream = self.tracer.start_span(
            "Intercept.Upstream", context=trace.set_span_in_context(spans.intercept)
        )
        spans.upstream.set_attributes(
            {"server.address": flow.request.host, "server.port": flow.request.port}
        )
        _propagate(flow.request.headers, spans.upstream)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """A streamed 2xx answer of a GenAI API: note when its first chunk passes
        (``gen_ai.response.time_to_first_chunk``)."""
        spans: _RequestSpans | None = flow.metadata.get(TRACE_KEY)
        ctx = request_context(flow)
        response = flow.response
        if spans is None or ctx is None or response is None or not response.stream:
            return
        if ctx.recording.api_kind is not None and 200 <= response.status_code < 300:
            response.stream = _first_chunk_noted(response.stream, spans)

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
            spans.upstream.set_attributes(upstream_result_attributes(ctx, status))
            _fail(spans.upstream, error)
            spans.upstream.end()
        self._record_span(spans.intercept, ctx)
        self._end_intercept(flow, ctx, spans, status, error)

    def _end_intercept(
        self,
        flow: http.HTTPFlow,
        ctx: RequestContext,
        spans: _RequestSpans,
        status: int | None,
        error: str | None,
    ) -> None:
        streamed = bool(flow.response is not None and flow.response.stream)
        intercept = spans.intercept
        intercept.set_attributes(intercept_result_attributes(ctx, status, streamed))
        intercept.set_attributes(genai_result_attributes(ctx, streamed, spans.first_chunk))
        # The GenAI server behind the proxy, as the convention asks of an intermediary.
        intercept.set_attributes(
            {"server.address": flow.request.host, "server.port": flow.request.port}
        )
        _fail(intercept, intercept_error(error, status, ctx.proxy_answer_code))
        if self.tracing.log_events is not None:
            self.tracing.log_events.detach(ctx.request_id)
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


def _first_chunk_noted(
    stream: bool | Callable[[bytes], bytes | Iterable[bytes]], spans: _RequestSpans
) -> Callable[[bytes], bytes | Iterable[bytes]]:
    """``stream`` (True, or the chunk transform before us) wrapped so that the arrival of the
    first non-empty chunk is noted in ``spans``; each chunk passes on unchanged."""
    transform = stream if callable(stream) else None

    def noted(chunk: bytes) -> bytes | Iterable[bytes]:
        if spans.first_chunk is None and chunk:
            spans.first_chunk = time.time()
        return transform(chunk) if transform is not None else chunk

    return noted


def _fail(span: Span, error: str | None) -> None:
    if error:
        span.set_attribute("error.type", error[:MAX_ERROR_CHARS])
        span.set_status(Status(StatusCode.ERROR, error[:MAX_ERROR_CHARS]))


def _propagate(headers: http.Headers, upstream: Span) -> None:
    """The upstream joins the trace as a child of our span, not of the caller's."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(upstream))
    headers["traceparent"] = carrier["traceparent"]
    headers.pop("tracestate", None)
