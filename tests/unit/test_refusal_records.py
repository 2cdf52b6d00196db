"""The proxy's own refusals are recorded as refusals (``error`` = the code, ``ttfb_ms`` null),
never logged as "upstream answered ..." and never measured in the upstream histograms; upstream
answers still are. Drives the route and recording addons with mitmproxy's test flows."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from aibridgeproxyd.addons.interceptions import RecordInterceptions
from aibridgeproxyd.addons.route import RouteRequests
from mitmproxy import http
from mitmproxy.test import taddons, tflow

from aibridgeproxyd.interception.recording import PROXY_REFUSAL
from aibridgeproxyd.interception.state import ConnectInfo, ConnectionTable, mark_proxy_answer
from aibridgeproxyd.interception.writer import InterceptionWriter
from aibridgeproxyd.metrics import Metrics
from aibridgeproxyd.model import InterceptionRecord, ProviderRecord
from aibridgeproxyd.providers import evaluate_providers
from aibridgeproxyd.reload import SnapshotHolder
from aibridgeproxyd.snapshot import build_snapshot
from tests.metric_samples import registry_samples, sample_value

CHAT = b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}'


class CapturingWriter(InterceptionWriter):
    """The writer's queue, seen from the test: what the addon submitted, in order."""

    def __init__(self, metrics: Metrics) -> None:
        super().__init__(Path("/nonexistent/never-written.db"), metrics, retention=60.0)
        self.records: list[InterceptionRecord] = []

    def submit(self, record: InterceptionRecord) -> bool:
        self.records.append(record)
        return True


class Proxy:
    """RouteRequests then RecordInterceptions, as in the daemon's chain, for one provider."""

    def __init__(self, **provider: object) -> None:
        self.metrics = Metrics()
        self.writer = CapturingWriter(self.metrics)
        self.connections = ConnectionTable()
        holder = SnapshotHolder()
        record = ProviderRecord(name="openai", type="openai", **provider)  # type: ignore[arg-type]
        holder.current = build_snapshot(evaluate_providers([record]), [])
        self.route = RouteRequests(holder, self.connections, "aibridgeproxyd")
        self.recorder = RecordInterceptions(self.writer, self.metrics)

    def flow(self, authorization: str | None = None) -> http.HTTPFlow:
        flow = tflow.tflow()
        flow.request.method, flow.request.host, flow.request.port = "POST", "api.openai.com", 443
        flow.request.path = "/v1/chat/completions"
        flow.request.content = CHAT
        if authorization is not None:
            flow.request.headers["authorization"] = authorization
        flow.response = None
        info = ConnectInfo("api.openai.com", 443, intercept=True, identity="alice")
        info.proxy_token = "proxy-token"
        self.connections.add(flow.client_conn, info)
        return flow

    def run(self, flow: http.HTTPFlow, upstream: http.Response | None = None) -> None:
        """The hooks mitmproxy fires for one request; `upstream` answers if nobody else did."""
        for addon in (self.route, self.recorder):
            addon.requestheaders(flow)
        for addon in (self.route, self.recorder):
            addon.request(flow)
        if flow.response is None:
            assert upstream is not None
            flow.response = upstream
        for addon in (self.route, self.recorder):
            addon.responseheaders(flow)
        if upstream is not None and flow.response is upstream:
            upstream.timestamp_end = upstream.timestamp_start  # the body arrived
        for addon in (self.route, self.recorder):
            addon.response(flow)

    def histogram_count(self, name: str) -> float:
        value = sample_value(
            registry_samples(self.metrics.registry),
            f"coder_aibridgeproxyd_{name}_count",
            provider="openai",
        )
        return value or 0.0


def upstream_response(
    status: int, body: bytes = b'{"error": {"message": "boom"}}'
) -> http.Response:
    """A response as mitmproxy reads it from an upstream: its end is not known at its head."""
    response = http.Response.make(status, body, {"content-type": "application/json"})
    response.timestamp_end = None
    return response


@pytest.mark.parametrize(
    ("provider", "authorization", "status", "code"),
    [
        ({"allow_byok": False, "keys": ("sk-central",)}, "Bearer sk-users-own", 403, "byok_not_allowed"),
        ({"keys": ()}, None, 403, "no_key_configured"),
    ],
)  # fmt: skip
def test_a_route_refusal_is_recorded_as_a_refusal(
    caplog: pytest.LogCaptureFixture,
    provider: dict[str, object],
    authorization: str | None,
    status: int,
    code: str,
) -> None:
    proxy = Proxy(**provider)
    flow = proxy.flow(authorization)
    with taddons.context(proxy.route, proxy.recorder), caplog.at_level(logging.DEBUG):
        proxy.run(flow)
    assert flow.response is not None and flow.response.status_code == status
    (record,) = proxy.writer.records
    assert (record.status, record.error, record.ttfb_ms) == (status, code, None)
    assert proxy.histogram_count("upstream_ttfb_seconds") == 0
    assert proxy.histogram_count("upstream_duration_seconds") == 0
    assert not [r for r in caplog.records if "upstream" in r.getMessage()]


def test_keys_exhausted_after_upstream_refusals_is_the_proxys_answer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The upstream rejected the only key: the client gets the proxy's all_keys_rejected."""
    proxy = Proxy(keys=("sk-central",))
    flow = proxy.flow()
    with taddons.context(proxy.route, proxy.recorder), caplog.at_level(logging.INFO):
        proxy.run(flow, upstream_response(401))
    (record,) = proxy.writer.records
    assert (record.status, record.error, record.ttfb_ms) == (502, "all_keys_rejected", None)
    assert proxy.histogram_count("upstream_ttfb_seconds") == 0
    assert not [r for r in caplog.records if "upstream answered" in r.getMessage()]


def test_an_unnamed_answer_made_by_an_addon_is_a_refusal_too() -> None:
    """Whoever answers a request before it goes upstream, the record does not claim an
    upstream answer."""
    proxy = Proxy(keys=("sk-central",))
    flow = proxy.flow()

    class Blocker:
        def request(self, flow: http.HTTPFlow) -> None:
            flow.response = http.Response.make(403, b"Forbidden")

    blocker = Blocker()
    with taddons.context(proxy.route, blocker, proxy.recorder):
        proxy.route.requestheaders(flow)
        proxy.recorder.requestheaders(flow)
        proxy.route.request(flow)
        blocker.request(flow)
        proxy.recorder.request(flow)
        proxy.recorder.responseheaders(flow)
        proxy.recorder.response(flow)
    (record,) = proxy.writer.records
    assert (record.error, record.ttfb_ms) == (PROXY_REFUSAL, None)


def test_a_dial_failure_answered_by_the_proxy_is_recorded_with_its_code() -> None:
    """What the HTTP layer does when the upstream cannot be reached: mark, then answer."""
    proxy = Proxy(keys=("sk-central",))
    flow = proxy.flow()
    with taddons.context(proxy.route, proxy.recorder):
        for addon in (proxy.route, proxy.recorder):
            addon.requestheaders(flow)
        for addon in (proxy.route, proxy.recorder):
            addon.request(flow)
        mark_proxy_answer(flow, "upstream_unreachable")
        flow.response = http.Response.make(502, b'{"error": {}}')
        for addon in (proxy.route, proxy.recorder):
            addon.responseheaders(flow)
        for addon in (proxy.route, proxy.recorder):
            addon.response(flow)
    (record,) = proxy.writer.records
    assert (record.status, record.error, record.ttfb_ms) == (502, "upstream_unreachable", None)
    assert proxy.histogram_count("upstream_duration_seconds") == 0


def test_an_upstream_error_is_still_logged_and_measured_as_an_upstream_answer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    proxy = Proxy(keys=("sk-central",))
    flow = proxy.flow()
    with taddons.context(proxy.route, proxy.recorder), caplog.at_level(logging.INFO):
        proxy.run(flow, upstream_response(500))
    (record,) = proxy.writer.records
    assert record.status == 500 and record.error is None and record.ttfb_ms is not None
    assert proxy.histogram_count("upstream_ttfb_seconds") == 1
    assert proxy.histogram_count("upstream_duration_seconds") == 1
    assert [r for r in caplog.records if r.getMessage().startswith("upstream answered 500")]


def test_an_upstream_success_is_measured() -> None:
    proxy = Proxy(keys=("sk-central",))
    flow = proxy.flow()
    with taddons.context(proxy.route, proxy.recorder):
        proxy.run(flow, upstream_response(200, b'{"usage": {"prompt_tokens": 1}}'))
    (record,) = proxy.writer.records
    assert record.status == 200 and record.error is None and record.ttfb_ms is not None
    assert proxy.histogram_count("upstream_ttfb_seconds") == 1
