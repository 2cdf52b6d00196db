"""Record every MITM'd request (section 10): who, which provider and model, which client,
status, timing and token usage read from the response as it streams past.

The usage tap sees each chunk once on its way to the client and keeps no copy of the body; the
record is handed to the writer's queue at the end and written in the background.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from mitmproxy import http

from aibridgeproxyd.clients import classify_client
from aibridgeproxyd.interception.state import RequestContext, request_context
from aibridgeproxyd.interception.writer import InterceptionWriter, rfc3339_ms
from aibridgeproxyd.metrics import Metrics
from aibridgeproxyd.model import InterceptionRecord
from aibridgeproxyd.usage import ApiKind, Usage, usage_from_json, usage_tap_for

from .error_answers import redactor_for

log = logging.getLogger("aibridgeproxyd.upstream")

ERROR_BODY_LOG_LIMIT = 16 * 1024
# The error code of an answer the proxy made itself when whoever made it named none.
PROXY_REFUSAL = "proxy_refusal"


def _tapped(
    stream: bool | Callable[[bytes], bytes | Iterable[bytes]], feed: Callable[[bytes], None]
) -> Callable[[bytes], bytes]:
    """Wrap a response's stream setting so every outgoing chunk also feeds the usage tap."""
    if callable(stream):
        transform = stream

        def transformed(chunk: bytes) -> bytes:
            out = transform(chunk)
            out = out if isinstance(out, bytes) else b"".join(out)
            feed(out)
            return out

        return transformed

    def passthrough(chunk: bytes) -> bytes:
        feed(chunk)
        return chunk

    return passthrough


def _sum(total: Usage | None, more: Usage) -> Usage:
    if total is None:
        return more

    def add(a: int | None, b: int | None) -> int | None:
        return b if a is None else a if b is None else a + b

    return Usage(
        input_tokens=add(total.input_tokens, more.input_tokens),
        output_tokens=add(total.output_tokens, more.output_tokens),
        cache_read_input_tokens=add(total.cache_read_input_tokens, more.cache_read_input_tokens),
        cache_creation_input_tokens=add(
            total.cache_creation_input_tokens, more.cache_creation_input_tokens
        ),
        model=total.model or more.model,
    )


class RecordInterceptions:
    def __init__(self, writer: InterceptionWriter, metrics: Metrics) -> None:
        self.writer = writer
        self.metrics = metrics

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        ctx = request_context(flow)
        if ctx is None:
            return
        request = flow.request
        ctx.api_kind = ctx.adapter.api_kind(request.method, request.path)
        ctx.client = classify_client(request.headers)
        # Without the query string: it can carry credentials (Gemini's ?key=).
        ctx.method, ctx.path = request.method, request.path.split("?", 1)[0]
        ctx.request_model = ctx.adapter.request_model(request)  # the head: a path's model

    def request(self, flow: http.HTTPFlow) -> None:
        ctx = request_context(flow)
        if ctx is None:
            return
        if flow.response is None:
            ctx.sent_upstream = time.time()  # contract 10.1: TTFB counts from here
        elif ctx.refusal is None:
            # An addon answered before anything went upstream, and named no code.
            ctx.refusal = PROXY_REFUSAL

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        ctx = request_context(flow)
        if ctx is None or flow.response is None:
            return
        response = flow.response
        if ctx.refusal is None and response.timestamp_end is not None:
            # Made whole by the proxy (``Response.make``): when an upstream's headers arrive,
            # the end of its response is not known yet.
            ctx.refusal = PROXY_REFUSAL
        if ctx.refusal is not None:
            return  # no time to first byte and no usage: nothing came from the upstream
        ctx.ttfb = time.time() - (ctx.sent_upstream or ctx.started)
        if response.stream and ctx.api_kind is not None and 200 <= response.status_code < 300:
            encoding = (
                None if ctx.transform is not None else response.headers.get("content-encoding")
            )
            tap = usage_tap_for(ctx.api_kind, encoding)
            ctx.usage_tap = tap
            response.stream = _tapped(response.stream, tap.feed)

    def response(self, flow: http.HTTPFlow) -> None:
        ctx = request_context(flow)
        if ctx is None or flow.response is None or flow.websocket is not None:
            return  # a WebSocket session is recorded when it ends
        # The proxy's own refusals were logged where they were made, and are not upstream
        # answers (contract 10.3: a line about a refusal never says "upstream").
        if flow.response.status_code >= 400 and ctx.refusal is None:
            self._log_error_body(flow, ctx)
        self._record(flow, ctx, None)

    def _log_error_body(self, flow: http.HTTPFlow, ctx: RequestContext) -> None:
        """Upstream error bodies, truncated, so an operator can see why a provider refused."""
        response = flow.response
        assert response is not None
        if response.stream:
            return
        # An upstream may echo a credential back: never log one. Redacted before it is cut, so
        # no secret is left half-visible at the cut.
        body = redactor_for(flow, ctx).redact(response.get_content(strict=False) or b"")
        text = body[:ERROR_BODY_LOG_LIMIT].decode("utf-8", "replace")
        if len(body) > ERROR_BODY_LOG_LIMIT:
            text += "...(truncated)"
        level = logging.ERROR if response.status_code >= 500 else logging.WARNING
        log.log(
            level,
            "upstream answered %d: %s",
            response.status_code,
            text,
            extra={
                "connect_id": ctx.connect.connect_id,
                "request_id": ctx.request_id,
                "provider": ctx.provider.name,
            },
        )

    def error(self, flow: http.HTTPFlow) -> None:
        ctx = request_context(flow)
        if ctx is not None and not ctx.recorded:
            self._record(flow, ctx, flow.error.msg if flow.error else "error")

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        """Responses over WebSocket (Codex) and Realtime report usage per response, in server
        messages; a session's record sums them. Each message is read once, then forgotten."""
        ctx = request_context(flow)
        if ctx is None or flow.websocket is None or not flow.websocket.messages:
            return
        message = flow.websocket.messages[-1]
        if message.from_client or b'"usage"' not in message.content:
            return
        usage = usage_from_json(ApiKind.OPENAI_RESPONSES, message.content)
        ctx.usage = _sum(ctx.usage, usage)

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        ctx = request_context(flow)
        if ctx is not None and not ctx.recorded:
            self._record(flow, ctx, None)

    def _usage(self, flow: http.HTTPFlow, ctx: RequestContext) -> Usage:
        if flow.websocket is not None:
            return ctx.usage or Usage()
        if ctx.usage_tap is not None:
            ctx.usage_tap.finish()
            return ctx.usage_tap.usage
        response = flow.response
        if (
            ctx.api_kind is None
            or response is None
            or response.stream
            or not 200 <= response.status_code < 300
        ):
            return Usage()
        body = response.get_content(strict=False)  # decoded; small, since it was buffered
        return usage_from_json(ctx.api_kind, body or b"")

    def _record(self, flow: http.HTTPFlow, ctx: RequestContext, error: str | None) -> None:
        ctx.recorded = True
        ended = time.time()
        usage = ctx.usage = self._usage(flow, ctx)
        provider = ctx.provider.name
        response = flow.response
        duration = ended - ctx.started
        if ctx.refusal is not None:
            error, ctx.ttfb = ctx.refusal, None
        elif ctx.ttfb is not None:
            # Upstream timings describe upstream answers only: not the proxy's refusals, and
            # not requests that failed before any response header arrived.
            self.metrics.upstream_duration.labels(provider).observe(duration)
            self.metrics.upstream_ttfb.labels(provider).observe(ctx.ttfb)
        for token_type, count in usage.tokens_by_type().items():
            if count:
                self.metrics.tokens.labels(provider, token_type).inc(count)
        ctx.record_submitted_at = time.time()
        ctx.record_dropped = not self.writer.submit(
            InterceptionRecord(
                request_id=ctx.request_id,
                connect_id=ctx.connect.connect_id,
                initiator=ctx.connect.identity,
                provider=provider,
                provider_type=ctx.provider.type,
                model=usage.model or ctx.request_model,
                client=ctx.client,
                method=ctx.method,
                path=ctx.path,
                status=response.status_code if response is not None else None,
                streamed=bool(response is not None and response.stream),
                input_tokens=usage.input_tokens,
                output_tokens=usage.output_tokens,
                cache_read_input_tokens=usage.cache_read_input_tokens,
                cache_creation_input_tokens=usage.cache_creation_input_tokens,
                started_at=rfc3339_ms(ctx.started),
                ended_at=rfc3339_ms(ended),
                ttfb_ms=round(ctx.ttfb * 1000, 3) if ctx.ttfb is not None else None,
                duration_ms=round(duration * 1000, 3),
                error=error,
            )
        )
