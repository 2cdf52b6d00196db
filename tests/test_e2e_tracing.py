"""End to end: with `tracing: otlp` the daemon exports the section-10 span tree over OTLP/HTTP to
a collector (a local fake that decodes the protobuf), joins the caller's traceparent, and hands
its own span context to the upstream. No attribute carries a key or a token."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.fakes.upstream import FakeUpstream
from tests.harness import DaemonProcess

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN_ID = "00f067aa0ba902b7"


class Collector:
    """An OTLP/HTTP trace receiver on loopback."""

    def __init__(self) -> None:
        self.spans: list[Any] = []
        self.lock = threading.Lock()
        collector = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                with collector.lock:
                    for resource_spans in request.resource_spans:
                        for scope_spans in resource_spans.scope_spans:
                            collector.spans.extend(scope_spans.spans)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def named(self, name: str) -> list[Any]:
        with self.lock:
            return [s for s in self.spans if s.name == name]


@pytest.fixture
def collector() -> Iterator[Collector]:
    c = Collector()
    c.thread.start()
    yield c
    c.server.shutdown()


def attributes(span: Any) -> dict[str, Any]:
    result = {}
    for kv in span.attributes:
        value = kv.value
        result[kv.key] = getattr(value, value.WhichOneof("value"))
    return result


def test_span_tree_is_exported_over_otlp_and_joins_the_callers_trace(collector: Collector) -> None:
    with (
        FakeUpstream() as upstream,
        DaemonProcess(
            {
                "upstream_ca_file": upstream.ca_pem_path,
                "tracing": "otlp",
                "otlp_endpoint": collector.endpoint,
            },
            env={"OTEL_BSP_SCHEDULE_DELAY": "100"},
        ) as d,
    ):
        d.edit_provider("openai", upstream.base_url, "sk-secret-central")
        d.reload_and_wait()
        token = d.create_token("alice")
        with d.httpx_client(token) as client:
            response = client.post(
                "https://api.openai.com/v1/chat/completions?trace=me",
                json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
                headers={
                    "authorization": "Bearer aibridgeproxyd",
                    "traceparent": f"00-{TRACE_ID}-{CALLER_SPAN_ID}-01",
                },
            )
        assert response.status_code == 200
        request_id = response.headers["x-aibridge-request-id"]
        d.wait_for(
            lambda: d.metric("mitm_requests_total", provider="openai"), message="request counted"
        )
        names = (
            "Connect",
            "Intercept",
            "Intercept.Route",
            "Intercept.Upstream",
            "Intercept.RecordInterception",
            "ProvidersReload",
        )
        d.wait_for(
            lambda: all(collector.named(n) for n in names), timeout=15, message="all spans exported"
        )

        (intercept,) = collector.named("Intercept")
        assert intercept.trace_id.hex() == TRACE_ID
        assert intercept.parent_span_id.hex() == CALLER_SPAN_ID
        for child_name in ("Intercept.Route", "Intercept.Upstream", "Intercept.RecordInterception"):
            (child,) = collector.named(child_name)
            assert child.trace_id == intercept.trace_id
            assert child.parent_span_id == intercept.span_id

        intercept_attributes = attributes(intercept)
        assert intercept_attributes["aibridgeproxyd.request_id"] == request_id
        assert intercept_attributes["aibridgeproxyd.provider"] == "openai"
        assert intercept_attributes["aibridgeproxyd.initiator"] == "alice"
        assert intercept_attributes["http.response.status_code"] == 200
        assert intercept_attributes["url.path"] == "/v1/chat/completions"
        assert intercept_attributes["gen_ai.response.model"] == "gpt-4o"
        assert intercept_attributes["aibridgeproxyd.usage.output_tokens"] == 3
        (route,) = collector.named("Intercept.Route")
        assert attributes(route)["aibridgeproxyd.credential_mode"] == "central"
        (upstream_span,) = collector.named("Intercept.Upstream")
        assert attributes(upstream_span)["aibridgeproxyd.key_attempts"] == 1
        assert any(
            attributes(s).get("aibridgeproxyd.connect.type") == "mitm"
            for s in collector.named("Connect")
        )
        assert {
            attributes(s)["aibridgeproxyd.reload.trigger"]
            for s in collector.named("ProvidersReload")
        } >= {"start"}

        # The upstream sees our span as its parent, in the caller's trace.
        (upstream_request,) = upstream.requests
        _, trace_id, parent_id, _ = upstream_request.headers["traceparent"].split("-")
        assert trace_id == TRACE_ID and parent_id == upstream_span.span_id.hex()

        everything = repr([attributes(s) for s in collector.spans])
        assert token not in everything and "sk-secret-central" not in everything
        assert "trace=me" not in everything
