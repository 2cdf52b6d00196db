"""OpenTelemetry set-up (docs/monitoring.md#tracing): ``none``, ``console`` or ``otlp`` by
config, and the attributes each span of a CONNECT or MITM'd request carries (the tracing addon
opens and ends the spans).

Spans are exported from a background thread (BatchSpanProcessor), never on the event loop.
With ``none`` the tracer is a no-op and the tracing addon returns at once from every hook.
Attributes carry ids, provider, model, status and token counts; never keys, tokens, headers,
query strings or bodies.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

from aibridgeproxyd import __version__
from aibridgeproxyd.config import Config
from aibridgeproxyd.interception.recording import upstream_ttfb
from aibridgeproxyd.interception.state import ConnectInfo, RequestContext

# Span attributes, in the order they are set.
Attributes = dict[str, str | bool | int | float]
# error.type and the status description are cut to this many characters.
MAX_ERROR_CHARS = 200


@dataclass
class Tracing:
    """The tracer the addons use, and its provider when spans are exported (None: tracing off)."""

    tracer: trace.Tracer
    provider: TracerProvider | None = None

    @property
    def enabled(self) -> bool:
        return self.provider is not None

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()  # flushes what is queued


def tracing_with(
    exporter: SpanExporter | None, processor_factory: type = BatchSpanProcessor
) -> Tracing:
    if exporter is None:
        return Tracing(trace.NoOpTracer())
    provider = TracerProvider(
        resource=Resource.create({"service.name": "aibridgeproxyd", "service.version": __version__})
    )
    provider.add_span_processor(processor_factory(exporter))
    return Tracing(provider.get_tracer("aibridgeproxyd", __version__), provider)


def build_tracing(config: Config) -> Tracing:
    exporter: SpanExporter | None = None
    if config.tracing == "console":
        exporter = ConsoleSpanExporter(
            out=sys.stdout, formatter=lambda span: span.to_json(indent=None) + "\n"
        )
    elif config.tracing == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=config.otlp_endpoint.rstrip("/") + "/v1/traces")
    return tracing_with(exporter)


def connect_attributes(host: str, port: int, info: ConnectInfo | None) -> Attributes:
    """The ``Connect`` span's: the target, and the connection's id, provider and caller once
    classification and authentication have recorded them."""
    attributes: Attributes = {"server.address": host, "server.port": port}
    if info is not None:
        attributes["aibridgeproxyd.connect_id"] = info.connect_id
        if info.provider_name:
            attributes["aibridgeproxyd.provider"] = info.provider_name
        if info.identity:
            attributes["aibridgeproxyd.initiator"] = info.identity
    return attributes


def intercept_attributes(ctx: RequestContext, method: str, path: str) -> Attributes:
    """The ``Intercept`` span's at the request's head. ``method`` and ``path`` are the
    request's, used when the context has none yet; the query string is never kept."""
    return {
        "aibridgeproxyd.request_id": ctx.request_id,
        "aibridgeproxyd.connect_id": ctx.connect.connect_id,
        "aibridgeproxyd.provider": ctx.provider.name,
        "aibridgeproxyd.provider_type": ctx.provider.type,
        "aibridgeproxyd.initiator": ctx.connect.identity or "",
        "aibridgeproxyd.client": ctx.recording.client,
        "http.request.method": ctx.recording.method or method,
        "url.path": ctx.recording.path or path.split("?", 1)[0],
    }


def route_attributes(ctx: RequestContext, upstream_host: str) -> Attributes:
    """The ``Intercept.Route`` span's, once the route decided: provider, credential mode and
    the host the adapter pointed the request at."""
    attributes: Attributes = {"aibridgeproxyd.provider": ctx.provider.name}
    if ctx.routing.credential_mode:
        attributes["aibridgeproxyd.credential_mode"] = ctx.routing.credential_mode
    attributes["server.address"] = upstream_host
    return attributes


def upstream_result_attributes(ctx: RequestContext, status: int | None) -> Attributes:
    """The ``Intercept.Upstream`` span's at the end: the final status (None: no answer), time
    to first byte in milliseconds, and how many central keys were tried."""
    attributes: Attributes = {}
    if status is not None:
        attributes["http.response.status_code"] = status
    if (ttfb := upstream_ttfb(ctx)) is not None:
        attributes["aibridgeproxyd.ttfb_ms"] = round(ttfb * 1000, 3)
    attributes["aibridgeproxyd.key_attempts"] = len(ctx.routing.tried_keys)
    return attributes


def intercept_result_attributes(
    ctx: RequestContext, status: int | None, streamed: bool
) -> Attributes:
    """The ``Intercept`` span's at the end: status, streaming, the model (the upstream's, else
    the one asked for) and the token counts the upstream reported."""
    attributes: Attributes = {}
    if status is not None:
        attributes["http.response.status_code"] = status
    attributes["aibridgeproxyd.streamed"] = streamed
    usage = ctx.recording.usage
    if usage is not None:
        if model := usage.model or ctx.recording.request_model:
            attributes["gen_ai.response.model"] = model
        for name, count in (
            ("input_tokens", usage.input_tokens),
            ("output_tokens", usage.output_tokens),
            ("cache_read_input_tokens", usage.cache_read_input_tokens),
            ("cache_creation_input_tokens", usage.cache_creation_input_tokens),
            ("reasoning_output_tokens", usage.reasoning_output_tokens),
        ):
            if count is not None:
                attributes[f"aibridgeproxyd.usage.{name}"] = count
    return attributes


def intercept_error(error: str | None, status: int | None) -> str | None:
    """What failed the ``Intercept`` span: the flow's error, else ``http_<status>`` for a 5xx
    answer; None when it succeeded (a 4xx is the client's problem, not the proxy's)."""
    if error:
        return error
    return f"http_{status}" if status is not None and status >= 500 else None
