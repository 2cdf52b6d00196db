"""Request metrics for MITM'd flows (README.md#metrics).

The in-flight gauge follows ``InFlight``'s rule (``addons.in_flight``): a routed request counts
from its request headers until its response or error, a WebSocket session until it closes.
mitmproxy gives a flow one ``response`` or ``error`` hook, so each response is counted once: in
``response``, or in ``error`` when the headers had arrived before the failure. A flag on the flow
makes the count idempotent anyway, should both ever run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mitmproxy import http

from aibridgeproxyd.interception.state import request_context
from aibridgeproxyd.metrics import Metrics

if TYPE_CHECKING:  # the chain hands it over; addons never import each other at run time
    from .in_flight import InFlight

_COUNTED = "aibridgeproxyd.response_counted"


class RequestMetrics:
    """Counts MITM'd requests and the in-flight gauge (``requestheaders``), and each response
    once, by status (``response``, or ``error`` after the headers arrived)."""

    def __init__(self, metrics: Metrics, in_flight: InFlight) -> None:
        self.metrics = metrics
        self.in_flight = in_flight

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        ctx = request_context(flow)
        if ctx is None:
            return
        metrics, provider = self.metrics, ctx.provider.name
        metrics.child(metrics.mitm_requests, provider).inc()
        gauge = metrics.child(metrics.inflight_mitm_requests, provider)
        gauge.inc()
        self.in_flight.on_landing(flow, gauge.dec)

    def _count_response(self, flow: http.HTTPFlow) -> None:
        ctx = request_context(flow)
        # Once per flow even if an error hook were to follow the response.
        if ctx is not None and flow.response is not None and not flow.metadata.get(_COUNTED):
            flow.metadata[_COUNTED] = True
            metrics = self.metrics
            status = str(flow.response.status_code)
            metrics.child(metrics.mitm_responses, status, ctx.provider.name).inc()

    def response(self, flow: http.HTTPFlow) -> None:
        self._count_response(flow)  # a WebSocket upgrade too: its 101, at once

    def error(self, flow: http.HTTPFlow) -> None:
        self._count_response(flow)
