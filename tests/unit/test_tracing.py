"""Spans checked with the SDK's in-memory exporter."""

from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from aibridgeproxyd.config import load_config
from aibridgeproxyd.metrics import Metrics
from aibridgeproxyd.model import ProviderRecord
from aibridgeproxyd.reload import ProviderReloader, SnapshotHolder
from aibridgeproxyd.tracing import build_tracing, tracing_with


def tracer_and_exporter():  # type: ignore[no-untyped-def]
    exporter = InMemorySpanExporter()
    return tracing_with(exporter, SimpleSpanProcessor), exporter


async def test_reload_span_carries_counts_and_failures() -> None:
    tracing, exporter = tracer_and_exporter()
    rows = [ProviderRecord("openai", "openai"), ProviderRecord("broken", "nosuchtype")]

    async def good():  # type: ignore[no-untyped-def]
        return rows, [], {}

    async def bad():  # type: ignore[no-untyped-def]
        raise OSError("database is locked")

    holder = SnapshotHolder()
    reloader = ProviderReloader(good, holder, Metrics(), 10, tracer=tracing.tracer)
    assert await reloader.reload_once("signal")
    reloader.source = bad
    assert not await reloader.reload_once("timer")
    first, second = exporter.get_finished_spans()
    assert first.name == second.name == "ProvidersReload"
    assert first.attributes["aibridgeproxyd.reload.trigger"] == "signal"
    assert first.attributes["aibridgeproxyd.provider_count"] == 2
    assert first.attributes["aibridgeproxyd.providers_in_error"] == 1
    assert second.status.status_code is StatusCode.ERROR
    assert "database is locked" in (second.status.description or "")
    assert holder.current.provider_for_host("api.openai.com") is not None  # kept after the failure


def test_tracing_none_is_a_no_op() -> None:
    tracing = build_tracing(load_config(environ={}))
    assert not tracing.enabled
    with tracing.tracer.start_as_current_span("x") as span:
        assert not span.is_recording()
    tracing.shutdown()


def test_console_and_otlp_are_real_exporters() -> None:
    for mode in ("console", "otlp"):
        tracing = build_tracing(load_config(flags={"tracing": mode}, environ={}))
        assert tracing.enabled
        tracing.shutdown()
