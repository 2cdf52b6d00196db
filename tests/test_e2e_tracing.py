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

from tests.fakes.upstream import (
    CACHE_CREATION_INPUT_TOKENS,
    CACHED_INPUT_TOKENS,
    INPUT_TOKENS,
    FakeUpstream,
)
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


def test_intercept_spans_carry_the_genai_attributes_and_the_requests_log_lines(
    collector: Collector,
) -> None:
    """OpenAI SDK requests (buffered, streamed, failed upstream) with ``trace_logs`` and
    ``log_interceptions`` on: each Intercept span has the GenAI semantic-convention attributes,
    input tokens counted with the cached ones, and its request's log lines as events."""
    with (
        FakeUpstream() as upstream,
        DaemonProcess(
            {
                "upstream_ca_file": upstream.ca_pem_path,
                "tracing": "otlp",
                "otlp_endpoint": collector.endpoint,
                "trace_logs": True,
                "log_interceptions": True,
            },
            env={"OTEL_BSP_SCHEDULE_DELAY": "100"},
        ) as d,
    ):
        d.edit_provider("openai", upstream.base_url, "sk-secret-central")
        d.edit_provider("anthropic", upstream.origin, "sk-ant-secret-central")
        d.reload_and_wait()
        token = d.create_token("alice")
        client = d.openai_client(token)
        messages: Any = [{"role": "user", "content": "hi"}]
        buffered = client.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=messages
        )
        with client.chat.completions.with_streaming_response.create(
            model="gpt-4o",
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
        ) as streamed:
            streamed_id = streamed.headers["x-aibridge-request-id"]
            assert list(streamed.iter_lines())
        failed = d.httpx_client(token).post(
            "https://api.openai.com/v1/chat/completions",
            json={"model": "gpt-4o", "messages": messages},
            headers={"authorization": "Bearer aibridgeproxyd", "x-fake-status": "500"},
        )
        assert failed.status_code == 500
        anthropic = d.anthropic_client(token).messages.with_raw_response.create(
            model="claude-haiku-4-5", max_tokens=8, messages=messages
        )
        ids = {
            "buffered": buffered.headers["x-aibridge-request-id"],
            "streamed": streamed_id,
            "failed": failed.headers["x-aibridge-request-id"],
            "anthropic": anthropic.headers["x-aibridge-request-id"],
        }
        d.wait_for(
            lambda: len(collector.named("Intercept")) == 4, timeout=15, message="spans exported"
        )
        spans = {
            attributes(s)["aibridgeproxyd.request_id"]: s for s in collector.named("Intercept")
        }

    expected = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4o",
        "gen_ai.response.model": "gpt-4o",  # the fake answers with the model asked for
        "gen_ai.usage.input_tokens": INPUT_TOKENS,  # the record keeps the fresh part only
        "gen_ai.usage.cache_read.input_tokens": CACHED_INPUT_TOKENS,
        "gen_ai.usage.output_tokens": 3,
        "server.address": "127.0.0.1",
        "aibridgeproxyd.usage.input_tokens": INPUT_TOKENS - CACHED_INPUT_TOKENS,
    }
    for kind in ("buffered", "streamed"):
        span = spans[ids[kind]]
        got = attributes(span)
        assert got | expected == got, kind
        assert got["gen_ai.request.stream"] is (kind == "streamed")
        assert "gen_ai.usage.cache_write.input_tokens" not in got
        assert "error.type" not in got
        names = [event.name for event in span.events]
        assert "interception log" in names, kind
        record_types = {
            attr.value.string_value
            for event in span.events
            for attr in event.attributes
            if attr.key == "record_type"
        }
        assert record_types == {
            "interception_start",
            "interception_end",
            "token_usage",
            "prompt_usage",
        }
    streamed_attributes = attributes(spans[ids["streamed"]])
    assert 0 < streamed_attributes["gen_ai.response.time_to_first_chunk"] < 10
    assert "gen_ai.response.time_to_first_chunk" not in attributes(spans[ids["buffered"]])
    failed_attributes = attributes(spans[ids["failed"]])
    assert failed_attributes["error.type"] == "http_500"
    assert failed_attributes["gen_ai.operation.name"] == "chat"
    assert not [name for name in failed_attributes if name.startswith("gen_ai.usage.")]
    anthropic_attributes = attributes(spans[ids["anthropic"]])
    anthropic_expected = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "anthropic",
        "gen_ai.request.model": "claude-haiku-4-5",
        "gen_ai.request.stream": False,
        # Anthropic's input_tokens is the fresh part; the convention's total adds the cache.
        "gen_ai.usage.input_tokens": INPUT_TOKENS
        + CACHED_INPUT_TOKENS
        + CACHE_CREATION_INPUT_TOKENS,
        "gen_ai.usage.cache_read.input_tokens": CACHED_INPUT_TOKENS,
        "gen_ai.usage.cache_write.input_tokens": CACHE_CREATION_INPUT_TOKENS,
        "gen_ai.usage.cache_creation.input_tokens": CACHE_CREATION_INPUT_TOKENS,
        "aibridgeproxyd.usage.input_tokens": INPUT_TOKENS,
    }
    assert anthropic_attributes | anthropic_expected == anthropic_attributes
    everything = repr(list(spans.values()))
    for secret in (token, "sk-secret-central", "sk-ant-secret-central"):
        assert secret not in everything
