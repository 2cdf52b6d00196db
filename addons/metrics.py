"""Request metrics for MITM'd flows (section 9).

Every flow gets exactly one of ``response`` or ``error``, including client aborts mid-stream,
so the in-flight gauge is decremented in whichever comes first and returns to 0.
"""

from __future__ import annotations

from mitmproxy import http

from aibridgeproxyd.interception.state import request_context
from aibridgeproxyd.metrics import Metrics


class RequestMetrics:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        ctx = request_context(flow)
        if ctx is None:
            return
        self.metrics.mitm_requests.labels(ctx.provider.name).inc()
        self.metrics.inflight_mitm_requests.labels(ctx.provider.name).inc()

    def _finish(self, flow: http.HTTPFlow, *, count_response: bool = True) -> None:
        ctx = request_context(flow)
        if ctx is None or ctx.finished:
            return
        ctx.finished = True
        self.metrics.inflight_mitm_requests.labels(ctx.provider.name).dec()
        if count_response and flow.response is not None:
            self._count_response(flow)

    def _count_response(self, flow: http.HTTPFlow) -> None:
        ctx = request_context(flow)
        assert ctx is not None and flow.response is not None
        self.metrics.mitm_responses.labels(str(flow.response.status_code), ctx.provider.name).inc()

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.websocket is not None and request_context(flow) is not None:
            # A WebSocket session stays in flight until it closes.
            self._count_response(flow)
            return
        self._finish(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._finish(flow)

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        self._finish(flow, count_response=False)
