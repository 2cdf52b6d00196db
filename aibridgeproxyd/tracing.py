"""OpenTelemetry set-up (docs/monitoring.md#tracing): ``none``, ``console`` or ``otlp`` by
config, and the attributes each span of a CONNECT or MITM'd request carries (the tracing addon
opens and ends the spans).

Spans are exported from a background thread (BatchSpanProcessor), never on the event loop.
With ``none`` the tracer is a no-op and the tracing addon returns at once from every hook.
Attributes carry ids, provider, model, status and token counts; never keys, tokens, headers,
query strings or bodies. The ``Intercept`` span also carries the OpenTelemetry GenAI semantic
conventions (open-telemetry/semantic-conventions-genai, docs/gen-ai/client-inference.md;
docs/monitoring.md#span-attributes). ``trace_logs``: ``SpanLogEvents`` attaches a request's log
lines to its ``Intercept`` span.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

from aibridgeproxyd import __version__
from aibridgeproxyd.config import Config
from aibridgeproxyd.interception.recording import upstream_ttfb
from aibridgeproxyd.interception.state import ConnectInfo, RequestContext
from aibridgeproxyd.logs import record_extras
from aibridgeproxyd.usage import ApiKind, Usage

# Span attributes, in the order they are set.
Attributes = dict[str, str | bool | int | float]
# error.type and the status description are cut to this many characters.
MAX_ERROR_CHARS = 200
# trace_logs: at most this many log lines become events of one span; each event's name and
# string attributes are cut at MAX_EVENT_CHARS.
MAX_LOG_EVENTS = 32
MAX_EVENT_CHARS = 1024

# ``gen_ai.operation.name`` of each API kind: the well-known values of the OpenTelemetry GenAI
# conventions (semantic-conventions-genai, registry ``gen_ai.operation.name``; realtime from
# gen-ai-realtime-spans.md). A Realtime transcription session has no well-known value.
GENAI_OPERATIONS: dict[ApiKind, str] = {
    ApiKind.OPENAI_CHAT_COMPLETIONS: "chat",
    ApiKind.OPENAI_COMPLETIONS: "text_completion",
    ApiKind.OPENAI_RESPONSES: "chat",
    ApiKind.OPENAI_EMBEDDINGS: "embeddings",
    ApiKind.OPENAI_REALTIME: "realtime_inference",
    ApiKind.OPENAI_REALTIME_TRANSCRIPTION: "transcription",
    ApiKind.ANTHROPIC_MESSAGES: "chat",
    ApiKind.GEMINI_GENERATE_CONTENT: "generate_content",
    ApiKind.GEMINI_LIVE: "realtime_inference",
}


class SpanLogEvents(logging.Handler):
    """``trace_logs: true``: a logging handler that attaches each log line carrying a
    ``request_id`` to that request's open ``Intercept`` span as an event (name: the message;
    attributes: ``level``, ``logger`` and the line's ``extra`` fields, which never hold a
    secret, since no log line may). At most ``MAX_LOG_EVENTS`` per span; the rest are counted
    in ``aibridgeproxyd.log_events.dropped``. Lines logged before the span opens or after it
    ends are not attached."""

    def __init__(self) -> None:
        super().__init__()
        self._spans: dict[str, _SpanEvents] = {}

    def attach(self, request_id: str, span: trace.Span) -> None:
        self._spans[request_id] = _SpanEvents(span)

    def detach(self, request_id: str) -> None:
        """Stop attaching; called before the span ends. Notes how many lines were dropped."""
        entry = self._spans.pop(request_id, None)
        if entry is not None and entry.dropped:
            entry.span.set_attribute("aibridgeproxyd.log_events.dropped", entry.dropped)

    def emit(self, record: logging.LogRecord) -> None:
        entry = self._spans.get(getattr(record, "request_id", None) or "")
        if entry is None:
            return
        if entry.added >= MAX_LOG_EVENTS:
            entry.dropped += 1
            return
        entry.added += 1
        try:
            entry.span.add_event(
                record.getMessage()[:MAX_EVENT_CHARS],
                attributes=log_event_attributes(record),
                timestamp=int(record.created * 1e9),
            )
        except Exception:
            self.handleError(record)


@dataclass
class _SpanEvents:
    span: trace.Span
    added: int = 0
    dropped: int = 0


def log_event_attributes(record: logging.LogRecord) -> Attributes:
    """A log line's span-event attributes: its level and logger, then its ``extra`` fields
    that have a value (strings cut at ``MAX_EVENT_CHARS``; other types as text)."""
    attributes: Attributes = {"level": record.levelname.lower(), "logger": record.name}
    for name, value in record_extras(record).items():
        if value is None:
            continue
        if not isinstance(value, str | bool | int | float):
            value = str(value)
        attributes[name] = value[:MAX_EVENT_CHARS] if isinstance(value, str) else value
    return attributes


@dataclass
class Tracing:
    """The tracer the addons use, and its provider when spans are exported (None: tracing off).
    ``log_events``: the handler attaching log lines to spans (``trace_logs``), installed on the
    root logger while spans are exported; None when off."""

    tracer: trace.Tracer
    provider: TracerProvider | None = None
    log_events: SpanLogEvents | None = field(default=None)

    @property
    def enabled(self) -> bool:
        return self.provider is not None

    def shutdown(self) -> None:
        if self.log_events is not None:
            logging.getLogger().removeHandler(self.log_events)
        if self.provider is not None:
            self.provider.shutdown()  # flushes what is queued


def tracing_with(
    exporter: SpanExporter | None,
    processor_factory: type = BatchSpanProcessor,
    *,
    trace_logs: bool = False,
) -> Tracing:
    """Tracing to ``exporter`` (None: off). ``trace_logs``: install ``SpanLogEvents`` on the
    root logger (removed by ``Tracing.shutdown``); nothing is installed when tracing is off."""
    if exporter is None:
        return Tracing(trace.NoOpTracer())
    provider = TracerProvider(
        resource=Resource.create({"service.name": "aibridgeproxyd", "service.version": __version__})
    )
    provider.add_span_processor(processor_factory(exporter))
    log_events = SpanLogEvents() if trace_logs else None
    if log_events is not None:
        logging.getLogger().addHandler(log_events)
    return Tracing(provider.get_tracer("aibridgeproxyd", __version__), provider, log_events)


def build_tracing(config: Config) -> Tracing:
    exporter: SpanExporter | None = None
    if config.tracing == "console":
        exporter = ConsoleSpanExporter(
            out=sys.stdout, formatter=lambda span: span.to_json(indent=None) + "\n"
        )
    elif config.tracing == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=config.otlp_endpoint.rstrip("/") + "/v1/traces")
    return tracing_with(exporter, trace_logs=config.trace_logs)


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
    request's, used when the context has none yet; the query string is never kept. The GenAI
    convention's operation and provider are set here, at span creation, as it asks (they may
    decide sampling): the operation only for an API whose usage is read (``recording.api_kind``),
    the provider from the adapter (``Adapter.genai_provider_name``)."""
    attributes: Attributes = {
        "aibridgeproxyd.request_id": ctx.request_id,
        "aibridgeproxyd.connect_id": ctx.connect.connect_id,
        "aibridgeproxyd.provider": ctx.provider.name,
        "aibridgeproxyd.provider_type": ctx.provider.type,
        "aibridgeproxyd.initiator": ctx.connect.identity or "",
        "aibridgeproxyd.client": ctx.recording.client,
        "http.request.method": ctx.recording.method or method,
        "url.path": ctx.recording.path or path.split("?", 1)[0],
    }
    api_kind = ctx.recording.api_kind
    if api_kind is not None:
        attributes["gen_ai.operation.name"] = GENAI_OPERATIONS[api_kind]
    attributes["gen_ai.provider.name"] = ctx.adapter.genai_provider_name
    return attributes


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
    """The ``Intercept`` span's at the end: status, streaming and the token counts the upstream
    reported, as the record counts them (``genai_result_attributes`` has the convention's)."""
    attributes: Attributes = {}
    if status is not None:
        attributes["http.response.status_code"] = status
    attributes["aibridgeproxyd.streamed"] = streamed
    usage = ctx.recording.usage
    if usage is not None:
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


def intercept_error(
    error: str | None, status: int | None, proxy_answer_code: str | None = None
) -> str | None:
    """What failed the ``Intercept`` span (``error.type``): the flow's error, else for a 5xx
    answer the proxy's own code when it made the answer (``keys_exhausted``, ...), else
    ``http_<status>``; None when it succeeded (a 4xx is the client's problem, not the
    proxy's)."""
    if error:
        return error
    if status is None or status < 500:
        return None
    return proxy_answer_code or f"http_{status}"


def genai_result_attributes(
    ctx: RequestContext, streamed: bool, first_chunk: float | None
) -> Attributes:
    """The GenAI convention's attributes of the ``Intercept`` span at the end (an API whose
    usage is read, else none): the client's session (``gen_ai.conversation.id``), the models
    asked for and answered with, streaming, time to the
    first chunk of a streamed answer (``first_chunk``, epoch seconds; measured, like the TTFB,
    from the request leaving for the upstream; in seconds), and the token counts. A count the
    upstream did not report is absent, never 0."""
    recording = ctx.recording
    if recording.api_kind is None:
        return {}
    attributes: Attributes = {"gen_ai.request.stream": streamed}
    if recording.client_session_id:  # redacted when the record was built
        attributes["gen_ai.conversation.id"] = recording.client_session_id
    if recording.request_model:
        attributes["gen_ai.request.model"] = recording.request_model
    usage = recording.usage or Usage()
    if usage.model:
        attributes["gen_ai.response.model"] = usage.model
    if streamed and first_chunk is not None and ctx.proxy_answer_code is None:
        sent = recording.sent_upstream or ctx.started
        attributes["gen_ai.response.time_to_first_chunk"] = round(max(first_chunk - sent, 0), 6)
    attributes.update(genai_usage_attributes(usage))
    return attributes


def genai_usage_attributes(usage: Usage) -> dict[str, int]:
    """``gen_ai.usage.*`` from the record's counts. The convention's ``input_tokens`` includes
    cached input ("SHOULD include all types of input tokens, including cached tokens"), so it is
    the record's ``input_tokens + cache_read + cache_creation`` (our record counts fresh input
    only); present only when the upstream reported fresh input. Cache writes under both
    spellings: ``cache_write`` (semantic-conventions-genai) and ``cache_creation`` (semantic
    conventions v1.40 to v1.41, and CONTRACT 10.2)."""
    attributes: dict[str, int] = {}
    if usage.input_tokens is not None:
        attributes["gen_ai.usage.input_tokens"] = (
            usage.input_tokens
            + (usage.cache_read_input_tokens or 0)
            + (usage.cache_creation_input_tokens or 0)
        )
    for name, count in (
        ("gen_ai.usage.output_tokens", usage.output_tokens),
        ("gen_ai.usage.cache_read.input_tokens", usage.cache_read_input_tokens),
        ("gen_ai.usage.cache_write.input_tokens", usage.cache_creation_input_tokens),
        ("gen_ai.usage.cache_creation.input_tokens", usage.cache_creation_input_tokens),
        ("gen_ai.usage.reasoning.output_tokens", usage.reasoning_output_tokens),
    ):
        if count is not None:
            attributes[name] = count
    return attributes
