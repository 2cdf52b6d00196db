"""OpenTelemetry set-up (section 10): ``none``, ``console`` or ``otlp`` by config.

Spans are exported from a background thread (BatchSpanProcessor), never on the event loop.
With ``none`` the tracer is a no-op and the tracing addon returns at once from every hook.
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


@dataclass
class Tracing:
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
