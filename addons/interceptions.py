"""Record every MITM'd request: who, which provider and model, which client, status, timing
and token usage read from the response as it streams past (docs/monitoring.md, "Interception
records").

The usage tap sees each chunk once on its way to the client and keeps no copy of the body; the
record is handed to the writer's queue at the end and written in the background.
"""

from __future__ import annotations

import logging
import time

from mitmproxy import http

from aibridgeproxyd.clients import classify_client
from aibridgeproxyd.errors import decoded_error_body
from aibridgeproxyd.interception.log_records import emit_records, finish_records, start_record
from aibridgeproxyd.interception.recording import (
    PROXY_REFUSAL,
    build_record,
    collection_switches,
    error_body_for_log,
    finished_content,
    finished_usage,
    read_api_kind,
    read_client_session,
    read_request_model,
    read_user_agent,
    redact_recorded_text,
    redactor_for,
    tap_usage,
    upstream_ttfb,
    websocket_content,
    websocket_usage,
)
from aibridgeproxyd.interception.state import RequestContext, request_context
from aibridgeproxyd.interception.writer import InterceptionWriter
from aibridgeproxyd.metrics import Metrics
from aibridgeproxyd.model import InterceptionRecord
from aibridgeproxyd.pricing import PriceTable
from aibridgeproxyd.response_content import ContentSwitches
from aibridgeproxyd.usage import Usage

# Named after what its one line reports (an upstream's error answer), not after this module:
# operators filter on "aibridgeproxyd.upstream", so the name stays when the code moves.
log = logging.getLogger("aibridgeproxyd.upstream")

__all__ = ["RecordInterceptions"]

# flow.metadata key: this request's interception_start was logged.
_START_LOGGED = "aibridgeproxyd.interception_start_logged"


class RecordInterceptions:
    """Fills ``ctx.recording`` as the request passes, and submits one interception record per
    request (``aibridgeproxyd.interception.recording`` assembles it). ``content``: which of the
    response's tool calls and thoughts are recorded, and their size limit (config
    ``record_tool_calls``, ``record_thoughts``, ``record_max_bytes``)."""

    def __init__(
        self,
        writer: InterceptionWriter,
        metrics: Metrics,
        prices: PriceTable | None = None,
        content: ContentSwitches | None = None,
        *,
        log_interceptions: bool = False,
        record_prompts: bool = True,
    ) -> None:
        self.writer = writer
        self.metrics = metrics
        self.prices = prices or PriceTable()
        self.content = content or ContentSwitches()
        # What the readers collect: a margin past the cut, redacted then cut (_record).
        self.collect = collection_switches(self.content)
        # Structured interception logs (``interception.log_records``); off: nothing is built.
        self.log_interceptions = log_interceptions
        # The prompt's cut, read by ``routing.route_request`` before the adapter's rewrite.
        self.prompt_max_bytes = self.collect.max_bytes if record_prompts else None

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        ctx = request_context(flow)
        if ctx is None:
            return
        request, recording = flow.request, ctx.recording
        read_api_kind(ctx, request)
        recording.client = classify_client(request.headers)
        read_client_session(ctx, request)
        recording.prompt_max_bytes = self.prompt_max_bytes
        read_user_agent(ctx, request)
        # Without the query string: it can carry credentials (Gemini's ?key=).
        recording.method, recording.path = request.method, request.path.split("?", 1)[0]
        read_request_model(ctx, request)  # the head: a path's model

    def request(self, flow: http.HTTPFlow) -> None:
        ctx = request_context(flow)
        if ctx is None:
            return
        if flow.response is None:
            ctx.recording.sent_upstream = time.time()  # TTFB counts from here
        elif ctx.proxy_answer_code is None:
            # An addon answered before anything went upstream, and named no code.
            ctx.proxy_answer_code = PROXY_REFUSAL
        if self.log_interceptions:
            self._log_start(flow, ctx)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        ctx = request_context(flow)
        if ctx is None or flow.response is None:
            return
        response, recording = flow.response, ctx.recording
        if ctx.proxy_answer_code is None and response.timestamp_end is not None:
            # Made whole by the proxy (``Response.make``): when an upstream's headers arrive,
            # the end of its response is not known yet.
            ctx.proxy_answer_code = PROXY_REFUSAL
        if ctx.proxy_answer_code is not None:
            return  # no time to first byte and no usage: nothing came from the upstream
        recording.ttfb = time.time() - (recording.sent_upstream or ctx.started)
        tap_usage(response, recording, ctx.transform is not None, self.collect)

    def response(self, flow: http.HTTPFlow) -> None:
        ctx = request_context(flow)
        if ctx is None or flow.response is None or flow.websocket is not None:
            return  # a WebSocket session is recorded when it ends
        # The proxy's own refusals were logged where they were made, and are not upstream
        # answers (a line about a refusal never says "upstream").
        if flow.response.status_code >= 400 and ctx.proxy_answer_code is None:
            self._log_error_body(flow, ctx, flow.response)
        self._record(flow, ctx, None)

    def _cost(self, ctx: RequestContext, usage: Usage) -> int | None:
        """The usage's cost, counted per provider; reported usage without a price counts as
        unpriced. Never raises (``PriceTable.cost_micros``)."""
        model = usage.model or ctx.recording.request_model
        cost = self.prices.cost_micros(ctx.provider.type, model, usage)
        provider, metrics = ctx.provider.name, self.metrics
        if cost is not None:
            metrics.child(metrics.cost_micros, provider).inc(cost)
        elif usage.reported:
            metrics.child(metrics.unpriced_token_usage_records, provider).inc()
        return cost

    def _log_error_body(
        self, flow: http.HTTPFlow, ctx: RequestContext, response: http.Response
    ) -> None:
        """Upstream error bodies, redacted and truncated, so an operator can see why a provider
        refused. A streamed body went by unread."""
        if response.stream:
            return
        encoding = response.headers.get("content-encoding")
        body = decoded_error_body(response.raw_content or b"", encoding)
        if body is None:
            text = f"(a {encoding} body that cannot be decoded within bounds)"
        else:
            text = error_body_for_log(body, redactor_for(flow, ctx))
        level = logging.ERROR if response.status_code >= 500 else logging.WARNING
        log.log(level, "upstream answered %d: %s", response.status_code, text, extra=ctx.log_ids())

    def error(self, flow: http.HTTPFlow) -> None:
        ctx = request_context(flow)
        if ctx is not None and not ctx.recording.recorded:
            self._record(flow, ctx, flow.error.msg if flow.error else "error")

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        """Each message is read once for usage, model, tool calls and thoughts, then forgotten."""
        ctx = request_context(flow)
        if ctx is None or flow.websocket is None or not flow.websocket.messages:
            return
        message, recording = flow.websocket.messages[-1], ctx.recording
        recording.usage = websocket_usage(
            recording.usage, message.content, recording.api_kind, message.from_client
        )
        websocket_content(recording, message.content, message.from_client, self.collect)

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        ctx = request_context(flow)
        if ctx is not None and not ctx.recording.recorded:
            self._record(flow, ctx, None)

    def _record(self, flow: http.HTTPFlow, ctx: RequestContext, error: str | None) -> None:
        recording = ctx.recording
        recording.recorded = True
        ended = time.time()
        usage = recording.usage = finished_usage(flow, recording)
        self._count_upstream(ctx, usage, ended)
        cost = self._cost(ctx, usage)
        recording.submitted_at = time.time()
        content = finished_content(flow, recording, self.collect)
        record = build_record(ctx, flow.response, usage, error, ended, cost, content)
        record = redact_recorded_text(record, flow, ctx, self.content.max_bytes)
        recording.client_session_id = record.client_session_id  # redacted, for the span
        recording.dropped = not self.writer.submit(record)
        if self.log_interceptions:
            self._log_finish(flow, ctx, record)

    def _count_upstream(self, ctx: RequestContext, usage: Usage, ended: float) -> None:
        """Upstream timings and token counters of a finished request."""
        provider, metrics = ctx.provider.name, self.metrics
        if (ttfb := upstream_ttfb(ctx)) is not None:
            # Upstream timings describe upstream answers only: not the proxy's refusals, and
            # not requests that failed before any response header arrived.
            metrics.child(metrics.upstream_duration, provider).observe(ended - ctx.started)
            metrics.child(metrics.upstream_ttfb, provider).observe(ttfb)
        for token_type, count in usage.tokens_by_type().items():
            if count:
                metrics.child(metrics.tokens, provider, token_type).inc(count)

    def _log_start(self, flow: http.HTTPFlow, ctx: RequestContext) -> None:
        """``interception_start`` once per request: when it is routed (``request``), or with
        its end when it failed before (``error`` on a request cut short)."""
        if flow.metadata.get(_START_LOGGED):
            return
        flow.metadata[_START_LOGGED] = True
        emit_records([start_record(ctx)], _log_ids(ctx), redactor_for(flow, ctx))

    def _log_finish(
        self, flow: http.HTTPFlow, ctx: RequestContext, record: InterceptionRecord
    ) -> None:
        self._log_start(flow, ctx)
        emit_records(finish_records(record), _log_ids(ctx), redactor_for(flow, ctx))


def _log_ids(ctx: RequestContext) -> dict[str, str]:
    """The ids of a structured record: ``log_ids`` without its ``provider`` (the provider's
    name), which the records carry as ``provider_name``, ``provider`` being its type."""
    return {"connect_id": ctx.connect.connect_id, "request_id": ctx.request_id}
