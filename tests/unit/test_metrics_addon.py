"""The request-metrics addon on its own, driven with mitmproxy's test flows: every routed request
is counted once, its answer once, and the in-flight gauge returns to 0 however it ends."""

from __future__ import annotations

from aibridgeproxyd.addons.in_flight import InFlight
from aibridgeproxyd.addons.metrics import RequestMetrics
from mitmproxy import http
from mitmproxy.test import tflow

from aibridgeproxyd.adapters import ADAPTERS
from aibridgeproxyd.interception.state import METADATA_KEY, ConnectInfo, RequestContext
from aibridgeproxyd.metrics import Metrics
from tests.unit.test_adapters_common import routed

PREFIX = "coder_aibridgeproxyd_"


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(PREFIX + name, labels) or 0.0


def routed_flow() -> http.HTTPFlow:
    flow = tflow.tflow()
    flow.metadata[METADATA_KEY] = RequestContext(
        request_id="r",
        connect=ConnectInfo("api.openai.com", 443, intercept=True),
        provider=routed("openai"),
        adapter=ADAPTERS["openai"],
    )
    return flow


def test_a_request_and_its_answer_are_counted_once() -> None:
    metrics, flow = Metrics(), routed_flow()
    in_flight = InFlight()
    addon = RequestMetrics(metrics, in_flight)
    in_flight.requestheaders(flow)
    addon.requestheaders(flow)
    assert sample(metrics, "inflight_mitm_requests", provider="openai") == 1
    flow.response = http.Response.make(429)
    addon.response(flow)
    in_flight.response(flow)
    addon.error(flow)  # a late error after the answer changes nothing
    in_flight.error(flow)
    assert sample(metrics, "mitm_requests_total", provider="openai") == 1
    assert sample(metrics, "mitm_responses_total", code="429", provider="openai") == 1
    assert sample(metrics, "inflight_mitm_requests", provider="openai") == 0


def test_a_request_that_fails_before_an_answer_leaves_flight_with_no_answer_counted() -> None:
    metrics, flow = Metrics(), routed_flow()
    in_flight = InFlight()
    addon = RequestMetrics(metrics, in_flight)
    in_flight.requestheaders(flow)
    addon.requestheaders(flow)
    addon.error(flow)
    in_flight.error(flow)
    assert sample(metrics, "inflight_mitm_requests", provider="openai") == 0
    assert sample(metrics, "mitm_responses_total", code="200", provider="openai") == 0


def test_flows_the_proxy_does_not_route_are_not_counted() -> None:
    metrics, flow = Metrics(), tflow.tflow(resp=True)
    in_flight = InFlight()
    addon = RequestMetrics(metrics, in_flight)
    in_flight.requestheaders(flow)
    addon.requestheaders(flow)
    addon.response(flow)
    assert sample(metrics, "mitm_requests_total", provider="openai") == 0


def test_a_remembered_child_is_prometheus_clients_own_series() -> None:
    metrics = Metrics()
    child = metrics.child(metrics.tokens, "openai", "input")
    assert child is metrics.tokens.labels("openai", "input")
    assert metrics.child(metrics.tokens, "openai", "input") is child
    child.inc(3)
    assert metrics.tokens.labels("openai", "input")._value.get() == 3
